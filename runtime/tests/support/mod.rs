//! Test fixtures shared by huskd's integration tests (and meant for later
//! end-to-end suites): a real OCI registry on loopback (Debian's
//! `docker-registry`), and a busybox image built here from Debian's
//! `busybox-static`, pushed with oci-client.
#![allow(dead_code)] // each test binary uses a different part

pub mod streaming;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{self as mt, OciImageIndex, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
pub const HUSKD: &str = env!("CARGO_BIN_EXE_huskd");
pub const BUSYBOX_BIN: &str = "/bin/busybox";

/// A `docker-registry serve` on 127.0.0.1, killed when dropped.
pub struct Registry {
    child: Child,
    pub port: u16,
    _storage: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry on a free loopback port and waits until `/v2/`
    /// answers. Panics, naming the fix, if `docker-registry` is not installed.
    pub fn start() -> Self {
        assert!(
            Path::new(REGISTRY_BIN).is_file(),
            "{REGISTRY_BIN} is missing: run scripts/install-deps.sh (Debian package docker-registry)"
        );
        let storage = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = storage.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                storage.path().join("data").display()
            ),
        )
        .expect("write registry config");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn docker-registry");
        let mut registry = Self {
            child,
            port,
            _storage: storage,
        };
        registry.wait_ready();
        registry
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("docker-registry exited early: {status}");
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut reply = String::new();
                let _ = s.read_to_string(&mut reply);
                if reply.starts_with("HTTP/1.") && reply.contains(" 200 ") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "docker-registry did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The busybox layer: `/bin/busybox` from Debian's busybox-static, applet
/// symlinks, and an `/etc/passwd` with a `husk` user (uid 1000).
pub fn busybox_layer() -> Vec<u8> {
    assert!(
        Path::new(BUSYBOX_BIN).is_file(),
        "{BUSYBOX_BIN} is missing: run scripts/install-deps.sh (Debian package busybox-static)"
    );
    let mut tar = tar::Builder::new(Vec::new());
    let dir = |tar: &mut tar::Builder<Vec<u8>>, path: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        tar.append_data(&mut h, path, std::io::empty())
            .expect("tar a directory");
    };
    for d in ["bin", "etc", "tmp", "home/husk"] {
        dir(&mut tar, d);
    }
    let busybox = std::fs::read(BUSYBOX_BIN).expect("read busybox");
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    h.set_mtime(1_700_000_000);
    tar.append_data(&mut h, "bin/busybox", busybox.as_slice())
        .expect("tar busybox");
    for applet in ["sh", "ls", "echo", "cat", "sleep", "id", "true"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("tar an applet link");
    }
    let passwd = b"root:x:0:0:root:/root:/bin/sh\nhusk:x:1000:1000:husk:/home/husk:/bin/sh\n";
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(passwd.len() as u64);
    h.set_mtime(1_700_000_000);
    tar.append_data(&mut h, "etc/passwd", &passwd[..])
        .expect("tar /etc/passwd");
    gzip(&tar.into_inner().expect("finish the tar"))
}

/// `data` gzip-compressed, as layers are pushed.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).expect("gzip in memory");
    gz.finish().expect("gzip in memory")
}

/// An image config for `arch` with the busybox layer's diff id.
pub fn image_config(arch: &str, layer_tar_gz: &[u8], user: &str, cmd: &[&str]) -> Vec<u8> {
    layers_config(arch, &[layer_tar_gz], user, cmd)
}

/// An image config for `arch` with the diff ids of `layers` (gzip tars).
pub fn layers_config(arch: &str, layers: &[&[u8]], user: &str, cmd: &[&str]) -> Vec<u8> {
    use sha2::Digest as _;
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|gz| {
            let mut tar = Vec::new();
            flate2::read::GzDecoder::new(*gz)
                .read_to_end(&mut tar)
                .expect("gunzip a layer");
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tar)))
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "User": user,
            "Cmd": cmd,
            "Env": ["PATH=/bin"],
            "WorkingDir": "/home/husk",
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .expect("encode the image config")
}

fn client() -> Client {
    // oci-client is built without a TLS provider of its own; loopback is
    // plain http, but reqwest wants one installed all the same.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    })
}

/// Pushes an image made of `layer` (gzip tar) and `config`; returns the
/// manifest's digest.
pub async fn push_image(reference: &str, layer: Vec<u8>, config: Vec<u8>) -> String {
    push_layers(reference, vec![layer], config).await
}

/// Pushes an image made of `layers` (gzip tars, lowest first) and `config`;
/// returns the manifest's digest.
pub async fn push_layers(reference: &str, layers: Vec<Vec<u8>>, config: Vec<u8>) -> String {
    let reference: Reference = reference.parse().expect("reference");
    let layers: Vec<ImageLayer> = layers
        .into_iter()
        .map(|layer| ImageLayer::new(layer, mt::IMAGE_LAYER_GZIP_MEDIA_TYPE.into(), None))
        .collect();
    let config = Config::new(config, mt::IMAGE_CONFIG_MEDIA_TYPE.into(), None);
    let manifest = OciImageManifest::build(&layers, &config, None);
    let client = client();
    client
        .push(
            &reference,
            &layers,
            config,
            &RegistryAuth::Anonymous,
            Some(manifest),
        )
        .await
        .expect("push image");
    client
        .fetch_manifest_digest(&reference, &RegistryAuth::Anonymous)
        .await
        .expect("manifest digest")
}

/// A registry holding the busybox image as `husk/busybox:latest`, run as
/// `user` with `sh` as its command; returns the registry and the image's
/// reference.
pub async fn busybox_registry(user: &str) -> (Registry, String) {
    let registry = Registry::start();
    let image = push_busybox(&registry, user).await;
    (registry, image)
}

/// Pushes the busybox image (`sh` as its command, `user` as its user) to
/// `registry` as `husk/busybox:latest`; returns that reference.
pub async fn push_busybox(registry: &Registry, user: &str) -> String {
    let layer = busybox_layer();
    let image = format!("{}/husk/busybox:latest", registry.host());
    push_image(
        &image,
        layer.clone(),
        image_config("amd64", &layer, user, &["sh"]),
    )
    .await;
    image
}

/// Pushes an image index at `reference` whose only manifest is the
/// (already pushed) `manifest_digest`, declared as `os/arch`.
pub async fn push_single_platform_index(
    reference: &str,
    manifest_digest: &str,
    os: &str,
    arch: &str,
) {
    let reference: Reference = reference.parse().expect("reference");
    let client = client();
    let (body, _) = client
        .pull_manifest_raw(
            &reference.clone_with_digest(manifest_digest.into()),
            &RegistryAuth::Anonymous,
            &[mt::OCI_IMAGE_MEDIA_TYPE],
        )
        .await
        .expect("pull manifest");
    let index: OciImageIndex = serde_json::from_value(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": mt::OCI_IMAGE_INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": mt::OCI_IMAGE_MEDIA_TYPE,
            "digest": manifest_digest,
            "size": body.len(),
            "platform": { "os": os, "architecture": arch },
        }],
    }))
    .expect("index");
    client
        .push_manifest_list(&reference, &RegistryAuth::Anonymous, index)
        .await
        .expect("push index");
}

/// Pulls `image` through huskd's image service, which must succeed.
pub async fn pull(
    img: &mut k8s_cri::v1::image_service_client::ImageServiceClient<Channel>,
    image: &str,
) {
    img.pull_image(k8s_cri::v1::PullImageRequest {
        image: Some(k8s_cri::v1::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("pull");
}

/// A container config as kubelet sends it: name, image, command, log path.
pub fn container_config(
    name: &str,
    image: &str,
    command: &[&str],
    log_path: &str,
) -> k8s_cri::v1::ContainerConfig {
    k8s_cri::v1::ContainerConfig {
        metadata: Some(k8s_cri::v1::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(k8s_cri::v1::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: log_path.into(),
        ..Default::default()
    }
}

/// Every pod huskd lists.
pub async fn list_pods(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
) -> Vec<k8s_cri::v1::PodSandbox> {
    rt.list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest { filter: None })
        .await
        .expect("list pods")
        .into_inner()
        .items
}

/// Every container huskd lists.
pub async fn list_containers(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
) -> Vec<k8s_cri::v1::Container> {
    rt.list_containers(k8s_cri::v1::ListContainersRequest { filter: None })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers
}

/// A pod's CRI status, which must be there.
pub async fn pod_status(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
    id: &str,
) -> k8s_cri::v1::PodSandboxStatus {
    rt.pod_sandbox_status(k8s_cri::v1::PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: false,
    })
    .await
    .expect("pod status")
    .into_inner()
    .status
    .expect("status")
}

/// Waits until the ready pod `id` fails by itself (NOTREADY) within
/// `within`, and returns how long that took and huskd's verbose facts about
/// it (`info["info"]`, which says why).
pub async fn wait_pod_failed(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
    id: &str,
    within: Duration,
) -> (Duration, String) {
    let began = Instant::now();
    loop {
        let answer = rt
            .pod_sandbox_status(k8s_cri::v1::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            })
            .await
            .expect("pod status")
            .into_inner();
        let status = answer.status.expect("status");
        if status.state == k8s_cri::v1::PodSandboxState::SandboxNotready as i32 {
            let info = answer.info.get("info").cloned().unwrap_or_default();
            return (began.elapsed(), info);
        }
        assert!(
            began.elapsed() < within,
            "still ready after {within:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// huskd's facts about a pod from its verbose status (`info["info"]`: the
/// driver and, for a VM, its size and KVM kind); empty if there are none.
pub async fn pod_info(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
    id: &str,
) -> String {
    rt.pod_sandbox_status(k8s_cri::v1::PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: true,
    })
    .await
    .map(|r| r.into_inner().info.remove("info").unwrap_or_default())
    .unwrap_or_default()
}

/// The runtime's Status answer: conditions and handlers.
pub async fn runtime_status(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
) -> k8s_cri::v1::StatusResponse {
    rt.status(k8s_cri::v1::StatusRequest { verbose: false })
        .await
        .expect("status")
        .into_inner()
}

/// ExecSync, which must be answered (any exit code); prints how long it took.
pub async fn exec_sync(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
    container: &str,
    cmd: &[&str],
) -> k8s_cri::v1::ExecSyncResponse {
    let t = Instant::now();
    let out = rt
        .exec_sync(k8s_cri::v1::ExecSyncRequest {
            container_id: container.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 120,
        })
        .await
        .expect("exec")
        .into_inner();
    eprintln!("ExecSync {cmd:?}: {:?}", t.elapsed());
    out
}

/// Runs a pod named `name` (uid `uid-NAME`, namespace default) on
/// `handler`; its id and config.
pub async fn run_pod(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
    name: &str,
    handler: &str,
) -> (String, k8s_cri::v1::PodSandboxConfig) {
    let config = k8s_cri::v1::PodSandboxConfig {
        metadata: Some(k8s_cri::v1::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        ..Default::default()
    };
    let id = rt
        .run_pod_sandbox(k8s_cri::v1::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox {name} on {handler}: {}", e.message()))
        .into_inner()
        .pod_sandbox_id;
    (id, config)
}

/// Creates a container from `config` in `pod` and starts it; its id.
pub async fn run_container(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
    pod: &str,
    config: k8s_cri::v1::ContainerConfig,
    sandbox_config: Option<k8s_cri::v1::PodSandboxConfig>,
) -> String {
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = rt
        .create_container(k8s_cri::v1::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config,
        })
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e:?}"))
        .into_inner()
        .container_id;
    rt.start_container(k8s_cri::v1::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("start {name}: {e:?}"));
    id
}

/// CRI behaviours kubelet's validation suite checks, in the ready pod `pod`
/// (config `pod_config`) with `image` pulled; on either driver:
/// - the ids crictl prints (13 characters) name pods and containers;
/// - Stop and Remove of ids that name nothing succeed (idempotent);
/// - run_as_group without run_as_user is InvalidArgument;
/// - RemoveContainer of a running container kills it, and it is gone from
///   the very next list (several times: it used to race its exit watcher);
/// - a privileged container runs;
/// - StopContainer of an exited container returns at once.
pub async fn check_cri_conformance(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &k8s_cri::v1::PodSandboxConfig,
    image: &str,
) {
    use k8s_cri::v1 as cri;
    let short = &pod[..13];
    let status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: short.into(),
            verbose: false,
        })
        .await
        .expect("PodSandboxStatus by a 13-character id")
        .into_inner();
    assert_eq!(status.status.expect("status").id, pod);
    let gone = "f".repeat(64);
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: gone.clone(),
    })
    .await
    .expect("StopPodSandbox of nothing is OK");
    rt.stop_container(cri::StopContainerRequest {
        container_id: gone.clone(),
        timeout: 1,
    })
    .await
    .expect("StopContainer of nothing is OK");

    let mut lonely_group = container_config("lonely-group", image, &["true"], "");
    lonely_group.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_group: Some(cri::Int64Value { value: 60 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let refused = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(lonely_group),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect_err("run_as_group without a user");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    for attempt in 0..3 {
        let name = format!("removed-running-{attempt}");
        let config = container_config(&name, image, &["sleep", "600"], "");
        let id = run_container(rt, pod, config, Some(pod_config.clone())).await;
        // By the short id, as `crictl rm -f` does.
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: id[..13].into(),
        })
        .await
        .expect("RemoveContainer of a running container");
        let listed = list_containers(rt).await;
        assert!(
            listed.iter().all(|c| c.id != id),
            "removed, yet listed: {listed:?}"
        );
    }

    // A stop right after the start (critest stops 3 ms later) reaches the
    // program once it handles SIGTERM, though it is its PID namespace's
    // init and the first SIGTERM came before its handler: exit 7 is the
    // handler's, a lost SIGTERM would end in SIGKILL (137) a minute later.
    let late_trap = "sleep 0.5; trap 'exit 7' TERM; while true; do sleep 0.1; done";
    let config = container_config("late-trap", image, &["sh", "-c", late_trap], "");
    let trapping = run_container(rt, pod, config, Some(pod_config.clone())).await;
    rt.stop_container(cri::StopContainerRequest {
        container_id: trapping.clone(),
        timeout: 60,
    })
    .await
    .expect("StopContainer right after StartContainer");
    let stopped = container_status(rt, &trapping).await;
    assert_eq!(
        (stopped.state, stopped.exit_code),
        (cri::ContainerState::ContainerExited as i32, 7),
        "the SIGTERM did not reach the handler: {stopped:?}"
    );
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: trapping,
    })
    .await
    .expect("RemoveContainer");

    // Supplementary groups, Strict: exactly the config's, in the process and
    // in ContainerStatus.user (which Status says huskd reports).
    let features = runtime_status(rt).await.features.expect("runtime features");
    assert!(features.supplemental_groups_policy);
    let mut strict = container_config("groups", image, &["sleep", "600"], "");
    strict.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 1234 }),
            supplemental_groups: vec![5678],
            supplemental_groups_policy: cri::SupplementalGroupsPolicy::Strict as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    let grouped = run_container(rt, pod, strict, Some(pod_config.clone())).await;
    let status = exec_sync(rt, &grouped, &["cat", "/proc/self/status"]).await;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let line = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|rest| rest.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(line("Uid:")[0], "1234", "{status}");
    assert_eq!(line("Groups:"), ["5678"], "{status}");
    let user = container_status(rt, &grouped)
        .await
        .user
        .and_then(|u| u.linux)
        .expect("ContainerStatus.user");
    assert_eq!((user.uid, user.supplemental_groups), (1234, vec![5678]));
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: grouped,
    })
    .await
    .expect("RemoveContainer");

    // A Localhost seccomp profile (Docker's format, a file on the node)
    // blocks what it lists: sethostname(2) here, with EOPNOTSUPP, where the
    // kernel alone says EPERM (the process lacks CAP_SYS_ADMIN).
    let profile = tempfile::NamedTempFile::new().expect("profile file");
    std::fs::write(
        profile.path(),
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}],
            "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 95}]}"#,
    )
    .expect("write the profile");
    let mut outcomes = Vec::new();
    for localhost_ref in [Some(profile.path().display().to_string()), None] {
        let mut config = container_config("seccomp", image, &["sleep", "600"], "");
        config.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                seccomp: localhost_ref.map(|path| cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::Localhost as i32,
                    localhost_ref: path,
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = run_container(rt, pod, config, Some(pod_config.clone())).await;
        let out = exec_sync(rt, &id, &["busybox", "hostname", "renamed"]).await;
        outcomes.push((
            out.exit_code,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
        rt.remove_container(cri::RemoveContainerRequest { container_id: id })
            .await
            .expect("RemoveContainer");
    }
    assert!(
        outcomes[0].0 != 0 && outcomes[0].1.contains("not supported"),
        "sethostname under the profile: {:?}",
        outcomes[0]
    );
    assert!(
        outcomes[1].0 != 0 && outcomes[1].1.contains("not permitted"),
        "sethostname without it: {:?}",
        outcomes[1]
    );
    let mut missing = container_config("no-profile", image, &["true"], "");
    missing.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Localhost as i32,
                localhost_ref: "/nonexistent/profile.json".into(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let refused = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(missing),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect_err("a profile that is not there");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("/nonexistent/profile.json"),
        "{refused:?}"
    );

    // A privileged container (all the capabilities the runtime holds, even
    // where the host withholds some from it) runs; and so does `true` here.
    let mut privileged = container_config("done", image, &["true"], "");
    privileged.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let done = run_container(rt, pod, privileged, Some(pod_config.clone())).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let exited = loop {
        let status = container_status(rt, &done).await;
        if status.state == cri::ContainerState::ContainerExited as i32 {
            break status;
        }
        assert!(Instant::now() < deadline, "`true` never exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exited.exit_code, 0, "privileged `true`: {exited:?}");
    let t = Instant::now();
    rt.stop_container(cri::StopContainerRequest {
        container_id: done.clone(),
        timeout: 60,
    })
    .await
    .expect("StopContainer of an exited container");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "it waited: {:?}",
        t.elapsed()
    );
    rt.remove_container(cri::RemoveContainerRequest { container_id: done })
        .await
        .expect("RemoveContainer");
}

/// PID namespaces: POD puts a pod's containers in one (each sees the
/// other's process, and on the host driver not the node's); NODE the
/// node's (on the host driver it sees the node's agents; in a VM it is
/// refused).
pub async fn check_pid_namespaces(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &k8s_cri::v1::PodSandboxConfig,
    image: &str,
    in_vm: bool,
) {
    use k8s_cri::v1 as cri;
    let with_pid = |name: &str, mode: cri::NamespaceMode| {
        let mut config = container_config(name, image, &["sleep", "600"], "");
        config.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: mode as i32,
                    network: pod_config
                        .linux
                        .as_ref()
                        .and_then(|l| l.security_context.as_ref())
                        .and_then(|s| s.namespace_options.as_ref())
                        .map_or(0, |n| n.network),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        config
    };
    let ps = |out: k8s_cri::v1::ExecSyncResponse| String::from_utf8_lossy(&out.stdout).into_owned();
    let mut ids = Vec::new();
    if in_vm {
        let refused = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(with_pid("host-pid", cri::NamespaceMode::Node)),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .expect_err("hostPID in a VM");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("PID namespace"), "{refused:?}");
    } else {
        let config = with_pid("host-pid", cri::NamespaceMode::Node);
        let id = run_container(rt, pod, config, Some(pod_config.clone())).await;
        let listing = ps(exec_sync(rt, &id, &["busybox", "ps"]).await);
        assert!(
            listing.contains("husk-agent"),
            "hostPID sees the node's: {listing}"
        );
        ids.push(id);
    }
    let mut peers = Vec::new();
    for name in ["peer-a", "peer-b"] {
        let config = with_pid(name, cri::NamespaceMode::Pod);
        peers.push(run_container(rt, pod, config, Some(pod_config.clone())).await);
    }
    let listing = ps(exec_sync(rt, &peers[1], &["busybox", "ps"]).await);
    assert_eq!(
        listing.matches("sleep 600").count(),
        2,
        "peer-b sees both sleeps, and no others: {listing}"
    );
    // On the host the pod's namespace is its own, not the node's (in a VM
    // the agent is the guest's, and the pod's, init).
    assert!(
        in_vm || !listing.contains("husk-agent"),
        "a POD container sees the node's processes: {listing}"
    );
    for id in ids.into_iter().chain(peers) {
        rt.remove_container(cri::RemoveContainerRequest { container_id: id })
            .await
            .expect("remove a peer");
    }
}

/// Stops and removes a pod, which must succeed.
pub async fn remove_pod(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
    pod: &str,
) {
    rt.stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("stop pod");
    rt.remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("remove pod");
}

/// A container's CRI status, which must be there.
pub async fn container_status(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    id: &str,
) -> k8s_cri::v1::ContainerStatus {
    rt.container_status(k8s_cri::v1::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .expect("container status")
    .into_inner()
    .status
    .expect("status")
}

/// Runs a program and returns its stdout, panicking with stderr on failure.
pub fn run(program: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = Command::new(program)
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// husk-agent from HUSK_AGENT, or next to huskd in the target directory.
pub fn husk_agent() -> PathBuf {
    workspace_binary("husk-agent", "HUSK_AGENT")
}

/// huskctl (its own crate, so not one of this package's binaries) from
/// HUSKCTL, or next to huskd in the target directory.
pub fn huskctl() -> PathBuf {
    workspace_binary("huskctl", "HUSKCTL")
}

/// A binary of another workspace package: from the environment variable
/// `var`, or next to huskd in the target directory, where `cargo build
/// --workspace --bins` puts it.
fn workspace_binary(package: &str, var: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(HUSKD).with_file_name(package));
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build -p {package}` (or set {var})",
        path.display()
    );
    path
}

/// Stops, when dropped, every husk-agent whose command line names `dir`:
/// huskd's host-driver agents outlive a killed huskd on purpose (a new huskd
/// reconnects), so a test that fails part way would leave them, and their
/// containers, running. SIGTERM lets each agent remove its containers first.
/// Declare it before the huskd it covers, so that it drops after it.
pub struct AgentSweeper {
    dir: String,
}

impl AgentSweeper {
    pub fn new(dir: &Path) -> AgentSweeper {
        AgentSweeper {
            dir: dir.display().to_string(),
        }
    }

    /// The husk-agents running for its directory.
    pub fn agents(&self) -> Vec<(i32, String)> {
        agents_under(&self.dir)
    }
}

/// The husk-agents whose command line names `dir`: pid and command line
/// (NUL-separated).
pub fn agents_under(dir: &str) -> Vec<(i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
            // huskd's own command line names husk-agent too, as an argument.
            let program = cmdline.split('\0').next().unwrap_or_default();
            (program.ends_with("husk-agent") && cmdline.contains(dir)).then_some((pid, cmdline))
        })
        .collect()
}

/// The pids of the husk-agents whose command line names `dir`.
pub fn agent_pids(dir: &Path) -> Vec<i32> {
    agents_under(&dir.display().to_string())
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

impl Drop for AgentSweeper {
    fn drop(&mut self) {
        for (pid, _) in self.agents() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.agents().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Where the host's cgroup hierarchies are.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup (below its hierarchy's root) `pid` is in, per hierarchy line
/// of /proc/PID/cgroup (`controllers` -> path).
pub fn cgroups_of(pid: u32) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

/// Whether the cgroup `relative` exists in any hierarchy.
pub fn cgroup_exists(relative: &str) -> bool {
    let relative = relative.trim_start_matches('/');
    Path::new(CGROUP_ROOT)
        .join(relative)
        .join("cgroup.procs")
        .exists()
        || std::fs::read_dir(CGROUP_ROOT)
            .into_iter()
            .flatten()
            .flatten()
            .any(|h| h.path().join(relative).is_dir())
}

/// A pod cgroup parent made kubelet's way (cgroupfs driver) in every v1
/// hierarchy or the v2 one; removed when dropped, after whatever huskd
/// should have removed below it.
pub struct CgroupParent(pub String);

impl CgroupParent {
    pub fn new(path: &str) -> CgroupParent {
        for hierarchy in Self::hierarchies() {
            let mut dir = hierarchy.clone();
            for part in Path::new(path.trim_start_matches('/')).components() {
                let parent = dir.clone();
                dir.push(part);
                std::fs::create_dir_all(&dir).expect("make the cgroup parent");
                // kubelet gives a v1 cpuset cgroup its parent's CPUs and nodes.
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    if let Ok(value) = std::fs::read_to_string(parent.join(file)) {
                        std::fs::write(dir.join(file), value.trim()).expect("cpuset");
                    }
                }
            }
        }
        CgroupParent(path.to_owned())
    }

    fn hierarchies() -> Vec<PathBuf> {
        let root = Path::new(CGROUP_ROOT);
        if root.join("cgroup.controllers").exists() {
            return vec![root.to_owned()];
        }
        std::fs::read_dir(root)
            .expect(CGROUP_ROOT)
            .flatten()
            .filter(|h| !h.path().is_symlink())
            .map(|h| h.path())
            .collect()
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        for hierarchy in Self::hierarchies() {
            let mut dir = hierarchy.join(self.0.trim_start_matches('/'));
            while dir != hierarchy && std::fs::remove_dir(&dir).is_ok() {
                dir.pop();
            }
        }
    }
}

/// Checks that a microVM pod's husk-vmm runs confined: its seccomp filter
/// and no_new_privs, a uid and gid that are not root, the sandbox's `jail/`
/// as its root; and that it and virtiofsd are in the cgroup `cgroup` (as
/// /proc/PID/cgroup shows it) in every hierarchy. Returns the VMM's uid.
pub fn check_vm_confined(sandbox_dir: &Path, cgroup: &str) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let vmms = vmms_under(sandbox_dir);
    assert_eq!(vmms.len(), 1, "one husk-vmm: {vmms:?}");
    let pid = vmms[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> Vec<String> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}:")))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(field("Seccomp"), ["2"], "{status}");
    assert_eq!(field("NoNewPrivs"), ["1"], "{status}");
    for ids in ["Uid", "Gid"] {
        let values = field(ids);
        assert_eq!(values.len(), 4, "{status}");
        assert!(
            values.iter().all(|v| v == &values[0] && v != "0"),
            "husk-vmm's {ids}s (real, effective, saved, fs): {values:?}"
        );
    }
    assert_eq!(field("Groups"), Vec::<String>::new(), "{status}");
    let root = std::fs::metadata(format!("/proc/{pid}/root")).expect("its root");
    let jail = std::fs::metadata(sandbox_dir.join("jail")).expect("the jail");
    assert_eq!(
        (root.dev(), root.ino()),
        (jail.dev(), jail.ino()),
        "husk-vmm's root is the sandbox's jail/"
    );
    let daemons = virtiofsds_under(sandbox_dir);
    assert!(!daemons.is_empty(), "no virtiofsd");
    for pid in std::iter::once(pid).chain(daemons) {
        let cgroups = cgroups_of(pid);
        assert!(!cgroups.is_empty(), "pid {pid} has no cgroups");
        for (controllers, path) in &cgroups {
            assert_eq!(path, cgroup, "pid {pid}'s {controllers:?} cgroup");
        }
    }
    field("Uid")[0].parse().expect("uid")
}

/// Pids of husk-vmm processes whose command line names `dir`.
pub fn vmms_under(dir: &Path) -> Vec<u32> {
    programs_under("/husk-vmm", dir)
}

/// The virtiofsd processes serving volumes below `dir`.
pub fn virtiofsds_under(dir: &Path) -> Vec<u32> {
    programs_under("/virtiofsd", dir)
}

/// The processes whose argv[0] ends with `program` and whose command line
/// names `dir` (huskd's own command line names the programs too).
fn programs_under(program: &str, dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let argv0 = cmdline.split('\0').next().unwrap_or_default();
        if argv0.ends_with(program) && cmdline.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

/// The mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    husk_runtime::sandbox::volumes::mounts_under(dir).expect("mountinfo")
}

/// Kills every husk-vmm and virtiofsd below a state directory, and detaches
/// the volumes' binds there, when dropped: a failing test (a panic) must not
/// leave VMs or mounts behind, which outlive huskd by design.
pub struct VmReaper(pub PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        for pid in vmms_under(&self.0)
            .into_iter()
            .chain(virtiofsds_under(&self.0))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // The volumes' binds, before the test's directory goes.
        let _ = husk_runtime::sandbox::volumes::detach_all(&self.0);
    }
}

/// A benchmark's main: runs `bench` on a two-worker runtime, as root (the
/// drivers need namespaces, mounts and cgroups, and microvm /dev/kvm).
pub fn bench_main<F: std::future::Future>(bench: F) -> F::Output {
    assert!(
        nix::unistd::geteuid().is_root(),
        "huskd's drivers need namespaces, mounts and cgroups (and microvm /dev/kvm): run this \
         as root"
    );
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(bench)
}

/// A huskd for a benchmark that runs pods of both handlers, with busybox
/// pulled from a loopback registry; what it started goes when it drops.
pub struct BenchHuskd {
    pub rt: k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
    pub image: String,
    /// huskd's state directory (`<dir>/state`).
    pub state: PathBuf,
    // Dropped in this order: huskd first, then what outlives it.
    _huskd: Huskd,
    _vms: VmReaper,
    _agents: AgentSweeper,
    _registry: Registry,
}

impl BenchHuskd {
    pub async fn start(dir: &Path) -> BenchHuskd {
        Self::start_with(dir, "").await
    }

    /// With `microvm` (lines of the config file's `[microvm]` section)
    /// added to the benchmarks' own.
    pub async fn start_with(dir: &Path, microvm: &str) -> BenchHuskd {
        let state = dir.join("state");
        let args = Huskd::microvm_args(
            dir,
            &format!(
                "log_level = \"warn\"\n[microvm]\nguest_boot_timeout_secs = 600\nguest_max_vcpus = 16\n{microvm}"
            ),
        );
        let registry = Registry::start();
        let image = push_busybox(&registry, "").await;
        let agents = AgentSweeper::new(dir);
        let vms = VmReaper(state.clone());
        let huskd = Huskd::spawn(&dir.join("husk.sock"), &args);
        let channel = huskd.connect().await;
        let rt = k8s_cri::v1::runtime_service_client::RuntimeServiceClient::new(channel.clone());
        pull(
            &mut k8s_cri::v1::image_service_client::ImageServiceClient::new(channel),
            &image,
        )
        .await;
        BenchHuskd {
            rt,
            image,
            state,
            _huskd: huskd,
            _vms: vms,
            _agents: agents,
            _registry: registry,
        }
    }
}

/// Detaches every mount below a test's directory when dropped, so that a
/// failing test leaves none behind (and its directory can go).
pub struct MountSweeper(pub PathBuf);

impl Drop for MountSweeper {
    fn drop(&mut self) {
        let _ = husk_runtime::sandbox::volumes::detach_all(&self.0);
    }
}

/// The VMM log and guest console of every sandbox below `state`.
pub fn guest_diagnostics(state: &Path) -> String {
    let mut out = String::new();
    let Ok(dirs) = std::fs::read_dir(state.join("sandboxes")) else {
        return "(no sandboxes)".into();
    };
    for dir in dirs.flatten() {
        for file in ["vmm.log", "console.log"] {
            let text = std::fs::read_to_string(dir.path().join(file)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "--- {} (last 40 lines) ---\n{}\n",
                dir.path().join(file).display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            ));
        }
    }
    out
}

/// husk-vmm from HUSK_VMM, or next to huskd in the target directory.
pub fn husk_vmm() -> PathBuf {
    workspace_binary("husk-vmm", "HUSK_VMM")
}

/// The pod network every test huskd uses: Debian's CNI plugins, one
/// bridge for all tests (so that pods of concurrent tests cannot clash on
/// addresses, they share host-local's leases), host ports through portmap.
pub const TEST_NETWORK: &str = "husk-test";
pub const TEST_BRIDGE: &str = "husk-test0";
pub const TEST_SUBNET_PREFIX: &str = "10.199.";
pub const TEST_GATEWAY: &str = "10.199.0.1";
const TEST_BRIDGE_MAC: &str = "02:42:0a:c7:00:01";
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// Writes the test network's conflist to `<dir>/cni` and returns that
/// directory, for `--cni-conf-dir`.
pub fn test_cni_conf_dir(dir: &Path) -> PathBuf {
    assert!(
        Path::new(CNI_BIN_DIR).join("bridge").is_file(),
        "{CNI_BIN_DIR}/bridge is missing: run scripts/install-deps.sh (Debian package containernetworking-plugins)"
    );
    ensure_test_bridge();
    let conf_dir = dir.join("cni");
    std::fs::create_dir_all(&conf_dir).expect("cni dir");
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": TEST_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": TEST_BRIDGE,
                "isGateway": true,
                "isDefaultGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": format!("{TEST_SUBNET_PREFIX}0.0/16"), "gateway": TEST_GATEWAY }]]
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    });
    std::fs::write(conf_dir.join("10-husk-test.conflist"), conflist.to_string())
        .expect("write conflist");
    conf_dir
}

/// Creates the test bridge with a fixed MAC unless it is there. On newer
/// kernels (6.18 here) a bridge without ports has an all-zero MAC, and the
/// bridge plugin of Debian 12 (1.1.1) fails to re-set it ("could not set
/// bridge's mac: invalid argument"); a bridge with an address set works.
fn ensure_test_bridge() {
    let link = Path::new("/sys/class/net").join(TEST_BRIDGE);
    if !link.exists() {
        // Concurrent tests may race to create it: "File exists" is fine.
        let _ = Command::new("ip")
            .args(["link", "add", TEST_BRIDGE, "type", "bridge"])
            .status();
    }
    let mac = std::fs::read_to_string(link.join("address")).unwrap_or_default();
    if mac.trim() == "00:00:00:00:00:00" {
        run(
            "ip",
            &[&"link", &"set", &TEST_BRIDGE, &"address", &TEST_BRIDGE_MAC],
        );
    }
}

/// What CNI left on the host for pod `id`: its namespace, host-local
/// leases naming it, iptables rules naming it.
pub fn network_leftovers(id: &str) -> Vec<String> {
    let mut left = Vec::new();
    let netns = Path::new("/run/netns").join(format!("husk-{id}"));
    if netns.exists() {
        left.push(format!("netns {}", netns.display()));
    }
    let leases = Path::new("/var/lib/cni/networks").join(TEST_NETWORK);
    for entry in std::fs::read_dir(&leases).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if text.contains(id) {
            left.push(format!("lease {}", entry.path().display()));
        }
    }
    let rules = run("iptables-save", &[&"-t", &"nat"]);
    // portmap names its chains and comments after the container id.
    for line in rules.lines().filter(|l| l.contains(&id[..12])) {
        left.push(format!("iptables {line}"));
    }
    left
}

/// A huskd started by a test or benchmark on its own socket; killed when
/// dropped.
pub struct Huskd {
    child: Child,
    socket: PathBuf,
}

impl Huskd {
    /// Starts huskd listening on `socket`, with `args` after `--listen`, and
    /// waits until the socket is there.
    pub fn spawn(socket: &Path, args: &[OsString]) -> Huskd {
        Huskd::spawn_with_stderr(socket, args, Stdio::inherit())
    }

    /// As `spawn`, with huskd's log (its stderr) written to the file `log`.
    pub fn spawn_logging_to(socket: &Path, args: &[OsString], log: &Path) -> Huskd {
        let log = std::fs::File::create(log).expect("create huskd's log");
        Huskd::spawn_with_stderr(socket, args, log.into())
    }

    fn spawn_with_stderr(socket: &Path, args: &[OsString], stderr: Stdio) -> Huskd {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(HUSKD)
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn huskd");
        let mut huskd = Huskd {
            child,
            socket: socket.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Ok(Some(status)) = huskd.child.try_wait() {
                panic!("huskd exited early: {status}");
            }
            assert!(Instant::now() < deadline, "huskd did not create its socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        huskd
    }

    /// `--root`, `--state` and `--config` below `dir`, and the host driver's
    /// husk-agent: what a test on the `host` handler passes to `spawn`.
    pub fn host_args(dir: &Path) -> Vec<OsString> {
        let config = dir.join("config.toml");
        std::fs::write(&config, "log_level = \"info\"\n").expect("config");
        vec![
            "--root".into(),
            dir.join("root").into(),
            "--state".into(),
            dir.join("state").into(),
            "--husk-agent".into(),
            husk_agent().into(),
            "--config".into(),
            config.into(),
            "--cni-conf-dir".into(),
            test_cni_conf_dir(dir).into(),
        ]
    }

    /// `--root`, `--state` and `--config` below `dir`, husk-vmm and husk's
    /// guest image: what a test on the `microvm` handler passes to `spawn`.
    /// `config` is the config file's text.
    pub fn microvm_args(dir: &Path, config: &str) -> Vec<OsString> {
        let (kernel, initrd) = husk_e2e::guest_image();
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).expect("config");
        vec![
            "--root".into(),
            dir.join("root").into(),
            "--state".into(),
            dir.join("state").into(),
            "--husk-vmm".into(),
            husk_vmm().into(),
            "--guest-kernel".into(),
            kernel.into(),
            "--guest-initrd".into(),
            initrd.into(),
            "--config".into(),
            config_path.into(),
            "--cni-conf-dir".into(),
            test_cni_conf_dir(dir).into(),
        ]
    }

    /// SIGKILL, as a crash or the OOM killer ends huskd: whatever call it
    /// was in the middle of stops there.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL huskd");
        self.child.wait().expect("wait huskd");
    }

    /// SIGTERM, and huskd must end cleanly, taking its socket away.
    pub fn terminate(&mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM huskd");
        let exit = self.child.wait().expect("wait huskd");
        assert!(exit.success(), "huskd: {exit}");
        assert!(!self.socket.exists(), "huskd left its socket behind");
    }

    /// A gRPC channel over the socket, as kubelet opens one.
    pub async fn connect(&self) -> Channel {
        let socket = self.socket.clone();
        Endpoint::try_from("http://[::]:50051")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?))
                }
            }))
            .await
            .expect("connect to huskd")
    }
}

impl Drop for Huskd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
