//! The containers of this sandbox: created from an OCI spec and a rootfs
//! source, started, exec'd into, signalled, waited for, measured, removed.

pub mod capabilities;
pub mod cgroup;
pub mod init;
mod launch;
pub mod paths;
mod pod_pid;
mod process;
mod rootfs;
pub mod seccomp;
mod spec;
pub(crate) mod stdio;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use husk_proto::v1::{self, rootfs_source};
use nix::sys::signal::Signal;
use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResources, Spec};
use tokio::sync::Mutex as AsyncMutex;
use tracing::{info, warn};

use self::cgroup::Cgroup;
use self::init::{InitConfig, Target};
use self::launch::{launch, InitChannel, LaunchError};
use self::pod_pid::PodPidNamespace;
pub use self::process::ProcessEntry;
use self::process::{unix_nanos, Failure};
use self::rootfs::{Rootfs, RootfsError, Source, DEFAULT_WRITABLE_BYTES};
use self::spec::SpecError;
use crate::reaper::Reaper;

/// How long Remove waits for a killed container's init to be reaped.
const KILL_GRACE: Duration = Duration::from_secs(10);
/// Exited execs are forgotten after this long: long enough for any waiter.
const EXEC_RETENTION: Duration = Duration::from_secs(300);
/// The pod cgroup before SetupSandbox names the pod.
const DEFAULT_POD_CGROUP: &str = "husk/default";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {0:?} not found")]
    NotFound(String),
    #[error("exec {exec:?} not found in container {container:?}")]
    ExecNotFound { container: String, exec: String },
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("creating container {id:?}: {source}")]
    Launch { id: String, source: LaunchError },
    /// The command could not be run: not found, not executable.
    #[error("{0}")]
    ExecFailed(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl From<ContainerError> for tonic::Status {
    fn from(err: ContainerError) -> Self {
        use tonic::Status;
        let message = err.to_string();
        match err {
            ContainerError::NotFound(_) | ContainerError::ExecNotFound { .. } => {
                Status::not_found(message)
            }
            ContainerError::AlreadyExists(_) => Status::already_exists(message),
            ContainerError::Spec(_) | ContainerError::InvalidArgument(_) => {
                Status::invalid_argument(message)
            }
            ContainerError::Rootfs(RootfsError::NoDirectory(_) | RootfsError::BadPath(_))
            | ContainerError::Rootfs(RootfsError::NoSource) => Status::invalid_argument(message),
            ContainerError::FailedPrecondition(_) | ContainerError::ExecFailed(_) => {
                Status::failed_precondition(message)
            }
            ContainerError::Launch {
                source: LaunchError::Failed(_),
                ..
            } => Status::failed_precondition(message),
            _ => Status::internal(message),
        }
    }
}

struct Container {
    id: String,
    spec: Spec,
    cgroup: Cgroup,
    rootfs: Mutex<Rootfs>,
    created_at: SystemTime,
    main: Arc<ProcessEntry>,
    /// The channel to the container's init while it waits for Start.
    init_channel: AsyncMutex<Option<InitChannel>>,
    execs: Mutex<HashMap<String, Arc<ProcessEntry>>>,
}

pub struct Containers {
    state_dir: PathBuf,
    reaper: Reaper,
    pod_cgroup: Mutex<PathBuf>,
    table: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids being created or removed: taken, but not in `table` (yet or any more).
    busy: Mutex<HashSet<String>>,
    /// The node's mount namespace, where bind mount sources are found (see
    /// `InitConfig::bind_sources_from`); `None` in a guest.
    node_mounts: Option<File>,
    /// A host pod's PID namespace, for containers whose spec lists none.
    pod_pid: PodPidNamespace,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Containers {
    pub fn new(state_dir: &Path, reaper: Reaper, node_mounts: Option<File>) -> Containers {
        Containers {
            state_dir: state_dir.to_path_buf(),
            reaper,
            pod_cgroup: Mutex::new(PathBuf::from(DEFAULT_POD_CGROUP)),
            table: Mutex::default(),
            busy: Mutex::default(),
            node_mounts,
            pod_pid: PodPidNamespace::default(),
        }
    }

    /// Containers created from now on go below `husk/<sandbox_id>`.
    pub fn set_sandbox(&self, sandbox_id: &str) -> Result<(), ContainerError> {
        spec::check_id("sandbox id", sandbox_id)?;
        *lock(&self.pod_cgroup) = Path::new("husk").join(sandbox_id);
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        lock(&self.table)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))
    }

    pub fn process(
        &self,
        reference: Option<&v1::ProcessRef>,
    ) -> Result<Arc<ProcessEntry>, ContainerError> {
        let reference =
            reference.ok_or_else(|| ContainerError::InvalidArgument("no process named".into()))?;
        let container = self.get(&reference.container_id)?;
        if reference.exec_id.is_empty() {
            return Ok(container.main.clone());
        }
        let execs = lock(&container.execs);
        execs
            .get(&reference.exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::ExecNotFound {
                container: reference.container_id.clone(),
                exec: reference.exec_id.clone(),
            })
    }

    /// Takes `id` for the duration of a create or remove.
    fn reserve(&self, id: &str) -> Result<Reservation<'_>, ContainerError> {
        let table = lock(&self.table);
        let mut busy = lock(&self.busy);
        if table.contains_key(id) || !busy.insert(id.to_string()) {
            return Err(ContainerError::AlreadyExists(format!("container {id:?}")));
        }
        Ok(Reservation {
            containers: self,
            id: id.to_string(),
        })
    }

    #[tracing::instrument(skip_all, fields(container = %request.container_id))]
    pub async fn create(&self, request: v1::CreateContainerRequest) -> Result<u32, ContainerError> {
        let id = request.container_id;
        spec::check_id("container id", &id)?;
        let mut spec = spec::parse_spec(&request.oci_spec_json)?;
        let rootfs_request = request.rootfs.unwrap_or_default();
        let _reservation = self.reserve(&id)?;
        // A spec that lists no PID namespace shares the pod's: in a guest
        // the agent's own, on the host (where the agent's is the node's)
        // the one kept for the pod.
        if self.node_mounts.is_some() && !lists_namespace(&spec, LinuxNamespaceType::Pid) {
            let pod_cgroup = lock(&self.pod_cgroup).clone();
            let path = self.pod_pid.path(pod_cgroup, &self.reaper).await?;
            add_namespace(&mut spec, LinuxNamespaceType::Pid, path)?;
        }

        let cgroup = Cgroup::create(&lock(&self.pod_cgroup).join(&id))?;
        let mut rootfs = None;
        let result = self
            .create_in(
                &id,
                &spec,
                &cgroup,
                &rootfs_request,
                request.stdin,
                &mut rootfs,
            )
            .await;
        let (main, channel) = match result {
            Ok(created) => created,
            Err(err) => {
                // Leave nothing behind: the process (if any) dies with its cgroup.
                let _ = cgroup.kill_all();
                if let Some(mut rootfs) = rootfs {
                    rootfs.unmount();
                }
                if let Err(remove) = cgroup.remove() {
                    warn!("removing the cgroup of failed container {id}: {remove}");
                }
                return Err(err);
            }
        };
        let pid = main.pid;
        let container = Arc::new(Container {
            id: id.clone(),
            spec,
            cgroup,
            rootfs: Mutex::new(rootfs.ok_or(RootfsError::NoSource)?),
            created_at: SystemTime::now(),
            main,
            init_channel: AsyncMutex::new(Some(channel)),
            execs: Mutex::default(),
        });
        lock(&self.table).insert(id, container);
        info!(pid, "created");
        Ok(pid as u32)
    }

    async fn create_in(
        &self,
        id: &str,
        spec: &Spec,
        cgroup: &Cgroup,
        request: &v1::RootfsSource,
        stdin: bool,
        rootfs_slot: &mut Option<Rootfs>,
    ) -> Result<(Arc<ProcessEntry>, InitChannel), ContainerError> {
        if let Some(resources) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
            cgroup.apply(resources)?;
        }
        let source = match &request.source {
            Some(rootfs_source::Source::BlockDevice(device)) => {
                Source::BlockDevice(Path::new(device))
            }
            Some(rootfs_source::Source::Directory(dir)) => Source::Directory(Path::new(dir)),
            None => return Err(RootfsError::NoSource.into()),
        };
        let limit = match request.writable_layer_bytes {
            0 => DEFAULT_WRITABLE_BYTES,
            n => n,
        };
        let dir = self.state_dir.join("containers").join(id);
        let rootfs = rootfs_slot.insert(Rootfs::mount(&dir, source, limit)?);
        let process = spec.process().clone().ok_or(SpecError::NoProcess)?;
        let tty = process.terminal() == Some(true);
        let config = InitConfig {
            cgroup_procs: cgroup.procs_files(),
            seccomp: spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
            // The stage is another process: it opens the namespace through ours.
            bind_sources_from: self.node_mounts.as_ref().map(|file| {
                PathBuf::from(format!(
                    "/proc/{}/fd/{}",
                    std::process::id(),
                    file.as_raw_fd()
                ))
            }),
            process,
            target: Target::Container {
                spec: Box::new(spec.clone()),
                rootfs: rootfs.merged(),
            },
        };
        let stdio_error = |source| ContainerError::Io {
            what: "creating the container's stdio".into(),
            source,
        };
        let (pipes, child_stdio) = match tty {
            true => (None, stdio::detached()),
            false => {
                let (io, child) = stdio::pipes(stdin).map_err(stdio_error)?;
                (Some(io), child)
            }
        };
        let launch_error = |source| ContainerError::Launch {
            id: id.to_string(),
            source,
        };
        let mut launched = launch(&config, child_stdio).await.map_err(launch_error)?;
        launched.channel.ready().await.map_err(launch_error)?;
        let io = match pipes {
            Some(io) => io,
            None => {
                let master = launched
                    .channel
                    .terminal(true)
                    .await
                    .map_err(launch_error)?;
                stdio::terminal(master, stdin).map_err(stdio_error)?
            }
        };
        let main = ProcessEntry::spawn(launched.pid, io, cgroup.clone(), &self.reaper);
        Ok((main, launched.channel))
    }

    #[tracing::instrument(skip(self))]
    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let mut slot = container.init_channel.lock().await;
        let mut channel = slot.take().ok_or_else(|| {
            ContainerError::FailedPrecondition(format!("container {id:?} was started already"))
        })?;
        drop(slot);
        if container.main.exited() {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} has exited"
            )));
        }
        container.main.mark_started();
        let outcome = match channel.start().await {
            Ok(()) => channel.exec_outcome().await,
            Err(err) => Err((err.to_string(), 1)),
        };
        if let Err((message, _)) = outcome {
            // As runc and kubelet report it: exit code 128, StartError.
            container.main.fail(Failure {
                reason: "StartError",
                message: message.clone(),
                code: 128,
            });
            return Err(ContainerError::ExecFailed(message));
        }
        info!("started");
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(container = %request.container_id, exec = %request.exec_id))]
    pub async fn exec(&self, request: v1::ExecProcessRequest) -> Result<u32, ContainerError> {
        spec::check_id("exec id", &request.exec_id)?;
        let container = self.get(&request.container_id)?;
        if container.main.exited() || !container.main.is_started() {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {:?} is not running",
                container.id
            )));
        }
        let base = container
            .spec
            .process()
            .clone()
            .ok_or(SpecError::NoProcess)?;
        let process = spec::merge_exec_process(&base, &request.oci_process_json)?;
        {
            let mut execs = lock(&container.execs);
            execs.retain(|_, e| !e.exited_longer_than(EXEC_RETENTION));
            if execs.get(&request.exec_id).is_some_and(|e| !e.exited()) {
                return Err(ContainerError::AlreadyExists(format!(
                    "exec {:?}",
                    request.exec_id
                )));
            }
        }
        let tty = process.terminal() == Some(true);
        let config = InitConfig {
            cgroup_procs: container.cgroup.procs_files(),
            seccomp: container
                .spec
                .linux()
                .as_ref()
                .and_then(|l| l.seccomp().clone()),
            bind_sources_from: None,
            process,
            target: Target::Exec {
                pid: container.main.pid,
            },
        };
        let stdio_error = |source| ContainerError::Io {
            what: "creating the exec's stdio".into(),
            source,
        };
        let (pipes, child_stdio) = match tty {
            true => (None, stdio::detached()),
            false => {
                let (io, child) = stdio::pipes(request.stdin).map_err(stdio_error)?;
                (Some(io), child)
            }
        };
        let launch_error = |source| ContainerError::Launch {
            id: container.id.clone(),
            source,
        };
        let mut launched = launch(&config, child_stdio).await.map_err(launch_error)?;
        let io = match pipes {
            Some(io) => io,
            None => {
                let master = launched
                    .channel
                    .terminal(false)
                    .await
                    .map_err(launch_error)?;
                stdio::terminal(master, request.stdin).map_err(stdio_error)?
            }
        };
        let entry = ProcessEntry::spawn(launched.pid, io, container.cgroup.clone(), &self.reaper);
        entry.mark_started();
        lock(&container.execs).insert(request.exec_id.clone(), entry.clone());
        if let Err((message, code)) = launched.channel.exec_outcome().await {
            entry.fail(Failure {
                reason: "Error",
                message: message.clone(),
                code,
            });
            return Err(ContainerError::ExecFailed(message));
        }
        if request.timeout_ms > 0 {
            entry.kill_after(Duration::from_millis(request.timeout_ms.into()));
        }
        Ok(entry.pid as u32)
    }

    pub fn signal(
        &self,
        reference: Option<&v1::ProcessRef>,
        signal: u32,
    ) -> Result<(), ContainerError> {
        let signal = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| ContainerError::InvalidArgument(format!("{signal} is not a signal")))?;
        self.process(reference)?.signal(signal)
    }

    pub async fn wait(
        &self,
        reference: Option<&v1::ProcessRef>,
    ) -> Result<v1::ExitStatus, ContainerError> {
        Ok(self.process(reference)?.wait().await)
    }

    pub async fn status(&self, id: &str) -> Result<v1::ContainerStatusResponse, ContainerError> {
        let container = self.get(id)?;
        let exit = container.main.exit_status();
        let state = if exit.is_some() {
            v1::ContainerState::Exited
        } else if container.main.is_started() {
            v1::ContainerState::Running
        } else {
            v1::ContainerState::Created
        };
        Ok(v1::ContainerStatusResponse {
            state: state.into(),
            pid: container.main.pid as u32,
            created_at_ns: unix_nanos(container.created_at),
            exit,
        })
    }

    #[tracing::instrument(skip(self))]
    pub async fn remove(&self, id: &str, force: bool) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        if !force && container.main.is_started() && !container.main.exited() {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} is running; stop it first or force the removal"
            )));
        }
        {
            let mut busy = lock(&self.busy);
            if !busy.insert(id.to_string()) {
                return Err(ContainerError::FailedPrecondition(format!(
                    "container {id:?} is being removed"
                )));
            }
        }
        let _reservation = Reservation {
            containers: self,
            id: id.to_string(),
        };
        // A created container's init waits on this channel: closing it ends the init.
        container.init_channel.lock().await.take();
        if !container.main.exited() {
            let _ = container.cgroup.kill_all();
            let _ = container.main.signal(Signal::SIGKILL);
            if tokio::time::timeout(KILL_GRACE, container.main.wait())
                .await
                .is_err()
            {
                warn!("container {id} did not exit within {KILL_GRACE:?} of SIGKILL");
            }
        }
        for exec in lock(&container.execs).values() {
            let _ = exec.signal(Signal::SIGKILL);
        }
        lock(&container.rootfs).unmount();
        container.cgroup.remove()?;
        lock(&self.table).remove(id);
        info!("removed");
        Ok(())
    }

    pub fn update_resources(&self, id: &str, json: &[u8]) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let resources: LinuxResources = serde_json::from_slice(json).map_err(|e| {
            ContainerError::InvalidArgument(format!("bad linux.resources JSON: {e}"))
        })?;
        container.cgroup.apply(&resources)?;
        Ok(())
    }

    pub fn stats(&self, ids: &[String]) -> Result<Vec<v1::ContainerStats>, ContainerError> {
        let containers: Vec<Arc<Container>> = if ids.is_empty() {
            lock(&self.table).values().cloned().collect()
        } else {
            ids.iter()
                .map(|id| self.get(id))
                .collect::<Result<_, _>>()?
        };
        let mut stats = Vec::with_capacity(containers.len());
        for container in containers {
            let usage = container.cgroup.stats()?;
            stats.push(v1::ContainerStats {
                container_id: container.id.clone(),
                timestamp_ns: unix_nanos(SystemTime::now()),
                cpu_usage_ns: usage.cpu_usage_ns,
                memory_usage_bytes: usage.memory_usage_bytes,
                memory_working_set_bytes: usage.memory_working_set_bytes,
                memory_rss_bytes: usage.memory_rss_bytes,
                pids: usage.pids,
                writable_layer_bytes: lock(&container.rootfs).written_bytes(),
            });
        }
        Ok(stats)
    }

    /// Kills and removes every container, then the pod's PID namespace
    /// and cgroup: the agent is shutting down.
    pub async fn remove_all(&self) {
        let ids: Vec<String> = lock(&self.table).keys().cloned().collect();
        for id in ids {
            if let Err(err) = self.remove(&id, true).await {
                warn!("removing container {id} at shutdown: {err}");
            }
        }
        self.pod_pid.end().await;
        let pod = lock(&self.pod_cgroup).clone();
        // Opening is creating (idempotent): the pod cgroup may not exist yet.
        if let Err(err) = Cgroup::create(&pod).and_then(|cgroup| cgroup.remove()) {
            warn!("removing the pod cgroup {}: {err}", pod.display());
        }
    }
}

fn lists_namespace(spec: &Spec, typ: LinuxNamespaceType) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|list| list.iter().any(|n| n.typ() == typ))
}

fn add_namespace(
    spec: &mut Spec,
    typ: LinuxNamespaceType,
    path: PathBuf,
) -> Result<(), ContainerError> {
    let namespace = LinuxNamespaceBuilder::default()
        .typ(typ)
        .path(path)
        .build()
        .map_err(|e| ContainerError::InvalidArgument(format!("namespace: {e}")))?;
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    namespaces.push(namespace);
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
    Ok(())
}

/// Frees a reserved id when dropped, however the create or remove ended.
struct Reservation<'a> {
    containers: &'a Containers,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(&self.containers.busy).remove(&self.id);
    }
}
