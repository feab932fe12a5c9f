//! Pod start to first container output, over CRI as kubelet drives it:
//! RunPodSandbox → CreateContainer → StartContainer → the container's first
//! line in its CRI log file; then ExecSync round trips into that container.
//! On the `microvm` driver (a guest boots to its agent, the image is a disk)
//! or the `host` driver (the agent on the host, the image a directory).
//! Figures are printed; nothing is asserted about time.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! # as root:
//! HUSK_POD_BENCH_HANDLER=host cargo bench -p husk-runtime --bench pod_start
//! bash guest-image/build.sh && cargo bench -p husk-runtime --bench pod_start  # microvm, /dev/kvm
//! ```
//!
//! HUSK_POD_BENCH_HANDLER is `microvm` (default) or `host`.
//! HUSK_POD_BENCH_RUNS (default 3) pods are started one after the other,
//! each with a CPU limit of HUSK_POD_BENCH_VCPUS (default 1: a microVM of that
//! many vCPUs; the first pod's verbose status says which KVM kind and size);
//! HUSK_EXEC_BENCH_RUNS ExecSyncs of `true` (default 200 on host, 5 on
//! microvm) run in the first pod's container. HUSK_VMM, HUSK_GUEST_KERNEL and
//! HUSK_GUEST_INITRD override where the microvm parts are (default: husk-vmm
//! next to huskd, the guest image in target/guest); HUSK_AGENT where the host
//! driver's agent is (default: next to huskd).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use support::{push_busybox, AgentSweeper, Huskd, Registry};

fn main() {
    support::bench_main(bench());
}

async fn bench() {
    let handler = std::env::var("HUSK_POD_BENCH_HANDLER").unwrap_or_else(|_| "microvm".into());
    let dir = tempfile::tempdir().expect("tempdir");
    let (args, exec_runs_default) = match handler.as_str() {
        "host" => {
            let mut args = Huskd::host_args(dir.path());
            args.extend(["--log-level".into(), "warn".into()]);
            (args, 200)
        }
        "microvm" => (
            Huskd::microvm_args(
                dir.path(),
                // The cap on vCPUs defaults to the host's CPU count; a
                // benchmark asks for its own VM size whatever the host.
                "log_level = \"warn\"\n[microvm]\nguest_boot_timeout_secs = 600\nguest_max_vcpus = 16\n",
            ),
            5,
        ),
        other => panic!("HUSK_POD_BENCH_HANDLER={other:?}: the handlers are microvm and host"),
    };
    let runs = husk_e2e::env_number::<usize>("HUSK_POD_BENCH_RUNS", 3);
    // A CPU limit of N CPUs makes a microVM of N vCPUs (huskd's default base is 0).
    let vcpus = husk_e2e::env_number::<usize>("HUSK_POD_BENCH_VCPUS", 1);
    let exec_runs = husk_e2e::env_number::<usize>("HUSK_EXEC_BENCH_RUNS", exec_runs_default);

    let registry = Registry::start();
    let image = push_busybox(&registry, "").await;

    // Declared before huskd, so that it drops after it: host agents outlive huskd.
    let _agents = AgentSweeper::new(dir.path());
    let huskd = Huskd::spawn(&dir.path().join("husk.sock"), &args);
    let channel = huskd.connect().await;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut img = ImageServiceClient::new(channel);
    support::pull(&mut img, &image).await;

    println!(
        "pod start on the {handler} driver, {runs} run(s); times from the RunPodSandbox call (ms)"
    );
    println!("run  RunPodSandbox  +CreateContainer  +StartContainer  first output  (stop+remove)");
    let mut exec_figures = String::new();
    for run in 0..runs {
        let pod_logs = dir.path().join(format!("logs/pod{run}"));
        let pod_config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: format!("bench{run}"),
                uid: format!("uid-bench{run}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            log_directory: pod_logs.display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                resources: Some(cri::LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_quota: 100_000 * vcpus as i64,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let t0 = Instant::now();
        let pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_config.clone()),
                runtime_handler: handler.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {}", e.message()))
            .into_inner()
            .pod_sandbox_id;
        let ready = t0.elapsed();
        if run == 0 {
            // Which KVM kind and VM size every figure below comes from.
            println!("sandbox: {}", support::pod_info(&mut rt, &pod).await);
        }
        let container = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: "first".into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: image.clone(),
                        ..Default::default()
                    }),
                    // It stays up for ExecSync.
                    command: vec![
                        "sh".into(),
                        "-c".into(),
                        "echo first-output; exec sleep 3600".into(),
                    ],
                    log_path: "first/0.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(pod_config),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {}", e.message()))
            .into_inner()
            .container_id;
        let created = t0.elapsed();
        rt.start_container(cri::StartContainerRequest {
            container_id: container.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {}", e.message()));
        let started = t0.elapsed();
        let log = pod_logs.join("first/0.log");
        let deadline = Instant::now() + Duration::from_secs(300);
        let output = loop {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("first-output")
            {
                break t0.elapsed();
            }
            assert!(Instant::now() < deadline, "no output in {}", log.display());
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        if run == 0 {
            exec_figures = exec_round_trips(&mut rt, &container, exec_runs).await;
        }
        let t1 = Instant::now();
        support::remove_pod(&mut rt, &pod).await;
        let teardown = t1.elapsed();
        println!(
            "{run:>3}  {:>13.1}  {:>16.1}  {:>15.1}  {:>12.1}  ({:.1})",
            ms(ready),
            ms(created),
            ms(started),
            ms(output),
            ms(teardown)
        );
    }
    println!("{exec_figures}");
}

/// ExecSync of `true` `runs` times into a running container, as kubelet's
/// exec probes do; says how the round trips spread.
async fn exec_round_trips(
    rt: &mut RuntimeServiceClient<Channel>,
    container: &str,
    runs: usize,
) -> String {
    if runs == 0 {
        return "no ExecSync runs".into();
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let exec = rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: container.into(),
                cmd: vec!["true".into()],
                timeout: 60,
            })
            .await
            .unwrap_or_else(|e| panic!("ExecSync: {}", e.message()))
            .into_inner();
        samples.push(t.elapsed());
        assert_eq!(exec.exit_code, 0, "ExecSync true: {exec:?}");
    }
    samples.sort();
    let quantile = |q: f64| ms(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    let mean = ms(samples.iter().sum::<Duration>()) / runs as f64;
    format!(
        "ExecSync `true` over CRI, {runs} runs (ms): min {:.2}  median {:.2}  p90 {:.2}  max {:.2}  mean {:.2}",
        quantile(0.0),
        quantile(0.5),
        quantile(0.9),
        quantile(1.0),
        mean
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
