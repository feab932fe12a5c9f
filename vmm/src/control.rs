//! How the VMM is told to stop, from a vCPU thread or the control API, and
//! what its exit status then is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vstate::vcpu::VcpuStop;

#[derive(Debug)]
pub enum StopReason {
    Vcpu(VcpuStop),
    ApiShutdown,
    /// SIGTERM or SIGINT: how a supervisor (huskd) or a person stops a VM.
    Signal(Signal),
    /// A device can no longer serve the guest (its backend went away).
    DeviceFailed(String),
}

/// The outcome of a VM run, as the process reports it.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest shut itself down (reset without a panic) or the API asked.
    Shutdown,
    /// The guest kernel panicked, triple-faulted, or KVM could not go on.
    GuestDied(String),
    /// A device's backend failed, which the guest cannot survive.
    DeviceFailed(String),
}

impl Outcome {
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Shutdown => 0,
            Outcome::GuestDied(_) => 2,
            Outcome::DeviceFailed(_) => 3,
        }
    }
}

pub struct VmmControl {
    reason: Mutex<Option<StopReason>>,
    evt: EventFd,
    /// Set by the console sink when the guest printed a kernel panic.
    pub guest_panicked: Arc<AtomicBool>,
}

impl VmmControl {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
            guest_panicked: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Records the first reason to stop and wakes the event loop.
    pub fn stop(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot wake the event loop to stop: {e}");
        }
    }

    pub fn stopping(&self) -> bool {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The outcome, once a stop was requested.
    pub fn outcome(&self) -> Option<Outcome> {
        let slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let panicked = self.guest_panicked.load(Ordering::SeqCst);
        slot.as_ref().map(|reason| match reason {
            StopReason::ApiShutdown | StopReason::Signal(_) => Outcome::Shutdown,
            StopReason::Vcpu(VcpuStop::Reset) if panicked => {
                Outcome::GuestDied("the guest kernel panicked".into())
            }
            StopReason::Vcpu(VcpuStop::Reset) => Outcome::Shutdown,
            StopReason::Vcpu(VcpuStop::TripleFault(state)) => {
                Outcome::GuestDied(format!("the guest triple-faulted on {state}"))
            }
            StopReason::Vcpu(VcpuStop::Fatal(why)) => Outcome::GuestDied(why.clone()),
            StopReason::DeviceFailed(why) => Outcome::DeviceFailed(why.clone()),
        })
    }
}

/// Keeps the stop eventfd on the event loop so a stop interrupts its wait.
pub struct StopWatcher(pub Arc<VmmControl>);

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Draining fails only when already drained; the loop checks `stopping`.
        let _ = self.0.evt.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.evt, EventSet::IN)) {
            tracing::error!("cannot watch the stop eventfd: {e}");
        }
    }
}

/// Turns SIGTERM and SIGINT into an orderly stop on the event loop, so the
/// VMM removes its sockets instead of dying with them in place.
pub struct SignalWatcher {
    fd: SignalFd,
    control: Arc<VmmControl>,
}

impl SignalWatcher {
    /// Blocks the stop signals in the calling thread, and so in every thread
    /// it spawns afterwards: call it before the vCPU threads exist.
    pub fn new(control: Arc<VmmControl>) -> nix::Result<Self> {
        // Blocked and never read: husk-vmm outlives its supervisor. It runs
        // in a process group of its own, which huskd's exit orphans, and the
        // kernel then sends SIGHUP to the group if a member is stopped.
        let mut hangup = SigSet::empty();
        hangup.add(Signal::SIGHUP);
        hangup.thread_block()?;
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGTERM);
        mask.add(Signal::SIGINT);
        mask.thread_block()?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Self { fd, control })
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Ok(Some(info)) = self.fd.read_signal() {
            if let Ok(signal) = Signal::try_from(info.ssi_signo as i32) {
                tracing::info!(%signal, "stopping the VM");
                self.control.stop(StopReason::Signal(signal));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::error!("cannot watch for stop signals: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_after_panic_is_death_and_first_reason_wins() {
        let c = VmmControl::new().unwrap();
        c.guest_panicked.store(true, Ordering::SeqCst);
        c.stop(StopReason::Vcpu(VcpuStop::Reset));
        c.stop(StopReason::ApiShutdown);
        assert_eq!(c.outcome().unwrap().exit_code(), 2);
    }

    #[test]
    fn plain_reset_is_shutdown() {
        let c = VmmControl::new().unwrap();
        assert!(c.outcome().is_none());
        c.stop(StopReason::Vcpu(VcpuStop::Reset));
        assert_eq!(c.outcome(), Some(Outcome::Shutdown));
    }
}
