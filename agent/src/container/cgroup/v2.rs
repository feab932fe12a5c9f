//! cgroup v2: one directory per cgroup, controllers delegated down the
//! tree through cgroup.subtree_control, limits written as runc writes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;
use tracing::debug;

use super::files::{
    make_dir, read_keyed, read_keyed_all, read_string, read_u64, write_file, write_if_present,
};
use super::{cpuset_writes, log_unsupported, CgroupError, CgroupStats};

/// The v2 controllers we enable for our subtree, when the parent offers them.
const V2_CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "cpuset"];

/// Makes `relative` below the cgroup2 mount `root`; its directory.
pub(super) fn create(root: &Path, relative: &Path) -> Result<PathBuf, CgroupError> {
    create_v2(root, relative)?;
    Ok(root.join(relative))
}

/// Applies `resources` to the cgroup at `dir`.
pub(super) fn apply(dir: &Path, resources: &LinuxResources) -> Result<(), CgroupError> {
    let writes = v2_writes(resources).map_err(|reason| CgroupError::InvalidResources {
        path: dir.to_path_buf(),
        reason,
    })?;
    for (file, value) in writes {
        write_if_present(dir, &file, &value)?;
    }
    Ok(())
}

/// The cgroup's usage (memory.stat is hierarchical already).
pub(super) fn stats(dir: &Path) -> Result<CgroupStats, CgroupError> {
    let usage_usec = read_keyed(&dir.join("cpu.stat"), "usage_usec")?.unwrap_or(0);
    let memory_stat: BTreeMap<String, u64> = read_keyed_all(&dir.join("memory.stat"))?;
    Ok(CgroupStats::new(
        usage_usec.saturating_mul(1000),
        read_u64(&dir.join("memory.current"))?.unwrap_or(0),
        &memory_stat,
        ("anon", "inactive_file"),
        read_u64(&dir.join("pids.current"))?.unwrap_or(0),
    ))
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

/// runc's conversion of v1 cpu.shares [2, 262144] to v2 cpu.weight
/// [1, 10000].
pub(super) fn shares_to_weight(shares: u64) -> u64 {
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

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    use super::super::test_support::*;
    use super::super::Cgroup;
    use super::*;

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
}
