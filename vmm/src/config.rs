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
/// The most vCPUs a guest gets: local APIC IDs 0..n and the IOAPIC's after
/// them must fit the MP table's 8-bit IDs, and no pod needs more here.
pub const MAX_VCPUS: u8 = 64;
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
    /// virtio-net devices, each backed by an existing tap, in guest order.
    pub nets: Vec<NetConfig>,
    /// virtio-fs devices, each served by a vhost-user backend.
    pub fs: Vec<FsConfig>,
    /// Empty read-only disk slots the control API can fill after boot.
    pub spare_disks: usize,
    pub console_log: Option<PathBuf>,
    pub api_sock: Option<PathBuf>,
    pub pvm: PvmMode,
    /// Whether each thread installs its seccomp filter (`crate::seccomp`).
    pub seccomp: bool,
    /// Where and as whom the VMM confines itself once the VM is built.
    pub jail: Option<crate::jail::JailConfig>,
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

/// The MTU a virtio-net device announces unless `mtu=` says otherwise.
pub const DEFAULT_NET_MTU: u16 = 1500;
/// Linux refuses interfaces below the IPv4 minimum.
const MIN_NET_MTU: u16 = 68;
/// Interface names are at most 15 bytes (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// One virtio-net device and the host tap behind it. The tap must exist
/// already (huskd creates it in the pod's network namespace); husk-vmm only
/// attaches to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
    /// Announced to the guest (VIRTIO_NET_F_MTU): the largest MTU its driver
    /// allows, and what it sizes receive buffers for.
    pub mtu: u16,
}

impl FromStr for NetConfig {
    type Err = String;

    /// `tap=NAME,mac=AA:BB:CC:DD:EE:FF[,mtu=N]`, keys in any order.
    fn from_str(s: &str) -> Result<Self, String> {
        let [tap, mac, mtu] = parse_keyed("net", s, ["tap", "mac", "mtu"])?;
        Ok(Self {
            tap: parse_ifname(tap.ok_or_else(|| format!("net '{s}': tap=NAME is required"))?)?,
            mac: parse_mac(
                mac.ok_or_else(|| format!("net '{s}': mac=AA:BB:CC:DD:EE:FF is required"))?,
            )?,
            mtu: mtu.map(parse_mtu).transpose()?.unwrap_or(DEFAULT_NET_MTU),
        })
    }
}

/// The longest tag a virtio-fs device has (its config space field).
pub const MAX_FS_TAG_LEN: usize = 36;

/// One virtio-fs device and the vhost-user backend serving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// What the guest mounts (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    /// The backend's listening socket.
    pub socket: PathBuf,
}

impl FromStr for FsConfig {
    type Err = String;

    /// `tag=NAME,socket=PATH`, keys in any order.
    fn from_str(s: &str) -> Result<Self, String> {
        let [tag, socket] = parse_keyed("fs", s, ["tag", "socket"])?;
        let tag = tag.ok_or_else(|| format!("fs '{s}': tag=NAME is required"))?;
        if tag.is_empty() || tag.len() > MAX_FS_TAG_LEN {
            return Err(format!(
                "fs '{s}': the tag must be 1-{MAX_FS_TAG_LEN} bytes"
            ));
        }
        let socket = socket.ok_or_else(|| format!("fs '{s}': socket=PATH is required"))?;
        if socket.is_empty() {
            return Err(format!("fs '{s}': socket=PATH is empty"));
        }
        Ok(Self {
            tag: tag.to_owned(),
            socket: socket.into(),
        })
    }
}

/// Splits `key=value,...` into the values of `keys`, in their order; an
/// unknown or repeated key is an error naming the device kind `what`.
fn parse_keyed<'a, const N: usize>(
    what: &str,
    s: &'a str,
    keys: [&str; N],
) -> Result<[Option<&'a str>; N], String> {
    let mut values = [None; N];
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{what} '{s}': expected key=value, got '{part}'"))?;
        let slot = keys
            .iter()
            .position(|k| *k == key)
            .ok_or_else(|| format!("{what} '{s}': unknown key '{key}' ({})", keys.join(", ")))?;
        if values[slot].replace(value).is_some() {
            return Err(format!("{what} '{s}': '{key}' given twice"));
        }
    }
    Ok(values)
}

fn parse_ifname(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if valid {
        Ok(name.to_string())
    } else {
        Err(format!(
            "'{name}' is not an interface name (1-{MAX_IFNAME_LEN} bytes, no '/', ':' or spaces)"
        ))
    }
}

/// Six hex octets separated by ':'. Multicast addresses cannot be a NIC's.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("'{text}' is not a MAC address (AA:BB:CC:DD:EE:FF)");
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{text} is a multicast address, not a NIC's"));
    }
    Ok(mac)
}

fn parse_mtu(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(mtu) if mtu >= MIN_NET_MTU => Ok(mtu),
        _ => Err(format!("mtu '{text}' is not in {MIN_NET_MTU}..=65535")),
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

    #[test]
    fn net_syntax() {
        let net: NetConfig = "tap=tap0,mac=02:AB:cd:00:00:01".parse().unwrap();
        assert_eq!(
            net,
            NetConfig {
                tap: "tap0".into(),
                mac: [0x02, 0xab, 0xcd, 0, 0, 1],
                mtu: DEFAULT_NET_MTU,
            }
        );
        let net: NetConfig = "mtu=9000,mac=02:00:00:00:00:02,tap=husk-eth0"
            .parse()
            .unwrap();
        assert_eq!((net.tap.as_str(), net.mtu), ("husk-eth0", 9000));

        for bad in [
            "",
            "tap=tap0",
            "mac=02:00:00:00:00:01",
            "tap=tap0,mac=02:00:00:00:00",
            "tap=tap0,mac=02:00:00:00:00:01:02",
            "tap=tap0,mac=02:00:00:00:00:0g",
            "tap=tap0,mac=2:00:00:00:00:01",
            "tap=tap0,mac=01:00:5e:00:00:01",
            "tap=tap0,mac=02:00:00:00:00:01,mtu=67",
            "tap=tap0,mac=02:00:00:00:00:01,mtu=65536",
            "tap=tap0,mac=02:00:00:00:00:01,speed=10",
            "tap=tap0,tap=tap1,mac=02:00:00:00:00:01",
            "tap=,mac=02:00:00:00:00:01",
            "tap=a/b,mac=02:00:00:00:00:01",
            "tap=sixteen-bytes-xx,mac=02:00:00:00:00:01",
            "tap0,mac=02:00:00:00:00:01",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn fs_syntax() {
        let fs: FsConfig = "socket=/run/v.sock,tag=husk-volumes".parse().unwrap();
        assert_eq!(
            fs,
            FsConfig {
                tag: "husk-volumes".into(),
                socket: "/run/v.sock".into(),
            }
        );
        for bad in [
            "",
            "tag=a",
            "socket=/s",
            "tag=,socket=/s",
            "tag=a,socket=",
            "tag=a,socket=/s,cache=auto",
            "tag=a,tag=b,socket=/s",
            &format!("tag={},socket=/s", "t".repeat(MAX_FS_TAG_LEN + 1)),
        ] {
            assert!(bad.parse::<FsConfig>().is_err(), "accepted {bad:?}");
        }
    }
}
