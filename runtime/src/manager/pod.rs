//! Pod sandboxes: run, stop, remove, status, list.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use husk_proto::v1 as agent;
use k8s_cri::v1 as cri;
use tracing::{info, warn};

use super::{agent_err, labels_match, new_id, now_ns, CriError, Manager, Result};
use crate::network::{self, PodNetwork};
use crate::sandbox::{
    kill_processes_naming, volumes, HostDriver, SandboxDriver, SandboxError, SandboxSpec,
};
use crate::state::{ContainerState, PodRecord, PodState};

/// How long a stopping agent has to exit after Shutdown.
const AGENT_EXIT_GRACE: Duration = Duration::from_secs(10);

/// resolv.conf for the pod: its DNS config, or the host's for a pod without one.
pub(super) fn resolv_conf(dns: Option<&cri::DnsConfig>) -> String {
    match dns {
        Some(d) if !(d.servers.is_empty() && d.searches.is_empty() && d.options.is_empty()) => {
            let mut out = String::new();
            if !d.searches.is_empty() {
                out.push_str(&format!("search {}\n", d.searches.join(" ")));
            }
            for server in &d.servers {
                out.push_str(&format!("nameserver {server}\n"));
            }
            if !d.options.is_empty() {
                out.push_str(&format!("options {}\n", d.options.join(" ")));
            }
            out
        }
        _ => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    }
}

impl Manager {
    pub async fn run_pod_sandbox(
        self: &Arc<Self>,
        config: cri::PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String> {
        let meta = config
            .metadata
            .as_ref()
            .ok_or_else(|| CriError::InvalidArgument("the pod config has no metadata".into()))?;
        if meta.name.is_empty() || meta.namespace.is_empty() {
            return Err(CriError::InvalidArgument(
                "the pod metadata needs a name and a namespace".into(),
            ));
        }
        let host_network = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .is_some_and(|n| n.network() == cri::NamespaceMode::Node);
        let requested = match runtime_handler {
            "" => self.config.default_runtime.as_str(),
            other => other,
        };
        // Checked even when overridden below: an unknown handler is an error.
        let mut driver = self.driver(requested)?;
        if host_network && driver.name() != HostDriver::NAME {
            // The node's network cannot be handed into a VM.
            info!(pod = %meta.name, requested, "a hostNetwork pod runs on the host driver");
            driver = self.driver(HostDriver::NAME)?;
        }
        let id = new_id()?;
        let lock = self.pod_lock(&id);
        let _guard = lock.lock().await;
        let dir = self.sandboxes_dir().join(&id);
        let mut record = PodRecord {
            id: id.clone(),
            config: config.clone(),
            runtime_handler: runtime_handler.to_owned(),
            state: PodState::Starting,
            created_at: now_ns(),
            driver: driver.name().to_owned(),
            dir: dir.clone(),
            agent_socket: dir.join("agent.sock"),
            pid: 0,
            shared_dir: String::new(),
            volumes_dir: String::new(),
            network: None,
            vm_size: None,
            failure: None,
        };
        // Recorded before anything starts, so a crash leaves something to
        // clean up; checked and recorded under one lock, so that two calls
        // with the same metadata cannot both start a pod.
        let reserved = {
            let _records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            match self.state.pods().map(|pods| {
                pods.into_iter()
                    .find(|p| p.config.metadata.as_ref() == Some(meta))
            }) {
                Ok(Some(pod)) => Err(CriError::AlreadyExists(format!(
                    "pod {}/{} (uid {}, attempt {}) already exists as sandbox {}, {}",
                    meta.namespace,
                    meta.name,
                    meta.uid,
                    meta.attempt,
                    pod.id,
                    match pod.state {
                        PodState::Ready => "ready",
                        // A client that gave up on a slow start and retries
                        // lands here while the first call still boots the VM.
                        PodState::Starting => {
                            "still starting: PodSandboxStatus tells when it is ready"
                        }
                        PodState::NotReady => "not ready: stop and remove it first",
                    }
                ))),
                Ok(None) => self.state.put_pod(&record).map_err(CriError::from),
                Err(e) => Err(e.into()),
            }
        };
        if let Err(err) = reserved {
            self.forget_pod_lock(&id);
            return Err(err);
        }
        let result = async {
            if !host_network {
                record.network = Some(self.config.network.setup(&id, &config).await?);
                self.state.put_pod(&record)?;
            }
            let spec = SandboxSpec {
                id: id.clone(),
                dir: dir.clone(),
                network: record.network.clone(),
                linux: config.linux.clone(),
            };
            let mut started = driver.start(&spec).await?;
            record.pid = started.pid;
            record.agent_socket = started.agent_socket.clone();
            record.vm_size = started.vm_size;
            self.state.put_pod(&record)?;
            // A pod with a network of its own (a VM's, or a host agent's
            // namespace) has its own UTS namespace: the pod's hostname goes
            // there. A host-network pod (always the host driver's) keeps the
            // node's name, as kubelet expects.
            let hostname = match host_network {
                true => String::new(),
                false => config.hostname.clone(),
            };
            let setup = started
                .client
                .setup_sandbox(agent::SetupSandboxRequest {
                    sandbox_id: id.clone(),
                    hosts: match &record.network {
                        Some(network) => network::hosts_file(&config.hostname, network),
                        // The node's network, the node's hosts.
                        None => std::fs::read_to_string("/etc/hosts").unwrap_or_default(),
                    },
                    hostname,
                    resolv_conf: resolv_conf(config.dns_config.as_ref()),
                    sysctls: config
                        .linux
                        .as_ref()
                        .map(|l| l.sysctls.clone())
                        .unwrap_or_default(),
                    interfaces: std::mem::take(&mut started.interfaces),
                    routes: std::mem::take(&mut started.routes),
                    volumes_tag: started.volumes_tag.clone().unwrap_or_default(),
                })
                .await
                .map_err(agent_err(format!("setting up sandbox {id}")))?
                .into_inner();
            record.shared_dir = setup.shared_dir;
            record.volumes_dir = setup.volumes_dir;
            Ok::<_, CriError>(started.client)
        }
        .await;
        match result {
            Ok(client) => {
                record.state = PodState::Ready;
                self.state.put_pod(&record)?;
                self.agents
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), client);
                self.watch_sandbox_exit(&record);
                info!(sandbox = %id, pod = %meta.name, namespace = %meta.namespace, "pod ready");
                Ok(id)
            }
            Err(err) => {
                warn!(sandbox = %id, "pod failed to start: {err}");
                self.undo_start(&record).await;
                Err(err)
            }
        }
    }

    /// Undoes a start that did not finish (it failed, or a crash cut it
    /// short): the sandbox's process and what it left are killed, the
    /// network is torn down, and the directory and record go. Failures are
    /// logged: this is already the cleanup.
    pub(super) async fn undo_start(&self, record: &PodRecord) {
        let id = &record.id;
        let drivers = match self.driver(&record.driver) {
            Ok(driver) => {
                if record.pid != 0 {
                    if let Err(e) = driver
                        .stop(id, record.pid, &record.dir, Duration::ZERO)
                        .await
                    {
                        warn!(sandbox = %id, "{e}");
                    }
                }
                vec![driver]
            }
            Err(e) => {
                warn!(sandbox = %id, "{e}");
                vec![]
            }
        };
        self.clear_sandbox(id, &record.dir, record.network.as_ref(), &drivers)
            .await;
        if let Err(e) = self.state.delete_pod(id) {
            warn!(sandbox = %id, "{e}");
        }
        self.forget_pod_lock(id);
    }

    /// Ends what sandbox `id` left outside its record: every process whose
    /// command line names `dir` (also one started before its pid was
    /// recorded), what `drivers` leave behind (host cgroups), its network
    /// (as `network` records it, else whatever namespace exists), and `dir`.
    /// Failures are logged: this is already the cleanup. Returns the pids
    /// it killed.
    pub(super) async fn clear_sandbox(
        &self,
        id: &str,
        dir: &Path,
        network: Option<&PodNetwork>,
        drivers: &[Arc<dyn SandboxDriver>],
    ) -> Vec<u32> {
        let pids = kill_processes_naming(dir);
        for driver in drivers {
            if let Err(e) = driver.kill_leftovers(id, dir).await {
                warn!(sandbox = %id, "{e}");
            }
        }
        let torn_down = match network {
            Some(network) => self.config.network.teardown(id, network).await,
            // Set up, maybe, but not yet recorded.
            None if network::netns::path_for(id).exists() => {
                self.config.network.teardown_unrecorded(id).await
            }
            None => Ok(()),
        };
        if let Err(e) = torn_down {
            warn!(sandbox = %id, "{e}");
        }
        // Never through a volume's bind into the node's files.
        if let Err(e) = volumes::remove_dir(dir) {
            warn!(sandbox = %id, "{e}");
        }
        pids
    }

    /// Stops every container, shuts the agent down and ends its process. Idempotent.
    pub async fn stop_pod_sandbox(self: &Arc<Self>, id: &str) -> Result<()> {
        self.pod(id)?;
        let lock = self.pod_lock(id);
        let _guard = lock.lock().await;
        // As it is now: a start or a failure may have changed it meanwhile.
        let pod = self.pod(id)?;
        let driver = self.driver(&pod.driver)?;
        let alive = driver.alive(pod.pid, &pod.dir);
        let containers: Vec<_> = self
            .state
            .containers()?
            .into_iter()
            .filter(|c| c.pod_id == id)
            .collect();
        if alive {
            for c in &containers {
                if matches!(c.state, ContainerState::Created | ContainerState::Running) {
                    if let Err(e) = self.kill_and_wait(&pod, &c.id, Duration::ZERO).await {
                        warn!(container = %c.id, "stopping with its pod: {e}");
                    }
                }
            }
            match self.agent(&pod).await {
                Ok(mut client) => {
                    if let Err(status) = client.shutdown(agent::ShutdownRequest {}).await {
                        warn!(sandbox = id, "agent shutdown: {}", status.message());
                    }
                }
                Err(e) => warn!(sandbox = id, "agent unreachable while stopping: {e}"),
            }
            driver.stop(id, pod.pid, &pod.dir, AGENT_EXIT_GRACE).await?;
        }
        self.forget_agent(id);
        // Whatever the agent did not end (it died, or did not stop in time)
        // ends now: a stopped pod runs nothing.
        driver.kill_leftovers(id, &pod.dir).await?;
        // Whatever did not report an exit is gone with the agent.
        self.end_containers(id, "the pod sandbox was stopped")?;
        self.update_pod(id, |p| {
            p.state = PodState::NotReady;
            p.pid = 0;
        })?;
        // Nothing runs in the namespace any more: its addresses, host ports
        // and the namespace itself go. Until this succeeds the record keeps
        // the network, and the next Stop or Remove retries.
        if let Some(network) = &pod.network {
            self.config.network.teardown(id, network).await?;
            self.update_pod(id, |p| p.network = None)?;
        }
        info!(sandbox = id, "pod stopped");
        Ok(())
    }

    /// Stops the pod if needed and forgets it with its containers and
    /// directory. Removing an unknown pod succeeds (idempotent).
    pub async fn remove_pod_sandbox(self: &Arc<Self>, id: &str) -> Result<()> {
        let pod = match self.state.pod(id)? {
            Some(p) => p,
            None => return Ok(()),
        };
        self.stop_pod_sandbox(id).await?;
        let lock = self.pod_lock(id);
        let _guard = lock.lock().await;
        for c in self.state.containers()? {
            if c.pod_id == id {
                self.state.delete_container(&c.id)?;
            }
        }
        // Never through a volume's bind into the node's files.
        volumes::remove_dir(&pod.dir).map_err(|source| SandboxError::Volume {
            id: id.to_owned(),
            source,
        })?;
        self.state.delete_pod(id)?;
        self.forget_pod_lock(id);
        info!(sandbox = id, "pod removed");
        Ok(())
    }

    /// Marks the pod's created and running containers exited, killed
    /// (code 137), with `message`.
    fn end_containers(&self, pod_id: &str, message: &str) -> Result<()> {
        for c in self.state.containers()? {
            if c.pod_id == pod_id
                && matches!(c.state, ContainerState::Created | ContainerState::Running)
            {
                let now = now_ns();
                self.update_container(&c.id, |r| {
                    if matches!(r.state, ContainerState::Created | ContainerState::Running) {
                        r.state = ContainerState::Exited;
                        r.finished_at = now;
                        r.exit_code = 137;
                        r.reason = "Error".into();
                        r.message = message.to_owned();
                    }
                })?;
            }
        }
        Ok(())
    }

    /// The pod's record with its state checked against its process. A
    /// ready pod whose process died, and that no call is starting, stopping
    /// or removing, fails ([`fail_pod`](Self::fail_pod)).
    pub async fn live_pod(&self, id: &str) -> Result<PodRecord> {
        let pod = self.pod(id)?;
        if pod.state != PodState::Ready {
            return Ok(pod);
        }
        let driver = self.driver(&pod.driver)?;
        if driver.alive(pod.pid, &pod.dir) {
            return Ok(pod);
        }
        // A pod whose lock is held is being started, stopped or removed: its
        // process may be ending on purpose, and the holder records how.
        let lock = self.pod_lock(id);
        let Ok(_busy) = lock.try_lock() else {
            return Ok(pod);
        };
        let pod = self.pod(id)?;
        if pod.state != PodState::Ready || driver.alive(pod.pid, &pod.dir) {
            return Ok(pod);
        }
        let why = ended_unexpectedly(driver.as_ref(), &pod).await;
        self.fail_pod(&pod, why).await
    }

    /// Checks that a ready pod's agent answers within the agent deadline;
    /// one that does not (after one more try on a fresh connection, unless
    /// the first try hung) fails the pod as [`fail_pod`](Self::fail_pod) says.
    pub(super) async fn probe_pod(&self, id: &str) -> Result<()> {
        let pod = self.pod(id)?;
        if pod.state != PodState::Ready {
            return Ok(());
        }
        let ping = |pod: PodRecord| async move {
            let mut client = self.agent(&pod).await?;
            client
                .ping(agent::PingRequest {})
                .await
                .map_err(agent_err(format!(
                    "pinging the agent of sandbox {}",
                    pod.id
                )))
        };
        let error = match ping(pod.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if e.agent_gave_no_answer() => e,
            Err(_) => {
                // The channel may be stale (a broken connection): once more, afresh.
                self.forget_agent(id);
                match ping(pod.clone()).await {
                    Ok(_) => return Ok(()),
                    Err(e) => e,
                }
            }
        };
        let lock = self.pod_lock(id);
        let _guard = lock.lock().await;
        let now = self.pod(id)?;
        if now.state != PodState::Ready || now.pid != pod.pid {
            // Stopped, or failed, while the probe waited.
            return Ok(());
        }
        // A sandbox that died is why its agent is silent: that is the news.
        let driver = self.driver(&now.driver)?;
        let why = if driver.alive(now.pid, &now.dir) {
            format!("the pod's agent stopped answering ({error})")
        } else {
            ended_unexpectedly(driver.as_ref(), &now).await
        };
        self.fail_pod(&now, why).await.map(|_| ())
    }

    /// A ready pod that failed on its own: it is NOTREADY with `why` as its
    /// failure (first, so that a concurrent look does not fail it again),
    /// then its process (if it still runs) and whatever it left are killed
    /// and its containers are EXITED with `why`. Should a kill fail, the
    /// error says so and StopPodSandbox, which kubelet calls for a NOTREADY
    /// pod, kills again.
    async fn fail_pod(&self, pod: &PodRecord, why: String) -> Result<PodRecord> {
        warn!(sandbox = %pod.id, pid = pod.pid, "{why}");
        let record = self.update_pod(&pod.id, |p| {
            p.state = PodState::NotReady;
            p.failure = Some(why.clone());
        })?;
        let driver = self.driver(&pod.driver)?;
        self.forget_agent(&pod.id);
        driver
            .stop(&pod.id, pod.pid, &pod.dir, Duration::ZERO)
            .await?;
        driver.kill_leftovers(&pod.id, &pod.dir).await?;
        self.end_containers(
            &pod.id,
            &format!("{why}; what was left of the container was killed"),
        )?;
        Ok(record)
    }

    /// The pod's status and, when `verbose`, huskd's own facts about it
    /// (`info["info"]`, JSON as containerd's: the driver, its process, the VM's size).
    pub async fn pod_sandbox_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<(cri::PodSandboxStatus, HashMap<String, String>)> {
        let pod = self.live_pod(id).await?;
        let mut info = HashMap::new();
        if verbose {
            info.insert("info".to_owned(), pod_info(&pod).to_string());
        }
        Ok((pod_status(&pod), info))
    }

    pub async fn list_pod_sandbox(
        &self,
        filter: Option<cri::PodSandboxFilter>,
    ) -> Result<Vec<cri::PodSandbox>> {
        let mut out = Vec::new();
        for pod in self.state.pods()? {
            let pod = self.live_pod(&pod.id).await?;
            if let Some(f) = &filter {
                if !f.id.is_empty() && !pod.id.starts_with(&f.id) {
                    continue;
                }
                if let Some(state) = &f.state {
                    if state.state != cri_pod_state(pod.state) as i32 {
                        continue;
                    }
                }
                if !labels_match(&f.label_selector, &pod.config.labels) {
                    continue;
                }
            }
            out.push(cri::PodSandbox {
                id: pod.id.clone(),
                metadata: pod.config.metadata.clone(),
                state: cri_pod_state(pod.state) as i32,
                created_at: pod.created_at,
                labels: pod.config.labels.clone(),
                annotations: pod.config.annotations.clone(),
                runtime_handler: pod.runtime_handler.clone(),
            });
        }
        Ok(out)
    }
}

pub fn cri_pod_state(state: PodState) -> cri::PodSandboxState {
    match state {
        PodState::Ready => cri::PodSandboxState::SandboxReady,
        PodState::Starting | PodState::NotReady => cri::PodSandboxState::SandboxNotready,
    }
}

fn pod_status(pod: &PodRecord) -> cri::PodSandboxStatus {
    let options = pod
        .config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone());
    cri::PodSandboxStatus {
        id: pod.id.clone(),
        metadata: pod.config.metadata.clone(),
        state: cri_pod_state(pod.state) as i32,
        created_at: pod.created_at,
        network: Some(network_status(pod)),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace { options }),
        }),
        labels: pod.config.labels.clone(),
        annotations: pod.config.annotations.clone(),
        runtime_handler: pod.runtime_handler.clone(),
    }
}

/// What huskd knows of a pod beyond the CRI status.
/// Why a pod whose sandbox process is gone failed: what is known of its
/// end.
async fn ended_unexpectedly(driver: &dyn SandboxDriver, pod: &PodRecord) -> String {
    let detail = driver
        .exit_detail(&pod.dir)
        .await
        .map(|said| format!(" ({said})"))
        .unwrap_or_default();
    format!(
        "the pod sandbox's {} process (pid {}) ended unexpectedly{detail}",
        pod.driver, pod.pid
    )
}

fn pod_info(pod: &PodRecord) -> serde_json::Value {
    serde_json::json!({
        "driver": pod.driver,
        "pid": pod.pid,
        "sandboxDir": pod.dir,
        "failure": pod.failure,
        "vm": pod.vm_size.map(|size| serde_json::json!({
            "vcpus": size.vcpus,
            "memoryMiB": size.mem_mib,
            "kvm": if size.pvm { "pvm" } else { "standard" },
        })),
    })
}

/// The pod's IPs: the first as its primary, the others additional.
fn network_status(pod: &PodRecord) -> cri::PodSandboxNetworkStatus {
    let mut ips = pod
        .network
        .as_ref()
        .map(|n| n.bare_ips())
        .unwrap_or_default()
        .into_iter();
    cri::PodSandboxNetworkStatus {
        ip: ips.next().unwrap_or_default(),
        additional_ips: ips.map(|ip| cri::PodIp { ip }).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Mutex;

    use husk_proto::client::Agent;

    use super::*;
    use crate::config::{CniSettings, Config, Settings};
    use crate::image::ImageStore;
    use crate::sandbox::{BoxFuture, SandboxDriver, SandboxError, SandboxSpec, Started};
    use crate::state::State;

    /// A driver that records its start calls and refuses them.
    struct Fake {
        name: &'static str,
        starts: Mutex<u32>,
    }

    impl SandboxDriver for Fake {
        fn name(&self) -> &'static str {
            self.name
        }
        fn start<'a>(
            &'a self,
            spec: &'a SandboxSpec,
        ) -> BoxFuture<'a, Result<Started, SandboxError>> {
            *self.starts.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            Box::pin(async move {
                Err(SandboxError::Unavailable {
                    id: spec.id.clone(),
                    driver: self.name.into(),
                    detail: "fake".into(),
                })
            })
        }
        fn connect<'a>(
            &'a self,
            id: &'a str,
            _agent_socket: &'a Path,
        ) -> BoxFuture<'a, Result<Agent, SandboxError>> {
            Box::pin(async move {
                Err(SandboxError::Unavailable {
                    id: id.into(),
                    driver: self.name.into(),
                    detail: "fake".into(),
                })
            })
        }
        fn stop<'a>(
            &'a self,
            _id: &'a str,
            _pid: u32,
            _dir: &'a Path,
            _grace: Duration,
        ) -> BoxFuture<'a, Result<(), SandboxError>> {
            Box::pin(async { Ok(()) })
        }
        fn alive(&self, _pid: u32, _dir: &Path) -> bool {
            false
        }
        fn kill_leftovers<'a>(
            &'a self,
            _id: &'a str,
            _dir: &'a Path,
        ) -> BoxFuture<'a, Result<(), SandboxError>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn pod(name: &str, host_network: bool) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: name.into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            linux: host_network.then(|| cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn handlers_choose_drivers_and_host_network_means_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A CNI plugin that only answers: this test is about drivers.
        let cni = dir.path().join("cni");
        std::fs::create_dir_all(&cni).expect("cni dir");
        std::fs::write(
            cni.join("10-fake.conflist"),
            r#"{"cniVersion":"1.0.0","name":"fake","plugins":[{"type":"answer"}]}"#,
        )
        .expect("conflist");
        let plugin = cni.join("answer");
        std::fs::write(
            &plugin,
            "#!/bin/sh\necho '{\"cniVersion\":\"1.0.0\",\"ips\":[{\"address\":\"10.0.0.2/24\"}]}'\n",
        )
        .expect("plugin");
        std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        std::os::unix::fs::symlink(&plugin, cni.join("loopback")).expect("loopback");
        let config = Config::from_settings(Settings {
            root: Some(dir.path().join("root")),
            state: Some(dir.path().join("state")),
            cni: CniSettings {
                conf_dir: Some(cni.clone()),
                bin_dir: Some(cni),
            },
            ..Settings::default()
        })
        .expect("config");
        std::fs::create_dir_all(&config.root).expect("root");
        let images = ImageStore::open(config.root.join("images")).expect("images");
        let state = State::open(&config.root).expect("state");
        let host = Arc::new(Fake {
            name: "host",
            starts: Mutex::new(0),
        });
        let microvm = Arc::new(Fake {
            name: "microvm",
            starts: Mutex::new(0),
        });
        let drivers: [Arc<dyn SandboxDriver>; 2] = [host.clone(), microvm.clone()];
        let manager = Manager::new(config, images, state, drivers);
        let starts = |f: &Fake| *f.starts.lock().unwrap_or_else(|e| e.into_inner());
        for (name, handler, host_network, want_host, want_vm) in [
            ("a", "", false, 0, 1),
            ("b", "microvm", false, 0, 2),
            ("c", "host", false, 1, 2),
            ("d", "", true, 2, 2),
            ("e", "microvm", true, 3, 2),
        ] {
            let err = manager
                .run_pod_sandbox(pod(name, host_network), handler)
                .await
                .expect_err("the fake drivers refuse");
            assert!(err.to_string().contains("fake"), "{err}");
            assert_eq!(
                (starts(&host), starts(&microvm)),
                (want_host, want_vm),
                "{name}"
            );
        }
        let unknown = manager
            .run_pod_sandbox(pod("f", false), "kata")
            .await
            .expect_err("unknown handler");
        assert!(matches!(unknown, CriError::InvalidArgument(_)), "{unknown}");
        assert!(manager.state.pods().expect("pods").is_empty());
    }
}
