//! The virtio-vsock packet header (virtio 1.2 spec, section 5.10.6): 44
//! little-endian bytes in front of every packet on the rx and tx queues.

/// Size of the header on the wire.
pub const HDR_LEN: usize = 44;

/// The only socket type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// The host's CID as seen by the guest.
pub const HOST_CID: u64 = 2;

/// Largest payload of a single packet, in either direction (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// `flags` bits of an OP_SHUTDOWN: the sender will not receive any more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `flags` bits of an OP_SHUTDOWN: the sender will not send any more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    pub fn from_raw(op: u16) -> Option<Self> {
        Some(match op {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("packet header needs {HDR_LEN} bytes, the buffer has {0}")]
    TooShort(usize),
}

/// `struct virtio_vsock_hdr`, decoded. `op` stays raw so that unknown
/// operations can be reported (and answered with a reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl PacketHeader {
    pub fn op(&self) -> Option<Op> {
        Op::from_raw(self.op)
    }

    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes the first `HDR_LEN` bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, PacketError> {
        let b: &[u8; HDR_LEN] = bytes
            .get(..HDR_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(PacketError::TooShort(bytes.len()))?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i + 4)) << 32) | u64::from(u32_at(i));
        Ok(Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec() {
        let hdr = PacketHeader {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 3,
            src_port: 0x1122_3344,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: 0xa0b0_c0d0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 77,
        };
        let b = hdr.encode();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[8..16], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[20..24], &[0, 4, 0, 0]);
        assert_eq!(&b[24..28], &[5, 0, 0, 0]);
        assert_eq!(&b[28..30], &[1, 0]);
        assert_eq!(&b[30..32], &[5, 0]);
        assert_eq!(&b[32..36], &[0xd0, 0xc0, 0xb0, 0xa0]);
        assert_eq!(&b[36..40], &[0, 0, 4, 0]);
        assert_eq!(&b[40..44], &[77, 0, 0, 0]);
        assert_eq!(PacketHeader::decode(&b), Ok(hdr));
        assert_eq!(hdr.op(), Some(Op::Rw));
    }

    #[test]
    fn short_buffers_are_rejected() {
        assert_eq!(
            PacketHeader::decode(&[0u8; 43]),
            Err(PacketError::TooShort(43))
        );
        assert!(PacketHeader::decode(&[0u8; 50]).is_ok());
    }

    #[test]
    fn unknown_ops_stay_raw() {
        let hdr = PacketHeader {
            op: 42,
            ..Default::default()
        };
        assert_eq!(hdr.op(), None);
        assert_eq!(PacketHeader::decode(&hdr.encode()).map(|h| h.op), Ok(42));
    }
}
