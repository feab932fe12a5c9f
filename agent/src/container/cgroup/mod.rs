//! The agent's cgroup manager, for cgroup v1 and v2: one interface,
//! [`Cgroup`], over [`v1`] and [`v2`], which know their hierarchy's files
//! (youki's libcgroups split); [`files`] reads and writes cgroupfs.
//!
//! In the guest the agent is PID 1 on a pure cgroup v2 mount; on the host
//! (the `host` sandbox driver, the integration tests) it may find cgroup v1:
//! one hierarchy per controller under /sys/fs/cgroup/<controller>. A
//! [`Cgroup`] is one relative path (e.g. "husk/<sandbox>/<container>") made
//! real in the one v2 directory, or in each v1 hierarchy we use.
//!
//! Files a hierarchy does not have (a controller not enabled, no swap
//! accounting) are skipped with a debug log rather than failing: the same
//! spec must run in the guest and on the host.

mod files;
#[cfg(test)]
mod test_support;
mod v1;
mod v2;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use tracing::{debug, warn};

#[cfg(test)]
use files::write_file;
use files::{child_cgroups, read_keyed, read_pids, remove_tree, write_if_exists};

/// Where the cgroup hierarchy (v2) or hierarchies (v1) are mounted.
const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// How long kill_all waits for a SIGKILLed cgroup to empty, and remove
/// retries a busy (still emptying) directory.
const SETTLE_TIMEOUT: Duration = Duration::from_millis(500);
const SETTLE_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup path {path:?}: {reason}")]
    InvalidPath { path: PathBuf, reason: &'static str },
    #[error(
        "no cgroup v1 hierarchy of cpu, cpuacct, memory, pids, cpuset is mounted under {root:?}"
    )]
    NoHierarchy { root: PathBuf },
    #[error("cannot {op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse {path:?}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid resources for cgroup {path:?}: {reason}")]
    InvalidResources { path: PathBuf, reason: String },
    #[error("cgroup {path:?} still has processes {pids:?} after SIGKILL")]
    StillPopulated { path: PathBuf, pids: Vec<i32> },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { op, path, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// A cgroup mount to create cgroups in: normally the system's, detected;
/// tests root it elsewhere (e.g. the host's controller-less cgroup2 at
/// /sys/fs/cgroup/unified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// v2: the cgroup2 mount; v1: the directory holding one mount per
    /// controller.
    root: PathBuf,
    version: CgroupVersion,
}

impl Hierarchy {
    /// The system's: v2 when /sys/fs/cgroup/cgroup.controllers exists.
    pub fn detect() -> Hierarchy {
        Hierarchy::detect_at(Path::new(DEFAULT_ROOT))
    }

    pub fn detect_at(root: &Path) -> Hierarchy {
        let version = if root.join("cgroup.controllers").exists() {
            CgroupVersion::V2
        } else {
            CgroupVersion::V1
        };
        Hierarchy::new(root, version)
    }

    pub fn new(root: impl Into<PathBuf>, version: CgroupVersion) -> Hierarchy {
        Hierarchy {
            root: root.into(),
            version,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }
}

/// Resource usage of a cgroup, as the CRI stats want it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu_usage_ns: u64,
    pub memory_usage_bytes: u64,
    /// usage - inactive_file, as kubelet/cadvisor compute it.
    pub memory_working_set_bytes: u64,
    pub memory_rss_bytes: u64,
    pub pids: u64,
}

impl CgroupStats {
    /// From the counters and memory.stat; `rss_key` and `inactive_key` are
    /// the hierarchy's names for anonymous and inactive file memory.
    fn new(
        cpu_usage_ns: u64,
        memory_usage_bytes: u64,
        memory_stat: &BTreeMap<String, u64>,
        (rss_key, inactive_key): (&str, &str),
        pids: u64,
    ) -> CgroupStats {
        let stat = |key: &str| memory_stat.get(key).copied().unwrap_or(0);
        CgroupStats {
            cpu_usage_ns,
            memory_usage_bytes,
            memory_working_set_bytes: memory_usage_bytes.saturating_sub(stat(inactive_key)),
            memory_rss_bytes: stat(rss_key),
            pids,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Cgroup {
    version: CgroupVersion,
    relative: PathBuf,
    /// v2: the one directory, under the controller name "". v1: one entry
    /// per hierarchy found; co-mounted controllers share a directory.
    dirs: Vec<(&'static str, PathBuf)>,
}

impl Cgroup {
    /// Creates (idempotently, parents too) the cgroup at `relative` below the
    /// system's hierarchy root(s); see [`Cgroup::create_in`].
    pub fn create(relative: &Path) -> Result<Cgroup, CgroupError> {
        Cgroup::create_in(&Hierarchy::detect(), relative)
    }

    /// Creates (idempotently, parents too) the cgroup at `relative` below
    /// `hierarchy`. v2: one directory, with +cpu +memory +pids +cpuset (those
    /// offered) enabled in the subtree_control of each ancestor on the way.
    /// v1: one directory per hierarchy used, cpuset.cpus/mems copied down so
    /// that the child can take tasks.
    pub fn create_in(hierarchy: &Hierarchy, relative: &Path) -> Result<Cgroup, CgroupError> {
        check_relative(relative)?;
        let root = hierarchy.root();
        let dirs = match hierarchy.version() {
            CgroupVersion::V2 => vec![("", v2::create(root, relative)?)],
            CgroupVersion::V1 => v1::create(root, relative)?,
        };
        debug!(cgroup = %relative.display(), ?dirs, "cgroup created");
        Ok(Cgroup {
            version: hierarchy.version(),
            relative: relative.to_path_buf(),
            dirs,
        })
    }

    /// The path below the hierarchy root(s) this cgroup was created at.
    #[cfg(test)]
    pub fn relative(&self) -> &Path {
        &self.relative
    }

    /// The cgroup's directories: one on v2, one per hierarchy on v1.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = Vec::new();
        for (_, dir) in &self.dirs {
            if !paths.contains(dir) {
                paths.push(dir.clone());
            }
        }
        paths
    }

    /// The `cgroup.procs` files a process writes a pid into to join (one on
    /// v2, one per hierarchy on v1); for the container init stage, which
    /// only gets plain paths.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.paths()
            .into_iter()
            .map(|dir| dir.join("cgroup.procs"))
            .collect()
    }

    /// Moves process `pid` (all its threads) into the cgroup. (Containers
    /// join by themselves, through `procs_files`.)
    #[cfg(test)]
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for procs in self.procs_files() {
            write_file(&procs, &pid.to_string())?;
        }
        Ok(())
    }

    /// Applies OCI `linux.resources`. Fields this hierarchy does not support
    /// are skipped with a debug log; values the kernel rejects are errors.
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        self.check_exists()?;
        match self.version {
            CgroupVersion::V2 => v2::apply(self.v2_dir(), resources),
            CgroupVersion::V1 => v1::apply(self, resources),
        }
    }

    /// Current usage. Counters of a controller that is not there read as 0.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        self.check_exists()?;
        match self.version {
            CgroupVersion::V2 => v2::stats(self.v2_dir()),
            CgroupVersion::V1 => v1::stats(self),
        }
    }

    /// How many times the kernel's OOM killer killed a process in this
    /// cgroup (0 where the memory controller is not there).
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        self.check_exists()?;
        let path = match self.version {
            CgroupVersion::V2 => self.v2_dir().join("memory.events"),
            CgroupVersion::V1 => match self.controller_dir("memory") {
                Some(dir) => dir.join("memory.oom_control"),
                None => return Ok(0),
            },
        };
        Ok(read_keyed(&path, "oom_kill")?.unwrap_or(0))
    }

    /// The processes in this cgroup (not its descendants), sorted.
    #[cfg(test)]
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pids = Vec::new();
        for procs in self.procs_files() {
            pids.extend(read_pids(&procs)?.unwrap_or_default());
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// SIGKILLs every process in the cgroup and its descendants, and waits
    /// (briefly) until they are gone. v2's cgroup.kill does it atomically,
    /// even against forks; elsewhere each pid is signalled, again and again
    /// until none is left. Ok if the cgroup is gone.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if self.version == CgroupVersion::V2 {
            // Not there: an older kernel, or the cgroup is gone (then
            // there is nothing to kill and the loop sees no pids).
            write_if_exists(&self.v2_dir().join("cgroup.kill"), "1")?;
        }
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let pids = self.subtree_pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::StillPopulated {
                    path: self.relative.clone(),
                    pids,
                });
            }
            // Also after cgroup.kill: harmless, and covers a kernel that
            // raced us.
            for pid in pids {
                match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(err) => warn!(pid, "cannot SIGKILL a process of the cgroup: {err}"),
                }
            }
            thread::sleep(SETTLE_POLL);
        }
    }

    /// Removes the cgroup's directories, descendants first, retrying while
    /// the kernel still calls one busy. Ok if already gone. The parents
    /// (shared with other cgroups) are left alone.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for dir in self.paths() {
            remove_tree(&dir)?;
        }
        debug!(cgroup = %self.relative.display(), "cgroup removed");
        Ok(())
    }

    /// The v2 cgroup's one directory (create_in always makes one).
    fn v2_dir(&self) -> &Path {
        &self.dirs[0].1
    }

    fn controller_dir(&self, controller: &str) -> Option<&Path> {
        match self.version {
            CgroupVersion::V2 => self.dirs.first().map(|(_, dir)| dir.as_path()),
            CgroupVersion::V1 => self
                .dirs
                .iter()
                .find(|(name, _)| *name == controller)
                .map(|(_, dir)| dir.as_path()),
        }
    }

    /// Errors (NotFound) unless every directory is there: a file missing
    /// then means "not on this hierarchy", not "cgroup gone".
    fn check_exists(&self) -> Result<(), CgroupError> {
        for dir in self.paths() {
            fs::metadata(&dir).map_err(io_err("find cgroup", &dir))?;
        }
        Ok(())
    }

    /// The processes in this cgroup and all its descendants.
    fn subtree_pids(&self) -> Result<Vec<i32>, CgroupError> {
        fn walk(dir: &Path, pids: &mut Vec<i32>) -> Result<(), CgroupError> {
            pids.extend(read_pids(&dir.join("cgroup.procs"))?.unwrap_or_default());
            for child in child_cgroups(dir)? {
                walk(&child, pids)?;
            }
            Ok(())
        }
        let mut pids = Vec::new();
        for dir in self.paths() {
            walk(&dir, &mut pids)?;
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }
}

/// `relative` must stay below the root: plain names only.
fn check_relative(relative: &Path) -> Result<(), CgroupError> {
    let invalid = |reason| CgroupError::InvalidPath {
        path: relative.to_path_buf(),
        reason,
    };
    if relative.as_os_str().is_empty() {
        return Err(invalid("empty"));
    }
    if !relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(invalid("must be relative, without '.' or '..'"));
    }
    Ok(())
}

fn cpuset_writes(cpus: &Option<String>, mems: &Option<String>) -> Vec<(&'static str, String)> {
    let mut writes = Vec::new();
    if let Some(cpus) = cpus.as_deref().filter(|s| !s.is_empty()) {
        writes.push(("cpuset.cpus", cpus.to_string()));
    }
    if let Some(mems) = mems.as_deref().filter(|s| !s.is_empty()) {
        writes.push(("cpuset.mems", mems.to_string()));
    }
    writes
}

/// The fields we do not manage at all (devices are the container's device
/// nodes, not a cgroup here).
fn log_unsupported(resources: &LinuxResources) {
    if resources.devices().as_ref().is_some_and(|d| !d.is_empty()) {
        debug!("device cgroup rules are not applied, skipped");
    }
    if resources.block_io().is_some() {
        debug!("blockIO resources are not supported, skipped");
    }
    if resources
        .hugepage_limits()
        .as_ref()
        .is_some_and(|h| !h.is_empty())
    {
        debug!("hugepage limits are not supported, skipped");
    }
    if resources.network().is_some() {
        debug!("network resources are not supported, skipped");
    }
    if resources.rdma().as_ref().is_some_and(|r| !r.is_empty()) {
        debug!("rdma resources are not supported, skipped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_stay_below_the_root() {
        let hierarchy = Hierarchy::new("/nonexistent", CgroupVersion::V2);
        for path in ["", "/abs", "a/../b", "./a", ".."] {
            assert!(
                matches!(
                    Cgroup::create_in(&hierarchy, Path::new(path)),
                    Err(CgroupError::InvalidPath { .. })
                ),
                "{path:?}"
            );
        }
    }
}
