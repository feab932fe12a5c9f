//! Clients of huskd's streaming server, written from the protocol
//! descriptions (k8s.io/apimachinery httpstream/wsstream and spdy,
//! client-go remotecommand and portforward, SPDY draft 3), not from
//! huskd's code: plain HTTP/1.1 requests, WebSocket channels, and SPDY/3.1
//! frames with their compressed header blocks.

use std::collections::HashMap;
use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use futures_util::StreamExt;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::Channel;

/// How long a client waits for the next message or frame.
const PATIENCE: Duration = Duration::from_secs(30);

/// A URL for `cmd` in `container` from CRI Exec; a tty has no stderr.
pub async fn exec_url(
    rt: &mut RuntimeServiceClient<Channel>,
    container: &str,
    cmd: &[&str],
    stdin: bool,
    tty: bool,
) -> String {
    rt.exec(cri::ExecRequest {
        container_id: container.to_owned(),
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

/// A WebSocket (v4) attached to the container's stdout and stderr.
pub async fn attach_output(rt: &mut RuntimeServiceClient<Channel>, container: &str) -> Ws {
    let url = rt
        .attach(cri::AttachRequest {
            container_id: container.to_owned(),
            stdout: true,
            stderr: true,
            ..Default::default()
        })
        .await
        .expect("Attach")
        .into_inner()
        .url;
    ws_connect(&url, "v4.channel.k8s.io").await
}

/// A URL for forwarding `port` of `pod` from CRI PortForward.
pub async fn forward_url(rt: &mut RuntimeServiceClient<Channel>, pod: &str, port: u16) -> String {
    rt.port_forward(cri::PortForwardRequest {
        pod_sandbox_id: pod.to_owned(),
        port: vec![port.into()],
    })
    .await
    .expect("PortForward")
    .into_inner()
    .url
}

/// A WebSocket port-forward session to `port` in `pod` (CRI PortForward,
/// then `?port=`): channel 0 carries data, 1 errors, and each has sent its
/// port first, which is checked here.
pub async fn ws_forward(rt: &mut RuntimeServiceClient<Channel>, pod: &str, port: u16) -> Ws {
    let url = forward_url(rt, pod, port).await;
    let mut ws = ws_connect(&format!("{url}?port={port}"), "portforward.k8s.io").await;
    for channel in [0u8, 1] {
        match ws.next().await.expect("a message").expect("message") {
            Message::Binary(b) => {
                assert_eq!(b.first(), Some(&channel), "{b:?}");
                assert_eq!(b.get(1..3), Some(&port.to_le_bytes()[..]), "{b:?}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    ws
}

/// `http://host:port/path` → ("host:port", "/path").
pub fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let slash = rest.find('/').expect("a path");
    (rest[..slash].to_owned(), rest[slash..].to_owned())
}

/// Sends an HTTP/1.1 request and reads the response head byte by byte
/// (so nothing after it is consumed): the status and the headers.
pub async fn http_request(
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

pub type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

pub async fn ws_connect(url: &str, protocol: &str) -> Ws {
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
pub fn ws_frame(base64: bool, channel: u8, data: &[u8]) -> Message {
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
pub async fn ws_collect(ws: &mut Ws, base64: bool) -> HashMap<u8, Vec<u8>> {
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

/// Reads messages (binary protocols) into `got` per channel until `done`
/// holds of it; for sessions that stay open, such as an attach.
pub async fn ws_read_until(
    ws: &mut Ws,
    got: &mut HashMap<u8, Vec<u8>>,
    done: impl Fn(&HashMap<u8, Vec<u8>>) -> bool,
) {
    while !done(got) {
        let message = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no message in {PATIENCE:?}; so far {got:?}"))
            .expect("a message")
            .expect("message");
        if let Message::Binary(b) = message {
            if let Some((&channel, data)) = b.split_first() {
                got.entry(channel).or_default().extend(data);
            }
        }
    }
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
pub enum SpdyFrame {
    Reply,
    Data(u32, Vec<u8>, bool),
    Reset(u32),
    GoAway,
    Other,
}

pub struct Spdy {
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
    pub async fn connect(url: &str, protocol: &str) -> Spdy {
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
    pub async fn open(&mut self, headers: &[(&str, &str)]) -> u32 {
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

    pub async fn send(&mut self, id: u32, data: &[u8], fin: bool) {
        let mut frame = id.to_be_bytes().to_vec();
        frame.push(u8::from(fin));
        frame.extend(&(data.len() as u32).to_be_bytes()[1..]);
        frame.extend(data);
        self.tcp.write_all(&frame).await.expect("write data");
    }

    /// The next frame, None at the end of the connection.
    pub async fn next(&mut self) -> Option<SpdyFrame> {
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
    pub async fn collect(&mut self) -> HashMap<u32, Vec<u8>> {
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
pub fn exit_code_of(status: &[u8]) -> i32 {
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
