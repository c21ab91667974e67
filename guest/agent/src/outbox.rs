//! The single writer of a connection.
//!
//! Request handlers run on their own threads; they hand frames to one writer
//! thread through a bounded channel, so frames never interleave on the wire
//! and a host that stops reading slows producers down instead of growing
//! memory without bound.

use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, Sender, SyncSender};

use warren_protocol::io::write_message;
use warren_protocol::{ErrorKind, ErrorReply, GuestFrame, Reply, RequestId};

/// Frames queued at most before senders block.
const DEPTH: usize = 256;

enum Outgoing {
    Frame(GuestFrame),
    Flush(Sender<()>),
}

/// Where handlers send frames for the host. Cheap to clone.
#[derive(Clone)]
pub struct Outbox(SyncSender<Outgoing>);

impl Outbox {
    /// Starts the writer thread for `writer`.
    pub fn start(writer: Box<dyn Write + Send>) -> Outbox {
        let (tx, rx) = sync_channel(DEPTH);
        std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || write_loop(writer, rx))
            .expect("spawn writer thread");
        Outbox(tx)
    }

    /// Queues a frame; false when the connection is gone.
    pub fn send(&self, frame: GuestFrame) -> bool {
        self.0.send(Outgoing::Frame(frame)).is_ok()
    }

    /// Queues a reply to request `id`.
    pub fn reply(&self, id: RequestId, reply: Reply) -> bool {
        self.send(GuestFrame::Reply { id, reply })
    }

    /// Queues an error for request `id` (or for an unreadable frame).
    pub fn error(&self, id: Option<RequestId>, kind: ErrorKind, message: impl Into<String>) {
        self.send(GuestFrame::Error {
            id,
            error: ErrorReply {
                kind,
                message: message.into(),
            },
        });
    }

    /// Blocks until everything queued so far has been written.
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.0.send(Outgoing::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

fn write_loop(mut writer: Box<dyn Write + Send>, rx: Receiver<Outgoing>) {
    for item in rx {
        match item {
            Outgoing::Frame(frame) => {
                if let Err(e) = write_message(&mut writer, &frame) {
                    tracing::warn!(error = %e, "writing to the host failed; dropping the connection's output");
                    return;
                }
            }
            Outgoing::Flush(done) => {
                let _ = writer.flush();
                let _ = done.send(());
            }
        }
    }
}
