//! Test support: the driver side of a split virtqueue in real guest memory,
//! for device tests that play the guest.

use std::sync::Mutex;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::VirtioDevice;

pub const QSIZE: u16 = 256;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Guest addresses for test buffers, 16-byte aligned, handed out from
/// `start` and again from `start` once `end` is reached (the buffers there
/// have long been used by then).
pub struct Arena {
    start: u64,
    next: u64,
    end: u64,
}

impl Arena {
    pub fn new(start: u64, end: u64) -> Self {
        Self {
            start,
            next: start,
            end,
        }
    }

    pub fn alloc(&mut self, len: u32) -> u64 {
        if self.next + u64::from(len) > self.end {
            self.next = self.start;
        }
        let addr = self.next;
        self.next += u64::from(len).next_multiple_of(16);
        addr
    }
}

/// Notifies queue `queue` of `device`, as the driver's QueueNotify write does.
pub fn kick(device: &Mutex<impl VirtioDevice>, queue: usize) {
    device.lock().unwrap().queue_events()[queue]
        .write(1)
        .unwrap();
}

/// The driver side of one split virtqueue.
pub struct FakeQueue {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl FakeQueue {
    pub fn new(base: u64) -> Self {
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Publishes a chain of (addr, len, device-writable) buffers; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QSIZE;
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let d = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(self.next_desc, GuestAddress(d + 14)).unwrap();
        }
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Publishes `n` device-writable buffers of `len` bytes from `arena`,
    /// one chain each; returns each one's (head, address).
    pub fn add_writable(
        &mut self,
        mem: &GuestMemoryMmap,
        arena: &mut Arena,
        n: usize,
        len: u32,
    ) -> Vec<(u16, u64)> {
        (0..n)
            .map(|_| {
                let addr = arena.alloc(len);
                (self.add_chain(mem, &[(addr, len, true)]), addr)
            })
            .collect()
    }

    /// Used-ring entries (head, len) not seen yet.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
