//! Length-prefixed framing, independent of the transport.
//!
//! [`FrameDecoder`] is fed whatever bytes the transport delivered and hands
//! back whole payloads. A header announcing more than the decoder's maximum is
//! reported once and its payload is then skipped as it arrives, so one bad
//! frame costs an error reply, not the connection.

use alloc::vec::Vec;

/// Bytes in the length header.
pub const HEADER_LEN: usize = 4;

/// Largest payload accepted by default (1 MiB).
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// A framing-level failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The header announced a payload larger than the decoder accepts.
    TooLarge {
        /// Length announced by the header.
        len: u32,
        /// The decoder's limit.
        max: usize,
    },
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max} bytes")
            }
        }
    }
}

/// Puts the header in front of `payload`.
pub fn write_header(out: &mut Vec<u8>, payload_len: usize) {
    // Callers check `payload_len` against the limit before calling; the
    // limit is far below u32::MAX.
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
}

/// Incremental frame decoder.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of an oversized payload still to be discarded.
    skipping: u64,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// A decoder that accepts payloads of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            skipping: 0,
            max,
        }
    }

    /// Appends bytes received from the transport.
    pub fn push(&mut self, mut bytes: &[u8]) {
        if self.skipping > 0 {
            let n = core::cmp::min(self.skipping, bytes.len() as u64) as usize;
            self.skipping -= n as u64;
            bytes = &bytes[n..];
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// True while the payload of an oversized frame is being discarded.
    pub fn is_skipping(&self) -> bool {
        self.skipping > 0
    }

    /// The next complete payload, an error for an oversized frame, or `None`
    /// when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        if self.skipping > 0 || self.buf.len() < HEADER_LEN {
            return None;
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        if len as usize > self.max {
            // Discard what of the payload is already here; the rest is
            // dropped by `push` as it arrives.
            let have = self.buf.len() - HEADER_LEN;
            let drop_now = core::cmp::min(have, len as usize);
            self.buf.drain(..HEADER_LEN + drop_now);
            self.skipping = len as u64 - drop_now as u64;
            return Some(Err(FrameError::TooLarge { len, max: self.max }));
        }
        let total = HEADER_LEN + len as usize;
        if self.buf.len() < total {
            return None;
        }
        let payload = self.buf[HEADER_LEN..total].to_vec();
        self.buf.drain(..total);
        Some(Ok(payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_header(&mut v, payload.len());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn whole_frame_in_one_push() {
        let mut d = FrameDecoder::default();
        d.push(&framed(b"hello"));
        assert_eq!(d.next_frame(), Some(Ok(b"hello".to_vec())));
        assert_eq!(d.next_frame(), None);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn frame_split_byte_by_byte() {
        let mut d = FrameDecoder::default();
        let bytes = framed(b"split me");
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(d.next_frame(), None, "frame complete too early at byte {i}");
            d.push(&[*b]);
        }
        assert_eq!(d.next_frame(), Some(Ok(b"split me".to_vec())));
    }

    #[test]
    fn several_frames_in_one_push() {
        let mut d = FrameDecoder::default();
        let mut bytes = framed(b"a");
        bytes.extend(framed(b""));
        bytes.extend(framed(b"ccc"));
        d.push(&bytes);
        assert_eq!(d.next_frame(), Some(Ok(b"a".to_vec())));
        assert_eq!(d.next_frame(), Some(Ok(vec![])));
        assert_eq!(d.next_frame(), Some(Ok(b"ccc".to_vec())));
        assert_eq!(d.next_frame(), None);
    }

    #[test]
    fn oversized_frame_is_reported_once_and_skipped() {
        let mut d = FrameDecoder::new(8);
        let mut bytes = Vec::new();
        write_header(&mut bytes, 20);
        bytes.extend_from_slice(&[0xAA; 5]);
        d.push(&bytes);
        assert_eq!(d.next_frame(), Some(Err(FrameError::TooLarge { len: 20, max: 8 })));
        assert!(d.is_skipping());
        assert_eq!(d.next_frame(), None);
        // The remaining 15 payload bytes arrive together with a good frame.
        let mut rest = vec![0xAA; 15];
        rest.extend(framed(b"ok"));
        d.push(&rest[..7]);
        d.push(&rest[7..]);
        assert_eq!(d.next_frame(), Some(Ok(b"ok".to_vec())));
        assert!(!d.is_skipping());
    }

    #[test]
    fn limit_is_inclusive() {
        let mut d = FrameDecoder::new(3);
        d.push(&framed(b"abc"));
        assert_eq!(d.next_frame(), Some(Ok(b"abc".to_vec())));
        d.push(&framed(b"abcd"));
        assert!(matches!(d.next_frame(), Some(Err(FrameError::TooLarge { .. }))));
    }

    #[test]
    fn max_u32_header_does_not_allocate_or_panic() {
        let mut d = FrameDecoder::default();
        d.push(&u32::MAX.to_le_bytes());
        assert!(matches!(d.next_frame(), Some(Err(FrameError::TooLarge { .. }))));
        d.push(&[0; 1024]);
        assert_eq!(d.buffered(), 0);
    }
}
