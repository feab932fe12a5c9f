//! What idle pods cost the node's CPU: HUSK_IDLE_BENCH_PODS pods (default 3)
//! of each handler, each running `sleep`, are left alone for
//! HUSK_IDLE_BENCH_SECS seconds (default 30, after 5 s to settle), and the
//! CPU time their processes used meanwhile is read from /proc: for a
//! `microvm` pod its husk-vmm and virtiofsd, for a `host` pod (the baseline
//! beside it) its agent and the pod's processes below it. Reported as % of
//! one core per pod. huskd's own health probes (a Ping every 10 s) are part
//! of what a pod costs and are counted. For microVM pods the time is also
//! split by where it went (the vCPU threads, which include the guest's own
//! run time, husk-vmm's event loop, virtiofsd), and the guest's interrupts
//! per second (its /proc/interrupts, read in the first pod before and
//! after) say what woke it. Nothing is asserted.
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
        let mut first_container = String::new();
        for n in 0..pods {
            let (pod, pod_config) =
                support::run_pod(rt, &format!("idle-{handler}-{n}"), handler).await;
            if n == 0 {
                println!("{handler} sandbox: {}", support::pod_info(rt, &pod).await);
            }
            let config = support::container_config("idle", &image, &["sleep", "3600"], "");
            let container = support::run_container(rt, &pod, config, Some(pod_config)).await;
            if n == 0 {
                first_container = container;
            }
            ids.push(pod);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let sandboxes = state.join("sandboxes");
        let vm = handler == "microvm";
        let interrupts_before = match vm {
            true => guest_interrupts(rt, &first_container).await,
            false => Vec::new(),
        };
        let before = cpu_ticks_under(&sandboxes);
        let split_before = vm_split(&sandboxes);
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let used = cpu_ticks_under(&sandboxes).saturating_sub(before);
        let split_now = vm_split(&sandboxes);
        let split: [u64; 3] = std::array::from_fn(|i| split_now[i].saturating_sub(split_before[i]));
        let wall = t.elapsed().as_secs_f64();
        // SAFETY: sysconf takes a constant and touches no memory of ours.
        let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let per_pod = |ticks: u64| ticks as f64 / ticks_per_sec / wall * 100.0 / pods as f64;
        println!(
            "{handler}: {:.2} % of a core for {pods} pods, {:.2} % per pod",
            per_pod(used) * pods as f64,
            per_pod(used)
        );
        if vm {
            println!(
                "  per pod: vCPU threads {:.2} %, husk-vmm event loop {:.2} %, virtiofsd {:.2} %",
                per_pod(split[0]),
                per_pod(split[1]),
                per_pod(split[2])
            );
            let after = guest_interrupts(rt, &first_container).await;
            let rates: Vec<String> = after
                .iter()
                .filter_map(|(name, count)| {
                    let before = interrupts_before.iter().find(|(n, _)| n == name)?.1;
                    let rate = count.saturating_sub(before) as f64 / wall;
                    (rate >= 0.05).then(|| format!("{name} {rate:.1}/s"))
                })
                .collect();
            println!("  the first guest's interrupts: {}", rates.join(", "));
        }
        for pod in &ids {
            support::remove_pod(rt, pod).await;
        }
    }
}

/// The guest's interrupt counts by name (/proc/interrupts: the name is the
/// last column for devices, the first for the CPU's own, e.g. LOC).
async fn guest_interrupts(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    container: &str,
) -> Vec<(String, u64)> {
    let out = support::exec_sync(rt, container, &["cat", "/proc/interrupts"]).await;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|line| {
            let (label, rest) = line.split_once(':')?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let counts: Vec<u64> = fields.iter().map_while(|f| f.parse().ok()).collect();
            let name = match label.trim().parse::<u32>() {
                Ok(_) => fields.last()?.to_string(),
                Err(_) => label.trim().to_owned(),
            };
            Some((name, counts.iter().sum()))
        })
        .collect()
}

/// CPU ticks of the microVMs below `sandboxes`: [vCPU threads, husk-vmm's
/// other threads, virtiofsd].
fn vm_split(sandboxes: &Path) -> [u64; 3] {
    let mut split = [0; 3];
    for vmm in support::vmms_under(sandboxes) {
        for task in std::fs::read_dir(format!("/proc/{vmm}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            split[usize::from(!comm.starts_with("vcpu"))] += ticks(&stat);
        }
    }
    for daemon in support::virtiofsds_under(sandboxes) {
        split[2] +=
            ticks(&std::fs::read_to_string(format!("/proc/{daemon}/stat")).unwrap_or_default());
    }
    split
}

/// utime + stime of one /proc stat line.
fn ticks(stat: &str) -> u64 {
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    fields.get(11).zip(fields.get(12)).map_or(0, |(u, s)| u + s)
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
        .filter(|(pid, _)| ours.contains(pid))
        .map(|(_, f)| f.get(11).zip(f.get(12)).map_or(0, |(u, s)| u + s))
        .sum()
}
