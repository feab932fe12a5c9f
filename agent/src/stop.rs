//! The agent's stop request: raised by the Shutdown RPC or, on the host, by
//! SIGTERM/SIGINT; awaited by the server.

use std::io;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::info;

/// Raises the stop request.
#[derive(Clone)]
pub struct StopHandle(Arc<watch::Sender<bool>>);

/// Resolves once the stop request is raised.
#[derive(Clone)]
pub struct StopSignal(watch::Receiver<bool>);

pub fn channel() -> (StopHandle, StopSignal) {
    let (sender, receiver) = watch::channel(false);
    (StopHandle(Arc::new(sender)), StopSignal(receiver))
}

impl StopHandle {
    pub fn request(&self) {
        self.0.send_replace(true);
    }
}

impl StopSignal {
    pub async fn requested(mut self) {
        // An error means every StopHandle is gone: nothing can ask any more,
        // and waiting on would be forever, so treat it as a request.
        let _ = self.0.wait_for(|requested| *requested).await;
    }
}

/// On the host, SIGTERM and SIGINT stop the agent as Shutdown does, so that
/// it still removes its socket. (PID 1 in the guest gets no such signals.)
pub fn on_termination_signals(stop: StopHandle) -> io::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => info!("SIGINT: shutting down"),
        }
        stop.request();
    });
    Ok(())
}
