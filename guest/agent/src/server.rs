//! The serve loop: read frames from the host, dispatch, reply.
//!
//! Transport-agnostic: it is handed a [`Connection`] and does not care
//! whether it is vsock, a console port or a test socket.

use std::sync::Arc;

use warren_protocol::io::FrameReader;
use warren_protocol::{decode_host_frame, ErrorKind, GuestFrame, Hello, HostFrame, Reply, Request};

use crate::exec::{self, Running};
use crate::files;
use crate::http::{self, Bodies};
use crate::outbox::Outbox;
use crate::reaper::Reaper;
use crate::transport::Connection;

/// State shared by every connection.
pub struct Agent {
    /// Reaps every child.
    pub reaper: Reaper,
    /// Execs in flight.
    pub running: Running,
    /// The image's entrypoint.
    pub entrypoint: std::sync::Arc<crate::entrypoint::Supervisor>,
}

/// Why a connection's serve loop returned.
#[derive(Debug)]
pub enum End {
    /// The host asked for a shutdown; the acknowledgement has been written.
    Shutdown,
    /// The host went away (or the transport failed).
    Disconnected(String),
}

/// Serves one connection until it ends.
pub fn serve(agent: &Arc<Agent>, conn: Connection, hello: Hello) -> End {
    let out = Outbox::start(conn.writer);
    if !out.send(GuestFrame::Hello(hello)) {
        return End::Disconnected("could not send hello".into());
    }
    // HTTP requests of this connection still waiting for body pieces;
    // closed (abandoning them) when the connection ends.
    let bodies = Arc::new(Bodies::default());
    let end = serve_frames(agent, conn.reader, &out, &bodies);
    bodies.close();
    end
}

fn serve_frames(agent: &Arc<Agent>, reader: Box<dyn std::io::Read + Send>, out: &Outbox, bodies: &Arc<Bodies>) -> End {
    let mut reader = FrameReader::new(reader);
    loop {
        let payload = match reader.read_payload() {
            Ok(Some(Ok(p))) => p,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "refused a frame");
                out.error(None, ErrorKind::FrameTooLarge, e.to_string());
                continue;
            }
            Ok(None) => return End::Disconnected("the host closed the connection".into()),
            Err(e) => return End::Disconnected(format!("reading from the host: {e}")),
        };
        let frame = match decode_host_frame(&payload) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable frame");
                out.error(e.id, e.kind, e.detail);
                continue;
            }
        };
        if dispatch(agent, frame, out, bodies) {
            out.flush();
            return End::Shutdown;
        }
    }
}

/// Handles one request; true when it was a shutdown.
fn dispatch(agent: &Arc<Agent>, frame: HostFrame, out: &Outbox, bodies: &Arc<Bodies>) -> bool {
    let HostFrame { id, request } = frame;
    tracing::debug!(id, request = request.name(), "request");
    match request {
        Request::Ping { nonce } => {
            out.reply(id, Reply::Pong { nonce });
        }
        Request::Kill { exec_id, signal } => match agent.running.signal(exec_id, signal) {
            Ok(()) => {
                out.reply(id, Reply::Done);
            }
            Err((kind, msg)) => out.error(Some(id), kind, msg),
        },
        Request::Shutdown => {
            out.reply(id, Reply::Done);
            return true;
        }
        Request::Exec(req) => {
            let (agent, out) = (agent.clone(), out.clone());
            spawn_handler(move || exec::run(&agent.reaper, &agent.running, id, req, &out));
        }
        Request::Http(req) => http::start(id, req, out, bodies),
        Request::EntrypointStatus => {
            out.reply(id, Reply::Entrypoint(agent.entrypoint.state()));
        }
        Request::HttpBody { request, data, end } => bodies.deliver(id, request, data, end, out),
        Request::BurnCpu { .. }
        | Request::TouchMemory { .. }
        | Request::ChecksumMemory { .. }
        | Request::ReadDisk { .. }
        | Request::DiskIo(_)
        | Request::DiskBench { .. } => {
            out.error(
                Some(id),
                ErrorKind::InvalidRequest,
                format!(
                    "{} is a probe-guest request; guest-agent does not serve it",
                    request.name()
                ),
            );
        }
        other => {
            // File requests may block on slow storage: keep the reader free.
            let out = out.clone();
            spawn_handler(move || {
                let result = match &other {
                    Request::ReadFile { path, offset, max_len } => files::read(path, *offset, *max_len),
                    Request::WriteFile(req) => files::write(req),
                    Request::ListDir { path } => files::list(path),
                    Request::Remove { path, recursive } => files::remove(path, *recursive),
                    _ => Err((ErrorKind::UnknownRequest, format!("{} is not handled", other.name()))),
                };
                match result {
                    Ok(reply) => {
                        out.reply(id, reply);
                    }
                    Err((kind, msg)) => out.error(Some(id), kind, msg),
                }
            });
        }
    }
    false
}

fn spawn_handler(f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name("handler".into()).spawn(f) {
        tracing::error!(error = %e, "cannot start a request handler thread");
    }
}
