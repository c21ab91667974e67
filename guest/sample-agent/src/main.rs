//! `warren-sample-agent`: the smallest server that follows the
//! agent-container contract, shipped in the initramfs so that the host's
//! invocation path can be exercised without a real agent.
//!
//! - `GET /ping` → `200 {"status":"Healthy"}`, or `{"status":"HealthyBusy"}`
//!   while an invocation is being served.
//! - `POST /invocations`:
//!   - by default a JSON answer: `{"response", "received_bytes", "sha256"
//!     (hex of the body), "session_id" (the `X-Session-Id` header or null),
//!     "traceparent" (the header or null), "env":
//!     {"WARREN_SAMPLE_GREETING": …}}`; `response` is `"you said: PROMPT"`
//!     when the body is a JSON object with a string `prompt` (bodies over
//!     1 MiB are hashed and counted, not parsed);
//!   - with `Accept: text/event-stream`, or `"stream": true` in the JSON
//!     body: a `text/event-stream` of [`EVENTS`] events
//!     `data: {"chunk": i, "text": …}` [`EVENT_GAP`] apart, each sent as
//!     its own HTTP chunk as soon as it is made, then `data: [DONE]`;
//!   - with `X-Sample-Mode: echo`: the request body streamed back as it is
//!     read (`application/octet-stream`, chunked), never held whole. The
//!     server writes the echo while it reads, so a client that sends its
//!     whole body before reading the answer stalls once the socket buffers
//!     between them are full (a few MiB).
//! - Anything else is a 404 (or 405 for a known path with the wrong method)
//!   with a JSON `{"error": …}`.
//!
//! hyper's HTTP/1.1 server on a single-threaded tokio runtime.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

/// Events in a streamed answer, before `[DONE]`.
const EVENTS: usize = 5;
/// Time between two events.
const EVENT_GAP: Duration = Duration::from_millis(200);
/// Bodies up to this size are parsed as JSON (for `prompt` and `stream`).
const PARSE_LIMIT: usize = 1 << 20;
/// The environment variable the JSON answer reports.
const GREETING_VAR: &str = "WARREN_SAMPLE_GREETING";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ResponseBody = BoxBody<Bytes, BoxError>;

/// Serve the agent-container contract (GET /ping, POST /invocations).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TCP port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: std::net::IpAddr,
}

/// Invocations being served; `/ping` says HealthyBusy while it is not zero.
#[derive(Default)]
struct State {
    busy: AtomicUsize,
}

/// Counts one invocation as in progress until dropped.
struct Busy(Arc<State>);

impl Busy {
    fn new(state: &Arc<State>) -> Busy {
        state.busy.fetch_add(1, Ordering::SeqCst);
        Busy(state.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

fn main() {
    let args = Args::parse();
    let addr = SocketAddr::new(args.host, args.port);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(serve(addr)) {
        eprintln!("warren-sample-agent: {e}");
        std::process::exit(1);
    }
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    eprintln!("warren-sample-agent: listening on {}", listener.local_addr()?);
    let state = Arc::new(State::default());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("warren-sample-agent: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, state.clone()));
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
                if !e.is_incomplete_message() {
                    eprintln!("warren-sample-agent: connection: {e}");
                }
            }
        });
    }
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<ResponseBody>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/ping") => {
            let status = if state.busy.load(Ordering::SeqCst) > 0 {
                "HealthyBusy"
            } else {
                "Healthy"
            };
            json(StatusCode::OK, &serde_json::json!({ "status": status }))
        }
        (&Method::POST, "/invocations") => invoke(req, &state).await,
        (_, "/ping" | "/invocations") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({ "error": format!("{} is not allowed on {}", req.method(), req.uri().path()) }),
        ),
        (_, path) => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": format!("no route for {path}") }),
        ),
    };
    Ok(response)
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn invoke(req: Request<Incoming>, state: &Arc<State>) -> Response<ResponseBody> {
    let busy = Busy::new(state);
    if header(&req, "x-sample-mode").is_some_and(|m| m.eq_ignore_ascii_case("echo")) {
        // Each frame of the request goes back as it arrives; the busy mark
        // lasts as long as the body does.
        let body = req
            .into_body()
            .map_frame(move |frame| {
                let _ = &busy;
                frame
            })
            .map_err(|e| Box::new(e) as BoxError)
            .boxed();
        return with_type(Response::new(body), "application/octet-stream");
    }
    let wants_events = header(&req, ACCEPT.as_str()).is_some_and(|a| a.contains("text/event-stream"));
    let session_id = header(&req, "x-session-id").map(str::to_owned);
    let traceparent = header(&req, "traceparent").map(str::to_owned);
    let mut body = req.into_body();
    let mut hasher = Sha256::new();
    let mut received = 0usize;
    let mut head = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({ "error": format!("reading the body: {e}") }),
                )
            }
        };
        if let Ok(data) = frame.into_data() {
            hasher.update(&data);
            received += data.len();
            if head.len() <= PARSE_LIMIT {
                head.extend_from_slice(&data);
            }
        }
    }
    let parsed: Option<serde_json::Value> = if received <= PARSE_LIMIT {
        serde_json::from_slice(&head).ok()
    } else {
        None
    };
    let prompt = parsed
        .as_ref()
        .and_then(|v| v.get("prompt"))
        .and_then(|p| p.as_str())
        .map(str::to_owned);
    let stream = wants_events
        || parsed
            .as_ref()
            .and_then(|v| v.get("stream"))
            .and_then(|s| s.as_bool())
            .unwrap_or(false);
    let answer = match &prompt {
        Some(p) => format!("you said: {p}"),
        None => format!("you sent {received} bytes"),
    };
    if stream {
        return events(answer, busy);
    }
    drop(busy);
    json(
        StatusCode::OK,
        &serde_json::json!({
            "response": answer,
            "received_bytes": received,
            "sha256": format!("{:x}", hasher.finalize()),
            "session_id": session_id,
            "traceparent": traceparent,
            "env": { GREETING_VAR: std::env::var(GREETING_VAR).ok() },
        }),
    )
}

/// The streamed answer: [`EVENTS`] events, then `[DONE]`, each its own
/// chunk on the wire.
fn events(answer: String, busy: Busy) -> Response<ResponseBody> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        let _busy = busy;
        for i in 0..EVENTS {
            tokio::time::sleep(EVENT_GAP).await;
            let event = serde_json::json!({ "chunk": i, "text": format!("{answer} [{}/{EVENTS}]", i + 1) });
            if tx.send(Bytes::from(format!("data: {event}\n\n"))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let mut resp = with_type(Response::new(ChannelBody(rx).boxed()), "text/event-stream");
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

/// A response body fed by a channel: every message is one data frame.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<ResponseBody> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = with_type(Response::new(body), "application/json");
    *resp.status_mut() = status;
    resp
}

fn with_type(mut resp: Response<ResponseBody>, content_type: &'static str) -> Response<ResponseBody> {
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
