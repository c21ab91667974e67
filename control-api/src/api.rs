//! Request and response bodies of the node routes.
//!
//! Requests refuse unknown fields, so a typo (`memory_mb`) is a 400 naming
//! the field rather than a silently ignored setting. Times are Unix
//! milliseconds; durations say their unit in their name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /v1/sessions`. Absent fields take the node's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// Image name (default: the node's default image, `base`).
    #[serde(default)]
    pub image: Option<String>,
    /// vCPUs.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Guest memory.
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Seconds without a request after which the session ends (default 900).
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    /// Seconds after which the session ends whatever it does (default 28,800).
    #[serde(default)]
    pub max_lifetime_s: Option<u64>,
    /// Run a runtime's version instead: its spec gives every field above
    /// (which must then be left out).
    #[serde(default)]
    pub runtime: Option<String>,
    /// The runtime's endpoint (default `DEFAULT`, the latest version).
    #[serde(default)]
    pub endpoint: Option<String>,
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Bound to a guest and serving.
    Running,
    /// Being torn down.
    Ending,
    /// Over; kept with its metering.
    Ended,
}

impl SessionState {
    /// The name used in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Running => "running",
            SessionState::Ending => "ending",
            SessionState::Ended => "ended",
        }
    }
}

/// What a session used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Metering {
    /// On-CPU nanoseconds (every VMM thread, or the sandbox's cgroup).
    pub cpu_ns: u64,
    /// Resident guest memory integrated over the session's life.
    pub memory_gib_s: f64,
    /// Resident memory at the last sample.
    pub memory_bytes: u64,
}

/// The teardown's wipe of what the guest left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scrub {
    /// Bytes overwritten.
    pub bytes: u64,
    /// Time it took.
    pub ns: u64,
}

/// A session as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Session id.
    pub id: String,
    /// State.
    pub state: SessionState,
    /// `microvm` or `namespace`.
    pub backend: String,
    /// The isolation boundary in words (`namespace` says it is weaker).
    pub isolation: String,
    /// Image.
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u32,
    /// Idle timeout.
    pub idle_timeout_s: u64,
    /// Maximum life.
    pub max_lifetime_s: u64,
    /// Created (Unix ms).
    pub created_at_ms: u64,
    /// Last request (Unix ms).
    pub last_active_ms: u64,
    /// Ended (Unix ms).
    pub ended_at_ms: Option<u64>,
    /// Why it ended: `deleted`, `idle_timeout`, `max_lifetime`,
    /// `vmm_crashed`, `agentd_restart`, `drain`, `guest_lost`.
    pub end_reason: Option<String>,
    /// What it used (live while running, final once ended).
    pub metering: Metering,
    /// The teardown's wipe, once ended.
    pub scrub: Option<Scrub>,
    /// Request in → guest bound, for this session's handout.
    pub handout_ms: f64,
    /// Whether the guest came from the warm pool or was booted on demand.
    pub from_pool: bool,
    /// Spawn → hello of a guest booted on demand for this session (0 when
    /// it came from the pool).
    pub boot_ms: f64,
    /// The guest's id (its directory under the runtime dir).
    pub guest_id: String,
    /// The host process of the guest (`vmm`, or the sandbox launcher).
    pub guest_pid: u32,
    /// The runtime and version it runs, if it was made from one.
    #[serde(default)]
    pub runtime: Option<String>,
    /// The runtime version.
    #[serde(default)]
    pub runtime_version: Option<u32>,
}

/// `POST /v1/sessions/{id}/exec` (and `/exec/stream`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Standard input (UTF-8 text).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Kill the command after this many seconds.
    #[serde(default)]
    pub timeout_s: Option<f64>,
}

/// The result of a finished command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    pub stderr: String,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal, when one killed it.
    pub signal: Option<i32>,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// How long it ran, as the guest measured.
    pub duration_ms: f64,
}

/// One line of a streamed exec (`application/x-ndjson`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// The process started.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Output on standard output.
    Stdout {
        /// The bytes (invalid UTF-8 replaced).
        data: String,
    },
    /// Output on standard error.
    Stderr {
        /// The bytes (invalid UTF-8 replaced).
        data: String,
    },
    /// The process ended; always the last event of a successful stream.
    Exit {
        /// Exit code.
        exit_code: Option<i32>,
        /// Signal.
        signal: Option<i32>,
        /// Killed by its timeout.
        timed_out: bool,
        /// Run time.
        duration_ms: f64,
    },
    /// The exec failed after the stream began (guest lost, session ended).
    Error {
        /// Error code.
        code: String,
        /// What happened.
        message: String,
    },
}

/// Where the time of one guest round trip went, for `Server-Timing`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestTiming {
    /// Request written to the guest's socket → final reply read.
    pub guest_ns: u64,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` or `draining`.
    pub status: String,
    /// The backend new sessions get.
    pub backend: String,
    /// The isolation boundary in words.
    pub isolation: String,
    /// Running sessions.
    pub sessions_running: u64,
    /// Ready guests across pools.
    pub pool_ready: u64,
    /// agentd version.
    pub version: String,
}

/// `GET /v1/pools`: one pool key's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// Image.
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory.
    pub memory_mib: u32,
    /// Backend.
    pub backend: String,
    /// Ready guests wanted.
    pub target: u32,
    /// Ready guests now.
    pub ready: u32,
    /// Guests booting now.
    pub booting: u32,
    /// Boots that failed since start.
    pub boot_failures: u64,
    /// The last boot failure, if any.
    pub last_error: Option<String>,
}

/// What a runtime version runs: fixed once the version exists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSpec {
    /// Image (default: the node's default image).
    #[serde(default)]
    pub image: Option<String>,
    /// vCPUs per session.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Memory per session.
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Environment of the agent.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Idle timeout of its sessions.
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    /// Maximum life of its sessions.
    #[serde(default)]
    pub max_lifetime_s: Option<u64>,
    /// The agent server to start in the guest (default: the image's).
    #[serde(default)]
    pub command: Option<Vec<String>>,
}

/// `POST /v1/runtimes`: a name and the spec of version 1.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRuntime {
    /// Runtime name: a letter, then up to 47 letters, digits, '-' or '_'.
    pub name: String,
    /// Image.
    #[serde(default)]
    pub image: Option<String>,
    /// vCPUs.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Memory.
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Idle timeout.
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    /// Maximum life.
    #[serde(default)]
    pub max_lifetime_s: Option<u64>,
    /// Agent server command.
    #[serde(default)]
    pub command: Option<Vec<String>>,
}

impl CreateRuntime {
    /// The spec part.
    pub fn spec(&self) -> RuntimeSpec {
        RuntimeSpec {
            image: self.image.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            env: self.env.clone(),
            idle_timeout_s: self.idle_timeout_s,
            max_lifetime_s: self.max_lifetime_s,
            command: self.command.clone(),
        }
    }
}

/// One immutable version of a runtime, with every default resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeVersion {
    /// Runtime name.
    pub runtime: String,
    /// Version number, from 1.
    pub version: u32,
    /// Image.
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory.
    pub memory_mib: u32,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Idle timeout.
    pub idle_timeout_s: u64,
    /// Maximum life.
    pub max_lifetime_s: u64,
    /// The agent server started in the guest (none: the image runs its own).
    pub command: Option<Vec<String>>,
    /// Created (Unix ms).
    pub created_at_ms: u64,
}

/// A runtime with its endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    /// Name.
    pub name: String,
    /// Created (Unix ms).
    pub created_at_ms: u64,
    /// The newest version (what `DEFAULT` serves).
    pub latest_version: u32,
    /// Endpoint name → version; `DEFAULT` is always the latest.
    pub endpoints: BTreeMap<String, u32>,
}

/// `PUT /v1/runtimes/{name}/endpoints/{endpoint}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinEndpoint {
    /// The version the endpoint serves.
    pub version: u32,
}

/// An invocation on its way in: the agent's request, body still streaming.
#[derive(Debug)]
pub struct Invocation {
    /// `X-Session-Id` as the client sent it (validated: 33–256 chars).
    pub session_id: Option<String>,
    /// The endpoint (`?endpoint=`; default `DEFAULT`).
    pub endpoint: Option<String>,
    /// Headers passed to the agent (content-type, accept, traceparent, …).
    pub headers: Vec<(String, String)>,
    /// The body's declared length, if the client sent one.
    pub content_length: Option<u64>,
    /// The body, piece by piece; an `Err` ends it (client gone, over the limit).
    pub body: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, String>>,
}

/// The agent's answer, body still streaming.
#[derive(Debug)]
pub struct InvocationResponse {
    /// The session id (generated when the client sent none).
    pub session_id: String,
    /// The agent's status.
    pub status: u16,
    /// The agent's headers (framing headers removed).
    pub headers: Vec<(String, String)>,
    /// The body as the agent sends it.
    pub body: tokio::sync::mpsc::Receiver<bytes::Bytes>,
}

/// `POST /v1/code-interpreter/sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCodeSession {
    /// Image (default: the node's default).
    #[serde(default)]
    pub image: Option<String>,
    /// Session life in seconds (default 900).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// `POST /v1/code-interpreter/sessions/{id}/invoke`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    /// Tool name (`executeCommand`, `executeCode`, `readFiles`, …).
    pub name: String,
    /// Its arguments.
    #[serde(default)]
    pub arguments: serde_json::Value,
}

/// `POST /v1/images`: import an OCI image layout directory or a
/// `docker save` tarball from a path on agentd's host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    /// The new image's name (`[a-z0-9][a-z0-9._-]{0,62}`).
    pub name: String,
    /// Absolute path of the layout directory or tarball.
    pub path: String,
}

/// An image sessions and runtimes can name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Name.
    pub name: String,
    /// `config` (agentd's configuration) or `imported`.
    pub origin: String,
    /// Root file system (ext4), when the image has one.
    pub rootfs: Option<String>,
    /// Its size.
    pub rootfs_bytes: Option<u64>,
    /// Port of its code interpreter, when it has one.
    pub interpreter_port: Option<u16>,
    /// Entrypoint, environment, working dir and user (imported images).
    pub metadata: Option<serde_json::Value>,
}
