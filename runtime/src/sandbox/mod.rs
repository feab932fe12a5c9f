//! Sandbox drivers: what runs a pod's agent. `host` runs husk-agent on the
//! host in fresh namespaces; `microvm` (later) boots it in a husk-vmm guest.
//! huskd talks to either through the same agent protocol.

pub mod host;

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_proto::v1::agent_client::AgentClient;
use tonic::transport::Channel;

pub use host::HostDriver;

/// Boxed futures keep the trait object-safe without an async-trait crate.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// How long a sandbox's agent has to answer after its start.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox {id}: {what}: {source}")]
    Io {
        id: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox {id}: the agent did not answer within {timeout:?}: {detail}")]
    NotReady {
        id: String,
        timeout: Duration,
        detail: String,
    },
    #[error("sandbox {id}: cannot reach the agent: {source}")]
    Connect {
        id: String,
        #[source]
        source: husk_proto::client::ConnectError,
    },
    #[error("sandbox {id}: the driver {driver:?} is not available: {detail}")]
    Unavailable {
        id: String,
        driver: String,
        detail: String,
    },
}

/// What a driver needs to start one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub id: String,
    /// `<state>/sandboxes/<id>`: the driver's own directory for the sandbox.
    pub dir: PathBuf,
}

/// A started sandbox: where its agent listens and the process that runs it.
#[derive(Debug, Clone)]
pub struct Started {
    pub agent_socket: PathBuf,
    pub pid: u32,
    pub client: AgentClient<Channel>,
}

/// A way to run a pod's agent.
pub trait SandboxDriver: Send + Sync {
    /// The driver's name, as runtime handlers and state records use it.
    fn name(&self) -> &'static str;
    /// Starts the sandbox and returns once its agent answers Ping.
    fn start<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Started, SandboxError>>;
    /// Connects to the agent of a sandbox started earlier (maybe by another huskd).
    fn connect<'a>(
        &'a self,
        id: &'a str,
        agent_socket: &'a Path,
    ) -> BoxFuture<'a, Result<AgentClient<Channel>, SandboxError>>;
    /// Ends the sandbox's process (after the agent's Shutdown, or instead of
    /// it): waits up to `grace`, then kills. Idempotent.
    fn stop<'a>(
        &'a self,
        id: &'a str,
        pid: u32,
        dir: &'a Path,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), SandboxError>>;
    /// Whether the sandbox's process still runs.
    fn alive(&self, pid: u32, dir: &Path) -> bool;
}
