//! Booting a guest on Warren's own VMM and meeting it on vsock.
//!
//! The VMM is spawned with `--vsock-socket <dir>/v.sock`; the guest (probe
//! or guest-agent) connects to host port 1024, which lands on the listener
//! at `<dir>/v.sock_1024` set up here, and says hello.

use std::ffi::OsString;
use std::fs;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use warren_protocol::client::{AgentClient, ClientError};
use warren_protocol::AGENT_VSOCK_PORT;

use crate::accept::{accept_while_running, AcceptError};

/// Why a VM did not come up.
#[derive(Debug, thiserror::Error)]
pub enum VmmBootError {
    /// Temp dir, socket or spawn failed.
    #[error("setting up the VM: {0}")]
    Setup(#[from] std::io::Error),
    /// The guest never connected.
    #[error("{source}\n--- vmm stderr ---\n{stderr}")]
    Accept {
        /// What happened.
        source: AcceptError,
        /// What the VMM printed.
        stderr: String,
    },
    /// The guest connected but its hello was wrong.
    #[error("guest hello: {0}")]
    Hello(#[from] ClientError),
}

/// CLOCK_MONOTONIC in nanoseconds, the clock the VMM stamps boot-timer
/// writes with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A running VMM whose guest has said hello.
pub struct VmmGuest {
    /// The VMM process (stdout piped: its JSON events).
    pub child: Child,
    /// Connected to the guest.
    pub client: AgentClient<UnixStream, UnixStream>,
    /// CLOCK_MONOTONIC just before the VMM was spawned.
    pub spawned_ns: u64,
    /// CLOCK_MONOTONIC once the hello had been read.
    pub ready_ns: u64,
    dir: tempfile::TempDir,
}

impl VmmGuest {
    /// Spawns `vmm` with the arguments `args` returns for the VM's own
    /// directory (where it may put more sockets), plus the vsock socket,
    /// and waits up to `timeout` for the guest's hello.
    pub fn boot(
        vmm: &Path,
        timeout: Duration,
        args: impl FnOnce(&Path) -> Vec<OsString>,
    ) -> Result<VmmGuest, VmmBootError> {
        let dir = tempfile::Builder::new().prefix("warren-vm-").tempdir()?;
        let sock = dir.path().join("v.sock");
        let listener = UnixListener::bind(format!("{}_{AGENT_VSOCK_PORT}", sock.display()))?;
        let stderr = dir.path().join("vmm.stderr");
        let mut cmd = Command::new(vmm);
        cmd.args(args(dir.path()))
            .arg("--vsock-socket")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // A file, not a pipe: with --serial a guest console can say a lot.
            .stderr(fs::File::create(&stderr)?);
        let spawned_ns = monotonic_ns();
        let mut child = cmd.spawn()?;
        let stream = match accept_while_running(&listener, &mut child, timeout) {
            Ok(s) => s,
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = fs::read_to_string(&stderr).unwrap_or_default();
                return Err(VmmBootError::Accept { source, stderr });
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let client = match AgentClient::handshake(stream.try_clone()?, stream) {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.into());
            }
        };
        Ok(VmmGuest {
            child,
            client,
            spawned_ns,
            ready_ns: monotonic_ns(),
            dir,
        })
    }

    /// The VM's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The host side of the VM's vsock device.
    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.path().join("v.sock")
    }

    /// Spawn to hello.
    pub fn spawn_to_hello(&self) -> Duration {
        Duration::from_nanos(self.ready_ns - self.spawned_ns)
    }

    /// Asks the guest to shut down and waits for the VMM to exit; returns
    /// its status and everything it printed on stdout.
    pub fn shutdown(&mut self) -> Result<(ExitStatus, String), ClientError> {
        self.client.shutdown()?;
        self.wait()
    }

    /// Waits for the VMM to exit; returns its status and its stdout.
    pub fn wait(&mut self) -> Result<(ExitStatus, String), ClientError> {
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            std::io::Read::read_to_string(&mut stdout, &mut out)?;
        }
        Ok((self.child.wait()?, out))
    }
}

impl Drop for VmmGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
