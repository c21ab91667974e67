//! Method + path → handler, and the JSON plumbing around each handler.
//!
//! Every failure becomes a JSON [`ApiError`]; nothing a client sends can
//! panic a handler (bodies are size-limited before they are parsed, paths
//! are matched segment by segment, ids are validated before use).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{ExecBody, Invocation, PinEndpoint};
use crate::body::{full, ChannelBody, ResponseBody};
use crate::{ApiError, Node};

/// Largest JSON body a node route accepts (exec stdin included).
pub const MAX_JSON_BODY: usize = 16 << 20;

/// Answers one request.
pub async fn handle<N: Node>(node: Arc<N>, req: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let result = route(&node, req, started).await;
    let response = result.unwrap_or_else(|e| error_response(&e));
    tracing::debug!(%method, %path, status = response.status().as_u16(), us = started.elapsed().as_micros() as u64, "request");
    response
}

/// The OpenAPI 3.0 document of these routes, served at `GET /openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Every (method, path template) [`route`] answers, with `{param}` for a
/// path segment. `agentd/tests/openapi.rs` holds this table to
/// `control-api/openapi.json` (the same set of routes, each one routed by a
/// real agentd): a route added here or there must be added to both.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/pools"),
    ("GET", "/v1/images"),
    ("POST", "/v1/images"),
    ("DELETE", "/v1/images/{name}"),
    ("POST", "/v1/sessions"),
    ("GET", "/v1/sessions"),
    ("GET", "/v1/sessions/{id}"),
    ("DELETE", "/v1/sessions/{id}"),
    ("POST", "/v1/sessions/{id}/exec"),
    ("POST", "/v1/sessions/{id}/exec/stream"),
    ("POST", "/v1/runtimes"),
    ("GET", "/v1/runtimes"),
    ("GET", "/v1/runtimes/{name}"),
    ("DELETE", "/v1/runtimes/{name}"),
    ("POST", "/v1/runtimes/{name}/versions"),
    ("GET", "/v1/runtimes/{name}/versions"),
    ("PUT", "/v1/runtimes/{name}/endpoints/{endpoint}"),
    ("POST", "/v1/runtimes/{name}/invocations"),
    ("POST", "/v1/code-interpreter/sessions"),
    ("GET", "/v1/code-interpreter/sessions/{id}"),
    ("DELETE", "/v1/code-interpreter/sessions/{id}"),
    ("POST", "/v1/code-interpreter/sessions/{id}/invoke"),
    ("POST", "/v1/code-interpreter/sessions/{id}/invoke/stream"),
];

async fn route<N: Node>(
    node: &Arc<N>,
    req: Request<Incoming>,
    started: Instant,
) -> Result<Response<ResponseBody>, ApiError> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let method = req.method().clone();
    match (segments.as_slice(), &method) {
        (["healthz"], &Method::GET) => json(StatusCode::OK, &node.health()),
        (["metrics"], &Method::GET) => {
            let mut r = Response::new(full(node.metrics()));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            Ok(r)
        }
        (["openapi.json"], &Method::GET) => {
            let mut r = Response::new(full(OPENAPI_JSON));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(r)
        }
        (["v1", "pools"], &Method::GET) => json(StatusCode::OK, &node.pools()),
        (["v1", "images"], &Method::GET) => json(StatusCode::OK, &node.list_images()?),
        (["v1", "images"], &Method::POST) => {
            let body = read_json(req).await?;
            json(StatusCode::CREATED, &node.import_image(body).await?)
        }
        (["v1", "images", name], &Method::DELETE) => json(StatusCode::OK, &node.delete_image(name.to_string()).await?),
        (["v1", "sessions"], &Method::POST) => {
            let body = read_json(req).await?;
            let info = node.create_session(body).await?;
            let boot_ns = (info.boot_ms * 1e6) as u64;
            let mut r = json(StatusCode::CREATED, &info)?;
            set_server_timing(&mut r, started, "boot", boot_ns);
            Ok(r)
        }
        (["v1", "sessions"], &Method::GET) => json(StatusCode::OK, &node.list_sessions()?),
        (["v1", "sessions", id], &Method::GET) => json(StatusCode::OK, &node.get_session(check_id(id)?)?),
        (["v1", "sessions", id], &Method::DELETE) => {
            let id = check_id(id)?.to_string();
            json(StatusCode::OK, &node.delete_session(id).await?)
        }
        (["v1", "sessions", id, "exec"], &Method::POST) => {
            let id = check_id(id)?.to_string();
            let body: ExecBody = read_json(req).await?;
            check_exec(&body)?;
            let (result, timing) = node.exec(id, body).await?;
            let mut r = json(StatusCode::OK, &result)?;
            set_server_timing(&mut r, started, "guest", timing.guest_ns);
            Ok(r)
        }
        (["v1", "sessions", id, "exec", "stream"], &Method::POST) => {
            let id = check_id(id)?.to_string();
            let body: ExecBody = read_json(req).await?;
            check_exec(&body)?;
            let events = node.exec_stream(id, body).await?;
            Ok(ndjson_stream(events))
        }
        (["v1", "runtimes"], &Method::POST) => {
            let body = read_json(req).await?;
            json(StatusCode::CREATED, &node.create_runtime(body)?)
        }
        (["v1", "runtimes"], &Method::GET) => json(StatusCode::OK, &node.list_runtimes()?),
        (["v1", "runtimes", name], &Method::GET) => json(StatusCode::OK, &node.get_runtime(name)?),
        (["v1", "runtimes", name], &Method::DELETE) => {
            let force = query_flag(req.uri().query(), "force")?;
            json(StatusCode::OK, &node.delete_runtime(name.to_string(), force).await?)
        }
        (["v1", "runtimes", name, "versions"], &Method::POST) => {
            let name = name.to_string();
            let body = read_json(req).await?;
            json(StatusCode::CREATED, &node.add_runtime_version(&name, body)?)
        }
        (["v1", "runtimes", name, "versions"], &Method::GET) => json(StatusCode::OK, &node.runtime_versions(name)?),
        (["v1", "runtimes", name, "endpoints", endpoint], &Method::PUT) => {
            let (name, endpoint) = (name.to_string(), endpoint.to_string());
            let body: PinEndpoint = read_json(req).await?;
            json(StatusCode::OK, &node.pin_endpoint(&name, &endpoint, body.version)?)
        }
        (["v1", "runtimes", name, "invocations"], &Method::POST) => {
            let name = name.to_string();
            invoke(node, name, req).await
        }
        (["v1", "code-interpreter", "sessions"], &Method::POST) => {
            let body = read_json(req).await?;
            json(StatusCode::CREATED, &node.create_code_session(body).await?)
        }
        (["v1", "code-interpreter", "sessions", id], &Method::GET) => {
            json(StatusCode::OK, &node.get_session(check_id(id)?)?)
        }
        (["v1", "code-interpreter", "sessions", id], &Method::DELETE) => {
            let id = check_id(id)?.to_string();
            json(StatusCode::OK, &node.delete_code_session(id).await?)
        }
        (["v1", "code-interpreter", "sessions", id, "invoke"], &Method::POST) => {
            let id = check_id(id)?.to_string();
            let call = read_json(req).await?;
            json(StatusCode::OK, &node.invoke_tool(id, call).await?)
        }
        (["v1", "code-interpreter", "sessions", id, "invoke", "stream"], &Method::POST) => {
            let id = check_id(id)?.to_string();
            let call = read_json(req).await?;
            let events = node.invoke_tool_stream(id, call).await?;
            Ok(ndjson_stream(events))
        }
        (["v1", "code-interpreter", "sessions"], _)
        | (["v1", "code-interpreter", "sessions", _], _)
        | (["v1", "code-interpreter", "sessions", _, "invoke"], _)
        | (["v1", "code-interpreter", "sessions", _, "invoke", "stream"], _)
        | (["v1", "runtimes"], _)
        | (["v1", "runtimes", _, "invocations"], _)
        | (["v1", "runtimes", _], _)
        | (["v1", "runtimes", _, "versions"], _)
        | (["v1", "runtimes", _, "endpoints", _], _)
        | (["v1", "images"], _)
        | (["v1", "images", _], _) => Err(ApiError::method_not_allowed(format!(
            "{method} is not allowed on {path}"
        ))),
        (["healthz"] | ["metrics"] | ["openapi.json"] | ["v1", "pools"], _)
        | (["v1", "sessions"], _)
        | (["v1", "sessions", _], _)
        | (["v1", "sessions", _, "exec"], _)
        | (["v1", "sessions", _, "exec", "stream"], _) => Err(ApiError::method_not_allowed(format!(
            "{method} is not allowed on {path}"
        ))),
        _ => Err(ApiError::not_found(format!("no route {method} {path}"))),
    }
}

/// Largest invocation body.
pub const MAX_INVOCATION_BODY: u64 = 100 * 1000 * 1000;

/// Headers an invocation passes to the agent.
const FORWARDED: [&str; 6] = [
    "content-type",
    "accept",
    "traceparent",
    "tracestate",
    "baggage",
    "user-agent",
];

/// `POST /v1/runtimes/{name}/invocations`: the body is streamed to the
/// guest as it arrives and the agent's answer streamed back as it comes.
async fn invoke<N: Node>(
    node: &Arc<N>,
    runtime: String,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    let endpoint = query_value(req.uri().query(), "endpoint");
    let h = req.headers();
    let session_id = match h.get("x-session-id") {
        None => None,
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| ApiError::bad_request("X-Session-Id must be visible ASCII"))?;
            if !(33..=256).contains(&s.len()) || !s.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ApiError::bad_request(format!(
                    "X-Session-Id must be 33 to 256 visible ASCII characters; got {} characters",
                    s.len()
                )));
            }
            Some(s.to_string())
        }
    };
    let content_length = match h.get(hyper::header::CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("Content-Length is not a number"))?,
        ),
    };
    if content_length.is_some_and(|l| l > MAX_INVOCATION_BODY) {
        return Err(ApiError::too_large(format!(
            "invocation bodies are limited to {MAX_INVOCATION_BODY} bytes"
        )));
    }
    let headers = FORWARDED
        .iter()
        .filter_map(|name| {
            h.get(*name)
                .and_then(|v| v.to_str().ok())
                .map(|v| (name.to_string(), v.to_string()))
        })
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            let item = match frame {
                Ok(f) => match f.into_data() {
                    Ok(d) => {
                        total += d.len() as u64;
                        if total > MAX_INVOCATION_BODY {
                            Err(format!("the body is over the {MAX_INVOCATION_BODY}-byte limit"))
                        } else {
                            Ok(d)
                        }
                    }
                    Err(_) => continue,
                },
                Err(e) => Err(format!("reading the request body: {e}")),
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    let inv = Invocation {
        session_id,
        endpoint,
        headers,
        content_length,
        body: rx,
    };
    let answer = node.invoke(runtime, inv).await?;
    // The agent's body goes out as it comes: the node's channel is the
    // response body itself, no copy through another task.
    let mut r = Response::new(ChannelBody::from_receiver(answer.body));
    *r.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (k, v) in &answer.headers {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            r.headers_mut().append(k, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&answer.session_id) {
        r.headers_mut().insert("x-session-id", v);
    }
    Ok(r)
}

/// A query parameter's raw value.
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// A boolean query parameter (`?force=true`); absent is false.
fn query_flag(query: Option<&str>, name: &str) -> Result<bool, ApiError> {
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        if k == name {
            return match v {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                other => Err(ApiError::bad_request(format!(
                    "query parameter {name}={other:?}: expected true or false"
                ))),
            };
        }
    }
    Ok(false)
}

/// Session ids are generated by the node; anything else cannot name one.
fn check_id(id: &str) -> Result<&str, ApiError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(ApiError::bad_request(format!(
            "session id {:?} is malformed: expected up to 64 letters, digits or '-'",
            id.chars().take(80).collect::<String>()
        )));
    }
    Ok(id)
}

fn check_exec(body: &ExecBody) -> Result<(), ApiError> {
    if body.argv.is_empty() || body.argv[0].is_empty() {
        return Err(ApiError::bad_request("argv must name a program: it is empty"));
    }
    if let Some(t) = body.timeout_s {
        if !(t.is_finite() && t > 0.0 && t <= 86_400.0) {
            return Err(ApiError::bad_request(format!(
                "timeout_s {t} is out of range: expected 0 < timeout_s <= 86400"
            )));
        }
    }
    if let Some(bad) = body.argv.iter().chain(body.env.keys()).find(|s| s.contains('\0')) {
        return Err(ApiError::bad_request(format!("{bad:?} contains a NUL byte")));
    }
    Ok(())
}

async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = Limited::new(req.into_body(), MAX_JSON_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                ApiError::too_large(format!("request body is over the {MAX_JSON_BODY}-byte limit"))
            } else {
                ApiError::bad_request(format!("reading the request body: {e}"))
            }
        })?
        .to_bytes();
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty: expected a JSON object",
        ));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Result<Response<ResponseBody>, ApiError> {
    let bytes = serde_json::to_vec(value).map_err(|e| ApiError::internal(format!("encoding the response: {e}")))?;
    let mut r = Response::new(full(bytes));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

/// The JSON response for an error.
pub fn error_response(e: &ApiError) -> Response<ResponseBody> {
    let mut r = Response::new(full(e.to_json()));
    *r.status_mut() = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(s) = e.retry_after_s {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
    }
    if e.status == 413 {
        // The rest of the body was never read: the connection cannot carry
        // another request, and the client must know not to reuse it.
        r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// `Server-Timing: host;dur=…, <other>;dur=…` (ms). For an exec the other
/// share is the guest's: from writing the request to its socket to reading
/// the reply; for a session it is the boot of a guest made on demand. The
/// host's share is everything else from request in to response out.
fn set_server_timing(r: &mut Response<ResponseBody>, started: Instant, other: &str, other_ns: u64) {
    let total = started.elapsed().as_nanos() as u64;
    let host = total.saturating_sub(other_ns);
    let value = format!(
        "host;dur={:.3}, {other};dur={:.3}",
        host as f64 / 1e6,
        other_ns as f64 / 1e6
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        r.headers_mut().insert("server-timing", v);
    }
}

fn ndjson_stream<T: Serialize + Send + 'static>(mut events: tokio::sync::mpsc::Receiver<T>) -> Response<ResponseBody> {
    let (tx, body) = ChannelBody::channel(16);
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            let mut line = serde_json::to_vec(&ev).unwrap_or_default();
            line.push(b'\n');
            if tx.send(Bytes::from(line)).await.is_err() {
                // The client went away; dropping `events` tells the node.
                break;
            }
        }
    });
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_checked_before_use() {
        assert!(check_id("ses-0123abcd").is_ok());
        for bad in ["", "a/b", "a b", "ä", &"x".repeat(65)] {
            let e = check_id(bad).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains("malformed"), "{e}");
        }
    }

    #[test]
    fn exec_bodies_are_validated() {
        let ok = ExecBody {
            argv: vec!["true".into()],
            ..Default::default()
        };
        assert!(check_exec(&ok).is_ok());
        for (body, needle) in [
            (ExecBody::default(), "argv"),
            (
                ExecBody {
                    timeout_s: Some(f64::NAN),
                    ..ok.clone()
                },
                "timeout_s",
            ),
            (
                ExecBody {
                    argv: vec!["a\0b".into()],
                    ..ok.clone()
                },
                "NUL",
            ),
        ] {
            let e = check_exec(&body).unwrap_err();
            assert!(e.message.contains(needle), "{e}");
        }
    }

    #[test]
    fn errors_render_as_json_with_status_and_retry_after() {
        let r = error_response(&ApiError::capacity("full", 7));
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[RETRY_AFTER], "7");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        let v: serde_json::Value = serde_json::from_str(&ApiError::not_found("no x").to_json()).unwrap();
        assert_eq!(v, serde_json::json!({"code": "not_found", "message": "no x"}));
    }
}
