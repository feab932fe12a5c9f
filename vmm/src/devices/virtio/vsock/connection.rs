//! One vsock stream between a guest port and a host unix socket: its
//! handshake state, the credit accounting of both directions, and the bytes
//! the guest sent that the host socket could not take yet.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::{Op, PacketHeader, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Receive buffer the device advertises to the guest for each connection:
/// the most guest data it buffers when the host socket is slow.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Once this much guest data was forwarded since the guest last heard our
/// `fwd_cnt`, tell it (it may be waiting for credit).
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// A connection, named by its host-side and guest-side ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: OP_REQUEST queued or sent, waiting for the guest.
    LocalInit,
    Established,
}

/// How a connection ends once the muxer sees it closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The guest still thinks the connection exists: send it an OP_RST.
    SendRst,
    /// The guest already knows (it sent or was just sent an OP_RST).
    Silent,
}

#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    key: ConnKey,
    guest_cid: u64,
    state: State,
    /// When a LocalInit connection gives up on the guest.
    deadline: Option<Instant>,
    closing: Option<Close>,

    pending_request: bool,
    request_sent: bool,
    pending_response: bool,
    pending_credit_update: bool,

    // Host -> guest.
    /// The host socket may have data (or EOF) we have not read yet.
    host_readable: bool,
    /// The host will send nothing more (read returned EOF).
    host_eof: bool,
    /// The host socket hung up or errored; it is no longer polled.
    host_hup: bool,
    sent_to_guest: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The guest will not receive any more data.
    peer_shut_rcv: bool,

    // Guest -> host.
    host_out: VecDeque<u8>,
    fwd_cnt: u32,
    /// The last `fwd_cnt` the guest was told.
    fwd_cnt_told: u32,
    /// The guest will not send any more data.
    peer_shut_send: bool,
    host_write_shut: bool,

    /// What the host socket is registered for in the muxer's epoll, if at all.
    pub registered: Option<EventSet>,
    /// Whether the muxer's rx queue holds this connection.
    pub in_rxq: bool,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, guest_cid: u64, state: State) -> Self {
        Self {
            stream,
            key,
            guest_cid,
            state,
            deadline: None,
            closing: None,
            pending_request: false,
            request_sent: false,
            pending_response: false,
            pending_credit_update: false,
            host_readable: false,
            host_eof: false,
            host_hup: false,
            sent_to_guest: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            peer_shut_rcv: false,
            host_out: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            peer_shut_send: false,
            host_write_shut: false,
            registered: None,
            in_rxq: false,
        }
    }

    /// A host client asked for guest port `key.peer_port`; the guest gets an
    /// OP_REQUEST and has until `deadline` to answer.
    pub fn new_local(stream: UnixStream, key: ConnKey, guest_cid: u64, deadline: Instant) -> Self {
        let mut conn = Self::new(stream, key, guest_cid, State::LocalInit);
        conn.pending_request = true;
        conn.deadline = Some(deadline);
        conn
    }

    /// The guest's OP_REQUEST `req` reached a host listener through `stream`.
    pub fn new_peer(stream: UnixStream, key: ConnKey, guest_cid: u64, req: &PacketHeader) -> Self {
        let mut conn = Self::new(stream, key, guest_cid, State::Established);
        conn.pending_response = true;
        conn.peer_buf_alloc = req.buf_alloc;
        conn.peer_fwd_cnt = req.fwd_cnt;
        conn
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn closing(&self) -> Option<Close> {
        self.closing
    }

    /// Whether an OP_RST is owed to the guest if the connection is dropped
    /// now: not before it heard of the connection at all.
    pub fn guest_knows(&self) -> bool {
        self.state == State::Established || self.request_sent
    }

    /// Bytes the guest can still take: its buffer minus what is in flight.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.sent_to_guest.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_read_host(&self) -> bool {
        self.state == State::Established
            && self.closing.is_none()
            && !self.host_eof
            && !self.peer_shut_rcv
    }

    /// Whether the connection has a packet for the guest right now.
    pub fn wants_rx(&self) -> bool {
        if self.closing.is_some() {
            return false;
        }
        self.pending_request
            || self.pending_response
            || self.pending_credit_update
            || (self.can_read_host() && self.host_readable && self.peer_credit() > 0)
    }

    /// The epoll events the host socket should be watched for; `None` takes
    /// it out of the epoll set. An empty set still reports hang-ups.
    pub fn desired_interest(&self) -> Option<EventSet> {
        if self.host_hup || self.closing.is_some() {
            return None;
        }
        let mut set = EventSet::empty();
        if self.can_read_host() && !self.host_readable && self.peer_credit() > 0 {
            set |= EventSet::IN;
        }
        if !self.host_out.is_empty() {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    fn kill(&mut self, close: Close) {
        // No reset for a connection the guest never heard of.
        let close = if self.guest_knows() {
            close
        } else {
            Close::Silent
        };
        if self.closing.is_none() {
            tracing::debug!(key = ?self.key, ?close, "vsock: closing connection");
            self.closing = Some(close);
        }
    }

    /// The LocalInit deadline passed without an answer from the guest.
    pub fn time_out(&mut self) {
        tracing::debug!(key = ?self.key, "vsock: the guest did not answer the connection request");
        self.kill(Close::SendRst);
    }

    /// A header for this connection, carrying our current credit.
    fn header(&mut self, op: Op, len: u32, flags: u32) -> PacketHeader {
        self.fwd_cnt_told = self.fwd_cnt;
        self.pending_credit_update = false;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next packet for the guest, with its payload read into `buf`
    /// (whose length is the room the guest's buffer has).
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<(PacketHeader, usize)> {
        if self.closing.is_some() {
            return None;
        }
        if self.pending_request {
            self.pending_request = false;
            self.request_sent = true;
            return Some((self.header(Op::Request, 0, 0), 0));
        }
        if self.pending_response {
            self.pending_response = false;
            return Some((self.header(Op::Response, 0, 0), 0));
        }
        if self.can_read_host() && self.host_readable {
            let want = buf.len().min(self.peer_credit() as usize);
            if want > 0 {
                if let Some(pkt) = self.read_host(&mut buf[..want]) {
                    return Some(pkt);
                }
            }
        }
        if self.pending_credit_update {
            return Some((self.header(Op::CreditUpdate, 0, 0), 0));
        }
        None
    }

    fn read_host(&mut self, buf: &mut [u8]) -> Option<(PacketHeader, usize)> {
        match self.stream.read(buf) {
            Ok(0) => {
                self.host_readable = false;
                self.host_eof = true;
                if self.host_hup {
                    // Nobody is left on the host side: end it all.
                    self.kill(Close::Silent);
                    return Some((self.header(Op::Rst, 0, 0), 0));
                }
                // A half close: the guest may still send.
                tracing::debug!(key = ?self.key, "vsock: host end shut down its write side");
                let hdr = self.header(Op::Shutdown, 0, SHUTDOWN_SEND);
                self.after_host_write();
                Some((hdr, 0))
            }
            Ok(n) => {
                // A short read drained the socket; epoll says when there is
                // more (unless it hung up and is no longer polled).
                if n < buf.len() && !self.host_hup {
                    self.host_readable = false;
                }
                self.sent_to_guest = self.sent_to_guest.wrapping_add(n as u32);
                Some((self.header(Op::Rw, n as u32, 0), n))
            }
            Err(e)
                if (e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted)
                    && !self.host_hup =>
            {
                self.host_readable = false;
                None
            }
            Err(e) => {
                tracing::debug!(key = ?self.key, "vsock: cannot read the host socket: {e}");
                self.kill(Close::Silent);
                Some((self.header(Op::Rst, 0, 0), 0))
            }
        }
    }

    /// Events from the host socket.
    pub fn on_host_event(&mut self, set: EventSet) {
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.host_hup = true;
            if !self.can_read_host() {
                // Nothing left to deliver from the host, nobody to write to.
                self.kill(Close::SendRst);
                return;
            }
            // Deliver what is still buffered; the read finds the EOF or error.
            self.host_readable = true;
        }
        if set.contains(EventSet::IN) {
            self.host_readable = true;
        }
        if set.contains(EventSet::OUT) {
            self.flush_host_out();
        }
    }

    /// A packet from the guest for this connection (already matched by key).
    pub fn on_guest_pkt(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        match (hdr.op(), self.state) {
            (Some(Op::Response), State::LocalInit) => self.established(),
            (Some(Op::Rst), _) => self.kill(Close::Silent),
            (Some(Op::Rw), State::Established) => self.forward_to_host(payload),
            (Some(Op::CreditUpdate), _) => {}
            (Some(Op::CreditRequest), _) => self.pending_credit_update = true,
            (Some(Op::Shutdown), State::Established) => {
                self.peer_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                self.peer_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
                tracing::debug!(key = ?self.key, flags = hdr.flags, "vsock: guest shut down");
                self.after_host_write();
            }
            (op, state) => {
                tracing::debug!(key = ?self.key, ?op, raw_op = hdr.op, ?state, "vsock: unexpected packet");
                self.kill(Close::SendRst);
            }
        }
    }

    fn established(&mut self) {
        let line = format!("OK {}\n", self.key.local_port);
        match self.stream.write(line.as_bytes()) {
            Ok(n) if n == line.len() => {
                tracing::debug!(key = ?self.key, "vsock: host-initiated connection established");
                self.state = State::Established;
                self.deadline = None;
            }
            Ok(_) => {
                tracing::debug!(key = ?self.key, "vsock: short write of the OK line");
                self.kill(Close::SendRst);
            }
            Err(e) => {
                tracing::debug!(key = ?self.key, "vsock: cannot answer the host client: {e}");
                self.kill(Close::SendRst);
            }
        }
    }

    fn forward_to_host(&mut self, data: &[u8]) {
        if self.peer_shut_send {
            tracing::debug!(key = ?self.key, "vsock: guest sent data after shutting down");
            self.kill(Close::SendRst);
            return;
        }
        if self.host_out.len() + data.len() > BUF_ALLOC as usize {
            tracing::debug!(key = ?self.key, len = data.len(), "vsock: guest overran its credit");
            self.kill(Close::SendRst);
            return;
        }
        let mut written = 0;
        if self.host_out.is_empty() {
            match write_some(&mut self.stream, data) {
                Ok(n) => written = n,
                Err(e) => {
                    tracing::debug!(key = ?self.key, "vsock: cannot write the host socket: {e}");
                    self.kill(Close::SendRst);
                    return;
                }
            }
        }
        self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
        self.host_out.extend(&data[written..]);
        self.note_forwarded();
    }

    /// Writes buffered guest data to the now writable host socket.
    fn flush_host_out(&mut self) {
        while !self.host_out.is_empty() {
            let (front, _) = self.host_out.as_slices();
            match write_some(&mut self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.host_out.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) => {
                    tracing::debug!(key = ?self.key, "vsock: cannot write the host socket: {e}");
                    self.kill(Close::SendRst);
                    return;
                }
            }
        }
        self.after_host_write();
        self.note_forwarded();
    }

    /// Carries out the guest's shutdown once its data reached the host.
    fn after_host_write(&mut self) {
        if !self.host_out.is_empty() || !self.peer_shut_send {
            return;
        }
        if self.peer_shut_rcv || self.host_eof {
            // Both directions are done.
            self.kill(Close::SendRst);
        } else if !self.host_write_shut {
            self.host_write_shut = true;
            if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                tracing::debug!(key = ?self.key, "vsock: cannot half-close the host socket: {e}");
            }
        }
    }

    /// Tells the guest about freed buffer space once enough accumulated.
    fn note_forwarded(&mut self) {
        if !self.peer_shut_send
            && self.fwd_cnt.wrapping_sub(self.fwd_cnt_told) >= CREDIT_UPDATE_THRESHOLD
        {
            self.pending_credit_update = true;
        }
    }
}

/// One non-blocking write; `Ok(0)` when the socket would block.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(data) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            other => return other,
        }
    }
}
