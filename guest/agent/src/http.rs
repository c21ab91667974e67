//! HTTP requests to a server inside the guest, for the host.
//!
//! [`Request::Http`](warren_protocol::Request::Http) asks for one request to
//! `127.0.0.1:port` (the agent's own server: `POST /invocations`,
//! `GET /ping`). Each runs on its own thread with [`ureq`] (plain HTTP/1.1,
//! no TLS, no decompression, no redirects followed, no pooled connections):
//!
//! - The request body is the frame's `body`, then — with `more_body` — the
//!   pieces of the [`Request::HttpBody`](warren_protocol::Request::HttpBody)
//!   frames naming the request, which the reader thread routes here through
//!   a bounded channel of [`BODY_DEPTH`] pieces. A piece's `Done` goes out
//!   when its last byte has been handed to the HTTP client (which writes it
//!   to the socket), so the host's window of unanswered pieces is what
//!   bounds the memory. With a `content-length` header from the host the
//!   body is sent with that length; without one it is sent chunked. It is
//!   never held whole.
//! - Headers from the host are sent as given, except the hop-by-hop ones
//!   ([`HOP_BY_HOP`]: `connection`, `keep-alive`, `proxy-connection`,
//!   `transfer-encoding`, `te`, `trailer`, `upgrade`) and `host`, which the
//!   client sets itself. No `user-agent`, `accept` or `accept-encoding` is
//!   added.
//! - The response is streamed: one `HttpHead` (any status — a 404 or 500 is
//!   a response like any other), one `HttpChunk` per read from the response
//!   body as it arrives (≤ [`MAX_CHUNK`] each; a server that writes an event
//!   every 200 ms produces a chunk every 200 ms), then `Done`. The head's
//!   headers are the server's minus [`HOP_BY_HOP`] and `content-length`
//!   (the body arrives already de-chunked), and minus any header the
//!   server's `connection` header names; everything else (content-type,
//!   custom headers, repeated headers) is kept in order.
//! - `timeout_ms` bounds connecting, sending the request head, and waiting
//!   for the response head once the body is sent, each on its own. Neither
//!   the request body (which comes at the host's pace) nor the response body
//!   (a stream may be long and quiet) has a time limit.
//! - Failures are [`ErrorKind::Io`] errors for the `Http` request: "cannot
//!   reach the agent at 127.0.0.1:PORT: …" when the connection cannot be
//!   made, "the agent at 127.0.0.1:PORT did not … within N ms" on a timeout,
//!   "HTTP request to 127.0.0.1:PORT failed: …" otherwise. Body pieces not
//!   yet handed over when the request fails get an `Io` error of their own;
//!   a piece for an id with no body expected is `InvalidRequest`.
//! - When the host connection ends, [`Bodies::close`] abandons every request
//!   in flight: bodies end with an error and responses stop being read.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ureq::config::AutoHeaderValue;
use ureq::http;
use ureq::{Agent, SendBody};
use warren_protocol::{ErrorKind, HttpRequest, Reply, RequestId, MAX_CHUNK};

use crate::outbox::Outbox;

/// Body pieces queued for one request before the reader thread waits.
pub const BODY_DEPTH: usize = 4;

/// Headers that belong to one connection, never passed on (lowercase).
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// A piece of a request body, as the host sent it.
struct Piece {
    /// Id of the `HttpBody` frame, answered once the piece is handed over.
    frame: RequestId,
    data: Vec<u8>,
    end: bool,
}

/// The requests of one host connection that still expect body pieces.
#[derive(Default)]
pub struct Bodies {
    waiting: Mutex<HashMap<RequestId, SyncSender<Piece>>>,
    closed: AtomicBool,
}

impl Bodies {
    fn lock(&self) -> MutexGuard<'_, HashMap<RequestId, SyncSender<Piece>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Abandons every request of the connection (it has ended).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.lock().clear();
    }

    fn is_open(&self) -> bool {
        !self.closed.load(Ordering::SeqCst)
    }

    /// Routes a `HttpBody` frame (id `frame`) to request `request`.
    ///
    /// Blocks while that request already has [`BODY_DEPTH`] pieces queued
    /// (a host that keeps more than that unanswered slows its own
    /// connection down).
    pub fn deliver(&self, frame: RequestId, request: RequestId, data: Vec<u8>, end: bool, out: &Outbox) {
        let tx = {
            let mut waiting = self.lock();
            if end {
                waiting.remove(&request)
            } else {
                waiting.get(&request).cloned()
            }
        };
        let Some(tx) = tx else {
            out.error(
                Some(frame),
                ErrorKind::InvalidRequest,
                format!("no HTTP request with id {request} is waiting for body"),
            );
            return;
        };
        if tx.send(Piece { frame, data, end }).is_err() {
            out.error(
                Some(frame),
                ErrorKind::Io,
                format!("HTTP request {request} ended before this piece of its body was sent"),
            );
        }
    }
}

/// Starts request `id` on its own thread.
pub fn start(id: RequestId, req: HttpRequest, out: &Outbox, bodies: &Arc<Bodies>) {
    let rest = if req.more_body {
        let (tx, rx) = sync_channel(BODY_DEPTH);
        let mut waiting = bodies.lock();
        if waiting.contains_key(&id) {
            drop(waiting);
            out.error(
                Some(id),
                ErrorKind::InvalidRequest,
                format!("an HTTP request with id {id} is already in flight"),
            );
            return;
        }
        waiting.insert(id, tx);
        Some(rx)
    } else {
        None
    };
    let (out, bodies) = (out.clone(), bodies.clone());
    let spawned = std::thread::Builder::new().name("http".into()).spawn({
        let out = out.clone();
        move || run(id, req, rest, &out, &bodies)
    });
    if let Err(e) = spawned {
        out.error(
            Some(id),
            ErrorKind::Io,
            format!("cannot start a thread for the request: {e}"),
        );
    }
}

fn run(id: RequestId, req: HttpRequest, rest: Option<Receiver<Piece>>, out: &Outbox, bodies: &Arc<Bodies>) {
    let addr = format!("127.0.0.1:{}", req.port);
    let body = rest.map(|rx| {
        Arc::new(Mutex::new(BodyState {
            rx: Some(rx),
            current: None,
            pos: 0,
        }))
    });
    let result = exchange(&addr, req, body.clone(), out);
    if let Some(body) = body {
        // Whatever the host sent that was not handed over gets an answer,
        // so it never waits for a `Done` that will not come.
        bodies.lock().remove(&id);
        let why = match &result {
            Ok(_) => "the server answered before taking the whole body".to_string(),
            Err(msg) => msg.clone(),
        };
        let mut st = body.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(piece) = st.current.take() {
            out.error(Some(piece.frame), ErrorKind::Io, format!("HTTP request {id}: {why}"));
        }
        if let Some(rx) = st.rx.take() {
            // Ends once the reader thread has dropped every sender.
            for piece in rx.iter() {
                out.error(Some(piece.frame), ErrorKind::Io, format!("HTTP request {id}: {why}"));
            }
        }
    }
    let response = match result {
        Ok(r) => r,
        Err(msg) => {
            out.error(Some(id), ErrorKind::Io, msg);
            return;
        }
    };
    stream_response(id, &addr, response, out, bodies);
}

/// Sends the request; returns the response with its head read.
fn exchange(
    addr: &str,
    req: HttpRequest,
    body: Option<Arc<Mutex<BodyState>>>,
    out: &Outbox,
) -> Result<http::Response<ureq::Body>, String> {
    let timeout = req.timeout_ms.map(Duration::from_millis);
    let agent: Agent = Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .max_idle_connections(0)
        .max_idle_connections_per_host(0)
        .proxy(None)
        .allow_non_standard_methods(true)
        .no_delay(true)
        .user_agent(AutoHeaderValue::None)
        .accept(AutoHeaderValue::None)
        .accept_encoding(AutoHeaderValue::None)
        .timeout_connect(timeout)
        .timeout_send_request(timeout)
        .timeout_recv_response(timeout)
        .build()
        .into();
    if !req.path.starts_with('/') {
        return Err(format!("HTTP path {:?} does not start with '/'", req.path));
    }
    let mut builder = http::Request::builder()
        .method(req.method.as_str())
        .uri(format!("http://{addr}{}", req.path));
    for (name, value) in &req.headers {
        let lower = name.to_ascii_lowercase();
        if lower == "host" || HOP_BY_HOP.contains(&lower.as_str()) {
            continue;
        }
        builder = builder.header(name.as_str(), value.as_str());
    }
    let failed = |e: ureq::Error| describe(addr, req.timeout_ms, e);
    let result = match body {
        None if req.body.is_empty() => agent.run(builder.body(()).map_err(|e| bad_request(addr, e))?),
        None => agent.run(builder.body(req.body).map_err(|e| bad_request(addr, e))?),
        Some(state) => {
            let reader = BodyReader {
                first: req.body,
                first_pos: 0,
                state,
                out: out.clone(),
            };
            let body = SendBody::from_owned_reader(reader);
            agent.run(builder.body(body).map_err(|e| bad_request(addr, e))?)
        }
    };
    result.map_err(failed)
}

fn bad_request(addr: &str, e: http::Error) -> String {
    format!("HTTP request to {addr} is not valid: {e}")
}

fn describe(addr: &str, timeout_ms: Option<u64>, e: ureq::Error) -> String {
    let ms = timeout_ms.unwrap_or(0);
    match e {
        ureq::Error::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::AddrNotAvailable | io::ErrorKind::NetworkUnreachable
            ) =>
        {
            format!("cannot reach the agent at {addr}: {e}")
        }
        ureq::Error::ConnectionFailed => format!("cannot reach the agent at {addr}: connection failed"),
        ureq::Error::Timeout(ureq::Timeout::Connect) => {
            format!("cannot reach the agent at {addr}: no connection within {ms} ms")
        }
        ureq::Error::Timeout(ureq::Timeout::SendRequest) => {
            format!("the agent at {addr} did not take the request head within {ms} ms")
        }
        ureq::Error::Timeout(ureq::Timeout::RecvResponse) => {
            format!("the agent at {addr} did not send a response head within {ms} ms")
        }
        other => format!("HTTP request to {addr} failed: {other}"),
    }
}

fn stream_response(id: RequestId, addr: &str, response: http::Response<ureq::Body>, out: &Outbox, bodies: &Bodies) {
    let (parts, body) = response.into_parts();
    // Headers the server's own `Connection` header names are hop-by-hop too.
    let named: Vec<String> = parts
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let headers = parts
        .headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            n != "content-length" && !HOP_BY_HOP.contains(&n) && !named.iter().any(|t| t == n)
        })
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    if !out.reply(
        id,
        Reply::HttpHead {
            status: parts.status.as_u16(),
            headers,
        },
    ) {
        return;
    }
    let mut reader = body.into_reader();
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // A connection that has gone abandons the response (dropping
                // the reader closes the socket).
                if !bodies.is_open()
                    || !out.reply(
                        id,
                        Reply::HttpChunk {
                            data: buf[..n].to_vec(),
                        },
                    )
                {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                out.error(
                    Some(id),
                    ErrorKind::Io,
                    format!("reading the response body from {addr} failed: {e}"),
                );
                return;
            }
        }
    }
    out.reply(id, Reply::Done);
}

/// The part of a request body still to come from the host.
struct BodyState {
    /// Pieces from the reader thread; `None` once the last one arrived.
    rx: Option<Receiver<Piece>>,
    /// The piece being handed over.
    current: Option<Piece>,
    /// How much of `current` has been.
    pos: usize,
}

/// The request body as the HTTP client reads it.
struct BodyReader {
    first: Vec<u8>,
    first_pos: usize,
    state: Arc<Mutex<BodyState>>,
    out: Outbox,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.first_pos < self.first.len() {
            let n = buf.len().min(self.first.len() - self.first_pos);
            buf[..n].copy_from_slice(&self.first[self.first_pos..self.first_pos + n]);
            self.first_pos += n;
            return Ok(n);
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(piece) = &st.current {
                let left = piece.data.len() - st.pos;
                let n = buf.len().min(left);
                buf[..n].copy_from_slice(&piece.data[st.pos..st.pos + n]);
                st.pos += n;
                if n == left {
                    let piece = st.current.take().expect("current piece");
                    self.out.reply(piece.frame, Reply::Done);
                    if piece.end {
                        st.rx = None;
                    }
                }
                if n > 0 {
                    return Ok(n);
                }
                continue;
            }
            let Some(rx) = &st.rx else {
                return Ok(0);
            };
            match rx.recv() {
                Ok(piece) => {
                    st.current = Some(piece);
                    st.pos = 0;
                }
                Err(_) => {
                    st.rx = None;
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the host went away before the request body ended",
                    ));
                }
            }
        }
    }
}
