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
use warren_protocol::{ErrorKind, HttpRequest, Reply, Request};

use super::exec::guest_error;
use crate::guest_conn::{ConnError, Replies};
use crate::session::Session;

/// How long a first call waits for the interpreter server to listen (it
/// starts with the guest; under emulation it can take a while).
const READY_WAIT: Duration = Duration::from_secs(60);
/// Largest figure attached inline to a result.
const MAX_INLINE_FIGURE: usize = 8 << 20;
/// Largest code sent (it travels in one protocol frame).
const MAX_CODE: usize = 512 << 10;
/// Output kept for the result, per stream (the oldest is dropped; all of
/// it was streamed as it came).
const KEEP: usize = 1 << 20;
/// Longest event line, and largest answer to a small request: the server
/// in the guest is the session's to replace, so nothing it sends may grow
/// agentd without bound.
const MAX_LINE: usize = 4 << 20;
/// Silence after which a stream gets a `keepalive` event.
const KEEPALIVE: Duration = Duration::from_secs(2);

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
async fn post(
    s: &Session,
    port: u16,
    path: &str,
    body: Vec<u8>,
    timeout_ms: u64,
) -> Result<(u16, Head, Replies), ApiError> {
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
                timeout_ms: Some(timeout_ms),
            }))
            .await
            .map_err(|e| guest_error(&id, e))?;
        match replies.next().await {
            Ok((Reply::HttpHead { status, headers }, _)) => return Ok((status, headers, replies)),
            Ok((other, _)) => {
                return Err(ApiError::internal(format!(
                    "the guest answered an interpreter request with {other:?}"
                )))
            }
            // Only a refused connection is the server not up yet; a timeout
            // must not be sent again (the request may be running).
            Err(ConnError::Guest(g))
                if g.kind == ErrorKind::Io && g.message.contains("cannot reach") && started.elapsed() < READY_WAIT =>
            {
                if let Some(why) = crate::backend::readiness::entrypoint_gone(&s.guest.conn).await {
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

/// Response headers.
type Head = Vec<(String, String)>;

/// Asks the interpreter to stop what runs in `language` (best effort).
async fn interrupt(s: &Session, port: u16, language: &str, job: Option<u64>) {
    let body = json!({ "language": language, "job": job }).to_string().into_bytes();
    if let Ok((_, _, mut replies)) = post(s, port, "/interrupt", body, 5_000).await {
        let _ = replies.http_body(MAX_LINE).await;
    }
}

/// `clearContext`: a fresh interpreter state for `language` (both when
/// None).
pub async fn clear(s: &Arc<Session>, port: u16, language: Option<&'static str>) -> Result<Value, ApiError> {
    let id = s.snapshot().id;
    let (status, _, mut replies) = post(
        s,
        port,
        "/reset",
        json!({ "language": language }).to_string().into_bytes(),
        // A reset waits for a running cell to end: give it time.
        600_000,
    )
    .await?;
    let body = replies.http_body(MAX_LINE).await.map_err(|e| guest_error(&id, e))?;
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
    if code.len() > MAX_CODE {
        return Err(ApiError::new(
            413,
            "payload_too_large",
            format!("executeCode: the code is {} bytes; at most {MAX_CODE}", code.len()),
        ));
    }
    let req = json!({"language": language, "code": code, "timeout_ms": timeout_ms});
    let (status, head, mut replies) = post(s, port, "/execute", req.to_string().into_bytes(), 10_000).await?;
    // Which run to stop if the client goes away (not one queued after it).
    let job = head
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-warren-job"))
        .and_then(|(_, v)| v.parse::<u64>().ok());
    if status != 200 {
        let body = replies.http_body(MAX_LINE).await.map_err(|e| guest_error(&id, e))?;
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
        // A silent cell writes nothing, and a client that went away is only
        // noticed when a write to it fails: a keepalive event after every
        // KEEPALIVE of silence makes that happen.
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        loop {
            let next = tokio::select! {
                r = replies.next() => r,
                _ = keepalive.tick() => {
                    if tx.send(json!({"type": "keepalive"})).await.is_err() {
                        interrupt(&s, port, language, job).await;
                        return;
                    }
                    continue;
                }
                // The client went away: the cell may print nothing for a
                // long time, so do not wait for a failed send to notice.
                _ = tx.closed() => {
                    interrupt(&s, port, language, job).await;
                    return;
                }
            };
            keepalive.reset();
            let data = match next {
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
            if pending.len() > MAX_LINE && !pending.contains(&b'\n') {
                run.fail(format!("the interpreter sent a line longer than {MAX_LINE} bytes"));
                interrupt(&s, port, language, job).await;
                break;
            }
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                if let Some(forward) = run.event(&ev) {
                    if tx.send(forward).await.is_err() {
                        interrupt(&s, port, language, job).await;
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
                keep(&mut self.stdout, text);
                Some(json!({"type": "stdout", "data": text}))
            }
            "stderr" => {
                keep(&mut self.stderr, text);
                Some(json!({"type": "stderr", "data": text}))
            }
            "result" => {
                self.result = Some(text.to_string());
                None
            }
            "file" if self.files.len() < 64 => {
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

/// Appends `text`, keeping the last [`KEEP`] bytes (cut on a character
/// boundary).
fn keep(buf: &mut String, text: &str) {
    buf.push_str(text);
    if buf.len() > KEEP {
        let mut cut = buf.len() - KEEP;
        while !buf.is_char_boundary(cut) {
            cut += 1;
        }
        buf.drain(..cut);
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

    #[test]
    fn kept_output_is_bounded_and_stays_utf8() {
        let mut b = String::new();
        for _ in 0..3 {
            keep(&mut b, &"é".repeat(KEEP / 2));
        }
        assert!(b.len() <= KEEP && b.len() > KEEP - 4);
        assert!(b.chars().all(|c| c == 'é'));
    }
}
