//! Confines husk-vmm once its VM is built and before the guest runs
//! (`--jail DIR --uid U --gid G`), as Firecracker's jailer does, but from
//! inside: everything the VM needs by path (kernel, initrd, disks, taps,
//! /dev/kvm, the console log, the sockets it listens on, the virtio-fs
//! backend) is open by then, so the process can give up its view of the
//! host before a guest can try anything.
//!
//! The steps, in order:
//! - new mount, IPC and UTS namespaces (the network one is the pod's,
//!   joined by whoever started husk-vmm);
//! - the host's mounts made private in the new namespace, then `DIR` bound
//!   onto itself, `pivot_root` into it and the old root detached: `DIR` is
//!   the whole file system, read-only, nosuid, nodev, noexec. It should be
//!   empty; huskd makes a new empty one per pod;
//! - hostname `husk-vmm` (what the UTS namespace is for: no host name);
//! - rlimits: no core dumps (guest memory would be in them), open files and
//!   file size bounded, threads bounded to what the VM has;
//! - no supplementary groups, then gid and uid `G`, `U` (real, effective
//!   and saved: no way back to root). The process is then not dumpable,
//!   so another process of the same uid cannot ptrace it or read its memory.
//!
//! A PID namespace is not made: it would need a second process (a new PID
//! namespace takes effect for children only), and with no /proc in the jail
//! and seccomp refusing kill, ptrace and process_vm_* the VMM sees and
//! reaches no other process anyway.
//!
//! Afterwards the VMM can open nothing by path: disks attached later come
//! as file descriptors over the control API, and a guest's connection to a
//! host vsock port (`<vsock socket>_PORT`) is refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::unistd::{chdir, pivot_root, setgroups, sethostname, setresgid, setresuid, Gid, Uid};

/// Open files: the VM's own (a few dozen) plus the vsock device's 1024
/// connections and the control API's clients.
const MAX_OPEN_FILES: u64 = 2048;
/// The largest file husk-vmm may write: bounds its log and the guest's
/// console log, so a chatty guest cannot fill the node's disk. Writes past
/// it fail (SIGXFSZ is ignored); the guest runs on.
const MAX_FILE_SIZE: u64 = 256 << 20;
/// Threads besides the vCPUs: the main (event loop) thread, with room for
/// the runtime's own.
const EXTRA_THREADS: u64 = 8;
/// The jail's host name.
const HOSTNAME: &str = "husk-vmm";

/// Where and as whom husk-vmm is confined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// The directory that becomes the process's whole file system.
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: --uid and --gid must not be 0 (root): the jail is for an unprivileged VMM")]
    Root,
    #[error("jail: cannot {what}: {source}")]
    Step {
        what: String,
        source: nix::errno::Errno,
    },
}

fn step(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> JailError {
    let what = what.into();
    move |source| JailError::Step { what, source }
}

/// Confines the calling process as `config` says; returns how long it took.
/// Must run while the process has one thread: namespaces and credentials
/// changed here must hold for every thread made later.
pub fn enter(config: &JailConfig, vcpus: u8) -> Result<Duration, JailError> {
    let started = Instant::now();
    if config.uid == 0 || config.gid == 0 {
        return Err(JailError::Root);
    }
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
        .map_err(step("make new mount, IPC and UTS namespaces"))?;
    enter_root(&config.root)?;
    sethostname(HOSTNAME).map_err(step("set the host name"))?;
    limit(vcpus)?;
    drop_privileges(config.uid, config.gid)?;
    Ok(started.elapsed())
}

/// Makes `root` the whole (read-only) file system of this mount namespace.
fn enter_root(root: &Path) -> Result<(), JailError> {
    let none: Option<&str> = None;
    // Nothing done below may reach the host's namespace.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(step("make the host's mounts private"))?;
    // pivot_root wants a mount point.
    mount(Some(root), root, none, MsFlags::MS_BIND, none)
        .map_err(step(format!("bind {} onto itself", root.display())))?;
    chdir(root).map_err(step(format!("enter {}", root.display())))?;
    // The old root goes on top of the new one, then away.
    pivot_root(".", ".").map_err(step(format!("pivot_root into {}", root.display())))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the host's root"))?;
    chdir("/").map_err(step("enter the new root"))?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(step("make the jail read-only"))
}

fn limit(vcpus: u8) -> Result<(), JailError> {
    let limits = [
        (Resource::RLIMIT_CORE, 0),
        (Resource::RLIMIT_NOFILE, MAX_OPEN_FILES),
        (Resource::RLIMIT_FSIZE, MAX_FILE_SIZE),
        // Counted per uid: one uid per VM makes it this VM's threads.
        (Resource::RLIMIT_NPROC, u64::from(vcpus) + EXTRA_THREADS),
    ];
    for (resource, value) in limits {
        setrlimit(resource, value, value).map_err(step(format!("set {resource:?}")))?;
    }
    // SAFETY: SIG_IGN installs no handler code; a write past RLIMIT_FSIZE
    // then fails with EFBIG instead of killing the VMM.
    unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }.map_err(step("ignore SIGXFSZ"))?;
    Ok(())
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setgroups(&[]).map_err(step("drop the supplementary groups"))?;
    setresgid(gid, gid, gid).map_err(step(format!("become gid {gid}")))?;
    setresuid(uid, uid, uid).map_err(step(format!("become uid {uid}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child (the jail changes the whole process)
    /// and returns the child's exit code; skipped without root.
    fn in_child(body: impl FnOnce() -> i32) -> Option<i32> {
        if !Uid::effective().is_root() {
            eprintln!("skipped: the jail needs root");
            return None;
        }
        // SAFETY: the test binary's other threads may hold locks; the child
        // only makes system calls and exits with _exit.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let code =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101);
                // SAFETY: ends the child at once, running nothing of the parent's.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).expect("waitpid");
                match status {
                    nix::sys::wait::WaitStatus::Exited(_, code) => Some(code),
                    other => panic!("child ended {other:?}"),
                }
            }
        }
    }

    #[test]
    fn root_is_refused() {
        let config = JailConfig {
            root: "/nonexistent".into(),
            uid: 0,
            gid: 1000,
        };
        assert!(matches!(enter(&config, 1), Err(JailError::Root)));
    }

    #[test]
    fn the_jailed_process_sees_only_its_root_and_is_not_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("jail");
        std::fs::create_dir(&root).expect("jail dir");
        // Opened before: still usable after.
        let outside = std::fs::File::open("/proc/self/status").expect("open");
        let config = JailConfig {
            root: root.clone(),
            uid: 4_000_000_123,
            gid: 4_000_000_123,
        };
        let code = in_child(move || {
            if enter(&config, 1).is_err() {
                return 1;
            }
            let checks = [
                // Nothing of the host is reachable by path.
                !Path::new("/proc").exists() && !Path::new("/etc").exists(),
                // The root is read-only (and root could write it were it not).
                std::fs::write("/x", b"x").is_err(),
                Uid::current().as_raw() == 4_000_000_123
                    && Uid::effective().as_raw() == 4_000_000_123
                    && Gid::current().as_raw() == 4_000_000_123,
                nix::unistd::getgroups().is_ok_and(|g| g.is_empty()),
                nix::unistd::gethostname().is_ok_and(|h| h == HOSTNAME),
                nix::sys::resource::getrlimit(Resource::RLIMIT_CORE) == Ok((0, 0)),
                // No way back.
                setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).is_err(),
                std::io::Read::read(&mut &outside, &mut [0u8; 16]).is_ok(),
            ];
            match checks.iter().position(|ok| !ok) {
                None => 0,
                Some(failed) => 10 + failed as i32,
            }
        });
        if let Some(code) = code {
            assert_eq!(code, 0, "check {} failed in the jail", code - 10);
        }
        // The host's namespace is untouched: no bind of the jail left here.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        assert!(!mounts.contains(root.to_str().expect("utf-8")), "{mounts}");
    }
}
