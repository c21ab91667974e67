//! A guest of an image with a code interpreter is ready when the
//! interpreter is: its server answers `GET /health` with `ready: true`
//! (libraries preloaded, node started). Until then a pool guest would
//! hand its session a first call that waits for the preload, so the wait
//! is part of the boot.

use std::time::{Duration, Instant};

use warren_protocol::{EntrypointState, HttpRequest, Reply, Request};

use crate::guest_conn::GuestConn;

/// Waits until the interpreter on `port` says it is ready; Err says why
/// it never will be (the entrypoint ended) or that `timeout` passed.
pub async fn wait_for_interpreter(conn: &GuestConn, port: u16, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::from("no answer yet");
    while started.elapsed() < timeout {
        match health(conn, port).await {
            Ok(true) => return Ok(started.elapsed()),
            Ok(false) => last = "the interpreter is still preloading".into(),
            Err(e) => {
                last = e;
                if let Some(why) = entrypoint_gone(conn).await {
                    return Err(why);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!(
        "the code interpreter was not ready within {timeout:?} ({last})"
    ))
}

async fn health(conn: &GuestConn, port: u16) -> Result<bool, String> {
    let mut replies = conn
        .send(Request::Http(HttpRequest {
            port,
            method: "GET".into(),
            path: "/health".into(),
            timeout_ms: Some(5_000),
            ..Default::default()
        }))
        .await
        .map_err(|e| e.to_string())?;
    // /health answers a few dozen bytes.
    let body = replies.http_body(64 << 10).await.map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("GET /health: {e}"))?;
    Ok(v["ready"] == true)
}

/// Why the interpreter will never answer, when its entrypoint is gone.
pub async fn entrypoint_gone(conn: &GuestConn) -> Option<String> {
    match conn.call(Request::EntrypointStatus).await {
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
