//! virtio-fs as a vhost-user frontend. The guest's FUSE requests are served
//! by an external backend (virtiofsd) that maps guest memory itself: husk-vmm
//! negotiates features, hands over the memory table and each queue's
//! addresses and eventfds, and turns the backend's "used" notifications into
//! the device interrupt. Queue kicks go from KVM's ioeventfds straight to the
//! backend, never through this process.
//!
//! A pod's volumes are only there while the backend is: when it closes its
//! socket the VM stops (a guest left with a dead filesystem would hang every
//! process touching it), and the VMM reports which backend went away.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    check_queues, read_config_bytes, ActivateError, ActiveQueues, Interrupt, VirtioDevice,
};
use crate::config::{FsConfig, MAX_FS_TAG_LEN};
use crate::control::{StopReason, VmmControl};

pub const TYPE_FS: u32 = 26;

/// One high-priority queue (FUSE interrupts and forgets) and one request
/// queue: a pod's volume traffic does not need more.
const NUM_QUEUES: usize = 2;
const REQUEST_QUEUES: u32 = NUM_QUEUES as u32 - 1;
const QUEUE_SIZE: u16 = 1024;
const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE; NUM_QUEUES];

/// The ring features the guest may use; the backend implements them.
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const GUEST_FEATURES: u64 =
    super::VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// How long the backend has to answer one vhost-user request.
const BACKEND_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Event-loop data of the backend socket; the call eventfds use their
/// queue index.
const SOCKET_EVENT: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs {tag}: cannot connect to the vhost-user backend at {socket}: {source}")]
    Connect {
        tag: String,
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("virtio-fs {tag}: the vhost-user backend refused {what}: {source}")]
    Backend {
        tag: String,
        what: &'static str,
        source: vhost::Error,
    },
    #[error("virtio-fs {tag}: the backend does not offer {0}", tag = .1)]
    MissingFeature(&'static str, String),
    #[error("virtio-fs {tag}: cannot create {what}: {source}")]
    EventFd {
        tag: String,
        what: &'static str,
        source: std::io::Error,
    },
}

pub struct Fs {
    tag: String,
    socket_path: PathBuf,
    /// A second handle on the backend's socket, watched for its hang-up (the
    /// frontend owns the first and only exchanges request/reply on it).
    socket: UnixStream,
    frontend: Frontend,
    /// Virtio features the backend offers, less the vhost-user-only bit.
    backend_features: u64,
    acked_features: u64,
    /// One per queue: the driver's notifications, registered with KVM and
    /// handed to the backend.
    kicks: Vec<EventFd>,
    /// One per queue: the backend's "used buffers" signal.
    calls: Vec<EventFd>,
    interrupt: Option<Interrupt>,
    control: Arc<VmmControl>,
}

impl Fs {
    /// Connects to the backend listening on `config.socket` and negotiates
    /// what can be before the guest runs.
    pub fn new(config: &FsConfig, control: Arc<VmmControl>) -> Result<Fs, FsError> {
        let tag = config.tag.clone();
        let socket = UnixStream::connect(&config.socket).map_err(|source| FsError::Connect {
            tag: tag.clone(),
            socket: config.socket.clone(),
            source,
        })?;
        // A backend that stops answering must not hold a vCPU (activation
        // runs on one) or the build forever.
        let watched = socket
            .set_read_timeout(Some(BACKEND_REPLY_TIMEOUT))
            .and_then(|()| socket.set_write_timeout(Some(BACKEND_REPLY_TIMEOUT)))
            .and_then(|()| socket.try_clone())
            .map_err(|source| FsError::Connect {
                tag: tag.clone(),
                socket: config.socket.clone(),
                source,
            })?;
        let backend = |what| {
            let tag = tag.clone();
            move |source| FsError::Backend { tag, what, source }
        };
        let mut frontend = Frontend::from_stream(socket, NUM_QUEUES as u64);
        frontend.set_owner().map_err(backend("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(backend("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & protocol_bit == 0 {
            // Without it the rings could not be enabled and disabled explicitly.
            return Err(FsError::MissingFeature(
                "VHOST_USER_F_PROTOCOL_FEATURES",
                tag,
            ));
        }
        if offered & super::VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::MissingFeature("VIRTIO_F_VERSION_1", tag));
        }
        frontend
            .set_features(protocol_bit)
            .map_err(backend("SET_FEATURES"))?;
        frontend
            .get_protocol_features()
            .map_err(backend("GET_PROTOCOL_FEATURES"))?;
        // The tag and queue count are husk-vmm's own config space: no
        // protocol extension is needed.
        frontend
            .set_protocol_features(VhostUserProtocolFeatures::empty())
            .map_err(backend("SET_PROTOCOL_FEATURES"))?;
        let eventfds = |what| {
            (0..NUM_QUEUES)
                .map(|_| EventFd::new(EFD_NONBLOCK))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| FsError::EventFd {
                    tag: tag.clone(),
                    what,
                    source,
                })
        };
        let kicks = eventfds("the queue eventfds")?;
        let calls = eventfds("the backend's call eventfds")?;
        tracing::info!(%tag, socket = %config.socket.display(), "virtio-fs backend connected");
        Ok(Fs {
            tag,
            socket_path: config.socket.clone(),
            socket: watched,
            frontend,
            backend_features: offered & GUEST_FEATURES,
            acked_features: 0,
            kicks,
            calls,
            interrupt: None,
            control,
        })
    }

    /// The config space: the tag, NUL-padded, then the request queue count.
    fn config_space(&self) -> [u8; MAX_FS_TAG_LEN + 4] {
        let mut config = [0u8; MAX_FS_TAG_LEN + 4];
        let tag = self.tag.as_bytes();
        config[..tag.len()].copy_from_slice(tag);
        config[MAX_FS_TAG_LEN..].copy_from_slice(&REQUEST_QUEUES.to_le_bytes());
        config
    }

    /// Hands the active queues to the backend, in the order the vhost-user
    /// spec gives: features, memory table, then each ring.
    fn start_backend(&mut self, active: &ActiveQueues) -> Result<(), vhost::Error> {
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(self.acked_features | protocol_bit)?;
        let regions = active
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend.set_mem_table(&regions)?;
        for (index, queue) in active.queues.iter().enumerate() {
            let host = |gpa: u64| -> Result<u64, vhost::Error> {
                active
                    .mem
                    .get_host_address(GuestAddress(gpa))
                    .map(|ptr| ptr as u64)
                    .map_err(|_| vhost::Error::InvalidGuestMemory)
            };
            let rings = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host(queue.desc_table())?,
                used_ring_addr: host(queue.used_ring())?,
                avail_ring_addr: host(queue.avail_ring())?,
                log_addr: None,
            };
            self.frontend.set_vring_num(index, queue.size())?;
            self.frontend.set_vring_addr(index, &rings)?;
            self.frontend.set_vring_base(index, 0)?;
            self.frontend.set_vring_call(index, &self.calls[index])?;
            self.frontend.set_vring_kick(index, &self.kicks[index])?;
            self.frontend.set_vring_enable(index, true)?;
        }
        Ok(())
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.kicks
    }

    fn features(&self) -> u64 {
        self.backend_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
        check_queues(&active, NUM_QUEUES)?;
        if let Err(e) = self.start_backend(&active) {
            tracing::error!(tag = %self.tag, "virtio-fs: the backend refused the queues: {e}");
            return Err(ActivateError::Backend(e.to_string()));
        }
        self.interrupt = Some(active.interrupt);
        tracing::info!(tag = %self.tag, "virtio-fs active");
        Ok(())
    }

    fn reset(&mut self) {
        // Drivers reset a device before they set it up: nothing to stop.
        if self.interrupt.is_none() {
            return;
        }
        // The backend stops serving each ring when asked for its position.
        for index in 0..NUM_QUEUES {
            if let Err(e) = self.frontend.set_vring_enable(index, false) {
                tracing::warn!(tag = %self.tag, index, "virtio-fs: disabling a ring: {e}");
            }
            if let Err(e) = self.frontend.get_vring_base(index) {
                tracing::warn!(tag = %self.tag, index, "virtio-fs: stopping a ring: {e}");
            }
        }
        self.interrupt = None;
        self.acked_features = 0;
    }
}

impl MutEventSubscriber for Fs {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == SOCKET_EVENT {
            let why = format!(
                "virtio-fs {}: the vhost-user backend closed {}",
                self.tag,
                self.socket_path.display()
            );
            tracing::error!("{why}; stopping the VM");
            self.control.stop(StopReason::DeviceFailed(why));
            return;
        }
        let Some(call) = self.calls.get(events.data() as usize) else {
            return;
        };
        // Draining the counter only fails if it was already empty.
        let _ = call.read();
        if let Some(interrupt) = &self.interrupt {
            interrupt.signal_used_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Only the hang-up: the replies the frontend waits for must not
        // wake this loop.
        let hang_up = EventSet::READ_HANG_UP | EventSet::HANG_UP;
        let socket = Events::with_data_raw(self.socket.as_raw_fd(), SOCKET_EVENT, hang_up);
        if let Err(e) = ops.add(socket) {
            tracing::error!(tag = %self.tag, "virtio-fs: cannot watch the backend socket: {e}");
        }
        for (index, call) in self.calls.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(call, index as u32, EventSet::IN)) {
                tracing::error!(tag = %self.tag, "virtio-fs: cannot watch a call eventfd: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    fn config(socket: &std::path::Path) -> FsConfig {
        FsConfig {
            tag: "husk-volumes".into(),
            socket: socket.to_path_buf(),
        }
    }

    fn control() -> Arc<VmmControl> {
        Arc::new(VmmControl::new().expect("control"))
    }

    #[test]
    fn no_backend_is_a_connect_error_naming_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("absent.sock");
        let Err(err) = Fs::new(&config(&socket), control()) else {
            panic!("connected to nothing");
        };
        assert!(matches!(err, FsError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("absent.sock"), "{err}");
    }

    #[test]
    fn a_backend_that_hangs_up_is_refused_with_what_it_was_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("fs.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let backend = std::thread::spawn(move || {
            // Accepts, then goes away without a word.
            drop(listener.accept().expect("accept"));
        });
        let Err(err) = Fs::new(&config(&socket), control()) else {
            panic!("negotiated with a backend that hung up");
        };
        backend.join().expect("backend");
        assert!(matches!(err, FsError::Backend { .. }), "{err}");
        assert!(err.to_string().contains("husk-volumes"), "{err}");
    }
}
