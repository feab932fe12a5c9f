//! Watches the ready pods, so that a sandbox that died on its own (a killed
//! agent or VMM) or hung (a guest that stopped answering) is cleaned up and
//! reported at once rather than when a CRI call next looks at it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tracing::warn;

use super::Manager;
use crate::state::PodState;

/// How often each ready pod's process is checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How often each ready pod's agent must answer a Ping, within the agent
/// deadline (`agent_timeout_secs`).
const PROBE_INTERVAL: Duration = Duration::from_secs(10);

impl Manager {
    /// Checks every ready pod's process each [`WATCH_INTERVAL`], forever;
    /// see [`Manager::live_pod`] for what a dead one gets.
    /// Every [`PROBE_INTERVAL`] the agents are pinged too, all at once in
    /// the background so that a hung one holds up nothing.
    pub async fn watch_sandboxes(self: Arc<Self>) {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The pods being probed: one probe per pod at a time, so that a
        // hung agent is not asked again while the first Ping still waits.
        let mut probes = tokio::task::JoinSet::new();
        let mut in_flight = HashSet::new();
        loop {
            let pinging = tokio::select! {
                _ = tick.tick() => false,
                _ = probe.tick() => true,
            };
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
                if pinging {
                    if in_flight.insert(pod.id.clone()) {
                        let manager = self.clone();
                        probes.spawn(async move {
                            if let Err(e) = manager.probe_pod(&pod.id).await {
                                warn!(sandbox = %pod.id, "probing the sandbox: {e}");
                            }
                            pod.id
                        });
                    }
                    continue;
                }
                if let Err(e) = self.live_pod(&pod.id).await {
                    warn!(sandbox = %pod.id, "checking the sandbox: {e}");
                }
            }
        }
    }
}
