//! huskctl port-forward: a local listener per port; each connection gets
//! its own PortForward URL and WebSocket (`portforward.k8s.io`, channel 0
//! data, 1 errors, each first carrying the port).

use futures_util::{SinkExt, StreamExt};
use k8s_cri::v1 as cri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use super::client::{CliError, Huskd, Result};
use husk_proto::k8s_stream::Framing;

const PROTOCOL: &str = "portforward.k8s.io";
const DATA: u8 = 0;
const ERROR: u8 = 1;

/// `LOCAL:REMOTE` or `PORT` (the same on both sides).
pub fn parse_mapping(text: &str) -> std::result::Result<(u16, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{p:?} is not a port"))
    };
    match text.split_once(':') {
        Some((local, remote)) => Ok((port(local)?, port(remote)?)),
        None => Ok((port(text)?, port(text)?)),
    }
}

/// Forwards until Ctrl-C (or an error accepting).
pub async fn run(h: &Huskd, pod: &str, mappings: &[(u16, u16)]) -> Result<i32> {
    let mut tasks = tokio::task::JoinSet::<Result<()>>::new();
    for &(local, remote) in mappings {
        let listener = TcpListener::bind(("127.0.0.1", local))
            .await
            .map_err(CliError::io(format!("listening on 127.0.0.1:{local}")))?;
        eprintln!("Forwarding from 127.0.0.1:{local} -> {remote}");
        let h = h.clone();
        let pod = pod.to_owned();
        tasks.spawn(async move {
            loop {
                let (tcp, _) = listener
                    .accept()
                    .await
                    .map_err(CliError::io(format!("accepting on 127.0.0.1:{local}")))?;
                let h = h.clone();
                let pod = pod.clone();
                tokio::spawn(async move {
                    if let Err(e) = forward(&h, &pod, remote, tcp).await {
                        eprintln!("huskctl: port {remote}: {e}");
                    }
                });
            }
        });
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(130),
        Some(done) = tasks.join_next() => match done {
            Ok(Err(e)) => Err(e),
            _ => Ok(1),
        },
    }
}

fn stream_error(what: String) -> CliError {
    CliError::Io {
        what: "port-forward".into(),
        source: std::io::Error::other(what),
    }
}

/// One local connection to `remote` in the pod.
async fn forward(h: &Huskd, pod: &str, remote: u16, mut tcp: TcpStream) -> Result<()> {
    let request = cri::PortForwardRequest {
        pod_sandbox_id: pod.to_owned(),
        port: vec![remote.into()],
    };
    let url =
        h.rt.clone()
            .port_forward(h.request(request, std::time::Duration::ZERO))
            .await
            .map_err(h.failed(format!("PortForward to {pod}")))?
            .into_inner()
            .url;
    let url = format!("{}?port={remote}", url.replacen("http://", "ws://", 1));
    let host = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_owned();
    let mut request = url
        .into_client_request()
        .map_err(|e| stream_error(e.to_string()))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(PROTOCOL));
    let upstream = TcpStream::connect(&host)
        .await
        .map_err(CliError::io(format!("connecting to {host}")))?;
    let (socket, _) = tokio_tungstenite::client_async(request, upstream)
        .await
        .map_err(|e| stream_error(e.to_string()))?;
    let framing = Framing::of(PROTOCOL);
    let (mut sink, mut stream) = socket.split();
    // Each channel's first message is its port.
    let mut announced = [false, false];
    let mut buf = vec![0u8; 32 << 10];
    loop {
        tokio::select! {
            n = tcp.read(&mut buf) => {
                let n = n.map_err(CliError::io("reading the local connection"))?;
                if n == 0 {
                    break;
                }
                sink.send(framing.encode(DATA, &buf[..n]))
                    .await
                    .map_err(|e| stream_error(e.to_string()))?;
            }
            message = stream.next() => {
                let message = match message {
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Err(stream_error(e.to_string())),
                };
                let Some((channel, data)) = framing.decode(message) else { continue };
                let Some(first) = announced.get_mut(usize::from(channel)) else { continue };
                if !*first {
                    *first = true;
                    continue;
                }
                match channel {
                    DATA => tcp
                        .write_all(&data)
                        .await
                        .map_err(CliError::io("writing the local connection"))?,
                    ERROR => return Err(stream_error(String::from_utf8_lossy(&data).into_owned())),
                    _ => {}
                }
            }
        }
    }
    let _ = sink.close().await;
    Ok(())
}
