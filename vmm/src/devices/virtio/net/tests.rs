//! Device-level tests: a fake guest driver owns the rx and tx queues in real
//! guest memory, the device runs on a real event manager, and the "tap" is a
//! datagram socket pair (one frame per read or write, as a tap without
//! headers behaves). Opening real taps is tested at the end, in a network
//! namespace of the test's own.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{tap, Net, TapError, ETH_HLEN, NET_HDR_LEN, RX_HEADER};
use crate::devices::irq::IrqLine;
use crate::devices::virtio::fake_driver::{kick, Arena, FakeQueue};
use crate::devices::virtio::{ActiveQueues, Interrupt, VirtioDevice, INTERRUPT_USED_RING};

const MEM_SIZE: usize = 16 << 20;
const DATA_START: u64 = 1 << 20;
const MAC: [u8; 6] = [0x02, 0x48, 0x55, 0x53, 0x4b, 0x01];
/// What Linux's virtio_net offers per rx buffer without mergeable buffers.
const RX_BUF: u32 = (NET_HDR_LEN + 1518) as u32;

struct Harness {
    em: EventManager<Arc<Mutex<Net>>>,
    dev: Arc<Mutex<Net>>,
    mem: GuestMemoryMmap,
    rx: FakeQueue,
    tx: FakeQueue,
    interrupt: Interrupt,
    /// The host's end of the "tap".
    host: UnixDatagram,
    arena: Arena,
    /// Rx buffers handed to the device, by head: (addr, len).
    rx_bufs: std::collections::HashMap<u16, (u64, u32)>,
}

/// A broadcast Ethernet frame of `len` bytes with `tag` in every byte after
/// its header.
fn frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental EtherType
    f
}

impl Harness {
    fn new() -> Self {
        let (host, device_end) = UnixDatagram::pair().unwrap();
        device_end.set_nonblocking(true).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let backend = File::from(OwnedFd::from(device_end));
        let dev = Arc::new(Mutex::new(
            Net::with_backend("test", backend, MAC, 1500).unwrap(),
        ));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let rx = FakeQueue::new(0x1_0000);
        let tx = FakeQueue::new(0x2_0000);
        let interrupt = Interrupt::new(IrqLine::new(5).unwrap());
        dev.lock()
            .unwrap()
            .activate(ActiveQueues {
                mem: mem.clone(),
                queues: vec![rx.queue(), tx.queue()],
                interrupt: interrupt.clone(),
            })
            .unwrap();
        let mut h = Self {
            em,
            dev,
            mem,
            rx,
            tx,
            interrupt,
            host,
            arena: Arena::new(DATA_START, MEM_SIZE as u64),
            rx_bufs: Default::default(),
        };
        // The kick activation gives itself.
        h.settle();
        h
    }

    /// Offers `n` rx buffers of `len` bytes and kicks the rx queue.
    fn give_rx(&mut self, n: usize, len: u32) {
        for (head, addr) in self.rx.add_writable(&self.mem, &mut self.arena, n, len) {
            self.rx_bufs.insert(head, (addr, len));
        }
        kick(&self.dev, 0);
    }

    /// Queues a frame for transmission, header and frame in separate
    /// descriptors, and kicks the tx queue.
    fn send(&mut self, frame: &[u8]) {
        let h = self.arena.alloc(NET_HDR_LEN as u32);
        let f = self.arena.alloc(frame.len() as u32);
        self.mem.write_slice(frame, GuestAddress(f)).unwrap();
        self.send_chain(&[
            (h, NET_HDR_LEN as u32, false),
            (f, frame.len() as u32, false),
        ]);
    }

    fn send_chain(&mut self, chain: &[(u64, u32, bool)]) {
        self.tx.add_chain(&self.mem, chain);
        kick(&self.dev, 1);
    }

    /// Runs the event loop until it is idle for 50 ms; returns how many
    /// events it dispatched.
    fn settle(&mut self) -> usize {
        let mut total = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self.em.run_with_timeout(50).unwrap();
            if n == 0 {
                return total;
            }
            total += n;
            assert!(Instant::now() < deadline, "the event loop never went idle");
        }
    }

    /// Frames delivered into rx buffers since the last call, without their
    /// headers (checked), plus how many buffers came back empty.
    fn received(&mut self) -> (Vec<Vec<u8>>, usize) {
        let mut frames = Vec::new();
        let mut empty = 0;
        for (head, len) in self.rx.take_used(&self.mem) {
            let (addr, cap) = self.rx_bufs.remove(&head).expect("unknown rx head");
            if len == 0 {
                empty += 1;
                continue;
            }
            assert!(
                len as usize >= NET_HDR_LEN + ETH_HLEN && len <= cap,
                "used len {len}"
            );
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            assert_eq!(bytes[..NET_HDR_LEN], RX_HEADER);
            frames.push(bytes[NET_HDR_LEN..].to_vec());
        }
        (frames, empty)
    }

    /// What reached the host side of the tap, without waiting.
    fn host_frames(&self) -> Vec<Vec<u8>> {
        self.host.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = self.host.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    fn dropped(&self) -> u64 {
        self.dev.lock().unwrap().dropped_frames()
    }
}

#[test]
fn config_space_carries_mac_and_mtu() {
    let h = Harness::new();
    let dev = h.dev.lock().unwrap();
    assert_eq!(dev.device_type(), crate::devices::virtio::TYPE_NET);
    assert_eq!(dev.queue_max_sizes().len(), 2);
    let features = dev.features();
    assert_ne!(features & super::VIRTIO_NET_F_MAC, 0);
    assert_ne!(features & super::VIRTIO_NET_F_MTU, 0);
    // No offloads: no CSUM (bit 0), GUEST_CSUM (1), TSO/UFO (7..=14), MRG_RXBUF (15).
    assert_eq!(
        features & 0xffff & !(super::VIRTIO_NET_F_MAC | super::VIRTIO_NET_F_MTU),
        0
    );
    let mut mac = [0u8; 6];
    dev.read_config(0, &mut mac);
    assert_eq!(mac, MAC);
    let mut mtu = [0u8; 2];
    dev.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 1500);
    let mut past = [0xffu8; 4];
    dev.read_config(12, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn guest_frames_reach_the_tap_without_their_header() {
    let mut h = Harness::new();
    let small = frame(60, 1);
    let big = frame(1514, 2);
    h.send(&small);
    // Header and frame in one descriptor, as Linux sends with VERSION_1.
    let a = h.arena.alloc((NET_HDR_LEN + big.len()) as u32);
    h.mem
        .write_slice(&big, GuestAddress(a + NET_HDR_LEN as u64))
        .unwrap();
    h.send_chain(&[(a, (NET_HDR_LEN + big.len()) as u32, false)]);
    h.settle();
    assert_eq!(h.host_frames(), vec![small, big]);
    let used = h.tx.take_used(&h.mem);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![0, 0]);
    assert_ne!(h.interrupt.status() & INTERRUPT_USED_RING, 0);
    assert_eq!(h.dropped(), 0);
}

#[test]
fn tap_frames_fill_the_guests_rx_buffers_in_order() {
    let mut h = Harness::new();
    h.give_rx(4, RX_BUF);
    h.settle();
    let sent: Vec<Vec<u8>> = (0..3).map(|i| frame(64 + 500 * i, i as u8)).collect();
    for f in &sent {
        h.host.send(f).unwrap();
    }
    h.settle();
    let (frames, empty) = h.received();
    assert_eq!((frames, empty), (sent, 0));
    assert_ne!(h.interrupt.status() & INTERRUPT_USED_RING, 0);
}

#[test]
fn frames_wait_in_the_tap_until_the_guest_offers_buffers() {
    let mut h = Harness::new();
    let sent: Vec<Vec<u8>> = (0..5).map(|i| frame(100, i)).collect();
    for f in &sent {
        h.host.send(f).unwrap();
    }
    // No buffers: the device stops watching the tap instead of spinning on it.
    h.settle();
    assert_eq!(
        h.em.run_with_timeout(100).unwrap(),
        0,
        "the loop spins on the tap"
    );
    assert_eq!(h.received().0.len(), 0);
    // Two buffers: two frames; the rest wait for the next kick.
    h.give_rx(2, RX_BUF);
    h.settle();
    assert_eq!(h.received().0, sent[..2]);
    assert_eq!(
        h.em.run_with_timeout(100).unwrap(),
        0,
        "the loop spins on the tap"
    );
    h.give_rx(8, RX_BUF);
    h.settle();
    assert_eq!(h.received().0, sent[2..]);
    // With buffers left over, a new frame goes straight in.
    h.host.send(&sent[0]).unwrap();
    h.settle();
    assert_eq!(h.received().0, sent[..1]);
    assert_eq!(h.dropped(), 0);
}

#[test]
fn malformed_tx_chains_cost_one_frame_each() {
    let mut h = Harness::new();
    let good = frame(80, 7);
    let g = h.arena.alloc(NET_HDR_LEN as u32 + 80);
    h.mem
        .write_slice(&good, GuestAddress(g + NET_HDR_LEN as u64))
        .unwrap();
    // Device-writable: nothing to read.
    h.send_chain(&[(g, NET_HDR_LEN as u32 + 80, true)]);
    // A header and half an Ethernet header.
    h.send_chain(&[(g, NET_HDR_LEN as u32 + 7, false)]);
    // Outside guest memory.
    h.send_chain(&[(MEM_SIZE as u64 - 8, 4096, false)]);
    // Larger than any frame (and than guest memory).
    h.send_chain(&[(g, u32::MAX, false), (g, u32::MAX, false)]);
    // An empty chain.
    h.send_chain(&[(g, 0, false)]);
    // The readable part is the frame; the writable rest is ignored.
    h.send_chain(&[(g, NET_HDR_LEN as u32 + 80, false), (g, 64, true)]);
    h.settle();
    assert_eq!(h.host_frames(), vec![good]);
    assert_eq!(h.tx.take_used(&h.mem).len(), 6, "every chain is returned");
    assert_eq!(h.dropped(), 5);
}

#[test]
fn malformed_rx_buffers_are_returned_empty_and_frames_kept() {
    let mut h = Harness::new();
    // Read-only, outside memory, too short for a header and an Ethernet header.
    let a = h.arena.alloc(RX_BUF);
    let head = h.rx.add_chain(&h.mem, &[(a, RX_BUF, false)]);
    h.rx_bufs.insert(head, (a, RX_BUF));
    let head =
        h.rx.add_chain(&h.mem, &[(MEM_SIZE as u64 - 8, RX_BUF, true)]);
    h.rx_bufs.insert(head, (0, RX_BUF));
    let b = h.arena.alloc(20);
    let head = h.rx.add_chain(&h.mem, &[(b, 20, true)]);
    h.rx_bufs.insert(head, (b, 20));
    kick(&h.dev, 0);
    let sent = frame(200, 3);
    h.host.send(&sent).unwrap();
    h.settle();
    assert_eq!(h.received(), (vec![], 3));
    // The frame was not lost to the bad buffers.
    h.give_rx(1, RX_BUF);
    h.settle();
    assert_eq!(h.received(), (vec![sent], 0));
    assert_eq!(h.dropped(), 3);
}

#[test]
fn a_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept() {
    let mut h = Harness::new();
    h.give_rx(1, (NET_HDR_LEN + 100) as u32);
    h.settle();
    let (big, small) = (frame(1514, 1), frame(100, 2));
    h.host.send(&big).unwrap();
    h.host.send(&small).unwrap();
    h.settle();
    assert_eq!(h.received(), (vec![small], 0));
    assert_eq!(h.dropped(), 1);
}

#[test]
fn a_buffer_split_across_descriptors_takes_a_frame() {
    let mut h = Harness::new();
    let (a, b) = (h.arena.alloc(NET_HDR_LEN as u32), h.arena.alloc(1518));
    let head =
        h.rx.add_chain(&h.mem, &[(a, NET_HDR_LEN as u32, true), (b, 1518, true)]);
    kick(&h.dev, 0);
    let sent = frame(1514, 9);
    h.host.send(&sent).unwrap();
    h.settle();
    let used = h.rx.take_used(&h.mem);
    assert_eq!(used, vec![(head, (NET_HDR_LEN + 1514) as u32)]);
    let mut got = vec![0u8; 1514];
    h.mem.read_slice(&mut got, GuestAddress(b)).unwrap();
    assert_eq!(got, sent);
}

#[test]
fn a_reset_device_ignores_kicks_and_the_tap() {
    let mut h = Harness::new();
    h.give_rx(2, RX_BUF);
    h.dev.lock().unwrap().reset();
    h.host.send(&frame(100, 1)).unwrap();
    h.send(&frame(100, 2));
    h.settle();
    assert_eq!(
        h.em.run_with_timeout(100).unwrap(),
        0,
        "the loop spins on the tap"
    );
    assert!(h.host_frames().is_empty());
    assert!(h.rx.take_used(&h.mem).is_empty());
}

#[test]
fn a_missing_tap_is_an_error_not_a_new_tap() {
    let name = format!("husknone{}", std::process::id() % 100_000);
    match tap::open(&name) {
        Err(TapError::NotFound(n)) => assert_eq!(n, name),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(nix::net::if_::if_nametoindex(name.as_str()).is_err());
    assert!(matches!(
        tap::open("a-name-too-long-for-linux"),
        Err(TapError::BadName(_))
    ));
}

/// Creates a persistent tap (or tun) named `name` in the calling thread's
/// network namespace, as `ip tuntap add` does.
fn create_persistent(name: &str, kind: libc::c_int) {
    use std::os::fd::AsRawFd;
    nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut req = tap::IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (kind | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads one ifreq from `req`, which outlives the call.
    unsafe { tap::tun_set_iff(file.as_raw_fd(), &req) }.unwrap();
    // SAFETY: TUNSETPERSIST takes an int by value.
    unsafe { tun_set_persist(file.as_raw_fd(), 1) }.unwrap();
}

#[test]
fn attaches_to_an_existing_tap_once() {
    // A network namespace of this thread's own: whatever is created here
    // goes away with the thread.
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare a network namespace (run the tests as root)");
        create_persistent("husktap0", libc::IFF_TAP);
        create_persistent("husktun0", libc::IFF_TUN);
        let first = tap::open("husktap0").expect("attach to the tap");
        match tap::open("husktap0") {
            Err(TapError::Attach { reason, .. }) => assert!(reason.contains("already attached")),
            other => panic!("a second attach: {other:?}"),
        }
        drop(first);
        let again = tap::open("husktap0").expect("attach again after the first closed");
        let net = Net::with_backend("husktap0", again, MAC, 1500).unwrap();
        drop(net);
        match tap::open("husktun0") {
            Err(TapError::Attach { reason, .. }) => {
                assert!(reason.contains("not a single-queue tap"))
            }
            other => panic!("attaching to a tun: {other:?}"),
        }
        // `lo` exists but is no tun/tap at all.
        assert!(matches!(tap::open("lo"), Err(TapError::Attach { .. })));
    })
    .join()
    .unwrap();
}
