//! The messages carried inside frames.
//!
//! Every host → guest frame is a [`HostFrame`]: a request id chosen by the
//! host plus a [`Request`]. The guest answers with [`GuestFrame::Reply`]
//! frames carrying that id — zero or more streamed replies (process started,
//! output chunks) and then exactly one final reply — or with one
//! [`GuestFrame::Error`]. Ids let several requests be in flight at once.
//!
//! New request variants go at the end of [`Request`] and bump
//! [`Request::VARIANTS`]: the decoder uses the variant index to tell an
//! unknown request from a malformed one.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Id the host gives a request; replies carry it back.
pub type RequestId = u64;

/// A host → guest frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFrame {
    /// Chosen by the host, unique among its requests in flight.
    pub id: RequestId,
    /// What the host asks for.
    pub request: Request,
}

/// What the host can ask of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Answered with [`Reply::Pong`] carrying the same nonce.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Run a command; replies stream ([`Reply::ExecStarted`],
    /// [`Reply::Output`]) and end with [`Reply::Exited`].
    Exec(ExecRequest),
    /// Send a signal to the process group of a running [`Request::Exec`].
    Kill {
        /// The request id of the exec.
        exec_id: RequestId,
        /// Signal number (9 = SIGKILL, 15 = SIGTERM).
        signal: i32,
    },
    /// Read up to `max_len` bytes of a file from `offset`; answered with
    /// [`Reply::FileData`].
    ReadFile {
        /// Absolute path in the guest.
        path: String,
        /// Byte offset to start at.
        offset: u64,
        /// At most this many bytes (capped at [`crate::MAX_CHUNK`]).
        max_len: u32,
    },
    /// Write `data` to a file; answered with [`Reply::Done`].
    WriteFile(WriteFileRequest),
    /// List a directory; answered with [`Reply::Entries`].
    ListDir {
        /// Absolute path in the guest.
        path: String,
    },
    /// Remove a file, or a directory (recursively if asked); answered with
    /// [`Reply::Done`].
    Remove {
        /// Absolute path in the guest.
        path: String,
        /// Remove a directory and everything below it.
        recursive: bool,
    },
    /// Answered with [`Reply::Done`]; then the guest ends its processes,
    /// syncs and resets the machine, which ends the VM.
    Shutdown,
    /// Probe guest: keep a vCPU busy for `ms` milliseconds of run time
    /// (guest time minus the steal time KVM reports, so a preempted vCPU
    /// still burns what was asked), then answer [`Reply::Done`] (for CPU
    /// metering).
    BurnCpu {
        /// Milliseconds to spin.
        ms: u32,
    },
    /// Probe guest: touch `mib` MiB of guest memory above its own image,
    /// writing `pattern` at the start of every page, then answer
    /// [`Reply::Done`] (for memory metering and scrub checks).
    TouchMemory {
        /// MiB to touch.
        mib: u32,
        /// Written to the first 8 bytes of each page.
        pattern: u64,
    },
    /// Probe guest: sum guest physical memory `[offset, offset + len)` as
    /// 64-bit words; answered with [`Reply::Checksum`].
    ChecksumMemory {
        /// Guest physical start (8-byte aligned).
        offset: u64,
        /// Bytes (a multiple of 8).
        len: u64,
    },
    /// Probe guest: read `count` 512-byte sectors from `sector` of its
    /// virtio-blk disk; answered with [`Reply::Checksum`] of the bytes as
    /// 64-bit little-endian words.
    ReadDisk {
        /// First sector.
        sector: u64,
        /// Sectors to read.
        count: u32,
    },
    /// Sends an HTTP request to a server inside the guest on
    /// `127.0.0.1:port` (the agent's own server: `POST /invocations`,
    /// `GET /ping`). Answered with one [`Reply::HttpHead`], any number of
    /// [`Reply::HttpChunk`] as the response body arrives, then
    /// [`Reply::Done`]; an unreachable server is an [`ErrorKind::Io`]
    /// error. When `more_body` is set the rest of the request body follows
    /// in [`Request::HttpBody`] frames naming this request's id.
    Http(HttpRequest),
    /// The next piece of the body of the [`Request::Http`] with id
    /// `request`; `end` marks the last one. Answered with [`Reply::Done`]
    /// once the piece has been handed to the server, which is what paces
    /// the host: it keeps only a few pieces unanswered.
    HttpBody {
        /// The `Http` request this body belongs to.
        request: RequestId,
        /// Up to [`crate::MAX_CHUNK`] bytes.
        data: Vec<u8>,
        /// No more body after this piece.
        end: bool,
    },
    /// How the image's entrypoint (the program the image's metadata names,
    /// which guest-agent starts and supervises once the root file system
    /// is in place) is doing. Answered with [`Reply::Entrypoint`].
    EntrypointStatus,
    /// Probe guest: one virtio-blk request on one of its disks, laid out
    /// in descriptors as asked (malformed layouts included, to test the
    /// VMM); answered with [`Reply::DiskIo`].
    DiskIo(DiskIoRequest),
    /// Probe guest: `requests` reads of `pattern` on disk `disk` with up to
    /// `queue_depth` in flight; answered with [`Reply::DiskBench`].
    DiskBench {
        /// 0: the base image, 1: the scratch disk.
        disk: u8,
        /// What to read.
        pattern: DiskPattern,
        /// Reads to do.
        requests: u32,
        /// Reads in flight at once (the probe caps it at 64).
        queue_depth: u16,
    },
}

impl Request {
    /// Number of variants this build knows. A frame naming a variant index
    /// at or above it is an unknown request, not a malformed one.
    pub const VARIANTS: u32 = 17;

    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Ping { .. } => "ping",
            Request::Exec(_) => "exec",
            Request::Kill { .. } => "kill",
            Request::ReadFile { .. } => "read_file",
            Request::WriteFile(_) => "write_file",
            Request::ListDir { .. } => "list_dir",
            Request::Remove { .. } => "remove",
            Request::Shutdown => "shutdown",
            Request::BurnCpu { .. } => "burn_cpu",
            Request::TouchMemory { .. } => "touch_memory",
            Request::ChecksumMemory { .. } => "checksum_memory",
            Request::ReadDisk { .. } => "read_disk",
            Request::Http(_) => "http",
            Request::HttpBody { .. } => "http_body",
            Request::EntrypointStatus => "entrypoint_status",
            Request::DiskIo(_) => "disk_io",
            Request::DiskBench { .. } => "disk_bench",
        }
    }
}

/// One virtio-blk request the probe guest makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIoRequest {
    /// 0: the base image, 1: the scratch disk (the order of the VM's
    /// virtio-blk devices).
    pub disk: u8,
    /// The request type.
    pub op: DiskOp,
    /// First sector (the header's `sector`).
    pub sector: u64,
    /// Bytes of the device-writable data buffer for everything but a
    /// write (0: no data buffer).
    pub len: u32,
    /// What a write writes (its length is the data length).
    pub data: Vec<u8>,
    /// How the request is laid out in descriptors.
    pub layout: DiskLayout,
}

/// A virtio-blk request type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskOp {
    /// `VIRTIO_BLK_T_IN`; the reply carries the data's checksum.
    Read,
    /// `VIRTIO_BLK_T_OUT` of the request's `data`.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`; the reply carries the id bytes.
    GetId,
    /// Any type number, with a device-writable data buffer.
    Raw(u32),
}

/// How the probe lays a disk request out in descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskLayout {
    /// Header, data, status: one descriptor each.
    Normal,
    /// The 16-byte header in two descriptors of 8.
    HeaderSplit,
    /// The data in this many descriptors.
    DataSplit(u16),
    /// Data and status in one descriptor (reads), header and data in one
    /// (writes).
    Merged,
    /// Only 8 header bytes.
    ShortHeader,
    /// The header in a device-writable descriptor.
    HeaderWritable,
    /// The data descriptor in the direction the type does not use.
    WrongDirection,
    /// No status descriptor (a read's chain then ends in its
    /// device-writable data buffer, whose last byte the device takes for
    /// the status; a write's ends device-readable: no status at all).
    NoStatus,
    /// A status descriptor of length 0.
    EmptyStatus,
    /// The last descriptor links back to the first.
    Loop,
    /// The data descriptor points at 1 TiB, outside guest memory.
    DataOutsideMemory,
}

/// What a disk benchmark reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskPattern {
    /// 4 KiB reads at random 4 KiB-aligned offsets.
    Random4k,
    /// 1 MiB reads one after the other, wrapping at the end of the disk.
    Sequential1M,
}

/// Answer to [`Request::DiskIo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIoReply {
    /// The status byte (0xff when the device did not write it).
    pub status: u8,
    /// The length the device returned the chain with.
    pub used_len: u32,
    /// A successful read: wrapping sum of the data as little-endian
    /// 64-bit words (0 otherwise).
    pub checksum: u64,
    /// A get-id: the data buffer's bytes (empty otherwise).
    pub data: Vec<u8>,
}

/// Answer to [`Request::DiskBench`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskBenchReply {
    /// Reads completed.
    pub requests: u64,
    /// Bytes they read.
    pub bytes: u64,
    /// Reads answered with a status other than OK.
    pub errors: u64,
    /// Guest time (kvm-clock) from the first read offered to the last
    /// one back, ns.
    pub guest_ns: u64,
}

/// An HTTP request to a server inside the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// TCP port on the guest's loopback.
    pub port: u16,
    /// Method (`GET`, `POST`, …).
    pub method: String,
    /// Path and query (`/invocations`).
    pub path: String,
    /// Headers to send (the guest adds `Host`, and the framing headers
    /// its HTTP client needs).
    pub headers: Vec<(String, String)>,
    /// The start of the body (all of it when `more_body` is false).
    pub body: Vec<u8>,
    /// More body follows in [`Request::HttpBody`] frames.
    pub more_body: bool,
    /// Give up when the server has not answered within this time.
    pub timeout_ms: Option<u64>,
}

/// A command to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables added to (or replacing those in) the agent's environment.
    pub env: Vec<(String, String)>,
    /// Working directory; the agent's own when absent.
    pub cwd: Option<String>,
    /// Written to the process's standard input, which is then closed.
    pub stdin: Vec<u8>,
    /// Kill the process group (SIGKILL) after this many milliseconds.
    pub timeout_ms: Option<u64>,
}

/// A file to write in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    /// Absolute path in the guest.
    pub path: String,
    /// Bytes to write (at most [`crate::MAX_CHUNK`] per request; larger
    /// files are written in appending requests).
    pub data: Vec<u8>,
    /// Permission bits for a newly created file (default 0o644).
    pub mode: Option<u32>,
    /// Append instead of truncating.
    pub append: bool,
    /// Create missing parent directories.
    pub create_parents: bool,
}

/// A guest → host frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestFrame {
    /// First frame on every connection.
    Hello(Hello),
    /// A reply to request `id`.
    Reply {
        /// The request answered.
        id: RequestId,
        /// The reply.
        reply: Reply,
    },
    /// The request `id` failed, or (with no id) a frame could not be read.
    /// Always final for its id.
    Error {
        /// The request that failed, when the frame was readable that far.
        id: Option<RequestId>,
        /// What went wrong.
        error: ErrorReply,
    },
}

impl GuestFrame {
    /// Number of variants this build knows (see [`Request::VARIANTS`]).
    pub const VARIANTS: u32 = 3;
}

/// The guest's first frame: who it is and when it got ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`crate::PROTOCOL_VERSION`] of the guest's build.
    pub protocol_version: u16,
    /// Name and version of the guest program, e.g. `guest-agent 0.1.0`.
    pub agent: String,
    /// Guest `CLOCK_BOOTTIME` when the hello was sent, in nanoseconds.
    pub boot_time_ns: u64,
    /// `uname -r` of the guest kernel (empty for the probe guest).
    pub kernel_release: String,
    /// Boot-timer stamps the guest recorded on its way up, in order.
    pub boot_stamps: Vec<u64>,
}

/// One reply to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Answer to [`Request::Ping`].
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// The exec's process started (streamed).
    ExecStarted {
        /// Its pid in the guest.
        pid: u32,
    },
    /// A chunk of the exec's output (streamed).
    Output {
        /// Which stream it came from.
        stream: Stream,
        /// The bytes, at most [`crate::MAX_CHUNK`].
        data: Vec<u8>,
    },
    /// The exec's process ended (final).
    Exited(ExitStatus),
    /// Bytes read from a file (final).
    FileData {
        /// The bytes read.
        data: Vec<u8>,
        /// True when the read reached the end of the file.
        eof: bool,
    },
    /// Directory listing (final).
    Entries(Vec<DirEntry>),
    /// The request succeeded with nothing to return (final).
    Done,
    /// Wrapping sum of the 64-bit words asked for (final).
    Checksum(u64),
    /// The status and headers of an HTTP response (streamed; the body
    /// follows as [`Reply::HttpChunk`]s, then [`Reply::Done`]).
    HttpHead {
        /// Status code.
        status: u16,
        /// Response headers (framing headers left out: the body arrives
        /// already decoded).
        headers: Vec<(String, String)>,
    },
    /// A piece of an HTTP response body, as the server sent it (streamed).
    HttpChunk {
        /// The bytes.
        data: Vec<u8>,
    },
    /// Answer to [`Request::EntrypointStatus`] (final).
    Entrypoint(EntrypointState),
    /// Answer to [`Request::DiskIo`] (final).
    DiskIo(DiskIoReply),
    /// Answer to [`Request::DiskBench`] (final).
    DiskBench(DiskBenchReply),
}

/// The image entrypoint's state, as guest-agent supervises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntrypointState {
    /// The image names no entrypoint (or the guest has no image metadata).
    None,
    /// Running with this pid, started this many times so far.
    Running {
        /// Its pid in the guest.
        pid: u32,
        /// Its argv.
        argv: Vec<String>,
    },
    /// It ended; guest-agent does not restart it.
    Exited {
        /// Its argv.
        argv: Vec<String>,
        /// How it ended.
        status: ExitStatus,
    },
    /// It could not be started (no such program, bad metadata, …).
    Failed {
        /// Why.
        message: String,
    },
}

impl Reply {
    /// True for the reply that ends a request.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            Reply::ExecStarted { .. } | Reply::Output { .. } | Reply::HttpHead { .. } | Reply::HttpChunk { .. }
        )
    }
}

/// Standard output or standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    /// File descriptor 1.
    Stdout,
    /// File descriptor 2.
    Stderr,
}

/// How an exec'd process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
    /// The agent killed it because its timeout passed.
    pub timed_out: bool,
    /// Wall time from spawn to exit, in nanoseconds.
    pub duration_ns: u64,
}

impl ExitStatus {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// File name (not the full path).
    pub name: String,
    /// What kind of file it is.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime_s: i64,
}

/// The kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed).
    Symlink,
    /// Anything else: device, fifo, socket.
    Other,
}

/// Why a request or frame failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Machine-readable class.
    pub kind: ErrorKind,
    /// Human-readable detail naming what was wrong.
    pub message: String,
}

/// Classes of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The frame's payload is not a valid message.
    MalformedFrame,
    /// The frame is larger than the receiver accepts.
    FrameTooLarge,
    /// The frame names a request this build does not know.
    UnknownRequest,
    /// The request is well-formed but its arguments are not acceptable.
    InvalidRequest,
    /// A file, directory, program or exec id does not exist.
    NotFound,
    /// The guest refused access.
    PermissionDenied,
    /// Something already exists where it must not.
    AlreadyExists,
    /// Any other I/O failure in the guest.
    Io,
}
