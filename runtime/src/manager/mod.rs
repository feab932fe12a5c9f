//! The pod and container managers behind the CRI RuntimeService: state in
//! [`State`], sandboxes through a [`SandboxDriver`], containers through each
//! pod's agent.

pub mod attach;
mod container;
mod exec;
pub mod logs;
mod output;
mod pod;
mod reconcile;
mod resources;
mod seccomp;
pub mod spec;
mod stats;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use husk_proto::client::Agent;

use self::attach::AttachPoint;
use crate::config::Config;
use crate::image::{ImageStore, PullError, StoreError};
use crate::sandbox::{SandboxDriver, SandboxError};
use crate::state::{ContainerRecord, ContainerState, PodRecord, State, StateError};

pub use container::process;
pub use exec::{ExecIo, ExecOutput};

/// Why a CRI call failed; each maps to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Image(#[from] StoreError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error("{what}: {}", agent_message(source))]
    Agent {
        what: String,
        #[source]
        source: tonic::Status,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl CriError {
    /// Whether this is a call into an agent that missed its deadline.
    pub fn agent_gave_no_answer(&self) -> bool {
        matches!(self, CriError::Agent { source, .. } if gave_no_answer(source))
    }
}

impl From<CriError> for tonic::Status {
    fn from(err: CriError) -> Self {
        use tonic::Status;
        let message = err.to_string();
        match &err {
            CriError::NotFound(_) => Status::not_found(message),
            CriError::InvalidArgument(_)
            | CriError::Spec(_)
            | CriError::Sandbox(
                SandboxError::Unsupported { .. }
                | SandboxError::Volume {
                    source: crate::sandbox::volumes::VolumeError::Relative(_),
                    ..
                },
            ) => Status::invalid_argument(message),
            CriError::FailedPrecondition(_)
            | CriError::Network(crate::network::NetworkError::NotReady(_)) => {
                Status::failed_precondition(message)
            }
            CriError::AlreadyExists(_) => Status::already_exists(message),
            CriError::Unimplemented(_) => Status::unimplemented(message),
            CriError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            CriError::Image(StoreError::Reference(_) | StoreError::AmbiguousId { .. }) => {
                Status::invalid_argument(message)
            }
            CriError::Image(StoreError::InUse { .. }) => Status::failed_precondition(message),
            // No manifest for this platform is not found, as containerd says.
            CriError::Image(StoreError::Pull(e))
                if matches!(
                    e.deciding(),
                    PullError::NotFound { .. } | PullError::NoMatchingPlatform { .. }
                ) =>
            {
                Status::not_found(message)
            }
            // A layer that would write outside its rootfs: the image is refused.
            CriError::Image(StoreError::Unpack { source, .. })
                if matches!(**source, crate::image::unpack::UnpackError::Unsafe { .. }) =>
            {
                Status::invalid_argument(message)
            }
            CriError::Image(StoreError::Pull(e))
                if matches!(e.deciding(), PullError::Unauthorized { .. }) =>
            {
                Status::permission_denied(message)
            }
            CriError::Image(StoreError::Pull(e))
                if matches!(e.deciding(), PullError::Unreachable { .. }) =>
            {
                Status::unavailable(message)
            }
            CriError::Agent { source, .. } if gave_no_answer(source) => {
                Status::deadline_exceeded(message)
            }
            CriError::Agent { source, .. } => Status::new(source.code(), message),
            _ => Status::internal(message),
        }
    }
}

pub type Result<T, E = CriError> = std::result::Result<T, E>;

/// Whether an agent's call failed on its deadline ([`husk_proto::client::CallDeadline`]):
/// tonic's channel ends such a call as CANCELLED, and nothing else cancels
/// huskd's calls into an agent.
fn gave_no_answer(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Cancelled
}

/// What an agent's error says, in husk's words: its own message (not
/// tonic's description of the code), or what a missed deadline means.
fn agent_message(status: &tonic::Status) -> String {
    if gave_no_answer(status) {
        "the pod's agent did not answer in time (agent_timeout_secs): its guest or \
         process may be hung"
            .to_owned()
    } else if status.message().is_empty() {
        format!("the agent failed with {:?} and no message", status.code())
    } else {
        status.message().to_owned()
    }
}

pub(crate) fn agent_err(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> CriError {
    let what = what.into();
    move |source| CriError::Agent { what, source }
}

/// Now, in Unix nanoseconds, as CRI's timestamps are.
pub fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// A fresh 64-hex-digit id, as containerd's.
pub fn new_id() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| CriError::Io {
            what: "reading /dev/urandom for a new id".into(),
            source,
        })?;
    Ok(hex::encode(bytes))
}

/// `id` itself if it is one of `ids`, else the one of `ids` it is a prefix
/// of; none is NotFound, several is InvalidArgument naming how many.
fn resolve_id(what: &str, id: &str, ids: impl Iterator<Item = String>) -> Result<String> {
    let mut matches = Vec::new();
    for candidate in ids {
        if candidate == id {
            return Ok(candidate);
        }
        if candidate.starts_with(id) {
            matches.push(candidate);
        }
    }
    match matches.len() {
        0 => Err(CriError::NotFound(format!("{what} {id:?} not found"))),
        1 => Ok(matches.swap_remove(0)),
        n => Err(CriError::InvalidArgument(format!(
            "{what} id prefix {id:?} is ambiguous: {n} ids start with it"
        ))),
    }
}

/// Whether every `selector` label is in `labels`.
pub fn labels_match(selector: &HashMap<String, String>, labels: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Everything the RuntimeService needs.
pub struct Manager {
    pub config: Config,
    pub images: ImageStore,
    pub state: State,
    /// The sandbox drivers by runtime handler: the one place handlers are known.
    drivers: BTreeMap<&'static str, Arc<dyn SandboxDriver>>,
    agents: Mutex<HashMap<String, Agent>>,
    /// Running containers' output and stdin for Attach.
    attach: Mutex<HashMap<String, Arc<AttachPoint>>>,
    /// Containers' open log files, for ReopenContainerLog.
    logs: Mutex<HashMap<String, Weak<logs::LogFile>>>,
    /// Serialises read-modify-write of records.
    records: Mutex<()>,
    /// One lock per pod: its lifecycle calls do not overlap.
    pod_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Manager {
    pub fn new(
        config: Config,
        images: ImageStore,
        state: State,
        drivers: impl IntoIterator<Item = Arc<dyn SandboxDriver>>,
    ) -> Arc<Manager> {
        Arc::new(Manager {
            config,
            images,
            state,
            drivers: drivers.into_iter().map(|d| (d.name(), d)).collect(),
            agents: Mutex::new(HashMap::new()),
            attach: Mutex::new(HashMap::new()),
            logs: Mutex::new(HashMap::new()),
            records: Mutex::new(()),
            pod_locks: Mutex::new(HashMap::new()),
        })
    }

    fn sandboxes_dir(&self) -> PathBuf {
        self.config.state.join("sandboxes")
    }

    /// The driver of a runtime handler (a pod record's `driver`).
    pub fn driver(&self, name: &str) -> Result<Arc<dyn SandboxDriver>> {
        self.drivers.get(name).cloned().ok_or_else(|| {
            let known: Vec<String> = self.drivers.keys().map(|k| format!("{k:?}")).collect();
            CriError::InvalidArgument(format!(
                "unknown runtime handler {name:?} (husk has {})",
                known.join(" and ")
            ))
        })
    }

    /// The sandbox drivers, by runtime handler.
    pub fn drivers(&self) -> impl Iterator<Item = &Arc<dyn SandboxDriver>> {
        self.drivers.values()
    }

    fn pod_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.pod_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(id.to_owned()).or_default().clone()
    }

    fn forget_pod_lock(&self, id: &str) {
        let mut locks = self.pod_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.remove(id);
    }

    pub fn pod(&self, id: &str) -> Result<PodRecord> {
        self.state
            .pod(id)?
            .ok_or_else(|| CriError::NotFound(format!("pod sandbox {id:?} not found")))
    }

    /// The full id of the pod `id` names: the pod with that id, or the one
    /// pod whose id starts with it (crictl prints 13 characters).
    pub fn resolve_pod(&self, id: &str) -> Result<String> {
        let ids = self.state.pods()?.into_iter().map(|p| p.id);
        resolve_id("pod sandbox", id, ids)
    }

    /// The full id of the container `id` names, as [`resolve_pod`](Self::resolve_pod).
    pub fn resolve_container(&self, id: &str) -> Result<String> {
        let ids = self
            .state
            .containers()?
            .into_iter()
            .filter(|c| c.state != ContainerState::Creating)
            .map(|c| c.id);
        resolve_id("container", id, ids)
    }

    /// A container CRI knows: one still being created is not found yet.
    pub fn container(&self, id: &str) -> Result<ContainerRecord> {
        self.state
            .container(id)?
            .filter(|c| c.state != ContainerState::Creating)
            .ok_or_else(|| CriError::NotFound(format!("container {id:?} not found")))
    }

    /// Changes a container's record under the records lock and persists it.
    fn update_container(
        &self,
        id: &str,
        f: impl FnOnce(&mut ContainerRecord),
    ) -> Result<ContainerRecord> {
        let _guard = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let mut record = self.container(id)?;
        f(&mut record);
        self.state.put_container(&record)?;
        Ok(record)
    }

    fn update_pod(&self, id: &str, f: impl FnOnce(&mut PodRecord)) -> Result<PodRecord> {
        let _guard = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let mut record = self.pod(id)?;
        f(&mut record);
        self.state.put_pod(&record)?;
        Ok(record)
    }

    /// The agent of `pod`, connecting once if huskd has no channel yet
    /// (after a restart).
    pub(crate) async fn agent(&self, pod: &PodRecord) -> Result<Agent> {
        if let Some(client) = self
            .agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pod.id)
        {
            return Ok(client.clone());
        }
        let driver = self.driver(&pod.driver)?;
        let client = driver.connect(&pod.id, &pod.agent_socket).await?;
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod.id.clone(), client.clone());
        Ok(client)
    }

    /// The attach point of a running container whose output huskd copies
    /// (since it started it, or since it found it running at startup).
    pub fn attach_point(&self, id: &str) -> Result<Arc<AttachPoint>> {
        self.attach
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| {
                CriError::FailedPrecondition(format!(
                    "container {id} cannot be attached to: huskd is not copying its output \
                     (it has exited, or its pod's agent could not be reached at startup)"
                ))
            })
    }

    fn forget_attach_point(&self, id: &str) {
        let point = self
            .attach
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(point) = point {
            point.close();
        }
    }

    fn forget_agent(&self, pod_id: &str) {
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pod_id);
    }

    /// Image ids that containers were created from (RemoveImage refuses them).
    pub fn images_in_use(&self) -> Result<std::collections::HashSet<String>> {
        Ok(self
            .state
            .containers()?
            .into_iter()
            .map(|c| c.image_id)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_resolve_by_unique_prefix() {
        let ids = || ["abc123".to_owned(), "abd456".to_owned(), "ab".to_owned()].into_iter();
        assert_eq!(resolve_id("pod", "abc", ids()).unwrap(), "abc123");
        // An exact id wins over the ids it is a prefix of.
        assert_eq!(resolve_id("pod", "ab", ids()).unwrap(), "ab");
        let ambiguous = resolve_id("pod", "a", ids()).unwrap_err();
        assert!(
            matches!(ambiguous, CriError::InvalidArgument(_)),
            "{ambiguous}"
        );
        assert!(ambiguous.to_string().contains("3 ids"), "{ambiguous}");
        assert!(matches!(
            resolve_id("pod", "x", ids()),
            Err(CriError::NotFound(_))
        ));
    }
}
