//! PID 1 inherits every orphaned process in the guest and must wait for each
//! one, or they stay zombies forever.

use std::io;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, warn};

/// Reaps exited children now and on every SIGCHLD from here on.
pub fn spawn() -> io::Result<()> {
    let mut sigchld = signal(SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            reap_exited();
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    });
    Ok(())
}

/// Signals coalesce: one SIGCHLD may stand for many exits, so wait until no
/// exited child is left.
fn reap_exited() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(status) => debug!(?status, "reaped"),
            Err(Errno::EINTR) => continue,
            Err(err) => {
                warn!("waitpid: {err}");
                return;
            }
        }
    }
}
