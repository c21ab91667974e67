//! Waiting for a guest to connect while watching the process that runs it.

use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Why no connection came.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The VMM (or QEMU) exited first.
    #[error("the VM process exited ({0}) before the guest connected")]
    Exited(ExitStatus),
    /// Nothing within the timeout.
    #[error("the guest did not connect within {0:?}")]
    Timeout(Duration),
    /// The socket failed.
    #[error("waiting for the guest: {0}")]
    Io(#[from] std::io::Error),
}

/// Accepts one connection on `listener`, giving up when `child` exits or
/// `timeout` passes. The stream is returned in blocking mode.
pub fn accept_while_running(
    listener: &UnixListener,
    child: &mut Child,
    timeout: Duration,
) -> Result<UnixStream, AcceptError> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(st) = child.try_wait()? {
            return Err(AcceptError::Exited(st));
        }
        if Instant::now() > deadline {
            return Err(AcceptError::Timeout(timeout));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}
