//! Attaching to an existing tap device by name.
//!
//! huskd creates the tap, persistent, in the pod's network namespace and runs
//! husk-vmm inside that namespace; husk-vmm only attaches to it. TUNSETIFF
//! would create a fresh, unconnected tap for a name that does not exist, so
//! the name is looked up first and a missing tap is an error.
//!
//! The tap is opened without IFF_VNET_HDR: the device offers the guest no
//! offloads, so the virtio-net header carries nothing the host kernel needs,
//! and not passing the guest's header bytes on means a guest cannot hand the
//! host stack GSO or partial-checksum packets it never negotiated. The header
//! is stripped on transmit and a zeroed one written on receive. (Offloads,
//! when they come, need IFF_VNET_HDR and TUNSETOFFLOAD.)

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::config::MAX_IFNAME_LEN;

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("'{0}' is not a valid interface name")]
    BadName(String),
    #[error("there is no tap '{0}' in husk-vmm's network namespace (it must be created first, e.g. `ip tuntap add dev {0} mode tap`)")]
    NotFound(String),
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to tap '{name}': {reason}")]
    Attach { name: String, reason: String },
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then a union whose first
/// member is the short `ifr_flags` (40 bytes on 64-bit Linux).
#[repr(C)]
pub(super) struct IfReq {
    pub(super) name: [u8; libc::IFNAMSIZ],
    pub(super) flags: libc::c_short,
    pub(super) _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, IfReq);

/// Opens the tap `name`, non-blocking, as an Ethernet device without packet
/// information or virtio-net headers: each read or write is one frame.
pub fn open(name: &str) -> Result<File, TapError> {
    if name.is_empty() || name.len() > MAX_IFNAME_LEN || name.as_bytes().contains(&0) {
        return Err(TapError::BadName(name.into()));
    }
    if nix::net::if_::if_nametoindex(name).is_err() {
        return Err(TapError::NotFound(name.into()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(TUN_PATH)
        .map_err(TapError::OpenTun)?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and may write back) one `struct ifreq`; `req`
    // has its size and layout and lives across the call; the fd is ours.
    let attached = unsafe { tun_set_iff(file.as_raw_fd(), &req) };
    if let Err(errno) = attached {
        let reason = match errno {
            nix::errno::Errno::EBUSY => {
                "it is already attached to another process (a single-queue tap takes one)".into()
            }
            nix::errno::Errno::EINVAL => {
                "it is not a single-queue tap device (a tun, a multi_queue tap, or not tun/tap at all)"
                    .into()
            }
            nix::errno::Errno::EPERM => "not permitted (needs CAP_NET_ADMIN or to own the tap)".into(),
            other => other.desc().to_string(),
        };
        return Err(TapError::Attach {
            name: name.into(),
            reason,
        });
    }
    Ok(file)
}
