//! The image's entrypoint: the program its metadata names (an agent
//! server, the code interpreter), started once the root is in place and
//! supervised for the life of the guest.
//!
//! The metadata is `/etc/warren/image.json` inside the image, written by
//! Warren's image builders and OCI import: `argv` (Entrypoint ++ Cmd),
//! `env` (`K=V`), `working_dir` and `user` (`{uid, gid}` or null); other
//! keys are ignored. The entrypoint is not restarted when it ends: its exit
//! is reported ([`Supervisor::state`]) and the host decides.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Deserialize;
use warren_protocol::{EntrypointState, ExitStatus};

use crate::exec::{resolve_program, DEFAULT_PATH};
use crate::reaper::{Exit, Reaper};

/// Default metadata path inside the image.
pub const METADATA_PATH: &str = "/etc/warren/image.json";

#[derive(Debug, Deserialize)]
struct Metadata {
    #[serde(default)]
    argv: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<User>,
}

#[derive(Debug, Deserialize)]
struct User {
    uid: u32,
    gid: u32,
}

/// Keeps the entrypoint's state for the host to ask.
pub struct Supervisor {
    state: Mutex<EntrypointState>,
}

impl Supervisor {
    /// A supervisor with nothing to supervise.
    pub fn none() -> Arc<Supervisor> {
        Arc::new(Supervisor {
            state: Mutex::new(EntrypointState::None),
        })
    }

    /// Reads the metadata at `path` and starts its entrypoint, if any.
    pub fn start(reaper: &Reaper, path: &Path) -> Arc<Supervisor> {
        let sup = Supervisor::none();
        let state = match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => EntrypointState::None,
            Err(e) => EntrypointState::Failed {
                message: format!("reading {}: {e}", path.display()),
            },
            Ok(bytes) => match serde_json::from_slice::<Metadata>(&bytes) {
                Err(e) => EntrypointState::Failed {
                    message: format!("{} is not valid image metadata: {e}", path.display()),
                },
                Ok(meta) if meta.argv.is_empty() => EntrypointState::None,
                Ok(meta) => spawn(reaper, meta, &sup),
            },
        };
        match &state {
            EntrypointState::Failed { message } => tracing::error!(%message, "entrypoint not started"),
            EntrypointState::Running { pid, argv } => tracing::info!(pid, ?argv, "entrypoint started"),
            _ => {}
        }
        let mut current = sup.state.lock().unwrap_or_else(|e| e.into_inner());
        // A spawned entrypoint already set its state (and may have exited).
        if *current == EntrypointState::None {
            *current = state;
        }
        drop(current);
        sup
    }

    /// The entrypoint's state now.
    pub fn state(&self) -> EntrypointState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn spawn(reaper: &Reaper, meta: Metadata, sup: &Arc<Supervisor>) -> EntrypointState {
    let mut env = Vec::with_capacity(meta.env.len());
    for kv in &meta.env {
        let Some((k, v)) = kv.split_once('=') else {
            return EntrypointState::Failed {
                message: format!("environment entry {kv:?} is not K=V"),
            };
        };
        env.push((k, v));
    }
    let path_var = env
        .iter()
        .rev()
        .find(|(k, _)| *k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| *v);
    let cwd = meta.working_dir.filter(|d| !d.is_empty()).unwrap_or_else(|| "/".into());
    if !Path::new(&cwd).is_dir() {
        return EntrypointState::Failed {
            message: format!("working directory {cwd} does not exist in the image"),
        };
    }
    // Resolved before spawning, as exec requests are: a failed exec after
    // fork would be waited for by std while PID 1's reaper may already have
    // reaped the child.
    let program = match resolve_program(&meta.argv[0], path_var, Some(&cwd)) {
        Ok(p) => p,
        Err((_, message)) => return EntrypointState::Failed { message },
    };
    let mut cmd = Command::new(program);
    cmd.arg0(&meta.argv[0])
        .args(&meta.argv[1..])
        .env_clear()
        .env("PATH", path_var)
        .envs(env)
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .process_group(0);
    if let Some(u) = &meta.user {
        cmd.uid(u.uid).gid(u.gid);
    }
    let started = Instant::now();
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return EntrypointState::Failed {
                message: format!("starting {:?}: {e}", meta.argv),
            }
        }
    };
    let pid = child.id();
    // The reaper owns waiting (PID 1 reaps everything); `child` is only
    // dropped, never waited on.
    drop(child);
    let exits = reaper.watch(pid as i32);
    let running = EntrypointState::Running {
        pid,
        argv: meta.argv.clone(),
    };
    *sup.state.lock().unwrap_or_else(|e| e.into_inner()) = running.clone();
    let (sup, argv) = (sup.clone(), meta.argv.clone());
    let watcher = std::thread::Builder::new().name("entrypoint".into()).spawn(move || {
        let Ok(exit) = exits.recv() else { return };
        let (code, signal) = match exit {
            Exit::Code(c) => (Some(c), None),
            Exit::Signal(s) => (None, Some(s)),
        };
        tracing::warn!(?argv, ?code, ?signal, "entrypoint exited");
        *sup.state.lock().unwrap_or_else(|e| e.into_inner()) = EntrypointState::Exited {
            argv,
            status: ExitStatus {
                code,
                signal,
                timed_out: false,
                duration_ns: started.elapsed().as_nanos() as u64,
            },
        };
    });
    if let Err(e) = watcher {
        tracing::error!(error = %e, "cannot start the entrypoint's watcher thread");
    }
    running
}
