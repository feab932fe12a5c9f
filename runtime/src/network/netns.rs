//! Named network namespaces, as `ip netns` keeps them: an empty file under
//! `/run/netns` with the namespace bind-mounted on it, so the namespace
//! lives while the mount does, whether or not a process is in it.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where named namespaces live, shared with `ip netns`.
pub const NETNS_DIR: &str = "/run/netns";

/// The namespace path for pod `id`.
pub fn path_for(id: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(format!("husk-{id}"))
}

/// Creates a fresh network namespace pinned at `path`.
pub fn create(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    File::options().write(true).create_new(true).open(path)?;
    let target = path.to_path_buf();
    // unshare() moves only the calling thread; a thread of its own keeps
    // huskd's other threads in the host's namespace.
    let pinned = std::thread::spawn(move || -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")));
    if pinned.is_err() {
        let _ = fs::remove_file(path);
    }
    pinned
}

/// Unpins and removes the namespace at `path`. Idempotent: a missing
/// namespace is fine. The namespace itself ends once nothing runs in it.
pub fn remove(path: &Path) -> io::Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Runs `work` on a thread of its own inside the namespace at `path`, so
/// that whatever sockets or devices it creates belong to that namespace.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = File::open(path)?;
    std::thread::spawn(move || {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)?;
        work()
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
}

/// Makes `command`'s process start inside the namespace at `path`.
pub fn join_in_child(command: &mut tokio::process::Command, path: &Path) -> io::Result<()> {
    let ns = File::open(path)?;
    // SAFETY: the closure runs in the forked child before exec and makes one
    // raw syscall on an fd opened before the fork: no allocation, no locks.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode(path: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).map(|m| m.ino()).unwrap_or(0)
    }

    #[test]
    fn a_namespace_is_pinned_entered_and_removed() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not run: creating network namespaces needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ns");
        create(&path).expect("create");
        let host = inode("/proc/self/ns/net");
        let pinned = fs::metadata(&path).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        });
        let inside = run_in(&path, || Ok(inode("/proc/thread-self/ns/net"))).expect("run_in");
        assert_ne!(inside, host, "the thread ran in the host's namespace");
        assert_eq!(pinned.ok(), Some(inside));
        assert!(create(&path).is_err(), "a second create must not succeed");
        remove(&path).expect("remove");
        assert!(!path.exists());
        remove(&path).expect("removing twice is fine");
    }
}
