//! Running guests on a PVM host (`kvm_pvm`: KVM without VT-x/AMD-V, inside
//! another VM). There a stock guest kernel's ring 0 is executed by KVM's
//! instruction emulator, which refuses some instructions. This module keeps the
//! guest off them (measured in ENVIRONMENT.md: CPUID masks did not reliably
//! reach the guest, command-line switches did) and handles, in userspace, the
//! refusals that can be handled: INT3 becomes an injected #BP, FWAIT is stepped,
//! and the XSAVE64/XRSTOR64 husk's guest kernel uses to switch tasks' vector
//! state are done with KVM_GET/SET_XSAVE (docs/pvm.md).

use std::path::Path;

use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::cpuid::{FeatureBit, Reg};

/// Guest command-line switches that keep a stock kernel off what the emulator
/// refuses: the XSAVE family (FPU init), CMPXCHG16B (SLUB), POPCNT, and the
/// rest of the list ENVIRONMENT.md measured; no page-table isolation and no
/// mitigations, which only add emulated work. `husk.pvm_syscall` turns on the
/// guest kernel's completion of SYSCALLs this host delivers without switching
/// to ring 0 (guest-image/patches). `husk.pvm_xstate` has it keep tasks' whole
/// vector state (AVX included: its user mode runs natively with the host's
/// XCR0) through the XSAVE64/XRSTOR64 handled here. Other kernels ignore both.
pub const GUEST_CMDLINE: &str = "noxsave nopti mitigations=off husk.pvm_syscall husk.pvm_xstate \
clearcpuid=cx16,popcnt,umip,bmi1,bmi2,erms,fsrm,avx,avx2,sse4_1,sse4_2,movbe,rdrand,rdseed,adx,smap,smep";

/// The same features masked in CPUID too, for guests that do honour it.
pub const MASKED_FEATURES: &[FeatureBit] = &[
    feature(1, 0, Reg::Ecx, 13), // cx16
    feature(1, 0, Reg::Ecx, 23), // popcnt
    feature(1, 0, Reg::Ecx, 26), // xsave
    feature(1, 0, Reg::Ecx, 27), // osxsave
    feature(1, 0, Reg::Ecx, 28), // avx
    feature(1, 0, Reg::Ecx, 19), // sse4_1
    feature(1, 0, Reg::Ecx, 20), // sse4_2
    feature(1, 0, Reg::Ecx, 22), // movbe
    feature(1, 0, Reg::Ecx, 30), // rdrand
    feature(7, 0, Reg::Ebx, 3),  // bmi1
    feature(7, 0, Reg::Ebx, 5),  // avx2
    feature(7, 0, Reg::Ebx, 7),  // smep
    feature(7, 0, Reg::Ebx, 8),  // bmi2
    feature(7, 0, Reg::Ebx, 9),  // erms
    feature(7, 0, Reg::Ebx, 18), // rdseed
    feature(7, 0, Reg::Ebx, 19), // adx
    feature(7, 0, Reg::Ebx, 20), // smap
    feature(7, 0, Reg::Ecx, 2),  // umip
    feature(7, 0, Reg::Edx, 4),  // fsrm
];

const fn feature(leaf: u32, index: u32, reg: Reg, bit: u32) -> FeatureBit {
    FeatureBit {
        leaf,
        index,
        reg,
        bit,
    }
}

/// Whether this host's KVM is PVM.
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

const INT3: u8 = 0xcc;
const FWAIT: u8 = 0x9b;
const BP_VECTOR: u8 = 3;
/// The longest x86 instruction.
const MAX_INSN_LEN: usize = 15;
/// The two encodings husk's guest kernel uses (guest-image/patches/0002):
/// `xsave64 (%rdi)` and `xrstor64 (%rdi)`, with the buffer's size in RSI.
const XSAVE64_RDI: [u8; 4] = [0x48, 0x0f, 0xae, 0x27];
const XRSTOR64_RDI: [u8; 4] = [0x48, 0x0f, 0xae, 0x2f];
const PAGE_SIZE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum EmulationError {
    #[error("cannot access vCPU state while handling an emulation failure: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    #[error("guest RIP {rip:#x} does not map to guest memory")]
    Unmapped { rip: u64 },
    #[error(
        "the guest's vector-state buffer at {gva:#x} ({len} bytes) is not all in guest memory"
    )]
    BadXstateBuffer { gva: u64, len: usize },
    #[error("KVM refused the vector state the guest asked to load from {gva:#x}: {source}")]
    BadXstate { gva: u64, source: kvm_ioctls::Error },
    #[error(
        "KVM could not emulate the guest instruction at RIP {rip:#x} (bytes {bytes}); \
         the guest kernel uses an instruction this host cannot run in kernel mode"
    )]
    Unhandled { rip: u64, bytes: String },
}

/// What was done about one emulation failure.
#[derive(Debug, PartialEq, Eq)]
pub enum Fixup {
    InjectedBreakpoint,
    SkippedFwait,
    SavedXstate,
    RestoredXstate,
}

/// Handles a KVM emulation failure at the vCPU's current RIP, or explains it.
pub fn handle_emulation_failure(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
) -> Result<Fixup, EmulationError> {
    let mut regs: kvm_regs = vcpu.get_regs()?;
    let insn = read_instruction(vcpu, mem, regs.rip)?;
    match classify(&insn) {
        Some(Fixup::InjectedBreakpoint) => {
            // INT3 is a trap: #BP is delivered with RIP past the instruction.
            regs.rip += 1;
            vcpu.set_regs(&regs)?;
            let mut events = vcpu.get_vcpu_events()?;
            events.exception.injected = 1;
            events.exception.nr = BP_VECTOR;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            vcpu.set_vcpu_events(&events)?;
            Ok(Fixup::InjectedBreakpoint)
        }
        Some(Fixup::SkippedFwait) => {
            // With no pending x87 exceptions (the guest masks them) FWAIT is a no-op.
            regs.rip += 1;
            vcpu.set_regs(&regs)?;
            Ok(Fixup::SkippedFwait)
        }
        Some(fixup @ (Fixup::SavedXstate | Fixup::RestoredXstate)) => {
            let mut xsave = vcpu.get_xsave()?;
            // SAFETY: kvm_xsave is plain old data (a u32 array); the slice
            // covers exactly its bytes and lives no longer than `xsave`.
            let state = unsafe {
                std::slice::from_raw_parts_mut(
                    xsave.region.as_mut_ptr().cast::<u8>(),
                    std::mem::size_of_val(&xsave.region),
                )
            };
            let len = (regs.rsi as usize).min(state.len());
            if fixup == Fixup::SavedXstate {
                write_virt(vcpu, mem, regs.rdi, &state[..len])?;
            } else {
                read_virt(vcpu, mem, regs.rdi, &mut state[..len])?;
                // SAFETY: husk-vmm never enables dynamic XSTATE features
                // (AMX), so KVM reads no more than the 4 KiB of kvm_xsave.
                unsafe { vcpu.set_xsave(&xsave) }.map_err(|source| EmulationError::BadXstate {
                    gva: regs.rdi,
                    source,
                })?;
            }
            regs.rip += XSAVE64_RDI.len() as u64;
            vcpu.set_regs(&regs)?;
            Ok(fixup)
        }
        None => Err(EmulationError::Unhandled {
            rip: regs.rip,
            bytes: insn
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
        }),
    }
}

/// Which fixup, if any, applies to the instruction starting with `insn`.
fn classify(insn: &[u8]) -> Option<Fixup> {
    match insn.first() {
        Some(&INT3) => Some(Fixup::InjectedBreakpoint),
        Some(&FWAIT) => Some(Fixup::SkippedFwait),
        _ if insn.starts_with(&XSAVE64_RDI) => Some(Fixup::SavedXstate),
        _ if insn.starts_with(&XRSTOR64_RDI) => Some(Fixup::RestoredXstate),
        _ => None,
    }
}

/// The guest-physical pieces of `len` bytes at a guest virtual address, page
/// by page through the guest's page tables; stops at the first unmapped page.
fn physical_pieces(
    vcpu: &VcpuFd,
    gva: u64,
    len: usize,
) -> Result<Vec<(u64, usize)>, EmulationError> {
    let mut pieces = Vec::new();
    let (mut at, mut left) = (gva, len);
    while left > 0 {
        let translation = vcpu.translate_gva(at)?;
        if translation.valid == 0 {
            break;
        }
        let chunk = ((PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize).min(left);
        pieces.push((translation.physical_address, chunk));
        at += chunk as u64;
        left -= chunk;
    }
    Ok(pieces)
}

/// Reads `buf.len()` bytes at a guest virtual address; fails unless all map.
fn read_virt(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), EmulationError> {
    let len = buf.len();
    let bad = || EmulationError::BadXstateBuffer { gva, len };
    let pieces = physical_pieces(vcpu, gva, buf.len())?;
    let mut done = 0;
    for (gpa, chunk) in pieces {
        mem.read_slice(&mut buf[done..done + chunk], GuestAddress(gpa))
            .map_err(|_| bad())?;
        done += chunk;
    }
    if done == len {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Writes `data` at a guest virtual address; fails unless all of it maps.
fn write_virt(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    gva: u64,
    data: &[u8],
) -> Result<(), EmulationError> {
    let bad = || EmulationError::BadXstateBuffer {
        gva,
        len: data.len(),
    };
    let pieces = physical_pieces(vcpu, gva, data.len())?;
    if pieces.iter().map(|(_, chunk)| chunk).sum::<usize>() != data.len() {
        return Err(bad());
    }
    let mut done = 0;
    for (gpa, chunk) in pieces {
        mem.write_slice(&data[done..done + chunk], GuestAddress(gpa))
            .map_err(|_| bad())?;
        done += chunk;
    }
    Ok(())
}

/// Reads the bytes at a guest virtual RIP (an instruction can straddle a
/// page boundary, and the bytes after it may be unmapped).
fn read_instruction(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    rip: u64,
) -> Result<Vec<u8>, EmulationError> {
    let mut bytes = Vec::with_capacity(MAX_INSN_LEN);
    for (gpa, chunk) in physical_pieces(vcpu, rip, MAX_INSN_LEN)? {
        let mut piece = vec![0u8; chunk];
        if mem.read_slice(&mut piece, GuestAddress(gpa)).is_err() {
            break;
        }
        bytes.extend_from_slice(&piece);
    }
    if bytes.is_empty() {
        return Err(EmulationError::Unmapped { rip });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int3_and_fwait_are_handled_others_are_not() {
        assert_eq!(classify(&[0xcc, 0x90]), Some(Fixup::InjectedBreakpoint));
        assert_eq!(classify(&[0x9b]), Some(Fixup::SkippedFwait));
        assert_eq!(
            classify(&[0x48, 0x0f, 0xae, 0x27, 0x90]),
            Some(Fixup::SavedXstate)
        );
        assert_eq!(
            classify(&[0x48, 0x0f, 0xae, 0x2f]),
            Some(Fixup::RestoredXstate)
        );
        assert_eq!(classify(&[0x48, 0x0f, 0xae, 0x2e]), None); // xrstor64 (%rsi)
        assert_eq!(classify(&[0x48, 0x0f, 0xc7, 0x0e]), None); // cmpxchg16b
        assert_eq!(classify(&[]), None);
    }

    #[test]
    fn cmdline_names_the_measured_switches() {
        for switch in ["noxsave", "clearcpuid=", "cx16", "popcnt"] {
            assert!(GUEST_CMDLINE.contains(switch), "{switch}");
        }
    }
}
