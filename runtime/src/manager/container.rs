//! Containers: create, start, stop, remove, status, list (exec is `exec.rs`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use husk_proto::client::Agent;
use husk_proto::v1 as agent;
use k8s_cri::v1 as cri;
use tracing::{info, warn};

use super::spec::{self, SpecInput};
use super::{agent_err, labels_match, new_id, now_ns, CriError, Manager, Result};
use crate::sandbox::{ImageFiles, RootfsPlan};
use crate::state::{ContainerRecord, ContainerState, PodRecord, PodState};

/// How long a SIGKILLed process has to be reported gone.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The agent's name for a container's main process (`exec` empty) or an exec.
pub fn process(container: &str, exec: &str) -> Option<agent::ProcessRef> {
    Some(agent::ProcessRef {
        container_id: container.to_owned(),
        exec_id: exec.to_owned(),
    })
}

/// The agent's exit status laid onto a record.
pub(super) fn apply_exit(record: &mut ContainerRecord, exit: &agent::ExitStatus) {
    record.state = ContainerState::Exited;
    record.exit_code = exit.exit_code;
    record.reason = if exit.reason.is_empty() {
        if exit.exit_code == 0 {
            "Completed"
        } else {
            "Error"
        }
        .to_owned()
    } else {
        exit.reason.clone()
    };
    record.message = exit.message.clone();
    // The agent saw the process start and end: its times are the precise
    // ones, when its clock agrees with ours. A guest's clock may lag the
    // host's by seconds; then huskd's own observations stand.
    let now = now_ns();
    let agent_clock_agrees = exit.started_at_ns >= record.created_at
        && exit.finished_at_ns >= exit.started_at_ns
        && exit.finished_at_ns <= now;
    if agent_clock_agrees {
        record.started_at = exit.started_at_ns;
        record.finished_at = exit.finished_at_ns;
    } else {
        if record.started_at == 0 {
            record.started_at = record.created_at;
        }
        record.finished_at = now.max(record.started_at);
    }
}

/// How long CreateContainer is retried while the guest has not yet seen a
/// freshly attached image disk (its config-change interrupt is handled
/// asynchronously; on PVM hosts that takes a while).
const DEVICE_WAIT: Duration = Duration::from_secs(60);
/// CreateContainer, retried while the agent cannot mount a block device
/// that the guest has not seen arrive yet.
async fn create_in_agent(
    client: &mut Agent,
    request: agent::CreateContainerRequest,
    plan: &RootfsPlan,
) -> std::result::Result<(), tonic::Status> {
    let RootfsPlan::BlockDevice(device) = plan else {
        return client.create_container(request).await.map(|_| ());
    };
    let started = std::time::Instant::now();
    let not_there_yet = format!("cannot mount {device} ");
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match client.create_container(request.clone()).await {
            Ok(_) => {
                if attempts > 1 {
                    info!(
                        %device,
                        attempts,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "the guest saw the image disk"
                    );
                }
                return Ok(());
            }
            Err(status)
                if status.code() == tonic::Code::Internal
                    && status.message().contains(&not_there_yet)
                    && started.elapsed() < DEVICE_WAIT =>
            {
                tracing::debug!(%device, "not mountable yet: {}", status.message());
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(status) => return Err(status),
        }
    }
}

impl Manager {
    /// The running pod's record, for calls that need its agent.
    pub(super) async fn ready_pod(&self, id: &str) -> Result<PodRecord> {
        let pod = self.live_pod(id).await?;
        if pod.state != PodState::Ready {
            return Err(CriError::FailedPrecondition(format!(
                "pod sandbox {id} is not ready"
            )));
        }
        Ok(pod)
    }

    pub async fn create_container(
        self: &Arc<Self>,
        pod_id: &str,
        config: cri::ContainerConfig,
    ) -> Result<String> {
        let meta = config.metadata.as_ref().ok_or_else(|| {
            CriError::InvalidArgument("the container config has no metadata".into())
        })?;
        if meta.name.is_empty() {
            return Err(CriError::InvalidArgument(
                "the container metadata needs a name".into(),
            ));
        }
        let pod = self.ready_pod(pod_id).await?;
        let lock = self.pod_lock(pod_id);
        let _guard = lock.lock().await;
        for c in self.state.containers()? {
            if c.pod_id == pod_id && c.config.metadata.as_ref() == Some(meta) {
                return Err(CriError::AlreadyExists(format!(
                    "container {} (attempt {}) already exists in pod {pod_id} as {}",
                    meta.name, meta.attempt, c.id
                )));
            }
        }
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.as_str())
            .unwrap_or_default();
        if image_name.is_empty() {
            return Err(CriError::InvalidArgument(
                "the container config names no image".into(),
            ));
        }
        let image = self.images.status(image_name)?.ok_or_else(|| {
            CriError::NotFound(format!("image {image_name:?} not found: pull it first"))
        })?;
        let rootfs = self.images.rootfs_dir(&image.id);
        let driver = self.driver(&pod.driver)?;
        let id = new_id()?;
        let image_id = image.id.to_string();
        let log_path = (!config.log_path.is_empty() && !pod.config.log_directory.is_empty())
            .then(|| Path::new(&pod.config.log_directory).join(&config.log_path));
        let mut record = ContainerRecord {
            id: id.clone(),
            pod_id: pod_id.to_owned(),
            image_id: image_id.clone(),
            image_ref: image
                .repo_digests
                .first()
                .cloned()
                .unwrap_or_else(|| image.id.to_string()),
            log_path,
            state: ContainerState::Creating,
            created_at: now_ns(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            user: None,
            config: config.clone(),
        };
        // Recorded before the agent is asked, so that a crash leaves
        // something for the next start to clean up.
        self.state.put_container(&record)?;
        let created = async {
            let mut client = self.agent(&pod).await?;
            // Where the agent finds each host path (in a VM: through the
            // pod's virtio-fs).
            let mut spec_config = config.clone();
            if !config.mounts.is_empty() {
                spec_config.mounts = driver
                    .share_mounts(&pod.id, &pod.dir, &pod.volumes_dir, &id, &config.mounts)
                    .await?;
            }
            let shared_resolv = Path::new(&pod.shared_dir).join("resolv.conf");
            let resolv_conf = (!pod.shared_dir.is_empty()
                && if driver.shares_host_fs() {
                    shared_resolv.exists()
                } else {
                    // SetupSandbox wrote it into the guest whenever it had content.
                    !super::pod::resolv_conf(pod.config.dns_config.as_ref()).is_empty()
                })
            .then_some(shared_resolv);
            // SetupSandbox always writes the pod's hosts file.
            let shared_hosts = Path::new(&pod.shared_dir).join("hosts");
            let hosts = (!pod.shared_dir.is_empty()
                && (!driver.shares_host_fs() || shared_hosts.exists()))
            .then_some(shared_hosts);
            let (spec, user) = spec::build(&SpecInput {
                config: &spec_config,
                pod: &pod.config,
                image: &image,
                rootfs: &rootfs,
                resolv_conf: resolv_conf.as_deref(),
                hosts: hosts.as_deref(),
                in_vm: driver.runs_in_vm(),
            })?;
            let spec_json = serde_json::to_vec(&spec).map_err(|e| CriError::Io {
                what: "encoding the OCI spec".into(),
                source: e.into(),
            })?;
            let erofs = self.images.erofs_path(&image.id);
            let plan = driver
                .attach_image(
                    &pod.id,
                    &pod.dir,
                    ImageFiles {
                        id: &image_id,
                        rootfs_dir: &rootfs,
                        erofs: &erofs,
                    },
                )
                .await?;
            let request = agent::CreateContainerRequest {
                container_id: id.clone(),
                oci_spec_json: spec_json,
                rootfs: Some(agent::RootfsSource {
                    source: Some(match &plan {
                        RootfsPlan::Directory(dir) => {
                            agent::rootfs_source::Source::Directory(dir.display().to_string())
                        }
                        RootfsPlan::BlockDevice(device) => {
                            agent::rootfs_source::Source::BlockDevice(device.clone())
                        }
                    }),
                    writable_layer_bytes: 0,
                }),
                stdin: config.stdin,
            };
            create_in_agent(&mut client, request, &plan)
                .await
                .map_err(agent_err(format!(
                    "creating container {} in pod {pod_id}",
                    meta.name
                )))?;
            Ok(user)
        }
        .await;
        match created {
            Ok(user) => record.user = Some(user),
            Err(err) => {
                self.state.delete_container(&id)?;
                self.release_unused_image(&pod, &image_id).await;
                self.unshare_mounts(&pod, &id).await;
                return Err(err);
            }
        }
        record.state = ContainerState::Created;
        self.state.put_container(&record)?;
        info!(container = %id, sandbox = pod_id, "container created");
        Ok(id)
    }

    pub async fn start_container(self: &Arc<Self>, id: &str) -> Result<()> {
        let record = self.container(id)?;
        if record.state != ContainerState::Created {
            return Err(CriError::FailedPrecondition(format!(
                "container {id} is {:?}, not created",
                record.state
            )));
        }
        let pod = self.ready_pod(&record.pod_id).await?;
        let mut client = self.agent(&pod).await?;
        // Readers first, so no output is lost and the pipes never fill.
        self.attach_output(&mut client, &record).await?;
        let starting = now_ns();
        let started = client
            .start_container(agent::StartContainerRequest {
                container_id: id.to_owned(),
            })
            .await;
        if let Err(status) = started {
            self.forget_attach_point(id);
            let message = status.message().to_owned();
            self.update_container(id, |r| {
                r.state = ContainerState::Exited;
                r.exit_code = 128;
                r.reason = "StartError".into();
                r.message = message;
                r.finished_at = now_ns();
            })?;
            return Err(agent_err(format!("starting container {id}"))(status));
        }
        self.update_container(id, |r| {
            // A status call may have seen it exit already.
            if r.state == ContainerState::Created {
                r.state = ContainerState::Running;
                r.started_at = starting;
            }
        })?;
        self.watch_exit(client, id.to_owned());
        info!(container = %id, "container started");
        Ok(())
    }

    /// Sends SIGKILL (after `grace` with SIGTERM first, when not zero) and
    /// records the exit. The pod lock need not be held.
    pub(super) async fn kill_and_wait(
        &self,
        pod: &PodRecord,
        id: &str,
        grace: Duration,
    ) -> Result<()> {
        let client = self.agent(pod).await?;
        let wait = |mut client: Agent| async move {
            client
                .wait_process(agent::WaitProcessRequest {
                    process: process(id, ""),
                })
                .await
                .map(|r| r.into_inner().status)
        };
        let signal = |mut client: Agent, signal: i32| async move {
            match client
                .signal_process(agent::SignalProcessRequest {
                    process: process(id, ""),
                    signal: signal as u32,
                })
                .await
            {
                Ok(_) => Ok(()),
                // Gone already: the wait below reports how it ended.
                Err(s)
                    if s.code() == tonic::Code::NotFound
                        || s.code() == tonic::Code::FailedPrecondition =>
                {
                    Ok(())
                }
                Err(s) => Err(agent_err(format!("signalling container {id}"))(s)),
            }
        };
        let mut exit = None;
        if !grace.is_zero() {
            signal(client.clone(), libc::SIGTERM).await?;
            if let Ok(waited) = tokio::time::timeout(grace, wait(client.clone())).await {
                exit = waited.map_err(agent_err(format!("waiting for container {id}")))?;
            }
        }
        if exit.is_none() {
            signal(client.clone(), libc::SIGKILL).await?;
            exit = tokio::time::timeout(KILL_WAIT, wait(client.clone()))
                .await
                .map_err(|_| {
                    CriError::DeadlineExceeded(format!(
                        "container {id} did not die within {KILL_WAIT:?} of SIGKILL"
                    ))
                })?
                .map_err(agent_err(format!("waiting for container {id}")))?;
        }
        if let Some(exit) = exit {
            self.update_container(id, |r| {
                if r.state != ContainerState::Exited {
                    apply_exit(r, &exit);
                }
            })?;
        }
        Ok(())
    }

    pub async fn stop_container(&self, id: &str, timeout_s: i64) -> Result<()> {
        let record = self.container(id)?;
        if record.state == ContainerState::Exited {
            return Ok(());
        }
        let pod = self.live_pod(&record.pod_id).await?;
        if pod.state != PodState::Ready {
            // Its agent is gone, and the container with it.
            self.update_container(id, |r| {
                r.state = ContainerState::Exited;
                r.exit_code = 137;
                r.reason = "Error".into();
                r.message = "the pod sandbox is not running".into();
                r.finished_at = now_ns();
            })?;
            return Ok(());
        }
        let grace = Duration::from_secs(timeout_s.max(0) as u64);
        self.kill_and_wait(&pod, id, grace).await?;
        info!(container = id, "container stopped");
        Ok(())
    }

    /// Forgets a container, killing it first if it runs. Unknown ids succeed.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let Some(record) = self.state.container(id)? else {
            return Ok(());
        };
        let pod = self.live_pod(&record.pod_id).await?;
        if pod.state == PodState::Ready {
            self.remove_in_agent(&pod, id).await?;
        }
        let lock = self.pod_lock(&record.pod_id);
        let _guard = lock.lock().await;
        {
            // Under the records lock: an exit watcher's update (a read,
            // then a write) cannot bring the record back.
            let _records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            self.state.delete_container(id)?;
        }
        self.forget_attach_point(id);
        if pod.state == PodState::Ready {
            self.release_unused_image(&pod, &record.image_id).await;
        }
        self.unshare_mounts(&pod, id).await;
        info!(container = id, "container removed");
        Ok(())
    }

    /// Has the ready pod's agent forget container `id`, killing it if it
    /// runs; a container the agent does not know is fine.
    pub(super) async fn remove_in_agent(&self, pod: &PodRecord, id: &str) -> Result<()> {
        let mut client = self.agent(pod).await?;
        match client
            .remove_container(agent::RemoveContainerRequest {
                container_id: id.to_owned(),
                force: true,
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(agent_err(format!("removing container {id}"))(s)),
        }
    }

    /// The ready pod's disk of `image_id` goes once no container of the pod
    /// uses it. Called under the pod's lock; a failure is logged.
    pub(super) async fn release_unused_image(&self, pod: &PodRecord, image_id: &str) {
        let in_use = match self.state.containers() {
            Ok(all) => all
                .iter()
                .any(|c| c.pod_id == pod.id && c.image_id == image_id),
            Err(e) => {
                warn!(sandbox = %pod.id, "keeping image {image_id}'s disk: {e}");
                return;
            }
        };
        if in_use {
            return;
        }
        let released = match self.driver(&pod.driver) {
            Ok(driver) => driver
                .release_image(&pod.id, &pod.dir, image_id)
                .await
                .map_err(CriError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = released {
            warn!(sandbox = %pod.id, "releasing image {image_id}: {e}");
        }
    }

    /// The container's host paths are no longer shared into the pod. A
    /// failure is logged: the pod's stop detaches whatever is left.
    async fn unshare_mounts(&self, pod: &PodRecord, container: &str) {
        let unshared = match self.driver(&pod.driver) {
            Ok(driver) => driver
                .unshare_mounts(&pod.id, &pod.dir, container)
                .await
                .map_err(CriError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = unshared {
            warn!(sandbox = %pod.id, container, "unsharing the container's mounts: {e}");
        }
    }

    /// The record, brought up to date from the agent if it may have changed.
    pub(super) async fn refreshed(&self, record: ContainerRecord) -> Result<ContainerRecord> {
        if !matches!(
            record.state,
            ContainerState::Created | ContainerState::Running
        ) {
            return Ok(record);
        }
        let pod = self.live_pod(&record.pod_id).await?;
        if pod.state != PodState::Ready {
            return Ok(record);
        }
        let mut client = match self.agent(&pod).await {
            Ok(c) => c,
            Err(e) => {
                warn!(container = %record.id, "cannot reach the agent for status: {e}");
                return Ok(record);
            }
        };
        let status = match client
            .container_status(agent::ContainerStatusRequest {
                container_id: record.id.clone(),
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(s) => {
                warn!(container = %record.id, "agent status: {}", s.message());
                return Ok(record);
            }
        };
        match (agent::ContainerState::try_from(status.state), status.exit) {
            (Ok(agent::ContainerState::Exited), Some(exit)) => {
                self.update_container(&record.id, |r| {
                    if r.state != ContainerState::Exited {
                        apply_exit(r, &exit);
                    }
                })
            }
            _ => Ok(record),
        }
    }

    pub async fn container_status(&self, id: &str) -> Result<cri::ContainerStatus> {
        let record = self.refreshed(self.container(id)?).await?;
        Ok(container_status(&record))
    }

    pub async fn list_containers(
        &self,
        filter: Option<cri::ContainerFilter>,
    ) -> Result<Vec<cri::Container>> {
        let mut out = Vec::new();
        for record in self.state.containers()? {
            if record.state == ContainerState::Creating {
                continue;
            }
            if let Some(f) = &filter {
                if !f.id.is_empty() && !record.id.starts_with(&f.id) {
                    continue;
                }
                if !f.pod_sandbox_id.is_empty() && !record.pod_id.starts_with(&f.pod_sandbox_id) {
                    continue;
                }
                if !labels_match(&f.label_selector, &record.config.labels) {
                    continue;
                }
            }
            // The records are current without asking the agents (kubelet
            // relists every second): a started container's exit is recorded
            // by its watcher as it happens, and a pod's failure ends its
            // containers. ContainerStatus still asks.
            if let Some(state) = filter.as_ref().and_then(|f| f.state.as_ref()) {
                if state.state != cri_state(record.state) as i32 {
                    continue;
                }
            }
            out.push(cri::Container {
                id: record.id.clone(),
                pod_sandbox_id: record.pod_id.clone(),
                metadata: record.config.metadata.clone(),
                image: record.config.image.clone(),
                image_ref: record.image_ref.clone(),
                state: cri_state(record.state) as i32,
                created_at: record.created_at,
                labels: record.config.labels.clone(),
                annotations: record.config.annotations.clone(),
                image_id: record.image_id.clone(),
            });
        }
        Ok(out)
    }

    /// The running container's record and pod, for calls that need its
    /// process.
    pub async fn running_container(&self, id: &str) -> Result<(ContainerRecord, PodRecord)> {
        let record = self.refreshed(self.container(id)?).await?;
        if record.state != ContainerState::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let pod = self.ready_pod(&record.pod_id).await?;
        Ok((record, pod))
    }
}

pub fn cri_state(state: ContainerState) -> cri::ContainerState {
    match state {
        // Never shown: ListContainers skips it and lookups do not find it.
        ContainerState::Creating => cri::ContainerState::ContainerUnknown,
        ContainerState::Created => cri::ContainerState::ContainerCreated,
        ContainerState::Running => cri::ContainerState::ContainerRunning,
        ContainerState::Exited => cri::ContainerState::ContainerExited,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown,
    }
}

fn container_status(r: &ContainerRecord) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: r.id.clone(),
        metadata: r.config.metadata.clone(),
        state: cri_state(r.state) as i32,
        created_at: r.created_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
        exit_code: r.exit_code,
        image: r.config.image.clone(),
        image_ref: r.image_ref.clone(),
        reason: r.reason.clone(),
        message: r.message.clone(),
        labels: r.config.labels.clone(),
        annotations: r.config.annotations.clone(),
        mounts: r.config.mounts.clone(),
        log_path: r
            .log_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        image_id: r.image_id.clone(),
        user: r.user.as_ref().map(|u| cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: u.uid.into(),
                gid: u.gid.into(),
                supplemental_groups: u.groups.iter().map(|&g| g.into()).collect(),
            }),
        }),
        resources: r
            .config
            .linux
            .as_ref()
            .and_then(|l| l.resources.clone())
            .map(|linux| cri::ContainerResources {
                linux: Some(linux),
                windows: None,
            }),
    }
}
