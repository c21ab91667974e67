//! The `microvm` backend: one `vmm` process per guest.
//!
//! agentd never touches KVM: it spawns `vmm` with the guest's kernel,
//! initramfs, vCPUs and memory, a vsock socket and a control socket, all in
//! the guest's own directory `<runtime_dir>/vm/<id>/`, and waits for the
//! guest's hello on the vsock listener for port 1024. A watcher task owns
//! the child: it notices the process ending (crash or shutdown) and keeps
//! the JSON report the VMM prints last, which carries the memory scrub.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use control_api::api::Scrub;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};
use warren_protocol::AGENT_VSOCK_PORT;

use super::{log_tail, BootError, Guest, GuestProcess, PoolKey, Usage};
use crate::config::{BackendKind, Config, ImageConfig};
use crate::guest_conn::GuestConn;

/// Kernel command line for Linux guests; the image's own `cmdline` is
/// appended. `reboot=k panic=-1`: a guest that ends or panics resets, which
/// ends the VMM.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 tsc=reliable quiet warren.transport=vsock";

/// How the VMM process ended.
#[derive(Debug, Clone)]
struct VmExit {
    status: String,
    /// The VMM's last stdout line, when it was a JSON report.
    report: Option<serde_json::Value>,
}

/// Spawns VMMs.
pub struct MicroVm {
    vmm: PathBuf,
    dir: PathBuf,
    boot_timeout: Duration,
}

impl MicroVm {
    /// From the configuration.
    pub fn new(cfg: &Config, boot_timeout: Duration) -> MicroVm {
        MicroVm {
            vmm: Config::helper_binary(&cfg.vmm_binary, "vmm"),
            dir: cfg.runtime_dir.join("vm"),
            boot_timeout,
        }
    }

    /// Where guest directories live.
    pub fn guests_dir(&self) -> &Path {
        &self.dir
    }

    pub(super) async fn boot(
        &self,
        id: &str,
        key: &PoolKey,
        image: &ImageConfig,
        spawned: impl FnOnce(u32),
    ) -> Result<Guest, BootError> {
        let kernel = image.kernel.clone().ok_or_else(|| BootError::Setup {
            id: id.into(),
            message: format!("image {} has no kernel; the microvm backend boots one", key.image),
        })?;
        if !kernel.is_file() {
            return Err(BootError::MissingArtifact {
                image: key.image.clone(),
                what: "kernel",
                path: kernel,
                hint: " (build it with `cargo xtask kernel`)",
            });
        }
        if let Some(i) = &image.initramfs {
            if !i.is_file() {
                return Err(BootError::MissingArtifact {
                    image: key.image.clone(),
                    what: "initramfs",
                    path: i.clone(),
                    hint: " (build it with `cargo xtask images`)",
                });
            }
        }
        let setup = |e: std::io::Error, what: &str| BootError::Setup {
            id: id.into(),
            message: format!("{what}: {e}"),
        };
        let dir = self.dir.join(id);
        std::fs::create_dir_all(&dir).map_err(|e| setup(e, &format!("creating {}", dir.display())))?;
        let vsock = dir.join("v.sock");
        let control = dir.join("control.sock");
        let listener = UnixListener::bind(format!("{}_{AGENT_VSOCK_PORT}", vsock.display()))
            .map_err(|e| setup(e, "binding the vsock listener"))?;
        let log_path = dir.join("vmm.log");
        let log = std::fs::File::create(&log_path).map_err(|e| setup(e, "creating the VMM log"))?;
        let mut cmd = tokio::process::Command::new(&self.vmm);
        cmd.arg("--kernel")
            .arg(&kernel)
            .arg("--vcpus")
            .arg(key.vcpus.to_string())
            .arg("--mem-mib")
            .arg(key.memory_mib.to_string())
            .arg("--vsock-socket")
            .arg(&vsock)
            .arg("--control-socket")
            .arg(&control);
        if let Some(r) = &image.rootfs {
            cmd.arg("--disk").arg(r);
        }
        if let Some(i) = &image.initramfs {
            cmd.arg("--initramfs").arg(i);
            // The disk is the root: guest-agent (the initramfs's /init)
            // switches into it.
            let root = if image.rootfs.is_some() {
                " warren.root=/dev/vda"
            } else {
                ""
            };
            let cmdline = match &image.cmdline {
                Some(extra) => format!("{BASE_CMDLINE} warren.hostname={id}{root} {extra}"),
                None => format!("{BASE_CMDLINE} warren.hostname={id}{root}"),
            };
            cmd.arg("--cmdline").arg(cmdline);
        }
        // Its own process group: a Ctrl-C meant for agentd must not kill
        // the VMs under it; agentd drains them itself.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| BootError::Setup {
            id: id.into(),
            message: format!("spawning {}: {e}", self.vmm.display()),
        })?;
        let pid = child.id().unwrap_or(0);
        spawned(pid);
        let stdout = child.stdout.take();
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel();
        tokio::spawn(watch_vmm(child, stdout, kill_rx, exit_tx));
        let process = VmProcess {
            dir: dir.clone(),
            control,
            exit: exit_rx,
            kill: Mutex::new(Some(kill_tx)),
            torn_down: tokio::sync::Mutex::new(None),
        };
        let fail = |e: BootError| async {
            let _ = process.teardown().await;
            e
        };
        let mut exit = process.exit.clone();
        let stream = tokio::select! {
            accepted = tokio::time::timeout(self.boot_timeout, listener.accept()) => match accepted {
                Ok(Ok((s, _))) => s,
                Ok(Err(e)) => return Err(fail(setup(e, "accepting the guest's connection")).await),
                Err(_) => {
                    let log = log_tail(&log_path, 4000);
                    return Err(fail(BootError::Timeout { id: id.into(), timeout: self.boot_timeout, log }).await);
                }
            },
            _ = async { let _ = exit.wait_for(|e| e.is_some()).await; } => {
                let status = process.exit.borrow().as_ref().map(|e| e.status.clone()).unwrap_or_default();
                let log = log_tail(&log_path, 4000);
                return Err(fail(BootError::Died { id: id.into(), status, log }).await);
            }
        };
        drop(listener);
        let _ = std::fs::remove_file(format!("{}_{AGENT_VSOCK_PORT}", vsock.display()));
        let remaining = self.boot_timeout.saturating_sub(started.elapsed());
        let (conn, hello) = match GuestConn::handshake(stream, remaining).await {
            Ok(x) => x,
            Err(source) => return Err(fail(BootError::Handshake { id: id.into(), source }).await),
        };
        Ok(Guest {
            id: id.into(),
            kind: BackendKind::Microvm,
            key: key.clone(),
            conn,
            hello,
            pid,
            boot_time: started.elapsed(),
            process: GuestProcess::Vm(process),
        })
    }
}

/// Owns the child: reports its end, kills it on request, keeps its report.
async fn watch_vmm(
    mut child: tokio::process::Child,
    stdout: Option<tokio::process::ChildStdout>,
    kill: oneshot::Receiver<()>,
    exit: watch::Sender<Option<VmExit>>,
) {
    // Read stdout while it runs: a VMM printing boot stamps must never
    // block on a full pipe.
    let reader = tokio::spawn(async move {
        let mut out = String::new();
        if let Some(mut s) = stdout {
            let _ = s.read_to_string(&mut out).await;
        }
        out
    });
    let status = tokio::select! {
        s = child.wait() => s,
        _ = kill => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    let out = reader.await.unwrap_or_default();
    let report = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    let status = match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    };
    let _ = exit.send(Some(VmExit { status, report }));
}

/// A running (or ended) VMM process.
pub(super) struct VmProcess {
    dir: PathBuf,
    control: PathBuf,
    exit: watch::Receiver<Option<VmExit>>,
    kill: Mutex<Option<oneshot::Sender<()>>>,
    torn_down: tokio::sync::Mutex<Option<Option<Scrub>>>,
}

impl VmProcess {
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn usage(&self, pid: u32) -> Usage {
        if self.has_exited() {
            return Usage::default();
        }
        let cpu_ns = crate::meter::process_cpu_ns(pid as i32).unwrap_or(0);
        let memory_bytes = procfs::process::Process::new(pid as i32)
            .and_then(|p| p.statm())
            .map(|s| s.resident * procfs::page_size())
            .unwrap_or(0);
        Usage { cpu_ns, memory_bytes }
    }

    pub(super) fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    pub(super) async fn exited(&self) {
        let mut rx = self.exit.clone();
        let _ = rx.wait_for(|e| e.is_some()).await;
    }

    fn kill(&self) {
        if let Some(tx) = self.kill.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
    }

    /// Asks the VMM to shut the guest down (it then scrubs guest memory and
    /// prints its report), kills it if it does not end in time, and
    /// removes the guest's directory.
    pub(super) async fn teardown(&self) -> Result<Option<Scrub>, String> {
        let mut done = self.torn_down.lock().await;
        if let Some(s) = *done {
            return Ok(s);
        }
        if !self.has_exited() {
            if let Err(e) = ask_shutdown(&self.control).await {
                tracing::warn!(dir = %self.dir.display(), error = %e, "control socket shutdown failed; killing the VMM");
                self.kill();
            }
            if tokio::time::timeout(Duration::from_secs(10), self.exited())
                .await
                .is_err()
            {
                tracing::warn!(dir = %self.dir.display(), "VMM still running 10 s after shutdown; killing it");
                self.kill();
                self.exited().await;
            }
        }
        let scrub = self
            .exit
            .borrow()
            .as_ref()
            .and_then(|e| e.report.as_ref())
            .and_then(|r| r.get("scrub"))
            .and_then(|s| serde_json::from_value::<Scrub>(s.clone()).ok());
        let removed = std::fs::remove_dir_all(&self.dir);
        *done = Some(scrub);
        match removed {
            Ok(()) => Ok(scrub),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(scrub),
            Err(e) => Err(format!("removing {}: {e}", self.dir.display())),
        }
    }
}

/// `{"op":"shutdown"}` on the VMM's control socket.
async fn ask_shutdown(control: &Path) -> std::io::Result<()> {
    let mut s = UnixStream::connect(control).await?;
    s.write_all(b"{\"op\":\"shutdown\",\"timeout_ms\":3000}\n").await?;
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), BufReader::new(s).read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    if line.contains("\"ok\":true") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("VMM answered {}", line.trim())))
    }
}
