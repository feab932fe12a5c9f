//! Test fixtures shared by huskd's integration tests (and meant for later
//! end-to-end suites): a real OCI registry on loopback (Debian's
//! `docker-registry`), and a busybox image built here from Debian's
//! `busybox-static`, pushed with oci-client.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
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
        tar.append_data(&mut h, path, std::io::empty()).unwrap();
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
        .unwrap();
    for applet in ["sh", "ls", "echo", "cat", "sleep", "id"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    let passwd = b"root:x:0:0:root:/root:/bin/sh\nhusk:x:1000:1000:husk:/home/husk:/bin/sh\n";
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(passwd.len() as u64);
    h.set_mtime(1_700_000_000);
    tar.append_data(&mut h, "etc/passwd", &passwd[..]).unwrap();
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

/// An image config for `arch` with the busybox layer's diff id.
pub fn image_config(arch: &str, layer_tar_gz: &[u8], user: &str, cmd: &[&str]) -> Vec<u8> {
    use sha2::Digest as _;
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(layer_tar_gz)
        .read_to_end(&mut tar)
        .unwrap();
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tar)));
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "User": user,
            "Cmd": cmd,
            "Env": ["PATH=/bin"],
            "WorkingDir": "/home/husk",
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    }))
    .unwrap()
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
    let reference: Reference = reference.parse().expect("reference");
    let layers = vec![ImageLayer::new(
        layer,
        mt::IMAGE_LAYER_GZIP_MEDIA_TYPE.into(),
        None,
    )];
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
    let path = std::env::var_os("HUSK_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(HUSKD).with_file_name("husk-agent"));
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build -p husk-agent` (or set HUSK_AGENT)",
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

    fn agents(&self) -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                cmdline.contains("husk-agent") && cmdline.contains(&self.dir)
            })
            .collect()
    }
}

impl Drop for AgentSweeper {
    fn drop(&mut self) {
        let agents = self.agents();
        for pid in &agents {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.agents().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The host driver creates namespaces, mounts and cgroups.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "huskd's host driver creates namespaces, mounts and cgroups: run this as root"
    );
}

/// Pushes the busybox image, run as `user`, to `registry` as
/// `husk/busybox:latest`; returns its reference.
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

/// A CRI client on huskd's unix socket.
pub async fn connect(socket: &Path) -> Channel {
    let socket = socket.to_owned();
    Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .expect("connect to huskd")
}

/// A container config as kubelet sends it, labelled `app=NAME`.
pub fn container_config(
    name: &str,
    image: &str,
    command: &[&str],
    log_path: &str,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: log_path.into(),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        ..Default::default()
    }
}
