//! Virtio devices and the virtio-mmio transport they sit behind.
//!
//! A device is also an event-manager subscriber: its queue-notify eventfds
//! (registered with KVM as ioeventfds by the transport) and any host fds it
//! owns are served on the VMM's event loop, not on the vCPU thread.

pub mod block;
#[cfg(test)]
mod fake_driver;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use event_manager::MutEventSubscriber;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::irq::IrqLine;

/// Feature bit every modern (virtio 1.x) device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

/// Bits of the transport's InterruptStatus register.
pub const INTERRUPT_USED_RING: u32 = 0x1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 0x2;

/// How a device raises its interrupt: sets a status bit the driver reads
/// back through the transport, then pulses the IRQ line.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    line: Arc<IrqLine>,
}

impl Interrupt {
    pub fn new(line: IrqLine) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            line: Arc::new(line),
        }
    }

    pub fn signal_used_queue(&self) {
        self.signal(INTERRUPT_USED_RING);
    }

    pub fn signal_config_change(&self) {
        self.signal(INTERRUPT_CONFIG_CHANGE);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            tracing::warn!(
                gsi = self.line.gsi(),
                "cannot raise the device interrupt: {e}"
            );
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn line(&self) -> &IrqLine {
        &self.line
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActiveQueues {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Interrupt,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver configured {got} queues, the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("the driver's queue {0} is not valid in guest memory")]
    InvalidQueue(usize),
    #[error("the device's backend: {0}")]
    Backend(String),
}

/// One virtio device, transport-independent.
pub trait VirtioDevice: MutEventSubscriber + Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues; its length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    fn features(&self) -> u64;
    /// What the driver accepted (the transport has checked it against the
    /// offer). The devices here behave the same whatever was negotiated.
    fn ack_features(&mut self, _features: u64) {}
    /// Reads device config space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Device config writes; the devices here have read-only config.
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(
            offset,
            device = self.device_type(),
            "ignored a write to read-only device config"
        );
    }
    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError>;
    /// Back to the state before activation (driver reset).
    fn reset(&mut self);
}

/// Copies the `offset..` window of a config struct into `data`, zero-filling
/// what lies past its end; shared by every device's `read_config`.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < config.len() {
        let n = data.len().min(config.len() - start);
        data[..n].copy_from_slice(&config[start..start + n]);
    }
}

/// Validates `active` against a device's queue count; used by `activate`.
pub fn check_queues(active: &ActiveQueues, want: usize) -> Result<(), ActivateError> {
    use virtio_queue::QueueT;
    if active.queues.len() != want {
        return Err(ActivateError::QueueCount {
            got: active.queues.len(),
            want,
        });
    }
    match active.queues.iter().position(|q| !q.is_valid(&active.mem)) {
        Some(i) => Err(ActivateError::InvalidQueue(i)),
        None => Ok(()),
    }
}
