//! huskd end to end on the `host` sandbox driver: the built huskd and
//! husk-agent, a real registry on loopback, and CRI driven over the unix
//! socket with the generated client, as crictl does.
//!
//! Needs root (namespaces, mounts, cgroups), scripts/install-deps.sh's
//! packages, and husk-agent built first: `cargo build -p husk-agent`
//! (or HUSK_AGENT=/path/to/husk-agent).

mod support;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;
use tonic::Code;

use husk_e2e::mounts_below;
use support::streaming::{attach_output, ws_read_until};
use support::{container_status, Huskd, Registry};

const PATIENCE: Duration = Duration::from_secs(30);

fn metadata(name: &str) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: name.into(),
        uid: format!("uid-{name}"),
        namespace: "default".into(),
        attempt: 0,
    }
}

fn container_config(
    name: &str,
    image: &str,
    command: &[&str],
    log_path: &str,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        ..support::container_config(name, image, command, log_path)
    }
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
        let status = container_status(rt, id).await;
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

/// huskd on the host driver in a temporary directory, a registry on
/// loopback holding the busybox image (not pulled yet), and CRI clients.
struct Fixture {
    huskd: Huskd,
    rt: RuntimeServiceClient<Channel>,
    img: ImageServiceClient<Channel>,
    /// huskd's socket and arguments, to start it again.
    socket: PathBuf,
    args: Vec<OsString>,
    image: String,
    registry: Registry,
    /// When huskd was started.
    started: Instant,
    /// Dropped after huskd: ends the agents a failing test leaves.
    _agents: support::AgentSweeper,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Fixture {
        Fixture::start_with(&[]).await
    }

    /// huskd with `extra` flags after the usual ones.
    async fn start_with(extra: &[&str]) -> Fixture {
        assert!(
            nix::unistd::geteuid().is_root(),
            "huskd's host driver creates namespaces, mounts and cgroups: run this as root"
        );
        let (registry, image) = support::busybox_registry("1000").await;
        let dir = tempfile::tempdir().expect("tempdir");
        let agents = support::AgentSweeper::new(dir.path());
        let socket = dir.path().join("husk.sock");
        let mut args = Huskd::host_args(dir.path());
        args.extend(extra.iter().map(OsString::from));
        let started = Instant::now();
        let huskd = Huskd::spawn(&socket, &args);
        let channel = huskd.connect().await;
        Fixture {
            huskd,
            rt: RuntimeServiceClient::new(channel.clone()),
            img: ImageServiceClient::new(channel),
            socket,
            args,
            image,
            registry,
            started,
            _agents: agents,
            dir,
        }
    }

    /// A fixture with the image pulled and the pod `name` running; returns
    /// it with the pod's id and config.
    async fn with_pod(name: &str) -> (Fixture, String, cri::PodSandboxConfig) {
        let mut f = Fixture::start().await;
        f.pull().await;
        let config = f.pod_config(name);
        let pod = f.run_pod(&config).await;
        (f, pod, config)
    }

    /// Starts huskd again after `self.huskd.terminate()` and reconnects
    /// the clients.
    async fn respawn_huskd(&mut self) {
        self.huskd = Huskd::spawn(&self.socket, &self.args);
        let channel = self.huskd.connect().await;
        self.rt = RuntimeServiceClient::new(channel.clone());
        self.img = ImageServiceClient::new(channel);
    }

    /// Where pods' logs go: `logs/<namespace>_<name>_<uid>`.
    fn pod_logs(&self, name: &str) -> PathBuf {
        self.dir
            .path()
            .join("logs")
            .join(format!("default_{name}_uid-{name}"))
    }

    /// A host-network pod labelled tier=test, logging below `pod_logs`.
    fn pod_config(&self, name: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(metadata(name)),
            hostname: name.into(),
            log_directory: self.pod_logs(name).display().to_string(),
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
        }
    }

    async fn pull(&mut self) {
        support::pull(&mut self.img, &self.image).await;
    }

    /// Runs `config` on the host driver; returns the pod's id.
    async fn run_pod(&mut self, config: &cri::PodSandboxConfig) -> String {
        self.rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: "host".into(),
            })
            .await
            .expect("run pod")
            .into_inner()
            .pod_sandbox_id
    }

    /// Creates and starts container `name` of the busybox image running
    /// `command`, logging to `<name>/0.log`; returns its id.
    async fn run_container(
        &mut self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        name: &str,
        command: &[&str],
    ) -> String {
        let config = container_config(name, &self.image, command, &format!("{name}/0.log"));
        support::run_container(&mut self.rt, pod, config, Some(pod_config.clone())).await
    }

    /// Stops and removes a pod.
    async fn remove_pod(&mut self, pod: &str) {
        support::remove_pod(&mut self.rt, pod).await;
    }
}

/// A shell loop printing `tick 0`, `tick 1`… every 0.2 s.
const TICKER: &[&str] = &[
    "sh",
    "-c",
    "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done",
];

/// The numbers of the `tick N` records in a log file.
fn ticks_in(log: &Path) -> Vec<u32> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.rsplit_once(" stdout F tick ")?.1.parse().ok())
        .collect()
}

/// The ticks in a log file, once one of them is `n` or more.
async fn ticks_until(log: &Path, n: u32) -> Vec<u32> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let ticks = ticks_in(log);
        if ticks.iter().any(|&t| t >= n) {
            return ticks;
        }
        assert!(
            Instant::now() < deadline,
            "no tick {n} in {}: {ticks:?}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_logs_execs_and_goes_away_over_cri() {
    let mut f = Fixture::start().await;
    let (mut rt, mut img) = (f.rt.clone(), f.img.clone());
    let (image, registry) = (f.image.clone(), f.registry.host());

    // Version and Status, as crictl info/version ask.
    let version = rt
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .expect("version")
        .into_inner();
    eprintln!("huskd answering: {:?}", f.started.elapsed());
    assert_eq!(version.runtime_name, "husk");
    assert_eq!(version.runtime_api_version, "v1");
    let status = support::runtime_status(&mut rt)
        .await
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
    assert!(network.status, "{network:?}");
    let runtime_config = rt
        .runtime_config(cri::RuntimeConfigRequest {})
        .await
        .expect("runtime config")
        .into_inner();
    assert_eq!(
        runtime_config.linux.map(|l| l.cgroup_driver),
        Some(cri::CgroupDriver::Cgroupfs as i32)
    );

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
                image: format!("{}/husk/nothing:here", registry),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("pulling a missing image");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    // A pod on the host driver.
    let pod_logs = f.pod_logs("p1");
    let pod_config = f.pod_config("p1");
    let t = Instant::now();
    let pod = f.run_pod(&pod_config).await;
    eprintln!("RunPodSandbox: {:?}", t.elapsed());
    let pod_status = support::pod_status(&mut rt, &pod).await;
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
        format!("{}/husk/busybox@{}", registry, {
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
    let sleeper = f
        .run_container(&pod, &pod_config, "sleeper", &["sleep", "1000"])
        .await;
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

    // A container that writes a line every 0.2 s, through a huskd restart.
    let ticker = f.run_container(&pod, &pod_config, "ticker", TICKER).await;
    let ticker_log = pod_logs.join("ticker/0.log");
    ticks_until(&ticker_log, 3).await;

    // A restarted huskd finds the pod and its running containers in its
    // state, reaches the agent again and copies the ticker's output into
    // its log again: what it wrote while huskd was down, and after.
    f.huskd.terminate();
    let last_before = ticks_in(&ticker_log).into_iter().max().expect("ticks");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    f.respawn_huskd().await;
    (rt, img) = (f.rt.clone(), f.img.clone());
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
    let ticks = ticks_until(&ticker_log, last_before + 10).await;
    // About five ticks came while huskd was down. The agent's reader for
    // the huskd that left drops the one chunk it holds when it finds that
    // reader gone, so one tick at most is missing.
    let missing: Vec<u32> = (0..=last_before + 10)
        .filter(|n| !ticks.contains(n))
        .collect();
    assert!(missing.len() <= 1, "missing ticks {missing:?} of {ticks:?}");
    assert!(
        ticks.contains(&(last_before + 3)),
        "a tick from while huskd was down: {ticks:?}"
    );
    // The output is also there for clients attaching after the restart.
    let mut attached = attach_output(&mut rt, &ticker).await;
    let mut got = HashMap::new();
    ws_read_until(&mut attached, &mut got, |got| {
        String::from_utf8_lossy(got.get(&1).map(Vec::as_slice).unwrap_or_default())
            .contains("\ntick ")
    })
    .await;

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
    let mut running: Vec<String> = running.into_iter().map(|c| c.id).collect();
    running.sort();
    let mut want = vec![sleeper.clone(), ticker.clone()];
    want.sort();
    assert_eq!(running, want);

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
    // Stopping what is not there succeeds: the CRI makes Stop idempotent.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: unknown.into(),
    })
    .await
    .expect("StopPodSandbox of an unknown pod");
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
    let pod_status = support::pod_status(&mut rt, &pod).await;
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
    let pods = support::list_pods(&mut rt).await;
    assert!(pods.is_empty(), "{pods:?}");
    let containers = rt
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .expect("list containers")
        .into_inner()
        .containers;
    assert!(containers.is_empty(), "{containers:?}");
    let left: Vec<_> = std::fs::read_dir(f.dir.path().join("state").join("sandboxes"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left under the state dir: {left:?}");
    assert!(
        mounts_below(f.dir.path()).is_empty(),
        "{:?}",
        mounts_below(f.dir.path())
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
    f.huskd.terminate();
}

/// The directory of a pod's cgroup in the hierarchy holding `v1_controller`
/// (the agent puts its containers below `husk/<pod>`): the one directory on
/// cgroup v2.
fn pod_cgroup(pod: &str, v1_controller: &str) -> PathBuf {
    let root = Path::new("/sys/fs/cgroup");
    let hierarchy = if root.join("cgroup.controllers").exists() {
        root.to_path_buf()
    } else {
        root.join(v1_controller)
    };
    hierarchy.join("husk").join(pod)
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// The host pids in a pod's cgroups.
fn pod_pids(pod: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut pending = vec![pod_cgroup(pod, "pids")];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                pending.push(entry.path());
            }
        }
        pids.extend(
            std::fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok()),
        );
    }
    pids
}

/// Whether a process runs (a zombie does not).
fn runs(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// `call` answers NotFound for an unknown container and
/// FailedPrecondition for the `exited` one.
async fn refused_for_unknown_and_exited<T, Call, Answer>(exited: &str, call: Call)
where
    T: std::fmt::Debug,
    Call: Fn(&str) -> Answer,
    Answer: std::future::Future<Output = Result<T, tonic::Status>>,
{
    for (id, code) in [
        ("0123456789abcdef", Code::NotFound),
        (exited, Code::FailedPrecondition),
    ] {
        let err = call(id).await.expect_err("refused");
        assert_eq!(err.code(), code, "{id}: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_container_resources_reaches_the_cgroup() {
    let (mut f, pod, config) = Fixture::with_pod("u1").await;
    let busy = f
        .run_container(&pod, &config, "busy", &["sleep", "1000"])
        .await;
    let done = f
        .run_container(&pod, &config, "done", &["sh", "-c", "exit 0"])
        .await;
    wait_exited(&mut f.rt, &done).await;

    // UpdateContainerResources reaches the container's cgroup, and its
    // status reports what was asked.
    let resources = cri::LinuxContainerResources {
        memory_limit_in_bytes: 64 << 20,
        cpu_period: 100_000,
        cpu_quota: 50_000,
        ..Default::default()
    };
    let rt = f.rt.clone();
    let update = |id: &str| {
        let mut rt = rt.clone();
        let request = cri::UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(resources.clone()),
            ..Default::default()
        };
        async move { rt.update_container_resources(request).await }
    };
    update(&busy).await.expect("update resources");
    let memory = pod_cgroup(&pod, "memory").join(&busy);
    let cpu = pod_cgroup(&pod, "cpu").join(&busy);
    if memory.join("memory.max").exists() {
        assert_eq!(read_trimmed(&memory.join("memory.max")), "67108864");
        assert_eq!(read_trimmed(&cpu.join("cpu.max")), "50000 100000");
    } else {
        assert_eq!(
            read_trimmed(&memory.join("memory.limit_in_bytes")),
            "67108864"
        );
        assert_eq!(read_trimmed(&cpu.join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read_trimmed(&cpu.join("cpu.cfs_period_us")), "100000");
    }
    let status = container_status(&mut f.rt, &busy).await;
    assert_eq!(
        status.resources.and_then(|r| r.linux),
        Some(resources.clone())
    );
    refused_for_unknown_and_exited(&done, update).await;

    f.remove_pod(&pod).await;
    f.huskd.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_stats_are_the_sums_of_the_containers() {
    let (mut f, pod, config) = Fixture::with_pod("s1").await;
    let busy = f
        .run_container(
            &pod,
            &config,
            "busy",
            &["sh", "-c", "while true; do :; done"],
        )
        .await;
    let ticker = f.run_container(&pod, &config, "ticker", TICKER).await;
    let mut other_config = f.pod_config("s2");
    other_config.labels = HashMap::from([("tier".to_string(), "other".to_string())]);
    let other = f.run_pod(&other_config).await;

    // Pod stats: the sums of the running containers', with theirs inside.
    let deadline = Instant::now() + PATIENCE;
    let stats = loop {
        let stats =
            f.rt.pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .expect("pod stats")
            .into_inner()
            .stats
            .expect("stats");
        let cpu = stats
            .linux
            .as_ref()
            .and_then(|l| l.cpu.as_ref())
            .and_then(|c| c.usage_core_nano_seconds.as_ref())
            .map_or(0, |v| v.value);
        if cpu > 10_000_000 {
            break stats;
        }
        assert!(Instant::now() < deadline, "no CPU use: {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        stats.attributes.as_ref().map(|a| a.id.as_str()),
        Some(pod.as_str())
    );
    let linux = stats.linux.expect("linux stats");
    let value = |v: Option<&cri::UInt64Value>| v.map_or(0, |v| v.value);
    let memory = linux.memory.as_ref().expect("memory");
    assert!(value(memory.working_set_bytes.as_ref()) > 0, "{memory:?}");
    assert!(value(memory.usage_bytes.as_ref()) > 0, "{memory:?}");
    let processes = linux.process.as_ref().expect("process");
    // The busy shell; the ticker's shell and its sleep, now and then.
    assert!(
        value(processes.process_count.as_ref()) >= 2,
        "{processes:?}"
    );
    let mut ids: Vec<&str> = linux
        .containers
        .iter()
        .filter_map(|c| c.attributes.as_ref().map(|a| a.id.as_str()))
        .collect();
    ids.sort();
    let mut want = vec![busy.as_str(), ticker.as_str()];
    want.sort();
    assert_eq!(ids, want, "the running containers");
    let list = |filter: Option<cri::PodSandboxStatsFilter>| {
        let mut rt = f.rt.clone();
        async move {
            let mut ids: Vec<String> = rt
                .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter })
                .await
                .expect("list pod stats")
                .into_inner()
                .stats
                .into_iter()
                .filter_map(|s| s.attributes.map(|a| a.id))
                .collect();
            ids.sort();
            ids
        }
    };
    let mut both = vec![pod.clone(), other.clone()];
    both.sort();
    assert_eq!(list(None).await, both);
    let by_label = cri::PodSandboxStatsFilter {
        label_selector: HashMap::from([("tier".to_string(), "other".to_string())]),
        ..Default::default()
    };
    assert_eq!(list(Some(by_label)).await, vec![other.clone()]);
    let by_id = cri::PodSandboxStatsFilter {
        id: pod[..12].to_string(),
        ..Default::default()
    };
    assert_eq!(list(Some(by_id)).await, vec![pod.clone()]);
    let err =
        f.rt.pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: "0123456789abcdef".into(),
        })
        .await
        .expect_err("unknown pod");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    f.remove_pod(&pod).await;
    f.remove_pod(&other).await;
    f.huskd.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_log_is_reopened_at_its_path() {
    let (mut f, pod, config) = Fixture::with_pod("l1").await;
    let ticker = f.run_container(&pod, &config, "ticker", TICKER).await;
    let done = f
        .run_container(&pod, &config, "done", &["sh", "-c", "exit 0"])
        .await;
    wait_exited(&mut f.rt, &done).await;

    // Log rotation as kubelet does it: rename, then ReopenContainerLog;
    // later lines go to a new file at the log path.
    let log = f.pod_logs("l1").join("ticker/0.log");
    ticks_until(&log, 2).await;
    let rotated = log.with_extension("log.20250101-000000");
    std::fs::rename(&log, &rotated).expect("rotate");
    let rt = f.rt.clone();
    let reopen = |id: &str| {
        let mut rt = rt.clone();
        let request = cri::ReopenContainerLogRequest {
            container_id: id.into(),
        };
        async move { rt.reopen_container_log(request).await }
    };
    reopen(&ticker).await.expect("reopen log");
    let old = ticks_in(&rotated);
    let last_old = *old.iter().max().expect("ticks before the rotation");
    let new = ticks_until(&log, last_old + 3).await;
    assert_eq!(
        new.first(),
        Some(&(last_old + 1)),
        "the new file goes on where the old one ends: {old:?} {new:?}"
    );
    refused_for_unknown_and_exited(&done, reopen).await;

    f.remove_pod(&pod).await;
    f.huskd.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_host_agent_takes_its_containers_with_it() {
    let (mut f, pod, config) = Fixture::with_pod("k1").await;
    let sleeper = f
        .run_container(&pod, &config, "sleeper", &["sleep", "1000"])
        .await;
    let forker = f
        .run_container(
            &pod,
            &config,
            "forker",
            &["sh", "-c", "sleep 1000 & sleep 1000"],
        )
        .await;
    // One in the pod's PID namespace, whose holder process is the pod's too.
    let mut shared = container_config("shared-pid", &f.image, &["sleep", "1000"], "");
    shared.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Node as i32,
                pid: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let shared = support::run_container(&mut f.rt, &pod, shared, Some(config.clone())).await;
    // The sleeper, the forker's two sleeps (its shell execs the last), the
    // shared one's sleep and the PID namespace's holder.
    let deadline = Instant::now() + PATIENCE;
    let pids = loop {
        let pids = pod_pids(&pod);
        if pids.len() >= 5 {
            break pids;
        }
        assert!(Instant::now() < deadline, "pod processes: {pids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let agents = support::agent_pids(&f.dir.path().join("state").join("sandboxes").join(&pod));
    assert_eq!(agents.len(), 1, "the pod's agent: {agents:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agents[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the agent");

    // huskd notices by itself: no CRI call until the processes are gone.
    let deadline = Instant::now() + PATIENCE;
    while pids.iter().any(|&pid| runs(pid)) {
        assert!(
            Instant::now() < deadline,
            "still running after the agent died: {:?}",
            pids.iter().filter(|&&pid| runs(pid)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = support::pod_status(&mut f.rt, &pod).await;
    assert_eq!(status.state, cri::PodSandboxState::SandboxNotready as i32);
    for id in [&sleeper, &forker, &shared] {
        let status = wait_exited(&mut f.rt, id).await;
        assert_eq!((status.exit_code, status.reason.as_str()), (137, "Error"));
        assert!(status.message.contains("ended unexpectedly"), "{status:?}");
    }
    assert!(
        !pod_cgroup(&pod, "pids").exists(),
        "the pod's cgroup is gone"
    );
    f.remove_pod(&pod).await;
    f.huskd.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_agent_that_stops_answering_fails_its_pod() {
    const AGENT_TIMEOUT_SECS: u64 = 2;
    const HEALTH_CHECK_SECS: u64 = 5;
    let mut f = Fixture::start_with(&[
        "--agent-timeout-secs",
        &AGENT_TIMEOUT_SECS.to_string(),
        "--health-check-interval-secs",
        &HEALTH_CHECK_SECS.to_string(),
    ])
    .await;
    f.pull().await;
    let config = f.pod_config("h1");
    let pod = f.run_pod(&config).await;
    let sleeper = f
        .run_container(&pod, &config, "sleeper", &["sleep", "1000"])
        .await;
    let agents = support::agent_pids(&f.dir.path().join("state").join("sandboxes").join(&pod));
    assert_eq!(agents.len(), 1, "the pod's agent: {agents:?}");
    // Alive but silent, as a hung guest is.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agents[0]),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP the agent");

    // huskd's health check finds it within its interval and the
    // deadline, with no CRI call; then the pod is NOTREADY and says why.
    let within = Duration::from_secs(HEALTH_CHECK_SECS + AGENT_TIMEOUT_SECS) + PATIENCE;
    let (after, info) = support::wait_pod_failed(&mut f.rt, &pod, within).await;
    eprintln!("a silent agent's pod went NOTREADY after {after:?}");
    assert!(info.contains("stopped answering"), "{info}");
    let status = wait_exited(&mut f.rt, &sleeper).await;
    assert_eq!((status.exit_code, status.reason.as_str()), (137, "Error"));
    assert!(status.message.contains("stopped answering"), "{status:?}");
    let deadline = Instant::now() + PATIENCE;
    while runs(agents[0]) || !pod_pids(&pod).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the silent agent ({}) or the pod's processes ({:?}) still run",
            runs(agents[0]),
            pod_pids(&pod)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f.remove_pod(&pod).await;
    f.huskd.terminate();
}

/// The sandbox directories under huskd's state.
fn sandbox_dirs(f: &Fixture) -> Vec<PathBuf> {
    std::fs::read_dir(f.dir.path().join("state").join("sandboxes"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huskd_killed_mid_call_leaves_nothing_of_that_call() {
    // The real agent, started 3 s late: RunPodSandbox then waits for it long
    // enough for huskd to be killed in the middle.
    let dir = tempfile::tempdir().expect("tempdir");
    let slow_agent = dir.path().join("slow-husk-agent");
    std::fs::write(
        &slow_agent,
        format!(
            "#!/bin/sh\nsleep 3\nexec {} \"$@\"\n",
            support::husk_agent().display()
        ),
    )
    .expect("write the slow agent");
    std::fs::set_permissions(
        &slow_agent,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut f = Fixture::start_with(&[]).await;
    let at = f
        .args
        .iter()
        .position(|a| a == "--husk-agent")
        .expect("--husk-agent")
        + 1;
    f.args[at] = slow_agent.into();
    f.huskd.terminate();
    f.respawn_huskd().await;
    f.pull().await;
    let config = f.pod_config("survivor");
    let survivor = f.run_pod(&config).await;
    let ticker = f.run_container(&survivor, &config, "ticker", TICKER).await;
    let log = f.pod_logs("survivor").join("ticker/0.log");
    ticks_until(&log, 2).await;

    // 1. huskd dies while RunPodSandbox waits for the new pod's agent.
    let mut rt = f.rt.clone();
    let interrupted = f.pod_config("interrupted");
    let call = tokio::spawn(async move {
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(interrupted),
            runtime_handler: "host".into(),
        })
        .await
    });
    let deadline = Instant::now() + PATIENCE;
    let started = loop {
        let dirs = sandbox_dirs(&f);
        if let Some(dir) = dirs.iter().find(|d| !d.ends_with(&survivor)) {
            break dir.clone();
        }
        assert!(Instant::now() < deadline, "the second pod never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.huskd.kill();
    let answer = call.await.expect("join");
    assert!(answer.is_err(), "the call ended with huskd: {answer:?}");
    let interrupted_id = started
        .file_name()
        .and_then(|n| n.to_str())
        .expect("sandbox id")
        .to_owned();

    // 2. huskd dies while CreateContainer waits for a (stopped) agent.
    let survivor_agent = support::agent_pids(&f.dir.path().join("state/sandboxes").join(&survivor));
    assert_eq!(survivor_agent.len(), 1, "{survivor_agent:?}");
    f.respawn_huskd().await;
    let agent = nix::unistd::Pid::from_raw(survivor_agent[0]);
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let mut rt = f.rt.clone();
    let request = cri::CreateContainerRequest {
        pod_sandbox_id: survivor.clone(),
        config: Some(container_config(
            "half",
            &f.image,
            &["sleep", "1000"],
            "half/0.log",
        )),
        sandbox_config: Some(config.clone()),
    };
    let call = tokio::spawn(async move { rt.create_container(request).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.huskd.kill();
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    let answer = call.await.expect("join");
    assert!(answer.is_err(), "the call ended with huskd: {answer:?}");

    // 3. After a restart: nothing of either call, the survivor as it was.
    f.respawn_huskd().await;
    let pods = support::list_pods(&mut f.rt).await;
    assert_eq!(
        pods.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        [survivor.as_str()],
        "only the ready pod is left: {pods:?}"
    );
    assert_eq!(pods[0].state, cri::PodSandboxState::SandboxReady as i32);
    assert!(!started.exists(), "the interrupted pod's directory is left");
    // Neither its agent nor the slow start's shell before it runs on.
    let named = |pid: &i32| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let needle = started.as_os_str().as_encoded_bytes();
        cmdline.windows(needle.len()).any(|w| w == needle)
    };
    let left: Vec<i32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(named)
        .collect();
    assert!(
        left.is_empty(),
        "the interrupted pod's processes run on: {left:?}"
    );
    let left = support::network_leftovers(&interrupted_id);
    assert!(
        left.is_empty(),
        "the interrupted pod's network is left: {left:?}"
    );
    assert!(
        !pod_cgroup(&interrupted_id, "pids").exists(),
        "the interrupted pod's cgroup is left"
    );
    let containers =
        f.rt.list_containers(cri::ListContainersRequest { filter: None })
            .await
            .expect("ListContainers")
            .into_inner()
            .containers;
    assert_eq!(
        containers.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        [ticker.as_str()],
        "only the ticker is left: {containers:?}"
    );
    // The half-created container's process (`sleep 1000`) is gone.
    let half = |pid: &i32| {
        std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default() == b"sleep\x001000\x00"
    };
    let deadline = Instant::now() + PATIENCE;
    while pod_pids(&survivor).iter().any(half) {
        assert!(
            Instant::now() < deadline,
            "the half-created container left a process"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The ticker's log goes on across both crashes.
    let last = *ticks_in(&log).iter().max().expect("ticks");
    ticks_until(&log, last + 3).await;
    f.remove_pod(&survivor).await;
    f.huskd.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_behaviours_kubelets_suite_checks() {
    let (mut f, pod, config) = Fixture::with_pod("conformance").await;
    let image = f.image.clone();
    support::check_cri_conformance(&mut f.rt, &pod, &config, &image).await;
    support::check_pid_namespaces(&mut f.rt, &pod, &config, &image, false).await;
    check_node_ipc(&mut f.rt, &pod, &config, &image).await;
    check_readonly_mount(&mut f.rt, &pod, &config, &image, f.dir.path()).await;
    check_mount_propagation(&mut f.rt, &pod, &config, &image, f.dir.path()).await;
    f.remove_pod(&pod).await;
    f.huskd.terminate();
}

/// IPC NODE: a shared memory segment made on the host is one the container
/// sees (in /proc/sysvipc/shm, which shows the reader's IPC namespace), and
/// a container with the pod's IPC namespace does not see it.
async fn check_node_ipc(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    image: &str,
) {
    let made = support::run("ipcmk", &[&"-M", &"4096"]);
    let shmid = made
        .split_whitespace()
        .last()
        .expect("ipcmk prints the segment's id")
        .to_owned();
    let segment_ids = |listing: &str| -> Vec<String> {
        listing
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
            .collect()
    };
    let mut seen = Vec::new();
    for ipc in [cri::NamespaceMode::Node, cri::NamespaceMode::Pod] {
        let mut config = container_config("ipc", image, &["sleep", "600"], "");
        config.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: ipc as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = support::run_container(rt, pod, config, Some(pod_config.clone())).await;
        let listing = support::exec_sync(rt, &id, &["cat", "/proc/sysvipc/shm"]).await;
        seen.push(segment_ids(&String::from_utf8_lossy(&listing.stdout)));
        rt.remove_container(cri::RemoveContainerRequest { container_id: id })
            .await
            .expect("RemoveContainer");
    }
    support::run("ipcrm", &[&"-m", &shmid]);
    assert!(
        seen[0].contains(&shmid),
        "IPC NODE: {shmid} not in {:?}",
        seen[0]
    );
    assert!(
        !seen[1].contains(&shmid),
        "IPC POD: {shmid} in {:?}",
        seen[1]
    );
}

/// A `readonly` mount is read-only in the container, and the mounts below
/// its source stay as they were (writable): not recursive.
async fn check_readonly_mount(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    image: &str,
    dir: &Path,
) {
    let source = dir.join("ro-volume");
    let below = source.join("below");
    std::fs::create_dir_all(&below).expect("volume dir");
    // Mounted after the pod started, as kubelet mounts a pod's volumes.
    let mut host_mounts = HostMounts::default();
    host_mounts.mount(&["-t", "tmpfs", "tmpfs"], &below);
    let mut config = container_config("ro-volume", image, &["sleep", "600"], "");
    config.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: source.display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    let id = support::run_container(rt, pod, config.clone(), Some(pod_config.clone())).await;
    let top = support::exec_sync(rt, &id, &["busybox", "touch", "/data/top"]).await;
    let sub = support::exec_sync(rt, &id, &["busybox", "touch", "/data/below/sub"]).await;
    rt.remove_container(cri::RemoveContainerRequest { container_id: id })
        .await
        .expect("RemoveContainer");
    // Recursive read-only, which Status says the host handler supports:
    // the mount below is read-only too.
    let status = support::runtime_status(rt).await;
    let host = status
        .runtime_handlers
        .iter()
        .find(|h| h.name == "host")
        .and_then(|h| h.features)
        .expect("the host handler's features");
    assert!(host.recursive_read_only_mounts);
    config.mounts[0].recursive_read_only = true;
    let id = support::run_container(rt, pod, config.clone(), Some(pod_config.clone())).await;
    let sub_rro = support::exec_sync(rt, &id, &["busybox", "touch", "/data/below/rro"]).await;
    rt.remove_container(cri::RemoveContainerRequest { container_id: id })
        .await
        .expect("RemoveContainer");
    assert!(
        sub_rro.exit_code != 0 && String::from_utf8_lossy(&sub_rro.stderr).contains("Read-only"),
        "a write below a recursively read-only mount: {sub_rro:?}"
    );
    // Recursive read-only needs a read-only mount.
    config.mounts[0].readonly = false;
    let refused = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect_err("recursive_read_only without readonly");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        below.join("sub").exists(),
        "the write below it did not reach the host"
    );
    assert_ne!(top.exit_code, 0, "a write to the read-only mount: {top:?}");
    assert!(
        String::from_utf8_lossy(&top.stderr).contains("Read-only"),
        "{top:?}"
    );
    assert_eq!(sub.exit_code, 0, "a write below it: {sub:?}");
}

/// Mounts made on the host, unmounted (lazily, last first) when dropped.
#[derive(Default)]
struct HostMounts(Vec<PathBuf>);

impl HostMounts {
    fn mount(&mut self, args: &[&str], target: &Path) {
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
        all.push(&target);
        support::run("mount", &all);
        self.0.push(target.to_owned());
    }
}

impl Drop for HostMounts {
    fn drop(&mut self) {
        for target in self.0.iter().rev() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(target)
                .status();
        }
    }
}

/// Mount propagation, with the volume's source a shared mount on the host
/// (as kubelet's directory is on a systemd host): PRIVATE sees nothing
/// mounted on the host later, HOST_TO_CONTAINER (rslave) does, and
/// BIDIRECTIONAL (rshared, privileged) does and also shows the host what
/// the container mounts.
async fn check_mount_propagation(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    image: &str,
    dir: &Path,
) {
    use cri::MountPropagation::{
        PropagationBidirectional, PropagationHostToContainer, PropagationPrivate,
    };
    let source = dir.join("propagated");
    std::fs::create_dir_all(&source).expect("volume dir");
    let mut host_mounts = HostMounts::default();
    host_mounts.mount(&["--bind", source.to_str().expect("utf-8 path")], &source);
    support::run("mount", &[&"--make-rshared", &source]);
    let mut containers = Vec::new();
    for (name, propagation) in [
        ("private", PropagationPrivate),
        ("to-container", PropagationHostToContainer),
        ("both-ways", PropagationBidirectional),
    ] {
        let mut config = container_config(name, image, &["sleep", "600"], "");
        config.mounts = vec![cri::Mount {
            container_path: "/vol".into(),
            host_path: source.display().to_string(),
            propagation: propagation as i32,
            ..Default::default()
        }];
        config.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                privileged: propagation == PropagationBidirectional,
                // The image's user is 1000: mounting takes root.
                run_as_user: Some(cri::Int64Value { value: 0 }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = support::run_container(rt, pod, config, Some(pod_config.clone())).await;
        containers.push((name, id));
    }
    let from_host = source.join("from-host");
    std::fs::create_dir_all(&from_host).expect("mount point");
    host_mounts.mount(&["-t", "tmpfs", "tmpfs"], &from_host);
    std::fs::write(from_host.join("mark"), "host").expect("mark");
    let mut seen = Vec::new();
    for (name, id) in &containers {
        let out = support::exec_sync(rt, id, &["cat", "/vol/from-host/mark"]).await;
        seen.push((*name, out.exit_code == 0));
    }
    let both_ways = &containers[2].1;
    let mounted = support::exec_sync(
        rt,
        both_ways,
        &["busybox", "mount", "-t", "tmpfs", "tmpfs", "/vol/from-host"],
    )
    .await;
    assert_eq!(mounted.exit_code, 0, "mount in the container: {mounted:?}");
    // The container's mount covers the host's: the mark is gone on the host too.
    let host_sees_it = !from_host.join("mark").exists();
    host_mounts.0.push(from_host.clone());
    for (_, id) in containers {
        rt.remove_container(cri::RemoveContainerRequest { container_id: id })
            .await
            .expect("RemoveContainer");
    }
    assert_eq!(
        seen,
        [
            ("private", false),
            ("to-container", true),
            ("both-ways", true)
        ],
        "which containers saw the host's later mount"
    );
    assert!(host_sees_it, "the host does not see the container's mount");
}
