//! What the routes need from the daemon behind them.

use std::future::Future;

use tokio::sync::mpsc;

use crate::api::*;
use crate::ApiError;

/// The node the API serves: agentd implements it; the HTTP layer only maps
/// requests to these calls and their results to responses.
pub trait Node: Send + Sync + 'static {
    /// Binds a ready guest to a new session.
    fn create_session(&self, req: CreateSession) -> impl Future<Output = Result<SessionInfo, ApiError>> + Send;
    /// Every session, running and ended, newest first.
    fn list_sessions(&self) -> Result<Vec<SessionInfo>, ApiError>;
    /// One session.
    fn get_session(&self, id: &str) -> Result<SessionInfo, ApiError>;
    /// Ends a session and returns its final record.
    fn delete_session(&self, id: String) -> impl Future<Output = Result<SessionInfo, ApiError>> + Send;
    /// Runs a command to completion.
    fn exec(
        &self,
        id: String,
        req: ExecBody,
    ) -> impl Future<Output = Result<(ExecResult, GuestTiming), ApiError>> + Send;
    /// Runs a command, streaming its events; the channel ends after `Exit`
    /// or `Error`.
    fn exec_stream(
        &self,
        id: String,
        req: ExecBody,
    ) -> impl Future<Output = Result<mpsc::Receiver<ExecEvent>, ApiError>> + Send;
    /// Creates a runtime and its version 1.
    fn create_runtime(&self, req: CreateRuntime) -> Result<RuntimeInfo, ApiError>;
    /// Every runtime.
    fn list_runtimes(&self) -> Result<Vec<RuntimeInfo>, ApiError>;
    /// One runtime.
    fn get_runtime(&self, name: &str) -> Result<RuntimeInfo, ApiError>;
    /// Adds an immutable version.
    fn add_runtime_version(&self, name: &str, spec: RuntimeSpec) -> Result<RuntimeVersion, ApiError>;
    /// Every version, oldest first.
    fn runtime_versions(&self, name: &str) -> Result<Vec<RuntimeVersion>, ApiError>;
    /// Points a named endpoint at a version.
    fn pin_endpoint(&self, name: &str, endpoint: &str, version: u32) -> Result<RuntimeInfo, ApiError>;
    /// Deletes a runtime (refused while its sessions run, unless `force`).
    fn delete_runtime(&self, name: String, force: bool) -> impl Future<Output = Result<RuntimeInfo, ApiError>> + Send;
    /// Forwards an invocation to the agent in the session's guest (made on
    /// first use of its session id).
    fn invoke(
        &self,
        runtime: String,
        inv: Invocation,
    ) -> impl Future<Output = Result<InvocationResponse, ApiError>> + Send;
    /// Starts a code-interpreter session.
    fn create_code_session(
        &self,
        req: CreateCodeSession,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;
    /// Runs one tool; the result is `{content, structuredContent, isError}`.
    fn invoke_tool(
        &self,
        id: String,
        call: ToolCall,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;
    /// Runs `executeCommand` or `executeCode`, streaming `stdout` and
    /// `stderr` events and then the `result`.
    fn invoke_tool_stream(
        &self,
        id: String,
        call: ToolCall,
    ) -> impl Future<Output = Result<mpsc::Receiver<serde_json::Value>, ApiError>> + Send;
    /// Ends a code-interpreter session.
    fn delete_code_session(&self, id: String) -> impl Future<Output = Result<SessionInfo, ApiError>> + Send;
    /// The images sessions and runtimes can name.
    fn list_images(&self) -> Result<Vec<ImageInfo>, ApiError>;
    /// Imports an OCI image into the image store.
    fn import_image(&self, req: ImportImage) -> impl Future<Output = Result<ImageInfo, ApiError>> + Send;
    /// Removes an imported image.
    fn delete_image(&self, name: String) -> impl Future<Output = Result<ImageInfo, ApiError>> + Send;
    /// Liveness and the node's backend.
    fn health(&self) -> Health;
    /// Pool state per key.
    fn pools(&self) -> Vec<PoolInfo>;
    /// Prometheus text exposition.
    fn metrics(&self) -> String;
}
