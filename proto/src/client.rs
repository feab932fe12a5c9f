//! Host side: reaching an agent, either on its own unix socket (host sandboxes,
//! tests) or through a VMM's hybrid vsock socket (microVM sandboxes).
//!
//! One call is one bounded attempt: callers waiting for a booting guest poll
//! [`connect`] until it succeeds, so an attempt must fail fast and say why
//! rather than hang.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::GrpcMethod;
use tower::service_fn;

use crate::v1::agent_client::AgentClient;
use crate::v1::{VersionRequest, VersionResponse};

/// A connected agent: every call on it has a deadline (see [`CallDeadline`]).
pub type Agent = AgentClient<InterceptedService<Channel, CallDeadline>>;

/// How long a call into an agent may take when [`connect_unix`] and
/// [`connect_hybrid_vsock`] set it up; huskd's is configurable.
pub const DEFAULT_CALL_DEADLINE: Duration = Duration::from_secs(30);

/// The calls that last as long as a process in the guest does (waiting for
/// its exit, streaming its output or stdin, forwarding a port): they get no
/// deadline but their caller's.
const WAITING_CALLS: [&str; 4] = ["WaitProcess", "ReadOutput", "WriteStdin", "PortForward"];

/// Gives every call into an agent, except the [`WAITING_CALLS`], this
/// deadline unless its caller set a shorter or longer one, so that a guest
/// that stops answering fails the call (tonic's channel enforces the
/// `grpc-timeout` it sends) instead of hanging it.
#[derive(Debug, Clone, Copy)]
pub struct CallDeadline(pub Duration);

impl Interceptor for CallDeadline {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let waits = request
            .extensions()
            .get::<GrpcMethod>()
            .is_some_and(|method| WAITING_CALLS.contains(&method.method()));
        if !waits && !request.metadata().contains_key("grpc-timeout") {
            request.set_timeout(self.0);
        }
        Ok(request)
    }
}

/// How long [`connect_unix`] and [`connect_hybrid_vsock`] wait for one attempt:
/// a little longer than husk-vmm waits for the guest to take a connection
/// (2 s), so that the VMM's own verdict, closing the socket, arrives first.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest answer to `CONNECT` we read; a real one (`OK 4294967295\n`) is far shorter.
const MAX_ANSWER_LEN: usize = 64;

/// Where an agent can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    /// The agent listens on this unix socket (`husk-agent --listen unix://PATH`).
    Unix(PathBuf),
    /// The agent listens on guest vsock `port`; the VMM bridges it to the host
    /// unix socket `uds_path` (Firecracker-style hybrid vsock).
    HybridVsock { uds_path: PathBuf, port: u32 },
}

impl fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentAddr::Unix(path) => write!(f, "agent at unix socket {}", path.display()),
            AgentAddr::HybridVsock { uds_path, port } => write!(
                f,
                "agent at guest vsock port {port} through VMM socket {}",
                uds_path.display()
            ),
        }
    }
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to the {addr}: {source}")]
    Socket { addr: AgentAddr, source: io::Error },
    #[error("hybrid vsock handshake with the {addr} failed: {source}")]
    Handshake { addr: AgentAddr, source: io::Error },
    #[error(
        "the VMM closed the connection without answering CONNECT for the {addr} \
         (nothing listening on that port in the guest yet?)"
    )]
    NoAnswer { addr: AgentAddr },
    #[error("the VMM answered {answer:?} instead of \"OK <port>\" for the {addr}")]
    Refused { addr: AgentAddr, answer: String },
    #[error("no connection to the {addr} within {timeout:?}")]
    TimedOut { addr: AgentAddr, timeout: Duration },
    #[error("cannot set up the gRPC channel to the {addr}: {source}")]
    Channel {
        addr: AgentAddr,
        source: tonic::transport::Error,
    },
}

/// Connects to an agent listening on the unix socket `path`, within
/// [`DEFAULT_CONNECT_TIMEOUT`]; calls get [`DEFAULT_CALL_DEADLINE`].
pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Agent, ConnectError> {
    let addr = AgentAddr::Unix(path.as_ref().to_path_buf());
    connect(&addr, DEFAULT_CONNECT_TIMEOUT, DEFAULT_CALL_DEADLINE).await
}

/// Connects to an agent listening on guest vsock `port`, through the VMM's
/// hybrid vsock socket `uds_path`, within [`DEFAULT_CONNECT_TIMEOUT`]; calls
/// get [`DEFAULT_CALL_DEADLINE`].
pub async fn connect_hybrid_vsock(
    uds_path: impl AsRef<Path>,
    port: u32,
) -> Result<Agent, ConnectError> {
    let addr = AgentAddr::HybridVsock {
        uds_path: uds_path.as_ref().to_path_buf(),
        port,
    };
    connect(&addr, DEFAULT_CONNECT_TIMEOUT, DEFAULT_CALL_DEADLINE).await
}

/// Connects to the agent at `addr`, failing with [`ConnectError::TimedOut`] if
/// the stream and the gRPC channel are not up within `timeout`. Should the
/// connection drop later, the channel reconnects by itself on the next call,
/// each reconnection bounded by the same `timeout`. Each call then gets
/// `call_deadline` (see [`CallDeadline`]).
pub async fn connect(
    addr: &AgentAddr,
    timeout: Duration,
    call_deadline: Duration,
) -> Result<Agent, ConnectError> {
    let attempt = async {
        // Dial here rather than only inside the connector, so that a failure
        // reaches the caller as a typed ConnectError instead of a boxed one.
        let first = Arc::new(Mutex::new(Some(dial(addr).await?)));
        let reconnect_addr = addr.clone();
        let connector = service_fn(move |_: Uri| {
            let ready = first.lock().ok().and_then(|mut stream| stream.take());
            let addr = reconnect_addr.clone();
            async move {
                let stream = match ready {
                    Some(stream) => stream,
                    None => dial(&addr).await?,
                };
                Ok::<_, ConnectError>(TokioIo::new(stream))
            }
        });
        // The URI only fills the :authority header; the connector picks the peer.
        let channel = Endpoint::from_static("http://husk-agent")
            .connect_timeout(timeout)
            .connect_with_connector(connector)
            .await
            .map_err(|source| ConnectError::Channel {
                addr: addr.clone(),
                source,
            })?;
        Ok(AgentClient::with_interceptor(
            channel,
            CallDeadline(call_deadline),
        ))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ConnectError::TimedOut {
            addr: addr.clone(),
            timeout,
        })?
}

/// Why an agent cannot serve this host.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("the agent did not say its version: {0}")]
    Call(#[from] tonic::Status),
    #[error(
        "the agent (husk-agent {agent_version}) speaks agent protocol {agent}, older than \
         the {required} this host needs: update the guest image or the agent binary"
    )]
    TooOld {
        agent_version: String,
        agent: u32,
        required: u32,
    },
}

/// Asks the agent its protocol version and refuses one older than this
/// crate's [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION): growth is additive,
/// so a newer agent serves an older host, but an older agent lacks RPCs or
/// fields this host relies on. Returns the agent's protocol version.
pub async fn check_version(client: &mut Agent) -> Result<u32, VersionError> {
    let version = client.version(VersionRequest {}).await?.into_inner();
    compatible(&version, crate::PROTOCOL_VERSION)
}

fn compatible(version: &VersionResponse, required: u32) -> Result<u32, VersionError> {
    if version.protocol_version < required {
        return Err(VersionError::TooOld {
            agent_version: version.agent_version.clone(),
            agent: version.protocol_version,
            required,
        });
    }
    Ok(version.protocol_version)
}

/// Opens a byte stream to the agent at `addr`.
async fn dial(addr: &AgentAddr) -> Result<UnixStream, ConnectError> {
    let path = match addr {
        AgentAddr::Unix(path) => path,
        AgentAddr::HybridVsock { uds_path, .. } => uds_path,
    };
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| ConnectError::Socket {
            addr: addr.clone(),
            source,
        })?;
    if let AgentAddr::HybridVsock { port, .. } = addr {
        hybrid_vsock_handshake(&mut stream, addr, *port).await?;
    }
    Ok(stream)
}

/// Sends `CONNECT <port>\n` and expects `OK <hostport>\n`; afterwards the stream
/// is a raw pipe to the guest's port.
async fn hybrid_vsock_handshake(
    stream: &mut UnixStream,
    addr: &AgentAddr,
    port: u32,
) -> Result<(), ConnectError> {
    let io_error = |source| ConnectError::Handshake {
        addr: addr.clone(),
        source,
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io_error)?;
    let answer = read_answer_line(stream).await.map_err(io_error)?;
    if answer.is_empty() {
        return Err(ConnectError::NoAnswer { addr: addr.clone() });
    }
    let text = String::from_utf8_lossy(&answer);
    match text
        .strip_suffix('\n')
        .and_then(|line| line.strip_prefix("OK "))
    {
        Some(host_port) if host_port.parse::<u32>().is_ok() => Ok(()),
        _ => Err(ConnectError::Refused {
            addr: addr.clone(),
            answer: text.into_owned(),
        }),
    }
}

/// Reads up to and including the first `\n`, at most [`MAX_ANSWER_LEN`] bytes,
/// or until end of stream. Reads byte by byte: whatever follows the line
/// already belongs to the guest (an HTTP/2 server speaks first) and must stay
/// in the stream.
async fn read_answer_line(stream: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(MAX_ANSWER_LEN);
    while line.len() < MAX_ANSWER_LEN && line.last() != Some(&b'\n') {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            break;
        }
        line.push(byte[0]);
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_agent_is_refused_saying_what_to_do() {
        let version = |protocol_version| VersionResponse {
            agent_version: "0.1.0".into(),
            protocol_version,
        };
        assert_eq!(compatible(&version(2), 2).expect("same"), 2);
        assert_eq!(compatible(&version(3), 2).expect("newer agent"), 3);
        let err = compatible(&version(1), 2).unwrap_err().to_string();
        assert!(
            err.contains("agent protocol 1, older than the 2 this host needs"),
            "{err}"
        );
    }
    use tokio::net::UnixListener;

    #[test]
    fn every_call_but_the_waiting_ones_gets_the_deadline() {
        let request = |method: &'static str| {
            let mut request = tonic::Request::new(());
            request
                .extensions_mut()
                .insert(GrpcMethod::new("husk.agent.v1.Agent", method));
            request
        };
        let timeout = |request: tonic::Request<()>| {
            request
                .metadata()
                .get("grpc-timeout")
                .map(|v| v.to_str().expect("ascii").to_owned())
        };
        let mut deadline = CallDeadline(Duration::from_secs(7));
        let bounded = deadline.call(request("StartContainer")).expect("intercept");
        assert!(timeout(bounded).is_some(), "StartContainer got no deadline");
        for waiting in WAITING_CALLS {
            let unbounded = deadline.call(request(waiting)).expect("intercept");
            assert_eq!(timeout(unbounded), None, "{waiting} got a deadline");
        }
        let mut own = request("ExecProcess");
        own.set_timeout(Duration::from_secs(600));
        let callers = own.metadata().get("grpc-timeout").cloned();
        let kept = deadline.call(own).expect("intercept");
        assert_eq!(kept.metadata().get("grpc-timeout"), callers.as_ref());
    }

    /// A fake VMM socket that reads one CONNECT line, checks it, then answers `reply`
    /// (or closes without a word when `reply` is None, or stays silent when it is "").
    fn fake_vmm(dir: &tempfile::TempDir, reply: Option<&'static str>) -> PathBuf {
        let path = dir.path().join("vmm.sock");
        let listener = UnixListener::bind(&path).expect("bind fake VMM socket");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut request = [0u8; b"CONNECT 1024\n".len()];
            stream.read_exact(&mut request).await.expect("read CONNECT");
            assert_eq!(&request, b"CONNECT 1024\n");
            match reply {
                None => drop(stream),
                Some(reply) => {
                    stream.write_all(reply.as_bytes()).await.expect("answer");
                    // Keep the stream open until the client is done with it.
                    let mut rest = Vec::new();
                    let _ = stream.read_to_end(&mut rest).await;
                }
            }
        });
        path
    }

    fn hybrid(uds_path: PathBuf) -> AgentAddr {
        AgentAddr::HybridVsock {
            uds_path,
            port: 1024,
        }
    }

    #[tokio::test]
    async fn handshake_leaves_the_guests_bytes_in_the_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = fake_vmm(&dir, Some("OK 1073741824\nguest speaks first"));
        let mut stream = dial(&hybrid(path)).await.expect("handshake");
        let mut rest = [0u8; b"guest speaks first".len()];
        stream
            .read_exact(&mut rest)
            .await
            .expect("read guest bytes");
        assert_eq!(&rest, b"guest speaks first");
    }

    #[tokio::test]
    async fn closing_without_an_answer_is_no_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = hybrid(fake_vmm(&dir, None));
        let err = connect(&addr, Duration::from_secs(5), DEFAULT_CALL_DEADLINE)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ConnectError::NoAnswer { addr: a } if *a == addr),
            "{err}"
        );
    }

    #[tokio::test]
    async fn another_answer_is_refused_and_quoted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = hybrid(fake_vmm(&dir, Some("NO such port\n")));
        let err = connect(&addr, Duration::from_secs(5), DEFAULT_CALL_DEADLINE)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ConnectError::Refused { answer, .. } if answer == "NO such port\n"),
            "{err}"
        );
        assert!(err.to_string().contains("NO such port"), "{err}");
    }

    #[tokio::test]
    async fn a_silent_vmm_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = hybrid(fake_vmm(&dir, Some("")));
        let timeout = Duration::from_millis(200);
        let err = connect(&addr, timeout, DEFAULT_CALL_DEADLINE)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ConnectError::TimedOut { timeout: t, .. } if *t == timeout),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_missing_socket_names_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.sock");
        let err = connect_unix(&path).await.unwrap_err();
        assert!(matches!(&err, ConnectError::Socket { .. }), "{err}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    }
}
