//! Loads the guest kernel, initrd and command line, and writes `boot_params`
//! for the 64-bit Linux boot protocol (Documentation/arch/x86/boot.rst).

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// `SETUP_RNG_SEED` from arch/x86/include/uapi/asm/setup_data.h.
const SETUP_RNG_SEED: u32 = 9;
const RNG_SEED_LEN: usize = 32;
/// Magic values of the boot protocol.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("guest kernel {path} is not a loadable 64-bit ELF vmlinux: {source}")]
    Kernel {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest memory above the kernel \
         (kernel ends at {kernel_end:#x}, usable RAM below 4 GiB ends at {ram_end:#x}); \
         give the guest more memory"
    )]
    InitrdDoesNotFit {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        ram_end: u64,
    },
    #[error("cannot read initrd {path} into guest memory: {source}")]
    InitrdRead {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("cannot write the command line into guest memory: {0}")]
    CmdlineLoad(linux_loader::loader::Error),
    #[error("cannot write boot parameters into guest memory: {0}")]
    BootParams(String),
    #[error("cannot read random bytes for the guest RNG seed: {0}")]
    RngSeed(std::io::Error),
}

/// Where the kernel was loaded and where to start it.
pub struct LoadedKernel {
    pub entry: GuestAddress,
}

/// Loads `vmlinux` at its ELF physical addresses and returns its entry point.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<(LoadedKernel, u64), BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Open {
        what: "guest kernel",
        path: path.into(),
        source,
    })?;
    let result =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            BootError::Kernel {
                path: path.into(),
                source,
            }
        })?;
    Ok((
        LoadedKernel {
            entry: result.kernel_load,
        },
        result.kernel_end,
    ))
}

/// Loads the initrd as high as possible below 4 GiB (and below the MMIO gap),
/// page aligned, as boot loaders do. Returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Open {
        what: "initrd",
        path: path.into(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::Open {
            what: "initrd",
            path: path.into(),
            source,
        })?
        .len();
    let low_ram_end = mem.last_addr().raw_value().min(MMIO_GAP_START - 1) + 1;
    let does_not_fit = || BootError::InitrdDoesNotFit {
        path: path.into(),
        size,
        kernel_end,
        ram_end: low_ram_end,
    };
    let start = low_ram_end.checked_sub(size).ok_or_else(does_not_fit)? & !0xfff;
    if start < kernel_end {
        return Err(does_not_fit());
    }
    let addr = GuestAddress(start);
    mem.read_exact_volatile_from(addr, &mut file, size as usize)
        .map_err(|source| BootError::InitrdRead {
            path: path.into(),
            source,
        })?;
    Ok((addr, size))
}

/// Everything `write_boot_params` needs to know about the loaded images.
pub struct BootImages {
    pub cmdline: Cmdline,
    pub initrd: Option<(GuestAddress, u64)>,
}

/// Writes the command line, the RNG seed and `boot_params` (with the e820 map).
pub fn write_boot_params(mem: &GuestMemoryMmap, images: &BootImages) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &images.cmdline)
        .map_err(BootError::CmdlineLoad)?;
    let cmdline_len = images.cmdline.as_cstring()?.as_bytes_with_nul().len();
    write_rng_seed(mem)?;

    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.setup_data = SETUP_DATA_ADDR;
    if let Some((addr, size)) = images.initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut entries = vec![
        e820(0, EBDA_START, E820_RAM),
        e820(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            entries.push(e820(start, end - start, E820_RAM));
        }
    }
    params.e820_entries = entries.len() as u8;
    params.e820_table[..entries.len()].copy_from_slice(&entries);

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| BootError::BootParams(e.to_string()))
}

fn e820(addr: u64, size: u64, kind: u32) -> boot_e820_entry {
    boot_e820_entry {
        addr,
        size,
        r#type: kind,
    }
}

/// A `setup_data` node of type RNG_SEED: the kernel credits it as entropy, so
/// the CRNG is initialised before userspace without waiting on jitter entropy
/// (which is ruinously slow when the guest kernel runs under emulation).
fn write_rng_seed(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let mut seed = [0u8; RNG_SEED_LEN];
    getrandom(&mut seed).map_err(BootError::RngSeed)?;
    let mut node = Vec::with_capacity(16 + RNG_SEED_LEN);
    node.extend_from_slice(&0u64.to_le_bytes()); // next: none
    node.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes());
    node.extend_from_slice(&(RNG_SEED_LEN as u32).to_le_bytes());
    node.extend_from_slice(&seed);
    mem.write_slice(&node, GuestAddress(SETUP_DATA_ADDR))
        .map_err(|e| BootError::BootParams(e.to_string()))
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    File::open("/dev/urandom")?.read_exact(buf)
}
