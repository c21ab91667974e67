//! One asynchronous connection to a guest's agent, multiplexed by request
//! id: any number of requests may be in flight (a command blocked on a
//! pipe does not hold up the next one), each reading its own replies.
//!
//! A reader task decodes frames and routes each reply to the request that
//! owns its id. A frame that does not decode is counted and dropped — a
//! hostile guest can break its own session, never agentd. When the guest
//! goes away every request still waiting gets [`ConnError::Closed`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use warren_protocol::codec::{decode_guest_frame, encode_frame};
use warren_protocol::frame::{FrameDecoder, MAX_FRAME_LEN};
use warren_protocol::{ErrorReply, GuestFrame, Hello, HostFrame, Reply, Request, RequestId, PROTOCOL_VERSION};

/// Connection failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnError {
    /// The guest closed the connection or its process ended.
    #[error("the guest closed its connection")]
    Closed,
    /// The socket failed.
    #[error("guest socket: {0}")]
    Io(String),
    /// The guest broke the protocol.
    #[error("guest protocol: {0}")]
    Protocol(String),
    /// The guest answered this request with an error.
    #[error("guest error ({:?}): {}", .0.kind, .0.message)]
    Guest(ErrorReply),
    /// No hello in time.
    #[error("no hello from the guest within {0:?}")]
    HelloTimeout(Duration),
}

type Routed = (Result<Reply, ErrorReply>, Instant);

struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Mutex<HashMap<RequestId, mpsc::UnboundedSender<Routed>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    bad_frames: AtomicU64,
}

/// A connected guest.
#[derive(Clone)]
pub struct GuestConn {
    inner: Arc<Inner>,
}

/// The replies to one request, in order; the last one is final.
pub struct Replies {
    id: RequestId,
    rx: mpsc::UnboundedReceiver<Routed>,
    /// When the request had been written to the guest's socket.
    pub written_at: Instant,
    conn: GuestConn,
}

impl Replies {
    /// The next reply and when it was read; `Err(Closed)` if the guest
    /// went away first.
    pub async fn next(&mut self) -> Result<(Reply, Instant), ConnError> {
        match self.rx.recv().await {
            Some((Ok(r), at)) => Ok((r, at)),
            Some((Err(e), _)) => Err(ConnError::Guest(e)),
            None => Err(ConnError::Closed),
        }
    }

    /// The request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The rest of an HTTP answer's body (`HttpChunk`s up to the final
    /// reply), keeping at most `max` bytes: the server in the guest is the
    /// session's, so what it sends must not grow agentd without bound.
    pub async fn http_body(&mut self, max: usize) -> Result<Vec<u8>, ConnError> {
        let mut body = Vec::new();
        loop {
            match self.next().await?.0 {
                Reply::HttpChunk { data } => {
                    let room = max.saturating_sub(body.len());
                    body.extend_from_slice(&data[..data.len().min(room)]);
                }
                Reply::HttpHead { .. } => {}
                _ => return Ok(body),
            }
        }
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        // Replies that arrive later for an abandoned request are dropped.
        self.conn
            .inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl GuestConn {
    /// Reads the guest's hello (within `timeout`), checks its version and
    /// starts routing replies.
    pub async fn handshake(stream: UnixStream, timeout: Duration) -> Result<(GuestConn, Hello), ConnError> {
        let (mut reader, writer) = stream.into_split();
        let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
        let mut buf = vec![0u8; 64 * 1024];
        let hello = tokio::time::timeout(timeout, async {
            loop {
                if let Some(frame) = decoder.next_frame() {
                    let payload = frame.map_err(|e| ConnError::Protocol(format!("hello frame: {e}")))?;
                    return match decode_guest_frame(&payload) {
                        Ok(GuestFrame::Hello(h)) => Ok(h),
                        Ok(other) => Err(ConnError::Protocol(format!("expected hello first, got {other:?}"))),
                        Err(e) => Err(ConnError::Protocol(format!("hello does not decode: {e}"))),
                    };
                }
                let n = reader.read(&mut buf).await.map_err(|e| ConnError::Io(e.to_string()))?;
                if n == 0 {
                    return Err(ConnError::Closed);
                }
                decoder.push(&buf[..n]);
            }
        })
        .await
        .map_err(|_| ConnError::HelloTimeout(timeout))??;
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(ConnError::Protocol(format!(
                "guest speaks protocol v{}, agentd v{PROTOCOL_VERSION}",
                hello.protocol_version
            )));
        }
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(writer),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            bad_frames: AtomicU64::new(0),
        });
        tokio::spawn(route_replies(inner.clone(), reader, decoder, buf));
        Ok((GuestConn { inner }, hello))
    }

    /// Whether the guest has gone away.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Frames from the guest that did not decode.
    pub fn bad_frames(&self) -> u64 {
        self.inner.bad_frames.load(Ordering::Relaxed)
    }

    /// Sends a request; its replies arrive on the returned [`Replies`].
    pub async fn send(&self, request: Request) -> Result<Replies, ConnError> {
        if self.is_closed() {
            return Err(ConnError::Closed);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode_frame(&HostFrame { id, request })
            .map_err(|e| ConnError::Protocol(format!("request does not encode: {e}")))?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let mut replies = Replies {
            id,
            rx,
            written_at: Instant::now(),
            conn: self.clone(),
        };
        let mut w = self.inner.writer.lock().await;
        w.write_all(&bytes).await.map_err(|e| ConnError::Io(e.to_string()))?;
        drop(w);
        replies.written_at = Instant::now();
        Ok(replies)
    }

    /// Sends a request and waits for its final reply; returns it with the
    /// time between writing the request and reading that reply.
    pub async fn call(&self, request: Request) -> Result<(Reply, Duration), ConnError> {
        let mut replies = self.send(request).await?;
        loop {
            let (reply, at) = replies.next().await?;
            if reply.is_final() {
                return Ok((reply, at.saturating_duration_since(replies.written_at)));
            }
        }
    }
}

async fn route_replies(
    inner: Arc<Inner>,
    mut reader: tokio::net::unix::OwnedReadHalf,
    mut decoder: FrameDecoder,
    mut buf: Vec<u8>,
) {
    loop {
        while let Some(frame) = decoder.next_frame() {
            let at = Instant::now();
            let decoded = match frame {
                Ok(payload) => decode_guest_frame(&payload).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let (id, routed) = match decoded {
                Ok(GuestFrame::Reply { id, reply }) => (id, Ok(reply)),
                Ok(GuestFrame::Error { id: Some(id), error }) => (id, Err(error)),
                Ok(GuestFrame::Error { id: None, error }) => {
                    tracing::warn!(kind = ?error.kind, message = %error.message, "guest error for no request");
                    continue;
                }
                Ok(GuestFrame::Hello(_)) | Err(_) => {
                    let n = inner.bad_frames.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(bad_frames = n, error = ?decoded.err(), "dropping a malformed frame from the guest");
                    }
                    continue;
                }
            };
            let last = match &routed {
                Ok(r) => r.is_final(),
                Err(_) => true,
            };
            let mut pending = inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(tx) = pending.get(&id) {
                let _ = tx.send((routed, at));
                if last {
                    pending.remove(&id);
                }
            }
        }
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => decoder.push(&buf[..n]),
        }
    }
    inner.closed.store(true, Ordering::Release);
    // Dropping the senders wakes every waiting request with `Closed`.
    inner.pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}
