//! Warren's control API: HTTP/1.1 + JSON on hyper, served on loopback TCP and
//! on a Unix socket.
//!
//! This crate owns the wire surface only — routing, body limits, JSON
//! errors, streaming responses, timing headers. What the routes do is the
//! [`Node`] trait, which `agentd` implements with its pool and sessions; the
//! HTTP layer never sees a VM, so the same routes serve both isolation
//! backends.
//!
//! - [`api`]: request and response bodies.
//! - [`error`]: [`ApiError`], rendered as `{"code", "message"}` with its status.
//! - [`node`]: the [`Node`] trait.
//! - [`router`]: method + path → handler.
//! - [`server`]: accept loops on TCP and Unix listeners, graceful stop.
//! - [`body`]: a response body fed by a channel, for streamed output.

pub mod api;
pub mod body;
pub mod error;
pub mod node;
pub mod router;
pub mod server;

pub use error::ApiError;
pub use node::Node;
pub use server::{serve, Listeners, ServeError};
