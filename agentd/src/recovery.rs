//! Start-up cleanup after a previous run died (`kill -9`, OOM, a crash):
//! every guest process it left is killed, every socket, directory, mount
//! and cgroup removed, and every session it left open is closed with the
//! reason `agentd_restart`.
//!
//! Guests are found two ways, so that a crash at any point is covered: the
//! `guests` table (written as soon as a guest's process exists, with its
//! start time so a recycled pid is never killed), and the runtime
//! directory itself (a guest directory nobody recorded).

use std::collections::BTreeSet;
use std::path::Path;

use control_api::api::SessionState;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::backend::pid_start_time;
use crate::cgroup::Cgroups;
use crate::sandbox::{self, SandboxConfig};
use crate::session::now_ms;
use crate::store::{Store, StoreError};

/// What the cleanup found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Guest processes killed.
    pub processes_killed: u32,
    /// Guest directories (with their sockets, mounts, cgroups) removed.
    pub guests_cleaned: u32,
    /// Sessions closed as `agentd_restart`.
    pub sessions_closed: u32,
    /// Problems that did not stop the cleanup.
    pub errors: Vec<String>,
}

/// Cleans what a previous run left under `runtime_dir`.
pub fn recover(store: &Store, runtime_dir: &Path, sandbox_cfg: &SandboxConfig) -> Result<RecoveryReport, StoreError> {
    let mut report = RecoveryReport::default();
    let mut seen = BTreeSet::new();
    let cgroups = Cgroups::detect().ok();
    let cleaner = Cleaner {
        runtime_dir,
        sandbox_cfg,
        cgroups: cgroups.as_ref(),
    };
    for g in store.guests()? {
        seen.insert(g.id.clone());
        if g.pid > 0
            && pid_start_time(g.pid) == Some(g.pid_start)
            && kill(Pid::from_raw(g.pid as i32), Signal::SIGKILL).is_ok()
        {
            report.processes_killed += 1;
        }
        cleaner.clean(&g.backend, &g.id, &g.dir, &mut report);
        store.remove_guest(&g.id)?;
    }
    // Directories nobody recorded (a crash between spawn and record).
    let vm_dir = runtime_dir.join("vm");
    let unrecorded_vms: Vec<String> = std::fs::read_dir(&vm_dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for id in unrecorded_vms.into_iter().filter(|id| !seen.contains(id)) {
        let dir = vm_dir.join(&id);
        cleaner.clean("microvm", &id, &dir, &mut report);
    }
    for id in sandbox::leftover_ids(sandbox_cfg)
        .into_iter()
        .filter(|id| !seen.contains(id))
    {
        let dir = runtime_dir.join("ns").join(&id);
        cleaner.clean("namespace", &id, &dir, &mut report);
    }
    for mut s in store.unfinished_sessions()? {
        s.state = SessionState::Ended;
        s.end_reason = Some("agentd_restart".into());
        s.ended_at_ms = Some(now_ms());
        store.put_session(&s)?;
        report.sessions_closed += 1;
    }
    Ok(report)
}

/// What cleaning one guest needs to know.
struct Cleaner<'a> {
    runtime_dir: &'a Path,
    sandbox_cfg: &'a SandboxConfig,
    cgroups: Option<&'a Cgroups>,
}

impl Cleaner<'_> {
    fn clean(&self, backend: &str, id: &str, dir: &Path, report: &mut RecoveryReport) {
        let (runtime_dir, sandbox_cfg, cgroups) = (self.runtime_dir, self.sandbox_cfg, self.cgroups);
        // Only ever touch what lies under our runtime directory.
        if !dir.starts_with(runtime_dir) {
            report.errors.push(format!(
                "guest {id}: {} is outside {}; left alone",
                dir.display(),
                runtime_dir.display()
            ));
            return;
        }
        report.processes_killed += kill_processes_using(dir);
        let result = match (backend, cgroups) {
            ("namespace", Some(cg)) => sandbox::clean_leftover(sandbox_cfg, cg, id)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            ("namespace", None) => Err("no cgroups to clean a sandbox with".to_string()),
            _ => match std::fs::remove_dir_all(dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("removing {}: {e}", dir.display())),
            },
        };
        match result {
            Ok(()) => report.guests_cleaned += 1,
            Err(e) => report.errors.push(format!("guest {id}: {e}")),
        }
    }
}

/// Kills every process whose command line names a path under `dir` (the
/// VMM gets its sockets there, the sandbox launcher its root).
fn kill_processes_using(dir: &Path) -> u32 {
    let needle = dir.to_string_lossy().into_owned();
    let mut killed = 0;
    let Ok(all) = procfs::process::all_processes() else {
        return 0;
    };
    for p in all.flatten() {
        if p.pid == std::process::id() as i32 {
            continue;
        }
        let Ok(cmdline) = p.cmdline() else { continue };
        if cmdline.iter().any(|a| a.starts_with(&needle)) && kill(Pid::from_raw(p.pid), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    killed
}
