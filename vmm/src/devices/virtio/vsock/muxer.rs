//! The host half of the device: it owns the unix listener, the host sockets
//! of all connections (on its own epoll instance, which the device nests in
//! the VMM's event loop), routes guest packets to connections by port pair,
//! and hands out the packets due to the guest in a fair order.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Close, ConnKey, Connection, State};
use super::error::VsockError;
use super::handshake::ConnectLine;
use super::packet::{Op, PacketHeader, HOST_CID, TYPE_STREAM};

/// How long a host client may take to send its CONNECT line, and the guest
/// to answer the resulting connection request.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Host-side ports of host-initiated connections count up from here.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Live connections plus host clients still handshaking.
const MAX_CONNECTIONS: usize = 1024;

/// Resets waiting for rx buffers; past the soft limit the device stops
/// taking tx packets (each may cost a reset), past the hard one resets are
/// dropped.
const RST_BACKLOG_SOFT: usize = 256;
const RST_BACKLOG_HARD: usize = 1024;

const EPOLL_BATCH: usize = 64;

/// A host client that has not finished its `CONNECT <port>\n` line.
struct PendingHost {
    stream: UnixStream,
    line: ConnectLine,
    deadline: Instant,
}

/// Something owed to the guest on the rx queue.
#[derive(Debug, Clone, Copy)]
enum RxItem {
    /// Ask the connection for its next packet.
    Conn(ConnKey),
    /// A reset for a connection that no longer (or never) existed.
    Rst {
        src_cid: u64,
        src_port: u32,
        dst_port: u32,
    },
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    connect_timeout: Duration,
    handshakes: HashMap<RawFd, PendingHost>,
    conns: HashMap<ConnKey, Connection>,
    conn_fds: HashMap<RawFd, ConnKey>,
    rxq: VecDeque<RxItem>,
    pending_rsts: usize,
    next_local_port: u32,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let listener = bind(uds_path)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let timer = TimerFd::new().map_err(VsockError::Timer)?;
        let muxer = Self {
            guest_cid,
            uds_path: uds_path.into(),
            listener,
            epoll,
            timer,
            timer_armed: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            conn_fds: HashMap::new(),
            rxq: VecDeque::new(),
            pending_rsts: 0,
            next_local_port: FIRST_LOCAL_PORT,
        };
        muxer
            .ctl(
                ControlOperation::Add,
                muxer.listener.as_raw_fd(),
                EventSet::IN,
            )
            .map_err(VsockError::Epoll)?;
        muxer
            .ctl(ControlOperation::Add, muxer.timer.as_raw_fd(), EventSet::IN)
            .map_err(VsockError::Epoll)?;
        Ok(muxer)
    }

    pub fn set_connect_timeout(&mut self, timeout: Duration) {
        // Bounded so that deadlines stay representable.
        self.connect_timeout = timeout.min(Duration::from_secs(3600));
    }

    /// The epoll instance every host fd is registered with; readable when
    /// `process_host_events` has work.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// Whether the guest should stop being served on tx until it gives us
    /// rx buffers for the resets already owed.
    pub fn rx_backlogged(&self) -> bool {
        self.pending_rsts >= RST_BACKLOG_SOFT
    }

    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn ctl(&self, op: ControlOperation, fd: RawFd, set: EventSet) -> io::Result<()> {
        self.epoll.ctl(op, fd, EpollEvent::new(set, fd as u64))
    }

    /// Serves one batch of ready host fds.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); EPOLL_BATCH];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                tracing::warn!("vsock: cannot poll the host sockets: {e}");
                return;
            }
        };
        for event in &events[..n] {
            let fd = event.data() as RawFd;
            let set = EventSet::from_bits_truncate(event.events());
            if fd == self.listener.as_raw_fd() {
                self.accept_host_clients();
            } else if fd == self.timer.as_raw_fd() {
                self.expire_deadlines();
            } else if self.handshakes.contains_key(&fd) {
                self.advance_handshake(fd);
            } else if let Some(&key) = self.conn_fds.get(&fd) {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.on_host_event(set);
                }
                self.settle(key);
            } else {
                tracing::debug!(fd, "vsock: event for a host fd that is gone");
            }
        }
    }

    fn accept_host_clients(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: cannot accept a host connection: {e}");
                    return;
                }
            };
            if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
                tracing::warn!("vsock: too many connections, refusing a host client");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = stream
                .set_nonblocking(true)
                .and_then(|()| self.ctl(ControlOperation::Add, fd, EventSet::IN))
            {
                tracing::warn!("vsock: cannot watch a host client: {e}");
                continue;
            }
            tracing::debug!(fd, "vsock: host client connected");
            let deadline = Instant::now() + self.connect_timeout;
            self.handshakes.insert(
                fd,
                PendingHost {
                    stream,
                    line: ConnectLine::default(),
                    deadline,
                },
            );
            self.arm_timer();
        }
    }

    fn advance_handshake(&mut self, fd: RawFd) {
        let Some(pending) = self.handshakes.get_mut(&fd) else {
            return;
        };
        match pending.line.advance(&mut pending.stream) {
            Ok(None) => {}
            Ok(Some(port)) => {
                if let Some(pending) = self.handshakes.remove(&fd) {
                    self.connect_to_guest(pending.stream, port);
                }
            }
            Err(e) => {
                tracing::debug!(fd, "vsock: dropping host client: {e}");
                self.drop_handshake(fd);
            }
        }
    }

    fn drop_handshake(&mut self, fd: RawFd) {
        if self.handshakes.remove(&fd).is_some() {
            let _ = self.ctl(ControlOperation::Delete, fd, EventSet::empty());
        }
    }

    /// Turns a host client that named guest `port` into a connection whose
    /// OP_REQUEST goes out on the rx queue.
    fn connect_to_guest(&mut self, stream: UnixStream, port: u32) {
        let fd = stream.as_raw_fd();
        let Some(local_port) = self.alloc_local_port() else {
            tracing::warn!("vsock: no free host-side port");
            let _ = self.ctl(ControlOperation::Delete, fd, EventSet::empty());
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        tracing::debug!(?key, "vsock: host client connects to guest port {port}");
        let deadline = Instant::now() + self.connect_timeout;
        let mut conn = Connection::new_local(stream, key, self.guest_cid, deadline);
        // Still registered from the handshake.
        conn.registered = Some(EventSet::IN);
        self.conn_fds.insert(fd, key);
        self.conns.insert(key, conn);
        self.arm_timer();
        self.settle(key);
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        // At most MAX_CONNECTIONS ports are taken, so this finds one.
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == port) {
                return Some(port);
            }
        }
        None
    }

    fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        // A periodic tick while deadlines exist: re-arming a one-shot timer
        // for each new deadline could reset an expiry already reported by
        // epoll, and reading the (blocking) timerfd would then hang.
        let tick = (self.connect_timeout / 4).max(Duration::from_millis(10));
        match self.timer.reset(tick, Some(tick)) {
            Ok(()) => self.timer_armed = true,
            Err(e) => tracing::warn!("vsock: cannot arm the connect timer: {e}"),
        }
    }

    fn expire_deadlines(&mut self) {
        if let Err(e) = self.timer.wait() {
            tracing::debug!("vsock: cannot read the connect timer: {e}");
        }
        let now = Instant::now();
        let expired: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in expired {
            tracing::debug!(fd, "vsock: host client sent no CONNECT line in time");
            self.drop_handshake(fd);
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state() == State::LocalInit && c.deadline().is_some_and(|d| d <= now)
            })
            .map(|(&k, _)| k)
            .collect();
        for key in expired {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.time_out();
            }
            self.settle(key);
        }
        let waiting = !self.handshakes.is_empty()
            || self.conns.values().any(|c| c.state() == State::LocalInit);
        if !waiting {
            if let Err(e) = self.timer.clear() {
                tracing::warn!("vsock: cannot disarm the connect timer: {e}");
            }
            self.timer_armed = false;
        }
    }

    /// Brings a connection's bookkeeping in line with its state after it
    /// was touched: removes it if it is closing, updates what its host
    /// socket is polled for, queues it for rx if it has something to say.
    fn settle(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if let Some(close) = conn.closing() {
            self.remove_conn(key, close);
            return;
        }
        if let Err(e) = sync_interest(&self.epoll, conn) {
            tracing::warn!(?key, "vsock: cannot poll a host socket: {e}");
            self.remove_conn(key, Close::SendRst);
            return;
        }
        if conn.wants_rx() && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
    }

    fn remove_conn(&mut self, key: ConnKey, close: Close) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        self.conn_fds.remove(&conn.fd());
        if conn.registered.is_some() {
            let _ = self.ctl(ControlOperation::Delete, conn.fd(), EventSet::empty());
        }
        if close == Close::SendRst && conn.guest_knows() {
            self.push_rst(HOST_CID, key.local_port, key.peer_port);
        }
        tracing::debug!(?key, "vsock: connection removed");
    }

    fn push_rst(&mut self, src_cid: u64, src_port: u32, dst_port: u32) {
        if self.pending_rsts >= RST_BACKLOG_HARD {
            tracing::debug!(
                src_port,
                dst_port,
                "vsock: reset backlog full, dropping a reset"
            );
            return;
        }
        self.pending_rsts += 1;
        self.rxq.push_back(RxItem::Rst {
            src_cid,
            src_port,
            dst_port,
        });
    }

    /// Answers a guest packet with a reset (ports swapped).
    fn rst_reply(&mut self, hdr: &PacketHeader) {
        if hdr.op() != Some(Op::Rst) {
            self.push_rst(hdr.dst_cid, hdr.dst_port, hdr.src_port);
        }
    }

    /// The next packet for the guest; its payload goes to `buf`, whose
    /// length is the room in the guest's rx buffer.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<(PacketHeader, usize)> {
        // Each item is looked at once: a connection with nothing to say
        // right now may queue itself again.
        for _ in 0..self.rxq.len() {
            let item = self.rxq.pop_front()?;
            match item {
                RxItem::Rst {
                    src_cid,
                    src_port,
                    dst_port,
                } => {
                    self.pending_rsts = self.pending_rsts.saturating_sub(1);
                    let hdr = PacketHeader {
                        src_cid,
                        dst_cid: self.guest_cid,
                        src_port,
                        dst_port,
                        type_: TYPE_STREAM,
                        op: Op::Rst as u16,
                        ..Default::default()
                    };
                    return Some((hdr, 0));
                }
                RxItem::Conn(key) => {
                    let Some(conn) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    conn.in_rxq = false;
                    let pkt = conn.recv_pkt(buf);
                    self.settle(key);
                    if pkt.is_some() {
                        return pkt;
                    }
                }
            }
        }
        None
    }

    /// A packet the guest sent on the tx queue.
    pub fn send_pkt(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            tracing::debug!(
                src_cid = hdr.src_cid,
                "vsock: dropping a packet with a foreign source CID"
            );
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            tracing::debug!(
                dst_cid = hdr.dst_cid,
                type_ = hdr.type_,
                "vsock: unsupported destination or socket type"
            );
            self.rst_reply(hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        match self.conns.get_mut(&key) {
            Some(conn) => {
                conn.on_guest_pkt(hdr, payload);
                self.settle(key);
            }
            None if hdr.op() == Some(Op::Request) => self.connect_to_host(key, hdr),
            None => {
                tracing::debug!(?key, op = hdr.op, "vsock: packet for an unknown connection");
                self.rst_reply(hdr);
            }
        }
    }

    /// The guest connects to host port `key.local_port`: `<uds_path>_<port>`.
    fn connect_to_host(&mut self, key: ConnKey, req: &PacketHeader) {
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            tracing::warn!(?key, "vsock: too many connections, refusing the guest");
            self.rst_reply(req);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        // A unix connect completes or fails at once, unless the listener's
        // backlog is full.
        let stream = UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s));
        match stream {
            Ok(stream) => {
                tracing::debug!(?key, path = ?path, "vsock: guest connected to a host socket");
                let conn = Connection::new_peer(stream, key, self.guest_cid, req);
                self.conn_fds.insert(conn.fd(), key);
                self.conns.insert(key, conn);
                self.settle(key);
            }
            Err(e) => {
                tracing::debug!(?key, path = ?path, "vsock: guest connection refused: {e}");
                self.rst_reply(req);
            }
        }
    }

    /// The driver reset the device: every connection is gone with it. Host
    /// clients still sending their CONNECT line are kept.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key, Close::Silent);
        }
        self.rxq.clear();
        self.pending_rsts = 0;
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.uds_path) {
            tracing::debug!(path = %self.uds_path.display(), "vsock: cannot remove the socket: {e}");
        }
    }
}

/// Registers, modifies or unregisters a connection's host socket so that
/// the epoll set matches what the connection wants.
fn sync_interest(epoll: &Epoll, conn: &mut Connection) -> io::Result<()> {
    let want = conn.desired_interest();
    if want == conn.registered {
        return Ok(());
    }
    let fd = conn.fd();
    let (op, set) = match (conn.registered, want) {
        (None, Some(set)) => (ControlOperation::Add, set),
        (Some(_), Some(set)) => (ControlOperation::Modify, set),
        (_, None) => (ControlOperation::Delete, EventSet::empty()),
    };
    epoll.ctl(op, fd, EpollEvent::new(set, fd as u64))?;
    conn.registered = want;
    Ok(())
}

/// Listens on `path`, replacing a stale socket left by an earlier run.
fn bind(path: &Path) -> Result<UnixListener, VsockError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            fs::remove_file(path).map_err(|source| VsockError::RemoveStale {
                path: path.into(),
                source,
            })?;
        }
        Ok(_) => return Err(VsockError::NotASocket { path: path.into() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(VsockError::Stat {
                path: path.into(),
                source,
            })
        }
    }
    let bind_err = |source| VsockError::Bind {
        path: path.into(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}
