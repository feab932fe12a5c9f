//! The agent's cgroup manager, for cgroup v1 and v2.
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

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use tracing::{debug, warn};

/// Where the cgroup hierarchy (v2) or hierarchies (v1) are mounted.
const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// The v2 controllers we enable for our subtree, when the parent offers them.
const V2_CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "cpuset"];

/// The v1 hierarchies we use, by the directory they are mounted at below the
/// root (co-mounts such as "cpu,cpuacct" are usually reachable by symlinks).
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "cpuset"];

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
            CgroupVersion::V2 => {
                create_v2(root, relative)?;
                vec![("", root.join(relative))]
            }
            CgroupVersion::V1 => {
                let mut dirs: Vec<(&'static str, PathBuf)> = Vec::new();
                for controller in V1_CONTROLLERS {
                    let mount = root.join(controller);
                    if !mount.is_dir() {
                        debug!(mount = %mount.display(), "cgroup v1 hierarchy not mounted, skipped");
                        continue;
                    }
                    // Resolves a co-mount's symlink, so "cpu" and "cpuacct"
                    // pointing at "cpu,cpuacct" become one directory.
                    let mount = fs::canonicalize(&mount).map_err(io_err("resolve", &mount))?;
                    let dir = mount.join(relative);
                    if !dirs.iter().any(|(_, known)| *known == dir) {
                        create_v1(&mount, relative)?;
                    }
                    dirs.push((controller, dir));
                }
                if dirs.is_empty() {
                    return Err(CgroupError::NoHierarchy {
                        root: root.to_path_buf(),
                    });
                }
                dirs
            }
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
            CgroupVersion::V2 => {
                let dir = self.v2_dir().to_path_buf();
                let writes =
                    v2_writes(resources).map_err(|reason| CgroupError::InvalidResources {
                        path: dir.clone(),
                        reason,
                    })?;
                for (file, value) in writes {
                    write_if_present(&dir, &file, &value)?;
                }
            }
            CgroupVersion::V1 => {
                let current_memsw = match self.controller_dir("memory") {
                    Some(dir) => read_u64(&dir.join("memory.memsw.limit_in_bytes"))?,
                    None => None,
                };
                let writes = v1_writes(resources, current_memsw).map_err(|reason| {
                    CgroupError::InvalidResources {
                        path: self.relative.clone(),
                        reason,
                    }
                })?;
                for (controller, file, value) in writes {
                    match self.controller_dir(controller) {
                        Some(dir) => write_if_present(dir, file, &value)?,
                        None => debug!(controller, file, value, "no such v1 hierarchy, skipped"),
                    }
                }
            }
        }
        Ok(())
    }

    /// Current usage. Counters of a controller that is not there read as 0.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        self.check_exists()?;
        let (cpu_usage_ns, memory_usage_bytes, memory_stat, pids) = match self.version {
            CgroupVersion::V2 => {
                let dir = self.v2_dir();
                let usage_usec = read_keyed(&dir.join("cpu.stat"), "usage_usec")?.unwrap_or(0);
                (
                    usage_usec.saturating_mul(1000),
                    read_u64(&dir.join("memory.current"))?.unwrap_or(0),
                    read_keyed_all(&dir.join("memory.stat"))?,
                    read_u64(&dir.join("pids.current"))?.unwrap_or(0),
                )
            }
            CgroupVersion::V1 => {
                let file = |controller: &str, name: &str| {
                    self.controller_dir(controller).map(|dir| dir.join(name))
                };
                let u64_in = |path: Option<PathBuf>| match path {
                    Some(path) => read_u64(&path).map(Option::unwrap_or_default),
                    None => Ok(0),
                };
                let memory_stat = match file("memory", "memory.stat") {
                    Some(path) => read_keyed_all(&path)?,
                    None => BTreeMap::new(),
                };
                (
                    u64_in(file("cpuacct", "cpuacct.usage"))?,
                    u64_in(file("memory", "memory.usage_in_bytes"))?,
                    memory_stat,
                    u64_in(file("pids", "pids.current"))?,
                )
            }
        };
        // v1's memory.stat has hierarchical totals under total_*; v2's are
        // hierarchical already.
        let (rss_key, inactive_key) = match self.version {
            CgroupVersion::V2 => ("anon", "inactive_file"),
            CgroupVersion::V1 => ("total_rss", "total_inactive_file"),
        };
        let stat = |key: &str| memory_stat.get(key).copied().unwrap_or(0);
        Ok(CgroupStats {
            cpu_usage_ns,
            memory_usage_bytes,
            memory_working_set_bytes: memory_usage_bytes.saturating_sub(stat(inactive_key)),
            memory_rss_bytes: stat(rss_key),
            pids,
        })
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
            let entries = match fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(err) => return Err(io_err("list", dir)(err)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err("list", dir))?;
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), pids)?;
                }
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

fn create_v2(root: &Path, relative: &Path) -> Result<(), CgroupError> {
    let mut parent = root.to_path_buf();
    for component in relative.components() {
        enable_controllers(&parent)?;
        let child = parent.join(component);
        make_dir(&child)?;
        parent = child;
    }
    Ok(())
}

/// Delegates to `dir`'s children those of our controllers `dir` has itself.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let offered_path = dir.join("cgroup.controllers");
    let offered = read_string(&offered_path)?.unwrap_or_default();
    let enabled_path = dir.join("cgroup.subtree_control");
    let enabled = read_string(&enabled_path)?.unwrap_or_default();
    for controller in V2_CONTROLLERS {
        let has = |list: &str| list.split_whitespace().any(|c| c == controller);
        if !has(&offered) {
            debug!(dir = %dir.display(), controller, "controller not offered, not enabled");
        } else if !has(&enabled) {
            write_file(&enabled_path, &format!("+{controller}"))?;
        }
    }
    Ok(())
}

fn create_v1(mount: &Path, relative: &Path) -> Result<(), CgroupError> {
    let mut parent = mount.to_path_buf();
    for component in relative.components() {
        let child = parent.join(component);
        make_dir(&child)?;
        copy_cpuset(&parent, &child)?;
        parent = child;
    }
    Ok(())
}

/// A new v1 cpuset cgroup starts with empty cpus and mems, and no task can
/// join it until they are set: take the parent's.
fn copy_cpuset(parent: &Path, child: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let Some(value) = read_string(&parent.join(file))? else {
            return Ok(()); // not a cpuset hierarchy
        };
        let child_file = child.join(file);
        if read_string(&child_file)?
            .unwrap_or_default()
            .trim()
            .is_empty()
        {
            write_file(&child_file, value.trim())?;
        }
    }
    Ok(())
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(io_err("create", dir)(err)),
    }
}

/// Removes `dir` and the cgroups below it. cgroupfs directories hold only
/// the kernel's files, which go with them.
fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io_err("list", dir)(err)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
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
fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
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
fn write_if_exists(path: &Path, value: &str) -> Result<bool, CgroupError> {
    match write_file(path, value) {
        Ok(()) => Ok(true),
        Err(CgroupError::Io {
            op: "open", source, ..
        }) if source.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err),
    }
}

fn write_if_present(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    if write_if_exists(&path, value)? {
        debug!(path = %path.display(), value, "cgroup file written");
    } else {
        debug!(path = %path.display(), value, "not on this hierarchy, skipped");
    }
    Ok(())
}

/// The file's content, None if it is not there.
fn read_string(path: &Path) -> Result<Option<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(content) => Ok(Some(content)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(io_err("read", path)(err)),
    }
}

fn parse_error(path: &Path, reason: String) -> CgroupError {
    CgroupError::Parse {
        path: path.to_path_buf(),
        reason,
    }
}

/// A single-number file; None if it is not there.
fn read_u64(path: &Path) -> Result<Option<u64>, CgroupError> {
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
fn read_keyed_all(path: &Path) -> Result<BTreeMap<String, u64>, CgroupError> {
    let content = read_string(path)?.unwrap_or_default();
    parse_keyed(&content).map_err(|reason| parse_error(path, reason))
}

fn read_keyed(path: &Path, key: &str) -> Result<Option<u64>, CgroupError> {
    Ok(read_keyed_all(path)?.get(key).copied())
}

fn parse_keyed(content: &str) -> Result<BTreeMap<String, u64>, String> {
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
fn read_pids(path: &Path) -> Result<Option<Vec<i32>>, CgroupError> {
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

/// runc's conversion of v1 cpu.shares [2, 262144] to v2 cpu.weight
/// [1, 10000].
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// OCI's swap is memory+swap (v1's memsw); v2's memory.swap.max is swap
/// alone. As runc: None leaves it, "max" for unlimited.
fn v2_swap_max(limit: Option<i64>, swap: Option<i64>) -> Result<Option<String>, String> {
    let (limit, swap) = (limit.unwrap_or(0), swap.unwrap_or(0));
    match (limit, swap) {
        // Unlimited memory means unlimited swap unless told otherwise.
        (-1, 0) | (_, -1) => Ok(Some("max".to_string())),
        (_, 0) => Ok(None),
        (0 | -1, _) => Err("a swap limit needs a memory limit".to_string()),
        (limit, swap) if swap < limit => Err(format!(
            "memory+swap limit {swap} is below the memory limit {limit}"
        )),
        (limit, swap) => Ok(Some((swap - limit).to_string())),
    }
}

/// -1 (or any negative) means unlimited: "max" on v2.
fn v2_limit(value: i64) -> String {
    if value < 0 {
        "max".to_string()
    } else {
        value.to_string()
    }
}

/// The (file, value) writes for `resources` on v2, in order.
fn v2_writes(resources: &LinuxResources) -> Result<Vec<(String, String)>, String> {
    let mut writes: Vec<(String, String)> = Vec::new();
    let mut write = |file: &str, value: String| writes.push((file.to_string(), value));
    if let Some(memory) = resources.memory() {
        if let Some(swap) = v2_swap_max(memory.limit(), memory.swap())? {
            write("memory.swap.max", swap);
        }
        if let Some(limit) = memory.limit().filter(|&limit| limit != 0) {
            write("memory.max", v2_limit(limit));
        }
        if let Some(reservation) = memory.reservation().filter(|&r| r != 0) {
            write("memory.low", v2_limit(reservation));
        }
        #[allow(deprecated)] // kernel: reading it, to say we ignore it
        let kernel = memory.kernel();
        if kernel.is_some() || memory.kernel_tcp().is_some() {
            debug!("kernel memory limits do not exist on cgroup v2, skipped");
        }
        if memory.swappiness().is_some() || memory.disable_oom_killer().is_some() {
            debug!("memory swappiness / disableOOMKiller do not exist on cgroup v2, skipped");
        }
    }
    if let Some(cpu) = resources.cpu() {
        if let Some(shares) = cpu.shares().filter(|&s| s != 0) {
            write("cpu.weight", shares_to_weight(shares).to_string());
        }
        let (quota, period) = (cpu.quota().unwrap_or(0), cpu.period().unwrap_or(0));
        if quota != 0 || period != 0 {
            // "max" or the quota, then the period if given (else the
            // kernel keeps its own).
            let mut max = if quota > 0 {
                quota.to_string()
            } else {
                "max".to_string()
            };
            if period != 0 {
                max = format!("{max} {period}");
            }
            write("cpu.max", max);
        }
        if let Some(burst) = cpu.burst() {
            write("cpu.max.burst", burst.to_string());
        }
        if let Some(idle) = cpu.idle() {
            write("cpu.idle", idle.to_string());
        }
        if cpu.realtime_runtime().is_some() || cpu.realtime_period().is_some() {
            debug!("realtime cpu limits do not exist on cgroup v2, skipped");
        }
        for (file, value) in cpuset_writes(cpu.cpus(), cpu.mems()) {
            write(file, value);
        }
    }
    if let Some(pids) = resources.pids() {
        if pids.limit() != 0 {
            write("pids.max", v2_limit(pids.limit()));
        }
    }
    if let Some(unified) = resources.unified() {
        for (file, value) in unified {
            // A file of this cgroup, never a path out of it.
            if file.is_empty() || file.contains('/') || file.starts_with('.') {
                return Err(format!("unified key {file:?} is not a cgroup file name"));
            }
            write(file, value.clone());
        }
    }
    log_unsupported(resources);
    Ok(writes)
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

/// The (hierarchy, file, value) writes for `resources` on v1, in order.
/// `current_memsw` is memory.memsw.limit_in_bytes now: memory must stay
/// below memory+swap at every step, which orders the two writes.
fn v1_writes(
    resources: &LinuxResources,
    current_memsw: Option<u64>,
) -> Result<Vec<(&'static str, &'static str, String)>, String> {
    let mut writes: Vec<(&'static str, &'static str, String)> = Vec::new();
    if let Some(memory) = resources.memory() {
        let limit = memory.limit().unwrap_or(0);
        let mut swap = memory.swap().unwrap_or(0);
        if limit == -1 && swap == 0 {
            swap = -1; // unlimited memory: unlimited memory+swap, as runc
        }
        if limit > 0 && swap > 0 && swap < limit {
            return Err(format!(
                "memory+swap limit {swap} is below the memory limit {limit}"
            ));
        }
        let limit_write = ("memory", "memory.limit_in_bytes", limit.to_string());
        let swap_write = ("memory", "memory.memsw.limit_in_bytes", swap.to_string());
        let raising_swap = swap == -1 || current_memsw.is_some_and(|now| now < swap as u64);
        match (limit != 0, swap != 0) {
            (true, true) if raising_swap => writes.extend([swap_write, limit_write]),
            (true, true) => writes.extend([limit_write, swap_write]),
            (true, false) => writes.push(limit_write),
            (false, true) => writes.push(swap_write),
            (false, false) => {}
        }
        if let Some(reservation) = memory.reservation().filter(|&r| r != 0) {
            writes.push((
                "memory",
                "memory.soft_limit_in_bytes",
                reservation.to_string(),
            ));
        }
        if let Some(swappiness) = memory.swappiness() {
            writes.push(("memory", "memory.swappiness", swappiness.to_string()));
        }
        if memory.disable_oom_killer() == Some(true) {
            writes.push(("memory", "memory.oom_control", "1".to_string()));
        }
        #[allow(deprecated)] // kernel: reading it, to say we ignore it
        let kernel = memory.kernel();
        if kernel.is_some() || memory.kernel_tcp().is_some() {
            debug!("kernel memory limits are obsolete, skipped");
        }
    }
    if let Some(cpu) = resources.cpu() {
        if let Some(shares) = cpu.shares().filter(|&s| s != 0) {
            writes.push(("cpu", "cpu.shares", shares.to_string()));
        }
        // The period first: the kernel checks the quota against it.
        if let Some(period) = cpu.period().filter(|&p| p != 0) {
            writes.push(("cpu", "cpu.cfs_period_us", period.to_string()));
        }
        if let Some(quota) = cpu.quota().filter(|&q| q != 0) {
            writes.push(("cpu", "cpu.cfs_quota_us", quota.to_string()));
        }
        if let Some(burst) = cpu.burst() {
            writes.push(("cpu", "cpu.cfs_burst_us", burst.to_string()));
        }
        if let Some(idle) = cpu.idle() {
            writes.push(("cpu", "cpu.idle", idle.to_string()));
        }
        // The period first here too.
        if let Some(period) = cpu.realtime_period().filter(|&p| p != 0) {
            writes.push(("cpu", "cpu.rt_period_us", period.to_string()));
        }
        if let Some(runtime) = cpu.realtime_runtime().filter(|&r| r != 0) {
            writes.push(("cpu", "cpu.rt_runtime_us", runtime.to_string()));
        }
        for (file, value) in cpuset_writes(cpu.cpus(), cpu.mems()) {
            writes.push(("cpuset", file, value));
        }
    }
    if let Some(pids) = resources.pids() {
        match pids.limit() {
            0 => {}
            limit if limit < 0 => writes.push(("pids", "pids.max", "max".to_string())),
            limit => writes.push(("pids", "pids.max", limit.to_string())),
        }
    }
    if resources.unified().as_ref().is_some_and(|u| !u.is_empty()) {
        debug!("unified (cgroup v2) resources on cgroup v1, skipped");
    }
    log_unsupported(resources);
    Ok(writes)
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
    //! Real cgroups on this machine, as root: v1 through the system's
    //! hierarchies when they are v1, v2 on a controller-less cgroup2 mount
    //! (/sys/fs/cgroup/unified on a hybrid host). Tests that cannot run here
    //! say so and pass.

    use std::io::Write as _;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources,
        LinuxResourcesBuilder,
    };

    use super::*;

    const MIB: i64 = 1 << 20;

    /// A unique top-level test cgroup, killed and removed (with all below
    /// it) on drop, even when the test fails.
    struct TestTree {
        hierarchy: Hierarchy,
        top: Cgroup,
    }

    impl TestTree {
        fn new(hierarchy: Hierarchy) -> TestTree {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            let name = format!(
                "husk-test-{}-{nanos:x}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let top = Cgroup::create_in(&hierarchy, Path::new(&name)).unwrap();
            TestTree { hierarchy, top }
        }

        fn child(&self, name: &str) -> Cgroup {
            Cgroup::create_in(&self.hierarchy, &self.top.relative().join(name)).unwrap()
        }
    }

    impl Drop for TestTree {
        fn drop(&mut self) {
            if let Err(err) = self.top.kill_all() {
                eprintln!("cleanup: {err}");
            }
            if let Err(err) = self.top.remove() {
                eprintln!("cleanup: {err}");
            }
        }
    }

    fn is_root() -> bool {
        nix::unistd::Uid::effective().is_root()
    }

    /// The system's hierarchy if it is v1 and we may use it.
    fn v1() -> Option<Hierarchy> {
        let hierarchy = Hierarchy::detect();
        if !is_root() || hierarchy.version() != CgroupVersion::V1 {
            eprintln!("skipped: needs root on a cgroup v1 host");
            return None;
        }
        Some(hierarchy)
    }

    /// A cgroup2 mount: the system's if it is v2, else the hybrid host's
    /// /sys/fs/cgroup/unified.
    fn v2() -> Option<Hierarchy> {
        let system = Hierarchy::detect();
        let hierarchy = if system.version() == CgroupVersion::V2 {
            system
        } else {
            Hierarchy::detect_at(Path::new("/sys/fs/cgroup/unified"))
        };
        if !is_root() || hierarchy.version() != CgroupVersion::V2 {
            eprintln!("skipped: needs root and a cgroup2 mount");
            return None;
        }
        Some(hierarchy)
    }

    /// `script` in sh, held until released, so that it runs in the cgroup
    /// it is added to meanwhile.
    fn held(script: &str) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg(format!("read _; {script}"))
            .stdin(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn release(child: &mut Child) {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
    }

    fn read(cgroup: &Cgroup, controller: &str, file: &str) -> String {
        let dir = cgroup.controller_dir(controller).unwrap();
        fs::read_to_string(dir.join(file))
            .unwrap()
            .trim()
            .to_string()
    }

    fn resources(memory: i64, pids: i64) -> LinuxResources {
        LinuxResourcesBuilder::default()
            .memory(LinuxMemoryBuilder::default().limit(memory).build().unwrap())
            .pids(LinuxPidsBuilder::default().limit(pids).build().unwrap())
            .build()
            .unwrap()
    }

    #[test]
    fn v1_create_apply_join_kill_remove() {
        let Some(hierarchy) = v1() else { return };
        let tree = TestTree::new(hierarchy.clone());
        let cgroup = tree.child("x");
        // Idempotent.
        Cgroup::create_in(&hierarchy, cgroup.relative()).unwrap();
        assert_eq!(cgroup.procs_files().len(), cgroup.paths().len());
        for dir in cgroup.paths() {
            assert!(dir.is_dir(), "{dir:?}");
        }
        assert_ne!(read(&cgroup, "cpuset", "cpuset.cpus"), "");
        assert_ne!(read(&cgroup, "cpuset", "cpuset.mems"), "");

        let mut resources = resources(64 * MIB, 32);
        resources.set_cpu(Some(
            LinuxCpuBuilder::default()
                .shares(512u64)
                .quota(50_000i64)
                .period(100_000u64)
                .cpus("0")
                .mems("0")
                .build()
                .unwrap(),
        ));
        cgroup.apply(&resources).unwrap();
        assert_eq!(read(&cgroup, "memory", "memory.limit_in_bytes"), "67108864");
        assert_eq!(read(&cgroup, "pids", "pids.max"), "32");
        assert_eq!(read(&cgroup, "cpu", "cpu.shares"), "512");
        assert_eq!(read(&cgroup, "cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(read(&cgroup, "cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(read(&cgroup, "cpuset", "cpuset.cpus"), "0");
        // Unlimited again; memory+swap follows an unlimited memory limit.
        cgroup.apply(&resources_unlimited()).unwrap();
        assert_eq!(read(&cgroup, "pids", "pids.max"), "max");
        assert_ne!(read(&cgroup, "memory", "memory.limit_in_bytes"), "67108864");

        let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = sleeper.id() as i32;
        cgroup.add_process(pid).unwrap();
        assert_eq!(cgroup.pids().unwrap(), vec![pid]);
        for procs in cgroup.procs_files() {
            assert_eq!(fs::read_to_string(&procs).unwrap().trim(), pid.to_string());
        }
        assert_eq!(cgroup.stats().unwrap().pids, 1);

        cgroup.kill_all().unwrap();
        assert_eq!(cgroup.pids().unwrap(), Vec::<i32>::new());
        assert_eq!(sleeper.wait().unwrap().signal(), Some(libc::SIGKILL));

        cgroup.remove().unwrap();
        for dir in cgroup.paths() {
            assert!(!dir.exists(), "{dir:?}");
        }
        // Already gone is fine.
        cgroup.remove().unwrap();
        cgroup.kill_all().unwrap();
        assert!(cgroup.stats().is_err());
    }

    fn resources_unlimited() -> LinuxResources {
        resources(-1, -1)
    }

    #[test]
    fn v1_memory_swap_limits_in_both_orders() {
        let Some(hierarchy) = v1() else { return };
        let tree = TestTree::new(hierarchy);
        let cgroup = tree.child("x");
        if !cgroup
            .controller_dir("memory")
            .unwrap()
            .join("memory.memsw.limit_in_bytes")
            .exists()
        {
            eprintln!("skipped: no swap accounting");
            return;
        }
        let memory = |limit: i64, swap: i64| {
            LinuxResourcesBuilder::default()
                .memory(
                    LinuxMemoryBuilder::default()
                        .limit(limit)
                        .swap(swap)
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap()
        };
        // Down from unlimited: the limit goes first.
        cgroup.apply(&memory(32 * MIB, 48 * MIB)).unwrap();
        assert_eq!(
            read(&cgroup, "memory", "memory.limit_in_bytes"),
            (32 * MIB).to_string()
        );
        assert_eq!(
            read(&cgroup, "memory", "memory.memsw.limit_in_bytes"),
            (48 * MIB).to_string()
        );
        // Up above the current memory+swap: memory+swap goes first.
        cgroup.apply(&memory(64 * MIB, 96 * MIB)).unwrap();
        assert_eq!(
            read(&cgroup, "memory", "memory.limit_in_bytes"),
            (64 * MIB).to_string()
        );
        assert_eq!(
            read(&cgroup, "memory", "memory.memsw.limit_in_bytes"),
            (96 * MIB).to_string()
        );
        // Down again, below the current memory limit.
        cgroup.apply(&memory(16 * MIB, 16 * MIB)).unwrap();
        assert_eq!(
            read(&cgroup, "memory", "memory.memsw.limit_in_bytes"),
            (16 * MIB).to_string()
        );
        // Inconsistent.
        assert!(matches!(
            cgroup.apply(&memory(32 * MIB, 16 * MIB)),
            Err(CgroupError::InvalidResources { .. })
        ));
    }

    #[test]
    fn v1_cpu_usage_moves() {
        let Some(hierarchy) = v1() else { return };
        let tree = TestTree::new(hierarchy);
        let cgroup = tree.child("x");
        let before = cgroup.stats().unwrap();
        let mut burner = held("i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done");
        cgroup.add_process(burner.id() as i32).unwrap();
        release(&mut burner);
        assert!(burner.wait().unwrap().success());
        let after = cgroup.stats().unwrap();
        assert!(
            after.cpu_usage_ns > before.cpu_usage_ns + 10_000_000,
            "{before:?} -> {after:?}"
        );
        assert_eq!(after.pids, 0);
    }

    #[test]
    fn v1_oom_kill_is_counted() {
        let Some(hierarchy) = v1() else { return };
        let tree = TestTree::new(hierarchy);
        let cgroup = tree.child("x");
        cgroup.apply(&resources(16 * MIB, 64)).unwrap();
        assert_eq!(cgroup.oom_kills().unwrap(), 0);
        // The shell keeps ~100 MB in a variable.
        let mut hog = held(r#"x=$(head -c 100000000 /dev/zero | tr '\0' a); echo ${#x}"#);
        cgroup.add_process(hog.id() as i32).unwrap();
        release(&mut hog);
        let status = hog.wait().unwrap();
        assert!(!status.success(), "{status:?}");
        assert!(cgroup.oom_kills().unwrap() >= 1);
        cgroup.kill_all().unwrap();
        assert!(cgroup.pids().unwrap().is_empty());
    }

    #[test]
    fn v1_memory_usage_is_seen() {
        let Some(hierarchy) = v1() else { return };
        let tree = TestTree::new(hierarchy);
        let cgroup = tree.child("x");
        // ~8 MB in a shell variable, kept while it sleeps.
        let mut holder = held(r#"x=$(head -c 8000000 /dev/zero | tr '\0' a); sleep 30"#);
        cgroup.add_process(holder.id() as i32).unwrap();
        release(&mut holder);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stats = cgroup.stats().unwrap();
        // Until head and tr are done and gone.
        while (stats.memory_rss_bytes < 8_000_000 || stats.pids != 2) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            stats = cgroup.stats().unwrap();
        }
        assert!(stats.memory_rss_bytes >= 8_000_000, "{stats:?}");
        assert!(
            stats.memory_usage_bytes >= stats.memory_rss_bytes,
            "{stats:?}"
        );
        assert!(stats.memory_working_set_bytes <= stats.memory_usage_bytes);
        assert!(stats.memory_working_set_bytes >= 8_000_000, "{stats:?}");
        assert_eq!(stats.pids, 2, "{stats:?}"); // sh and its sleep
        cgroup.kill_all().unwrap();
        assert_eq!(holder.wait().unwrap().signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn v1_kill_all_gets_forks_and_descendant_cgroups() {
        let Some(hierarchy) = v1() else { return };
        let tree = TestTree::new(hierarchy);
        let cgroup = tree.child("x");
        let inner = tree.child("x/inner");
        let mut forker = held("sleep 30 & sleep 30 & wait");
        cgroup.add_process(forker.id() as i32).unwrap();
        release(&mut forker);
        let mut nested = Command::new("sleep").arg("30").spawn().unwrap();
        inner.add_process(nested.id() as i32).unwrap();
        // Give sh time to fork both sleeps.
        let deadline = Instant::now() + Duration::from_secs(5);
        while cgroup.pids().unwrap().len() < 3 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(cgroup.pids().unwrap().len(), 3);

        cgroup.kill_all().unwrap();
        assert!(cgroup.pids().unwrap().is_empty());
        assert!(inner.pids().unwrap().is_empty());
        assert_eq!(forker.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert_eq!(nested.wait().unwrap().signal(), Some(libc::SIGKILL));
        // Children first.
        cgroup.remove().unwrap();
        for dir in inner.paths().into_iter().chain(cgroup.paths()) {
            assert!(!dir.exists(), "{dir:?}");
        }
    }

    #[test]
    fn v2_on_a_controllerless_mount() {
        let Some(hierarchy) = v2() else { return };
        let tree = TestTree::new(hierarchy.clone());
        let cgroup = tree.child("x");
        Cgroup::create_in(&hierarchy, cgroup.relative()).unwrap();
        assert_eq!(
            cgroup.procs_files(),
            vec![cgroup.paths()[0].join("cgroup.procs")]
        );
        // Controller files that are not there are skipped, not errors.
        let mut resources = resources(64 * MIB, 32);
        resources.set_cpu(Some(
            LinuxCpuBuilder::default().shares(512u64).build().unwrap(),
        ));
        cgroup.apply(&resources).unwrap();
        let dir = &cgroup.paths()[0];
        if dir.join("pids.max").exists() {
            assert_eq!(
                fs::read_to_string(dir.join("pids.max")).unwrap().trim(),
                "32"
            );
        }

        let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = sleeper.id() as i32;
        cgroup.add_process(pid).unwrap();
        assert_eq!(cgroup.pids().unwrap(), vec![pid]);
        let mut burner = held("i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done");
        cgroup.add_process(burner.id() as i32).unwrap();
        release(&mut burner);
        assert!(burner.wait().unwrap().success());
        let stats = cgroup.stats().unwrap();
        if dir.join("cpu.stat").exists() {
            assert!(stats.cpu_usage_ns > 10_000_000, "{stats:?}");
        }
        assert_eq!(cgroup.oom_kills().unwrap(), 0);

        cgroup.kill_all().unwrap();
        assert!(cgroup.pids().unwrap().is_empty());
        assert_eq!(sleeper.wait().unwrap().signal(), Some(libc::SIGKILL));
        cgroup.remove().unwrap();
        assert!(!dir.exists());
        cgroup.kill_all().unwrap();
    }

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

    #[test]
    fn shares_convert_to_weight_as_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1), 1);
        assert_eq!(shares_to_weight(u64::MAX), 10_000);
    }

    #[test]
    fn v2_writes_as_runc() {
        let cpu = |quota: Option<i64>, period: Option<u64>| {
            let mut cpu = LinuxCpuBuilder::default().shares(1024u64);
            if let Some(quota) = quota {
                cpu = cpu.quota(quota);
            }
            if let Some(period) = period {
                cpu = cpu.period(period);
            }
            let resources = LinuxResourcesBuilder::default()
                .cpu(cpu.build().unwrap())
                .build()
                .unwrap();
            v2_writes(&resources).unwrap()
        };
        let w = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(f, v)| (f.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cpu(Some(50_000), Some(100_000)),
            w(&[("cpu.weight", "39"), ("cpu.max", "50000 100000")])
        );
        assert_eq!(cpu(Some(-1), Some(100_000))[1].1, "max 100000");
        assert_eq!(cpu(Some(20_000), None)[1].1, "20000");
        assert_eq!(cpu(None, None).len(), 1);

        let memory = |limit: i64, swap: Option<i64>| {
            let mut memory = LinuxMemoryBuilder::default().limit(limit);
            if let Some(swap) = swap {
                memory = memory.swap(swap);
            }
            let resources = LinuxResourcesBuilder::default()
                .memory(memory.build().unwrap())
                .pids(LinuxPidsBuilder::default().limit(-1).build().unwrap())
                .build()
                .unwrap();
            v2_writes(&resources)
        };
        assert_eq!(
            memory(64 * MIB, None).unwrap(),
            w(&[("memory.max", "67108864"), ("pids.max", "max")])
        );
        assert_eq!(
            memory(64 * MIB, Some(96 * MIB)).unwrap(),
            w(&[
                ("memory.swap.max", "33554432"),
                ("memory.max", "67108864"),
                ("pids.max", "max")
            ])
        );
        assert_eq!(
            memory(-1, None).unwrap()[0],
            w(&[("memory.swap.max", "max")])[0]
        );
        assert!(memory(64 * MIB, Some(32 * MIB)).is_err());
        assert!(memory(0, Some(32 * MIB)).is_err());

        let unified = |key: &str| {
            let resources = LinuxResourcesBuilder::default()
                .unified(
                    [(key.to_string(), "1".to_string())]
                        .into_iter()
                        .collect::<std::collections::HashMap<_, _>>(),
                )
                .build()
                .unwrap();
            v2_writes(&resources)
        };
        assert_eq!(
            unified("memory.oom.group").unwrap(),
            w(&[("memory.oom.group", "1")])
        );
        assert!(unified("../../escape").is_err());
    }

    #[test]
    fn keyed_files_parse() {
        let map = parse_keyed("usage_usec 12\nuser_usec 7\n\n").unwrap();
        assert_eq!(map.get("usage_usec"), Some(&12));
        assert!(parse_keyed("oops").is_err());
        assert!(parse_keyed("key notanumber").is_err());
    }
}
