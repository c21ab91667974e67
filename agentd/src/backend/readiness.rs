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
                if let Ok((Reply::Entrypoint(state), _)) = conn.call(Request::EntrypointStatus).await {
                    match state {
                        EntrypointState::Running { .. } => {}
                        other => return Err(format!("the image's code interpreter is not running: {other:?}")),
                    }
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
    let mut body = Vec::new();
    loop {
        match replies.next().await.map_err(|e| e.to_string())?.0 {
            Reply::HttpChunk { data } => body.extend_from_slice(&data),
            Reply::HttpHead { .. } => {}
            _ => break,
        }
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("GET /health: {e}"))?;
    Ok(v["ready"] == true)
}
