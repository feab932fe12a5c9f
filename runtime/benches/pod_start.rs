//! Pod start to first container output on the `microvm` driver, over CRI as
//! kubelet drives it: RunPodSandbox (boot the guest to its agent) →
//! CreateContainer (attach the image disk, mount it) → StartContainer → the
//! container's first line in its CRI log file. Figures are printed; nothing
//! is asserted about time.
//!
//! ```sh
//! bash guest-image/build.sh
//! cargo build --release -p husk-vmm
//! cargo bench -p husk-runtime --bench pod_start      # as root, on /dev/kvm
//! ```
//!
//! HUSK_POD_BENCH_RUNS (default 3) pods are started one after the other;
//! HUSK_VMM, HUSK_GUEST_KERNEL and HUSK_GUEST_INITRD override where the parts
//! are (default: husk-vmm next to huskd, the guest image in target/guest).

#[path = "../tests/support/mod.rs"]
mod support;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};

use support::{busybox_layer, image_config, push_image, Registry};

const HUSKD: &str = env!("CARGO_BIN_EXE_huskd");

fn path_from(var: &str, default: PathBuf) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
    assert!(
        path.is_file(),
        "{} is missing (set {var}, or build it: see this bench's header)",
        path.display()
    );
    path
}

struct Huskd(Child);

impl Drop for Huskd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the microvm driver needs /dev/kvm and mounts: run this as root"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let root_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let vmm = path_from("HUSK_VMM", Path::new(HUSKD).with_file_name("husk-vmm"));
    let kernel = path_from("HUSK_GUEST_KERNEL", root_dir.join("target/guest/vmlinux"));
    let initrd = path_from(
        "HUSK_GUEST_INITRD",
        root_dir.join("target/guest/initramfs.cpio.gz"),
    );
    let runs: usize = std::env::var("HUSK_POD_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);

    let registry = Registry::start();
    let layer = busybox_layer();
    let image = format!("{}/husk/busybox:latest", registry.host());
    push_image(
        &image,
        layer.clone(),
        image_config("amd64", &layer, "", &["sh"]),
    )
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("husk.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "log_level = \"warn\"\nguest_boot_timeout_secs = 600\n",
    )
    .expect("config");
    let args: Vec<OsString> = vec![
        "--listen".into(),
        format!("unix://{}", socket.display()).into(),
        "--root".into(),
        dir.path().join("root").into(),
        "--state".into(),
        dir.path().join("state").into(),
        "--husk-vmm".into(),
        vmm.into(),
        "--guest-kernel".into(),
        kernel.into(),
        "--guest-initrd".into(),
        initrd.into(),
        "--config".into(),
        config.into(),
    ];
    let mut huskd = Huskd(
        Command::new(HUSKD)
            .args(&args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn huskd"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if let Ok(Some(status)) = huskd.0.try_wait() {
            panic!("huskd exited early: {status}");
        }
        assert!(Instant::now() < deadline, "huskd did not create its socket");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let socket_path = socket.clone();
    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket_path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .expect("connect to huskd");
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut img = ImageServiceClient::new(channel);
    img.pull_image(cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: image.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("pull");

    println!(
        "pod start on the microvm driver, {runs} run(s); times from the RunPodSandbox call (s)"
    );
    println!("run  RunPodSandbox  +CreateContainer  +StartContainer  first output  (stop+remove)");
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
            ..Default::default()
        };
        let t0 = Instant::now();
        let pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_config.clone()),
                runtime_handler: "microvm".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {}", e.message()))
            .into_inner()
            .pod_sandbox_id;
        let ready = t0.elapsed();
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
                    command: vec!["sh".into(), "-c".into(), "echo first-output".into()],
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
            container_id: container,
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
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let t1 = Instant::now();
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("stop pod");
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .expect("remove pod");
        let teardown = t1.elapsed();
        let s = |d: Duration| d.as_secs_f64();
        println!(
            "{run:>3}  {:>13.2}  {:>16.2}  {:>15.2}  {:>12.2}  ({:.2})",
            s(ready),
            s(created),
            s(started),
            s(output),
            s(teardown)
        );
    }
}
