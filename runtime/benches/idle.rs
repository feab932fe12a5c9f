//! What idle pods cost the node's CPU: HUSK_IDLE_BENCH_PODS pods (default 3)
//! of each handler, each running `sleep`, are left alone for
//! HUSK_IDLE_BENCH_SECS seconds (default 30, after 5 s to settle), and the
//! CPU time their processes used meanwhile is read from /proc: for a
//! `microvm` pod its husk-vmm and virtiofsd, for a `host` pod (the baseline
//! beside it) its agent and the pod's processes below it. Reported as % of
//! one core per pod. huskd's own health probes (a Ping every 10 s) are part
//! of what a pod costs and are counted. Nothing is asserted.
//!
//! ```sh
//! cargo build --release --workspace --bins && bash guest-image/build.sh
//! cargo bench -p husk-runtime --bench idle      # as root, /dev/kvm
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::BenchHuskd;

fn main() {
    support::bench_main(bench());
}

async fn bench() {
    let pods = husk_e2e::env_number::<usize>("HUSK_IDLE_BENCH_PODS", 3);
    let secs = husk_e2e::env_number::<u64>("HUSK_IDLE_BENCH_SECS", 30);
    let dir = tempfile::tempdir().expect("tempdir");
    // Kept whole: huskd and what it started go when it drops.
    let mut huskd = BenchHuskd::start(dir.path()).await;
    let (rt, image, state) = (&mut huskd.rt, huskd.image.clone(), huskd.state.clone());

    println!("{pods} idle pods per handler, {secs} s each, after 5 s to settle");
    for handler in ["microvm", "host"] {
        let mut ids = Vec::new();
        for n in 0..pods {
            let (pod, pod_config) =
                support::run_pod(rt, &format!("idle-{handler}-{n}"), handler).await;
            if n == 0 {
                println!("{handler} sandbox: {}", support::pod_info(rt, &pod).await);
            }
            let config = support::container_config("idle", &image, &["sleep", "3600"], "");
            support::run_container(rt, &pod, config, Some(pod_config)).await;
            ids.push(pod);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let sandboxes = state.join("sandboxes");
        let before = cpu_ticks_under(&sandboxes);
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let used = cpu_ticks_under(&sandboxes).saturating_sub(before);
        let wall = t.elapsed().as_secs_f64();
        // SAFETY: sysconf takes a constant and touches no memory of ours.
        let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let percent = used as f64 / ticks_per_sec / wall * 100.0;
        println!(
            "{handler}: {:.2} % of a core for {pods} pods, {:.2} % per pod",
            percent,
            percent / pods as f64
        );
        for pod in &ids {
            support::remove_pod(rt, pod).await;
        }
    }
}

/// utime + stime, in clock ticks, of every process whose command line names
/// a directory below `sandboxes` (husk-vmm, virtiofsd, host agents), and of
/// their children (a host pod's containers).
fn cpu_ticks_under(sandboxes: &Path) -> u64 {
    let needle = sandboxes.display().to_string();
    let mut ours = std::collections::HashSet::new();
    let mut stats = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            ours.insert(pid);
        }
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) {
            stats.push((pid, stat));
        }
    }
    // Fields after the command name: state, ppid, … utime (14th), stime (15th).
    let fields = |stat: &str| -> Vec<u64> {
        stat.rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .map(|f| f.parse().unwrap_or(0))
                    .collect()
            })
            .unwrap_or_default()
    };
    let parsed: Vec<(u32, Vec<u64>)> = stats.iter().map(|(pid, s)| (*pid, fields(s))).collect();
    // A pod's processes descend from its agent: follow parents a few times.
    for _ in 0..4 {
        for (pid, f) in &parsed {
            if f.len() > 1 && ours.contains(&(f[1] as u32)) {
                ours.insert(*pid);
            }
        }
    }
    parsed
        .iter()
        .filter(|(pid, f)| ours.contains(pid) && f.len() > 12)
        .map(|(_, f)| f[11] + f[12])
        .sum()
}
