//! huskd on bad input, end to end on the `host` sandbox driver: the built
//! huskd and husk-agent, a real registry on loopback holding images built
//! here (some of them hostile), and CRI driven over the unix socket with the
//! generated client, as kubelet does.
//!
//! Every bad call must get a clear gRPC status and leave huskd as it was:
//! still answering, with no new or missing file under its root (blob temp
//! files, unpack directories, blobs no image holds), no mount below the
//! test's directory, and no husk-agent, sandbox directory or cgroup of a pod
//! it does not list as ready.
//!
//! Needs root (namespaces, mounts, cgroups), scripts/install-deps.sh's
//! packages, and the binaries: `cargo build --release --workspace --bins`,
//! then `cargo test --release -p husk-runtime --test cri_bad_input`.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

use husk_e2e::mounts_below;
use support::{
    busybox_layer, gzip, image_config, layers_config, push_busybox, push_image, push_layers,
    push_single_platform_index, AgentSweeper, Huskd, Registry,
};

/// How long huskd has to settle (its clean-up after a failed pull runs in
/// the background).
const PATIENCE: Duration = Duration::from_secs(30);

/// RPCs huskd does not serve yet answer Unimplemented; once served, an
/// unknown id must be NotFound.
const NOT_FOUND_OR_NOT_YET: &[Code] = &[Code::NotFound, Code::Unimplemented];

/// A URL on huskd's streaming server (loopback by default).
fn assert_streaming_url(what: &str, url: &str, kind: &str) {
    assert!(
        url.starts_with("http://127.0.0.1:") && url.contains(&format!("/{kind}/")),
        "{what}: {url:?}"
    );
}

/// One huskd on the host driver with the busybox image pulled, and what its
/// root held then. Fields drop in order: huskd, then its agents, then the
/// directory.
struct Env {
    _huskd: Huskd,
    agents: AgentSweeper,
    rt: RuntimeServiceClient<Channel>,
    img: ImageServiceClient<Channel>,
    registry: Registry,
    busybox: String,
    dir: tempfile::TempDir,
    /// Every path under huskd's root once busybox was pulled.
    baseline: BTreeSet<PathBuf>,
    /// Every pod id huskd handed out, for the cgroup check.
    pods_seen: BTreeSet<String>,
}

impl Env {
    async fn start() -> Env {
        assert!(
            nix::unistd::geteuid().is_root(),
            "huskd's host driver creates namespaces, mounts and cgroups: run this as root"
        );
        let registry = Registry::start();
        let busybox = push_busybox(&registry, "").await;
        let dir = tempfile::tempdir().expect("tempdir");
        let agents = AgentSweeper::new(dir.path());
        let huskd = Huskd::spawn(&dir.path().join("husk.sock"), &Huskd::host_args(dir.path()));
        let channel = huskd.connect().await;
        let mut env = Env {
            _huskd: huskd,
            agents,
            rt: RuntimeServiceClient::new(channel.clone()),
            img: ImageServiceClient::new(channel),
            registry,
            busybox: busybox.clone(),
            dir,
            baseline: BTreeSet::new(),
            pods_seen: BTreeSet::new(),
        };
        env.pull(&busybox).await.expect("pull busybox");
        env.baseline = files_below(&env.root());
        env
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    async fn pull(&mut self, image: &str) -> Result<Response<cri::PullImageResponse>, Status> {
        self.img
            .pull_image(cri::PullImageRequest {
                image: Some(image_spec(image)),
                ..Default::default()
            })
            .await
    }

    async fn run_pod(&mut self, config: &cri::PodSandboxConfig) -> Result<String, Status> {
        let id = self.rt.run_pod_sandbox(run_pod_request(config)).await?;
        let id = id.into_inner().pod_sandbox_id;
        self.pods_seen.insert(id.clone());
        Ok(id)
    }

    async fn create(
        &mut self,
        pod: &str,
        config: cri::ContainerConfig,
        pod_config: &cri::PodSandboxConfig,
    ) -> Result<String, Status> {
        let id = self
            .rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await?;
        Ok(id.into_inner().container_id)
    }

    async fn remove_pod(&mut self, id: &str) {
        support::remove_pod(&mut self.rt, id).await;
    }

    /// huskd answers, and nothing is left of what failed: waits up to
    /// PATIENCE for that, then fails listing what is wrong.
    async fn assert_clean(&mut self, after: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let problems = self.leftovers().await;
            if problems.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {after}: {problems:#?}\nhuskd's root: {:#?}",
                files_below(&self.root())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn leftovers(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let version = self
            .rt
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await
            .expect("huskd answers Version")
            .into_inner();
        assert_eq!(version.runtime_name, "husk");
        let pods = support::list_pods(&mut self.rt).await;
        let listed: BTreeSet<&str> = pods.iter().map(|p| p.id.as_str()).collect();
        let ready: BTreeSet<&str> = pods
            .iter()
            .filter(|p| p.state == cri::PodSandboxState::SandboxReady as i32)
            .map(|p| p.id.as_str())
            .collect();

        let now = files_below(&self.root());
        for extra in now.difference(&self.baseline) {
            problems.push(format!("left in huskd's root: {}", extra.display()));
        }
        for missing in self.baseline.difference(&now) {
            problems.push(format!("gone from huskd's root: {}", missing.display()));
        }
        let sandboxes = self.dir.path().join("state/sandboxes");
        for entry in std::fs::read_dir(&sandboxes)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !listed.contains(name.as_str()) {
                problems.push(format!("sandbox directory of no pod: {name}"));
            }
        }
        for mount in mounts_below(self.dir.path()) {
            problems.push(format!("mounted: {mount}"));
        }
        let agents = self.agents.agents();
        for (pid, cmdline) in &agents {
            if !ready.iter().any(|id| cmdline.contains(id)) {
                problems.push(format!("husk-agent {pid} of no ready pod: {cmdline:?}"));
            }
        }
        for id in &ready {
            if !agents.iter().any(|(_, cmdline)| cmdline.contains(id)) {
                problems.push(format!("ready pod {id} has no husk-agent"));
            }
        }
        for id in self
            .pods_seen
            .iter()
            .filter(|id| !ready.contains(id.as_str()))
        {
            for controller in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten() {
                let Ok(controller) = controller else { continue };
                let cgroup = controller.path().join("husk").join(id);
                if cgroup.exists() {
                    problems.push(format!("cgroup of pod {id}: {}", cgroup.display()));
                }
            }
        }
        problems
    }
}

/// Every path below `dir`, relative to it; symlinks are not followed.
fn files_below(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path.clone());
            }
            out.insert(path.strip_prefix(dir).unwrap_or(&path).to_path_buf());
        }
    }
    out
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

fn pod_config(name: &str, attempt: u32, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt,
        }),
        log_directory: log_dir
            .join(format!("{name}-{attempt}"))
            .display()
            .to_string(),
        ..Default::default()
    }
}

fn run_pod_request(config: &cri::PodSandboxConfig) -> cri::RunPodSandboxRequest {
    cri::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: "host".into(),
    }
}

fn container_config(name: &str, attempt: u32, image: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt,
        }),
        image: Some(image_spec(image)),
        command: vec!["sleep".into(), "1000".into()],
        log_path: format!("{name}/{attempt}.log"),
        ..Default::default()
    }
}

/// The call failed with one of `codes`; returns its status.
fn refused<T: std::fmt::Debug>(
    what: &str,
    result: Result<Response<T>, Status>,
    codes: &[Code],
) -> Status {
    let status = match result {
        Ok(answer) => panic!("{what}: succeeded: {answer:?}"),
        Err(status) => status,
    };
    assert!(
        codes.contains(&status.code()),
        "{what}: wanted {codes:?}, got {status:?}"
    );
    assert!(!status.message().is_empty(), "{what}: no message");
    status
}

/// Exactly one of racing calls wins; the others are AlreadyExists naming it.
fn one_wins(what: &str, results: Vec<Result<String, Status>>) -> String {
    let (won, lost): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    let [Ok(id)] = won.as_slice() else {
        panic!("{what}: wanted one success, got {won:?} and {lost:?}");
    };
    for status in lost.into_iter().filter_map(Result::err) {
        assert_eq!(status.code(), Code::AlreadyExists, "{what}: {status:?}");
        assert!(status.message().contains(id.as_str()), "{what}: {status:?}");
    }
    id.clone()
}

/// Runs `call` with `n` clones of `rt` at once.
async fn race<F, Fut>(
    rt: &RuntimeServiceClient<Channel>,
    n: usize,
    call: F,
) -> Vec<Result<String, Status>>
where
    F: Fn(RuntimeServiceClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<String, Status>>,
{
    futures_util::future::join_all((0..n).map(|_| call(rt.clone()))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_duplicates_and_unpulled_images_are_refused_cleanly() {
    let mut env = Env::start().await;
    let logs = env.dir.path().join("logs");

    // Unknown ids, of the right shape and of a path's.
    for unknown in [&"0123456789abcdef".repeat(4), "../../../../etc/passwd"] {
        let rt = &mut env.rt;
        let status = refused(
            "PodSandboxStatus",
            rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: unknown.into(),
                verbose: false,
            })
            .await,
            &[Code::NotFound],
        );
        assert!(status.message().contains(unknown), "{status:?}");
        // Stop and Remove are idempotent (CRI): nothing left to reclaim is OK.
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: unknown.into(),
        })
        .await
        .expect("StopPodSandbox of an unknown pod is idempotent");
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: unknown.into(),
        })
        .await
        .expect("RemovePodSandbox of an unknown pod is idempotent");
        refused(
            "CreateContainer in an unknown pod",
            rt.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: unknown.into(),
                config: Some(container_config("c", 0, &env.busybox)),
                sandbox_config: Some(pod_config("nowhere", 0, &logs)),
            })
            .await,
            &[Code::NotFound],
        );
        refused(
            "PodSandboxStats",
            rt.pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: unknown.into(),
            })
            .await,
            NOT_FOUND_OR_NOT_YET,
        );
        refused(
            "PortForward",
            rt.port_forward(cri::PortForwardRequest {
                pod_sandbox_id: unknown.into(),
                port: vec![80],
            })
            .await,
            &[Code::NotFound],
        );

        let status = refused(
            "ContainerStatus",
            rt.container_status(cri::ContainerStatusRequest {
                container_id: unknown.into(),
                verbose: false,
            })
            .await,
            &[Code::NotFound],
        );
        assert!(status.message().contains(unknown), "{status:?}");
        refused(
            "StartContainer",
            rt.start_container(cri::StartContainerRequest {
                container_id: unknown.into(),
            })
            .await,
            &[Code::NotFound],
        );
        rt.stop_container(cri::StopContainerRequest {
            container_id: unknown.into(),
            timeout: 1,
        })
        .await
        .expect("StopContainer of an unknown container is idempotent");
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: unknown.into(),
        })
        .await
        .expect("RemoveContainer of an unknown container is idempotent");
        refused(
            "ExecSync",
            rt.exec_sync(cri::ExecSyncRequest {
                container_id: unknown.into(),
                cmd: vec!["true".into()],
                timeout: 5,
            })
            .await,
            &[Code::NotFound],
        );
        refused(
            "ContainerStats",
            rt.container_stats(cri::ContainerStatsRequest {
                container_id: unknown.into(),
            })
            .await,
            &[Code::NotFound],
        );
        refused(
            "UpdateContainerResources",
            rt.update_container_resources(cri::UpdateContainerResourcesRequest {
                container_id: unknown.into(),
                ..Default::default()
            })
            .await,
            NOT_FOUND_OR_NOT_YET,
        );
        refused(
            "ReopenContainerLog",
            rt.reopen_container_log(cri::ReopenContainerLogRequest {
                container_id: unknown.into(),
            })
            .await,
            NOT_FOUND_OR_NOT_YET,
        );
        refused(
            "Exec",
            rt.exec(cri::ExecRequest {
                container_id: unknown.into(),
                cmd: vec!["sh".into()],
                stdout: true,
                ..Default::default()
            })
            .await,
            &[Code::NotFound],
        );
        refused(
            "Attach",
            rt.attach(cri::AttachRequest {
                container_id: unknown.into(),
                stdout: true,
                ..Default::default()
            })
            .await,
            &[Code::NotFound],
        );
        refused(
            "CheckpointContainer",
            rt.checkpoint_container(cri::CheckpointContainerRequest {
                container_id: unknown.into(),
                ..Default::default()
            })
            .await,
            NOT_FOUND_OR_NOT_YET,
        );

        // Lists filtered by an unknown id are empty, not errors.
        let pods = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    id: unknown.into(),
                    ..Default::default()
                }),
            })
            .await
            .expect("ListPodSandbox")
            .into_inner()
            .items;
        assert!(pods.is_empty(), "{pods:?}");
        for filter in [
            cri::ContainerFilter {
                id: unknown.into(),
                ..Default::default()
            },
            cri::ContainerFilter {
                pod_sandbox_id: unknown.into(),
                ..Default::default()
            },
        ] {
            let containers = rt
                .list_containers(cri::ListContainersRequest {
                    filter: Some(filter),
                })
                .await
                .expect("ListContainers")
                .into_inner()
                .containers;
            assert!(containers.is_empty(), "{containers:?}");
        }
        let stats = rt
            .list_container_stats(cri::ListContainerStatsRequest {
                filter: Some(cri::ContainerStatsFilter {
                    id: unknown.into(),
                    ..Default::default()
                }),
            })
            .await
            .expect("ListContainerStats")
            .into_inner()
            .stats;
        assert!(stats.is_empty(), "{stats:?}");
        env.assert_clean(&format!("calls naming the unknown id {unknown:?}"))
            .await;
    }

    // An image huskd never pulled: by a tag the registry has, and by an id.
    let unpulled = format!("{}/husk/unpulled:1", env.registry.host());
    let layer = busybox_layer();
    push_image(
        &unpulled,
        layer.clone(),
        image_config("amd64", &layer, "", &["echo", "unpulled"]),
    )
    .await;
    let unknown_id = format!("sha256:{}", "ab".repeat(32));
    for image in [unpulled.as_str(), unknown_id.as_str()] {
        let status = env
            .img
            .image_status(cri::ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            })
            .await
            .expect("ImageStatus of an image not pulled")
            .into_inner();
        assert_eq!(status.image, None, "{image}");
        env.img
            .remove_image(cri::RemoveImageRequest {
                image: Some(image_spec(image)),
            })
            .await
            .expect("RemoveImage of an image not pulled is idempotent");
    }

    // Duplicate pods: the same name, uid, namespace and attempt.
    let p1_config = pod_config("p1", 0, &logs);
    let p1 = env.run_pod(&p1_config).await.expect("run p1");
    env.assert_clean("RunPodSandbox p1").await;
    let status = refused(
        "RunPodSandbox with p1's metadata",
        env.rt.run_pod_sandbox(run_pod_request(&p1_config)).await,
        &[Code::AlreadyExists],
    );
    assert!(status.message().contains(&p1), "{status:?}");
    env.assert_clean("a duplicate RunPodSandbox").await;
    // Four at once: huskd must start one.
    let p2_config = pod_config("p2", 0, &logs);
    let results = race(&env.rt, 4, |mut rt| {
        let request = run_pod_request(&p2_config);
        async move {
            Ok(rt
                .run_pod_sandbox(request)
                .await?
                .into_inner()
                .pod_sandbox_id)
        }
    })
    .await;
    let p2 = one_wins("racing RunPodSandbox of p2", results);
    env.pods_seen.insert(p2.clone());
    env.assert_clean("racing RunPodSandbox").await;
    env.remove_pod(&p2).await;
    env.assert_clean("removing p2").await;

    // Kubelet's next attempt of a pod is another pod; a container cannot be
    // created in it once it is stopped.
    let retry_config = pod_config("p1", 1, &logs);
    let retry = env.run_pod(&retry_config).await.expect("p1, attempt 1");
    env.rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: retry.clone(),
        })
        .await
        .expect("stop p1 attempt 1");
    let busybox = env.busybox.clone();
    let status = refused(
        "CreateContainer in a stopped pod",
        env.create(&retry, container_config("late", 0, &busybox), &retry_config)
            .await
            .map(Response::new),
        &[Code::FailedPrecondition],
    );
    assert!(status.message().contains(&retry), "{status:?}");
    env.assert_clean("CreateContainer in a stopped pod").await;
    env.remove_pod(&retry).await;

    // CreateContainer of an image that is not pulled: NotFound, saying so;
    // huskd does not pull behind kubelet's back.
    for image in [unpulled.as_str(), unknown_id.as_str()] {
        let status = refused(
            "CreateContainer of an image not pulled",
            env.create(&p1, container_config("ghost", 0, image), &p1_config)
                .await
                .map(Response::new),
            &[Code::NotFound],
        );
        assert!(
            status.message().contains(image) && status.message().contains("pull"),
            "{status:?}"
        );
        env.assert_clean("CreateContainer of an image not pulled")
            .await;
    }

    // Duplicate containers in one pod: the same name and attempt.
    let c1 = env
        .create(&p1, container_config("c1", 0, &busybox), &p1_config)
        .await
        .expect("create c1");
    env.rt
        .start_container(cri::StartContainerRequest {
            container_id: c1.clone(),
        })
        .await
        .expect("start c1");
    let status = refused(
        "CreateContainer with c1's metadata",
        env.create(&p1, container_config("c1", 0, &busybox), &p1_config)
            .await
            .map(Response::new),
        &[Code::AlreadyExists],
    );
    assert!(status.message().contains(&c1), "{status:?}");
    refused(
        "StartContainer of a running container",
        env.rt
            .start_container(cri::StartContainerRequest {
                container_id: c1.clone(),
            })
            .await,
        &[Code::FailedPrecondition],
    );

    // The streaming calls answer with URLs for the running container and
    // its ready pod (nothing is started before a client comes).
    let exec = env
        .rt
        .exec(cri::ExecRequest {
            container_id: c1.clone(),
            cmd: vec!["sh".into()],
            stdout: true,
            ..Default::default()
        })
        .await
        .expect("Exec in c1")
        .into_inner();
    assert_streaming_url("Exec", &exec.url, "exec");
    let attach = env
        .rt
        .attach(cri::AttachRequest {
            container_id: c1.clone(),
            stdout: true,
            ..Default::default()
        })
        .await
        .expect("Attach to c1")
        .into_inner();
    assert_streaming_url("Attach", &attach.url, "attach");
    let forward = env
        .rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: p1.clone(),
            port: vec![80],
        })
        .await
        .expect("PortForward to p1")
        .into_inner();
    assert_streaming_url("PortForward", &forward.url, "portforward");
    assert!(
        exec.url != attach.url && attach.url != forward.url,
        "one token per call"
    );
    // Bad requests for a known container: no command, no stream, stdin
    // the container was not created with.
    refused(
        "Exec without a command",
        env.rt
            .exec(cri::ExecRequest {
                container_id: c1.clone(),
                stdout: true,
                ..Default::default()
            })
            .await,
        &[Code::InvalidArgument],
    );
    refused(
        "Attach without a stream",
        env.rt
            .attach(cri::AttachRequest {
                container_id: c1.clone(),
                ..Default::default()
            })
            .await,
        &[Code::InvalidArgument],
    );
    refused(
        "Attach with stdin to a container without stdin",
        env.rt
            .attach(cri::AttachRequest {
                container_id: c1.clone(),
                stdin: true,
                stdout: true,
                ..Default::default()
            })
            .await,
        &[Code::InvalidArgument],
    );
    let results = race(&env.rt, 4, |mut rt| {
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: p1.clone(),
            config: Some(container_config("c2", 0, &busybox)),
            sandbox_config: Some(p1_config.clone()),
        };
        async move {
            Ok(rt
                .create_container(request)
                .await?
                .into_inner()
                .container_id)
        }
    })
    .await;
    one_wins("racing CreateContainer of c2", results);
    // A restarted container is a new attempt, and no duplicate.
    let c1_again = env
        .create(&p1, container_config("c1", 1, &busybox), &p1_config)
        .await
        .expect("c1, attempt 1");
    env.assert_clean("duplicate containers").await;
    // A container created but not started has nothing to stream.
    refused(
        "Exec in a container not started",
        env.rt
            .exec(cri::ExecRequest {
                container_id: c1_again.clone(),
                cmd: vec!["sh".into()],
                stdout: true,
                ..Default::default()
            })
            .await,
        &[Code::FailedPrecondition],
    );
    refused(
        "Attach to a container not started",
        env.rt
            .attach(cri::AttachRequest {
                container_id: c1_again.clone(),
                stdout: true,
                ..Default::default()
            })
            .await,
        &[Code::FailedPrecondition],
    );

    // Once p1 is removed, its name is free again.
    env.remove_pod(&p1).await;
    env.assert_clean("removing p1").await;
    let again = env.run_pod(&p1_config).await.expect("p1 after its removal");
    env.remove_pod(&again).await;
    env.assert_clean("p1 again, removed").await;
    let containers = env
        .rt
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    assert!(containers.is_empty(), "{containers:?}");
}

/// A gzip layer of raw tar entries (kind, path, link name, content): names
/// go into the header as they are, where tar-rs's own setters would refuse
/// `..` and absolute paths.
fn raw_layer(entries: &[(tar::EntryType, &str, &str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for &(kind, path, link, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        let old = header.as_old_mut();
        assert!(path.len() < old.name.len() && link.len() < old.linkname.len());
        old.name[..path.len()].copy_from_slice(path.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_size(data.len() as u64);
        header.set_mode(if kind == tar::EntryType::Symlink {
            0o777
        } else {
            0o644
        });
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        tar.append(&header, data).expect("tar entry");
    }
    gzip(&tar.into_inner().expect("tar"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pulls_get_clear_errors_and_leave_nothing_behind() {
    let mut env = Env::start().await;
    let host = env.registry.host();
    // Where a layer escaping the rootfs would write: the test's directory,
    // outside huskd's root.
    let outside = env.dir.path().join("outside");
    std::fs::create_dir(&outside).expect("outside");
    let escape = env.dir.path().join("escape");
    let check_outside = |after: &str| {
        let written: Vec<_> = std::fs::read_dir(&outside)
            .expect("outside")
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(written.is_empty(), "after {after}: {written:?}");
        assert!(
            !escape.exists(),
            "after {after}: {} exists",
            escape.display()
        );
    };

    // Not there: an unknown tag, an unknown repository.
    for missing in [
        format!("{host}/husk/busybox:nope"),
        format!("{host}/husk/nothing:latest"),
    ] {
        let status = refused(
            "pulling a missing image",
            env.pull(&missing).await,
            &[Code::NotFound],
        );
        assert!(status.message().contains(&missing), "{status:?}");
        env.assert_clean(&format!("pulling {missing}")).await;
    }

    // A registry nobody listens for: Unavailable, without waiting out a
    // connect timeout (the port refuses at once).
    let unreachable = format!("127.0.0.1:{}/husk/busybox:latest", support::free_port());
    let started = Instant::now();
    let status = refused(
        "pulling from a closed port",
        env.pull(&unreachable).await,
        &[Code::Unavailable],
    );
    let took = started.elapsed();
    eprintln!("PullImage from a closed port: {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}: {status:?}");
    assert!(status.message().contains(&unreachable), "{status:?}");
    env.assert_clean("pulling from a closed port").await;

    // A manifest list without linux/amd64.
    let layer = busybox_layer();
    let arm = push_image(
        &format!("{host}/husk/armonly:arm64"),
        layer.clone(),
        image_config("arm64", &layer, "", &["sh"]),
    )
    .await;
    let arm_only = format!("{host}/husk/armonly:latest");
    push_single_platform_index(&arm_only, &arm, "linux", "arm64").await;
    let status = refused(
        "pulling an index without linux/amd64",
        env.pull(&arm_only).await,
        &[Code::NotFound],
    );
    for wanted in [arm_only.as_str(), "linux/amd64", "linux/arm64"] {
        assert!(status.message().contains(wanted), "{wanted}: {status:?}");
    }
    env.assert_clean("pulling an index without linux/amd64")
        .await;

    // Hostile layers, each on top of the busybox layer (whose blob stays:
    // the busybox image holds it).
    use tar::EntryType::{Link, Regular, Symlink};
    let outside_abs = outside.display().to_string();
    let outside_rel = format!(
        "{}{}",
        "../".repeat(12),
        outside_abs.trim_start_matches('/')
    );
    let pwned: &[u8] = b"pwned";
    let hostile: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        (
            "dotdot",
            vec![raw_layer(&[(Regular, "../../../../escape", "", pwned)])],
            "`..`",
        ),
        (
            "relative-symlink",
            // The symlink in one layer, the file written through it in the next.
            vec![
                raw_layer(&[(Symlink, "evil", &outside_rel, b"")]),
                raw_layer(&[(Regular, "evil/pwned", "", pwned)]),
            ],
            "symlink evil",
        ),
        (
            "absolute-symlink",
            vec![raw_layer(&[
                (Symlink, "abs", &outside_abs, b""),
                (Regular, "abs/pwned", "", pwned),
            ])],
            "symlink abs",
        ),
        (
            "absolute-hardlink",
            vec![raw_layer(&[(Link, "shadow", "/etc/shadow", b"")])],
            "outside the rootfs",
        ),
    ];
    for (name, evil_layers, why) in hostile {
        let reference = format!("{host}/husk/{name}:1");
        let mut layers = vec![layer.clone()];
        layers.extend(evil_layers);
        let gz: Vec<&[u8]> = layers.iter().map(Vec::as_slice).collect();
        let config = layers_config("amd64", &gz, "", &["sh"]);
        push_layers(&reference, layers, config).await;
        let status = refused(
            &format!("pulling {name}"),
            env.pull(&reference).await,
            &[Code::InvalidArgument],
        );
        eprintln!("{name}: {status:?}");
        for wanted in [reference.as_str(), "refusing entry", why] {
            assert!(status.message().contains(wanted), "{wanted}: {status:?}");
        }
        check_outside(name);
        env.assert_clean(&format!("pulling {name}")).await;
        let listed = env
            .img
            .list_images(cri::ListImagesRequest { filter: None })
            .await
            .expect("ListImages")
            .into_inner()
            .images;
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].repo_tags, [env.busybox.clone()]);
    }

    // The good image still pulls, from what huskd kept.
    let busybox = env.busybox.clone();
    env.pull(&busybox).await.expect("busybox again");
    env.assert_clean("pulling busybox again").await;
}
