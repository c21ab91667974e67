//! guest-agent's `Http` / `HttpBody` requests against real HTTP servers on
//! 127.0.0.1, the agent served over a Unix socket as in `serve_unix.rs`.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
mod common;

use warren_protocol::client::{AgentClient, ClientError};
use warren_protocol::*;

fn start() -> common::Agent {
    common::start_with(Duration::from_secs(60))
}

/// A tiny_http server on a free port, each request handled by `handler` on
/// its own thread.
fn serve(handler: impl Fn(tiny_http::Request) + Send + Sync + 'static) -> u16 {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            let h = handler.clone();
            std::thread::spawn(move || h(req));
        }
    });
    port
}

fn header(req: &tiny_http::Request, name: &str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_string())
}

fn get(port: u16, path: &str) -> HttpRequest {
    HttpRequest {
        port,
        method: "GET".into(),
        path: path.into(),
        timeout_ms: Some(10_000),
        ..Default::default()
    }
}

/// A response as the host sees it.
#[derive(Debug)]
struct Got {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// When each chunk arrived, from when the response head did.
    chunk_times: Vec<Duration>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn collect(client: &mut AgentClient<UnixStream, UnixStream>, id: RequestId) -> Result<Got, ClientError> {
    let (status, headers) = match client.next_reply(id)? {
        Reply::HttpHead { status, headers } => (status, headers),
        other => panic!("expected a head, got {other:?}"),
    };
    let head_at = Instant::now();
    let mut got = Got {
        status,
        headers,
        body: Vec::new(),
        chunk_times: Vec::new(),
    };
    loop {
        match client.next_reply(id)? {
            Reply::HttpChunk { data } => {
                assert!(data.len() <= MAX_CHUNK);
                got.chunk_times.push(head_at.elapsed());
                got.body.extend(data);
            }
            Reply::Done => return Ok(got),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn guest_error<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorReply {
    match r {
        Err(ClientError::Guest(e)) => e,
        other => panic!("expected a guest error, got {other:?}"),
    }
}

#[test]
fn get_passes_headers_through_both_ways() {
    let port = serve(|req| {
        assert_eq!(req.method().as_str(), "GET");
        let body = format!(
            "url={} session={:?} trace={:?} connection-bogus={:?} ua={:?}",
            req.url(),
            header(&req, "X-Session-Id"),
            header(&req, "traceparent"),
            header(&req, "X-Drop-Me"),
            header(&req, "User-Agent"),
        );
        let resp = tiny_http::Response::from_string(body)
            .with_header(
                "Content-Type: text/plain; charset=utf-8"
                    .parse::<tiny_http::Header>()
                    .unwrap(),
            )
            .with_header("X-Custom: yes".parse::<tiny_http::Header>().unwrap());
        req.respond(resp).unwrap();
    });
    let mut a = start();
    let id = a
        .client
        .send(Request::Http(HttpRequest {
            headers: vec![
                ("X-Session-Id".into(), "sess-1".into()),
                ("traceparent".into(), "00-abc-def-01".into()),
                ("Connection".into(), "close".into()),
                ("Transfer-Encoding".into(), "gzip".into()),
            ],
            ..get(port, "/ping?x=1")
        }))
        .unwrap();
    let got = collect(&mut a.client, id).unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(
        String::from_utf8(got.body.clone()).unwrap(),
        "url=/ping?x=1 session=Some(\"sess-1\") trace=Some(\"00-abc-def-01\") connection-bogus=None ua=None"
    );
    assert_eq!(got.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(got.header("x-custom"), Some("yes"));
    for framing in ["content-length", "transfer-encoding", "connection"] {
        assert_eq!(got.header(framing), None, "{framing} passed through: {:?}", got.headers);
    }
}

fn post_in_pieces(content_length: bool) {
    const TOTAL: usize = 5 << 20;
    let data: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 251) as u8).collect();
    let expected = format!("{} {:x}", TOTAL, Sha256::digest(&data));
    let port = serve(|mut req| {
        let framing = match (header(&req, "Content-Length"), header(&req, "Transfer-Encoding")) {
            (Some(n), None) => format!("length {n}"),
            (None, Some(te)) => format!("te {te}"),
            other => format!("{other:?}"),
        };
        let mut hasher = Sha256::new();
        let mut n = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let k = req.as_reader().read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            n += k;
            hasher.update(&buf[..k]);
        }
        let body = format!("{n} {:x}|{framing}", hasher.finalize());
        req.respond(tiny_http::Response::from_string(body).with_status_code(201))
            .unwrap();
    });
    let mut a = start();
    let mut headers = vec![("Content-Type".into(), "application/octet-stream".into())];
    if content_length {
        headers.push(("Content-Length".into(), TOTAL.to_string()));
    }
    let mut pieces = data.chunks(MAX_CHUNK);
    let id = a
        .client
        .send(Request::Http(HttpRequest {
            method: "POST".into(),
            headers,
            body: pieces.next().unwrap().to_vec(),
            more_body: true,
            ..get(port, "/invocations")
        }))
        .unwrap();
    // At most 4 pieces unanswered, as the host does.
    let mut unanswered = std::collections::VecDeque::new();
    let mut pieces = pieces.peekable();
    while let Some(p) = pieces.next() {
        let end = pieces.peek().is_none();
        if unanswered.len() == 4 {
            let piece = unanswered.pop_front().unwrap();
            assert_eq!(a.client.next_reply(piece).unwrap(), Reply::Done);
        }
        unanswered.push_back(
            a.client
                .send(Request::HttpBody {
                    request: id,
                    data: p.to_vec(),
                    end,
                })
                .unwrap(),
        );
    }
    for piece in unanswered {
        assert_eq!(a.client.next_reply(piece).unwrap(), Reply::Done);
    }
    let got = collect(&mut a.client, id).unwrap();
    assert_eq!(got.status, 201);
    let body = String::from_utf8(got.body).unwrap();
    let (digest, framing) = body.split_once('|').unwrap();
    assert_eq!(digest, expected);
    if content_length {
        assert_eq!(framing, format!("length {TOTAL}"));
    } else {
        assert_eq!(framing, "te chunked");
    }
    // The request is over: more body for it is refused.
    let e = guest_error(a.client.call(Request::HttpBody {
        request: id,
        data: vec![1],
        end: true,
    }));
    assert_eq!(e.kind, ErrorKind::InvalidRequest);
}

#[test]
fn post_body_in_many_pieces_chunked() {
    post_in_pieces(false);
}

#[test]
fn post_body_in_many_pieces_with_content_length() {
    post_in_pieces(true);
}

/// A server-sent-event response, one event every 200 ms, each flushed as
/// its own HTTP chunk (tiny_http's `Response` would buffer them).
#[test]
fn event_stream_arrives_event_by_event() {
    let port = serve(|req| {
        let mut w = req.into_writer();
        w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        w.flush().unwrap();
        for i in 0..5 {
            std::thread::sleep(Duration::from_millis(200));
            let event = format!("data: {{\"chunk\": {i}}}\n\n");
            write!(w, "{:x}\r\n{event}\r\n", event.len()).unwrap();
            w.flush().unwrap();
        }
        w.write_all(b"0\r\n\r\n").unwrap();
        w.flush().unwrap();
    });
    let mut a = start();
    let id = a
        .client
        .send(Request::Http(HttpRequest {
            method: "POST".into(),
            headers: vec![("Accept".into(), "text/event-stream".into())],
            body: b"{}".to_vec(),
            ..get(port, "/invocations")
        }))
        .unwrap();
    let got = collect(&mut a.client, id).unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("text/event-stream"));
    let expected: String = (0..5).map(|i| format!("data: {{\"chunk\": {i}}}\n\n")).collect();
    assert_eq!(String::from_utf8(got.body.clone()).unwrap(), expected);
    assert_eq!(got.chunk_times.len(), 5, "one chunk per event: {:?}", got.chunk_times);
    let (first, last) = (got.chunk_times[0], *got.chunk_times.last().unwrap());
    assert!(
        last >= first + Duration::from_millis(600),
        "first chunk at {first:?}, last at {last:?}: the stream was buffered"
    );
}

#[test]
fn error_statuses_are_responses() {
    let port = serve(|req| {
        req.respond(tiny_http::Response::from_string("no such thing").with_status_code(404))
            .unwrap();
    });
    let mut a = start();
    let id = a.client.send(Request::Http(get(port, "/nope"))).unwrap();
    let got = collect(&mut a.client, id).unwrap();
    assert_eq!(got.status, 404);
    assert_eq!(got.body, b"no such thing");
}

#[test]
fn unreachable_server_is_an_io_error_naming_the_address() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut a = start();
    let e = guest_error(a.client.call(Request::Http(get(port, "/ping"))));
    assert_eq!(e.kind, ErrorKind::Io);
    assert!(
        e.message
            .starts_with(&format!("cannot reach the agent at 127.0.0.1:{port}: ")),
        "{}",
        e.message
    );
    // With more body announced, the pieces the host sends are refused too.
    let id = a
        .client
        .send(Request::Http(HttpRequest {
            method: "POST".into(),
            more_body: true,
            ..get(port, "/invocations")
        }))
        .unwrap();
    let e = guest_error(a.client.next_reply(id));
    assert_eq!(e.kind, ErrorKind::Io);
    let e = guest_error(a.client.call(Request::HttpBody {
        request: id,
        data: vec![0; 10],
        end: false,
    }));
    assert!(matches!(e.kind, ErrorKind::Io | ErrorKind::InvalidRequest), "{e:?}");
    a.client.ping(1).unwrap();
}

#[test]
fn a_silent_server_times_out() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (_s, _) = l.accept().unwrap();
        std::thread::sleep(Duration::from_secs(30));
    });
    let mut a = start();
    let t = Instant::now();
    let e = guest_error(a.client.call(Request::Http(HttpRequest {
        timeout_ms: Some(300),
        ..get(port, "/ping")
    })));
    assert_eq!(e.kind, ErrorKind::Io);
    assert!(e.message.contains("within 300 ms"), "{}", e.message);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn body_for_an_unknown_request_is_invalid() {
    let mut a = start();
    let e = guest_error(a.client.call(Request::HttpBody {
        request: 12345,
        data: b"stray".to_vec(),
        end: false,
    }));
    assert_eq!(e.kind, ErrorKind::InvalidRequest);
    assert!(e.message.contains("12345"), "{}", e.message);
}

#[test]
fn many_requests_in_flight_are_answered_by_id() {
    let port = serve(|req| {
        let n: u64 = req.url().trim_start_matches("/n/").parse().unwrap();
        std::thread::sleep(Duration::from_millis(n % 4 * 50));
        req.respond(tiny_http::Response::from_string(format!("answer {n}")))
            .unwrap();
    });
    let mut a = start();
    let ids: Vec<_> = (0..24)
        .map(|n| a.client.send(Request::Http(get(port, &format!("/n/{n}")))).unwrap())
        .collect();
    a.client.ping(7).unwrap();
    for (n, id) in ids.into_iter().enumerate() {
        let got = collect(&mut a.client, id).unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.body, format!("answer {n}").as_bytes());
    }
}
