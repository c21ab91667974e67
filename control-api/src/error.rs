//! API errors: a status, a stable machine-readable code and a message that
//! names what was wrong.

use serde::Serialize;

/// An error answered to a client as `{"code": …, "message": …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    #[serde(skip)]
    pub status: u16,
    /// Stable code (`bad_request`, `not_found`, `conflict`, `capacity`, …).
    pub code: String,
    /// What was wrong, for a person.
    pub message: String,
    /// Seconds for a `Retry-After` header (429 and 503).
    #[serde(skip)]
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    /// An error with any status and code.
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "bad_request", message)
    }

    /// 404: no such resource.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found", message)
    }

    /// 405: the path exists, the method does not.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "method_not_allowed", message)
    }

    /// 409: the resource is in a state that forbids the request.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, "conflict", message)
    }

    /// 413: the body is over the route's limit.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(413, "payload_too_large", message)
    }

    /// 429: the host is at capacity; retry after `retry_after_s`.
    pub fn capacity(message: impl Into<String>, retry_after_s: u64) -> Self {
        ApiError {
            retry_after_s: Some(retry_after_s),
            ..Self::new(429, "capacity", message)
        }
    }

    /// 503: the node cannot serve this now (draining, backend failing).
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            retry_after_s: Some(5),
            ..Self::new(503, "unavailable", message)
        }
    }

    /// 500: a fault on our side.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }

    /// The JSON body.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| r#"{"code":"internal","message":"unprintable error"}"#.into())
    }
}
