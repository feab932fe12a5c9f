//! PortForward: one TCP connection to a port on the pod's loopback, carried
//! over a bidirectional gRPC stream. The agent's network namespace is the
//! pod's (a guest's own, or the host sandbox's), so connecting from here
//! reaches what the pod's containers listen on.

use std::net::Ipv4Addr;
use std::time::Duration;

use husk_proto::v1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};
use tracing::{debug, info_span, Instrument};

/// How long connecting to the pod's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes per message towards the host.
const CHUNK: usize = 32 << 10;

pub type ForwardStream = ReceiverStream<Result<v1::PortForwardData, Status>>;

/// Connects to the port the first message names and starts the copies both
/// ways; the stream is what the pod's side sends.
pub async fn start(
    mut incoming: Streaming<v1::PortForwardRequest>,
) -> Result<ForwardStream, Status> {
    let first = incoming.next().await.transpose()?.ok_or_else(|| {
        Status::invalid_argument("PortForward needs a first message naming the port")
    })?;
    let port = u16::try_from(first.port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| Status::invalid_argument(format!("bad port {}", first.port)))?;
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)),
    )
    .await
    .map_err(|_| {
        Status::unavailable(format!(
            "connecting to 127.0.0.1:{port}: no answer in {CONNECT_TIMEOUT:?}"
        ))
    })?
    .map_err(|e| Status::unavailable(format!("connecting to 127.0.0.1:{port}: {e}")))?;
    let (read, write) = tcp.into_split();
    let span = info_span!("port_forward", port);
    tokio::spawn(to_pod(first.data, incoming, write).instrument(span.clone()));
    let (sender, receiver) = mpsc::channel(4);
    tokio::spawn(from_pod(read, sender).instrument(span));
    Ok(ReceiverStream::new(receiver))
}

/// The host's bytes into the connection; the end of its stream half-closes
/// the connection (an error, the host gone, closes it with `from_pod`).
async fn to_pod(
    first: Vec<u8>,
    mut incoming: Streaming<v1::PortForwardRequest>,
    mut write: OwnedWriteHalf,
) {
    if write.write_all(&first).await.is_err() {
        return;
    }
    while let Some(message) = incoming.next().await {
        let Ok(message) = message else {
            debug!("the host's stream broke");
            return;
        };
        if write.write_all(&message.data).await.is_err() {
            return;
        }
    }
    let _ = write.shutdown().await;
}

/// The pod's bytes to the host, until the pod's side ends or the host stops
/// listening.
async fn from_pod(
    mut read: OwnedReadHalf,
    sender: mpsc::Sender<Result<v1::PortForwardData, Status>>,
) {
    let mut buf = vec![0; CHUNK];
    loop {
        let n = tokio::select! {
            _ = sender.closed() => return,
            n = read.read(&mut buf) => n,
        };
        let message = match n {
            Ok(0) => return,
            Ok(n) => Ok(v1::PortForwardData {
                data: buf[..n].to_vec(),
            }),
            Err(e) => Err(Status::aborted(format!("reading from the pod's port: {e}"))),
        };
        let failed = message.is_err();
        if sender.send(message).await.is_err() || failed {
            return;
        }
    }
}
