//! huskd's streaming server (CRI Exec and PortForward) on the `host`
//! sandbox driver, driven as Kubernetes clients drive it: a CRI call for
//! the URL, then an HTTP upgrade to WebSocket or SPDY/3.1 speaking the
//! channel protocols. The clients here are written from the protocol
//! descriptions (k8s.io/apimachinery httpstream/wsstream and spdy,
//! client-go remotecommand and portforward, SPDY draft 3), not from
//! huskd's code.
//!
//! Needs root, scripts/install-deps.sh's packages, and husk-agent built
//! first: `cargo build -p husk-agent` (or HUSK_AGENT=/path/to/husk-agent).

mod support;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use futures_util::{SinkExt, StreamExt};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::Channel;

use support::{busybox_registry, container_config, free_port, pull, Huskd};

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

/// `http://host:port/path` → ("host:port", "/path").
fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let slash = rest.find('/').expect("a path");
    (rest[..slash].to_owned(), rest[slash..].to_owned())
}

/// Sends an HTTP/1.1 request and reads the response head byte by byte
/// (so nothing after it is consumed): the status and the headers.
async fn http_request(
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
) -> (TcpStream, u16, HashMap<String, String>, String) {
    let (host, path) = split_url(url);
    let mut tcp = TcpStream::connect(&host).await.expect("connect");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        let n = tcp.read(&mut byte).await.expect("read response");
        assert!(n == 1, "connection closed in the response head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("utf-8 head");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = String::new();
    if status != 101 {
        let len: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut buf = vec![0u8; len];
        tcp.read_exact(&mut buf).await.expect("body");
        body = String::from_utf8_lossy(&buf).into_owned();
    }
    (tcp, status, headers, body)
}

// ---- WebSocket: each message is a channel byte and the payload. ----

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn ws_connect(url: &str, protocol: &str) -> Ws {
    let (host, _) = split_url(url);
    let tcp = TcpStream::connect(&host).await.expect("connect");
    let mut request = url
        .replace("http://", "ws://")
        .into_client_request()
        .expect("ws request");
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().expect("header"));
    let (ws, response) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("WebSocket handshake");
    assert_eq!(
        response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap_or_default()),
        Some(protocol)
    );
    ws
}

/// One channel message, binary or (the base64 protocols) text.
fn ws_frame(base64: bool, channel: u8, data: &[u8]) -> Message {
    if base64 {
        use base64::Engine as _;
        let text = format!(
            "{channel}{}",
            base64::engine::general_purpose::STANDARD.encode(data)
        );
        Message::text(text)
    } else {
        Message::binary([&[channel][..], data].concat())
    }
}

/// What arrived per channel until the server closed.
async fn ws_collect(ws: &mut Ws, base64: bool) -> HashMap<u8, Vec<u8>> {
    use base64::Engine as _;
    let mut got: HashMap<u8, Vec<u8>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, ws.next()).await {
        let (channel, data) = match message.expect("WebSocket message") {
            Message::Binary(b) if !base64 && !b.is_empty() => (b[0], b[1..].to_vec()),
            Message::Text(t) if base64 && !t.is_empty() => (
                t.as_bytes()[0] - b'0',
                base64::engine::general_purpose::STANDARD
                    .decode(&t.as_bytes()[1..])
                    .expect("base64"),
            ),
            // Go clients take any status but 1000 as an error.
            Message::Close(frame) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1000));
                break;
            }
            other => panic!("unexpected message {other:?}"),
        };
        got.entry(channel).or_default().extend(data);
    }
    got
}

// ---- SPDY/3: frames, header blocks compressed with the draft's dictionary. ----

/// SPDY draft 3 §2.6.10.1: these words, each after its 32-bit length, then
/// the common values as they are (no terminating NUL, as Go clients use it).
const DICT_WORDS: &str = "options|head|post|put|delete|trace|accept|accept-charset|\
accept-encoding|accept-language|accept-ranges|age|allow|authorization|cache-control|connection|\
content-base|content-encoding|content-language|content-length|content-location|content-md5|\
content-range|content-type|date|etag|expect|expires|from|host|if-match|if-modified-since|\
if-none-match|if-range|if-unmodified-since|last-modified|location|max-forwards|pragma|\
proxy-authenticate|proxy-authorization|range|referer|retry-after|server|te|trailer|\
transfer-encoding|upgrade|user-agent|vary|via|warning|www-authenticate|method|get|status|\
200 OK|version|HTTP/1.1|url|public|set-cookie|keep-alive|origin";
const DICT_VALUES: &str = "100101201202205206300302303304305306307402405406407408409410411\
412413414415416417502504505203 Non-Authoritative Information204 No Content301 Moved \
Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server \
Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov \
Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,\
image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivate\
max-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";

fn spdy_dictionary() -> Vec<u8> {
    let mut dict: Vec<u8> = DICT_WORDS
        .split('|')
        .flat_map(|w| [&(w.len() as u32).to_be_bytes()[..], w.as_bytes()].concat())
        .collect();
    dict.extend(DICT_VALUES.bytes());
    assert_eq!(dict.len(), 1423);
    dict
}

#[derive(Debug)]
enum SpdyFrame {
    Reply,
    Data(u32, Vec<u8>, bool),
    Reset(u32),
    GoAway,
    Other,
}

struct Spdy {
    tcp: TcpStream,
    deflate: Compress,
    inflate: Decompress,
    dict: Vec<u8>,
    next_id: u32,
    /// Streams opened and not yet answered with SYN_REPLY.
    unanswered: Vec<u32>,
}

impl Spdy {
    /// Upgrades `url` to SPDY/3.1 offering `protocol`.
    async fn connect(url: &str, protocol: &str) -> Spdy {
        let (tcp, status, headers, body) = http_request(
            url,
            "POST",
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "SPDY/3.1"),
                ("X-Stream-Protocol-Version", protocol),
            ],
        )
        .await;
        assert_eq!(status, 101, "SPDY upgrade refused: {body}");
        assert_eq!(
            headers.get("x-stream-protocol-version").map(String::as_str),
            Some(protocol)
        );
        let dict = spdy_dictionary();
        let mut deflate = Compress::new(Compression::default(), true);
        deflate.set_dictionary(&dict).expect("dictionary");
        Spdy {
            tcp,
            deflate,
            inflate: Decompress::new(true),
            dict,
            next_id: 1,
            unanswered: Vec::new(),
        }
    }

    async fn write_control(&mut self, kind: u16, flags: u8, payload: &[u8]) {
        let mut frame = vec![0x80, 3];
        frame.extend(kind.to_be_bytes());
        frame.push(flags);
        frame.extend(&(payload.len() as u32).to_be_bytes()[1..]);
        frame.extend(payload);
        self.tcp.write_all(&frame).await.expect("write frame");
    }

    /// SYN_STREAM with these headers; waits for nothing.
    async fn open(&mut self, headers: &[(&str, &str)]) -> u32 {
        let id = self.next_id;
        self.next_id += 2;
        let mut block = (headers.len() as u32).to_be_bytes().to_vec();
        for (n, v) in headers {
            for word in [n, v] {
                block.extend((word.len() as u32).to_be_bytes());
                block.extend(word.as_bytes());
            }
        }
        let mut compressed = Vec::with_capacity(block.len() + 1024);
        self.deflate
            .compress_vec(&block, &mut compressed, FlushCompress::Sync)
            .expect("compress");
        let mut payload = id.to_be_bytes().to_vec();
        payload.extend([0, 0, 0, 0, 0, 0]); // associated stream, priority, slot
        payload.extend(compressed);
        self.write_control(1, 0, &payload).await;
        self.unanswered.push(id);
        id
    }

    async fn send(&mut self, id: u32, data: &[u8], fin: bool) {
        let mut frame = id.to_be_bytes().to_vec();
        frame.push(u8::from(fin));
        frame.extend(&(data.len() as u32).to_be_bytes()[1..]);
        frame.extend(data);
        self.tcp.write_all(&frame).await.expect("write data");
    }

    /// The next frame, None at the end of the connection.
    async fn next(&mut self) -> Option<SpdyFrame> {
        let mut head = [0u8; 8];
        tokio::time::timeout(PATIENCE, self.tcp.read_exact(&mut head))
            .await
            .expect("a SPDY frame in time")
            .ok()?;
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let mut payload = vec![0u8; len];
        self.tcp.read_exact(&mut payload).await.ok()?;
        let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
        if head[0] & 0x80 == 0 {
            return Some(SpdyFrame::Data(id, payload, head[4] & 1 != 0));
        }
        let stream = u32::from_be_bytes(payload[..4].try_into().expect("id")) & 0x7fff_ffff;
        Some(match u16::from_be_bytes([head[2], head[3]]) {
            2 => {
                // Inflated to keep the zlib stream in step; the reply has no headers we need.
                let mut out = Vec::with_capacity(4096);
                if let Err(e) =
                    self.inflate
                        .decompress_vec(&payload[4..], &mut out, FlushDecompress::Sync)
                {
                    assert!(e.needs_dictionary().is_some(), "{e}");
                    self.inflate.set_dictionary(&self.dict).expect("dictionary");
                    let consumed = self.inflate.total_in() as usize;
                    self.inflate
                        .decompress_vec(&payload[4 + consumed..], &mut out, FlushDecompress::Sync)
                        .expect("inflate SYN_REPLY");
                }
                self.unanswered.retain(|&u| u != stream);
                SpdyFrame::Reply
            }
            3 => SpdyFrame::Reset(stream),
            7 => SpdyFrame::GoAway,
            _ => SpdyFrame::Other,
        })
    }

    /// Data per stream until GOAWAY or the end, checking every stream was
    /// answered.
    async fn collect(&mut self) -> HashMap<u32, Vec<u8>> {
        let mut got: HashMap<u32, Vec<u8>> = HashMap::new();
        while let Some(frame) = self.next().await {
            match frame {
                SpdyFrame::Data(id, data, _) => got.entry(id).or_default().extend(data),
                SpdyFrame::GoAway => break,
                SpdyFrame::Reset(id) => panic!("stream {id} was reset"),
                SpdyFrame::Reply | SpdyFrame::Other => {}
            }
        }
        assert!(
            self.unanswered.is_empty(),
            "no SYN_REPLY for {:?}",
            self.unanswered
        );
        got
    }
}

/// The exit code in a v4 error-stream Status, 0 for Success.
fn exit_code_of(status: &[u8]) -> i32 {
    let status: serde_json::Value = serde_json::from_slice(status)
        .unwrap_or_else(|e| panic!("status {:?}: {e}", String::from_utf8_lossy(status)));
    if status["status"] == "Success" {
        return 0;
    }
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    let cause = &status["details"]["causes"][0];
    assert_eq!(cause["reason"], "ExitCode", "{status}");
    cause["message"]
        .as_str()
        .and_then(|m| m.parse().ok())
        .expect("exit code")
}

/// The CRI client and the container the streams go to.
struct Pod {
    rt: RuntimeServiceClient<Channel>,
    container: String,
}

impl Pod {
    async fn exec_url(&mut self, cmd: &[&str], stdin: bool, tty: bool) -> String {
        self.rt
            .exec(cri::ExecRequest {
                container_id: self.container.clone(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                tty,
                stdin,
                stdout: true,
                stderr: !tty,
            })
            .await
            .expect("Exec")
            .into_inner()
            .url
    }

    async fn forward_url(&mut self, pod: &str, port: u16) -> String {
        self.rt
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.to_owned(),
                port: vec![port.into()],
            })
            .await
            .expect("PortForward")
            .into_inner()
            .url
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

/// Creates and starts a container in `pod`.
async fn run_container(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    config: cri::ContainerConfig,
) -> String {
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.to_owned(),
            config: Some(config),
            sandbox_config: None,
        })
        .await
        .expect("create")
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("start");
    id
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
    let container = run_container(&mut rt, &pod, web).await;
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
    let url = p.forward_url(&pod, http_port).await;
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
    let url = p.forward_url(&pod, http_port).await;
    let mut ws = ws_connect(&format!("{url}?port={http_port}"), "portforward.k8s.io").await;
    for channel in [0u8, 1] {
        match ws.next().await.expect("a message").expect("message") {
            Message::Binary(b) => {
                assert_eq!(b[0], channel);
                assert_eq!(u16::from_le_bytes([b[1], b[2]]), http_port);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
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
    let echoer = run_container(&mut rt, &pod, config).await;
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
    while got.get(&1).map(Vec::as_slice) != Some(b"got one\n")
        || got.get(&2).map(Vec::as_slice) != Some(b"err one\n")
    {
        let message = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("attached output in time")
            .expect("a message")
            .expect("message");
        if let Message::Binary(b) = message {
            got.entry(b[0]).or_default().extend(&b[1..]);
        }
    }
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
}
