//! Paths a spec or a request names, resolved so they cannot leave a root.

use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

/// More links than this on one path is a loop, as the kernel's own limit (40) says.
const MAX_SYMLINKS: usize = 40;

/// Resolves `unsafe_path` (absolute or not, it is taken as relative to
/// `root`) inside `root`: `..` stops at `root`, and each symlink on the way
/// is read and resolved as if `root` were `/`. What does not exist yet is
/// appended as named. The result always lies below `root`; it can still be
/// raced by someone changing the tree afterwards, which the container
/// (not yet started when this runs) cannot do.
pub fn secure_join(root: &Path, unsafe_path: &Path) -> io::Result<PathBuf> {
    let mut resolved = PathBuf::new(); // relative to root
    let mut pending: Vec<OsString> = components(unsafe_path);
    pending.reverse();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        match std::fs::symlink_metadata(root.join(&candidate)) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("too many symlinks in {}", unsafe_path.display()),
                    ));
                }
                let target = std::fs::read_link(root.join(&candidate))?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
            }
            Ok(_) => resolved = candidate,
            // The rest does not exist: nothing on it can be a link.
            Err(err) if err.kind() == io::ErrorKind::NotFound => resolved = candidate,
            Err(err) => return Err(err),
        }
    }
    Ok(root.join(resolved))
}

/// The normal and `..` components of `path`, in order; `/` and `.` drop out.
fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn dotdot_and_symlinks_stay_inside_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        symlink("/etc", root.join("abs")).expect("symlink");
        symlink("../../../../", root.join("etc/up")).expect("symlink");
        symlink("loop2", root.join("loop1")).expect("symlink");
        symlink("loop1", root.join("loop2")).expect("symlink");

        let join = |p: &str| secure_join(root, Path::new(p)).expect(p);
        assert_eq!(join("/../../etc/passwd"), root.join("etc/passwd"));
        assert_eq!(join("abs/hosts"), root.join("etc/hosts"));
        assert_eq!(join("/etc/up/etc/x"), root.join("etc/x"));
        assert_eq!(join("new/dir"), root.join("new/dir"));
        assert!(secure_join(root, Path::new("loop1/x")).is_err());
    }
}
