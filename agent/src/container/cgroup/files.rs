//! Reading and writing cgroupfs files and directories, as both hierarchy
//! versions need: one write(2) per value, "not there" told apart from
//! failures.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Instant;

use tracing::debug;

use super::{io_err, CgroupError, SETTLE_POLL, SETTLE_TIMEOUT};

pub(super) fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(io_err("create", dir)(err)),
    }
}

/// The cgroups right below `dir`; none if `dir` is gone.
pub(super) fn child_cgroups(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(io_err("list", dir)(err)),
    };
    let mut children = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            children.push(entry.path());
        }
    }
    Ok(children)
}

/// Removes `dir` and the cgroups below it. cgroupfs directories hold only
/// the kernel's files, which go with them.
pub(super) fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    for child in child_cgroups(dir)? {
        remove_tree(&child)?;
    }
    // EBUSY while exiting processes are still leaving the cgroup.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(SETTLE_POLL);
            }
            Err(err) => return Err(io_err("remove", dir)(err)),
        }
    }
}

/// One write(2) of the whole value, as cgroupfs wants; never creates.
pub(super) fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    file.write_all(value.as_bytes())
        .map_err(|source| CgroupError::Io {
            op: "write",
            path: path.to_path_buf(),
            source: io::Error::new(source.kind(), format!("writing {value:?}: {source}")),
        })
}

/// Writes unless the file is not there; Ok(false) then.
pub(super) fn write_if_exists(path: &Path, value: &str) -> Result<bool, CgroupError> {
    match write_file(path, value) {
        Ok(()) => Ok(true),
        Err(CgroupError::Io {
            op: "open", source, ..
        }) if source.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err),
    }
}

pub(super) fn write_if_present(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    if write_if_exists(&path, value)? {
        debug!(path = %path.display(), value, "cgroup file written");
    } else {
        debug!(path = %path.display(), value, "not on this hierarchy, skipped");
    }
    Ok(())
}

/// The file's content, None if it is not there.
pub(super) fn read_string(path: &Path) -> Result<Option<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(content) => Ok(Some(content)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(io_err("read", path)(err)),
    }
}

pub(super) fn parse_error(path: &Path, reason: String) -> CgroupError {
    CgroupError::Parse {
        path: path.to_path_buf(),
        reason,
    }
}

/// A single-number file; None if it is not there.
pub(super) fn read_u64(path: &Path) -> Result<Option<u64>, CgroupError> {
    let Some(content) = read_string(path)? else {
        return Ok(None);
    };
    let text = content.trim();
    text.parse()
        .map(Some)
        .map_err(|err| parse_error(path, format!("{text:?}: {err}")))
}

/// A flat keyed file ("key value" lines: cpu.stat, memory.stat,
/// memory.events, memory.oom_control); empty if it is not there.
pub(super) fn read_keyed_all(path: &Path) -> Result<BTreeMap<String, u64>, CgroupError> {
    let content = read_string(path)?.unwrap_or_default();
    parse_keyed(&content).map_err(|reason| parse_error(path, reason))
}

pub(super) fn read_keyed(path: &Path, key: &str) -> Result<Option<u64>, CgroupError> {
    Ok(read_keyed_all(path)?.get(key).copied())
}

pub(super) fn parse_keyed(content: &str) -> Result<BTreeMap<String, u64>, String> {
    let mut map = BTreeMap::new();
    for line in content.lines().filter(|line| !line.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("line {line:?} is not \"key value\""));
        };
        let value = value
            .parse()
            .map_err(|err| format!("line {line:?}: {err}"))?;
        map.insert(key.to_string(), value);
    }
    Ok(map)
}

/// The pids in a cgroup.procs file; None if it is not there.
pub(super) fn read_pids(path: &Path) -> Result<Option<Vec<i32>>, CgroupError> {
    let Some(content) = read_string(path)? else {
        return Ok(None);
    };
    content
        .split_whitespace()
        .map(|pid| {
            pid.parse()
                .map_err(|err| parse_error(path, format!("pid {pid:?}: {err}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_parse() {
        let map = parse_keyed("usage_usec 12\nuser_usec 7\n\n").unwrap();
        assert_eq!(map.get("usage_usec"), Some(&12));
        assert!(parse_keyed("oops").is_err());
        assert!(parse_keyed("key notanumber").is_err());
    }
}
