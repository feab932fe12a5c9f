//! What one microVM is made of, as given on the command line.

use std::path::PathBuf;
use std::str::FromStr;

/// The command line every guest gets unless `--cmdline` says otherwise: the
/// serial console, reset through the i8042 port (no ACPI here), reboot at
/// once on panic so the VMM sees it, and a quiet console since every byte
/// written to it is a VM exit.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Below this no Linux guest boots; refused up front with a clear message.
pub const MIN_MEM_MIB: u64 = 32;
/// The guest's vsock context id (0-2 are reserved).
pub const DEFAULT_GUEST_CID: u64 = 3;

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub vsock: Option<VsockConfig>,
    pub disks: Vec<DiskConfig>,
    /// Empty read-only disk slots the control API can fill after boot.
    pub spare_disks: usize,
    pub console_log: Option<PathBuf>,
    pub api_sock: Option<PathBuf>,
    pub pvm: PvmMode,
}

#[derive(Debug, Clone)]
pub struct VsockConfig {
    pub uds_path: PathBuf,
    pub guest_cid: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

impl FromStr for DiskConfig {
    type Err = String;

    /// `PATH` or `PATH:ro` (`PATH:rw` is accepted too).
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, read_only) = match s.rsplit_once(':') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            _ => (s, false),
        };
        if path.is_empty() {
            return Err(format!("disk '{s}' has no path"));
        }
        Ok(Self {
            path: path.into(),
            read_only,
        })
    }
}

/// Whether to run the guest with the PVM profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PvmMode {
    /// Detect a PVM host (`kvm_pvm` loaded).
    Auto,
    On,
    Off,
}

impl PvmMode {
    pub fn resolve(self) -> bool {
        match self {
            PvmMode::Auto => crate::pvm::host_is_pvm(),
            PvmMode::On => true,
            PvmMode::Off => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_syntax() {
        let ro: DiskConfig = "/img/a.erofs:ro".parse().unwrap();
        assert_eq!(ro.path, PathBuf::from("/img/a.erofs"));
        assert!(ro.read_only);
        let rw: DiskConfig = "/img/b.ext4".parse().unwrap();
        assert!(!rw.read_only);
        let colon: DiskConfig = "/odd:name".parse().unwrap();
        assert_eq!(colon.path, PathBuf::from("/odd:name"));
        assert!(":ro".parse::<DiskConfig>().is_err());
    }
}
