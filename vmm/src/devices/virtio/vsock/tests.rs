//! Device-level tests: a fake guest driver owns three split virtqueues in
//! real guest memory, the device runs on a real event manager, and host
//! clients are real unix sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::super::{ActiveQueues, Interrupt, VirtioDevice, INTERRUPT_USED_RING, TYPE_VSOCK};
use super::connection::{BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
use super::packet::{
    Op, PacketHeader, HDR_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::{Vsock, VsockError, FIRST_LOCAL_PORT};
use crate::devices::irq::IrqLine;
use crate::devices::virtio::fake_driver::{kick, Arena, FakeQueue};

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 16 << 20;
const DATA_START: u64 = 1 << 20;
static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

struct Harness {
    em: EventManager<Arc<Mutex<Vsock>>>,
    dev: Arc<Mutex<Vsock>>,
    mem: GuestMemoryMmap,
    rx: FakeQueue,
    tx: FakeQueue,
    interrupt: Interrupt,
    arena: Arena,
    /// Rx buffers handed to the device, by head: (addr, len).
    rx_bufs: HashMap<u16, (u64, u32)>,
    tx_used: usize,
    /// Rx buffers returned without a packet.
    rx_skipped: usize,
    inbox: VecDeque<(PacketHeader, Vec<u8>)>,
    dir: PathBuf,
    uds: PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir() -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("husk-vsock-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn guest_hdr(op: Op, src_port: u32, dst_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op: op as u16,
        buf_alloc: 64 * 1024,
        ..Default::default()
    }
}

impl Harness {
    fn new() -> Self {
        Self::with_timeout(None)
    }

    fn with_timeout(timeout: Option<Duration>) -> Self {
        let dir = temp_dir();
        let uds = dir.join("v.sock");
        let mut vsock = Vsock::new(GUEST_CID, &uds).unwrap();
        if let Some(t) = timeout {
            vsock.set_connect_timeout(t);
        }
        let dev = Arc::new(Mutex::new(vsock));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let rx = FakeQueue::new(0x1_0000);
        let tx = FakeQueue::new(0x2_0000);
        let evq = FakeQueue::new(0x3_0000);
        let interrupt = Interrupt::new(IrqLine::new(5).unwrap());
        dev.lock()
            .unwrap()
            .activate(ActiveQueues {
                mem: mem.clone(),
                queues: vec![rx.queue(), tx.queue(), evq.queue()],
                interrupt: interrupt.clone(),
            })
            .unwrap();
        Self {
            em,
            dev,
            mem,
            rx,
            tx,
            interrupt,
            arena: Arena::new(DATA_START, MEM_SIZE as u64),
            rx_bufs: HashMap::new(),
            tx_used: 0,
            rx_skipped: 0,
            inbox: VecDeque::new(),
            dir,
            uds,
        }
    }

    /// Offers `n` rx buffers of `len` bytes each.
    fn give_rx(&mut self, n: usize, len: u32) {
        for (head, addr) in self.rx.add_writable(&self.mem, &mut self.arena, n, len) {
            self.rx_bufs.insert(head, (addr, len));
        }
        kick(&self.dev, 0);
    }

    /// Sends a packet on the tx queue, header and payload in separate
    /// descriptors (as Linux does).
    fn send(&mut self, hdr: PacketHeader, payload: &[u8]) {
        let hdr = PacketHeader {
            len: payload.len() as u32,
            ..hdr
        };
        let h = self.arena.alloc(HDR_LEN as u32);
        self.mem
            .write_slice(&hdr.encode(), GuestAddress(h))
            .unwrap();
        let mut chain = vec![(h, HDR_LEN as u32, false)];
        if !payload.is_empty() {
            let p = self.arena.alloc(payload.len() as u32);
            self.mem.write_slice(payload, GuestAddress(p)).unwrap();
            chain.push((p, payload.len() as u32, false));
        }
        self.send_raw_chain(&chain);
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        let a = self.arena.alloc(bytes.len() as u32);
        self.mem.write_slice(bytes, GuestAddress(a)).unwrap();
        self.send_raw_chain(&[(a, bytes.len() as u32, false)]);
    }

    fn send_raw_chain(&mut self, chain: &[(u64, u32, bool)]) {
        self.tx.add_chain(&self.mem, chain);
        kick(&self.dev, 1);
    }

    /// Runs the event loop once and collects what the device produced.
    fn poll(&mut self, timeout_ms: i32) -> usize {
        let n = self.em.run_with_timeout(timeout_ms).unwrap();
        self.collect();
        n
    }

    fn collect(&mut self) {
        for (head, len) in self.rx.take_used(&self.mem) {
            let (addr, cap) = self.rx_bufs.remove(&head).expect("unknown rx head");
            if len == 0 {
                self.rx_skipped += 1;
                continue;
            }
            assert!(len as usize >= HDR_LEN && len <= cap, "bad used len {len}");
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            let hdr = PacketHeader::decode(&bytes).unwrap();
            assert_eq!(
                hdr.len as usize,
                bytes.len() - HDR_LEN,
                "len field vs used len"
            );
            self.inbox.push_back((hdr, bytes[HDR_LEN..].to_vec()));
        }
        self.tx_used += self.tx.take_used(&self.mem).len();
    }

    /// Polls until `f` yields something (3 s at most).
    fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut(&mut Self) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.poll(10);
        }
    }

    fn next_packet(&mut self) -> (PacketHeader, Vec<u8>) {
        self.wait_for("an rx packet", |h| h.inbox.pop_front())
    }

    /// Runs the loop until it has been idle for a while.
    fn settle(&mut self) {
        while self.poll(50) > 0 {}
    }

    fn connect_host(&self, line: &[u8]) -> UnixStream {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.write_all(line).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    /// A host client connected to guest port `port`, with the guest
    /// accepting with `buf_alloc`; returns the client and its local port.
    fn establish(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
        if self.rx_bufs.is_empty() {
            self.give_rx(4, 4096);
        }
        let mut client = self.connect_host(format!("CONNECT {port}\n").as_bytes());
        let (req, _) = self.next_packet();
        assert_eq!(req.op(), Some(Op::Request));
        let mut resp = guest_hdr(Op::Response, port, req.src_port);
        resp.buf_alloc = buf_alloc;
        self.send(resp, &[]);
        let line = self.read_host(&mut client, b'\n');
        assert_eq!(line, format!("OK {}\n", req.src_port).into_bytes());
        (client, req.src_port)
    }

    /// Reads from a non-blocking client until `delim` (inclusive).
    fn read_host(&mut self, client: &mut UnixStream, delim: u8) -> Vec<u8> {
        let mut out = Vec::new();
        self.wait_for("host data", |_| {
            let mut b = [0u8; 1];
            loop {
                match client.read(&mut b) {
                    Ok(0) => panic!("unexpected EOF"),
                    Ok(_) => {
                        out.push(b[0]);
                        if b[0] == delim {
                            return Some(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                    Err(e) => panic!("{e}"),
                }
            }
        });
        out
    }

    fn read_host_exact(&mut self, client: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let mut got = 0;
        self.wait_for("host data", |_| {
            while got < n {
                match client.read(&mut out[got..]) {
                    Ok(0) => panic!("unexpected EOF after {got} bytes"),
                    Ok(k) => got += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                    Err(e) => panic!("{e}"),
                }
            }
            Some(())
        });
        out
    }

    /// Waits until the host end sees EOF (data before it is discarded).
    fn wait_host_eof(&mut self, client: &mut UnixStream) {
        self.wait_for("host EOF", |_| {
            let mut b = [0u8; 4096];
            loop {
                match client.read(&mut b) {
                    Ok(0) => return Some(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Some(()),
                    Err(e) => panic!("{e}"),
                }
            }
        });
    }

    fn connections(&self) -> usize {
        self.dev.lock().unwrap().connection_count()
    }
}

fn assert_rst(hdr: &PacketHeader, src_port: u32, dst_port: u32) {
    assert_eq!(hdr.op(), Some(Op::Rst), "{hdr:?}");
    assert_eq!((hdr.src_port, hdr.dst_port), (src_port, dst_port));
    assert_eq!(hdr.dst_cid, GUEST_CID);
}

#[test]
fn device_identity_and_config() {
    let h = Harness::new();
    let dev = h.dev.lock().unwrap();
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.queue_events().len(), 3);
    let mut cid = [0xffu8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut tail = [0xffu8; 4];
    dev.read_config(4, &mut tail);
    assert_eq!(tail, [0; 4]);
}

#[test]
fn constructor_validates_cid_and_replaces_stale_sockets() {
    let dir = temp_dir();
    let path = dir.join("v.sock");
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        assert!(matches!(
            Vsock::new(cid, &path),
            Err(VsockError::InvalidCid(_))
        ));
    }
    // A socket file left behind by a dead VMM.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let dev = Vsock::new(GUEST_CID, &path).unwrap();
    UnixStream::connect(&path).unwrap();
    drop(dev);
    assert!(!path.exists(), "the socket is removed with the device");
    // Something that is not a socket is left alone.
    std::fs::write(&path, b"precious").unwrap();
    let err = Vsock::new(GUEST_CID, &path).err().unwrap();
    assert!(matches!(err, VsockError::NotASocket { .. }), "{err}");
    assert!(err.to_string().contains("v.sock"));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn host_connect_handshake() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    let mut client = h.connect_host(b"CONNECT 1024\n");
    let (req, payload) = h.next_packet();
    assert_eq!(req.op(), Some(Op::Request));
    assert_eq!(req.src_cid, HOST_CID);
    assert_eq!(req.dst_cid, GUEST_CID);
    assert_eq!(req.dst_port, 1024);
    assert!(req.src_port >= FIRST_LOCAL_PORT);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    assert!(payload.is_empty());
    assert_ne!(h.interrupt.status() & INTERRUPT_USED_RING, 0);

    h.send(guest_hdr(Op::Response, 1024, req.src_port), &[]);
    let line = h.read_host(&mut client, b'\n');
    assert_eq!(line, format!("OK {}\n", req.src_port).into_bytes());
    assert_eq!(h.connections(), 1);

    // A second client gets a different host port.
    let (_c2, port2) = h.establish(1024, 4096);
    assert_ne!(port2, req.src_port);
}

#[test]
fn connect_line_in_pieces_is_accepted() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    let mut client = h.connect_host(b"CONN");
    h.settle();
    assert!(h.inbox.is_empty());
    client.write_all(b"ECT 52\n").unwrap();
    let (req, _) = h.next_packet();
    assert_eq!((req.op(), req.dst_port), (Some(Op::Request), 52));
}

#[test]
fn data_round_trip() {
    let mut h = Harness::new();
    let (mut client, port) = h.establish(1024, 64 * 1024);

    client.write_all(b"hello").unwrap();
    let (hdr, payload) = h.next_packet();
    assert_eq!(hdr.op(), Some(Op::Rw));
    assert_eq!((hdr.src_port, hdr.dst_port), (port, 1024));
    assert_eq!(hdr.len, 5);
    assert_eq!(payload, b"hello");
    assert_eq!(hdr.buf_alloc, BUF_ALLOC);

    h.give_rx(4, 4096);
    h.send(guest_hdr(Op::Rw, 1024, port), b"world");
    assert_eq!(h.read_host_exact(&mut client, 5), b"world");
    h.collect();
    assert!(h.tx_used >= 2, "tx buffers are returned");

    // A payload bigger than one rx buffer is split across buffers.
    let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    h.give_rx(8, 4096);
    client.write_all(&big).unwrap();
    let mut got = Vec::new();
    while got.len() < big.len() {
        let (hdr, payload) = h.next_packet();
        assert_eq!(hdr.op(), Some(Op::Rw));
        assert!(payload.len() <= 4096 - HDR_LEN);
        got.extend(payload);
    }
    assert_eq!(got, big);
}

#[test]
fn guest_rst_closes_the_host_socket() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    let mut client = h.connect_host(b"CONNECT 1024\n");
    let (req, _) = h.next_packet();
    h.send(guest_hdr(Op::Rst, 1024, req.src_port), &[]);
    h.wait_host_eof(&mut client);
    assert_eq!(h.connections(), 0);
    h.settle();
    assert!(h.inbox.is_empty(), "no reset is sent back for a reset");
}

#[test]
fn malformed_connect_lines_close_the_socket() {
    let mut h = Harness::new();
    h.give_rx(4, 4096);
    let long = vec![b'A'; 100];
    for line in [&b"HELLO\n"[..], b"CONNECT abc\n", b"CONNECT 1 2\n", &long] {
        let mut client = h.connect_host(line);
        h.wait_host_eof(&mut client);
    }
    h.settle();
    assert!(h.inbox.is_empty(), "the guest never heard of them");
    assert_eq!(h.connections(), 0);
}

#[test]
fn host_to_guest_respects_the_guest_credit() {
    let mut h = Harness::with_timeout(Some(Duration::from_millis(100)));
    let (mut client, port) = h.establish(1024, 1000);
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    client.write_all(&data).unwrap();
    h.give_rx(16, 4096);
    h.settle();
    let mut got = Vec::new();
    for (hdr, payload) in h.inbox.drain(..) {
        assert_eq!(hdr.op(), Some(Op::Rw));
        got.extend(payload);
    }
    assert_eq!(got.len(), 1000, "exactly the guest's buf_alloc");
    // Out of credit, the device does not spin on the readable socket.
    assert_eq!(h.poll(200), 0);

    // The guest consumed 1000 bytes.
    let mut upd = guest_hdr(Op::CreditUpdate, 1024, port);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 1000;
    h.send(upd, &[]);
    h.settle();
    for (_, payload) in h.inbox.drain(..) {
        got.extend(payload);
    }
    assert_eq!(got.len(), 2000);

    // A bigger buffer lets the rest through.
    upd.buf_alloc = 1 << 20;
    upd.fwd_cnt = 2000;
    h.send(upd, &[]);
    h.give_rx(16, 4096);
    h.settle();
    for (_, payload) in h.inbox.drain(..) {
        got.extend(payload);
    }
    assert_eq!(got, data);
}

#[test]
fn no_rx_buffers_pauses_the_host_socket() {
    let mut h = Harness::with_timeout(Some(Duration::from_millis(100)));
    h.give_rx(1, 4096);
    let mut client = h.connect_host(b"CONNECT 1024\n");
    let (req, _) = h.next_packet();
    h.send(guest_hdr(Op::Response, 1024, req.src_port), &[]);
    h.read_host(&mut client, b'\n');
    client.write_all(b"pending").unwrap();
    h.settle();
    assert!(h.inbox.is_empty());
    assert_eq!(h.poll(200), 0, "no busy loop without rx buffers");
    h.give_rx(1, 4096);
    let (hdr, payload) = h.next_packet();
    assert_eq!(hdr.op(), Some(Op::Rw));
    assert_eq!(payload, b"pending");
}

#[test]
fn credit_request_is_answered() {
    let mut h = Harness::new();
    let (_client, port) = h.establish(1024, 4096);
    h.send(guest_hdr(Op::CreditRequest, 1024, port), &[]);
    let (hdr, _) = h.next_packet();
    assert_eq!(hdr.op(), Some(Op::CreditUpdate));
    assert_eq!((hdr.buf_alloc, hdr.fwd_cnt), (BUF_ALLOC, 0));
}

#[test]
fn guest_to_host_credit_updates_and_overrun() {
    let mut h = Harness::new();
    let (mut client, port) = h.establish(1024, 64 * 1024);
    h.give_rx(32, 4096);
    // The guest sends a full buffer's worth, as its credit allows.
    let chunk = vec![0x5au8; 64 * 1024];
    for _ in 0..BUF_ALLOC as usize / chunk.len() {
        h.send(guest_hdr(Op::Rw, 1024, port), &chunk);
    }
    h.settle();
    assert_eq!(h.connections(), 1, "within credit");
    let got = h.read_host_exact(&mut client, BUF_ALLOC as usize);
    assert!(got.iter().all(|&b| b == 0x5a));
    // Everything was forwarded: the guest, which used up all its credit,
    // learns that most of the buffer is free again.
    h.wait_for("a credit update", |h| {
        h.inbox
            .iter()
            .any(|(hdr, _)| {
                hdr.op() == Some(Op::CreditUpdate)
                    && hdr.fwd_cnt >= BUF_ALLOC - CREDIT_UPDATE_THRESHOLD
                    && hdr.fwd_cnt <= BUF_ALLOC
            })
            .then_some(())
    });

    // A guest ignoring its credit while the host does not read gets reset.
    h.inbox.clear();
    for _ in 0..32 {
        h.send(guest_hdr(Op::Rw, 1024, port), &chunk);
        h.poll(0);
    }
    h.settle();
    assert!(
        h.inbox.iter().any(|(hdr, _)| hdr.op() == Some(Op::Rst)),
        "overrun is reset"
    );
    assert_eq!(h.connections(), 0);
    h.wait_host_eof(&mut client);
}

#[test]
fn truncated_and_lying_packets_are_dropped() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let (_client, port) = h.establish(1024, 4096);
    h.inbox.clear();

    // Shorter than a header.
    h.send_raw(&[0u8; 20]);
    // A header whose len claims more than the chain holds.
    let mut lying = guest_hdr(Op::Rw, 1024, port);
    lying.len = 100;
    let mut bytes = lying.encode().to_vec();
    bytes.extend_from_slice(&[1u8; 10]);
    h.send_raw(&bytes);
    // A header claiming a giant payload.
    lying.len = u32::MAX;
    h.send_raw(&lying.encode());
    // An empty chain and a chain of only device-writable buffers.
    let a = h.arena.alloc(64);
    h.send_raw_chain(&[(a, 0, false)]);
    h.send_raw_chain(&[(a, 64, true)]);
    h.settle();
    assert_eq!(h.tx_used, 1 + 5, "every chain is returned");
    assert!(h.inbox.is_empty(), "nothing is answered");
    assert_eq!(h.connections(), 1, "the connection survives");

    // The device still works.
    h.send(guest_hdr(Op::CreditRequest, 1024, port), &[]);
    assert_eq!(h.next_packet().0.op(), Some(Op::CreditUpdate));
}

#[test]
fn header_split_across_descriptors() {
    let mut h = Harness::new();
    let (mut client, port) = h.establish(1024, 4096);
    let mut hdr = guest_hdr(Op::Rw, 1024, port);
    hdr.len = 6;
    let mut bytes = hdr.encode().to_vec();
    bytes.extend_from_slice(b"abcdef");
    let (a, b, c) = (h.arena.alloc(20), h.arena.alloc(30), h.arena.alloc(10));
    h.mem.write_slice(&bytes[..20], GuestAddress(a)).unwrap();
    h.mem.write_slice(&bytes[20..48], GuestAddress(b)).unwrap();
    h.mem.write_slice(&bytes[48..], GuestAddress(c)).unwrap();
    h.send_raw_chain(&[(a, 20, false), (b, 28, false), (c, 2, false)]);
    assert_eq!(h.read_host_exact(&mut client, 6), b"abcdef");
}

#[test]
fn rx_buffers_too_small_are_skipped() {
    let mut h = Harness::new();
    for len in [16, HDR_LEN as u32, 4096] {
        let addr = h.arena.alloc(len);
        let head = h.rx.add_chain(&h.mem, &[(addr, len, true)]);
        h.rx_bufs.insert(head, (addr, len));
    }
    // A readable-only "rx" buffer is no use either.
    let addr = h.arena.alloc(4096);
    let head = h.rx.add_chain(&h.mem, &[(addr, 4096, false)]);
    h.rx_bufs.insert(head, (addr, 4096));
    h.send(guest_hdr(Op::Rw, 4000, 5000), b"data");
    assert_rst(&h.next_packet().0, 5000, 4000);
    assert_eq!(h.rx_skipped, 2);
    h.give_rx(1, 4096);
    h.send(guest_hdr(Op::Rw, 4001, 5000), b"data");
    assert_rst(&h.next_packet().0, 5000, 4001);
    assert_eq!(h.rx_skipped, 3);
}

#[test]
fn interrupts_only_for_used_buffers() {
    let mut h = Harness::new();
    let (mut client, _) = h.establish(1024, 4096);
    h.settle();
    let irq = h.interrupt.line().eventfd().try_clone().unwrap();
    let _ = irq.read();
    // Kicks with nothing to do: no interrupt.
    h.give_rx(4, 4096);
    kick(&h.dev, 1);
    h.settle();
    assert!(irq.read().is_err(), "no used buffers, no interrupt");
    client.write_all(b"x").unwrap();
    h.next_packet();
    assert!(irq.read().unwrap() >= 1);
}

#[test]
fn unknown_connections_and_ops_are_reset() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    h.send(guest_hdr(Op::Rw, 4000, 5000), b"data");
    let (rst, _) = h.next_packet();
    assert_rst(&rst, 5000, 4000);
    assert_eq!(rst.src_cid, HOST_CID);

    // Unsupported socket type.
    let mut seq = guest_hdr(Op::Request, 4001, 5000);
    seq.type_ = 2;
    h.send(seq, &[]);
    assert_rst(&h.next_packet().0, 5000, 4001);

    // Another CID: the reset comes from it.
    let mut other = guest_hdr(Op::Request, 4002, 5000);
    other.dst_cid = 7;
    h.send(other, &[]);
    let (rst, _) = h.next_packet();
    assert_rst(&rst, 5000, 4002);
    assert_eq!(rst.src_cid, 7);

    // A foreign source CID is dropped outright.
    let mut spoofed = guest_hdr(Op::Request, 4003, 5000);
    spoofed.src_cid = 9;
    h.send(spoofed, &[]);
    h.settle();
    assert!(h.inbox.is_empty());

    // An unknown op on a live connection resets it.
    let (mut client, port) = h.establish(1024, 4096);
    let mut bad = guest_hdr(Op::Rw, 1024, port);
    bad.op = 99;
    h.send(bad, &[]);
    assert_rst(&h.next_packet().0, port, 1024);
    h.wait_host_eof(&mut client);
    assert_eq!(h.connections(), 0);
}

#[test]
fn guest_initiated_connection() {
    let mut h = Harness::new();
    h.give_rx(8, 4096);
    let listener = UnixListener::bind(format!("{}_5000", h.uds.display())).unwrap();

    h.send(guest_hdr(Op::Request, 777, 5000), &[]);
    let (resp, _) = h.next_packet();
    assert_eq!(resp.op(), Some(Op::Response));
    assert_eq!((resp.src_port, resp.dst_port), (5000, 777));
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, GUEST_CID));
    let (mut host, _) = listener.accept().unwrap();
    host.set_nonblocking(true).unwrap();

    h.send(guest_hdr(Op::Rw, 777, 5000), b"ping");
    assert_eq!(h.read_host_exact(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    let (hdr, payload) = h.next_packet();
    assert_eq!((hdr.op(), payload.as_slice()), (Some(Op::Rw), &b"pong"[..]));

    // Nobody listens on port 5001.
    h.send(guest_hdr(Op::Request, 778, 5001), &[]);
    assert_rst(&h.next_packet().0, 5001, 778);
}

#[test]
fn unanswered_connect_times_out() {
    let mut h = Harness::with_timeout(Some(Duration::from_millis(100)));
    h.give_rx(4, 4096);
    let mut client = h.connect_host(b"CONNECT 1024\n");
    let (req, _) = h.next_packet();
    let start = Instant::now();
    h.wait_host_eof(&mut client);
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_rst(&h.next_packet().0, req.src_port, 1024);
    assert_eq!(h.connections(), 0);

    // A client that never finishes its line is dropped too.
    let mut idle = h.connect_host(b"CONN");
    h.wait_host_eof(&mut idle);
}

#[test]
fn connect_before_rx_buffers_times_out_silently() {
    let mut h = Harness::with_timeout(Some(Duration::from_millis(100)));
    let mut client = h.connect_host(b"CONNECT 1024\n");
    h.wait_host_eof(&mut client);
    h.give_rx(4, 4096);
    h.settle();
    assert!(h.inbox.is_empty(), "the guest never saw the request");
}

#[test]
fn guest_shutdown_flushes_then_closes() {
    let mut h = Harness::new();
    let (mut client, port) = h.establish(1024, 4096);
    h.give_rx(4, 4096);
    h.send(guest_hdr(Op::Rw, 1024, port), b"last words");
    let mut shut = guest_hdr(Op::Shutdown, 1024, port);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(shut, &[]);
    assert_eq!(h.read_host_exact(&mut client, 10), b"last words");
    h.wait_host_eof(&mut client);
    assert_rst(&h.next_packet().0, port, 1024);
    assert_eq!(h.connections(), 0);
}

#[test]
fn guest_half_close_keeps_the_other_direction() {
    let mut h = Harness::new();
    let (mut client, port) = h.establish(1024, 4096);
    h.give_rx(4, 4096);
    let mut shut = guest_hdr(Op::Shutdown, 1024, port);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, &[]);
    h.wait_host_eof(&mut client);
    client.write_all(b"reply").unwrap();
    let (hdr, payload) = h.next_packet();
    assert_eq!(
        (hdr.op(), payload.as_slice()),
        (Some(Op::Rw), &b"reply"[..])
    );
    // The host finishes too: both directions are done.
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let (hdr, _) = h.next_packet();
    assert!(
        matches!(hdr.op(), Some(Op::Shutdown) | Some(Op::Rst)),
        "{hdr:?}"
    );
    h.wait_for("the connection to go", |h| {
        (h.connections() == 0).then_some(())
    });
}

#[test]
fn host_close_delivers_data_then_resets() {
    let mut h = Harness::new();
    let (mut client, port) = h.establish(1024, 4096);
    h.give_rx(4, 4096);
    client.write_all(b"bye").unwrap();
    drop(client);
    let (hdr, payload) = h.next_packet();
    assert_eq!((hdr.op(), payload.as_slice()), (Some(Op::Rw), &b"bye"[..]));
    assert_rst(&h.next_packet().0, port, 1024);
    assert_eq!(h.connections(), 0);
}

#[test]
fn host_half_close_sends_shutdown() {
    let mut h = Harness::new();
    let (mut client, port) = h.establish(1024, 4096);
    h.give_rx(4, 4096);
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let (hdr, _) = h.next_packet();
    assert_eq!(hdr.op(), Some(Op::Shutdown));
    assert_eq!(hdr.flags, SHUTDOWN_SEND);
    // The guest can still answer.
    h.send(guest_hdr(Op::Rw, 1024, port), b"late");
    assert_eq!(h.read_host_exact(&mut client, 4), b"late");
    let mut shut = guest_hdr(Op::Shutdown, 1024, port);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, &[]);
    assert_rst(&h.next_packet().0, port, 1024);
    h.wait_host_eof(&mut client);
    assert_eq!(h.connections(), 0);
}

#[test]
fn reset_drops_connections_but_keeps_listening() {
    let mut h = Harness::new();
    let (mut client, _) = h.establish(1024, 4096);
    h.dev.lock().unwrap().reset();
    h.wait_host_eof(&mut client);
    assert_eq!(h.connections(), 0);
    // New host clients are still accepted (and wait for the driver).
    let _c = UnixStream::connect(&h.uds).unwrap();
}

#[test]
fn many_connections_get_distinct_ports() {
    let mut h = Harness::new();
    h.give_rx(64, 4096);
    let mut ports = std::collections::HashSet::new();
    let mut clients = Vec::new();
    for _ in 0..20 {
        let (c, p) = h.establish(1024, 4096);
        assert!(ports.insert(p));
        clients.push(c);
    }
    assert_eq!(h.connections(), 20);
    drop(clients);
    h.give_rx(64, 4096);
    h.wait_for("all connections to go", |h| {
        (h.connections() == 0).then_some(())
    });
}
