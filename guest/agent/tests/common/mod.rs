//! guest-agent as an ordinary process serving one connection over a Unix
//! socket, shared by the integration tests.

#![allow(dead_code)]

use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use warren_protocol::client::AgentClient;

/// A running guest-agent and the host's client of it.
pub struct Agent {
    pub child: Child,
    pub client: AgentClient<UnixStream, UnixStream>,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts guest-agent and handshakes; replies may take up to `read_timeout`.
pub fn start_with(read_timeout: Duration) -> Agent {
    start_with_args(read_timeout, &[])
}

/// Starts guest-agent with extra arguments.
pub fn start_with_args(read_timeout: Duration, extra: &[String]) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .arg("--transport")
        .arg(format!("unix:{}", sock.display()))
        .arg("--once")
        .arg("--log=warn")
        .args(extra)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("guest-agent did not connect: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(read_timeout)).unwrap();
    let client = AgentClient::handshake(stream.try_clone().unwrap(), stream).unwrap();
    Agent {
        child,
        client,
        _dir: dir,
    }
}

/// Starts guest-agent with a 30 s reply timeout.
pub fn start() -> Agent {
    start_with(Duration::from_secs(30))
}
