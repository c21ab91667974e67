//! The virtio-vsock packet header (virtio 1.2, 5.10.6), parsed defensively.

pub use warren_virtio_spec::vsock::{op, HDR_LEN, TYPE_STREAM};

/// Largest payload accepted in one packet from the guest.
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// A packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub kind: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (shutdown directions).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

/// Why a header from the guest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer than [`HDR_LEN`] bytes.
    #[error("packet header truncated ({0} bytes)")]
    Truncated(usize),
    /// Not a stream packet.
    #[error("unsupported socket type {0}")]
    Type(u16),
    /// Payload too large, or larger than what the descriptors hold.
    #[error("payload length {len} invalid (at most {max})")]
    Length {
        /// Announced length.
        len: u32,
        /// What is allowed here.
        max: u32,
    },
    /// Source is not the guest's own CID.
    #[error("source CID {0} is not the guest's")]
    SourceCid(u64),
}

impl Header {
    /// Parses a header; `available` is how many payload bytes the chain
    /// really carries after the header.
    pub fn parse(bytes: &[u8], available: usize, guest_cid: u64) -> Result<Header, PacketError> {
        if bytes.len() < HDR_LEN {
            return Err(PacketError::Truncated(bytes.len()));
        }
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().expect("2 bytes"));
        let h = Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        };
        if h.kind != TYPE_STREAM {
            return Err(PacketError::Type(h.kind));
        }
        let max = MAX_PAYLOAD.min(available.try_into().unwrap_or(u32::MAX));
        if h.len > max {
            return Err(PacketError::Length { len: h.len, max });
        }
        if h.src_cid != guest_cid {
            return Err(PacketError::SourceCid(h.src_cid));
        }
        Ok(h)
    }

    /// The header's wire bytes.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 1024,
            len: 10,
            kind: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn round_trips() {
        let h = sample();
        assert_eq!(Header::parse(&h.to_bytes(), 10, 3), Ok(h));
    }

    #[test]
    fn refuses_hostile_headers() {
        let h = sample();
        assert_eq!(
            Header::parse(&h.to_bytes()[..43], 10, 3),
            Err(PacketError::Truncated(43))
        );
        assert!(matches!(
            Header::parse(&h.to_bytes(), 9, 3),
            Err(PacketError::Length { len: 10, max: 9 })
        ));
        let big = Header {
            len: MAX_PAYLOAD + 1,
            ..h
        };
        assert!(matches!(
            Header::parse(&big.to_bytes(), usize::MAX, 3),
            Err(PacketError::Length { .. })
        ));
        let dgram = Header { kind: 2, ..h };
        assert_eq!(Header::parse(&dgram.to_bytes(), 10, 3), Err(PacketError::Type(2)));
        assert_eq!(Header::parse(&h.to_bytes(), 10, 4), Err(PacketError::SourceCid(3)));
    }
}
