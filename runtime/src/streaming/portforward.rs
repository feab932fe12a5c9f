//! Port forwarding: TCP connections to localhost in the pod's network,
//! carried over WebSocket (a data and an error channel per port) or SPDY (a
//! data and an error stream per connection, paired by `requestID`). A host
//! pod's network namespace is entered from a short-lived thread; a microVM
//! pod's agent connects inside the guest (its PortForward RPC) and carries
//! the bytes over vsock.

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use husk_proto::client::Agent;
use husk_proto::v1 as agent;
use nix::sched::CloneFlags;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;
use tracing::debug;

use super::spdy::{Event, Session};
use super::websocket::{normal_close, Framing, Socket};
use crate::manager::{CriError, Manager};
use crate::state::{PodRecord, PodState};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the pod's side at a time.
const CHUNK: usize = 32 << 10;

/// The ready pod whose ports are to be forwarded.
pub fn forwardable_pod(manager: &Manager, pod_id: &str) -> Result<PodRecord, CriError> {
    let pod = manager.pod(pod_id)?;
    if pod.state != PodState::Ready {
        return Err(CriError::FailedPrecondition(format!(
            "pod sandbox {pod_id} is not ready"
        )));
    }
    Ok(pod)
}

/// How the pod's ports are reached.
#[derive(Clone)]
pub enum PodNetwork {
    /// A host pod: the network namespace of this process (its agent).
    Netns(u32),
    /// A microVM pod: its agent, which connects inside the guest.
    Agent(Agent),
}

impl PodNetwork {
    pub async fn of(manager: &Manager, pod_id: &str) -> Result<PodNetwork, CriError> {
        let pod = forwardable_pod(manager, pod_id)?;
        if !manager.driver(&pod.driver)?.runs_in_vm() {
            return Ok(PodNetwork::Netns(pod.pid));
        }
        Ok(PodNetwork::Agent(manager.agent(&pod).await?))
    }

    /// Connects to `127.0.0.1:port` in the pod's network.
    async fn connect(&self, port: u16) -> io::Result<(FromPod, ToPod)> {
        match self {
            PodNetwork::Netns(pid) => {
                let (read, write) = connect(*pid, port).await?.into_split();
                Ok((FromPod::Tcp(read), ToPod::Tcp(write)))
            }
            PodNetwork::Agent(client) => connect_through_agent(client.clone(), port).await,
        }
    }
}

/// The pod's side of a forwarded connection, read.
enum FromPod {
    Tcp(OwnedReadHalf),
    Agent(Box<tonic::Streaming<agent::PortForwardData>>),
}

impl FromPod {
    /// The next bytes; None at the end (or a broken connection).
    async fn next(&mut self, buf: &mut [u8]) -> Option<Bytes> {
        match self {
            FromPod::Tcp(read) => match read.read(buf).await {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(Bytes::copy_from_slice(&buf[..n])),
            },
            FromPod::Agent(stream) => loop {
                match stream.next().await {
                    Some(Ok(piece)) if piece.data.is_empty() => continue,
                    Some(Ok(piece)) => return Some(piece.data.into()),
                    Some(Err(status)) => {
                        debug!("port-forward through the agent: {}", status.message());
                        return None;
                    }
                    None => return None,
                }
            },
        }
    }
}

/// The pod's side of a forwarded connection, written. Dropping it closes
/// the connection's write side; the reader keeps it open for reading.
enum ToPod {
    Tcp(OwnedWriteHalf),
    Agent(mpsc::Sender<agent::PortForwardRequest>),
}

impl ToPod {
    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            ToPod::Tcp(write) => write.write_all(data).await,
            ToPod::Agent(sender) => sender
                .send(agent::PortForwardRequest {
                    port: 0,
                    data: data.to_vec(),
                })
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe)),
        }
    }

    /// Half-closes the connection: the end of the agent's request stream,
    /// or a TCP shutdown.
    async fn shutdown(self) {
        if let ToPod::Tcp(mut write) = self {
            let _ = write.shutdown().await;
        }
    }
}

/// Asks the agent to connect to `port` in the guest; the connection is its
/// PortForward call (the agent refuses it at once if nothing listens).
async fn connect_through_agent(mut client: Agent, port: u16) -> io::Result<(FromPod, ToPod)> {
    let (sender, receiver) = mpsc::channel(16);
    sender
        .send(agent::PortForwardRequest {
            port: port.into(),
            data: Vec::new(),
        })
        .await
        .map_err(|_| io::Error::other("the agent's request stream closed"))?;
    let response = client
        .port_forward(ReceiverStream::new(receiver))
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unimplemented => io::Error::other(
                "the pod's agent cannot forward ports: its guest image predates PortForward",
            ),
            _ => io::Error::other(status.message().to_owned()),
        })?;
    Ok((
        FromPod::Agent(Box::new(response.into_inner())),
        ToPod::Agent(sender),
    ))
}

/// Connects to `127.0.0.1:port` in the network namespace of `pid`, from a
/// thread of its own that enters the namespace and ends (setns changes only
/// the calling thread, which must not go back to a pool).
async fn connect(pid: u32, port: u16) -> io::Result<TcpStream> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("husk-netns".into())
        .spawn(move || {
            let _ = tx.send(connect_in_netns(pid, port));
        })?;
    let stream = rx
        .await
        .map_err(|_| io::Error::other("the netns thread died"))??;
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}

fn connect_in_netns(pid: u32, port: u16) -> io::Result<std::net::TcpStream> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    std::net::TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), CONNECT_TIMEOUT)
}

fn connect_error(port: u16, e: io::Error) -> String {
    format!("error forwarding port {port} to pod: {e}")
}

/// Copies what the pod's side sends to `out` as `(key, data)`, then an
/// empty piece for its end.
async fn pump_from_pod<K: Copy + Send + 'static>(
    mut read: FromPod,
    key: K,
    out: mpsc::Sender<(K, Bytes)>,
) {
    let mut buf = vec![0u8; CHUNK];
    while let Some(data) = read.next(&mut buf).await {
        if out.send((key, data)).await.is_err() {
            return;
        }
    }
    let _ = out.send((key, Bytes::new())).await;
}

/// WebSocket: one connection per requested port, opened at once.
pub async fn over_websocket(
    socket: Socket,
    framing: Framing,
    network: PodNetwork,
    ports: Vec<u16>,
) {
    let (mut sink, mut stream) = socket.split();
    let (from_pod, mut to_client) = mpsc::channel::<(usize, Bytes)>(16);
    let mut writers: HashMap<usize, ToPod> = HashMap::new();
    // Dropped at the end, which stops readers whose pod side stays open.
    let mut pumps = JoinSet::new();
    for (i, &port) in ports.iter().enumerate() {
        // Each channel first carries its port, little-endian.
        let data = (2 * i) as u8;
        let error = data + 1;
        for channel in [data, error] {
            let _ = sink
                .send(framing.encode(channel, &port.to_le_bytes()))
                .await;
        }
        match network.connect(port).await {
            Ok((read, write)) => {
                writers.insert(i, write);
                pumps.spawn(pump_from_pod(read, i, from_pod.clone()));
            }
            Err(e) => {
                let message = connect_error(port, e);
                let _ = sink.send(framing.encode(error, message.as_bytes())).await;
            }
        }
    }
    drop(from_pod);
    let mut open = writers.len();
    while open > 0 {
        tokio::select! {
            piece = to_client.recv() => {
                let Some((i, data)) = piece else { break };
                if data.is_empty() {
                    open -= 1;
                    continue;
                }
                if sink.send(framing.encode((2 * i) as u8, &data)).await.is_err() {
                    break;
                }
            }
            message = stream.next() => {
                let message = match message {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(m)) => m,
                };
                let Some((channel, data)) = framing.decode(message) else { continue };
                let i = usize::from(channel / 2);
                if channel % 2 != 0 {
                    continue;
                }
                if let Some(w) = writers.get_mut(&i) {
                    if w.write_all(&data).await.is_err() {
                        writers.remove(&i);
                    }
                }
            }
        }
    }
    let _ = sink.send(normal_close()).await;
    let _ = sink.close().await;
}

/// One forwarded connection on a SPDY session, as its streams arrive.
#[derive(Default)]
struct Pair {
    data: Option<u32>,
    error: Option<u32>,
    port: u16,
    /// Set once connected.
    to_pod: Option<ToPod>,
}

/// SPDY: a connection for each data/error stream pair the client opens.
pub async fn over_spdy(mut session: Session, network: PodNetwork) {
    let writer = session.writer.clone();
    let (from_pod, mut to_client) = mpsc::channel::<(u32, Bytes)>(16);
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    // Data stream id → request id.
    let mut requests: HashMap<u32, String> = HashMap::new();
    let mut pumps = JoinSet::new();
    loop {
        tokio::select! {
            piece = to_client.recv() => {
                let Some((id, data)) = piece else { break };
                let fin = data.is_empty();
                if !writer.data(id, data, fin).await {
                    break;
                }
                // The pod's side ended: so does the error stream, empty.
                let error = requests.get(&id).and_then(|r| pairs.get(r)).and_then(|p| p.error);
                if let (true, Some(error)) = (fin, error) {
                    writer.data(error, Bytes::new(), true).await;
                }
            }
            event = session.events.recv() => {
                let Some(event) = event else { break };
                match event {
                    Event::Stream { id, headers } => {
                        let kind = Event::header(&headers, "streamtype").unwrap_or_default();
                        let request = Event::header(&headers, "requestid").unwrap_or_default();
                        let port = Event::header(&headers, "port").and_then(|p| p.parse().ok());
                        let (Some(port), "data" | "error") = (port, kind) else {
                            debug!(stream = id, kind, "refusing a SPDY stream");
                            writer.refuse(id).await;
                            continue;
                        };
                        writer.reply(id).await;
                        let pair = pairs.entry(request.to_owned()).or_default();
                        pair.port = port;
                        if kind == "data" {
                            pair.data = Some(id);
                            requests.insert(id, request.to_owned());
                        } else {
                            pair.error = Some(id);
                        }
                        let (Some(data), Some(error)) = (pair.data, pair.error) else { continue };
                        match network.connect(port).await {
                            Ok((read, write)) => {
                                pair.to_pod = Some(write);
                                pumps.spawn(pump_from_pod(read, data, from_pod.clone()));
                            }
                            Err(e) => {
                                let message = connect_error(port, e);
                                writer.data(error, message.into(), true).await;
                                writer.data(data, Bytes::new(), true).await;
                            }
                        }
                    }
                    Event::Data { id, data, fin } => {
                        let Some(pair) = requests.get(&id).and_then(|r| pairs.get_mut(r)) else {
                            continue;
                        };
                        if let Some(w) = &mut pair.to_pod {
                            if w.write_all(&data).await.is_err() || fin {
                                if let Some(w) = pair.to_pod.take() {
                                    w.shutdown().await;
                                }
                            }
                        }
                    }
                    Event::Reset { id } => {
                        if let Some(request) = requests.remove(&id) {
                            pairs.remove(&request);
                        }
                    }
                }
            }
        }
    }
    writer.go_away().await;
}
