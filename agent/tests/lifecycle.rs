//! Runs the real husk-agent binary on the host, on a unix socket, and talks to
//! it as huskd does: through husk_proto::client.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use husk_proto::client::{connect_hybrid_vsock, connect_unix};
use husk_proto::v1::{PingRequest, PortForwardRequest, ShutdownRequest, VersionRequest};
use husk_proto::PROTOCOL_VERSION;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::process::{Child, Command};

const AGENT: &str = env!("CARGO_BIN_EXE_husk-agent");
/// Generous: the agent is ready in milliseconds, but CI machines stall.
const PATIENCE: Duration = Duration::from_secs(20);

/// An agent serving on `<tempdir>/agent.sock`, killed if a test fails.
struct RunningAgent {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl RunningAgent {
    /// Starts the agent and waits for its `husk-agent ready` line.
    async fn start() -> RunningAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        RunningAgent::start_on(dir, socket).await
    }

    async fn start_on(dir: tempfile::TempDir, socket: PathBuf) -> RunningAgent {
        let mut child = Command::new(AGENT)
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn husk-agent");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = async {
            while let Some(line) = lines.next_line().await.expect("read agent stdout") {
                if line == "husk-agent ready" {
                    return;
                }
            }
            panic!("husk-agent closed stdout without printing its ready line");
        };
        tokio::time::timeout(PATIENCE, ready)
            .await
            .expect("husk-agent ready in time");
        RunningAgent { child, socket, dir }
    }

    async fn exit_status(mut self) -> ExitStatus {
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("husk-agent exits in time")
            .expect("wait for husk-agent")
    }
}

#[tokio::test]
async fn answers_ping_and_version() {
    let agent = RunningAgent::start().await;
    let mut client = connect_unix(&agent.socket).await.expect("connect");

    client.ping(PingRequest {}).await.expect("ping");
    let version = client
        .version(VersionRequest {})
        .await
        .expect("version")
        .into_inner();
    assert_eq!(version.protocol_version, PROTOCOL_VERSION);
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        husk_proto::client::check_version(&mut client)
            .await
            .expect("compatible"),
        PROTOCOL_VERSION
    );
}

#[tokio::test]
async fn shutdown_replies_then_exits_cleanly_and_removes_its_socket() {
    let agent = RunningAgent::start().await;
    let socket = agent.socket.clone();
    let mut client = connect_unix(&socket).await.expect("connect");

    client
        .shutdown(ShutdownRequest {})
        .await
        .expect("shutdown reply");
    let status = agent.exit_status().await;
    assert!(status.success(), "husk-agent exited with {status}");
    assert!(!socket.exists(), "{} still exists", socket.display());
}

#[tokio::test]
async fn sigterm_exits_cleanly_and_removes_the_socket() {
    let agent = RunningAgent::start().await;
    let socket = agent.socket.clone();
    let pid = agent.child.id().expect("agent pid");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");

    let status = agent.exit_status().await;
    assert!(status.success(), "husk-agent exited with {status}");
    assert!(!socket.exists(), "{} still exists", socket.display());
}

#[tokio::test]
async fn replaces_a_stale_socket_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    // Binding and dropping a listener leaves its file behind, as a crash does.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind stale socket"));

    let agent = RunningAgent::start_on(dir, socket).await;
    let mut client = connect_unix(&agent.socket).await.expect("connect");
    client.ping(PingRequest {}).await.expect("ping");
}

#[tokio::test]
async fn refuses_a_socket_another_agent_serves_on() {
    let first = RunningAgent::start().await;
    let output = run_to_end(&["--listen", &format!("unix://{}", first.socket.display())]).await;
    assert!(!output.status.success());
    assert!(
        output.stderr.contains("another process is serving on it"),
        "{}",
        output.stderr
    );
    // The first agent keeps its socket.
    let mut client = connect_unix(&first.socket).await.expect("connect");
    client.ping(PingRequest {}).await.expect("ping");
}

#[tokio::test]
async fn refuses_to_replace_a_file_that_is_not_a_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.sock");
    std::fs::write(&path, "precious").expect("write file");

    let output = run_to_end(&["--listen", &format!("unix://{}", path.display())]).await;
    assert!(!output.status.success());
    assert!(
        output.stderr.contains("is not a socket"),
        "{}",
        output.stderr
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("file kept"),
        "precious"
    );
}

#[tokio::test]
async fn a_bad_listen_value_is_a_clear_error() {
    let output = run_to_end(&["--listen", "tcp://127.0.0.1:1024"]).await;
    assert!(!output.status.success());
    assert!(
        output.stderr.contains("--listen")
            && output
                .stderr
                .contains("expected vsock://PORT or unix://PATH"),
        "{}",
        output.stderr
    );
}

#[tokio::test]
async fn a_stray_word_is_an_error_on_the_host() {
    // Only PID 1 receives (and ignores) words from the kernel's command line.
    let output = run_to_end(&["noxsave"]).await;
    assert!(!output.status.success());
    assert!(
        output.stderr.contains("unexpected argument 'noxsave'"),
        "{}",
        output.stderr
    );
}

/// The hybrid vsock client against the real agent, with a stand-in for the
/// VMM's socket that bridges to the agent's unix socket after the handshake.
#[tokio::test]
async fn reachable_through_a_hybrid_vsock_bridge() {
    let agent = RunningAgent::start().await;
    let vmm_socket = agent.dir.path().join("vmm.sock");
    tokio::spawn(bridge_one_connection(
        UnixListener::bind(&vmm_socket).expect("bind VMM socket"),
        agent.socket.clone(),
    ));

    let mut client = connect_hybrid_vsock(&vmm_socket, husk_proto::AGENT_VSOCK_PORT)
        .await
        .expect("connect through the bridge");
    client.ping(PingRequest {}).await.expect("ping");
}

/// PortForward carries one TCP connection to the agent's loopback: the
/// client's end half-closes it, the server's answer comes back, and its
/// close ends the stream.
#[tokio::test]
async fn forwards_one_tcp_connection_on_its_loopback() {
    let agent = RunningAgent::start().await;
    let mut client = connect_unix(&agent.socket).await.expect("connect");
    let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = server.local_addr().expect("address").port();
    let echo = tokio::spawn(async move {
        let (mut tcp, _) = server.accept().await.expect("accept");
        let mut got = Vec::new();
        tcp.read_to_end(&mut got)
            .await
            .expect("read to the half-close");
        tcp.write_all(&[b"echo:", &got[..]].concat())
            .await
            .expect("answer");
    });
    let requests = [
        PortForwardRequest {
            port: port.into(),
            data: b"hel".to_vec(),
        },
        PortForwardRequest {
            port: 0,
            data: b"lo".to_vec(),
        },
    ];
    let mut answer = client
        .port_forward(tokio_stream::iter(requests))
        .await
        .expect("PortForward")
        .into_inner();
    let mut got = Vec::new();
    while let Some(piece) = tokio::time::timeout(PATIENCE, answer.message())
        .await
        .expect("an answer in time")
        .expect("a piece")
    {
        got.extend(piece.data);
    }
    assert_eq!(got, b"echo:hello");
    echo.await.expect("echo server");

    // Nothing listening, and no port at all.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let free = closed.local_addr().expect("address").port();
    drop(closed);
    for (port, code) in [
        (u32::from(free), tonic::Code::Unavailable),
        (0, tonic::Code::InvalidArgument),
        (70000, tonic::Code::InvalidArgument),
    ] {
        let request = PortForwardRequest {
            port,
            data: Vec::new(),
        };
        let status = client
            .port_forward(tokio_stream::iter([request]))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "port {port}: {status:?}");
    }
}

async fn bridge_one_connection(vmm: UnixListener, agent_socket: PathBuf) {
    let (mut host_side, _) = vmm.accept().await.expect("accept");
    let expected = format!("CONNECT {}\n", husk_proto::AGENT_VSOCK_PORT);
    let mut request = vec![0u8; expected.len()];
    host_side
        .read_exact(&mut request)
        .await
        .expect("read CONNECT");
    assert_eq!(request, expected.as_bytes());
    let mut guest_side = UnixStream::connect(&agent_socket)
        .await
        .expect("reach agent");
    host_side
        .write_all(b"OK 1073741824\n")
        .await
        .expect("answer OK");
    let _ = tokio::io::copy_bidirectional(&mut host_side, &mut guest_side).await;
}

struct Output {
    status: ExitStatus,
    stderr: String,
}

/// Runs the agent with `args` and expects it to end by itself.
async fn run_to_end(args: &[&str]) -> Output {
    let output = tokio::time::timeout(
        PATIENCE,
        Command::new(AGENT).args(args).kill_on_drop(true).output(),
    )
    .await
    .expect("husk-agent ends in time")
    .expect("run husk-agent");
    Output {
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
