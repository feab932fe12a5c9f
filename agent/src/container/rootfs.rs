//! A container's root filesystem as the agent mounts it, in its own mount
//! namespace: the image read-only below, a size-limited tmpfs above, and
//! the overlay of both that the container's init moves into.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tracing::warn;

/// What a container may write to its rootfs when the request sets no limit.
pub const DEFAULT_WRITABLE_BYTES: u64 = 256 << 20;

/// Filesystems an image's block device may hold, tried in this order.
const IMAGE_FILESYSTEMS: [&str; 2] = ["erofs", "ext4"];

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("the rootfs {0} does not exist or is not a directory")]
    NoDirectory(PathBuf),
    #[error("the rootfs path {0:?} must be absolute, without ',' ':' or '\\n'")]
    BadPath(PathBuf),
    #[error("no rootfs source given")]
    NoSource,
    #[error("cannot mount {device} read-only as {}: {source}", IMAGE_FILESYSTEMS.join(" or "))]
    Image { device: PathBuf, source: Errno },
    #[error("cannot {what} at {}: {source}", path.display())]
    Mount {
        what: &'static str,
        path: PathBuf,
        source: Errno,
    },
    #[error("cannot create {}: {source}", path.display())]
    Dir { path: PathBuf, source: io::Error },
}

pub enum Source<'a> {
    BlockDevice(&'a Path),
    Directory(&'a Path),
}

/// The mounted rootfs of one container, below its own directory.
#[derive(Debug)]
pub struct Rootfs {
    dir: PathBuf,
    image_mounted: bool,
}

impl Rootfs {
    /// Mounts `source` and the writable layer below `dir` (which must not exist yet).
    pub fn mount(
        dir: &Path,
        source: Source<'_>,
        writable_bytes: u64,
    ) -> Result<Rootfs, RootfsError> {
        let mut rootfs = Rootfs {
            dir: dir.to_path_buf(),
            image_mounted: false,
        };
        match rootfs.mount_layers(source, writable_bytes) {
            Ok(()) => Ok(rootfs),
            Err(err) => {
                // Leave nothing of a half-made rootfs behind.
                rootfs.unmount();
                Err(err)
            }
        }
    }

    fn mount_layers(&mut self, source: Source<'_>, writable_bytes: u64) -> Result<(), RootfsError> {
        for sub in ["image", "rw", "merged"] {
            let path = self.dir.join(sub);
            fs::create_dir_all(&path).map_err(|source| RootfsError::Dir { path, source })?;
        }
        let lower = match source {
            Source::Directory(path) => {
                check_overlay_path(path)?;
                if !path.is_dir() {
                    return Err(RootfsError::NoDirectory(path.to_path_buf()));
                }
                path.to_path_buf()
            }
            Source::BlockDevice(device) => {
                let target = self.dir.join("image");
                let mut last = Errno::ENODEV;
                for fstype in IMAGE_FILESYSTEMS {
                    match mount(
                        Some(device),
                        &target,
                        Some(fstype),
                        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
                        None::<&str>,
                    ) {
                        Ok(()) => {
                            self.image_mounted = true;
                            break;
                        }
                        Err(err) => last = err,
                    }
                }
                if !self.image_mounted {
                    return Err(RootfsError::Image {
                        device: device.to_path_buf(),
                        source: last,
                    });
                }
                target
            }
        };
        let rw = self.dir.join("rw");
        let size = format!("size={writable_bytes},mode=0755");
        mount(
            Some("tmpfs"),
            &rw,
            Some("tmpfs"),
            MsFlags::MS_NODEV,
            Some(size.as_str()),
        )
        .map_err(|source| RootfsError::Mount {
            what: "mount the writable layer",
            path: rw.clone(),
            source,
        })?;
        for sub in ["upper", "work"] {
            let path = rw.join(sub);
            fs::create_dir(&path).map_err(|source| RootfsError::Dir { path, source })?;
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            rw.join("upper").display(),
            rw.join("work").display()
        );
        mount(
            Some("overlay"),
            &self.merged(),
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|source| RootfsError::Mount {
            what: "mount the overlay",
            path: self.merged(),
            source,
        })
    }

    /// Where the container's root is.
    pub fn merged(&self) -> PathBuf {
        self.dir.join("merged")
    }

    /// Bytes the container wrote to its writable layer.
    pub fn written_bytes(&self) -> u64 {
        match nix::sys::statvfs::statvfs(&self.dir.join("rw")) {
            Ok(stat) => (stat.blocks() - stat.blocks_free()) * stat.fragment_size(),
            Err(_) => 0,
        }
    }

    /// Unmounts everything (lazily: a process may still hold a file) and
    /// removes the directory. Idempotent.
    pub fn unmount(&mut self) {
        let mut targets = vec![self.merged(), self.dir.join("rw")];
        if self.image_mounted {
            targets.push(self.dir.join("image"));
        }
        for target in targets {
            match umount2(&target, MntFlags::MNT_DETACH) {
                Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
                Err(err) => warn!("unmounting {}: {err}", target.display()),
            }
        }
        self.image_mounted = false;
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => warn!("removing {}: {err}", self.dir.display()),
        }
    }
}

/// overlayfs splits its options on ',' and its lower dirs on ':'.
fn check_overlay_path(path: &Path) -> Result<(), RootfsError> {
    let text = path.to_string_lossy();
    if !path.is_absolute() || text.contains([',', ':', '\n']) {
        return Err(RootfsError::BadPath(path.to_path_buf()));
    }
    Ok(())
}
