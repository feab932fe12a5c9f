//! At huskd's start, before it serves: what a crash (huskd killed in the
//! middle of a call) left behind goes, and what its state knows stays.
//! - a pod recorded as starting never became ready: its start is undone;
//! - a container recorded as being created is removed from its pod's agent;
//! - a sandbox directory huskd has no record of goes with its processes,
//!   cgroups and network namespace (CNI DEL).
//!
//! Each cleanup is logged as one line. Ready and stopped pods are kept; the
//! watcher looks at the ready ones as usual.

use std::collections::HashSet;

use tracing::{info, instrument, warn};

use super::{Manager, Result};
use crate::state::{ContainerState, PodState};

impl Manager {
    #[instrument(skip_all)]
    pub async fn reconcile(&self) -> Result<()> {
        for container in self.state.containers()? {
            if container.state != ContainerState::Creating {
                continue;
            }
            let pod = self.state.pod(&container.pod_id)?;
            if let Some(pod) = pod.filter(|p| p.state == PodState::Ready) {
                if let Err(e) = self.remove_in_agent(&pod, &container.id).await {
                    warn!(container = %container.id, "removing a half-created container: {e}");
                }
                self.state.delete_container(&container.id)?;
                self.release_unused_image(&pod, &container.image_id).await;
            } else {
                self.state.delete_container(&container.id)?;
            }
            info!(container = %container.id, sandbox = %container.pod_id,
                "huskd stopped while creating this container: removed it");
        }

        let pods = self.state.pods()?;
        for pod in pods.iter().filter(|p| p.state == PodState::Starting) {
            self.undo_start(pod).await;
            info!(sandbox = %pod.id, pid = pod.pid,
                "huskd stopped while starting this pod: undid the start");
        }
        let known: HashSet<&str> = pods
            .iter()
            .filter(|p| p.state != PodState::Starting)
            .map(|p| p.id.as_str())
            .collect();

        // Namespaces and cgroups are named by pod id only, and another huskd
        // (another --state) may own some: only those of a sandbox directory
        // under this huskd's state are judged here.
        for entry in std::fs::read_dir(self.sandboxes_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(id) = entry.file_name().into_string() else {
                continue;
            };
            if known.contains(id.as_str()) {
                continue;
            }
            let drivers: Vec<_> = self.drivers().cloned().collect();
            let pids = self.clear_sandbox(&id, &entry.path(), None, &drivers).await;
            info!(sandbox = %id, ?pids,
                "a sandbox huskd has no record of: killed its processes, removed its \
                 cgroups, network and directory");
        }
        Ok(())
    }
}
