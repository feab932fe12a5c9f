//! Waits for every child the agent has or inherits, and hands each exit
//! status to whoever watches that pid.
//!
//! As PID 1 in the guest the agent inherits every orphan; on the host it is a
//! child subreaper, so container processes, whose launcher stage exits at
//! once (see `container::launch`), are re-parented to it. Either way one
//! `waitpid(-1)` loop collects them all, so nothing else in the agent may wait
//! for a child itself.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal, as a shell reports it.
    pub code: i32,
    /// The signal that ended the process, if one did.
    pub signal: Option<i32>,
    pub at: SystemTime,
}

/// An exit nobody watched for yet is kept this long: a process can exit
/// between its launch and the agent's watch of its pid. Short, so a
/// recycled pid cannot meet an old status.
const UNCLAIMED_TTL: Duration = Duration::from_secs(30);
/// And at most this many, so orphans' statuses cannot pile up.
const UNCLAIMED_MAX: usize = 1024;

#[derive(Default)]
struct Table {
    watchers: HashMap<i32, oneshot::Sender<Exit>>,
    unclaimed: HashMap<i32, (Exit, Instant)>,
    unclaimed_order: VecDeque<i32>,
}

/// Where pids are watched; cloned freely.
#[derive(Clone)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

impl Reaper {
    /// Reaps exited children now and on every SIGCHLD from here on.
    pub fn spawn() -> io::Result<Reaper> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper {
            table: Arc::default(),
        };
        let task = reaper.clone();
        tokio::spawn(async move {
            loop {
                task.reap_exited();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Resolves with `pid`'s exit: at once if it has been reaped already.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (sender, receiver) = oneshot::channel();
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((exit, _)) = table.unclaimed.remove(&pid) {
            let _ = sender.send(exit);
        } else {
            table.watchers.insert(pid, sender);
        }
        receiver
    }

    /// Signals coalesce: one SIGCHLD may stand for many exits, so wait until
    /// no exited child is left.
    fn reap_exited(&self) {
        loop {
            let (pid, exit) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(WaitStatus::Exited(pid, code)) => (pid, exit(code, None)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    let signal = signal as i32;
                    (pid, exit(128 + signal, Some(signal)))
                }
                Ok(status) => {
                    debug!(?status, "child changed state");
                    continue;
                }
                Err(Errno::EINTR) => continue,
                Err(err) => {
                    warn!("waitpid: {err}");
                    return;
                }
            };
            debug!(pid = pid.as_raw(), ?exit, "reaped");
            self.deliver(pid.as_raw(), exit);
        }
    }

    fn deliver(&self, pid: i32, exit: Exit) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(watcher) = table.watchers.remove(&pid) {
            let _ = watcher.send(exit);
            return;
        }
        let now = Instant::now();
        while let Some(&oldest) = table.unclaimed_order.front() {
            let expired = table
                .unclaimed
                .get(&oldest)
                .is_none_or(|(_, at)| now.duration_since(*at) > UNCLAIMED_TTL);
            if !expired && table.unclaimed.len() < UNCLAIMED_MAX {
                break;
            }
            table.unclaimed_order.pop_front();
            table.unclaimed.remove(&oldest);
        }
        table.unclaimed.insert(pid, (exit, now));
        table.unclaimed_order.push_back(pid);
    }
}

fn exit(code: i32, signal: Option<i32>) -> Exit {
    Exit {
        code,
        signal,
        at: SystemTime::now(),
    }
}

/// On the host, orphans of the agent's children come to the agent rather
/// than to the host's init: that is how it learns a container's exit.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_exit_before_the_watch_is_kept_for_it() {
        let reaper = Reaper {
            table: Arc::default(),
        };
        let early = exit(3, None);
        reaper.deliver(41, early);
        assert_eq!(reaper.watch(41).await.expect("exit"), early);

        let waiting = reaper.watch(42);
        let late = exit(137, Some(9));
        reaper.deliver(42, late);
        assert_eq!(waiting.await.expect("exit"), late);
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let reaper = Reaper {
            table: Arc::default(),
        };
        for pid in 0..(UNCLAIMED_MAX as i32 + 10) {
            reaper.deliver(pid, exit(0, None));
        }
        let table = reaper.table.lock().expect("lock");
        assert_eq!(table.unclaimed.len(), UNCLAIMED_MAX);
        assert!(!table.unclaimed.contains_key(&0));
    }
}
