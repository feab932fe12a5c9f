//! The read-only filesystem image a VM gets for an image: EROFS, built once
//! from the unpacked rootfs with `mkfs.erofs` (Debian's erofs-utils).
//!
//! Uncompressed on purpose: the guest kernel carries EROFS without its
//! decompressors (see guest-image/husk.config), and an uncompressed image is
//! also the fastest to build and to read.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::info;

pub const MKFS_EROFS: &str = "mkfs.erofs";

#[derive(Debug, thiserror::Error)]
pub enum FsImageError {
    #[error("cannot run {MKFS_EROFS} (install erofs-utils: scripts/install-deps.sh): {0}")]
    Spawn(#[source] io::Error),
    #[error("{MKFS_EROFS} failed building {image} from {rootfs} ({status}): {stderr}")]
    Failed {
        image: PathBuf,
        rootfs: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("filesystem image {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Builds `image` from the directory `rootfs` unless it already exists. The
/// image is built under a temp name beside it and renamed, so an existing
/// file is always a complete one.
pub fn ensure_erofs(rootfs: &Path, image: &Path) -> Result<(), FsImageError> {
    if image.is_file() {
        return Ok(());
    }
    let dir = image.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".rootfs.erofs.tmp-")
        .tempfile_in(dir)
        .map_err(|source| FsImageError::Io {
            path: dir.to_owned(),
            source,
        })?
        .into_temp_path();
    let started = std::time::Instant::now();
    let out = Command::new(MKFS_EROFS)
        // Every file keeps its own mtime (the default rounds them to the
        // build time where that saves inode space).
        .args(["--quiet", "--preserve-mtime"])
        .arg(&*tmp)
        .arg(rootfs)
        .output()
        .map_err(FsImageError::Spawn)?;
    if !out.status.success() {
        return Err(FsImageError::Failed {
            image: image.to_owned(),
            rootfs: rootfs.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    tmp.persist(image).map_err(|e| FsImageError::Io {
        path: image.to_owned(),
        source: e.error,
    })?;
    info!(image = %image.display(), elapsed_ms = started.elapsed().as_millis() as u64, "built EROFS image");
    Ok(())
}
