//! One process of a container — its main process or an exec — from launch
//! to exit status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use husk_proto::v1;
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;
use tracing::{debug, info};

use super::cgroup::Cgroup;
use super::stdio::ProcessIo;
use super::ContainerError;
use crate::reaper::{Exit, Reaper};

/// An exit the agent knows better than the process's own status does.
pub struct Failure {
    pub reason: &'static str,
    pub message: String,
    pub code: i32,
}

pub struct ProcessEntry {
    pub pid: i32,
    pub io: ProcessIo,
    started_at: Mutex<Option<SystemTime>>,
    failure: Mutex<Option<Failure>>,
    timed_out: AtomicBool,
    exit: watch::Receiver<Option<v1::ExitStatus>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub fn unix_nanos(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl ProcessEntry {
    /// Tracks `pid` until the reaper reports its exit; `cgroup` tells
    /// whether the kernel's OOM killer was the cause.
    pub fn spawn(pid: i32, io: ProcessIo, cgroup: Cgroup, reaper: &Reaper) -> Arc<ProcessEntry> {
        let (sender, receiver) = watch::channel(None);
        let entry = Arc::new(ProcessEntry {
            pid,
            io,
            started_at: Mutex::new(None),
            failure: Mutex::new(None),
            timed_out: AtomicBool::new(false),
            exit: receiver,
        });
        let exited = reaper.watch(pid);
        let oom_kills_before = cgroup.oom_kills().unwrap_or(0);
        let watched = entry.clone();
        tokio::spawn(async move {
            let Ok(exit) = exited.await else {
                return; // The reaper is gone: so is the agent.
            };
            // As containerd: an OOM kill of any of the container's processes
            // while this one ran.
            let oom = cgroup.oom_kills().unwrap_or(0) > oom_kills_before;
            let status = watched.exit_status_of(exit, oom);
            info!(pid, code = status.exit_code, reason = %status.reason, "process exited");
            sender.send_replace(Some(status));
        });
        entry
    }

    fn exit_status_of(&self, exit: Exit, oom: bool) -> v1::ExitStatus {
        let (code, reason, message) = match lock(&self.failure).take() {
            Some(failure) => (failure.code, failure.reason.to_string(), failure.message),
            None if oom => (exit.code, "OOMKilled".into(), String::new()),
            None if self.timed_out.load(Ordering::SeqCst) => (
                exit.code,
                "Timeout".into(),
                "killed when its timeout passed".into(),
            ),
            None if exit.code == 0 => (0, "Completed".into(), String::new()),
            None => (exit.code, "Error".into(), String::new()),
        };
        v1::ExitStatus {
            exit_code: code,
            signal: exit.signal.map_or(0, |s| s as u32),
            reason,
            message,
            oom_killed: oom,
            timed_out: self.timed_out.load(Ordering::SeqCst),
            started_at_ns: lock(&self.started_at).map_or(0, unix_nanos),
            finished_at_ns: unix_nanos(exit.at),
        }
    }

    pub fn mark_started(&self) {
        lock(&self.started_at).get_or_insert_with(SystemTime::now);
    }

    pub fn is_started(&self) -> bool {
        lock(&self.started_at).is_some()
    }

    /// Records why the process could not run; its exit status will say so.
    pub fn fail(&self, failure: Failure) {
        *lock(&self.failure) = Some(failure);
    }

    pub fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    pub fn exit_status(&self) -> Option<v1::ExitStatus> {
        self.exit.borrow().clone()
    }

    pub fn exited_longer_than(&self, age: Duration) -> bool {
        self.exit.borrow().as_ref().is_some_and(|status| {
            let finished = UNIX_EPOCH + Duration::from_nanos(status.finished_at_ns.max(0) as u64);
            SystemTime::now()
                .duration_since(finished)
                .is_ok_and(|d| d > age)
        })
    }

    pub async fn wait(&self) -> v1::ExitStatus {
        let mut exit = self.exit.clone();
        loop {
            if let Some(status) = exit.borrow_and_update().clone() {
                return status;
            }
            if exit.changed().await.is_err() {
                // The watcher task ended without a status: only when the
                // reaper did, that is, at the agent's end.
                return v1::ExitStatus {
                    exit_code: 255,
                    reason: "Unknown".into(),
                    message: "the agent stopped watching this process".into(),
                    ..Default::default()
                };
            }
        }
    }

    /// Signals the process unless it has exited (then there is nothing to do).
    pub fn signal(&self, signal: Signal) -> Result<(), ContainerError> {
        if self.exited() {
            return Ok(());
        }
        match kill(Pid::from_raw(self.pid), signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(err) => Err(ContainerError::Io {
                what: format!("sending {signal} to {}", self.pid),
                source: err.into(),
            }),
        }
    }

    /// SIGKILLs the process if it is still running after `timeout`.
    pub fn kill_after(self: &Arc<Self>, timeout: Duration) {
        let entry = self.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(timeout, entry.wait()).await.is_ok() {
                return;
            }
            debug!(pid = entry.pid, ?timeout, "timed out; killing");
            entry.timed_out.store(true, Ordering::SeqCst);
            let _ = entry.signal(Signal::SIGKILL);
        });
    }
}
