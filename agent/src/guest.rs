//! What PID 1 in the guest does that a process on the host must not: attach
//! stdio to the console, mount the kernel's filesystems, set PATH, and end
//! the VM when the agent is done.

use std::fs::{self, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, IntoRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use tracing::{debug, error, warn};

const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

struct Mount {
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const DEV: Mount = Mount {
    target: "/dev",
    fstype: "devtmpfs",
    flags: MsFlags::MS_NOSUID,
    data: Some("mode=0755"),
};

/// In order: a mount point inside another mount comes after it.
const MOUNTS: [Mount; 8] = [
    Mount {
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    DEV,
    Mount {
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    Mount {
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    Mount {
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
    Mount {
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
];

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot create mount point {target}: {source}")]
    MountPoint {
        target: &'static str,
        source: std::io::Error,
    },
    #[error("cannot mount {fstype} on {target}: {source}")]
    Mount {
        target: &'static str,
        fstype: &'static str,
        source: Errno,
    },
    #[error("cannot open /dev/console: {0}")]
    OpenConsole(std::io::Error),
    #[error("cannot attach stdio to /dev/console: {0}")]
    AttachConsole(Errno),
}

/// The kernel opens /dev/console as PID 1's stdio, but only if the initramfs
/// has that node. When it did not, mount devtmpfs and attach stdio ourselves,
/// so that the boot markers and logs are seen. Costs one fcntl otherwise.
pub fn attach_console_if_missing() -> Result<(), GuestError> {
    if fcntl(std::io::stdout().as_fd(), FcntlArg::F_GETFD).is_ok() {
        return Ok(());
    }
    mount_once(&DEV)?;
    let console = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NOCTTY.bits())
        .open("/dev/console")
        .map_err(GuestError::OpenConsole)?;
    nix::unistd::dup2_stdin(&console).map_err(GuestError::AttachConsole)?;
    nix::unistd::dup2_stdout(&console).map_err(GuestError::AttachConsole)?;
    nix::unistd::dup2_stderr(&console).map_err(GuestError::AttachConsole)?;
    if console.as_raw_fd() <= 2 {
        // The console got one of the stdio numbers itself (they were free):
        // closing it would take that one away again.
        let _ = console.into_raw_fd();
    }
    Ok(())
}

/// Mounts what a Linux userspace expects and sets PATH. A mount that fails is
/// logged and skipped: the agent can still serve, and the host learns more
/// from an agent that answers than from a guest that died at boot.
pub fn prepare() {
    for m in &MOUNTS {
        if let Err(err) = mount_once(m) {
            warn!("{err}");
        }
    }
    // Runs before the tokio runtime exists: no other thread reads the environment.
    std::env::set_var("PATH", GUEST_PATH);
}

/// Mounts `m` unless something is mounted on its target already.
fn mount_once(m: &Mount) -> Result<(), GuestError> {
    fs::create_dir_all(m.target).map_err(|source| GuestError::MountPoint {
        target: m.target,
        source,
    })?;
    if is_mount_point(Path::new(m.target)) {
        debug!("{} is mounted already", m.target);
        return Ok(());
    }
    match mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(source) => Err(GuestError::Mount {
            target: m.target,
            fstype: m.fstype,
            source,
        }),
    }
}

/// A directory is a mount point when it lies on another device than its parent.
fn is_mount_point(path: &Path) -> bool {
    let Some(parent) = path.parent() else {
        return true;
    };
    match (fs::metadata(path), fs::metadata(parent)) {
        (Ok(here), Ok(above)) => here.dev() != above.dev(),
        _ => false,
    }
}

/// Ends the VM. PID 1 must not simply exit (the kernel would panic), and
/// with no ACPI a power-off would only halt the vCPU: the VMM takes a guest
/// reset as the end of the VM.
pub fn reset_vm() -> ! {
    nix::unistd::sync();
    // Give the kernel's vsock worker a moment to send what the agent last
    // wrote (the Shutdown reply) before the VM disappears.
    std::thread::sleep(Duration::from_millis(50));
    let Err(err) = reboot(RebootMode::RB_AUTOBOOT);
    error!("reboot: {err}");
    // Exiting panics the kernel, which resets the VM if booted with panic=-1.
    std::process::exit(1)
}
