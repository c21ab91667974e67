//! Blocking frame I/O over `std::io` streams.

use std::io::{self, Read, Write};

use serde::Serialize;

use crate::codec::encode_frame;
use crate::frame::{FrameDecoder, FrameError, MAX_FRAME_LEN};

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
    buf: Box<[u8]>,
}

impl<R: Read> FrameReader<R> {
    /// Reads frames of up to [`MAX_FRAME_LEN`] bytes from `inner`.
    pub fn new(inner: R) -> Self {
        Self::with_limit(inner, MAX_FRAME_LEN)
    }

    /// Reads frames of up to `max` bytes from `inner`.
    pub fn with_limit(inner: R, max: usize) -> Self {
        FrameReader {
            inner,
            decoder: FrameDecoder::new(max),
            buf: vec![0u8; 64 * 1024].into_boxed_slice(),
        }
    }

    /// The next frame's payload (or its framing error); `Ok(None)` when the
    /// stream ended cleanly between frames.
    pub fn read_payload(&mut self) -> io::Result<Option<Result<Vec<u8>, FrameError>>> {
        loop {
            if let Some(frame) = self.decoder.next_frame() {
                return Ok(Some(frame));
            }
            let n = match self.inner.read(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                if self.decoder.buffered() > 0 || self.decoder.is_skipping() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stream ended inside a frame",
                    ));
                }
                return Ok(None);
            }
            self.decoder.push(&self.buf[..n]);
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

/// Encodes `msg` as one frame and writes it whole.
pub fn write_message<W: Write + ?Sized, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let bytes = encode_frame(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    w.write_all(&bytes)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode_host_frame;
    use crate::message::{HostFrame, Request};

    #[test]
    fn reads_frames_then_clean_eof() {
        let mut wire = Vec::new();
        for nonce in 0..3 {
            write_message(
                &mut wire,
                &HostFrame {
                    id: nonce,
                    request: Request::Ping { nonce },
                },
            )
            .unwrap();
        }
        let mut r = FrameReader::new(&wire[..]);
        for nonce in 0..3 {
            let p = r.read_payload().unwrap().unwrap().unwrap();
            assert_eq!(decode_host_frame(&p).unwrap().request, Request::Ping { nonce });
        }
        assert!(r.read_payload().unwrap().is_none());
    }

    #[test]
    fn eof_inside_a_frame_is_an_error() {
        let wire = [10u8, 0, 0, 0, 1, 2];
        let mut r = FrameReader::new(&wire[..]);
        let err = r.read_payload().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
