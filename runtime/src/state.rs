//! huskd's persisted state: pods and containers in redb (`<root>/state.redb`),
//! one JSON record per id, with every record also in memory for reading.
//! Every CRI call that changes a pod or container writes it here before it
//! answers, so a restarted huskd knows them all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use k8s_cri::v1 as cri;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::network::PodNetwork;
use crate::sandbox::sizing::VmSize;

const PODS: TableDefinition<&str, &[u8]> = TableDefinition::new("pods");
const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("containers");

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("state record {id} is corrupt: {source}")]
    Record {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodState {
    /// Recorded by RunPodSandbox before anything starts, so that a crash
    /// leaves a record for huskd's next start to clean up from; CRI reads
    /// it as NOTREADY.
    Starting,
    Ready,
    NotReady,
}

/// One pod sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    pub id: String,
    pub config: cri::PodSandboxConfig,
    pub runtime_handler: String,
    pub state: PodState,
    pub created_at: i64,
    /// The sandbox driver's name ("host").
    pub driver: String,
    /// Where the driver keeps the sandbox: `<state>/sandboxes/<id>`.
    pub dir: PathBuf,
    /// The agent's unix socket.
    pub agent_socket: PathBuf,
    /// The process the driver started (the agent, or later the VMM); 0 once gone.
    pub pid: u32,
    /// The agent's shared directory (SetupSandbox's answer).
    pub shared_dir: String,
    /// Where the agent mounted the pod's volumes (SetupSandbox's answer);
    /// empty when its driver needs none.
    #[serde(default)]
    pub volumes_dir: String,
    /// The pod's network while it is set up; None for hostNetwork pods and
    /// once torn down.
    #[serde(default)]
    pub network: Option<PodNetwork>,
    /// The VM's size, for pods that run in one.
    #[serde(default)]
    pub vm_size: Option<VmSize>,
    /// Why the pod went NOTREADY on its own (its process died, or its agent
    /// stopped answering); None while ready and after a requested stop.
    #[serde(default)]
    pub failure: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    /// Recorded by CreateContainer before the agent is asked, so that a
    /// crash leaves a record for huskd's next start to clean up from; not
    /// a container for CRI yet.
    Creating,
    Created,
    Running,
    Exited,
    Unknown,
}

/// One container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub pod_id: String,
    pub config: cri::ContainerConfig,
    /// The image id (`sha256:...`).
    pub image_id: String,
    /// A repo digest of the image, or its id when it has none.
    pub image_ref: String,
    /// The log file: the pod's log directory joined with the config's log_path.
    pub log_path: Option<PathBuf>,
    pub state: ContainerState,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    /// The identity the container's first process got: CRI's
    /// ContainerStatus.user. `None` for records older than it.
    #[serde(default)]
    pub user: Option<ProcessUser>,
}

/// A process's uid, gid and supplementary groups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// The database, and every record in memory in front of it: lookups and
/// lists read the maps (no transaction, no JSON decoding); each change is
/// one write transaction, committed off the async workers, then applied to
/// the map. Cheap to share behind an Arc.
pub struct State {
    path: PathBuf,
    db: redb::Database,
    pods: Index<PodRecord>,
    containers: Index<ContainerRecord>,
    /// Held across a commit and its map update, so that the maps change in
    /// the order the database does.
    writer: Mutex<()>,
}

/// One table's records by id, as last committed.
type Index<T> = RwLock<BTreeMap<String, T>>;

/// Runs `commit` (an fsync) so that it does not stall the other tasks of a
/// multi-threaded tokio runtime's worker; elsewhere it just runs.
fn off_worker<T>(commit: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(commit)
        }
        _ => commit(),
    }
}

impl State {
    pub fn open(root: &Path) -> Result<State, StateError> {
        let path = root.join("state.redb");
        let db = redb::Database::create(&path).map_err(|e| StateError::Db {
            path: path.clone(),
            source: e.into(),
        })?;
        let mut state = State {
            path,
            db,
            pods: RwLock::default(),
            containers: RwLock::default(),
            writer: Mutex::default(),
        };
        // Create both tables, so readers never meet a missing one.
        state.write(|tx| {
            tx.open_table(PODS)?;
            tx.open_table(CONTAINERS)?;
            Ok(())
        })?;
        state.pods = RwLock::new(state.load(PODS)?);
        state.containers = RwLock::new(state.load(CONTAINERS)?);
        Ok(state)
    }

    fn err(&self, e: impl Into<redb::Error>) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StateError> {
        off_worker(|| {
            let tx = self.db.begin_write().map_err(|e| self.err(e))?;
            f(&tx).map_err(|e| self.err(e))?;
            tx.commit().map_err(|e| self.err(e))
        })
    }

    fn put<T: Serialize + Clone>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        index: &Index<T>,
        id: &str,
        record: &T,
    ) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(record).map_err(|source| StateError::Record {
            id: id.to_owned(),
            source,
        })?;
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.write(|tx| {
            tx.open_table(table)?.insert(id, bytes.as_slice())?;
            Ok(())
        })?;
        index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), record.clone());
        Ok(())
    }

    fn delete<T>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        index: &Index<T>,
        id: &str,
    ) -> Result<(), StateError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.write(|tx| {
            tx.open_table(table)?.remove(id)?;
            Ok(())
        })?;
        index.write().unwrap_or_else(|e| e.into_inner()).remove(id);
        Ok(())
    }

    fn get<T: Clone>(index: &Index<T>, id: &str) -> Option<T> {
        index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn all<T: Clone>(index: &Index<T>) -> Vec<T> {
        index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Every record of `table`, decoded: once, at open.
    fn load<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<BTreeMap<String, T>, StateError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(table).map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for entry in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let id = k.value().to_owned();
            let record =
                serde_json::from_slice(v.value()).map_err(|source| StateError::Record {
                    id: id.clone(),
                    source,
                })?;
            out.insert(id, record);
        }
        Ok(out)
    }

    pub fn put_pod(&self, pod: &PodRecord) -> Result<(), StateError> {
        self.put(PODS, &self.pods, &pod.id, pod)
    }

    pub fn pod(&self, id: &str) -> Result<Option<PodRecord>, StateError> {
        Ok(Self::get(&self.pods, id))
    }

    pub fn pods(&self) -> Result<Vec<PodRecord>, StateError> {
        Ok(Self::all(&self.pods))
    }

    pub fn delete_pod(&self, id: &str) -> Result<(), StateError> {
        self.delete(PODS, &self.pods, id)
    }

    pub fn put_container(&self, c: &ContainerRecord) -> Result<(), StateError> {
        self.put(CONTAINERS, &self.containers, &c.id, c)
    }

    pub fn container(&self, id: &str) -> Result<Option<ContainerRecord>, StateError> {
        Ok(Self::get(&self.containers, id))
    }

    pub fn containers(&self) -> Result<Vec<ContainerRecord>, StateError> {
        Ok(Self::all(&self.containers))
    }

    pub fn delete_container(&self, id: &str) -> Result<(), StateError> {
        self.delete(CONTAINERS, &self.containers, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let state = State::open(dir.path()).expect("open");
            state
                .put_pod(&PodRecord {
                    id: "p1".into(),
                    config: cri::PodSandboxConfig {
                        hostname: "h".into(),
                        ..Default::default()
                    },
                    runtime_handler: "host".into(),
                    state: PodState::Ready,
                    created_at: 5,
                    driver: "host".into(),
                    dir: "/run/husk/sandboxes/p1".into(),
                    agent_socket: "/run/husk/sandboxes/p1/agent.sock".into(),
                    pid: 42,
                    shared_dir: String::new(),
                    volumes_dir: String::new(),
                    network: None,
                    vm_size: None,
                    failure: None,
                })
                .expect("put");
        }
        let state = State::open(dir.path()).expect("reopen");
        let pod = state.pod("p1").expect("get").expect("present");
        assert_eq!(pod.config.hostname, "h");
        assert_eq!(pod.pid, 42);
        assert_eq!(state.pods().expect("all").len(), 1);
        state.delete_pod("p1").expect("delete");
        assert!(state.pod("p1").expect("get").is_none());
        assert!(state.containers().expect("all").is_empty());
    }
}
