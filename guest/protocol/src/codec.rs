//! Encoding messages into frames and decoding frame payloads into messages.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::frame::{write_header, HEADER_LEN, MAX_FRAME_LEN};
use crate::message::{ErrorKind, ErrorReply, GuestFrame, HostFrame, Request, RequestId};

/// A message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// The encoded payload exceeds [`MAX_FRAME_LEN`].
    TooLarge {
        /// Encoded payload size.
        len: usize,
    },
    /// Serialization itself failed.
    Serialize(String),
}

impl core::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EncodeError::TooLarge { len } => write!(
                f,
                "encoded message of {len} bytes exceeds the frame limit of {MAX_FRAME_LEN} bytes"
            ),
            EncodeError::Serialize(e) => write!(f, "cannot encode message: {e}"),
        }
    }
}

/// A frame payload could not be decoded into a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The request id, when the payload was readable that far.
    pub id: Option<RequestId>,
    /// [`ErrorKind::MalformedFrame`] or [`ErrorKind::UnknownRequest`].
    pub kind: ErrorKind,
    /// What was wrong.
    pub detail: String,
}

impl DecodeError {
    /// The error reply to send back for this frame.
    pub fn to_reply(&self) -> ErrorReply {
        ErrorReply {
            kind: self.kind,
            message: self.detail.clone(),
        }
    }
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.detail)
    }
}

/// Encodes `msg` as one frame (header + payload).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    let payload = postcard::to_allocvec(msg).map_err(|e| EncodeError::Serialize(format!("{e}")))?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(EncodeError::TooLarge { len: payload.len() });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    write_header(&mut out, payload.len());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a host → guest payload.
///
/// The id is read first so that even a frame whose request is unreadable can
/// be answered against it; the variant index is checked next so a request
/// from a newer host is reported as unknown rather than malformed.
pub fn decode_host_frame(payload: &[u8]) -> Result<HostFrame, DecodeError> {
    let (id, rest) = postcard::take_from_bytes::<u64>(payload).map_err(|e| DecodeError {
        id: None,
        kind: ErrorKind::MalformedFrame,
        detail: format!("cannot read the request id: {e}"),
    })?;
    check_variant(Some(id), rest, Request::VARIANTS, "request")?;
    decode_whole(payload, Some(id))
}

/// Decodes a guest → host payload.
pub fn decode_guest_frame(payload: &[u8]) -> Result<GuestFrame, DecodeError> {
    check_variant(None, payload, GuestFrame::VARIANTS, "guest frame")?;
    decode_whole(payload, None)
}

fn check_variant(id: Option<RequestId>, bytes: &[u8], known: u32, what: &str) -> Result<(), DecodeError> {
    let (tag, _) = postcard::take_from_bytes::<u32>(bytes).map_err(|e| DecodeError {
        id,
        kind: ErrorKind::MalformedFrame,
        detail: format!("cannot read the {what} kind: {e}"),
    })?;
    if tag >= known {
        return Err(DecodeError {
            id,
            kind: ErrorKind::UnknownRequest,
            detail: format!("unknown {what} kind {tag} (this build knows 0..{known})"),
        });
    }
    Ok(())
}

fn decode_whole<T: DeserializeOwned>(payload: &[u8], id: Option<RequestId>) -> Result<T, DecodeError> {
    let malformed = |detail: String| DecodeError {
        id,
        kind: ErrorKind::MalformedFrame,
        detail,
    };
    let (msg, rest) = postcard::take_from_bytes::<T>(payload).map_err(|e| malformed(format!("{e}")))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{} trailing bytes after the message", rest.len())));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;
    use crate::message::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn every_request() -> Vec<Request> {
        vec![
            Request::Ping { nonce: 7 },
            Request::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec![("A".into(), "b".into())],
                cwd: Some("/tmp".into()),
                stdin: b"input".to_vec(),
                timeout_ms: Some(1500),
            }),
            Request::Kill { exec_id: 3, signal: 15 },
            Request::ReadFile {
                path: "/etc/hostname".into(),
                offset: 10,
                max_len: 4096,
            },
            Request::WriteFile(WriteFileRequest {
                path: "/tmp/x".into(),
                data: vec![0, 1, 2, 255],
                mode: Some(0o600),
                append: true,
                create_parents: true,
            }),
            Request::ListDir { path: "/".into() },
            Request::Remove {
                path: "/tmp/x".into(),
                recursive: false,
            },
            Request::Shutdown,
            Request::BurnCpu { ms: 250 },
            Request::TouchMemory {
                mib: 4,
                pattern: 0xA5A5,
            },
            Request::ChecksumMemory {
                offset: 0x100000,
                len: 4096,
            },
            Request::ReadDisk { sector: 7, count: 8 },
            Request::Http(HttpRequest {
                port: 8080,
                method: "POST".into(),
                path: "/invocations".into(),
                headers: vec![("content-type".into(), "application/json".into())],
                body: b"{}".to_vec(),
                more_body: true,
                timeout_ms: Some(30_000),
            }),
            Request::HttpBody {
                request: 9,
                data: vec![1; 300],
                end: true,
            },
            Request::EntrypointStatus,
            Request::DiskIo(DiskIoRequest {
                disk: 1,
                op: DiskOp::Raw(0x7777),
                sector: 9,
                len: 512,
                data: vec![3; 10],
                layout: DiskLayout::DataSplit(3),
            }),
            Request::DiskBench {
                disk: 0,
                pattern: DiskPattern::Sequential1M,
                requests: 64,
                queue_depth: 8,
            },
        ]
    }

    fn every_guest_frame() -> Vec<GuestFrame> {
        let replies = vec![
            Reply::Pong { nonce: 1 },
            Reply::ExecStarted { pid: 42 },
            Reply::Output {
                stream: Stream::Stderr,
                data: b"oops".to_vec(),
            },
            Reply::Exited(ExitStatus {
                code: None,
                signal: Some(9),
                timed_out: true,
                duration_ns: 12,
            }),
            Reply::FileData {
                data: vec![9; 300],
                eof: true,
            },
            Reply::Entries(vec![DirEntry {
                name: "a".into(),
                kind: FileKind::Symlink,
                size: 1,
                mode: 0o777,
                mtime_s: -5,
            }]),
            Reply::Done,
            Reply::Checksum(u64::MAX),
            Reply::HttpHead {
                status: 200,
                headers: vec![("content-type".into(), "text/event-stream".into())],
            },
            Reply::HttpChunk {
                data: b"data: 1\n\n".to_vec(),
            },
            Reply::Entrypoint(EntrypointState::None),
            Reply::Entrypoint(EntrypointState::Running {
                pid: 7,
                argv: vec!["/bin/agent".into()],
            }),
            Reply::Entrypoint(EntrypointState::Exited {
                argv: vec!["x".into()],
                status: ExitStatus {
                    code: Some(3),
                    signal: None,
                    timed_out: false,
                    duration_ns: 1,
                },
            }),
            Reply::Entrypoint(EntrypointState::Failed { message: "no".into() }),
            Reply::DiskIo(DiskIoReply {
                status: 0xff,
                used_len: 513,
                checksum: 77,
                data: b"warren-base".to_vec(),
            }),
            Reply::DiskBench(DiskBenchReply {
                requests: 1000,
                bytes: 4096000,
                errors: 0,
                guest_ns: 123,
            }),
        ];
        let mut frames: Vec<GuestFrame> = replies
            .into_iter()
            .enumerate()
            .map(|(i, reply)| GuestFrame::Reply {
                id: i as u64 * 1000,
                reply,
            })
            .collect();
        frames.push(GuestFrame::Hello(Hello {
            protocol_version: crate::PROTOCOL_VERSION,
            agent: "guest-agent 0.1.0".into(),
            boot_time_ns: 123_456_789,
            kernel_release: "6.1.0".into(),
            boot_stamps: vec![1, 2, 3],
        }));
        frames.push(GuestFrame::Error {
            id: None,
            error: ErrorReply {
                kind: ErrorKind::FrameTooLarge,
                message: "too big".into(),
            },
        });
        frames
    }

    fn payload(frame: &[u8]) -> &[u8] {
        &frame[HEADER_LEN..]
    }

    #[test]
    fn every_request_round_trips_through_a_frame() {
        for (i, request) in every_request().into_iter().enumerate() {
            let msg = HostFrame {
                id: u64::MAX - i as u64,
                request,
            };
            let bytes = encode_frame(&msg).unwrap();
            let mut dec = FrameDecoder::default();
            dec.push(&bytes);
            let p = dec.next_frame().unwrap().unwrap();
            assert_eq!(decode_host_frame(&p).unwrap(), msg);
        }
    }

    #[test]
    fn every_guest_frame_round_trips() {
        for msg in every_guest_frame() {
            let bytes = encode_frame(&msg).unwrap();
            assert_eq!(decode_guest_frame(payload(&bytes)).unwrap(), msg);
        }
    }

    #[test]
    fn variant_counts_match_the_enums() {
        // The last variant's index must be VARIANTS - 1, or the unknown-request
        // check would misclassify frames.
        let last = encode_frame(&HostFrame {
            id: 0,
            request: Request::DiskBench {
                disk: 0,
                pattern: DiskPattern::Random4k,
                requests: 1,
                queue_depth: 1,
            },
        })
        .unwrap();
        // id 0 is one varint byte; the tag follows.
        assert_eq!(payload(&last)[1] as u32, Request::VARIANTS - 1);
        assert_eq!(every_request().len() as u32, Request::VARIANTS);
        let last = encode_frame(&GuestFrame::Error {
            id: None,
            error: ErrorReply {
                kind: ErrorKind::Io,
                message: String::new(),
            },
        })
        .unwrap();
        assert_eq!(payload(&last)[0] as u32, GuestFrame::VARIANTS - 1);
    }

    #[test]
    fn unknown_request_is_reported_with_its_id() {
        // id 5, variant 200 (varint 0xC8 0x01), then junk.
        let err = decode_host_frame(&[5, 0xC8, 0x01, 1, 2, 3]).unwrap_err();
        assert_eq!(err.id, Some(5));
        assert_eq!(err.kind, ErrorKind::UnknownRequest);
        assert!(err.detail.contains("200"), "{}", err.detail);
    }

    #[test]
    fn empty_payload_is_malformed_without_id() {
        let err = decode_host_frame(&[]).unwrap_err();
        assert_eq!(err.id, None);
        assert_eq!(err.kind, ErrorKind::MalformedFrame);
    }

    #[test]
    fn truncated_request_is_malformed_with_its_id() {
        let bytes = encode_frame(&HostFrame {
            id: 77,
            request: Request::ListDir {
                path: "/some/dir".into(),
            },
        })
        .unwrap();
        let p = payload(&bytes);
        let err = decode_host_frame(&p[..p.len() - 3]).unwrap_err();
        assert_eq!(err.id, Some(77));
        assert_eq!(err.kind, ErrorKind::MalformedFrame);
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let bytes = encode_frame(&HostFrame {
            id: 1,
            request: Request::Ping { nonce: 2 },
        })
        .unwrap();
        let mut p = payload(&bytes).to_vec();
        p.push(0);
        let err = decode_host_frame(&p).unwrap_err();
        assert_eq!(err.kind, ErrorKind::MalformedFrame);
        assert!(err.detail.contains("trailing"), "{}", err.detail);
    }

    #[test]
    fn invalid_utf8_in_a_path_is_malformed() {
        // id 1, ListDir (5), string of length 2 holding invalid UTF-8.
        let err = decode_host_frame(&[1, 5, 2, 0xFF, 0xFE]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::MalformedFrame);
        assert_eq!(err.id, Some(1));
    }

    #[test]
    fn huge_length_prefix_inside_payload_is_malformed_not_an_allocation() {
        // id 1, Exec (1), argv length varint ≈ 2^63: must fail, not allocate.
        let p = [1, 1, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F];
        assert_eq!(decode_host_frame(&p).unwrap_err().kind, ErrorKind::MalformedFrame);
    }

    #[test]
    fn unknown_guest_frame_kind_is_reported() {
        let err = decode_guest_frame(&[9]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::UnknownRequest);
    }

    #[test]
    fn oversized_message_is_refused_by_the_encoder() {
        let msg = HostFrame {
            id: 1,
            request: Request::WriteFile(WriteFileRequest {
                path: "/big".to_string(),
                data: vec![0; MAX_FRAME_LEN + 1],
                ..Default::default()
            }),
        };
        assert!(matches!(encode_frame(&msg), Err(EncodeError::TooLarge { .. })));
    }

    /// Deterministic pseudo-random garbage through the whole decode path:
    /// it must never panic (the cargo-fuzz target explores this further).
    #[test]
    fn random_bytes_never_panic() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode_host_frame(&bytes);
            let _ = decode_guest_frame(&bytes);
            let mut dec = FrameDecoder::new(32);
            dec.push(&bytes);
            while let Some(frame) = dec.next_frame() {
                if let Ok(p) = frame {
                    let _ = decode_host_frame(&p);
                }
            }
        }
    }
}
