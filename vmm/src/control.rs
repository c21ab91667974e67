//! The control socket: a few commands while the VM runs.
//!
//! A Unix stream socket; each request is one line of JSON and gets one line
//! of JSON back:
//!
//! | request | answer |
//! |---|---|
//! | `{"op":"pause"}` | `{"ok":true}` once every vCPU is parked |
//! | `{"op":"resume"}` | `{"ok":true}` |
//! | `{"op":"stats"}` | `{"ok":true,"stats":{…}}`: per-thread on-CPU ns, RSS, guest bytes touched, per-disk counters |
//! | `{"op":"shutdown","timeout_ms":N}` | `{"ok":true}`; the guest is asked to shut down, and the VM is ended after N ms if it has not (at once when it cannot be asked) |
//!
//! A malformed line gets `{"ok":false,"error":"…"}` and the connection
//! stays open.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use warren_protocol::{encode_frame, HostFrame, Request, CONTROL_VSOCK_PORT};

use crate::devices::virtio::block::{BlockReport, BlockStats};
use crate::event::{ExitReason, VmEvent};
use crate::memory::GuestRam;
use crate::scrub::touched_bytes;
use crate::vstate::run_state::RunState;

/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;
/// How long a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Park every vCPU. (Struct variants, so unknown fields are refused.)
    Pause {},
    /// Let them run again.
    Resume {},
    /// Report resource use.
    Stats {},
    /// End the VM.
    Shutdown {
        /// Grace period, milliseconds (default 0).
        #[serde(default)]
        timeout_ms: u64,
    },
}

/// One thread of the VMM process.
#[derive(Debug, Serialize)]
pub struct ThreadStats {
    /// Kernel thread id.
    pub tid: i32,
    /// Thread name (`vcpu0`, …).
    pub name: String,
    /// Time on CPU, nanoseconds (schedstat).
    pub cpu_ns: u64,
}

/// What `stats` answers.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Every thread of the process.
    pub threads: Vec<ThreadStats>,
    /// Sum over the vCPU threads.
    pub vcpu_cpu_ns: u64,
    /// Resident set of the process, KiB.
    pub rss_kib: u64,
    /// Guest memory bytes ever touched.
    pub guest_touched_bytes: u64,
    /// Whether the vCPUs are paused.
    pub paused: bool,
    /// What each disk's device thread did, base first.
    pub disks: Vec<BlockReport>,
}

/// Everything the control thread needs.
pub struct Control {
    /// vCPU run state.
    pub state: Arc<RunState>,
    /// Guest memory (for touched-page counts).
    pub ram: Arc<GuestRam>,
    /// To end the VM.
    pub events: Sender<VmEvent>,
    /// The VM's vsock socket, through which the guest is asked to shut
    /// down (none: the VM can only be ended).
    pub vsock_socket: Option<PathBuf>,
    /// The disks' counters.
    pub disks: Vec<Arc<BlockStats>>,
}

/// Serves `listener` on a thread of its own until the process exits.
pub fn spawn(listener: UnixListener, ctl: Control) -> std::io::Result<()> {
    std::thread::Builder::new().name("control".into()).spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(c) => {
                    if let Err(e) = serve(c, &ctl) {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
            }
        }
    })?;
    Ok(())
}

fn serve(conn: UnixStream, ctl: &Control) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = std::io::Read::take(&mut reader, MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let answer = if n > MAX_LINE {
            // Drop the rest of the oversized line.
            let mut rest = Vec::new();
            reader.read_until(b'\n', &mut rest)?;
            json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})
        } else {
            match std::str::from_utf8(&line) {
                Ok(text) => handle(text.trim(), ctl),
                Err(_) => json!({"ok": false, "error": "request is not UTF-8"}),
            }
        };
        writeln!(out, "{answer}")?;
    }
}

/// Answers one request line.
pub fn handle(line: &str, ctl: &Control) -> Value {
    let req: ControlRequest = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    match req {
        ControlRequest::Pause {} => match ctl.state.pause(PAUSE_TIMEOUT) {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        ControlRequest::Resume {} => {
            ctl.state.resume();
            json!({"ok": true})
        }
        ControlRequest::Stats {} => match stats(ctl) {
            Ok(s) => json!({"ok": true, "stats": s}),
            Err(e) => json!({"ok": false, "error": e}),
        },
        ControlRequest::Shutdown { timeout_ms } => {
            let (events, vsock) = (ctl.events.clone(), ctl.vsock_socket.clone());
            std::thread::spawn(move || {
                // Ask first; a guest that resets in time ends the VM
                // itself, and the forced end below is never looked at.
                let asked = match &vsock {
                    Some(path) => match ask_guest_to_shut_down(path) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not ask the guest to shut down; forcing");
                            false
                        }
                    },
                    None => false,
                };
                if asked {
                    std::thread::sleep(Duration::from_millis(timeout_ms));
                }
                let _ = events.send(VmEvent::Exit(ExitReason::ControlShutdown));
            });
            json!({"ok": true})
        }
    }
}

/// Connects to the guest's control port through the VM's own vsock socket
/// and sends a shutdown request in the guest protocol.
fn ask_guest_to_shut_down(vsock: &Path) -> std::io::Result<()> {
    let mut s = UnixStream::connect(vsock)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(s, "CONNECT {CONTROL_VSOCK_PORT}")?;
    let mut line = String::new();
    BufReader::new(s.try_clone()?).read_line(&mut line)?;
    if !line.starts_with("OK ") {
        return Err(std::io::Error::other(format!(
            "the guest does not listen on port {CONTROL_VSOCK_PORT}: {}",
            line.trim()
        )));
    }
    let frame = encode_frame(&HostFrame {
        id: 1,
        request: Request::Shutdown,
    })
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    s.write_all(&frame)
}

fn stats(ctl: &Control) -> Result<Stats, String> {
    let vcpus = ctl.state.vcpu_tids();
    let mut threads = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let dir = entry.path();
        let name = std::fs::read_to_string(dir.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let cpu_ns = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0);
        threads.push(ThreadStats { tid, name, cpu_ns });
    }
    threads.sort_by_key(|t| t.tid);
    let vcpu_cpu_ns = threads
        .iter()
        .filter(|t| vcpus.contains(&t.tid))
        .map(|t| t.cpu_ns)
        .sum();
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Stats {
        threads,
        vcpu_cpu_ns,
        rss_kib,
        guest_touched_bytes: touched_bytes(&ctl.ram).map_err(|e| e.to_string())?,
        paused: ctl.state.paused(),
        disks: ctl.disks.iter().map(|d| d.report()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctl() -> (Control, std::sync::mpsc::Receiver<VmEvent>) {
        let (tx, rx) = std::sync::mpsc::channel();
        (
            Control {
                state: Arc::new(RunState::new(0)),
                ram: Arc::new(GuestRam::new(16 << 20).unwrap()),
                events: tx,
                vsock_socket: None,
                disks: Vec::new(),
            },
            rx,
        )
    }

    #[test]
    fn malformed_and_unknown_requests_are_errors_naming_the_problem() {
        let (c, _rx) = ctl();
        for (line, needle) in [
            ("not json", "bad request"),
            (r#"{"op":"explode"}"#, "explode"),
            (r#"{"op":"pause","x":1}"#, "x"),
        ] {
            let v = handle(line, &c);
            assert_eq!(v["ok"], false, "{line}");
            assert!(v["error"].as_str().unwrap().contains(needle), "{line}: {v}");
        }
    }

    #[test]
    fn stats_count_threads_and_touched_memory() {
        let (c, _rx) = ctl();
        use vm_memory::{Bytes, GuestAddress};
        c.ram.mem.write_slice(&[1; 8192], GuestAddress(0x10000)).unwrap();
        let v = handle(r#"{"op":"stats"}"#, &c);
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["stats"]["guest_touched_bytes"], 8192);
        assert!(v["stats"]["rss_kib"].as_u64().unwrap() > 0);
        assert!(!v["stats"]["threads"].as_array().unwrap().is_empty());
    }

    #[test]
    fn shutdown_ends_the_vm_after_its_grace_period() {
        let (c, rx) = ctl();
        assert_eq!(handle(r#"{"op":"shutdown","timeout_ms":10}"#, &c)["ok"], true);
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(VmEvent::Exit(ExitReason::ControlShutdown))
        ));
    }
}
