//! The host side of a microVM pod's volumes: kubelet's host paths are
//! bind-mounted below one directory per pod, which a virtiofsd serves to the
//! guest. The guest then sees each volume live (writes reach the host, and
//! the host's changes reach the guest), not a copy.
//!
//! The directory is a mount of its own with shared propagation, so that
//! binds made after virtiofsd started (one per container mount, as
//! containers are created) reach virtiofsd's private mount namespace, which
//! it makes a slave of the host's.
//!
//! Layout: `<root>/<container id>/<n>` is the container's `n`th mount.
//!
//! Nothing below a sandbox's directory may be deleted while a bind is
//! mounted there (the delete would go through to the node's files):
//! [`detach_all`] comes first, and [`remove_dir`] checks it did.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use procfs_core::process::MountInfos;
use procfs_core::FromRead;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("host path {0:?} must be absolute")]
    Relative(String),
    #[error("{} is still mounted after detaching it", .0.display())]
    StillMounted(PathBuf),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> VolumeError {
    let what = what.into();
    move |source| VolumeError::Io { what, source }
}

fn nix_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> VolumeError {
    let what = what.into();
    move |e| VolumeError::Io {
        what,
        source: e.into(),
    }
}

/// The mount points at or below `dir`, deepest first, from this process's
/// mount table.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, VolumeError> {
    let table = fs::read("/proc/self/mountinfo").map_err(io_err("reading /proc/self/mountinfo"))?;
    let infos = MountInfos::from_read(table.as_slice()).map_err(|e| VolumeError::Io {
        what: "parsing /proc/self/mountinfo".into(),
        source: io::Error::other(e.to_string()),
    })?;
    let mut under: Vec<PathBuf> = infos
        .0
        .into_iter()
        .map(|info| info.mount_point)
        .filter(|point| point.starts_with(dir))
        .collect();
    under.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    under.dedup();
    Ok(under)
}

/// Makes `root` a shared mount of its own (idempotent).
pub fn prepare(root: &Path) -> Result<(), VolumeError> {
    fs::create_dir_all(root).map_err(io_err(format!("creating {}", root.display())))?;
    if !mounts_under(root)?.iter().any(|point| point == root) {
        mount(
            Some(root),
            root,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(nix_err(format!(
            "bind-mounting {} on itself",
            root.display()
        )))?;
    }
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(nix_err(format!("making {} shared", root.display())))
}

/// How the node's later mounts below a shared host path reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// Not at all: the guest sees the mounts there were at the share.
    Private,
    /// As they happen (the bind is the node's slave).
    HostToContainer,
}

/// Binds `host_path` (recursively, read-only at the top when asked) at
/// `<root>/<container>/<index>` and returns that path relative to `root`.
/// A host path that does not exist is made a directory first, as containerd
/// does.
///
/// The bind is cloned detached (open_tree) and given its propagation before
/// it is attached: attached as a plain bind, it would join the source's
/// peer group, and its copy in virtiofsd's namespace would follow the node
/// whatever it was made afterwards.
pub fn share(
    root: &Path,
    container: &str,
    index: usize,
    host_path: &str,
    readonly: bool,
    propagation: Propagation,
) -> Result<PathBuf, VolumeError> {
    use rustix::fs::CWD;
    use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};

    let source = Path::new(host_path);
    if !source.is_absolute() {
        return Err(VolumeError::Relative(host_path.to_owned()));
    }
    if !source.exists() {
        fs::create_dir_all(source).map_err(io_err(format!("creating {host_path}")))?;
    }
    let relative = Path::new(container).join(index.to_string());
    let target = root.join(&relative);
    let parent = root.join(container);
    fs::create_dir_all(&parent).map_err(io_err(format!("creating {}", parent.display())))?;
    // A bind needs a target of the source's kind.
    let made = if source.is_dir() {
        fs::create_dir(&target)
    } else {
        fs::File::create(&target).map(drop)
    };
    match made {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(format!("creating {}", target.display()))(e)),
    }
    let sys_err = |what: String| {
        move |e: rustix::io::Errno| VolumeError::Io {
            what,
            source: e.into(),
        }
    };
    let tree = open_tree(
        CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::AT_RECURSIVE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(sys_err(format!("cloning the mounts at {host_path}")))?;
    let propagation_flag = match propagation {
        Propagation::Private => libc::MS_PRIVATE,
        Propagation::HostToContainer => libc::MS_SLAVE,
    };
    set_mount_attributes(&tree, 0, propagation_flag, true).map_err(sys_err(format!(
        "setting the propagation of {host_path}'s clone"
    )))?;
    if readonly {
        set_mount_attributes(&tree, libc::MOUNT_ATTR_RDONLY, 0, false)
            .map_err(sys_err(format!("making {host_path}'s clone read-only")))?;
    }
    move_mount(
        &tree,
        "",
        CWD,
        &target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(sys_err(format!(
        "attaching {host_path} at {}",
        target.display()
    )))?;
    Ok(relative)
}

/// mount_setattr(2) on the detached tree `tree` (Linux 5.12; rustix has no
/// wrapper): sets `attributes` and the propagation type `propagation` (0:
/// unchanged), on every mount of the tree when `recursive`.
fn set_mount_attributes(
    tree: &std::os::fd::OwnedFd,
    attributes: u64,
    propagation: libc::c_ulong,
    recursive: bool,
) -> Result<(), rustix::io::Errno> {
    use std::os::fd::AsRawFd;

    let attr = libc::mount_attr {
        attr_set: attributes,
        attr_clr: 0,
        propagation,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: the path is an empty NUL-terminated string and `attr` a
    // mount_attr, both alive across the call; the size passed is attr's.
    let result = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if result != 0 {
        return Err(rustix::io::Errno::from_raw_os_error(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ));
    }
    Ok(())
}

/// Detaches every mount at or below `dir` (lazily: a guest request in flight
/// keeps its file until done). Idempotent.
pub fn detach_all(dir: &Path) -> Result<(), VolumeError> {
    for point in mounts_under(dir)? {
        match umount2(&point, MntFlags::MNT_DETACH) {
            // Gone with an ancestor's detach.
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(nix_err(format!("detaching {}", point.display()))(e)),
        }
    }
    match mounts_under(dir)?.into_iter().next() {
        Some(point) => Err(VolumeError::StillMounted(point)),
        None => Ok(()),
    }
}

/// Removes `dir` and what is in it, once nothing is mounted below it.
pub fn remove_dir(dir: &Path) -> Result<(), VolumeError> {
    detach_all(dir)?;
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err(format!("removing {}", dir.display()))(e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_table_names_the_root() {
        let mounts = mounts_under(Path::new("/")).expect("mountinfo");
        assert!(mounts.iter().any(|p| p == Path::new("/")), "{mounts:?}");
        // Deepest first.
        let depths: Vec<_> = mounts.iter().map(|p| p.components().count()).collect();
        assert!(depths.windows(2).all(|w| w[0] >= w[1]), "{mounts:?}");
    }

    #[test]
    fn a_relative_host_path_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = share(
            dir.path(),
            "c",
            0,
            "relative/path",
            false,
            Propagation::Private,
        )
        .unwrap_err();
        assert!(matches!(err, VolumeError::Relative(_)), "{err}");
    }

    /// On the node (root): a PRIVATE share keeps what was mounted at the
    /// share, a HOST_TO_CONTAINER one follows the node's later mounts, a
    /// read-only one refuses writes; and everything detaches.
    #[test]
    fn shares_propagate_as_asked_and_detach() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        fs::create_dir_all(source.join("sub")).expect("mkdir");
        // A shared source, as kubelet's directory is on systemd hosts.
        mount(
            Some(&source),
            &source,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind the source");
        mount(
            None::<&str>,
            &source,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .expect("make it shared");
        let root = dir.path().join("volumes");
        prepare(&root).expect("prepare");
        let host_path = source.display().to_string();
        let share_as = |index, readonly, propagation| {
            root.join(share(&root, "c", index, &host_path, readonly, propagation).expect("share"))
        };
        let private = share_as(0, false, Propagation::Private);
        let following = share_as(1, false, Propagation::HostToContainer);
        let readonly = share_as(2, true, Propagation::Private);

        mount(
            Some("tmpfs"),
            &source.join("sub"),
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("a later mount on the node");
        fs::write(source.join("sub/later"), "x").expect("write");
        assert!(!private.join("sub/later").exists());
        assert!(following.join("sub/later").exists());
        fs::write(private.join("written"), "y").expect("a write through a share");
        assert!(source.join("written").exists());
        let refused = fs::write(readonly.join("refused"), "z").unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EROFS), "{refused}");

        remove_dir(&root).expect("remove the shares");
        assert!(!root.exists());
        assert!(source.join("written").exists(), "the node's files stay");
        detach_all(dir.path()).expect("detach the source");
    }
}
