//! The KVM VM: guest memory slots and the in-kernel interrupt controllers.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use std::fs::File;
use std::sync::Arc;

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::arch::layout;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("cannot create the KVM VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
    #[error("KVM refused {what}: {source}")]
    Setup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub mem: GuestMemoryMmap,
}

impl Vm {
    pub fn new(mem_bytes: u64) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let mem = guest_ram(mem_bytes).map_err(|reason| VmError::Memory {
            mib: mem_bytes >> 20,
            reason,
        })?;
        let vm = Self { kvm, fd, mem };
        vm.register_memory()?;
        vm.create_irqchip()?;
        Ok(vm)
    }

    fn register_memory(&self) -> Result<(), VmError> {
        for (slot, region) in self.mem.iter().enumerate() {
            let host = region.as_ptr() as u64;
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `self.mem`, which
            // outlives the VM fd (both are dropped together with `Vm`).
            unsafe { self.fd.set_user_memory_region(mem_region) }.map_err(|source| {
                VmError::Setup {
                    what: "a guest memory slot",
                    source,
                }
            })?;
        }
        Ok(())
    }

    fn create_irqchip(&self) -> Result<(), VmError> {
        let setup = |what| move |source| VmError::Setup { what, source };
        self.fd
            .set_tss_address(layout::KVM_TSS_ADDR)
            .map_err(setup("the TSS address"))?;
        self.fd
            .create_irq_chip()
            .map_err(setup("the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(setup("the in-kernel PIT"))
    }
}

/// Guest RAM as shared mappings of one memfd, each region at its offset:
/// a vhost-user backend (virtiofsd) maps the same file to reach the
/// guest's buffers. Pages are allocated on first touch, as with anonymous
/// memory.
fn guest_ram(mem_bytes: u64) -> Result<GuestMemoryMmap, String> {
    let fd =
        nix::sys::memfd::memfd_create("husk-guest-ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| format!("memfd_create: {e}"))?;
    let file = Arc::new(File::from(fd));
    file.set_len(mem_bytes)
        .map_err(|e| format!("sizing the memfd: {e}"))?;
    let mut offset = 0u64;
    let ranges: Vec<_> = layout::ram_regions(mem_bytes)
        .into_iter()
        .map(|(start, len)| {
            let range = (
                GuestAddress(start),
                len as usize,
                Some(FileOffset::from_arc(file.clone(), offset)),
            );
            offset += len;
            range
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|e| e.to_string())
}
