//! Running commands for the host with streamed output.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use warren_protocol::{ErrorKind, ExecRequest, ExitStatus, Reply, RequestId, Stream};

use crate::outbox::Outbox;
use crate::reaper::{Exit, Reaper};

/// How long output pipes may stay open after the process exited (a
/// background grandchild can hold them) before the exit is reported anyway.
const PIPE_GRACE: Duration = Duration::from_secs(1);

/// Default search path when neither the request nor the agent has `PATH`.
pub(crate) const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Process groups of the execs still running, by request id.
#[derive(Default)]
pub struct Running(Mutex<HashMap<RequestId, i32>>);

impl Running {
    /// Signals the process group of exec `id`.
    pub fn signal(&self, id: RequestId, signal: i32) -> Result<(), (ErrorKind, String)> {
        let sig = Signal::try_from(signal)
            .map_err(|_| (ErrorKind::InvalidRequest, format!("{signal} is not a signal number")))?;
        let pgid = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .copied()
            .ok_or_else(|| (ErrorKind::NotFound, format!("no running exec with id {id}")))?;
        killpg(Pid::from_raw(pgid), sig).map_err(|e| (ErrorKind::Io, format!("signalling exec {id}: {e}")))
    }

    fn insert(&self, id: RequestId, pgid: i32) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(id, pgid);
    }

    fn remove(&self, id: RequestId) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }
}

/// Runs `req` to completion, streaming replies for request `id` to `out`.
pub fn run(reaper: &Reaper, running: &Running, id: RequestId, req: ExecRequest, out: &Outbox) {
    if let Err((kind, msg)) = run_inner(reaper, running, id, req, out) {
        out.error(Some(id), kind, msg);
    }
}

fn run_inner(
    reaper: &Reaper,
    running: &Running,
    id: RequestId,
    req: ExecRequest,
    out: &Outbox,
) -> Result<(), (ErrorKind, String)> {
    let Some(argv0) = req.argv.first() else {
        return Err((ErrorKind::InvalidRequest, "argv is empty".into()));
    };
    if let Some(cwd) = &req.cwd {
        if !Path::new(cwd).is_dir() {
            return Err((ErrorKind::NotFound, format!("working directory {cwd} does not exist")));
        }
    }
    let path_var = req
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_else(|| DEFAULT_PATH.into());
    // Resolving the program here gives a clear "not found" instead of an
    // exec failure inside the spawned child.
    let program = resolve_program(argv0, &path_var, req.cwd.as_deref())?;

    let mut cmd = Command::new(&program);
    cmd.arg0(argv0)
        .args(&req.argv[1..])
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout or kill reaches its children.
        .process_group(0);
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| (io_kind(&e), format!("cannot run {}: {e}", program.display())))?;
    let pid = child.id() as i32;
    let exited = reaper.watch(pid);
    running.insert(id, pid);
    out.reply(id, Reply::ExecStarted { pid: pid as u32 });

    if let Some(mut stdin) = child.stdin.take() {
        let data = req.stdin;
        std::thread::spawn(move || {
            // The process may exit without reading; EPIPE is fine.
            let _ = stdin.write_all(&data);
        });
    }
    let closed = Arc::new(AtomicBool::new(false));
    let (pipes_done, pipes_rx) = channel();
    let pipes: [(Option<Box<dyn Read + Send>>, Stream); 2] = [
        (child.stdout.take().map(|p| Box::new(p) as _), Stream::Stdout),
        (child.stderr.take().map(|p| Box::new(p) as _), Stream::Stderr),
    ];
    let mut open_pipes = 0;
    for (pipe, stream) in pipes {
        let Some(pipe) = pipe else { continue };
        open_pipes += 1;
        let (out, closed, done) = (out.clone(), closed.clone(), pipes_done.clone());
        std::thread::spawn(move || {
            pump(pipe, stream, id, &out, &closed);
            let _ = done.send(());
        });
    }

    let mut timed_out = false;
    let exit = match req.timeout_ms {
        Some(ms) => match exited.recv_timeout(Duration::from_millis(ms)) {
            Ok(exit) => Some(exit),
            Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                exited.recv().ok()
            }
            Err(RecvTimeoutError::Disconnected) => None,
        },
        None => exited.recv().ok(),
    };
    running.remove(id);
    let duration_ns = started.elapsed().as_nanos() as u64;
    let deadline = Instant::now() + PIPE_GRACE;
    for _ in 0..open_pipes {
        let left = deadline.saturating_duration_since(Instant::now());
        if pipes_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    // Output arriving after this point would follow the exit; drop it.
    closed.store(true, Ordering::SeqCst);
    let (code, signal) = match exit {
        Some(Exit::Code(c)) => (Some(c), None),
        Some(Exit::Signal(s)) => (None, Some(s)),
        None => return Err((ErrorKind::Io, "lost track of the process".into())),
    };
    out.reply(
        id,
        Reply::Exited(ExitStatus {
            code,
            signal,
            timed_out,
            duration_ns,
        }),
    );
    Ok(())
}

fn pump(mut pipe: Box<dyn Read + Send>, stream: Stream, id: RequestId, out: &Outbox, closed: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if closed.load(Ordering::SeqCst) {
                    continue;
                }
                let data = buf[..n].to_vec();
                if !out.reply(id, Reply::Output { stream, data }) {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Finds the file to execute for `argv0`, as a shell would.
pub(crate) fn resolve_program(argv0: &str, path_var: &str, cwd: Option<&str>) -> Result<PathBuf, (ErrorKind, String)> {
    if argv0.is_empty() {
        return Err((ErrorKind::InvalidRequest, "argv[0] is empty".into()));
    }
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if argv0.contains('/') {
        let p = match cwd {
            Some(cwd) if !argv0.starts_with('/') => Path::new(cwd).join(argv0),
            _ => PathBuf::from(argv0),
        };
        return if executable(&p) {
            Ok(p)
        } else if p.exists() {
            Err((
                ErrorKind::PermissionDenied,
                format!("{argv0} is not an executable file"),
            ))
        } else {
            Err((ErrorKind::NotFound, format!("program {argv0} not found")))
        };
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(argv0))
        .find(|p| executable(p))
        .ok_or_else(|| {
            (
                ErrorKind::NotFound,
                format!("program {argv0} not found in PATH {path_var}"),
            )
        })
}

/// Maps an I/O error to the protocol's error classes.
pub fn io_kind(e: &std::io::Error) -> ErrorKind {
    match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        _ => ErrorKind::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_through_path() {
        let p = resolve_program("sh", "/nonexistent:/bin:/usr/bin", None).unwrap();
        assert!(p.ends_with("sh"));
    }

    #[test]
    fn missing_program_is_not_found_and_named() {
        let (kind, msg) = resolve_program("no-such-program-xyz", "/bin", None).unwrap_err();
        assert_eq!(kind, ErrorKind::NotFound);
        assert!(msg.contains("no-such-program-xyz"), "{msg}");
    }

    #[test]
    fn non_executable_file_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let (kind, _) = resolve_program(f.path().to_str().unwrap(), "", None).unwrap_err();
        assert_eq!(kind, ErrorKind::PermissionDenied);
    }
}
