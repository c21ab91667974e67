//! Blocking host-side client for a guest that speaks this protocol.
//!
//! The client owns one connection (any `Read` + `Write` pair: a vsock-backed
//! Unix socket, a virtio console port, a test socket). It reads the hello,
//! checks the protocol version, and then sends requests and collects their
//! replies. Replies to other requests that arrive while one is awaited are
//! kept, so several requests may be in flight.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};

use crate::codec::{decode_guest_frame, DecodeError};
use crate::frame::FrameError;
use crate::io::{write_message, FrameReader};
use crate::message::*;
use crate::{MAX_CHUNK, PROTOCOL_VERSION};

/// What can go wrong talking to a guest.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The transport failed.
    #[error("transport: {0}")]
    Io(#[from] io::Error),
    /// The guest closed the connection.
    #[error("the guest closed the connection")]
    Closed,
    /// The guest sent a frame over the size limit.
    #[error("guest frame: {0}")]
    Frame(FrameError),
    /// The guest sent a frame that does not decode.
    #[error("guest frame: {0}")]
    Decode(DecodeError),
    /// The guest answered with an error.
    #[error("guest error ({:?}): {}", .0.kind, .0.message)]
    Guest(ErrorReply),
    /// The guest broke the protocol (e.g. no hello first, wrong reply kind).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The guest speaks a different protocol version.
    #[error("guest speaks protocol version {guest}, host speaks {host}")]
    Version {
        /// The guest's version.
        guest: u16,
        /// Ours.
        host: u16,
    },
}

/// Collected result of an exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Everything written to standard output.
    pub stdout: Vec<u8>,
    /// Everything written to standard error.
    pub stderr: Vec<u8>,
    /// How the process ended.
    pub status: ExitStatus,
}

/// A connection to a guest.
pub struct AgentClient<R, W> {
    reader: FrameReader<R>,
    writer: W,
    hello: Hello,
    next_id: RequestId,
    stash: HashMap<RequestId, VecDeque<Result<Reply, ErrorReply>>>,
}

impl<R: Read, W: Write> AgentClient<R, W> {
    /// Reads the guest's hello and checks its protocol version.
    pub fn handshake(reader: R, writer: W) -> Result<Self, ClientError> {
        let mut reader = FrameReader::new(reader);
        let first = read_frame(&mut reader)?;
        let hello = match first {
            GuestFrame::Hello(h) => h,
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected hello as the first frame, got {other:?}"
                )))
            }
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(ClientError::Version {
                guest: hello.protocol_version,
                host: PROTOCOL_VERSION,
            });
        }
        Ok(AgentClient {
            reader,
            writer,
            hello,
            next_id: 1,
            stash: HashMap::new(),
        })
    }

    /// The guest's hello.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The underlying reader (e.g. to set a read timeout on a socket).
    pub fn reader(&self) -> &R {
        self.reader.get_ref()
    }

    /// Sends a request and returns its id without waiting.
    pub fn send(&mut self, request: Request) -> Result<RequestId, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        write_message(&mut self.writer, &HostFrame { id, request })?;
        Ok(id)
    }

    /// Writes raw bytes to the guest (tests use it for hostile frames).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.writer.write_all(bytes)?;
        self.writer.flush()?;
        Ok(())
    }

    /// The next frame from the guest, bypassing the per-request bookkeeping.
    pub fn recv_frame(&mut self) -> Result<GuestFrame, ClientError> {
        read_frame(&mut self.reader)
    }

    /// The next reply to request `id`; a guest error for it is `Err`.
    pub fn next_reply(&mut self, id: RequestId) -> Result<Reply, ClientError> {
        loop {
            if let Some(r) = self.stash.get_mut(&id).and_then(|q| q.pop_front()) {
                return r.map_err(ClientError::Guest);
            }
            match read_frame(&mut self.reader)? {
                GuestFrame::Reply { id: rid, reply } if rid == id => return Ok(reply),
                GuestFrame::Error { id: Some(rid), error } if rid == id => return Err(ClientError::Guest(error)),
                GuestFrame::Reply { id: rid, reply } => self.stash.entry(rid).or_default().push_back(Ok(reply)),
                GuestFrame::Error { id: Some(rid), error } => self.stash.entry(rid).or_default().push_back(Err(error)),
                GuestFrame::Error { id: None, error } => return Err(ClientError::Guest(error)),
                GuestFrame::Hello(_) => return Err(ClientError::Protocol("a second hello".into())),
            }
        }
    }

    /// Sends `request` and waits for its final reply, dropping streamed ones.
    pub fn call(&mut self, request: Request) -> Result<Reply, ClientError> {
        let id = self.send(request)?;
        loop {
            let reply = self.next_reply(id)?;
            if reply.is_final() {
                self.stash.remove(&id);
                return Ok(reply);
            }
        }
    }

    /// One ping round trip.
    pub fn ping(&mut self, nonce: u64) -> Result<(), ClientError> {
        match self.call(Request::Ping { nonce })? {
            Reply::Pong { nonce: n } if n == nonce => Ok(()),
            other => Err(unexpected("pong", &other)),
        }
    }

    /// Runs a command, handing each output chunk to `on_output` as it arrives.
    pub fn exec_streaming(
        &mut self,
        request: ExecRequest,
        mut on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, ClientError> {
        let id = self.send(Request::Exec(request))?;
        loop {
            match self.next_reply(id)? {
                Reply::ExecStarted { .. } => {}
                Reply::Output { stream, data } => on_output(stream, &data),
                Reply::Exited(status) => {
                    self.stash.remove(&id);
                    return Ok(status);
                }
                other => return Err(unexpected("exec output", &other)),
            }
        }
    }

    /// Runs a command and collects its output.
    pub fn exec(&mut self, request: ExecRequest) -> Result<ExecOutput, ClientError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self.exec_streaming(request, |stream, data| match stream {
            Stream::Stdout => stdout.extend_from_slice(data),
            Stream::Stderr => stderr.extend_from_slice(data),
        })?;
        Ok(ExecOutput { stdout, stderr, status })
    }

    /// Reads a whole file, chunk by chunk.
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        loop {
            let reply = self.call(Request::ReadFile {
                path: path.into(),
                offset: out.len() as u64,
                max_len: MAX_CHUNK as u32,
            })?;
            match reply {
                Reply::FileData { data, eof } => {
                    out.extend_from_slice(&data);
                    if eof {
                        return Ok(out);
                    }
                    if data.is_empty() {
                        return Err(ClientError::Protocol("empty read before end of file".into()));
                    }
                }
                other => return Err(unexpected("file data", &other)),
            }
        }
    }

    /// Writes a whole file (truncating it), chunk by chunk.
    pub fn write_file(&mut self, path: &str, data: &[u8], mode: Option<u32>) -> Result<(), ClientError> {
        let mut chunks = data.chunks(MAX_CHUNK);
        let first = chunks.next().unwrap_or(&[]);
        self.expect_done(Request::WriteFile(WriteFileRequest {
            path: path.into(),
            data: first.to_vec(),
            mode,
            append: false,
            create_parents: true,
        }))?;
        for chunk in chunks {
            self.expect_done(Request::WriteFile(WriteFileRequest {
                path: path.into(),
                data: chunk.to_vec(),
                mode,
                append: true,
                create_parents: false,
            }))?;
        }
        Ok(())
    }

    /// Lists a directory.
    pub fn list_dir(&mut self, path: &str) -> Result<Vec<DirEntry>, ClientError> {
        match self.call(Request::ListDir { path: path.into() })? {
            Reply::Entries(e) => Ok(e),
            other => Err(unexpected("entries", &other)),
        }
    }

    /// Removes a file or directory.
    pub fn remove(&mut self, path: &str, recursive: bool) -> Result<(), ClientError> {
        self.expect_done(Request::Remove {
            path: path.into(),
            recursive,
        })
    }

    /// Asks the guest to shut down; returns once it acknowledged.
    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        self.expect_done(Request::Shutdown)
    }

    fn expect_done(&mut self, request: Request) -> Result<(), ClientError> {
        match self.call(request)? {
            Reply::Done => Ok(()),
            other => Err(unexpected("done", &other)),
        }
    }
}

fn unexpected(wanted: &str, got: &Reply) -> ClientError {
    ClientError::Protocol(format!("expected {wanted}, got {got:?}"))
}

fn read_frame<R: Read>(reader: &mut FrameReader<R>) -> Result<GuestFrame, ClientError> {
    match reader.read_payload()? {
        None => Err(ClientError::Closed),
        Some(Err(e)) => Err(ClientError::Frame(e)),
        Some(Ok(payload)) => decode_guest_frame(&payload).map_err(ClientError::Decode),
    }
}
