//! Watches the ready pods, so that a sandbox that died on its own (a killed
//! agent or VMM) or hung (a guest that stopped answering) is cleaned up and
//! reported at once rather than when a CRI call next looks at it.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::time::MissedTickBehavior;
use tracing::warn;

use super::{Manager, Result};
use crate::sandbox::exited;
use crate::state::{PodRecord, PodState};

impl Manager {
    /// Watches the exit of every ready pod's process (see
    /// [`watch_sandbox_exit`](Self::watch_sandbox_exit)), and every
    /// `health_check_interval` (the config's) pings every ready pod's
    /// agent, which must answer within the agent deadline, all at once in the background so that a
    /// hung one holds up nothing. Runs forever.
    pub async fn watch_sandboxes(self: Arc<Self>) {
        match self.state.pods() {
            Ok(pods) => {
                for pod in pods.iter().filter(|p| p.state == PodState::Ready) {
                    self.watch_sandbox_exit(pod);
                }
            }
            Err(e) => warn!("watching sandboxes: {e}"),
        }
        let mut probe = tokio::time::interval(self.config.health_check_interval);
        probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The pods being probed: one probe per pod at a time, so that a
        // hung agent is not asked again while the first Ping still waits.
        let mut probes = tokio::task::JoinSet::new();
        let mut in_flight = HashSet::new();
        loop {
            probe.tick().await;
            while let Some(done) = probes.try_join_next() {
                if let Ok(id) = done {
                    in_flight.remove(&id);
                }
            }
            let pods = match self.state.pods() {
                Ok(pods) => pods,
                Err(e) => {
                    warn!("watching sandboxes: {e}");
                    continue;
                }
            };
            for pod in pods.into_iter().filter(|p| p.state == PodState::Ready) {
                if in_flight.insert(pod.id.clone()) {
                    let manager = self.clone();
                    probes.spawn(async move {
                        if let Err(e) = manager.probe_pod(&pod.id).await {
                            warn!(sandbox = %pod.id, "probing the sandbox: {e}");
                        }
                        pod.id
                    });
                }
            }
        }
    }

    /// Once the ready pod's process exits, the pod is looked at at once
    /// ([`Manager::live_pod`] fails it unless a call that holds its lock
    /// ended it on purpose; then this looks again once the lock is free).
    pub(super) fn watch_sandbox_exit(self: &Arc<Self>, pod: &PodRecord) {
        let manager = self.clone();
        let (id, pid, dir) = (pod.id.clone(), pod.pid, pod.dir.clone());
        tokio::spawn(async move {
            if let Err(e) = exited(pid, &dir).await {
                warn!(sandbox = %id, pid, "cannot watch the sandbox's process: {e}");
                return;
            }
            if let Err(e) = manager.after_exit(&id, pid).await {
                warn!(sandbox = %id, "checking the sandbox: {e}");
            }
        });
    }

    async fn after_exit(&self, id: &str, pid: u32) -> Result<()> {
        loop {
            let Some(pod) = self.state.pod(id)? else {
                return Ok(());
            };
            if pod.pid != pid {
                return Ok(());
            }
            if self.live_pod(id).await?.state != PodState::Ready {
                return Ok(());
            }
            // Its lock is held: the holder may be stopping it. Look again
            // once it is free.
            let lock = self.pod_lock(id);
            drop(lock.lock().await);
        }
    }
}
