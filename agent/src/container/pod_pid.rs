//! A host pod's PID namespace. In a guest the pod's containers that share
//! one (PID namespace POD) share the guest's, whose init is the agent. A
//! host agent lives in the node's, so it keeps one for its pod: a holder
//! process is its PID 1 (as a pause container is elsewhere), made when the
//! first container asks, ended with the pod. When the holder dies the
//! kernel kills the namespace's processes; the next container asking gets
//! a new one.

use std::path::PathBuf;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::Process;
use tokio::sync::{oneshot, Mutex};
use tracing::{info, warn};

use super::cgroup::Cgroup;
use super::init::{InitConfig, Target};
use super::launch::launch;
use super::{stdio, ContainerError};
use crate::reaper::{Exit, Reaper};

/// The holder's cgroup, beside the containers' below the pod's: a
/// container id is 64 hex digits, never this.
const HOLDER_CGROUP: &str = "pod-pid-namespace";

struct Holder {
    pid: i32,
    exited: oneshot::Receiver<Exit>,
    cgroup: Cgroup,
}

#[derive(Default)]
pub struct PodPidNamespace {
    holder: Mutex<Option<Holder>>,
}

impl PodPidNamespace {
    /// The namespace's file (`/proc/<holder>/ns/pid`), starting a holder
    /// in `pod_cgroup` if there is none alive.
    pub async fn path(
        &self,
        pod_cgroup: PathBuf,
        reaper: &Reaper,
    ) -> Result<PathBuf, ContainerError> {
        let mut slot = self.holder.lock().await;
        if let Some(holder) = slot.as_mut() {
            if matches!(
                holder.exited.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            ) {
                return Ok(ns_path(holder.pid));
            }
            warn!(
                pid = holder.pid,
                "the pod's PID namespace holder died; making another"
            );
        }
        let cgroup = Cgroup::create(&pod_cgroup.join(HOLDER_CGROUP))?;
        let config = InitConfig {
            cgroup_procs: cgroup.procs_files(),
            process: Process::default(),
            seccomp: None,
            bind_sources_from: None,
            target: Target::PidNamespaceHolder,
        };
        let launched =
            launch(&config, stdio::detached())
                .await
                .map_err(|source| ContainerError::Launch {
                    id: "the pod's PID namespace".into(),
                    source,
                })?;
        let pid = launched.pid;
        info!(pid, "the pod's PID namespace is up");
        *slot = Some(Holder {
            pid,
            exited: reaper.watch(pid),
            cgroup,
        });
        Ok(ns_path(pid))
    }

    /// Ends the namespace (and whatever still runs in it).
    pub async fn end(&self) {
        let Some(holder) = self.holder.lock().await.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(holder.pid), Signal::SIGKILL);
        let _ = holder.exited.await;
        if let Err(err) = holder.cgroup.remove() {
            warn!("removing the PID namespace holder's cgroup: {err}");
        }
    }
}

fn ns_path(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/pid"))
}
