//! The `namespace` backend: guest-agent as PID 1 of fresh mount, PID,
//! network, IPC and UTS namespaces, chrooted into an overlay of the image,
//! in its own cgroup, under seccomp (see [`crate::sandbox`]). A weaker
//! boundary than a VM: the guest shares the host's kernel.
//!
//! The image's root is its initramfs, unpacked once under
//! `<data_dir>/images/`. Metering reads the sandbox's cgroup, teardown
//! wipes its scratch tmpfs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control_api::api::Scrub;
use tokio::sync::watch;

use super::{BootError, Guest, GuestProcess, PoolKey, Usage};
use crate::cgroup::Cgroups;
use crate::config::{BackendKind, Config, ImageConfig};
use crate::guest_conn::GuestConn;
use crate::sandbox::{self, Sandbox, SandboxConfig, SandboxSpec};

/// Starts sandboxes.
pub struct Namespace {
    cfg: SandboxConfig,
    cgroups: Cgroups,
    images_dir: PathBuf,
    unpacked: Mutex<HashMap<PathBuf, PathBuf>>,
    boot_timeout: Duration,
}

impl Namespace {
    /// Detects cgroups; fails, saying why, when there are none usable.
    pub fn new(cfg: &Config, boot_timeout: Duration) -> Result<Namespace, String> {
        let cgroups = Cgroups::detect().map_err(|e| format!("the namespace backend needs cgroups: {e}"))?;
        Ok(Namespace {
            cfg: SandboxConfig {
                nsinit: Config::helper_binary(&cfg.nsinit_binary, "warren-nsinit"),
                runtime_dir: cfg.runtime_dir.clone(),
            },
            cgroups,
            images_dir: cfg.data_dir.join("images"),
            unpacked: Mutex::new(HashMap::new()),
            boot_timeout,
        })
    }

    /// The cgroup layout in use.
    pub fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    /// The sandbox configuration (for cleaning leftovers).
    pub fn sandbox_config(&self) -> &SandboxConfig {
        &self.cfg
    }

    fn image_root(&self, image: &str, initramfs: &Path) -> Result<PathBuf, String> {
        let mut cache = self.unpacked.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(root) = cache.get(initramfs) {
            if root.is_dir() {
                return Ok(root.clone());
            }
        }
        let root = sandbox::unpack_image(initramfs, &self.images_dir)
            .map_err(|e| format!("unpacking image {image} from {}: {e}", initramfs.display()))?;
        cache.insert(initramfs.to_path_buf(), root.clone());
        Ok(root)
    }

    /// Unmounts the ext4 root file systems this backend mounted (lazily:
    /// sandboxes still running keep theirs). Called when agentd stops.
    pub fn release_images(&self) -> usize {
        sandbox::rootfs::unmount_all(&self.images_dir)
    }

    /// Unmounts one image's root file system (lazily), before its file is
    /// deleted: its loop device and blocks are freed once no sandbox uses it.
    pub fn release_image(&self, rootfs: &Path) -> bool {
        sandbox::rootfs::unmount(&self.images_dir, rootfs)
    }

    pub(super) async fn boot(
        &self,
        id: &str,
        key: &PoolKey,
        image: &ImageConfig,
        spawned: impl FnOnce(u32),
    ) -> Result<Guest, BootError> {
        let initramfs = image.initramfs.clone().ok_or_else(|| BootError::Setup {
            id: id.into(),
            message: format!(
                "image {} has no initramfs; the namespace backend uses it as the root",
                key.image
            ),
        })?;
        if !initramfs.is_file() {
            return Err(BootError::MissingArtifact {
                image: key.image.clone(),
                what: "initramfs",
                path: initramfs,
                hint: " (build it with `cargo xtask images`)",
            });
        }
        let image_rootfs = image.rootfs.clone();
        let started = Instant::now();
        let setup = |message: String| BootError::Setup { id: id.into(), message };
        let (image_root, agent_layer) = {
            let image = key.image.clone();
            let roots = tokio::task::block_in_place(|| -> Result<(PathBuf, Option<PathBuf>), String> {
                let unpacked = self.image_root(&image, &initramfs)?;
                match &image_rootfs {
                    None => Ok((unpacked, None)),
                    Some(rootfs) => {
                        let mounted = sandbox::rootfs::ensure_mounted(&self.images_dir, rootfs)
                            .map_err(|e| format!("image {image}: {e}"))?;
                        Ok((mounted, Some(agent_layer(&unpacked)?)))
                    }
                }
            });
            roots.map_err(setup)?
        };
        let spec = SandboxSpec {
            id: id.into(),
            image_root,
            agent_layer,
            memory_mib: key.memory_mib,
            vcpus: key.vcpus,
            hostname: id.into(),
        };
        let sandbox = tokio::task::block_in_place(|| Sandbox::start(&self.cfg, &self.cgroups, &spec))
            .map_err(|e| setup(format!("starting the sandbox: {e}")))?;
        let pid = sandbox.pid();
        spawned(pid);
        let dir = sandbox.dir().to_path_buf();
        let listener = sandbox
            .listener()
            .try_clone()
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::UnixListener::from_std(l)
            })
            .map_err(|e| setup(format!("watching the agent socket: {e}")));
        let process = NsProcess::new(sandbox, dir);
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                let _ = process.teardown().await;
                return Err(e);
            }
        };
        let accepted = tokio::select! {
            a = tokio::time::timeout(self.boot_timeout, listener.accept()) => a,
            _ = process.exited() => {
                let status = process.exit_status();
                let log = process.log();
                let _ = process.teardown().await;
                return Err(BootError::Died { id: id.into(), status, log });
            }
        };
        let stream = match accepted {
            Ok(Ok((s, _))) => s,
            Ok(Err(e)) => {
                let _ = process.teardown().await;
                return Err(setup(format!("accepting the agent's connection: {e}")));
            }
            Err(_) => {
                let log = process.log();
                let _ = process.teardown().await;
                return Err(BootError::Timeout {
                    id: id.into(),
                    timeout: self.boot_timeout,
                    log,
                });
            }
        };
        drop(listener);
        let remaining = self.boot_timeout.saturating_sub(started.elapsed());
        let (conn, hello) = match GuestConn::handshake(stream, remaining).await {
            Ok(x) => x,
            Err(source) => {
                let _ = process.teardown().await;
                return Err(BootError::Handshake { id: id.into(), source });
            }
        };
        Ok(Guest {
            id: id.into(),
            kind: BackendKind::Namespace,
            key: key.clone(),
            conn,
            hello,
            pid,
            boot_time: started.elapsed(),
            process: GuestProcess::Ns(process),
        })
    }
}

/// A running (or ended) sandbox and a task that notices its end.
pub(super) struct NsProcess {
    sandbox: Arc<Mutex<Option<Sandbox>>>,
    dir: PathBuf,
    exit: watch::Receiver<Option<String>>,
    torn_down: tokio::sync::Mutex<Option<Option<Scrub>>>,
}

impl NsProcess {
    fn new(sandbox: Sandbox, dir: PathBuf) -> NsProcess {
        let sandbox = Arc::new(Mutex::new(Some(sandbox)));
        let (tx, rx) = watch::channel(None);
        let watched = sandbox.clone();
        // The sandbox's launcher is a std child (it is spawned with a
        // pre-exec hook); poll it. 50 ms bounds how late a crash is seen.
        tokio::spawn(async move {
            loop {
                let status = {
                    let mut g = watched.lock().unwrap_or_else(|p| p.into_inner());
                    match g.as_mut() {
                        None => Some("torn down".to_string()),
                        Some(s) => match s.child_mut().try_wait() {
                            Ok(Some(st)) => Some(st.to_string()),
                            Ok(None) => None,
                            Err(e) => Some(format!("wait failed: {e}")),
                        },
                    }
                };
                if let Some(st) = status {
                    let _ = tx.send(Some(st));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        NsProcess {
            sandbox,
            dir,
            exit: rx,
            torn_down: tokio::sync::Mutex::new(None),
        }
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    fn exit_status(&self) -> String {
        self.exit.borrow().clone().unwrap_or_default()
    }

    fn log(&self) -> String {
        match self.sandbox.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(s) => s.log(),
            None => String::new(),
        }
    }

    pub(super) fn usage(&self) -> Usage {
        match self.sandbox.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(s) => s
                .usage()
                .map(|u| Usage {
                    cpu_ns: u.cpu_ns,
                    memory_bytes: u.memory_bytes,
                })
                .unwrap_or_default(),
            None => Usage::default(),
        }
    }

    pub(super) fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    pub(super) async fn exited(&self) {
        let mut rx = self.exit.clone();
        let _ = rx.wait_for(|e| e.is_some()).await;
    }

    /// Kills the sandbox, wipes its scratch space, removes its mounts,
    /// files and cgroup.
    pub(super) async fn teardown(&self) -> Result<Option<Scrub>, String> {
        let mut done = self.torn_down.lock().await;
        if let Some(s) = *done {
            return Ok(s);
        }
        let sandbox = self.sandbox.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(sandbox) = sandbox else {
            *done = Some(None);
            return Ok(None);
        };
        let report = tokio::task::spawn_blocking(move || sandbox.teardown())
            .await
            .map_err(|e| format!("teardown task: {e}"))?
            .map_err(|e| e.to_string())?;
        let scrub = Some(Scrub {
            bytes: report.bytes,
            ns: report.ns,
        });
        *done = Some(scrub);
        Ok(scrub)
    }
}

/// The layer that puts guest-agent (`/init` of the unpacked initramfs) on
/// top of an image that does not have it: `<unpacked>.agent/init`, a hard
/// link (or copy) made once.
fn agent_layer(unpacked: &Path) -> Result<PathBuf, String> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut name = unpacked.as_os_str().to_owned();
    name.push(".agent");
    let layer = PathBuf::from(name);
    let init = layer.join("init");
    if init.is_file() {
        return Ok(layer);
    }
    // Boots run concurrently: each builds its own temporary directory and
    // the first rename wins. Never copy onto an existing file: it could be
    // a hard link of the unpacked image's own /init.
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = layer.with_extension(format!("tmp{}-{seq}", std::process::id()));
    let made = std::fs::create_dir(&tmp).and_then(|()| {
        let (src, dst) = (unpacked.join("init"), tmp.join("init"));
        match std::fs::hard_link(&src, &dst) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
            Err(_) => std::fs::copy(&src, &dst).map(|_| ()),
        }
    });
    let renamed = made.and_then(|()| std::fs::rename(&tmp, &layer));
    if let Err(e) = renamed {
        let _ = std::fs::remove_dir_all(&tmp);
        if !init.is_file() {
            return Err(format!("making the guest-agent layer {}: {e}", layer.display()));
        }
    }
    Ok(layer)
}
