//! `executeCode` in Python and JavaScript, and `clearContext`: the image's
//! code interpreter server (the python image's entrypoint,
//! `images/python/interpreter.py`) keeps one interpreter per language for
//! the life of the guest, so state survives between calls. agentd reaches
//! it on the guest's loopback through guest-agent's HTTP forwarding and
//! turns its NDJSON events into tool results: output streamed as it is
//! printed, figures as PNG files (read back and attached), errors as
//! `isError` with the traceback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use control_api::ApiError;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use warren_protocol::{EntrypointState, ErrorKind, HttpRequest, Reply, Request};

use super::exec::guest_error;
use crate::guest_conn::{ConnError, Replies};
use crate::session::Session;

/// How long a first call waits for the interpreter server to listen (it
/// starts with the guest; under emulation it can take a while).
const READY_WAIT: Duration = Duration::from_secs(60);
/// Largest figure attached inline to a result.
const MAX_INLINE_FIGURE: usize = 8 << 20;

/// The languages the interpreter serves, by the names clients use.
pub fn language(name: &str) -> Option<&'static str> {
    match name {
        "python" | "python3" | "py" => Some("python"),
        "javascript" | "js" | "node" | "nodejs" => Some("javascript"),
        _ => None,
    }
}

/// Posts `body` to the interpreter's `path`; waits for the server to be up
/// (connection refused while it starts) and fails fast when the image's
/// entrypoint has exited.
async fn post(s: &Session, port: u16, path: &str, body: Vec<u8>) -> Result<(u16, Replies), ApiError> {
    let id = s.snapshot().id;
    let started = Instant::now();
    loop {
        let mut replies = s
            .guest
            .conn
            .send(Request::Http(HttpRequest {
                port,
                method: "POST".into(),
                path: path.into(),
                headers: vec![("content-type".into(), "application/json".into())],
                body: body.clone(),
                more_body: false,
                timeout_ms: Some(10_000),
            }))
            .await
            .map_err(|e| guest_error(&id, e))?;
        match replies.next().await {
            Ok((Reply::HttpHead { status, .. }, _)) => return Ok((status, replies)),
            Ok((other, _)) => {
                return Err(ApiError::internal(format!(
                    "the guest answered an interpreter request with {other:?}"
                )))
            }
            Err(ConnError::Guest(g)) if g.kind == ErrorKind::Io && started.elapsed() < READY_WAIT => {
                if let Some(why) = entrypoint_gone(s).await {
                    return Err(ApiError::new(
                        502,
                        "interpreter_unavailable",
                        format!("session {id}: {why}"),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(ConnError::Guest(g)) if g.kind == ErrorKind::Io => {
                return Err(ApiError::new(
                    502,
                    "interpreter_unavailable",
                    format!(
                        "session {id}: the code interpreter did not answer within {READY_WAIT:?}: {}",
                        g.message
                    ),
                ))
            }
            Err(e) => return Err(guest_error(&id, e)),
        }
    }
}

/// Why the interpreter will never answer, when its entrypoint is gone.
async fn entrypoint_gone(s: &Session) -> Option<String> {
    match s.guest.conn.call(Request::EntrypointStatus).await {
        Ok((Reply::Entrypoint(EntrypointState::Exited { argv, status }), _)) => Some(format!(
            "the code interpreter ({}) exited ({})",
            argv.join(" "),
            match (status.code, status.signal) {
                (Some(c), _) => format!("code {c}"),
                (_, Some(sig)) => format!("signal {sig}"),
                _ => "unknown status".into(),
            }
        )),
        Ok((Reply::Entrypoint(EntrypointState::Failed { message }), _)) => {
            Some(format!("the code interpreter could not start: {message}"))
        }
        Ok((Reply::Entrypoint(EntrypointState::None), _)) => {
            Some("the image names no entrypoint, so no code interpreter runs".into())
        }
        _ => None,
    }
}

/// Reads the whole body of an answer.
async fn body_of(replies: &mut Replies) -> Result<Vec<u8>, ConnError> {
    let mut body = Vec::new();
    loop {
        match replies.next().await?.0 {
            Reply::HttpChunk { data } => body.extend_from_slice(&data),
            _ => return Ok(body),
        }
    }
}

/// `clearContext`: a fresh interpreter state for `language` (both when
/// None).
pub async fn clear(s: &Arc<Session>, port: u16, language: Option<&'static str>) -> Result<Value, ApiError> {
    let id = s.snapshot().id;
    let (status, mut replies) = post(
        s,
        port,
        "/reset",
        json!({ "language": language }).to_string().into_bytes(),
    )
    .await?;
    let body = body_of(&mut replies).await.map_err(|e| guest_error(&id, e))?;
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if status != 200 {
        return Err(ApiError::internal(format!(
            "the interpreter answered /reset with {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    let reset = v["reset"].clone();
    Ok(json!({
        "content": [{"type": "text", "text": format!("context cleared: {reset}")}],
        "structuredContent": {"reset": reset},
        "isError": false,
    }))
}

/// Runs `code`; events `{"type":"stdout"|"stderr","data"}` as output comes,
/// then `{"type":"result","result":{…}}` (the shape of the other command
/// tools, plus `result`, `files` and `error`).
pub async fn execute(
    s: &Arc<Session>,
    port: u16,
    language: &'static str,
    code: &str,
    timeout_ms: Option<u64>,
) -> Result<mpsc::Receiver<Value>, ApiError> {
    let id = s.snapshot().id;
    let req = json!({"language": language, "code": code, "timeout_ms": timeout_ms});
    let (status, mut replies) = post(s, port, "/execute", req.to_string().into_bytes()).await?;
    if status != 200 {
        let body = body_of(&mut replies).await.map_err(|e| guest_error(&id, e))?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let msg = v["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(ApiError::bad_request(format!(
            "executeCode: the interpreter refused the request: {msg}"
        )));
    }
    let (tx, rx) = mpsc::channel(32);
    let busy = s.busy_guard();
    let s = s.clone();
    tokio::spawn(async move {
        let _busy = busy;
        let mut run = Run::default();
        let mut pending = Vec::new();
        loop {
            let data = match replies.next().await {
                Ok((Reply::HttpChunk { data }, _)) => data,
                Ok((Reply::Done, _)) => break,
                Ok((other, _)) => {
                    run.fail(format!("unexpected reply {other:?} in the interpreter's answer"));
                    break;
                }
                Err(e) => {
                    run.fail(guest_error(&id, e).message);
                    break;
                }
            };
            pending.extend_from_slice(&data);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                if let Some(forward) = run.event(&ev) {
                    // A client that went away ends the answer; the guest's
                    // interpreter sees its connection close and interrupts.
                    if tx.send(forward).await.is_err() {
                        return;
                    }
                }
            }
        }
        if !run.ended {
            run.fail("the interpreter's answer ended before its end event".into());
        }
        let mut images = Vec::new();
        for f in &run.files {
            let path = f["path"].as_str().unwrap_or_default().to_string();
            match super::code::read_file(&s, &path).await {
                Ok(data) if data.len() <= MAX_INLINE_FIGURE => images.push(json!({
                    "type": "image",
                    "mimeType": f["mimeType"].as_str().unwrap_or("image/png"),
                    "data": base64::engine::general_purpose::STANDARD.encode(&data),
                })),
                Ok(_) => {}
                Err(e) => tracing::warn!(%path, error = %e.message, "cannot read a figure back"),
            }
        }
        let _ = tx
            .send(json!({"type": "result", "result": run.result(language, images)}))
            .await;
    });
    Ok(rx)
}

/// What one execution produced so far.
#[derive(Default)]
struct Run {
    stdout: String,
    stderr: String,
    result: Option<String>,
    files: Vec<Value>,
    error: Option<Value>,
    is_error: bool,
    timed_out: bool,
    duration_ms: f64,
    ended: bool,
}

impl Run {
    /// Takes one interpreter event; returns what to stream, if anything.
    fn event(&mut self, ev: &Value) -> Option<Value> {
        let text = ev["text"].as_str().unwrap_or_default();
        match ev["type"].as_str()? {
            "stdout" => {
                self.stdout.push_str(text);
                Some(json!({"type": "stdout", "data": text}))
            }
            "stderr" => {
                self.stderr.push_str(text);
                Some(json!({"type": "stderr", "data": text}))
            }
            "result" => {
                self.result = Some(text.to_string());
                None
            }
            "file" => {
                self.files.push(json!({"path": ev["path"], "mimeType": ev["mimeType"]}));
                Some(json!({"type": "file", "path": ev["path"], "mimeType": ev["mimeType"]}))
            }
            "end" => {
                self.ended = true;
                self.is_error = ev["isError"].as_bool().unwrap_or(false);
                self.timed_out = ev["timedOut"].as_bool().unwrap_or(false);
                self.duration_ms = ev["durationMs"].as_f64().unwrap_or(0.0);
                self.error = ev.get("error").filter(|e| !e.is_null()).cloned();
                None
            }
            _ => None,
        }
    }

    fn fail(&mut self, message: String) {
        self.ended = true;
        self.is_error = true;
        self.error = Some(json!({"name": "InterpreterUnavailable", "message": message, "traceback": ""}));
    }

    fn result(&self, language: &str, images: Vec<Value>) -> Value {
        let mut text = self.stdout.clone();
        text.push_str(&self.stderr);
        if let Some(r) = &self.result {
            text.push_str(r);
            text.push('\n');
        }
        if let Some(e) = &self.error {
            match e["traceback"].as_str().filter(|t| !t.is_empty()) {
                Some(tb) => text.push_str(tb),
                None => text.push_str(&format!(
                    "{}: {}",
                    e["name"].as_str().unwrap_or("Error"),
                    e["message"].as_str().unwrap_or("")
                )),
            }
        }
        let mut content = vec![json!({"type": "text", "text": text})];
        for f in &self.files {
            content.push(
                json!({"type": "resource_link", "uri": format!("file://{}", f["path"].as_str().unwrap_or("")),
                                "name": f["path"], "mimeType": f["mimeType"]}),
            );
        }
        content.extend(images);
        json!({
            "content": content,
            "structuredContent": {
                "language": language,
                "stdout": self.stdout,
                "stderr": self.stderr,
                "result": self.result,
                "files": self.files,
                "error": self.error,
                "executionTime": self.duration_ms / 1000.0,
                "timedOut": self.timed_out,
            },
            "isError": self.is_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_a_tool_result() {
        let mut r = Run::default();
        assert!(r.event(&json!({"type": "stdout", "text": "hi\n"})).is_some());
        assert!(r.event(&json!({"type": "result", "text": "42"})).is_none());
        assert!(r
            .event(&json!({"type": "file", "path": "/tmp/figures/figure-1.png", "mimeType": "image/png"}))
            .is_some());
        r.event(&json!({"type": "end", "isError": true, "timedOut": false, "durationMs": 12.5,
                        "error": {"name": "ZeroDivisionError", "message": "division by zero", "traceback": "Traceback…\nZeroDivisionError: division by zero\n"}}));
        let v = r.result("python", vec![]);
        assert_eq!(v["isError"], true);
        assert_eq!(v["structuredContent"]["result"], "42");
        assert_eq!(v["structuredContent"]["error"]["name"], "ZeroDivisionError");
        assert!(v["content"][0]["text"].as_str().unwrap().contains("hi\n42\nTraceback"));
        assert_eq!(v["content"][1]["uri"], "file:///tmp/figures/figure-1.png");
        assert_eq!(language("py"), Some("python"));
        assert_eq!(language("node"), Some("javascript"));
        assert_eq!(language("ruby"), None);
    }
}
