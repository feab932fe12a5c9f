//! huskd's streaming server (CRI Exec and PortForward) on the `host`
//! sandbox driver, driven as Kubernetes clients drive it: a CRI call for
//! the URL, then an HTTP upgrade to WebSocket or SPDY/3.1 speaking the
//! channel protocols. The clients (`support/streaming.rs`) are written
//! from the protocol descriptions, not from huskd's code.
//!
//! Needs root, scripts/install-deps.sh's packages, and husk-agent built
//! first: `cargo build -p husk-agent` (or HUSK_AGENT=/path/to/husk-agent).

mod support;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use support::streaming::{
    exec_url, exit_code_of, forward_url, http_request, ws_collect, ws_connect, ws_forward,
    ws_frame, ws_read_until, Spdy, SpdyFrame,
};
use support::{
    busybox_registry, container_config, free_port, pull, remove_pod, run_container, Huskd,
};

const PATIENCE: Duration = Duration::from_secs(30);
/// huskd runs with short-lived tokens so that expiry can be seen.
const TOKEN_TTL_SECS: u64 = 3;

/// huskd on the host driver with short-lived streaming tokens.
async fn start_huskd(dir: &Path) -> (Huskd, Channel) {
    let mut args = Huskd::host_args(dir);
    args.extend(
        [
            "--default-runtime",
            "host",
            "--streaming-listen",
            "127.0.0.1:0",
            "--streaming-token-ttl-secs",
            &TOKEN_TTL_SECS.to_string(),
        ]
        .map(OsString::from),
    );
    let huskd = Huskd::spawn(&dir.join("husk.sock"), &args);
    let channel = huskd.connect().await;
    (huskd, channel)
}

/// The CRI client and the container the streams go to.
struct Pod {
    rt: RuntimeServiceClient<Channel>,
    container: String,
}

impl Pod {
    async fn exec_url(&mut self, cmd: &[&str], stdin: bool, tty: bool) -> String {
        exec_url(&mut self.rt, &self.container, cmd, stdin, tty).await
    }
}

/// Waits until `count` processes run `args`.
async fn await_processes(args: &[&str], count: usize) {
    let deadline = Instant::now() + PATIENCE;
    while processes(args) != count {
        assert!(
            Instant::now() < deadline,
            "{args:?}: {} processes, not {count}",
            processes(args)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Processes on this machine whose command line is exactly `args`.
fn processes(args: &[&str]) -> usize {
    let wanted: Vec<u8> = args
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == wanted))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_port_forward_over_websocket_and_spdy() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "huskd's host driver creates namespaces, mounts and cgroups: run this as root"
    );
    let (_registry, image) = busybox_registry("0").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let _agents = support::AgentSweeper::new(dir.path());
    let (_huskd, channel) = start_huskd(dir.path()).await;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    pull(&mut ImageServiceClient::new(channel), &image).await;

    // A host-network pod on the host driver, a web server in it.
    let http_port = free_port();
    let pod_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "streams".into(),
            uid: "uid-streams".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: dir.path().join("logs").display().to_string(),
        ..Default::default()
    };
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config),
            runtime_handler: "host".into(),
        })
        .await
        .expect("run pod")
        .into_inner()
        .pod_sandbox_id;
    let payload = "husk port-forward payload 0123456789";
    let serve = format!(
        "mkdir -p /tmp/www && echo '{payload}' > /tmp/www/index.html && \
         exec busybox httpd -f -p 127.0.0.1:{http_port} -h /tmp/www"
    );
    let web = container_config("web", &image, &["sh", "-c", &serve], "web/0.log");
    let container = run_container(&mut rt, &pod, web, None).await;
    let mut pod_ = Pod {
        rt: rt.clone(),
        container: container.clone(),
    };
    let p = &mut pod_;
    let out_err_exit = ["sh", "-c", "echo out; echo err >&2; exit 3"];

    // Exec over WebSocket, v4: both streams and the exit code.
    let url = p.exec_url(&out_err_exit, false, false).await;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let mut ws = ws_connect(&url, "v4.channel.k8s.io").await;
    let got = ws_collect(&mut ws, false).await;
    assert_eq!(got.get(&1).map(Vec::as_slice), Some(&b"out\n"[..]));
    assert_eq!(got.get(&2).map(Vec::as_slice), Some(&b"err\n"[..]));
    assert_eq!(exit_code_of(&got[&3]), 3);

    // The base64 variant, and success.
    let url = p.exec_url(&["echo", "fine"], false, false).await;
    let mut ws = ws_connect(&url, "v4.base64.channel.k8s.io").await;
    let got = ws_collect(&mut ws, true).await;
    assert_eq!(got.get(&1).map(Vec::as_slice), Some(&b"fine\n"[..]));
    assert_eq!(exit_code_of(&got[&3]), 0);

    // stdin over WebSocket v5, closed with the CLOSE signal (channel 255).
    let url = p.exec_url(&["cat"], true, false).await;
    let mut ws = ws_connect(&url, "v5.channel.k8s.io").await;
    ws.send(ws_frame(false, 0, b"to cat\n"))
        .await
        .expect("stdin");
    ws.send(ws_frame(false, 255, &[0]))
        .await
        .expect("close stdin");
    let got = ws_collect(&mut ws, false).await;
    assert_eq!(got.get(&1).map(Vec::as_slice), Some(&b"to cat\n"[..]));
    assert_eq!(exit_code_of(&got[&3]), 0);

    // A tty over WebSocket: the size sent first is the terminal's from its
    // start.
    let url = p
        .exec_url(&["sh", "-c", "busybox stty size; exit 4"], true, true)
        .await;
    let mut ws = ws_connect(&url, "v4.channel.k8s.io").await;
    ws.send(ws_frame(false, 4, br#"{"Width":123,"Height":45}"#))
        .await
        .expect("resize");
    let got = ws_collect(&mut ws, false).await;
    let screen = String::from_utf8_lossy(got.get(&1).map(Vec::as_slice).unwrap_or_default());
    assert!(screen.contains("45 123"), "{screen:?}");
    assert_eq!(exit_code_of(&got[&3]), 4);

    // Exec over SPDY, v4: the client opens error, stdout, stderr.
    let url = p.exec_url(&out_err_exit, false, false).await;
    let mut spdy = Spdy::connect(&url, "v4.channel.k8s.io").await;
    let error = spdy.open(&[("streamType", "error")]).await;
    let stdout = spdy.open(&[("streamType", "stdout")]).await;
    let stderr = spdy.open(&[("streamType", "stderr")]).await;
    let got = spdy.collect().await;
    assert_eq!(got.get(&stdout).map(Vec::as_slice), Some(&b"out\n"[..]));
    assert_eq!(got.get(&stderr).map(Vec::as_slice), Some(&b"err\n"[..]));
    assert_eq!(exit_code_of(&got[&error]), 3);

    // A tty over SPDY with stdin and resize: the first size from the
    // start, a later one when the program looks again.
    let url = p
        .exec_url(
            &[
                "sh",
                "-c",
                "busybox stty size; read go; busybox stty size; exit 5",
            ],
            true,
            true,
        )
        .await;
    let mut spdy = Spdy::connect(&url, "v4.channel.k8s.io").await;
    let error = spdy.open(&[("streamType", "error")]).await;
    let stdin = spdy.open(&[("streamType", "stdin")]).await;
    let stdout = spdy.open(&[("streamType", "stdout")]).await;
    let resize = spdy.open(&[("streamType", "resize")]).await;
    spdy.send(resize, br#"{"Width":81,"Height":19}"#, false)
        .await;
    let mut screen = Vec::new();
    while !screen.ends_with(b"19 81\r\n") {
        match spdy.next().await.expect("a frame") {
            SpdyFrame::Data(id, data, _) if id == stdout => screen.extend(data),
            SpdyFrame::Data(..) | SpdyFrame::Reply | SpdyFrame::Other => {}
            other => panic!("unexpected {other:?} before the first size"),
        }
    }
    spdy.send(resize, br#"{"Width":100,"Height":40}"#, false)
        .await;
    spdy.send(stdin, b"go\n", false).await;
    let got = spdy.collect().await;
    let screen = String::from_utf8_lossy(got.get(&stdout).map(Vec::as_slice).unwrap_or_default());
    assert!(screen.contains("40 100"), "{screen:?}");
    assert_eq!(exit_code_of(&got[&error]), 5);

    // An older protocol: a text error on failure.
    let url = p.exec_url(&["sh", "-c", "exit 2"], false, false).await;
    let mut spdy = Spdy::connect(&url, "v2.channel.k8s.io").await;
    let error = spdy.open(&[("streamType", "error")]).await;
    spdy.open(&[("streamType", "stdout")]).await;
    spdy.open(&[("streamType", "stderr")]).await;
    let got = spdy.collect().await;
    let message = String::from_utf8_lossy(&got[&error]).into_owned();
    assert!(message.contains("non-zero exit code: 2"), "{message}");

    // Port-forward over SPDY: a data and an error stream per connection.
    let request = "GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n";
    let url = forward_url(&mut rt, &pod, http_port).await;
    let mut spdy = Spdy::connect(&url, "portforward.k8s.io").await;
    let port = http_port.to_string();
    let error = spdy
        .open(&[("streamType", "error"), ("port", &port), ("requestID", "0")])
        .await;
    let data = spdy
        .open(&[("streamType", "data"), ("port", &port), ("requestID", "0")])
        .await;
    spdy.send(data, request.as_bytes(), true).await;
    let mut response = Vec::new();
    let mut ended = (false, false);
    while ended != (true, true) {
        match spdy.next().await.expect("a frame") {
            SpdyFrame::Data(id, bytes, fin) if id == data => {
                response.extend(bytes);
                ended.0 |= fin;
            }
            SpdyFrame::Data(id, bytes, fin) if id == error => {
                assert!(bytes.is_empty(), "{}", String::from_utf8_lossy(&bytes));
                ended.1 |= fin;
            }
            SpdyFrame::Reset(id) => panic!("stream {id} reset"),
            _ => {}
        }
    }
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.") && response.contains(" 200 "),
        "{response}"
    );
    assert!(response.contains(payload), "{response}");
    drop(spdy);

    // Port-forward over WebSocket: ?port=, channel 0 data, 1 error, each
    // first carrying the port.
    let mut ws = ws_forward(&mut rt, &pod, http_port).await;
    ws.send(ws_frame(false, 0, request.as_bytes()))
        .await
        .expect("send");
    let got = ws_collect(&mut ws, false).await;
    let response = String::from_utf8_lossy(got.get(&0).map(Vec::as_slice).unwrap_or_default());
    assert!(response.contains(payload), "{response}");
    assert!(!got.contains_key(&1), "error channel: {got:?}");

    // Attach to a running container's stdin, stdout and stderr: over
    // WebSocket, then, after that client left, over SPDY until the
    // container is stopped.
    let mut config = container_config(
        "echoer",
        &image,
        &[
            "sh",
            "-c",
            "while read l; do echo \"got $l\"; echo \"err $l\" >&2; done",
        ],
        "echoer/0.log",
    );
    config.stdin = true;
    let echoer = run_container(&mut rt, &pod, config, None).await;
    let attach_url = |rt: &mut RuntimeServiceClient<Channel>| {
        let request = cri::AttachRequest {
            container_id: echoer.clone(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        };
        let mut rt = rt.clone();
        async move { rt.attach(request).await.expect("Attach").into_inner().url }
    };
    let url = attach_url(&mut rt).await;
    let mut ws = ws_connect(&url, "v4.channel.k8s.io").await;
    ws.send(ws_frame(false, 0, b"one\n")).await.expect("stdin");
    let mut got: HashMap<u8, Vec<u8>> = HashMap::new();
    ws_read_until(&mut ws, &mut got, |got| {
        got.get(&1).map(Vec::as_slice) == Some(b"got one\n")
            && got.get(&2).map(Vec::as_slice) == Some(b"err one\n")
    })
    .await;
    drop(ws);
    let url = attach_url(&mut rt).await;
    let mut spdy = Spdy::connect(&url, "v4.channel.k8s.io").await;
    let error = spdy.open(&[("streamType", "error")]).await;
    let stdin = spdy.open(&[("streamType", "stdin")]).await;
    let stdout = spdy.open(&[("streamType", "stdout")]).await;
    spdy.open(&[("streamType", "stderr")]).await;
    spdy.send(stdin, b"two\n", false).await;
    let mut seen = Vec::new();
    while !seen.ends_with(b"got two\n") {
        if let Some(SpdyFrame::Data(id, data, _)) = spdy.next().await {
            if id == stdout {
                seen.extend(data);
            }
        }
    }
    rt.stop_container(cri::StopContainerRequest {
        container_id: echoer.clone(),
        timeout: 0,
    })
    .await
    .expect("stop");
    let got = spdy.collect().await;
    assert_eq!(exit_code_of(&got[&error]), 0);

    // A client that goes away takes its exec with it, on either wire.
    let sleeper = ["sleep", "4242"];
    let url = p.exec_url(&sleeper, false, false).await;
    let ws = ws_connect(&url, "v4.channel.k8s.io").await;
    await_processes(&sleeper, 1).await;
    drop(ws);
    await_processes(&sleeper, 0).await;
    let url = p.exec_url(&sleeper, false, false).await;
    let mut spdy = Spdy::connect(&url, "v4.channel.k8s.io").await;
    for kind in ["error", "stdout", "stderr"] {
        spdy.open(&[("streamType", kind)]).await;
    }
    await_processes(&sleeper, 1).await;
    drop(spdy);
    await_processes(&sleeper, 0).await;

    // Bad input: each a clear HTTP error.
    let ws_headers = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Protocol", "v4.channel.k8s.io"),
    ];
    // A used token.
    let url = p.exec_url(&["echo"], false, false).await;
    let mut ws = ws_connect(&url, "v4.channel.k8s.io").await;
    ws_collect(&mut ws, false).await;
    let (_, status, _, body) = http_request(&url, "GET", &ws_headers).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("already used"), "{body}");
    // A malformed upgrade leaves the token usable.
    let url = p.exec_url(&["echo"], false, false).await;
    let (_, status, _, body) = http_request(&url, "GET", &[]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("upgrade"), "{body}");
    let (_, status, _, body) = http_request(
        &url,
        "GET",
        &[("Connection", "Upgrade"), ("Upgrade", "h2c")],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (_, status, _, body) = http_request(
        &url,
        "GET",
        &[("Connection", "Upgrade"), ("Upgrade", "websocket")],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("version 13"), "{body}");
    // An unknown subprotocol.
    let mut odd = ws_headers;
    odd[4].1 = "v9.channel.k8s.io";
    let (_, status, _, body) = http_request(&url, "GET", &odd).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("negotiate"), "{body}");
    // An expired token.
    let url = p.exec_url(&["echo"], false, false).await;
    tokio::time::sleep(Duration::from_secs(TOKEN_TTL_SECS + 1)).await;
    let (_, status, _, body) = http_request(&url, "GET", &ws_headers).await;
    assert_eq!(status, 410, "{body}");
    assert!(body.contains("expired"), "{body}");
    // No such path, no such token.
    let base = url.rsplit_once("/exec/").expect("exec URL").0;
    let (_, status, _, _) = http_request(&format!("{base}/nothing"), "GET", &ws_headers).await;
    assert_eq!(status, 404);
    let (_, status, _, body) = http_request(&format!("{base}/exec/nope"), "GET", &ws_headers).await;
    assert_eq!(status, 404, "{body}");
    // An unknown container, or pod, already at the CRI call.
    let unknown = rt
        .exec(cri::ExecRequest {
            container_id: "nope".into(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
        .await
        .expect_err("exec in an unknown container");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let unknown = rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: "nope".into(),
            port: vec![80],
        })
        .await
        .expect_err("port-forward into an unknown pod");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    // Stopping the container ends its exec sessions (the exec is killed
    // with it), and a URL issued before the stop is refused after it.
    let sleeper = ["sleep", "4243"];
    let url = p.exec_url(&sleeper, false, false).await;
    let mut ws = ws_connect(&url, "v4.channel.k8s.io").await;
    await_processes(&sleeper, 1).await;
    let url = p.exec_url(&["echo"], false, false).await;
    rt.stop_container(cri::StopContainerRequest {
        container_id: container.clone(),
        timeout: 0,
    })
    .await
    .expect("stop");
    let got = ws_collect(&mut ws, false).await;
    assert_eq!(exit_code_of(&got[&3]), 128 + 9);
    let (_, status, _, body) = http_request(&url, "GET", &ws_headers).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("not running"), "{body}");

    remove_pod(&mut rt, &pod).await;
}
