//! The sample agent's contract, against the real binary on a free port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren-sample-agent"))
        .args(["--host", "127.0.0.1", "--port", "0"])
        .env("WARREN_SAMPLE_GREETING", "hello from the env")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    Server { child, port }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .into()
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn ping(&self) -> serde_json::Value {
        let mut r = agent().get(self.url("/ping")).call().unwrap();
        assert_eq!(r.status(), 200);
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    }
}

#[test]
fn ping_says_healthy() {
    let s = start();
    assert_eq!(s.ping(), serde_json::json!({ "status": "Healthy" }));
}

#[test]
fn invocation_answers_json_with_headers_env_and_digest() {
    let s = start();
    let body = br#"{"prompt": "what is 2+2?"}"#;
    let mut r = agent()
        .post(s.url("/invocations"))
        .header("X-Session-Id", "sess-42")
        .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .header("Content-Type", "application/json")
        .send(&body[..])
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "response": "you said: what is 2+2?",
            "received_bytes": body.len(),
            "sha256": format!("{:x}", Sha256::digest(body)),
            "session_id": "sess-42",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "env": { "WARREN_SAMPLE_GREETING": "hello from the env" },
        })
    );
}

#[test]
fn large_bodies_are_counted_and_hashed() {
    let s = start();
    let data: Vec<u8> = (0..(12usize << 20)).map(|i| (i % 253) as u8).collect();
    let mut r = agent().post(s.url("/invocations")).send(&data[..]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(v["received_bytes"], data.len());
    assert_eq!(v["sha256"], format!("{:x}", Sha256::digest(&data)));
    assert_eq!(v["session_id"], serde_json::Value::Null);
    assert_eq!(v["traceparent"], serde_json::Value::Null);
}

/// Reads an event stream, noting when each event arrived.
fn read_events(reader: &mut impl Read) -> Vec<(Duration, String)> {
    let start = Instant::now();
    let mut events = Vec::new();
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            assert!(pending.is_empty(), "trailing bytes {pending:?}");
            return events;
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            events.push((start.elapsed(), String::from_utf8(event).unwrap()));
        }
    }
}

fn check_events(events: &[(Duration, String)], answer: &str) {
    assert_eq!(events.len(), 6, "{events:?}");
    for (i, (_, e)) in events[..5].iter().enumerate() {
        let json: serde_json::Value = serde_json::from_str(e.strip_prefix("data: ").unwrap().trim()).unwrap();
        assert_eq!(json["chunk"], i);
        assert_eq!(json["text"], format!("{answer} [{}/5]", i + 1));
    }
    assert_eq!(events[5].1, "data: [DONE]\n\n");
    // Spaced out as they were made, not delivered at the end.
    let (first, last) = (events[0].0, events[4].0);
    assert!(
        last >= first + Duration::from_millis(600),
        "first event at {first:?}, fifth at {last:?}: the stream was buffered"
    );
}

#[test]
fn event_stream_when_asked_by_accept_header_and_busy_meanwhile() {
    let s = start();
    let mut r = agent()
        .post(s.url("/invocations"))
        .header("Accept", "text/event-stream")
        .send(&br#"{"prompt": "stream it"}"#[..])
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["transfer-encoding"], "chunked");
    assert_eq!(s.ping()["status"], "HealthyBusy");
    let events = read_events(&mut r.body_mut().as_reader());
    check_events(&events, "you said: stream it");
    assert_eq!(s.ping()["status"], "Healthy");
}

#[test]
fn event_stream_when_asked_in_the_body() {
    let s = start();
    let mut r = agent()
        .post(s.url("/invocations"))
        .send(&br#"{"prompt": "hi", "stream": true}"#[..])
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    check_events(&read_events(&mut r.body_mut().as_reader()), "you said: hi");
}

/// Echo of 16 MiB with a client that writes and reads at once (the server
/// answers while it reads, so a client that did not read would stall).
#[test]
fn echo_streams_the_body_back() {
    let s = start();
    const TOTAL: usize = 16 << 20;
    let data: Vec<u8> = (0..TOTAL).map(|i| (i * 13 % 251) as u8).collect();
    let mut conn = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut writer = conn.try_clone().unwrap();
    let sent = data.clone();
    let w = std::thread::spawn(move || {
        write!(
            writer,
            "POST /invocations HTTP/1.1\r\nHost: x\r\nX-Sample-Mode: echo\r\nContent-Length: {TOTAL}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        for piece in sent.chunks(100_000) {
            writer.write_all(piece).unwrap();
        }
    });
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    w.join().unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: application/octet-stream"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    // De-chunk.
    let mut rest = &raw[split + 4..];
    let mut body = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let len = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16).unwrap();
        rest = &rest[eol + 2..];
        if len == 0 {
            break;
        }
        body.extend_from_slice(&rest[..len]);
        rest = &rest[len + 2..];
    }
    assert_eq!(body.len(), TOTAL);
    assert!(body == data, "the echo differs");
}

#[test]
fn unknown_routes_and_methods_are_refused() {
    let s = start();
    let r = agent().get(s.url("/nowhere")).call().unwrap();
    assert_eq!(r.status(), 404);
    let r = agent().get(s.url("/invocations")).call().unwrap();
    assert_eq!(r.status(), 405);
}
