//! virtio-net backed by a host tap device: one rx and one tx queue, the MAC
//! and MTU in config space, no offloads. With VERSION_1 every frame in either
//! queue is preceded by the 12-byte `virtio_net_hdr_v1`; with nothing
//! negotiated it carries no information, so it is dropped on transmit and
//! written zeroed (num_buffers = 1) on receive.
//!
//! Both directions run on the event loop. Transmit drains the tx queue into
//! the tap when the guest kicks it. Receive moves frames from the tap into the
//! guest's rx buffers while both have some; a buffer is taken before a frame
//! is read, so a frame never waits in the VMM. When the guest has no buffers
//! the tap is left unwatched (it is level-triggered) until the guest kicks the
//! rx queue with new ones; the frames wait in the tap's own queue meanwhile.
//!
//! Nothing the guest puts in a queue can stop the device: a chain that is too
//! short, not in guest memory, or writable where it should be readable (and
//! the reverse) costs that one frame, counted and logged at a bounded rate.

mod tap;
#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use self::tap::TapError;
use super::{check_queues, read_config_bytes, ActivateError, ActiveQueues, VirtioDevice};
use crate::config::NetConfig;

const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE; 2];
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;

const VIRTIO_NET_F_MTU: u64 = 1 << 3;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;

/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
pub const NET_HDR_LEN: usize = 12;
/// What precedes every received frame: no offload state, one buffer.
const RX_HEADER: [u8; NET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
/// Destination, source, EtherType: anything shorter is not a frame.
const ETH_HLEN: usize = 14;
/// The largest frame a tap can hand over (MTU 65535 plus an Ethernet header
/// with one VLAN tag), and the largest the guest may send.
const MAX_FRAME: usize = 65535 + ETH_HLEN + 4;

/// Frames moved from the tap per wakeup before other events get a turn; the
/// tap is level-triggered, so what is left wakes the loop again.
const RX_BUDGET: usize = QUEUE_SIZE as usize;

/// At most one warning per interval about dropped frames.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create the queue eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// Counts dropped frames and says so at most once per `DROP_LOG_INTERVAL`
/// (each drop is a debug line): a guest or a flood on the tap cannot fill the log.
struct DropLog {
    total: u64,
    unreported: u64,
    last_warning: Option<Instant>,
}

impl DropLog {
    fn new() -> Self {
        Self {
            total: 0,
            unreported: 0,
            last_warning: None,
        }
    }

    fn dropped(&mut self, tap: &str, why: fmt::Arguments) {
        self.total += 1;
        self.unreported += 1;
        tracing::debug!(tap, "virtio-net: dropped a frame: {why}");
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|at| now.duration_since(at) >= DROP_LOG_INTERVAL)
        {
            tracing::warn!(
                tap,
                dropped = self.unreported,
                total = self.total,
                "virtio-net: dropping frames, the latest because {why}"
            );
            self.last_warning = Some(now);
            self.unreported = 0;
        }
    }
}

/// Why a receive pass stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxStop {
    /// The tap has no more frames.
    TapEmpty,
    /// The guest has no rx buffers (or the device is not active).
    NoBuffers,
    /// The per-wakeup budget is spent; frames may remain.
    Budget,
    /// Reading the tap failed for good (it was deleted or detached).
    TapFailed,
}

/// Whether the event loop watches the tap for frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TapWatch {
    Readable,
    /// Unwatched until the guest offers rx buffers.
    Paused,
    /// The tap failed; it stays unwatched and the guest's rx is dead.
    Gone,
}

/// Where frames come from and go to, and what moving them needs.
struct Backend {
    /// The tap's name, for logs; a label for other backends.
    name: String,
    /// One frame per read or write: a tap without packet information or
    /// virtio-net headers (or, in tests, a datagram socket).
    file: File,
    /// One frame, either direction.
    frame: Vec<u8>,
    drops: DropLog,
}

pub struct Net {
    backend: Backend,
    config: [u8; 12],
    queue_evts: [EventFd; 2],
    active: Option<ActiveQueues>,
    watch: TapWatch,
}

impl Net {
    /// A device on the existing tap `config.tap`.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let tap = tap::open(&config.tap)?;
        tracing::info!(tap = %config.tap, mtu = config.mtu, "virtio-net attached to its tap");
        Self::with_backend(&config.tap, tap, config.mac, config.mtu)
    }

    /// A device whose frames come from and go to `backend`, a non-blocking
    /// fd where each read and write is one Ethernet frame.
    pub fn with_backend(
        name: &str,
        backend: File,
        mac: [u8; 6],
        mtu: u16,
    ) -> Result<Self, NetError> {
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        // struct virtio_net_config: mac, status (no VIRTIO_NET_F_STATUS: the
        // link is up), max_virtqueue_pairs (no MQ: one), mtu.
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&mac);
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&mtu.to_le_bytes());
        Ok(Self {
            backend: Backend {
                name: name.into(),
                file: backend,
                frame: vec![0; MAX_FRAME],
                drops: DropLog::new(),
            },
            config,
            queue_evts: [evt()?, evt()?],
            active: None,
            watch: TapWatch::Readable,
        })
    }

    /// Frames dropped so far, either direction.
    pub fn dropped_frames(&self) -> u64 {
        self.backend.drops.total
    }

    /// Runs `f` on queue `index` if the device is active, then interrupts
    /// the guest if `f` used buffers (its second result) and the driver
    /// wants to know.
    fn run_queue<T>(
        &mut self,
        index: usize,
        f: impl FnOnce(&mut Queue, &GuestMemoryMmap, &mut Backend) -> (T, bool),
    ) -> Option<T> {
        let active = self.active.as_mut()?;
        let queue = &mut active.queues[index];
        let (result, used) = f(queue, &active.mem, &mut self.backend);
        if used && queue.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        Some(result)
    }

    fn process_rx(&mut self) -> RxStop {
        self.run_queue(RX_QUEUE, receive_frames)
            .unwrap_or(RxStop::NoBuffers)
    }

    fn process_tx(&mut self) {
        self.run_queue(TX_QUEUE, |queue, mem, tap| {
            ((), transmit_frames(queue, mem, tap))
        });
    }

    /// Receives, then (un)watches the tap according to why receiving stopped.
    fn receive(&mut self, ops: &mut EventOps) {
        let want = match self.process_rx() {
            RxStop::TapEmpty | RxStop::Budget => TapWatch::Readable,
            RxStop::NoBuffers => TapWatch::Paused,
            RxStop::TapFailed => TapWatch::Gone,
        };
        self.set_watch(ops, want);
    }

    fn set_watch(&mut self, ops: &mut EventOps, want: TapWatch) {
        if self.watch == want || self.watch == TapWatch::Gone {
            return;
        }
        let tap = self.backend.file.as_raw_fd();
        let changed = match want {
            TapWatch::Readable => ops.modify(Events::new_raw(tap, EventSet::IN)),
            // ERROR and HANG_UP are still reported: a deleted tap is noticed.
            TapWatch::Paused => ops.modify(Events::empty_raw(tap)),
            TapWatch::Gone => ops.remove(Events::empty_raw(tap)),
        };
        match changed {
            Ok(()) => self.watch = want,
            Err(e) => {
                tracing::error!(tap = %self.backend.name, "virtio-net: cannot change the tap's watch: {e}")
            }
        }
    }

    fn queue_event_index(&self, fd: RawFd) -> Option<usize> {
        self.queue_evts.iter().position(|e| e.as_raw_fd() == fd)
    }
}

/// Moves frames from the tap into the guest's rx buffers; returns why it
/// stopped and whether it used any buffer.
fn receive_frames(queue: &mut Queue, mem: &GuestMemoryMmap, tap: &mut Backend) -> (RxStop, bool) {
    let mut used = false;
    let mut stop = RxStop::Budget;
    for _ in 0..RX_BUDGET {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            stop = RxStop::NoBuffers;
            break;
        };
        let head = chain.head_index();
        let mut writer = match chain.writer(mem) {
            Ok(w) if w.available_bytes() >= NET_HDR_LEN + ETH_HLEN => w,
            Ok(w) => {
                // Unusable for any frame: hand it back empty, or the
                // guest would offer it again and again.
                tap.drops.dropped(
                    &tap.name,
                    format_args!("an rx buffer of {} bytes is too short", w.available_bytes()),
                );
                used |= add_used(queue, mem, head, 0);
                continue;
            }
            Err(e) => {
                tap.drops
                    .dropped(&tap.name, format_args!("an rx buffer is not valid: {e}"));
                used |= add_used(queue, mem, head, 0);
                continue;
            }
        };
        let len = match tap.file.read(&mut tap.frame) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                queue.go_to_previous_position();
                continue;
            }
            Err(e) => {
                queue.go_to_previous_position();
                if e.kind() == io::ErrorKind::WouldBlock {
                    stop = RxStop::TapEmpty;
                } else {
                    tracing::error!(tap = %tap.name, "virtio-net: reading the tap failed, the guest receives nothing more: {e}");
                    stop = RxStop::TapFailed;
                }
                break;
            }
        };
        if len < ETH_HLEN || NET_HDR_LEN + len > writer.available_bytes() {
            // The buffer stays with the guest for the next frame.
            tap.drops.dropped(
                &tap.name,
                format_args!(
                    "a {len}-byte frame from the tap is shorter than an Ethernet header or \
                     larger than the guest's {}-byte rx buffer",
                    writer.available_bytes()
                ),
            );
            queue.go_to_previous_position();
            continue;
        }
        let written = writer
            .write_all(&RX_HEADER)
            .and_then(|()| writer.write_all(&tap.frame[..len]));
        let used_len = match written {
            Ok(()) => (NET_HDR_LEN + len) as u32,
            Err(e) => {
                tap.drops
                    .dropped(&tap.name, format_args!("writing the rx buffer failed: {e}"));
                0
            }
        };
        used |= add_used(queue, mem, head, used_len);
    }
    (stop, used)
}

/// Sends every frame the guest queued for transmission to the tap; returns
/// whether it used any buffer.
fn transmit_frames(queue: &mut Queue, mem: &GuestMemoryMmap, tap: &mut Backend) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match read_tx_frame(mem, chain, &mut tap.frame) {
            Ok(len) => match write_frame(&mut tap.file, &tap.frame[..len]) {
                Ok(()) => {}
                Err(e) => tap
                    .drops
                    .dropped(&tap.name, format_args!("writing to the tap failed: {e}")),
            },
            Err(why) => tap.drops.dropped(&tap.name, format_args!("{why}")),
        }
        used |= add_used(queue, mem, head, 0);
    }
    used
}

/// Why a tx chain carried no frame.
#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error("a tx chain is not valid guest memory: {0}")]
    Chain(#[source] virtio_queue::Error),
    #[error("a tx chain has {0} readable bytes, less than a header and a frame")]
    Short(usize),
    #[error("a tx frame of {0} bytes is larger than any frame")]
    TooLong(usize),
    #[error("reading a tx chain failed: {0}")]
    Read(#[source] io::Error),
}

/// Copies one frame out of a tx chain into `frame`, without its header.
fn read_tx_frame(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    frame: &mut [u8],
) -> Result<usize, TxError> {
    // Only the readable descriptors count: a device-writable one ends the frame.
    let mut reader = chain.reader(mem).map_err(TxError::Chain)?;
    let avail = reader.available_bytes();
    if avail < NET_HDR_LEN + ETH_HLEN {
        return Err(TxError::Short(avail));
    }
    let len = avail - NET_HDR_LEN;
    if len > frame.len() {
        return Err(TxError::TooLong(len));
    }
    // Nothing was negotiated that the header could ask for.
    let mut header = [0u8; NET_HDR_LEN];
    reader.read_exact(&mut header).map_err(TxError::Read)?;
    reader
        .read_exact(&mut frame[..len])
        .map_err(TxError::Read)?;
    Ok(len)
}

fn write_frame(tap: &mut File, frame: &[u8]) -> io::Result<()> {
    loop {
        match tap.write(frame) {
            Ok(n) if n == frame.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "only {n} of {} bytes were taken",
                    frame.len()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("virtio-net: cannot return a buffer: {e}");
            false
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        super::TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
        check_queues(&active, QUEUE_SIZES.len())?;
        self.active = Some(active);
        // Kicks that came before activation were drained and ignored. This
        // runs on the vCPU thread, away from the event loop that (un)watches
        // the tap: a kick of the rx queue makes the loop look at it.
        self.process_tx();
        if let Err(e) = self.queue_evts[RX_QUEUE].write(1) {
            tracing::warn!(tap = %self.backend.name, "virtio-net: cannot kick the rx queue: {e}");
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.backend.file.as_raw_fd() {
            let set = events.event_set();
            if set.intersects(EventSet::ERROR | EventSet::HANG_UP) && !set.contains(EventSet::IN) {
                tracing::error!(tap = %self.backend.name, "virtio-net: the tap failed (deleted?), the guest receives nothing more");
                self.set_watch(ops, TapWatch::Gone);
                return;
            }
            self.receive(ops);
        } else if let Some(queue) = self.queue_event_index(fd) {
            // Draining only fails if the counter was already zero.
            let _ = self.queue_evts[queue].read();
            match queue {
                RX_QUEUE => self.receive(ops),
                _ => self.process_tx(),
            }
        } else {
            tracing::debug!(fd, "virtio-net: event for an unknown fd");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = self
            .queue_evts
            .iter()
            .map(|e| e.as_raw_fd())
            .chain([self.backend.file.as_raw_fd()]);
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!(tap = %self.backend.name, fd, "virtio-net: cannot watch an fd: {e}");
            }
        }
    }
}
