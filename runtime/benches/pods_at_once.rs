//! Many pods at once on the `host` driver, as a node filling up after a
//! restart sees them: N clients each run RunPodSandbox → CreateContainer →
//! StartContainer at the same moment, while another lists pods and
//! containers in a loop as kubelet's relist does. Reports the time until all
//! N run, and each call's latency (median, 95th percentile, max) beside the
//! same calls for one pod alone (the baseline, run first in the same
//! process), as a ratio. Then checks that every pod is READY and none is
//! lost, tears them all down at once, and checks nothing is left (agents,
//! network namespaces, sandbox directories). Figures are printed; nothing is
//! asserted about time.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! # as root:
//! cargo bench -p husk-runtime --bench pods_at_once
//! ```
//!
//! HUSK_PODS_AT_ONCE (default 50) sets N.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use support::{container_config, push_busybox, AgentSweeper, Huskd, Registry};

fn main() {
    support::bench_main(bench());
}

/// How long each of one pod's calls took.
#[derive(Debug, Default, Clone, Copy)]
struct PodCalls {
    run: Duration,
    create: Duration,
    start: Duration,
}

async fn bench() {
    let n = husk_e2e::env_number::<usize>("HUSK_PODS_AT_ONCE", 50);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = Huskd::host_args(dir.path());
    args.extend(["--log-level".into(), "warn".into()]);
    let registry = Registry::start();
    let image = push_busybox(&registry, "").await;
    // Declared before huskd, so that it drops after it: host agents outlive huskd.
    let _agents = AgentSweeper::new(dir.path());
    let huskd = Huskd::spawn(&dir.path().join("husk.sock"), &args);
    let channel = huskd.connect().await;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    support::pull(&mut ImageServiceClient::new(channel.clone()), &image).await;

    // The baseline: one pod, nothing else going on.
    let alone = start_pod(channel.clone(), image.clone(), "alone".into()).await;
    let lists_alone = list_once(&mut rt).await;
    let pods = support::list_pods(&mut rt).await;
    support::remove_pod(&mut rt, &pods[0].id).await;

    // N at once, with a relist loop beside them.
    let began = Instant::now();
    let mut starts = tokio::task::JoinSet::new();
    for i in 0..n {
        starts.spawn(start_pod(channel.clone(), image.clone(), format!("pod{i}")));
    }
    let relist = {
        let mut rt = rt.clone();
        tokio::spawn(async move {
            loop {
                list_once(&mut rt).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut calls = Vec::with_capacity(n);
    while let Some(done) = starts.join_next().await {
        calls.push(done.expect("a pod's client"));
    }
    let all_running = began.elapsed();
    relist.abort();
    // Relists with N pods and N containers in the state.
    let mut lists_loaded = Vec::new();
    for _ in 0..20 {
        lists_loaded.push(list_once(&mut rt).await);
    }

    let pods = support::list_pods(&mut rt).await;
    let ready = pods
        .iter()
        .filter(|p| p.state == cri::PodSandboxState::SandboxReady as i32)
        .count();
    assert_eq!((pods.len(), ready), (n, n), "every pod listed and READY");
    let running = rt
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers
        .iter()
        .filter(|c| c.state == cri::ContainerState::ContainerRunning as i32)
        .count();
    assert_eq!(running, n, "every container RUNNING");

    let t = Instant::now();
    let mut removals = tokio::task::JoinSet::new();
    for pod in pods {
        let mut rt = rt.clone();
        removals.spawn(async move { support::remove_pod(&mut rt, &pod.id).await });
    }
    while let Some(done) = removals.join_next().await {
        done.expect("a removal");
    }
    let teardown = t.elapsed();
    assert!(support::list_pods(&mut rt).await.is_empty());
    let state = dir.path().join("state");
    let agents = support::agents_under(&state.display().to_string());
    assert!(agents.is_empty(), "agents left: {agents:?}");
    let sandboxes = std::fs::read_dir(state.join("sandboxes"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(sandboxes, 0, "sandbox directories left");
    let netns = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("husk-"))
        .count();
    println!("(husk network namespaces on this machine after teardown: {netns})");

    println!("{n} pods at once on the host driver (each: RunPodSandbox, CreateContainer, StartContainer)");
    println!(
        "all {n} running after {:.0} ms; one pod alone took {:.1} ms; all {n} stopped and removed (at once) in {:.0} ms",
        ms(all_running),
        ms(alone.run + alone.create + alone.start),
        ms(teardown)
    );
    println!("call               alone ms   at once: p50 ms  p95 ms   max ms   p50/alone");
    for (name, pick) in [
        (
            "RunPodSandbox",
            (|c: &PodCalls| c.run) as fn(&PodCalls) -> Duration,
        ),
        ("CreateContainer", |c: &PodCalls| c.create),
        ("StartContainer", |c: &PodCalls| c.start),
    ] {
        let mut figures: Vec<Duration> = calls.iter().map(pick).collect();
        row(name, pick(&alone), &mut figures);
    }
    row(
        &format!("List (1 → {n} pods)"),
        lists_alone,
        &mut lists_loaded,
    );
}

/// One pod with one running container: how long each call took.
async fn start_pod(channel: Channel, image: String, name: String) -> PodCalls {
    let mut rt = RuntimeServiceClient::new(channel);
    let config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.clone(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        ..Default::default()
    };
    let t = Instant::now();
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: "host".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {}", e.message()))
        .into_inner()
        .pod_sandbox_id;
    let run = t.elapsed();
    let t = Instant::now();
    let container = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod,
            config: Some(container_config("sleeper", &image, &["sleep", "3600"], "")),
            sandbox_config: Some(config),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {}", e.message()))
        .into_inner()
        .container_id;
    let create = t.elapsed();
    let t = Instant::now();
    rt.start_container(cri::StartContainerRequest {
        container_id: container,
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer {name}: {}", e.message()));
    PodCalls {
        run,
        create,
        start: t.elapsed(),
    }
}

/// ListPodSandbox then ListContainers, as kubelet's relist: how long both took.
async fn list_once(rt: &mut RuntimeServiceClient<Channel>) -> Duration {
    let t = Instant::now();
    support::list_pods(rt).await;
    rt.list_containers(cri::ListContainersRequest { filter: None })
        .await
        .expect("ListContainers");
    t.elapsed()
}

fn row(name: &str, alone: Duration, figures: &mut [Duration]) {
    figures.sort();
    let at = |q: f64| figures[((figures.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name:<18} {:>8.2}   {:>14.2}  {:>7.2}  {:>7.2}   {:>8.1}×",
        ms(alone),
        ms(at(0.5)),
        ms(at(0.95)),
        ms(at(1.0)),
        ms(at(0.5)) / ms(alone)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
