//! cgroup v1: one hierarchy per controller (co-mounts such as
//! "cpu,cpuacct" share one), the cgroup made in each, cpusets copied down,
//! memory and memory+swap limits ordered so that memory never exceeds
//! memory+swap.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;
use tracing::debug;

use super::files::{make_dir, read_keyed_all, read_string, read_u64, write_file, write_if_present};
use super::{cpuset_writes, io_err, log_unsupported, Cgroup, CgroupError, CgroupStats};

/// The v1 hierarchies we use, by the directory they are mounted at below the
/// root (co-mounts such as "cpu,cpuacct" are usually reachable by symlinks).
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "cpuset"];

/// Makes `relative` in each v1 hierarchy mounted below `root`; the
/// directories, by controller (co-mounted ones share theirs).
pub(super) fn create(
    root: &Path,
    relative: &Path,
) -> Result<Vec<(&'static str, PathBuf)>, CgroupError> {
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
    Ok(dirs)
}

/// Applies `resources` to `cgroup`, each file in its controller's hierarchy.
pub(super) fn apply(cgroup: &Cgroup, resources: &LinuxResources) -> Result<(), CgroupError> {
    let current_memsw = match cgroup.controller_dir("memory") {
        Some(dir) => read_u64(&dir.join("memory.memsw.limit_in_bytes"))?,
        None => None,
    };
    let writes =
        v1_writes(resources, current_memsw).map_err(|reason| CgroupError::InvalidResources {
            path: cgroup.relative.clone(),
            reason,
        })?;
    for (controller, file, value) in writes {
        match cgroup.controller_dir(controller) {
            Some(dir) => write_if_present(dir, file, &value)?,
            None => debug!(controller, file, value, "no such v1 hierarchy, skipped"),
        }
    }
    Ok(())
}

/// The cgroup's usage; memory.stat's hierarchical totals are its total_*.
pub(super) fn stats(cgroup: &Cgroup) -> Result<CgroupStats, CgroupError> {
    let file =
        |controller: &str, name: &str| cgroup.controller_dir(controller).map(|dir| dir.join(name));
    let u64_in = |path: Option<PathBuf>| match path {
        Some(path) => read_u64(&path).map(Option::unwrap_or_default),
        None => Ok(0),
    };
    let memory_stat = match file("memory", "memory.stat") {
        Some(path) => read_keyed_all(&path)?,
        None => BTreeMap::new(),
    };
    Ok(CgroupStats::new(
        u64_in(file("cpuacct", "cpuacct.usage"))?,
        u64_in(file("memory", "memory.usage_in_bytes"))?,
        &memory_stat,
        ("total_rss", "total_inactive_file"),
        u64_in(file("pids", "pids.current"))?,
    ))
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

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;
    use std::thread;
    use std::time::{Duration, Instant};

    use super::super::test_support::*;
    use super::super::Cgroup;
    use super::*;

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
}
