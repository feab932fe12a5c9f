//! One process of a container — its main process or an exec — from launch
//! to exit status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use husk_proto::v1;
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use procfs_core::process::Status;
use procfs_core::FromRead;
use tokio::sync::watch;
use tracing::{debug, info};

use super::cgroup::Cgroup;
use super::stdio::ProcessIo;
use super::ContainerError;
use crate::reaper::{Exit, Reaper};

/// How long a dropped signal waits for the process to install a handler:
/// programs do that as they start, well within this.
const HANDLER_WATCH: Duration = Duration::from_secs(10);
const HANDLER_POLL: Duration = Duration::from_millis(10);

/// What the kernel does with a signal sent to a process now.
#[derive(Debug, PartialEq, Eq)]
enum Disposition {
    /// A handler runs.
    Handled,
    /// The process ignores it (SIG_IGN).
    Ignored,
    /// The default action (terminate, stop…) happens.
    Default,
    /// The default action is dropped: the process is its PID namespace's
    /// init, which gets from outside only the signals it handles.
    DroppedByInit,
}

impl Disposition {
    /// `None` for SIGKILL and SIGSTOP, which are never dropped, and when
    /// the process is gone.
    fn of(pid: i32, signal: Signal) -> Option<Disposition> {
        if matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) {
            return None;
        }
        let status = Status::from_file(format!("/proc/{pid}/status")).ok()?;
        let bit = 1u64 << (signal as i32 - 1);
        let is_init = status.nspid.as_ref().and_then(|ids| ids.last()) == Some(&1);
        Some(if status.sigcgt & bit != 0 {
            Disposition::Handled
        } else if status.sigign & bit != 0 {
            Disposition::Ignored
        } else if is_init {
            Disposition::DroppedByInit
        } else {
            Disposition::Default
        })
    }
}

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

    /// Signals the process unless it has exited (then there is nothing to
    /// do). A signal the kernel drops because the process is its PID
    /// namespace's init without a handler yet is sent again once it has one.
    pub fn signal(self: &Arc<Self>, signal: Signal) -> Result<(), ContainerError> {
        if self.exited() {
            return Ok(());
        }
        // Read before sending: a handler seen now is one the signal reaches.
        let dropped = Disposition::of(self.pid, signal) == Some(Disposition::DroppedByInit);
        match kill(Pid::from_raw(self.pid), signal) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return Ok(()),
            Err(err) => {
                return Err(ContainerError::Io {
                    what: format!("sending {signal} to {}", self.pid),
                    source: err.into(),
                })
            }
        }
        if dropped {
            self.resend_once_handled(signal);
        }
        Ok(())
    }

    /// A stop that comes right after start (critest stops 3 ms after
    /// StartContainer) can reach a program before it installs its handler,
    /// and an init ignores what it does not handle: watch for the handler
    /// for a while and send `signal` again once it is there.
    fn resend_once_handled(self: &Arc<Self>, signal: Signal) {
        let entry = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + HANDLER_WATCH;
            while tokio::time::Instant::now() < deadline && !entry.exited() {
                tokio::time::sleep(HANDLER_POLL).await;
                match Disposition::of(entry.pid, signal) {
                    Some(Disposition::DroppedByInit) => continue,
                    Some(Disposition::Handled) => {
                        debug!(pid = entry.pid, %signal, "handler installed; sending again");
                        let _ = kill(Pid::from_raw(entry.pid), signal);
                    }
                    Some(Disposition::Ignored | Disposition::Default) | None => {}
                }
                return;
            }
        });
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
