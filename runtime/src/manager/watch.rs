//! Watches the ready pods' processes, so that a sandbox that died on its
//! own (a killed agent or VMM) is cleaned up and reported at once rather
//! than when a CRI call next looks at it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tracing::warn;

use super::Manager;
use crate::state::PodState;

/// How often each ready pod's process is checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

impl Manager {
    /// Checks every ready pod each [`WATCH_INTERVAL`], forever; see
    /// [`Manager::live_pod`] for what a dead one gets. A pod whose lock is
    /// held (being started, stopped or removed) waits for the next round.
    pub async fn watch_sandboxes(self: Arc<Self>) {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let pods = match self.state.pods() {
                Ok(pods) => pods,
                Err(e) => {
                    warn!("watching sandboxes: {e}");
                    continue;
                }
            };
            for pod in pods.into_iter().filter(|p| p.state == PodState::Ready) {
                let lock = self.pod_lock(&pod.id);
                let Ok(_busy) = lock.try_lock() else {
                    continue;
                };
                if let Err(e) = self.live_pod(&pod.id).await {
                    warn!(sandbox = %pod.id, "checking the sandbox: {e}");
                }
            }
        }
    }
}
