//! The virtio side of the device: queues, config space, and moving packets
//! between the virtqueues and the muxer.

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::{
    check_queues, read_config_bytes, ActivateError, ActiveQueues, VirtioDevice, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};
use super::error::VsockError;
use super::muxer::Muxer;
use super::packet::{PacketError, PacketHeader, HDR_LEN, MAX_PKT_PAYLOAD};

const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE; 3];
/// Queue indices; the third, the event queue, is never used (the device
/// sends no transport events).
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;

/// Rounds of tx/rx processing per wakeup when tx waits on rx buffers.
const MAX_PUMP_ROUNDS: usize = 16;

/// Why a tx descriptor chain was dropped.
#[derive(Debug, thiserror::Error)]
enum TxChainError {
    #[error("the chain is not valid guest memory: {0}")]
    Chain(#[source] virtio_queue::Error),
    #[error("the chain holds {0} bytes, less than a packet header")]
    Truncated(usize),
    #[error(transparent)]
    Header(#[from] PacketError),
    #[error("payload of {len} bytes exceeds the {MAX_PKT_PAYLOAD}-byte maximum")]
    TooBig { len: u32 },
    #[error("header claims {len} payload bytes, the chain has {avail}")]
    LenMismatch { len: u32, avail: usize },
    #[error("cannot read the chain: {0}")]
    Read(#[source] std::io::Error),
}

/// A virtio-vsock device whose host side is a unix socket ("hybrid vsock"):
/// host clients connect to `uds_path` and send `CONNECT <port>\n`; guest
/// connections to host port P go to the unix socket `<uds_path>_P`.
pub struct Vsock {
    guest_cid: u64,
    queue_evts: [EventFd; 3],
    muxer: Muxer,
    active: Option<ActiveQueues>,
    scratch: Vec<u8>,
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`, listening for host clients
    /// on `uds_path` (a stale socket there is replaced).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd);
        Ok(Self {
            guest_cid,
            queue_evts: [evt()?, evt()?, evt()?],
            muxer: Muxer::new(guest_cid, uds_path)?,
            active: None,
            scratch: vec![0; MAX_PKT_PAYLOAD],
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// How long a host client may take to send its CONNECT line, and then
    /// wait for the guest to accept (default 2 s each; at most an hour).
    pub fn set_connect_timeout(&mut self, timeout: Duration) {
        self.muxer.set_connect_timeout(timeout);
    }

    #[cfg(test)]
    pub(crate) fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Moves packets both ways until neither queue can make progress, then
    /// interrupts the guest if it got used buffers.
    fn pump(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let (rx_queues, rest) = active.queues.split_at_mut(TX_QUEUE);
        let (rxq, txq) = (&mut rx_queues[RX_QUEUE], &mut rest[0]);
        let (mut rx_used, mut tx_used) = (false, false);
        for _ in 0..MAX_PUMP_ROUNDS {
            let (tx_any, tx_paused) = process_tx(&mut self.muxer, txq, mem, &mut self.scratch);
            let rx_any = process_rx(&mut self.muxer, rxq, mem, &mut self.scratch);
            tx_used |= tx_any;
            rx_used |= rx_any;
            // Tx stopped for want of rx buffers for its resets; go on only
            // if some were freed.
            if !(tx_paused && rx_any) {
                break;
            }
        }
        let mut notify = false;
        for (used, queue) in [(rx_used, rxq), (tx_used, txq)] {
            if used {
                notify |= queue.needs_notification(mem).unwrap_or(true);
            }
        }
        if notify {
            active.interrupt.signal_used_queue();
        }
    }
}

/// Hands the guest's tx packets to the muxer. Returns whether any buffer was
/// used and whether processing stopped because the rx side is backlogged.
fn process_tx(
    muxer: &mut Muxer,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    scratch: &mut [u8],
) -> (bool, bool) {
    let mut used = false;
    loop {
        if muxer.rx_backlogged() {
            return (used, true);
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return (used, false);
        };
        let head = chain.head_index();
        let parsed = chain
            .reader(mem)
            .map_err(TxChainError::Chain)
            .and_then(|mut reader| read_tx_packet(&mut reader, scratch));
        match parsed {
            Ok((hdr, len)) => muxer.send_pkt(&hdr, &scratch[..len]),
            Err(e) => tracing::debug!("vsock: dropping a tx packet: {e}"),
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            tracing::warn!("vsock: cannot return a tx buffer: {e}");
        }
        used = true;
    }
}

/// Reads one packet: its header, and its payload into `scratch`.
fn read_tx_packet(
    reader: &mut Reader,
    scratch: &mut [u8],
) -> Result<(PacketHeader, usize), TxChainError> {
    let avail = reader.available_bytes();
    if avail < HDR_LEN {
        return Err(TxChainError::Truncated(avail));
    }
    let mut raw = [0u8; HDR_LEN];
    reader.read_exact(&mut raw).map_err(TxChainError::Read)?;
    let hdr = PacketHeader::decode(&raw)?;
    let len = hdr.len as usize;
    if len > MAX_PKT_PAYLOAD || len > scratch.len() {
        return Err(TxChainError::TooBig { len: hdr.len });
    }
    if len > avail - HDR_LEN {
        return Err(TxChainError::LenMismatch {
            len: hdr.len,
            avail: avail - HDR_LEN,
        });
    }
    reader
        .read_exact(&mut scratch[..len])
        .map_err(TxChainError::Read)?;
    Ok((hdr, len))
}

/// Fills the guest's rx buffers with what the muxer has for it. Returns
/// whether any buffer was used.
fn process_rx(
    muxer: &mut Muxer,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    scratch: &mut [u8],
) -> bool {
    let mut used = false;
    while muxer.has_pending_rx() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let mut writer = match chain.writer(mem) {
            // Room for a header and at least one byte of data.
            Ok(w) if w.available_bytes() > HDR_LEN => w,
            Ok(w) => {
                tracing::debug!(room = w.available_bytes(), "vsock: rx buffer too small");
                used |= add_used(queue, mem, head, 0);
                continue;
            }
            Err(e) => {
                tracing::debug!("vsock: invalid rx buffer: {e}");
                used |= add_used(queue, mem, head, 0);
                continue;
            }
        };
        let room = (writer.available_bytes() - HDR_LEN)
            .min(MAX_PKT_PAYLOAD)
            .min(scratch.len());
        let Some((hdr, len)) = muxer.recv_pkt(&mut scratch[..room]) else {
            // Nothing to send after all: give the buffer back.
            queue.go_to_previous_position();
            break;
        };
        let written = writer
            .write_all(&hdr.encode())
            .and_then(|()| writer.write_all(&scratch[..len]));
        let used_len = match written {
            Ok(()) => (HDR_LEN + len) as u32,
            Err(e) => {
                tracing::debug!("vsock: cannot write an rx packet, it is lost: {e}");
                0
            }
        };
        used |= add_used(queue, mem, head, used_len);
    }
    used
}

fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("vsock: cannot return an rx buffer: {e}");
            false
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
        check_queues(&active, QUEUE_SIZES.len())?;
        self.active = Some(active);
        // Host clients may have connected before the guest driver came up.
        self.pump();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.muxer.epoll_fd() {
            self.muxer.process_host_events();
        } else if let Some(evt) = self.queue_evts.iter().find(|e| e.as_raw_fd() == fd) {
            // Draining only fails if the counter was already zero.
            let _ = evt.read();
        } else {
            tracing::debug!(fd, "vsock: event for an unknown fd");
            return;
        }
        // Before activation queue kicks are drained and ignored; the event
        // queue is never used (no transport events are ever sent).
        self.pump();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = self
            .queue_evts
            .iter()
            .map(|e| e.as_raw_fd())
            .chain([self.muxer.epoll_fd()]);
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!(fd, "vsock: cannot watch an fd: {e}");
            }
        }
    }
}
