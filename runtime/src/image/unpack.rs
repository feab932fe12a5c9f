//! Applies image layers, in order, to a directory: the rootfs huskd builds a
//! filesystem image from, and the host sandbox driver mounts directly.
//!
//! Layers are untrusted input. Every path is resolved one component at a time
//! from a directory fd of the rootfs with `O_NOFOLLOW`, so no symlink — whether
//! an earlier entry or an earlier layer made it — is ever followed while
//! writing: an entry whose parent path runs through a symlink is refused, as is
//! any path that is absolute or has a `..` component, and any hardlink whose
//! target is outside the rootfs. Symlinks themselves may point anywhere: they
//! resolve inside the container later, never while we unpack.
//!
//! Whiteouts follow the OCI image spec: `.wh.<name>` removes `<name>` from lower
//! layers, `.wh..wh..opq` hides everything lower layers put in its directory;
//! neither touches what the same layer writes.
//!
//! One file (its tests are in `unpack/tests.rs`) although it is long: all
//! that untrusted paths reach is here, to be reviewed in one reading.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstatat, futimens, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag,
    UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use tracing::{debug, warn};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// Why a layer could not be applied. Every variant names the layer, and the
/// entry where there is one.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer {layer}: cannot open the rootfs {rootfs}: {source}")]
    Rootfs {
        layer: String,
        rootfs: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: reading the archive: {source}")]
    Archive {
        layer: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: refusing entry {entry:?}: {why}")]
    Unsafe {
        layer: String,
        entry: String,
        why: String,
    },
    #[error("layer {layer}: entry {entry:?}: {op}: {source}")]
    Io {
        layer: String,
        entry: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Applies layers to one rootfs directory. Directory mtimes are set once at
/// the end, since every later entry written into a directory bumps its mtime.
pub struct Unpacker {
    rootfs_path: PathBuf,
    root: OwnedFd,
    dir_mtimes: BTreeMap<Vec<OsString>, TimeSpec>,
}

impl Unpacker {
    /// Starts unpacking into `rootfs`, which must be an existing directory
    /// (huskd creates it; it is not itself a symlink).
    pub fn new(rootfs: &Path) -> Result<Self, UnpackError> {
        let root = nix::fcntl::open(
            rootfs,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| UnpackError::Rootfs {
            layer: String::new(),
            rootfs: rootfs.to_owned(),
            source: e.into(),
        })?;
        Ok(Self {
            rootfs_path: rootfs.to_owned(),
            root,
            dir_mtimes: BTreeMap::new(),
        })
    }

    /// Applies one layer blob (gzip, zstd or plain tar, told apart by their
    /// magic bytes rather than by the media type a registry claims).
    pub fn apply_blob(&mut self, blob: &Path, layer: &str) -> Result<(), UnpackError> {
        let file = File::open(blob).map_err(|source| UnpackError::Archive {
            layer: layer.to_owned(),
            source,
        })?;
        self.apply(file, layer)
    }

    /// Applies one layer read from `reader` (compressed or not).
    #[tracing::instrument(skip(self, reader), fields(rootfs = %self.rootfs_path.display()))]
    pub fn apply(&mut self, reader: impl Read, layer: &str) -> Result<(), UnpackError> {
        let archive_err = |source| UnpackError::Archive {
            layer: layer.to_owned(),
            source,
        };
        let mut buffered = BufReader::with_capacity(128 * 1024, reader);
        let magic = buffered.fill_buf().map_err(archive_err)?;
        let tar_stream: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(buffered))
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            let decoder = ruzstd::decoding::StreamingDecoder::new(buffered)
                .map_err(|e| archive_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            Box::new(decoder)
        } else {
            Box::new(buffered)
        };
        let mut state = LayerState {
            layer,
            written: HashSet::new(),
            ancestors: HashSet::new(),
        };
        let mut archive = tar::Archive::new(tar_stream);
        for entry in archive.entries().map_err(archive_err)? {
            let entry = entry.map_err(archive_err)?;
            self.apply_entry(&mut state, entry)?;
        }
        Ok(())
    }

    /// Sets the directory mtimes recorded across all layers.
    pub fn finish(self) {
        for (comps, mtime) in &self.dir_mtimes {
            let Some((name, parents)) = comps.split_last() else {
                continue;
            };
            // A directory a later layer whited out is simply gone.
            let Ok(parent) = walk(self.root.as_fd(), parents, false) else {
                continue;
            };
            if let Err(e) = utimensat(
                parent.as_fd(),
                name.as_os_str(),
                mtime,
                mtime,
                UtimensatFlags::NoFollowSymlink,
            ) {
                debug!(path = ?comps, error = %e, "cannot set a directory's mtime");
            }
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        state: &mut LayerState<'_>,
        mut entry: tar::Entry<'_, R>,
    ) -> Result<(), UnpackError> {
        let raw_path = entry
            .path()
            .map_err(|source| state.archive(source))?
            .into_owned();
        let shown = raw_path.display().to_string();
        let comps = normalise(&raw_path).map_err(|why| state.refuse(&shown, why))?;
        let header = entry.header();
        let kind = header.entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        let Some((name, parents)) = comps.split_last() else {
            // `./` itself: the rootfs directory is ours, its metadata too.
            return Ok(());
        };
        let meta = Meta::from_header(header).map_err(|e| state.io(&shown, "header", e))?;

        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            let parent = self.walk(state, &shown, parents, false)?;
            if name == OPAQUE_WHITEOUT {
                clear_lower(parent.as_fd(), parents, state)
                    .map_err(|e| state.io(&shown, "clearing an opaque directory", e))?;
            } else if hidden.starts_with(b".wh.") {
                // aufs metadata (.wh..wh.plnk and friends): not content.
            } else {
                let hidden = OsStr::from_bytes(hidden);
                let mut target: Vec<OsString> = parents.to_vec();
                target.push(hidden.to_owned());
                if !state.written.contains(&target) {
                    remove_all_at(parent.as_fd(), hidden)
                        .or_else(ignore_missing)
                        .map_err(|e| state.io(&shown, "applying a whiteout", e))?;
                }
            }
            return Ok(());
        }

        match kind {
            tar::EntryType::Directory => {
                let parent = self.walk(state, &shown, parents, true)?;
                let dir = make_dir(parent.as_fd(), name)
                    .map_err(|e| state.io(&shown, "creating a directory", e))?;
                meta.apply_to_fd(dir.as_fd())
                    .map_err(|e| state.io(&shown, "setting ownership and mode", e))?;
                self.dir_mtimes.insert(comps.clone(), meta.mtime);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let parent = self.walk(state, &shown, parents, true)?;
                clear_slot(parent.as_fd(), name)
                    .map_err(|e| state.io(&shown, "replacing a lower entry", e))?;
                let fd = openat(
                    parent.as_fd(),
                    name.as_os_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| state.io(&shown, "creating a file", e.into()))?;
                let mut file = File::from(fd);
                io::copy(&mut entry, &mut file)
                    .map_err(|e| state.io(&shown, "writing a file", e))?;
                meta.apply_to_fd(file.as_fd())
                    .map_err(|e| state.io(&shown, "setting ownership and mode", e))?;
                futimens(file.as_fd(), &meta.mtime, &meta.mtime)
                    .map_err(|e| state.io(&shown, "setting mtime", e.into()))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|source| state.archive(source))?
                    .ok_or_else(|| state.refuse(&shown, "symlink without a target".into()))?;
                let parent = self.walk(state, &shown, parents, true)?;
                clear_slot(parent.as_fd(), name)
                    .map_err(|e| state.io(&shown, "replacing a lower entry", e))?;
                symlinkat(target.as_ref(), parent.as_fd(), name.as_os_str())
                    .map_err(|e| state.io(&shown, "creating a symlink", e.into()))?;
                meta.apply_to_link(parent.as_fd(), name)
                    .map_err(|e| state.io(&shown, "setting a symlink's owner and mtime", e))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|source| state.archive(source))?
                    .ok_or_else(|| state.refuse(&shown, "hardlink without a target".into()))?;
                let target_comps = normalise(&target).map_err(|why| {
                    state.refuse(
                        &shown,
                        format!(
                            "hardlink target {} is outside the rootfs: {why}",
                            target.display()
                        ),
                    )
                })?;
                if target_comps == comps {
                    return Ok(());
                }
                let Some((target_name, target_parents)) = target_comps.split_last() else {
                    return Err(state.refuse(&shown, "hardlink to the rootfs itself".into()));
                };
                let target_parent = self.walk(state, &shown, target_parents, false)?;
                let parent = self.walk(state, &shown, parents, true)?;
                clear_slot(parent.as_fd(), name)
                    .map_err(|e| state.io(&shown, "replacing a lower entry", e))?;
                // linkat without AT_SYMLINK_FOLLOW links the target entry
                // itself, never what a symlink there points at.
                linkat(
                    target_parent.as_fd(),
                    target_name.as_os_str(),
                    parent.as_fd(),
                    name.as_os_str(),
                    AtFlags::empty(),
                )
                .map_err(|e| state.io(&shown, "creating a hardlink", e.into()))?;
            }
            tar::EntryType::Fifo => {
                let parent = self.walk(state, &shown, parents, true)?;
                clear_slot(parent.as_fd(), name)
                    .map_err(|e| state.io(&shown, "replacing a lower entry", e))?;
                mknodat(
                    parent.as_fd(),
                    name.as_os_str(),
                    SFlag::S_IFIFO,
                    meta.mode,
                    0,
                )
                .map_err(|e| state.io(&shown, "creating a fifo", e.into()))?;
                meta.apply_to_special(parent.as_fd(), name)
                    .map_err(|e| state.io(&shown, "setting a fifo's owner and mode", e))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                // Skipped, not refused: old images (and `docker export`s) carry
                // /dev/null and friends, which are harmless in the image's
                // tarball but useless in a container, whose /dev the runtime
                // provides. Creating them would hand a host-sandbox container
                // (which mounts this very directory) a device node of the host's.
                warn!(layer = state.layer, entry = %shown, "skipping a device node in an image layer");
                return Ok(());
            }
            other => {
                warn!(layer = state.layer, entry = %shown, kind = ?other, "skipping an unsupported tar entry type");
                return Ok(());
            }
        }
        state.record(&comps);
        Ok(())
    }

    /// Opens the directory `parents` names, refusing symlinks on the way.
    fn walk(
        &self,
        state: &mut LayerState<'_>,
        entry: &str,
        parents: &[OsString],
        create: bool,
    ) -> Result<OwnedFd, UnpackError> {
        let fd = walk(self.root.as_fd(), parents, create).map_err(|e| match e {
            WalkError::Symlink(at) => state.refuse(
                entry,
                format!("its path runs through the symlink {}", at.display()),
            ),
            WalkError::NotDirectory(at) => {
                state.refuse(entry, format!("{} is not a directory", at.display()))
            }
            WalkError::Io(at, source) => UnpackError::Io {
                layer: state.layer.to_owned(),
                entry: entry.to_owned(),
                op: if at.as_os_str().is_empty() {
                    "opening the rootfs"
                } else {
                    "opening a parent directory"
                },
                source,
            },
        })?;
        if create {
            // Implicitly created parents belong to this layer, so an opaque
            // whiteout later in it does not remove them.
            for i in 1..=parents.len() {
                state.ancestors.insert(parents[..i].to_vec());
            }
        }
        Ok(fd)
    }
}

/// Applies `layers` (blob paths, oldest first) to the directory `rootfs`.
pub fn unpack_layers<'a>(
    rootfs: &Path,
    layers: impl IntoIterator<Item = (&'a str, &'a Path)>,
) -> Result<(), UnpackError> {
    let mut unpacker = Unpacker::new(rootfs)?;
    for (digest, blob) in layers {
        unpacker.apply_blob(blob, digest)?;
    }
    unpacker.finish();
    Ok(())
}

/// What one layer wrote so far: whiteouts apply only to lower layers.
struct LayerState<'a> {
    layer: &'a str,
    written: HashSet<Vec<OsString>>,
    ancestors: HashSet<Vec<OsString>>,
}

impl LayerState<'_> {
    fn record(&mut self, comps: &[OsString]) {
        self.written.insert(comps.to_vec());
        for i in 1..comps.len() {
            self.ancestors.insert(comps[..i].to_vec());
        }
    }

    fn keeps(&self, comps: &[OsString]) -> bool {
        self.written.contains(comps) || self.ancestors.contains(comps)
    }

    fn archive(&self, source: io::Error) -> UnpackError {
        UnpackError::Archive {
            layer: self.layer.to_owned(),
            source,
        }
    }

    fn refuse(&self, entry: &str, why: String) -> UnpackError {
        UnpackError::Unsafe {
            layer: self.layer.to_owned(),
            entry: entry.to_owned(),
            why,
        }
    }

    fn io(&self, entry: &str, op: &'static str, source: io::Error) -> UnpackError {
        UnpackError::Io {
            layer: self.layer.to_owned(),
            entry: entry.to_owned(),
            op,
            source,
        }
    }
}

/// An entry's path as components below the rootfs: `./` and `.` dropped;
/// absolute paths and `..` refused rather than "cleaned", since no honest
/// layer has them.
fn normalise(path: &Path) -> Result<Vec<OsString>, String> {
    let mut comps = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(name) => comps.push(name.to_owned()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute path".to_owned());
            }
            Component::ParentDir => return Err("`..` component".to_owned()),
        }
    }
    Ok(comps)
}

enum WalkError {
    Symlink(PathBuf),
    NotDirectory(PathBuf),
    Io(PathBuf, io::Error),
}

/// Opens `comps` below `root` one component at a time with O_NOFOLLOW; with
/// `create`, missing directories are made (layers often omit parents).
fn walk(root: BorrowedFd<'_>, comps: &[OsString], create: bool) -> Result<OwnedFd, WalkError> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut dir = openat(root, ".", flags, Mode::empty())
        .map_err(|e| WalkError::Io(PathBuf::new(), e.into()))?;
    let mut at = PathBuf::new();
    for name in comps {
        at.push(name);
        let next = match openat(dir.as_fd(), name.as_os_str(), flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) if create => {
                match mkdirat(
                    dir.as_fd(),
                    name.as_os_str(),
                    Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(WalkError::Io(at, e.into())),
                }
                openat(dir.as_fd(), name.as_os_str(), flags, Mode::empty())
                    .map_err(|e| WalkError::Io(at.clone(), e.into()))?
            }
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                // Tell a symlink from a file for the error message.
                return Err(
                    match fstatat(dir.as_fd(), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                        Ok(st) if file_kind(st.st_mode) == SFlag::S_IFLNK => WalkError::Symlink(at),
                        _ => WalkError::NotDirectory(at),
                    },
                );
            }
            Err(e) => return Err(WalkError::Io(at, e.into())),
        };
        dir = next;
    }
    Ok(dir)
}

fn file_kind(st_mode: u32) -> SFlag {
    SFlag::from_bits_truncate(st_mode & SFlag::S_IFMT.bits())
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// Makes room for a new non-directory entry `name`: whatever a lower layer
/// had there goes (unlinked, never written through, so hardlinked siblings in
/// lower layers keep their content).
fn clear_slot(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    remove_all_at(parent, name).or_else(ignore_missing)
}

/// Opens directory `name` in `parent`, creating it, or replacing a
/// non-directory that is there.
fn make_dir(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if file_kind(st.st_mode) == SFlag::S_IFDIR => {}
        Ok(_) => {
            remove_all_at(parent, name)?;
            mkdirat(parent, name, Mode::from_bits_truncate(0o700))?;
        }
        Err(Errno::ENOENT) => match mkdirat(parent, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        },
        Err(e) => return Err(e.into()),
    }
    Ok(openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// Removes `name` in `parent` and, if it is a directory, everything below it,
/// without following any symlink.
pub(crate) fn remove_all_at(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let st = fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if file_kind(st.st_mode) != SFlag::S_IFDIR {
        return Ok(unlinkat(parent, name, UnlinkatFlags::NoRemoveDir)?);
    }
    let dir = openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    for child in children(dir.as_fd())? {
        remove_all_at(dir.as_fd(), &child)?;
    }
    Ok(unlinkat(parent, name, UnlinkatFlags::RemoveDir)?)
}

/// The names in a directory, `.` and `..` left out.
fn children(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    // nix's Dir takes ownership of (and closes) its fd: give it a duplicate.
    let dup = dir.try_clone_to_owned()?;
    let mut listing = nix::dir::Dir::from_fd(dup)?;
    let mut names = Vec::new();
    for child in listing.iter() {
        let child = child?;
        let name = child.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    Ok(names)
}

/// The opaque whiteout: removes everything under `dir` that this layer did
/// not write itself.
fn clear_lower(dir: BorrowedFd<'_>, at: &[OsString], state: &LayerState<'_>) -> io::Result<()> {
    for child in children(dir)? {
        let mut path = at.to_vec();
        path.push(child.clone());
        if !state.keeps(&path) {
            remove_all_at(dir, &child)?;
            continue;
        }
        let st = fstatat(dir, child.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if file_kind(st.st_mode) == SFlag::S_IFDIR {
            let sub = openat(
                dir,
                child.as_os_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            clear_lower(sub.as_fd(), &path, state)?;
        }
    }
    Ok(())
}

/// Ownership, permission bits and mtime from a tar header. We run as root,
/// so ownership is kept as the layer says.
struct Meta {
    uid: Uid,
    gid: Gid,
    mode: Mode,
    mtime: TimeSpec,
}

impl Meta {
    fn from_header(header: &tar::Header) -> io::Result<Self> {
        let id = |v: u64| {
            u32::try_from(v)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "id out of range"))
        };
        // An all-blank numeric field means 0, as Go's archive/tar (which
        // builds most layers) reads it; tar-rs calls it an error.
        let blank = |field: &[u8]| field.iter().all(|b| matches!(b, 0 | b' '));
        let old = header.as_old();
        let uid = if blank(&old.uid) { 0 } else { header.uid()? };
        let gid = if blank(&old.gid) { 0 } else { header.gid()? };
        let mtime = if blank(&old.mtime) {
            0
        } else {
            header.mtime()?
        };
        let mtime = i64::try_from(mtime).unwrap_or(i64::MAX);
        Ok(Self {
            uid: Uid::from_raw(id(uid)?),
            gid: Gid::from_raw(id(gid)?),
            mode: Mode::from_bits_truncate(header.mode()? & 0o7777),
            mtime: TimeSpec::new(mtime, 0),
        })
    }

    /// Owner first, then mode: chown clears setuid/setgid bits.
    fn apply_to_fd(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        fchown(fd, Some(self.uid), Some(self.gid))?;
        fchmod(fd, self.mode)?;
        Ok(())
    }

    fn apply_to_link(&self, parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
        fchownat(
            parent,
            name,
            Some(self.uid),
            Some(self.gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        utimensat(
            parent,
            name,
            &self.mtime,
            &self.mtime,
            UtimensatFlags::NoFollowSymlink,
        )?;
        Ok(())
    }

    /// For a fifo we just made: opening it to use the fd calls would block.
    fn apply_to_special(&self, parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
        fchownat(
            parent,
            name,
            Some(self.uid),
            Some(self.gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        // The name is the fifo mknodat just created in a directory fd we hold,
        // not a symlink; Linux has no non-following fchmodat for non-links.
        fchmodat(parent, name, self.mode, FchmodatFlags::FollowSymlink)?;
        utimensat(
            parent,
            name,
            &self.mtime,
            &self.mtime,
            UtimensatFlags::NoFollowSymlink,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
