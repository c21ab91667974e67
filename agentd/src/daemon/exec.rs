//! Commands in a session's guest: to completion, or streamed as events.

use std::sync::Arc;

use control_api::api::{ExecBody, ExecEvent, ExecResult, GuestTiming};
use control_api::ApiError;
use tokio::sync::mpsc;
use warren_protocol::{ErrorKind, ExecRequest, ExitStatus, Reply, Request, Stream};

use crate::guest_conn::{ConnError, Replies};
use crate::session::{BusyGuard, Session};

fn request(body: ExecBody) -> Request {
    Request::Exec(ExecRequest {
        argv: body.argv,
        env: body.env.into_iter().collect(),
        cwd: body.cwd,
        stdin: body.stdin.map(String::into_bytes).unwrap_or_default(),
        timeout_ms: body.timeout_s.map(|t| (t * 1000.0).ceil() as u64),
    })
}

/// Maps a failure talking to the guest to what the client is told.
pub(super) fn guest_error(session: &str, e: ConnError) -> ApiError {
    match e {
        ConnError::Guest(g) => match g.kind {
            ErrorKind::InvalidRequest
            | ErrorKind::NotFound
            | ErrorKind::PermissionDenied
            | ErrorKind::AlreadyExists => {
                ApiError::bad_request(format!("the guest refused the request: {}", g.message))
            }
            _ => ApiError::internal(format!("the guest failed the request ({:?}): {}", g.kind, g.message)),
        },
        ConnError::Closed => ApiError::unavailable(format!(
            "session {session}: the guest has gone away; the session is being ended"
        )),
        other => ApiError::unavailable(format!("session {session}: {other}")),
    }
}

fn exit_event(st: ExitStatus) -> ExecEvent {
    ExecEvent::Exit {
        exit_code: st.code,
        signal: st.signal,
        timed_out: st.timed_out,
        duration_ms: st.duration_ns as f64 / 1e6,
    }
}

/// Sends the exec, counted as a request in flight until the guard drops.
async fn start(s: &Arc<Session>, body: ExecBody) -> Result<(String, BusyGuard, Replies), ApiError> {
    let id = s.snapshot().id;
    let busy = s.busy_guard();
    let replies = s
        .guest
        .conn
        .send(request(body))
        .await
        .map_err(|e| guest_error(&id, e))?;
    Ok((id, busy, replies))
}

/// Runs a command to completion.
pub(super) async fn run(s: &Arc<Session>, body: ExecBody) -> Result<(ExecResult, GuestTiming), ApiError> {
    let (id, _busy, mut replies) = start(s, body).await?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    loop {
        let (reply, at) = replies.next().await.map_err(|e| guest_error(&id, e))?;
        match reply {
            Reply::ExecStarted { .. } => {}
            Reply::Output { stream, data } => match stream {
                Stream::Stdout => stdout.extend_from_slice(&data),
                Stream::Stderr => stderr.extend_from_slice(&data),
            },
            Reply::Exited(st) => {
                let timing = GuestTiming {
                    guest_ns: at.saturating_duration_since(replies.written_at).as_nanos() as u64,
                };
                return Ok((
                    ExecResult {
                        stdout: String::from_utf8_lossy(&stdout).into_owned(),
                        stderr: String::from_utf8_lossy(&stderr).into_owned(),
                        exit_code: st.code,
                        signal: st.signal,
                        timed_out: st.timed_out,
                        duration_ms: st.duration_ns as f64 / 1e6,
                    },
                    timing,
                ));
            }
            other => return Err(ApiError::internal(format!("the guest answered an exec with {other:?}"))),
        }
    }
}

/// Runs a command, forwarding its events as they come. If the client goes
/// away mid-stream the command is killed: nobody is left to read it.
pub(super) async fn stream(s: Arc<Session>, body: ExecBody) -> Result<mpsc::Receiver<ExecEvent>, ApiError> {
    let (id, busy, mut replies) = start(&s, body).await?;
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(async move {
        let _busy = busy;
        loop {
            let event = match replies.next().await {
                Ok((Reply::ExecStarted { pid }, _)) => ExecEvent::Started { pid },
                Ok((Reply::Output { stream, data }, _)) => {
                    let data = String::from_utf8_lossy(&data).into_owned();
                    match stream {
                        Stream::Stdout => ExecEvent::Stdout { data },
                        Stream::Stderr => ExecEvent::Stderr { data },
                    }
                }
                Ok((Reply::Exited(st), _)) => {
                    let _ = tx.send(exit_event(st)).await;
                    return;
                }
                Ok((other, _)) => {
                    let _ = tx
                        .send(ExecEvent::Error {
                            code: "internal".into(),
                            message: format!("the guest answered an exec with {other:?}"),
                        })
                        .await;
                    return;
                }
                Err(e) => {
                    let e = guest_error(&id, e);
                    let _ = tx
                        .send(ExecEvent::Error {
                            code: e.code,
                            message: e.message,
                        })
                        .await;
                    return;
                }
            };
            if tx.send(event).await.is_err() {
                let kill = Request::Kill {
                    exec_id: replies.id(),
                    signal: libc::SIGKILL,
                };
                tracing::info!(session = %id, "stream reader went away; killing its command");
                let _ = s.guest.conn.send(kill).await;
                return;
            }
        }
    });
    Ok(rx)
}
