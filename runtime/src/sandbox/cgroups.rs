//! A sandbox's cgroups on the host, in the one cgroup v2 hierarchy or in
//! each v1 hierarchy, and how huskd removes them with whatever is left in
//! them:
//! - host driver: the agent puts the pod's containers below `husk/<sandbox
//!   id>` (agent.proto, SetupSandbox); on the host they are plain processes
//!   that outlive the agent.
//! - microvm driver: husk-vmm and virtiofsd join
//!   `<cgroup_parent>/husk-<sandbox id>` (the pod's cgroup kubelet gave,
//!   where it reads the pod's memory and CPU), else `husk/<sandbox id>`,
//!   before they run: the guest's RAM and the VMM's own are charged there.
use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{ProcStat, SandboxError};

/// Where the host's cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long SIGKILLed processes have to leave their cgroups, and the
/// emptied cgroups to become removable.
const SETTLE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// The cgroup hierarchies below `root`: itself under v2, each mounted one
/// under v1.
fn hierarchies(root: &Path) -> Vec<PathBuf> {
    if root.join("cgroup.controllers").exists() {
        vec![root.to_owned()]
    } else {
        fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .collect()
    }
}

/// Where the host driver's agent puts a pod's containers, below each hierarchy.
pub fn host_pod_cgroup(sandbox: &str) -> PathBuf {
    Path::new("husk").join(sandbox)
}

/// Where a microVM pod's VM (husk-vmm, virtiofsd) goes, below each
/// hierarchy: a cgroup of its own under the pod's cgroup parent, else
/// under husk's. kubelet's systemd driver names the parent as a slice
/// (`kubepods-burstable-pod1.slice`), which is a path of nested slices on
/// disk; its cgroupfs driver gives the path itself.
pub fn vm_cgroup(cgroup_parent: &str, sandbox: &str) -> Result<PathBuf, String> {
    let parent = cgroup_parent.trim_start_matches('/');
    if parent.is_empty() {
        return Ok(host_pod_cgroup(sandbox));
    }
    let parent = match parent.strip_suffix(".slice") {
        Some(name) if !parent.contains('/') => {
            // Each dash-separated prefix is a slice of its own: a-b.slice is
            // in a.slice. "-.slice" is the root.
            let mut path = PathBuf::new();
            if name != "-" {
                let mut prefix = String::new();
                for part in name.split('-') {
                    if part.is_empty() {
                        return Err(format!("cgroup_parent {cgroup_parent:?}: not a slice name"));
                    }
                    if !prefix.is_empty() {
                        prefix.push('-');
                    }
                    prefix.push_str(part);
                    path.push(format!("{prefix}.slice"));
                }
            }
            path
        }
        _ => PathBuf::from(parent),
    };
    if parent
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!(
            "cgroup_parent {cgroup_parent:?}: only plain names may make up the path"
        ));
    }
    Ok(parent.join(format!("husk-{sandbox}")))
}

/// The cgroup `relative` below each hierarchy, made where missing and
/// ready for processes to join it before they run.
pub struct VmCgroup {
    /// Each hierarchy's `cgroup.procs` of the cgroup, open for writing.
    procs: Arc<Vec<fs::File>>,
}

impl VmCgroup {
    /// Makes `relative` (and its missing parents) below every hierarchy
    /// under `root`. On v1 a new cpuset cgroup gets its parent's CPUs and
    /// memory nodes (it has none of its own and could take no process); on
    /// v2 each ancestor hands the cpu, memory and pids controllers down,
    /// so the VM is accounted there.
    pub fn create(root: &Path, relative: &Path) -> io::Result<VmCgroup> {
        let v2 = root.join("cgroup.controllers").exists();
        let mut procs = Vec::new();
        let mut seen = HashSet::new();
        for hierarchy in hierarchies(root) {
            let Ok(hierarchy) = fs::canonicalize(&hierarchy) else {
                continue;
            };
            if !hierarchy.join("cgroup.procs").exists() || !seen.insert(hierarchy.clone()) {
                continue;
            }
            let mut dir = hierarchy;
            for part in relative.components() {
                if v2 {
                    for controller in ["+cpu", "+memory", "+pids"] {
                        // Refused where a controller is missing or the
                        // cgroup has processes of its own: then it is
                        // accounted further up, which is all v2 allows.
                        let _ = fs::write(dir.join("cgroup.subtree_control"), controller);
                    }
                }
                let parent = dir.clone();
                dir.push(part);
                match fs::create_dir(&dir) {
                    Ok(()) if !v2 => inherit_cpuset(&parent, &dir)?,
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(with_path(e, &dir)),
                }
            }
            let path = dir.join("cgroup.procs");
            procs.push(
                fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| with_path(e, &path))?,
            );
        }
        Ok(VmCgroup {
            procs: Arc::new(procs),
        })
    }

    /// Makes `command`'s process join the cgroup between fork and exec, so
    /// that all it ever allocates is charged there.
    pub fn join_on_exec(&self, command: &mut tokio::process::Command) {
        let procs = self.procs.clone();
        let join = move || {
            for file in procs.iter() {
                // "0" is the writer itself. Only a write(2) here: the child
                // of a threaded process may not allocate.
                // SAFETY: writes one byte from a static buffer to an fd the
                // closure keeps open.
                let written = unsafe { libc::write(file.as_raw_fd(), b"0".as_ptr().cast(), 1) };
                if written != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: the closure only calls write(2), which is async-signal-safe.
        unsafe { command.pre_exec(join) };
    }
}

/// A v1 cpuset cgroup starts with no CPUs and memory nodes; it gets its
/// parent's. A parent without any could take no process either: said so,
/// rather than the ENOSPC a process joining it would get.
fn inherit_cpuset(parent: &Path, dir: &Path) -> io::Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let Ok(own) = fs::read_to_string(dir.join(file)) else {
            continue;
        };
        if own.trim().is_empty() {
            let inherited =
                fs::read_to_string(parent.join(file)).map_err(|e| with_path(e, parent))?;
            if inherited.trim().is_empty() {
                return Err(io::Error::other(format!(
                    "{}: the parent cgroup has no {file}, so no process can join below it",
                    parent.display()
                )));
            }
            fs::write(dir.join(file), inherited.trim()).map_err(|e| with_path(e, dir))?;
        }
    }
    Ok(())
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// The sandbox's cgroup directories that exist: the one of v2, or one per
/// v1 hierarchy (co-mounted hierarchies reached by symlinks count once).
fn pod_cgroups(root: &Path, relative: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for hierarchy in hierarchies(root) {
        if let Ok(dir) = fs::canonicalize(hierarchy.join(relative)) {
            if dir.is_dir() && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

/// `top` and every cgroup below it, children before their parents.
fn subtree(top: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![top.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            }
        }
        out.push(dir);
    }
    // Every cgroup came after its parent: reversed, it comes before.
    out.reverse();
    out
}

/// The processes in one cgroup (a cgroup gone meanwhile has none).
fn procs(cgroup: &Path) -> Vec<i32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// SIGKILLs every process in sandbox `id`'s cgroup `relative` below `root`
/// (in every hierarchy, with the cgroups below it) until none is left (a
/// kernel thread there is waited for), then removes those cgroups. Returns
/// the processes it killed ("pid (name)"), not those that had already
/// exited and were still leaving. Idempotent: without cgroups there is
/// nothing to do.
pub async fn kill_cgroups(
    id: &str,
    root: &Path,
    relative: &Path,
) -> Result<Vec<String>, SandboxError> {
    let tops = pod_cgroups(root, relative);
    let deadline = Instant::now() + SETTLE;
    let mut killed = std::collections::BTreeMap::new();
    loop {
        let left: Vec<(PathBuf, Vec<i32>)> = tops
            .iter()
            .flat_map(|top| subtree(top))
            .map(|cgroup| {
                let pids = procs(&cgroup);
                (cgroup, pids)
            })
            .filter(|(_, pids)| !pids.is_empty())
            .collect();
        let Some((cgroup, pids)) = left.first() else {
            break;
        };
        if Instant::now() >= deadline {
            return Err(SandboxError::Survivors {
                id: id.to_owned(),
                cgroup: cgroup.clone(),
                pids: pids.clone(),
            });
        }
        for &pid in left.iter().flat_map(|(_, pids)| pids) {
            let stat = ProcStat::of(pid as u32);
            // A VM's KVM worker leaves once its VM is destroyed, as the
            // VMM's last reference goes: waited for, not signalled.
            if stat.as_ref().is_some_and(ProcStat::is_kernel_thread) {
                continue;
            }
            // One that has exited is only still leaving: not reported.
            let exiting = stat.is_none_or(|stat| stat.has_exited());
            let name = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() && !exiting {
                killed
                    .entry(pid)
                    .or_insert_with(|| format!("{pid} ({})", name.trim()));
            }
        }
        tokio::time::sleep(POLL).await;
    }
    for cgroup in tops.iter().flat_map(|top| subtree(top)) {
        remove_cgroup(id, &cgroup, deadline).await?;
    }
    Ok(killed.into_values().collect())
}

/// Removes an empty cgroup, retrying while the kernel still calls it busy
/// (its last processes are being torn down).
async fn remove_cgroup(id: &str, cgroup: &Path, deadline: Instant) -> Result<(), SandboxError> {
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(Errno::EBUSY as i32) && Instant::now() < deadline =>
            {
                tokio::time::sleep(POLL).await;
            }
            Err(source) => {
                return Err(SandboxError::Io {
                    id: id.to_owned(),
                    what: format!("removing the cgroup {}", cgroup.display()),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_are_found_per_hierarchy_and_listed_children_first() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        // A v1 layout: two hierarchies, a co-mount reached by a symlink, and
        // a hierarchy without the pod.
        for dir in [
            "memory/husk/pod/c1/x",
            "memory/husk/pod/c2",
            "cpu,cpuacct/husk/pod/c1",
            "pids/husk/other",
        ] {
            fs::create_dir_all(r.join(dir)).expect("mkdir");
        }
        std::os::unix::fs::symlink("cpu,cpuacct", r.join("cpu")).expect("symlink");
        let mut found = pod_cgroups(r, &host_pod_cgroup("pod"));
        found.sort();
        assert_eq!(
            found,
            vec![r.join("cpu,cpuacct/husk/pod"), r.join("memory/husk/pod")]
        );
        let order = subtree(&r.join("memory/husk/pod"));
        let at = |p: &str| order.iter().position(|d| *d == r.join(p)).expect(p);
        assert_eq!(order.len(), 4);
        assert!(at("memory/husk/pod/c1/x") < at("memory/husk/pod/c1"));
        assert!(at("memory/husk/pod/c1") < at("memory/husk/pod"));
        assert!(at("memory/husk/pod/c2") < at("memory/husk/pod"));

        // v2: the one hierarchy.
        fs::write(r.join("cgroup.controllers"), "").expect("v2 marker");
        fs::create_dir_all(r.join("husk/pod")).expect("mkdir");
        assert_eq!(
            pod_cgroups(r, &host_pod_cgroup("pod")),
            vec![r.join("husk/pod")]
        );
        assert!(pod_cgroups(r, &host_pod_cgroup("none")).is_empty());
    }

    #[test]
    fn a_vm_goes_below_its_pods_cgroup_parent() {
        let at = |parent| vm_cgroup(parent, "abc").map(|p| p.display().to_string());
        assert_eq!(at("").as_deref(), Ok("husk/abc"));
        assert_eq!(
            at("/kubepods/burstable/pod1").as_deref(),
            Ok("kubepods/burstable/pod1/husk-abc")
        );
        assert_eq!(
            at("kubepods-burstable-pod1.slice").as_deref(),
            Ok("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/husk-abc")
        );
        assert_eq!(at("-.slice").as_deref(), Ok("husk-abc"));
        assert!(at("/kubepods/../../etc").is_err());
        assert!(at("kubepods--x.slice").is_err());
    }

    #[test]
    fn a_new_v1_cpuset_cgroup_gets_its_parents_cpus_and_nodes() {
        let root = tempfile::tempdir().expect("tempdir");
        let (parent, child) = (root.path(), root.path().join("child"));
        fs::create_dir(&child).expect("mkdir");
        fs::write(parent.join("cpuset.cpus"), "0-1\n").expect("cpus");
        fs::write(parent.join("cpuset.mems"), "0\n").expect("mems");
        // What the kernel makes for a new cpuset cgroup: empty lists.
        fs::write(child.join("cpuset.cpus"), "\n").expect("cpus");
        fs::write(child.join("cpuset.mems"), "").expect("mems");
        inherit_cpuset(parent, &child).expect("inherit");
        assert_eq!(
            fs::read_to_string(child.join("cpuset.cpus")).expect("cpus"),
            "0-1"
        );
        assert_eq!(
            fs::read_to_string(child.join("cpuset.mems")).expect("mems"),
            "0"
        );
        // Another controller's cgroup has no such files: nothing to do.
        let other = root.path().join("other");
        fs::create_dir(&other).expect("mkdir");
        inherit_cpuset(parent, &other).expect("nothing to inherit");
        // A parent with none itself.
        let empty = root.path().join("empty");
        fs::create_dir(&empty).expect("mkdir");
        fs::write(empty.join("cpuset.cpus"), "").expect("cpus");
        fs::write(other.join("cpuset.cpus"), "").expect("cpus");
        let err = inherit_cpuset(&empty, &other).expect_err("nothing to inherit from");
        assert!(err.to_string().contains("no cpuset.cpus"), "{err}");
    }

    #[tokio::test]
    async fn a_vm_cgroup_is_made_in_each_hierarchy_and_joined_before_exec() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        // A v1 layout with a co-mount reached by a symlink. Plain
        // directories get no cgroup.procs from mkdir, so the leaves' are
        // made here, as the kernel would.
        for hierarchy in ["memory", "cpu,cpuacct"] {
            fs::create_dir_all(r.join(hierarchy).join("pods/husk-abc")).expect("mkdir");
            fs::write(r.join(hierarchy).join("cgroup.procs"), "").expect("procs");
            fs::write(r.join(hierarchy).join("pods/husk-abc/cgroup.procs"), "").expect("procs");
        }
        std::os::unix::fs::symlink("cpu,cpuacct", r.join("cpu")).expect("symlink");
        let cgroup = VmCgroup::create(r, Path::new("pods/husk-abc")).expect("create");
        assert_eq!(cgroup.procs.len(), 2, "the co-mount counts once");
        let mut command = tokio::process::Command::new("true");
        cgroup.join_on_exec(&mut command);
        assert!(command.status().await.expect("run").success());
        for hierarchy in ["memory", "cpu,cpuacct"] {
            let procs = r.join(hierarchy).join("pods/husk-abc/cgroup.procs");
            assert_eq!(fs::read_to_string(procs).expect("procs"), "0");
        }
        // A cgroup that cannot be joined fails with its path.
        fs::create_dir(r.join("pids")).expect("mkdir");
        fs::write(r.join("pids/cgroup.procs"), "").expect("procs");
        let err = VmCgroup::create(r, Path::new("pods/husk-abc"))
            .err()
            .expect("a plain directory has no cgroup.procs");
        assert!(
            err.to_string().contains("pids/pods/husk-abc/cgroup.procs"),
            "{err}"
        );
    }
}
