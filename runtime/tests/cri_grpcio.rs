//! huskd serving a gRPC client on gRPC's C core: Python grpcio, whose
//! default channel to `unix:PATH` sends the socket's path, percent-encoded,
//! as `:authority`, which h2 alone refuses (see
//! `runtime/src/server/authority.rs`). Runs `tests/grpcio/cri_client.py`
//! against huskd on the `host` driver: Version, PullImage from a registry on
//! loopback, RunPodSandbox, ListPodSandbox, StopPodSandbox, RemovePodSandbox.
//!
//! Needs root (namespaces, mounts, cgroups), scripts/install-deps.sh's
//! packages and its grpcio venv (or HUSK_GRPCIO_PYTHON naming a python with
//! grpcio and grpcio-tools), and husk-agent built first:
//! `cargo build -p husk-agent` (or HUSK_AGENT=/path/to/husk-agent).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::Huskd;

/// Where scripts/install-deps.sh puts grpcio.
const GRPCIO_VENV_PYTHON: &str = "/var/cache/husk/grpcio-venv/bin/python";
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpcio/cri_client.py");
/// What huskd logs for a connection whose header blocks it rewrites.
const REWRITE_LOG: &str = "serving it as localhost";

/// A python that has grpcio and grpcio-tools; panics naming the fix if
/// there is none.
fn grpcio_python() -> PathBuf {
    let python = std::env::var_os("HUSK_GRPCIO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| GRPCIO_VENV_PYTHON.into());
    let fix = "run `sudo bash scripts/install-deps.sh` (it makes the venv at \
               /var/cache/husk/grpcio-venv), or set HUSK_GRPCIO_PYTHON to a python \
               with grpcio and grpcio-tools";
    match Command::new(&python)
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output()
    {
        Ok(out) if out.status.success() => python,
        Ok(out) => panic!(
            "{} cannot import grpcio and grpcio-tools ({}): {fix}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("{}: {e}: {fix}", python.display()),
    }
}

/// The CRI proto huskd serves: `proto/v1.proto` of the k8s-cri crate that
/// husk-runtime is built with, found by `cargo metadata` (offline, and for
/// this host only, so that no other platform's crates are fetched).
fn cri_proto() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let run = |args: &[&str]| {
        let out = Command::new(&cargo).args(args).output().expect("run cargo");
        assert!(
            out.status.success(),
            "cargo {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("cargo's output is UTF-8")
    };
    let version = run(&["-vV"]);
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("cargo -vV names the host");
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let metadata: Value = serde_json::from_str(&run(&[
        "metadata",
        "--format-version",
        "1",
        "--offline",
        "--filter-platform",
        host,
        "--manifest-path",
        manifest,
    ]))
    .expect("cargo metadata's JSON");
    let package = |key: &str, value: &str| {
        metadata["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .find(|p| p[key] == value)
            .unwrap_or_else(|| panic!("no package with {key} {value}"))
            .clone()
    };
    let runtime_id = package("name", env!("CARGO_PKG_NAME"))["id"].clone();
    let k8s_cri_id = metadata["resolve"]["nodes"]
        .as_array()
        .expect("resolve nodes")
        .iter()
        .find(|node| node["id"] == runtime_id)
        .and_then(|node| {
            node["deps"]
                .as_array()?
                .iter()
                .find(|dep| dep["name"] == "k8s_cri")
        })
        .expect("husk-runtime depends on k8s-cri")["pkg"]
        .as_str()
        .expect("package id")
        .to_owned();
    let k8s_cri_manifest = package("id", &k8s_cri_id)["manifest_path"]
        .as_str()
        .expect("manifest path")
        .to_owned();
    let proto = Path::new(&k8s_cri_manifest).with_file_name("proto/v1.proto");
    assert!(proto.is_file(), "{} is missing", proto.display());
    proto
}

#[tokio::test]
async fn grpcio_client_runs_a_pod() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "huskd's host driver creates namespaces, mounts and cgroups: run this as root"
    );
    let python = grpcio_python();
    let proto = cri_proto();
    let (registry, image) = support::busybox_registry("1000").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let _agents = support::AgentSweeper::new(dir.path());
    let socket = dir.path().join("husk.sock");
    let mut args = Huskd::host_args(dir.path());
    args.extend([
        "--log-level".into(),
        "info,husk_runtime::server::authority=debug".into(),
    ]);
    let log = dir.path().join("huskd.log");
    let mut huskd = Huskd::spawn_logging_to(&socket, &args, &log);

    let out = tokio::process::Command::new(&python)
        .arg(CLIENT)
        .arg("--socket")
        .arg(&socket)
        .arg("--proto")
        .arg(&proto)
        .args(["--image", &image, "--pod", "grpcio"])
        .arg("--log-dir")
        .arg(dir.path().join("pods/grpcio"))
        .output()
        .await
        .expect("run the grpcio client");
    let huskd_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        out.status.success(),
        "{CLIENT}: {}\n{}\nhuskd's log:\n{huskd_log}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{CLIENT} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    println!("grpcio client: {result}");

    assert_eq!(result["runtime_name"], "husk");
    assert_eq!(result["runtime_api_version"], "v1");
    assert!(
        result["image_ref"]
            .as_str()
            .is_some_and(|r| r.starts_with("sha256:")),
        "{result}"
    );
    let pod = result["pod_id"].as_str().expect("pod id");
    assert!(!pod.is_empty());
    assert!(
        result["listed"]
            .as_array()
            .expect("listed")
            .iter()
            .any(|p| p["id"] == pod && p["state"] == "SANDBOX_READY"),
        "pod {pod} not listed READY: {result}"
    );
    assert_eq!(result["listed_after_remove"], serde_json::json!([]));
    // Else this test no longer covers what it is for.
    assert!(
        huskd_log.contains(REWRITE_LOG),
        "huskd did not rewrite a connection's :authority (does grpcio still send \
         the socket path?); its log:\n{huskd_log}"
    );

    huskd.terminate();
    drop(registry);
}
