//! Invocations: an HTTP request to the agent's own server inside the
//! session's guest (`POST /invocations` on port 8080), forwarded as
//! protocol frames. The body streams in as the client sends it, paced by
//! the guest (at most [`WINDOW`] pieces unanswered); the answer streams
//! back as the agent writes it. Before a session's first invocation its
//! agent is started (the runtime's command) and `GET /ping` must say
//! `Healthy` or `HealthyBusy`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use control_api::api::{Invocation, InvocationResponse, RuntimeVersion};
use control_api::ApiError;
use tokio::sync::mpsc;
use warren_protocol::{ErrorKind, ExecRequest, HttpRequest, Reply, Request, MAX_CHUNK};

use super::exec::guest_error;
use crate::guest_conn::{ConnError, Replies};
use crate::session::Session;

/// The agent's port inside the guest.
pub const AGENT_PORT: u16 = 8080;

/// Body pieces in flight to the guest before waiting for its answer.
const WINDOW: usize = 4;

/// How long a fresh agent may take to answer its first `/ping`.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Response headers that describe the guest-side connection, not the
/// answer: the response is re-framed towards the client.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "upgrade",
    "trailer",
];

/// One request to the agent: its head and the replies that follow.
async fn http(
    s: &Session,
    method: &str,
    path: &str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    more_body: bool,
    timeout: Option<Duration>,
) -> Result<Replies, ConnError> {
    s.guest
        .conn
        .send(Request::Http(HttpRequest {
            port: AGENT_PORT,
            method: method.into(),
            path: path.into(),
            headers,
            body,
            more_body,
            timeout_ms: timeout.map(|t| t.as_millis() as u64),
        }))
        .await
}

/// `GET /ping` once: Ok(true) when the agent says it is healthy.
async fn ping(s: &Session) -> Result<bool, String> {
    let mut replies = http(
        s,
        "GET",
        "/ping",
        Vec::new(),
        Vec::new(),
        false,
        Some(Duration::from_secs(2)),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut status = 0;
    let mut body = Vec::new();
    loop {
        match replies.next().await.map_err(|e| e.to_string())?.0 {
            Reply::HttpHead { status: st, .. } => status = st,
            Reply::HttpChunk { data } => body.extend_from_slice(&data),
            Reply::Done => break,
            other => return Err(format!("the guest answered /ping with {other:?}")),
        }
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let healthy = matches!(v["status"].as_str(), Some("Healthy" | "HealthyBusy"));
    if status == 200 && healthy {
        Ok(true)
    } else {
        Err(format!(
            "GET /ping answered {status}: {}",
            String::from_utf8_lossy(&body)
        ))
    }
}

/// Starts the agent (if the runtime names a command) and waits until its
/// `/ping` is healthy.
pub(super) async fn start_agent(s: &Arc<Session>, version: &RuntimeVersion) -> Result<(), ApiError> {
    let id = s.snapshot().id;
    if let Some(argv) = version.command.clone().filter(|c| !c.is_empty()) {
        let mut env: Vec<(String, String)> = version.env.clone().into_iter().collect();
        env.push(("WARREN_SESSION_ID".into(), id.clone()));
        env.push((
            "WARREN_RUNTIME".into(),
            format!("{}:{}", version.runtime, version.version),
        ));
        let mut replies = s
            .guest
            .conn
            .send(Request::Exec(ExecRequest {
                argv: argv.clone(),
                env,
                ..Default::default()
            }))
            .await
            .map_err(|e| guest_error(&id, e))?;
        // The agent runs as long as the session; its output goes to our log.
        let sid = id.clone();
        tokio::spawn(async move {
            let mut tail = Vec::new();
            loop {
                match replies.next().await {
                    Ok((Reply::Output { data, .. }, _)) => {
                        tail.extend_from_slice(&data);
                        let cut = tail.len().saturating_sub(4096);
                        tail.drain(..cut);
                    }
                    Ok((Reply::Exited(st), _)) => {
                        tracing::warn!(session = %sid, status = ?st, output = %String::from_utf8_lossy(&tail), "the agent server exited");
                        return;
                    }
                    Ok(_) => {}
                    Err(ConnError::Closed) => return,
                    Err(e) => {
                        tracing::warn!(session = %sid, error = %e, "starting the agent server failed");
                        return;
                    }
                }
            }
        });
    }
    let deadline = Instant::now() + AGENT_START_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match ping(s).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
        if s.guest.conn.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(ApiError::unavailable(format!(
        "session {id}: the agent did not answer GET /ping on port {AGENT_PORT} with Healthy within {AGENT_START_TIMEOUT:?}: {last}"
    )))
}

/// Splits a piece from the client into frames the protocol carries.
fn pieces(b: Bytes) -> impl Iterator<Item = Bytes> {
    let n = b.len().div_ceil(MAX_CHUNK).max(1);
    (0..n).map(move |i| b.slice(i * MAX_CHUNK..((i + 1) * MAX_CHUNK).min(b.len())))
}

/// Forwards one invocation; returns once the agent's status and headers
/// are in, with the body still streaming.
pub(super) async fn forward(
    s: Arc<Session>,
    session_id: String,
    mut inv: Invocation,
) -> Result<InvocationResponse, ApiError> {
    let id = s.snapshot().id;
    let busy = s.busy_guard();
    let mut headers = inv.headers;
    headers.push(("x-session-id".into(), session_id.clone()));
    // A body that arrived whole (its declared length in the first piece)
    // goes in the request frame itself: one frame for a small invocation.
    let mut first = Vec::new();
    let mut more = inv.content_length != Some(0);
    if more {
        match inv.body.recv().await {
            Some(Ok(b)) if inv.content_length == Some(b.len() as u64) && b.len() <= MAX_CHUNK => {
                first = b.to_vec();
                more = false;
            }
            Some(Ok(b)) => first = b.to_vec(),
            Some(Err(e)) => return Err(ApiError::bad_request(e)),
            None => more = false,
        }
    }
    let (first, rest) = if first.len() > MAX_CHUNK {
        let rest = Bytes::from(first.split_off(MAX_CHUNK));
        (first, Some(rest))
    } else {
        (first, None)
    };
    let mut replies = http(&s, "POST", "/invocations", headers, first, more || rest.is_some(), None)
        .await
        .map_err(|e| guest_error(&id, e))?;
    if more || rest.is_some() {
        let (s2, request) = (s.clone(), replies.id());
        tokio::spawn(async move {
            if let Err(e) = upload(&s2, request, rest, inv.body).await {
                tracing::warn!(session = %s2.snapshot().id, error = %e, "invocation body upload ended early");
            }
        });
    }
    let (status, headers) = match replies.next().await {
        Ok((Reply::HttpHead { status, headers }, _)) => (status, headers),
        Ok((other, _)) => {
            return Err(ApiError::internal(format!(
                "the guest answered an invocation with {other:?}"
            )))
        }
        Err(ConnError::Guest(g)) if g.kind == ErrorKind::Io => {
            return Err(ApiError::new(
                502,
                "agent_unreachable",
                format!("session {id}: {}", g.message),
            ))
        }
        Err(e) => return Err(guest_error(&id, e)),
    };
    let headers = headers
        .into_iter()
        .filter(|(k, _)| !HOP_BY_HOP.contains(&k.to_ascii_lowercase().as_str()))
        .collect();
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let _busy = busy;
        loop {
            match replies.next().await {
                Ok((Reply::HttpChunk { data }, _)) => {
                    if tx.send(Bytes::from(data)).await.is_err() {
                        return;
                    }
                }
                Ok((Reply::Done, _)) => return,
                Ok((other, _)) => {
                    tracing::warn!(?other, "unexpected reply in an invocation's body");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the invocation's answer ended early");
                    return;
                }
            }
        }
    });
    Ok(InvocationResponse {
        session_id,
        status,
        headers,
        body: rx,
    })
}

/// Sends the rest of the body as `HttpBody` frames, at most [`WINDOW`]
/// unanswered: the guest answers each once its agent has taken it, so a
/// slow agent slows the client instead of filling memory.
async fn upload(
    s: &Session,
    request: u64,
    rest: Option<Bytes>,
    mut body: mpsc::Receiver<Result<Bytes, String>>,
) -> Result<(), String> {
    let mut in_flight: VecDeque<Replies> = VecDeque::new();
    let send = |data: Bytes, end: bool| {
        s.guest.conn.send(Request::HttpBody {
            request,
            data: data.to_vec(),
            end,
        })
    };
    let mut queue: VecDeque<Bytes> = rest.map(|b| pieces(b).collect()).unwrap_or_default();
    loop {
        let piece = match queue.pop_front() {
            Some(p) => Some(p),
            None => match body.recv().await {
                Some(Ok(b)) => {
                    queue.extend(pieces(b));
                    continue;
                }
                Some(Err(e)) => {
                    // End the agent's body so it is not left waiting.
                    let _ = send(Bytes::new(), true).await;
                    return Err(e);
                }
                None => None,
            },
        };
        while in_flight.len() >= WINDOW {
            let mut r = in_flight.pop_front().ok_or("window empty")?;
            r.next().await.map_err(|e| e.to_string())?;
        }
        match piece {
            Some(p) => in_flight.push_back(send(p, false).await.map_err(|e| e.to_string())?),
            None => {
                in_flight.push_back(send(Bytes::new(), true).await.map_err(|e| e.to_string())?);
                break;
            }
        }
    }
    for mut r in in_flight {
        r.next().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}
