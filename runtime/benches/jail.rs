//! What husk-vmm's jail costs a pod's start. Two huskds run side by side,
//! one with `[microvm] jail = true` (the default) and one with `false`; pods
//! are started on them alternately, one at a time, HUSK_JAIL_BENCH_RUNS
//! (default 3) on each. Reported: RunPodSandbox (huskd's work, the guest's
//! boot to its agent) per pod, the medians and their ratio; and the jail
//! step itself (namespaces, pivot_root, rlimits, uid/gid), as husk-vmm
//! logs it. The cgroup the VM joins is made either way. Nothing is asserted.
//!
//! ```sh
//! cargo build --release --workspace --bins && bash guest-image/build.sh
//! cargo bench -p husk-runtime --bench jail      # as root, /dev/kvm
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
    let runs = husk_e2e::env_number::<usize>("HUSK_JAIL_BENCH_RUNS", 3);
    // A directory each: a sandbox's socket paths leave no room for more.
    let (jailed_dir, unjailed_dir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut jailed = BenchHuskd::start_with(jailed_dir.path(), "jail = true\n").await;
    let mut unjailed = BenchHuskd::start_with(unjailed_dir.path(), "jail = false\n").await;

    println!("RunPodSandbox with and without husk-vmm's jail, {runs} pod(s) each, alternating");
    let (mut with, mut without, mut steps) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        for (side, huskd) in [("jailed", &mut jailed), ("unjailed", &mut unjailed)] {
            let t = Instant::now();
            let (pod, _) =
                support::run_pod(&mut huskd.rt, &format!("jail-{side}-{run}"), "microvm").await;
            let took = t.elapsed();
            if run == 0 {
                println!(
                    "{side} sandbox: {}",
                    support::pod_info(&mut huskd.rt, &pod).await
                );
            }
            let step = jail_step(&huskd.state.join("sandboxes").join(&pod));
            support::remove_pod(&mut huskd.rt, &pod).await;
            println!(
                "{run:>3}  {side:<8}  RunPodSandbox {:>9.1} ms{}",
                ms(took),
                step.map(|s| format!("  (jail step {} µs)", s.as_micros()))
                    .unwrap_or_default()
            );
            match side {
                "jailed" => {
                    with.push(took);
                    steps.extend(step);
                }
                _ => without.push(took),
            }
        }
    }
    let (with, without) = (median(&mut with), median(&mut without));
    println!(
        "median RunPodSandbox: jailed {:.1} ms, unjailed {:.1} ms: {:.3}× ({:+.1} ms)",
        ms(with),
        ms(without),
        with.as_secs_f64() / without.as_secs_f64(),
        ms(with) - ms(without)
    );
    if steps.is_empty() {
        println!("husk-vmm logged no jail step");
    } else {
        println!(
            "median jail step inside husk-vmm: {} µs",
            median(&mut steps).as_micros()
        );
    }
}

/// How long husk-vmm took to enter its jail, from its log line
/// `jail entered ... took_us=N`.
fn jail_step(sandbox: &Path) -> Option<Duration> {
    let log = std::fs::read_to_string(sandbox.join("vmm.log")).ok()?;
    let line = log.lines().find(|l| l.contains("jail entered"))?;
    let value = line.split("took_us=").nth(1)?.split_whitespace().next()?;
    value.parse().ok().map(Duration::from_micros)
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
