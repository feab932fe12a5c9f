//! The part of starting a sandbox both drivers share: the spawned process
//! (husk-agent or husk-vmm) is reaped in the background, and huskd tries to
//! reach its agent until it answers, the process exits, or time is up. A
//! start that fails leaves nothing running.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{SandboxError, Started};

/// What one attempt to reach a starting sandbox's agent came to.
pub enum Attempt {
    Answered(Box<Started>),
    /// Not yet; why, for the error if time runs out.
    NotYet(String),
    /// It answered, but can never serve huskd.
    Refused(String),
}

/// A spawned sandbox process, reaped in the background whenever it ends
/// (its liveness is read from /proc later).
pub struct Spawned {
    pub pid: u32,
    exited: oneshot::Receiver<String>,
}

impl Spawned {
    /// `status_file`, if given, gets the exit status once the process ends
    /// (`exit status: 3`, `signal: 31 (SIGSYS)`): what a later look at the
    /// pod can tell its failure by.
    pub fn reap(
        mut child: Child,
        sandbox: &str,
        program: &'static str,
        status_file: Option<PathBuf>,
    ) -> Self {
        let pid = child.id().unwrap_or(0);
        info!(sandbox, pid, "{program} started");
        let (exited_tx, exited) = oneshot::channel();
        let sandbox = sandbox.to_owned();
        tokio::spawn(async move {
            let status = child.wait().await;
            info!(sandbox, ?status, "{program} exited");
            let status = status.map(|s| s.to_string()).unwrap_or_default();
            if let Some(path) = status_file {
                if let Err(e) = std::fs::write(&path, &status) {
                    warn!(
                        sandbox,
                        "recording {program}'s exit in {}: {e}",
                        path.display()
                    );
                }
            }
            let _ = exited_tx.send(status);
        });
        Self { pid, exited }
    }

    /// Calls `attempt` every `poll` until the agent answers, each attempt
    /// bounded by the time left. On an exit,
    /// a refusal or the deadline, the process is killed and the error's
    /// detail is `describe(why)`, where `why` says which.
    pub async fn wait_for_agent<F, Fut>(
        mut self,
        id: &str,
        timeout: Duration,
        poll: Duration,
        mut attempt: F,
        describe: impl Fn(String) -> String,
    ) -> Result<Started, SandboxError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Attempt>,
    {
        let deadline = Instant::now() + timeout;
        let why = loop {
            if let Ok(status) = self.exited.try_recv() {
                break format!("it exited ({status}) before the agent answered");
            }
            // An attempt that hangs (a guest that stopped mid-answer) must
            // not carry the wait past its deadline.
            let left = deadline.saturating_duration_since(Instant::now());
            let last_error = match tokio::time::timeout(left, attempt()).await {
                Ok(Attempt::Answered(started)) => return Ok(*started),
                Ok(Attempt::NotYet(why)) => why,
                Ok(Attempt::Refused(why)) => break why,
                Err(_) => format!("the last attempt got no answer within the {left:?} left"),
            };
            if Instant::now() >= deadline {
                break format!("no answer in time (last attempt: {last_error})");
            }
            tokio::time::sleep(poll).await;
        };
        if self.pid != 0 {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
        Err(SandboxError::NotReady {
            id: id.to_owned(),
            timeout,
            detail: describe(why),
        })
    }
}
