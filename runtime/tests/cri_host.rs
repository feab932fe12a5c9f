//! huskd end to end on the `host` sandbox driver: the built huskd and
//! husk-agent, a real registry on loopback, and CRI driven over the unix
//! socket with the generated client, as crictl does.
//!
//! Needs root (namespaces, mounts, cgroups), scripts/install-deps.sh's
//! packages, and husk-agent built first: `cargo build -p husk-agent`
//! (or HUSK_AGENT=/path/to/husk-agent).

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;
use tonic::Code;

use support::{connect, container_config, husk_agent, push_busybox, require_root, Registry, HUSKD};

const PATIENCE: Duration = Duration::from_secs(30);

struct Huskd {
    child: Child,
    socket: PathBuf,
}

impl Drop for Huskd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct HuskdArgs {
    socket: PathBuf,
    root: PathBuf,
    state: PathBuf,
    agent: PathBuf,
    config: PathBuf,
}

impl HuskdArgs {
    /// Starts huskd and waits for its socket.
    async fn spawn(&self) -> Huskd {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new(HUSKD)
            .arg("--listen")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--root")
            .arg(&self.root)
            .arg("--state")
            .arg(&self.state)
            .arg("--husk-agent")
            .arg(&self.agent)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn huskd");
        let mut huskd = Huskd {
            child,
            socket: self.socket.clone(),
        };
        let deadline = Instant::now() + PATIENCE;
        while !self.socket.exists() {
            if let Ok(Some(status)) = huskd.child.try_wait() {
                panic!("huskd exited early: {status}");
            }
            assert!(Instant::now() < deadline, "huskd did not create its socket");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        huskd
    }
}

impl Huskd {
    /// SIGTERM, and huskd must end cleanly, taking its socket away.
    fn terminate(&mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM huskd");
        let exit = self.child.wait().expect("wait huskd");
        assert!(exit.success(), "huskd: {exit}");
        assert!(!self.socket.exists());
    }
}

fn metadata(name: &str) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: name.into(),
        uid: format!("uid-{name}"),
        namespace: "default".into(),
        attempt: 0,
    }
}

fn mounts_below(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(str::to_string))
        .filter(|mount_point| mount_point.starts_with(&dir))
        .collect()
}

/// Checks one kubelet log record: `<RFC3339Nano> <stream> F <content>`.
fn check_record(line: &str, stream: &str, content: &str) {
    let mut parts = line.splitn(4, ' ');
    let time = parts.next().unwrap_or_default();
    assert!(
        chrono::DateTime::parse_from_rfc3339(time).is_ok()
            && time.ends_with('Z')
            && time.contains('.'),
        "bad time in {line:?}"
    );
    assert_eq!(parts.next(), Some(stream), "{line:?}");
    assert_eq!(parts.next(), Some("F"), "{line:?}");
    assert_eq!(parts.next(), Some(content), "{line:?}");
}

async fn wait_exited(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> cri::ContainerStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = rt
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .expect("container status")
            .into_inner()
            .status
            .expect("status");
        if status.state == cri::ContainerState::ContainerExited as i32 {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} did not exit: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_logs_execs_and_goes_away_over_cri() {
    require_root();
    let agent = husk_agent();
    let registry = Registry::start();
    let image = push_busybox(&registry, "1000").await;

    let dir = tempfile::tempdir().expect("tempdir");
    let _agents = support::AgentSweeper::new(dir.path());
    let root = dir.path().join("root");
    let state = dir.path().join("state");
    let logs = dir.path().join("logs");
    let socket = dir.path().join("husk.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "log_level = \"info\"\n").expect("config");
    let args = HuskdArgs {
        socket: socket.clone(),
        root: root.clone(),
        state: state.clone(),
        agent: agent.clone(),
        config: config.clone(),
    };
    let started = Instant::now();
    let mut huskd = args.spawn().await;
    let channel = connect(&socket).await;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut img = ImageServiceClient::new(channel);

    // Version and Status, as crictl info/version ask.
    let version = rt
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .expect("version")
        .into_inner();
    eprintln!("huskd answering: {:?}", started.elapsed());
    assert_eq!(version.runtime_name, "husk");
    assert_eq!(version.runtime_api_version, "v1");
    let status = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .expect("status")
        .into_inner()
        .status
        .expect("status");
    let condition = |name: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.r#type == name)
            .cloned()
            .expect(name)
    };
    assert!(condition("RuntimeReady").status);
    let network = condition("NetworkReady");
    assert!(!network.status);
    assert_eq!(network.reason, "NoCNIConfig");

    // Images.
    let t = Instant::now();
    let image_ref = img
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("pull")
        .into_inner()
        .image_ref;
    eprintln!("PullImage: {:?}", t.elapsed());
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    let listed = img
        .list_images(cri::ListImagesRequest { filter: None })
        .await
        .expect("list images")
        .into_inner()
        .images;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].repo_tags, std::slice::from_ref(&image));
    let status = img
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .expect("image status")
        .into_inner()
        .image
        .expect("image present");
    assert_eq!(status.id, image_ref);
    assert_eq!(status.uid, Some(cri::Int64Value { value: 1000 }));
    let fs = img
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .expect("fs info")
        .into_inner();
    assert!(
        fs.image_filesystems[0]
            .used_bytes
            .as_ref()
            .expect("used")
            .value
            > 900_000
    );
    let missing = img
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: format!("{}/husk/nothing:here", registry.host()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("pulling a missing image");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    // A pod on the host driver.
    let pod_logs = logs.join("default_p1_uid-p1");
    let pod_config = cri::PodSandboxConfig {
        metadata: Some(metadata("p1")),
        hostname: "p1".into(),
        log_directory: pod_logs.display().to_string(),
        labels: HashMap::from([("tier".to_string(), "test".to_string())]),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = Instant::now();
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: "host".into(),
        })
        .await
        .expect("run pod")
        .into_inner()
        .pod_sandbox_id;
    eprintln!("RunPodSandbox: {:?}", t.elapsed());
    let pod_status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .expect("pod status")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(pod_status.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(pod_status.metadata, Some(metadata("p1")));
    let by_label = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                label_selector: HashMap::from([("tier".to_string(), "test".to_string())]),
                ..Default::default()
            }),
        })
        .await
        .expect("list pods")
        .into_inner()
        .items;
    assert_eq!(by_label.len(), 1);
    let by_other_label = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                label_selector: HashMap::from([("tier".to_string(), "prod".to_string())]),
                ..Default::default()
            }),
        })
        .await
        .expect("list pods")
        .into_inner()
        .items;
    assert!(by_other_label.is_empty());

    // A container that writes a line to each stream and exits.
    let t = Instant::now();
    let echo = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config(
                "echo",
                &image,
                &["sh", "-c", "echo hello; echo oops >&2"],
                "echo/0.log",
            )),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect("create")
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: echo.clone(),
    })
    .await
    .expect("start");
    let status = wait_exited(&mut rt, &echo).await;
    eprintln!(
        "CreateContainer → StartContainer → EXITED: {:?}",
        t.elapsed()
    );
    assert_eq!(status.exit_code, 0, "{status:?}");
    assert_eq!(status.reason, "Completed");
    assert!(status.created_at > 0 && status.started_at >= status.created_at);
    assert!(status.finished_at >= status.started_at, "{status:?}");
    assert_eq!(
        status.image_ref,
        format!("{}/husk/busybox@{}", registry.host(), {
            // The manifest digest the registry served.
            listed[0].repo_digests[0]
                .rsplit('@')
                .next()
                .expect("digest")
        })
    );
    let log_path = pod_logs.join("echo/0.log");
    assert_eq!(status.log_path, log_path.display().to_string());

    let deadline = Instant::now() + PATIENCE;
    let log = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.lines().count() >= 2 {
            break text;
        }
        assert!(Instant::now() < deadline, "log incomplete: {text:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    // The two streams are copied independently: order between them is not kept.
    lines.sort_by_key(|l| l.contains(" stderr "));
    check_record(lines[0], "stdout", "hello");
    check_record(lines[1], "stderr", "oops");

    // A long-running container: exec into it, read its stats, stop it.
    let sleeper = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config(
                "sleeper",
                &image,
                &["sleep", "1000"],
                "sleeper/0.log",
            )),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect("create sleeper")
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: sleeper.clone(),
    })
    .await
    .expect("start sleeper");
    let t = Instant::now();
    let exec = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: sleeper.clone(),
            cmd: vec!["echo".into(), "hi".into()],
            timeout: 10,
        })
        .await
        .expect("exec")
        .into_inner();
    eprintln!("ExecSync: {:?}", t.elapsed());
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "hi\n");
    assert!(exec.stderr.is_empty());
    assert_eq!(exec.exit_code, 0);
    let exec = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: sleeper.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "id -u; echo bad >&2; exit 3".into(),
            ],
            timeout: 10,
        })
        .await
        .expect("exec")
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "1000\n");
    assert_eq!(String::from_utf8_lossy(&exec.stderr), "bad\n");
    assert_eq!(exec.exit_code, 3);

    let stats = rt
        .list_container_stats(cri::ListContainerStatsRequest { filter: None })
        .await
        .expect("stats")
        .into_inner()
        .stats;
    assert_eq!(stats.len(), 1, "only the running container: {stats:?}");
    assert_eq!(
        stats[0].attributes.as_ref().expect("attributes").id,
        sleeper
    );
    assert!(stats[0]
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .is_some());

    // A restarted huskd finds the pod and its running container in its
    // state and reaches the agent again.
    huskd.terminate();
    let t = Instant::now();
    huskd = args.spawn().await;
    let channel = connect(&socket).await;
    rt = RuntimeServiceClient::new(channel.clone());
    img = ImageServiceClient::new(channel);
    let exec = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: sleeper.clone(),
            cmd: vec!["echo".into(), "again".into()],
            timeout: 10,
        })
        .await
        .expect("exec after a restart")
        .into_inner();
    eprintln!("huskd restart to ExecSync: {:?}", t.elapsed());
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "again\n");

    let running = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("list")
        .into_inner()
        .containers;
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].id, sleeper);

    // An image in use stays.
    let in_use = img
        .remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("removing an image in use");
    assert_eq!(in_use.code(), Code::FailedPrecondition, "{in_use:?}");

    // Bad input.
    let err = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config(
                "ghost",
                "127.0.0.1:1/no/such:image",
                &["sh"],
                "",
            )),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect_err("an image never pulled");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("127.0.0.1:1/no/such:image"),
        "{err:?}"
    );
    let unknown = "0123456789abcdef";
    let err = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: unknown.into(),
            verbose: false,
        })
        .await
        .expect_err("unknown container");
    assert_eq!(err.code(), Code::NotFound);
    let err = rt
        .start_container(cri::StartContainerRequest {
            container_id: unknown.into(),
        })
        .await
        .expect_err("unknown container");
    assert_eq!(err.code(), Code::NotFound);
    let err = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: unknown.into(),
            verbose: false,
        })
        .await
        .expect_err("unknown pod");
    assert_eq!(err.code(), Code::NotFound);
    let err = rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: unknown.into(),
        })
        .await
        .expect_err("unknown pod");
    assert_eq!(err.code(), Code::NotFound);
    let err = rt
        .exec(cri::ExecRequest::default())
        .await
        .expect_err("Exec without a container");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = rt
        .attach(cri::AttachRequest::default())
        .await
        .expect_err("Attach without a container");
    assert_eq!(err.code(), Code::InvalidArgument);

    // Stop the sleeper (PID 1 in its namespace ignores SIGTERM: SIGKILL after 1 s).
    let t = Instant::now();
    rt.stop_container(cri::StopContainerRequest {
        container_id: sleeper.clone(),
        timeout: 1,
    })
    .await
    .expect("stop");
    eprintln!("StopContainer: {:?}", t.elapsed());
    let status = wait_exited(&mut rt, &sleeper).await;
    assert_ne!(status.exit_code, 0, "{status:?}");
    rt.stop_container(cri::StopContainerRequest {
        container_id: sleeper.clone(),
        timeout: 1,
    })
    .await
    .expect("stopping again is fine");

    // Tear down, twice: both calls are idempotent.
    let t = Instant::now();
    for _ in 0..2 {
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("stop pod");
    }
    eprintln!("StopPodSandbox: {:?}", t.elapsed());
    let pod_status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .expect("pod status")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(
        pod_status.state,
        cri::PodSandboxState::SandboxNotready as i32
    );
    for _ in 0..2 {
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("remove pod");
    }
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .expect("list pods")
        .into_inner()
        .items;
    assert!(pods.is_empty(), "{pods:?}");
    let containers = rt
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .expect("list containers")
        .into_inner()
        .containers;
    assert!(containers.is_empty(), "{containers:?}");
    let left: Vec<_> = std::fs::read_dir(state.join("sandboxes"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left under the state dir: {left:?}");
    assert!(
        mounts_below(dir.path()).is_empty(),
        "{:?}",
        mounts_below(dir.path())
    );

    // The image can go now.
    img.remove_image(cri::RemoveImageRequest {
        image: Some(cri::ImageSpec {
            image: image.clone(),
            ..Default::default()
        }),
    })
    .await
    .expect("remove image");

    // SIGTERM ends huskd cleanly and takes its socket away.
    huskd.terminate();
}
