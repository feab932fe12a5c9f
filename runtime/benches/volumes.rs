//! Volume throughput over CRI: the same workload in a container of a
//! `microvm` pod (its volume reaches the guest through virtio-fs, served
//! by the pod's virtiofsd) and, as the baseline run beside it, of a `host`
//! pod (a plain bind mount of the same kind of directory):
//!   - sequential write: `dd` of HUSK_VOLUME_BENCH_MIB MiB (default 256)
//!     with an fsync at the end;
//!   - sequential read: `dd` of a file of that size written on the host
//!     before (hot in the host's page cache, cold in the guest's);
//!   - metadata: HUSK_VOLUME_BENCH_FILES (default 500) empty files created
//!     by one shell (open+close each), listed with `ls -l` (a stat each),
//!     and removed with one `rm`.
//!
//! Each figure is the ExecSync's wall time less the median ExecSync of
//! `true` in the same container (the exec round trip itself). Figures are
//! printed with the ratio microvm/host; nothing is asserted about time.
//!
//! ```sh
//! cargo build --release --workspace --bins && bash guest-image/build.sh
//! cargo bench -p husk-runtime --bench volumes      # as root, /dev/kvm
//! ```
//!
//! The pod's verbose status line says which KVM kind the microvm figures
//! come from. HUSK_VMM, HUSK_GUEST_KERNEL and HUSK_GUEST_INITRD as in
//! `pod_start`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use support::BenchHuskd;

/// ExecSyncs of `true` whose median is the exec overhead.
const OVERHEAD_RUNS: usize = 5;

fn main() {
    support::bench_main(bench());
}

/// One step of the workload: its name, the command, and what it moves
/// (bytes, or files) for the rate column.
struct Step {
    name: &'static str,
    command: String,
    amount: f64,
    unit: &'static str,
}

async fn bench() {
    let mib = husk_e2e::env_number::<u64>("HUSK_VOLUME_BENCH_MIB", 256);
    let files = husk_e2e::env_number::<u64>("HUSK_VOLUME_BENCH_FILES", 500);
    let dir = tempfile::tempdir().expect("tempdir");
    // Kept whole: huskd and what it started go when it drops.
    let mut huskd = BenchHuskd::start(dir.path()).await;
    let (rt, image, state) = (&mut huskd.rt, huskd.image.clone(), huskd.state.clone());

    let steps = [
        Step {
            name: "sequential write",
            command: format!(
                "dd if=/dev/zero of=/vol/written bs=1M count={mib} conv=fsync 2>/dev/null"
            ),
            amount: mib as f64,
            unit: "MiB/s",
        },
        Step {
            name: "sequential read",
            command: "dd if=/vol/from-host of=/dev/null bs=1M 2>/dev/null".into(),
            amount: mib as f64,
            unit: "MiB/s",
        },
        Step {
            name: "create files",
            command: format!(
                "mkdir /vol/m && cd /vol/m && i=0; while [ $i -lt {files} ]; do : > f$i; \
                 i=$((i+1)); done"
            ),
            amount: files as f64,
            unit: "files/s",
        },
        Step {
            name: "stat files (ls -l)",
            command: "ls -l /vol/m > /dev/null".into(),
            amount: files as f64,
            unit: "files/s",
        },
        Step {
            name: "remove files",
            // The names first, then the unlinks: `rm -r` reads the directory
            // while it deletes, which through FUSE on a tmpfs of Linux < 6.6
            // skips entries (seen in the bed, whose L1 runs 6.1).
            command: "cd /vol/m && rm f* && cd / && rmdir /vol/m".into(),
            amount: files as f64,
            unit: "files/s",
        },
    ];

    let mut results = Vec::new();
    for handler in ["microvm", "host"] {
        let volume = dir.path().join(format!("volume-{handler}"));
        std::fs::create_dir_all(&volume).expect("mkdir");
        write_file(&volume.join("from-host"), mib);
        let (pod, container) = start_pod(rt, handler, &image, &volume).await;
        let overhead = exec_overhead(rt, &container).await;
        let mut times = Vec::new();
        for step in &steps {
            let took = timed_exec(rt, &container, &step.command).await;
            times.push(took.saturating_sub(overhead));
        }
        if handler == "microvm" {
            // Its own memory: guest RAM it mapped is the VM's, counted there.
            let private_kib: u64 = support::virtiofsds_under(&state)
                .iter()
                .map(|pid| private_kib(*pid))
                .sum();
            println!("microvm: the pod's virtiofsd processes hold {private_kib} KiB of their own (Private_*)");
        }
        support::remove_pod(rt, &pod).await;
        println!(
            "{handler}: ExecSync overhead {:.1} ms (median of {OVERHEAD_RUNS})",
            ms(overhead)
        );
        results.push(times);
    }

    println!(
        "\nstep                  microvm ms   rate         host ms   rate         microvm/host"
    );
    for (i, step) in steps.iter().enumerate() {
        let (vm, host) = (results[0][i], results[1][i]);
        let rate = |d: Duration| step.amount / d.as_secs_f64().max(1e-6);
        println!(
            "{:<20} {:>10.1}   {:>8.0} {:<7} {:>7.1}   {:>8.0} {:<7} {:>6.2}",
            step.name,
            ms(vm),
            rate(vm),
            step.unit,
            ms(host),
            rate(host),
            step.unit,
            ms(vm) / ms(host).max(1e-3)
        );
    }
}

/// A file of `mib` MiB of non-zero bytes, flushed to the host's page cache.
fn write_file(path: &Path, mib: u64) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("create");
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        file.write_all(&chunk).expect("write");
    }
    file.sync_all().expect("sync");
}

/// A pod of `handler` with one container mounting `volume` at /vol; its
/// verbose status is printed (the KVM kind and VM size).
async fn start_pod(
    rt: &mut RuntimeServiceClient<Channel>,
    handler: &str,
    image: &str,
    volume: &Path,
) -> (String, String) {
    let (pod, pod_config) = support::run_pod(rt, &format!("volumes-{handler}"), handler).await;
    println!("{handler} sandbox: {}", support::pod_info(rt, &pod).await);
    let mut config = support::container_config("worker", image, &["sleep", "3600"], "");
    config.mounts = vec![cri::Mount {
        container_path: "/vol".into(),
        host_path: volume.display().to_string(),
        ..Default::default()
    }];
    let container = support::run_container(rt, &pod, config, Some(pod_config)).await;
    (pod, container)
}

async fn exec_overhead(rt: &mut RuntimeServiceClient<Channel>, container: &str) -> Duration {
    let mut samples = Vec::with_capacity(OVERHEAD_RUNS);
    for _ in 0..OVERHEAD_RUNS {
        samples.push(timed_exec(rt, container, "true").await);
    }
    samples.sort();
    samples[OVERHEAD_RUNS / 2]
}

/// `sh -c command` in the container, which must succeed; its wall time.
async fn timed_exec(
    rt: &mut RuntimeServiceClient<Channel>,
    container: &str,
    command: &str,
) -> Duration {
    let t = Instant::now();
    let out = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: container.into(),
            cmd: vec!["sh".into(), "-c".into(), command.into()],
            timeout: 600,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync {command:?}: {}", e.message()))
        .into_inner();
    let took = t.elapsed();
    assert_eq!(
        out.exit_code,
        0,
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// Private_Clean + Private_Dirty of a process, from smaps_rollup.
fn private_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .filter(|line| line.starts_with("Private_"))
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
