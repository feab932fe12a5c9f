//! What a host-driver pod leaves when its agent dies: the agent puts the
//! pod's containers below the cgroup `husk/<sandbox id>` (agent.proto,
//! SetupSandbox), in the one cgroup v2 hierarchy or in each v1 hierarchy,
//! and on the host they are plain processes that outlive it. Here huskd
//! kills them and removes those cgroups.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::SandboxError;

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

/// The pod's cgroup directories that exist: the one of v2, or one per v1
/// hierarchy (co-mounted hierarchies reached by symlinks count once).
fn pod_cgroups(root: &Path, sandbox: &str) -> Vec<PathBuf> {
    let relative = Path::new("husk").join(sandbox);
    let mut dirs = Vec::new();
    for hierarchy in hierarchies(root) {
        if let Ok(dir) = fs::canonicalize(hierarchy.join(&relative)) {
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

/// SIGKILLs every process in the sandbox's cgroups below `root` until none
/// is left, then removes the cgroups. Returns how many processes it
/// killed. Idempotent: without cgroups there is nothing to do.
pub async fn kill_pod_cgroups(id: &str, root: &Path) -> Result<usize, SandboxError> {
    let tops = pod_cgroups(root, id);
    let deadline = Instant::now() + SETTLE;
    let mut killed = HashSet::new();
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
        for pid in left.iter().flat_map(|(_, pids)| pids) {
            if kill(Pid::from_raw(*pid), Signal::SIGKILL).is_ok() {
                killed.insert(*pid);
            }
        }
        tokio::time::sleep(POLL).await;
    }
    for cgroup in tops.iter().flat_map(|top| subtree(top)) {
        remove_cgroup(id, &cgroup, deadline).await?;
    }
    Ok(killed.len())
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
        let mut found = pod_cgroups(r, "pod");
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
        assert_eq!(pod_cgroups(r, "pod"), vec![r.join("husk/pod")]);
        assert!(pod_cgroups(r, "none").is_empty());
    }
}
