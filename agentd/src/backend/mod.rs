//! The two isolation backends behind one interface: [`Backends::boot`]
//! gives a [`Guest`] that has said hello, whichever backend made it, and
//! everything after that (exec, metering, crash watch, teardown) goes
//! through [`Guest`].
//!
//! - [`microvm`]: one `vmm` process per guest, the product.
//! - [`namespace`]: guest-agent as PID 1 of fresh namespaces, chrooted into
//!   the image, in its own cgroup, under seccomp — a weaker boundary, said
//!   so everywhere.

pub mod microvm;
pub mod namespace;
pub(crate) mod readiness;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use control_api::api::Scrub;
use warren_protocol::Hello;

use crate::cgroup::Cgroups;
use crate::config::{BackendKind, Config, ImageConfig};
use crate::guest_conn::GuestConn;

/// Why a guest did not come up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The image is not configured.
    #[error("no image {0:?} is configured")]
    UnknownImage(String),
    /// An artifact the image needs is missing.
    #[error("image {image}: {what} {} is missing{hint}", path.display())]
    MissingArtifact {
        /// Image name.
        image: String,
        /// `kernel`, `initramfs` or `rootfs`.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to make it.
        hint: &'static str,
    },
    /// Setting up the guest failed.
    #[error("setting up guest {id}: {message}")]
    Setup {
        /// Guest id.
        id: String,
        /// What failed.
        message: String,
    },
    /// The guest's process ended before it said hello.
    #[error("guest {id} exited before its hello ({status}); its log says:\n{log}")]
    Died {
        /// Guest id.
        id: String,
        /// Exit status.
        status: String,
        /// The tail of its log.
        log: String,
    },
    /// No hello in time.
    #[error("guest {id} did not say hello within {timeout:?}; its log says:\n{log}")]
    Timeout {
        /// Guest id.
        id: String,
        /// The limit.
        timeout: Duration,
        /// The tail of its log.
        log: String,
    },
    /// The hello was wrong.
    #[error("guest {id}: {source}")]
    Handshake {
        /// Guest id.
        id: String,
        /// Why.
        source: crate::guest_conn::ConnError,
    },
}

/// A pool key: what makes two guests interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// Image name.
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory.
    pub memory_mib: u32,
}

/// Resource use of a guest right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// On-CPU nanoseconds so far.
    pub cpu_ns: u64,
    /// Resident memory.
    pub memory_bytes: u64,
}

/// A booted guest that has said hello.
pub struct Guest {
    /// Guest id (its directory's name).
    pub id: String,
    /// Which backend runs it.
    pub kind: BackendKind,
    /// Its pool key.
    pub key: PoolKey,
    /// The connection to its agent.
    pub conn: GuestConn,
    /// Its hello.
    pub hello: Hello,
    /// The process agentd spawned for it.
    pub pid: u32,
    /// Spawn → hello.
    pub boot_time: Duration,
    process: GuestProcess,
}

enum GuestProcess {
    Vm(microvm::VmProcess),
    Ns(namespace::NsProcess),
}

impl Guest {
    /// What it has used so far.
    pub fn usage(&self) -> Usage {
        match &self.process {
            GuestProcess::Vm(v) => v.usage(self.pid),
            GuestProcess::Ns(n) => n.usage(),
        }
    }

    /// Whether its process has ended.
    pub fn has_exited(&self) -> bool {
        match &self.process {
            GuestProcess::Vm(v) => v.has_exited(),
            GuestProcess::Ns(n) => n.has_exited(),
        }
    }

    /// Resolves when its process has ended, however it ended.
    pub async fn exited(&self) {
        match &self.process {
            GuestProcess::Vm(v) => v.exited().await,
            GuestProcess::Ns(n) => n.exited().await,
        }
    }

    /// Ends the guest and wipes what it left; returns the wipe's report
    /// (`None` when the guest had died and its memory could not be wiped
    /// by us: the kernel freed it with the process). Idempotent.
    pub async fn teardown(&self) -> Result<Option<Scrub>, String> {
        match &self.process {
            GuestProcess::Vm(v) => v.teardown().await,
            GuestProcess::Ns(n) => n.teardown().await,
        }
    }

    /// Its directory under the runtime dir.
    pub fn dir(&self) -> PathBuf {
        match &self.process {
            GuestProcess::Vm(v) => v.dir().to_path_buf(),
            GuestProcess::Ns(n) => n.dir().to_path_buf(),
        }
    }
}

/// Boots guests of the configured backend.
pub struct Backends {
    /// The backend new guests get.
    pub kind: BackendKind,
    /// Configured images, and the ones imported since (`add_image`).
    images: std::sync::RwLock<BTreeMap<String, ImageConfig>>,
    vm: microvm::MicroVm,
    ns: Option<namespace::Namespace>,
    boot_timeout: Duration,
}

impl Backends {
    /// Sets up `kind` from the configuration (the namespace backend needs
    /// cgroups; their absence is an error here, not at the first boot).
    pub fn new(cfg: &Config, kind: BackendKind, boot_timeout: Duration) -> Result<Backends, String> {
        let ns = match kind {
            BackendKind::Namespace => Some(namespace::Namespace::new(cfg, boot_timeout)?),
            BackendKind::Microvm => None,
        };
        Ok(Backends {
            kind,
            images: std::sync::RwLock::new(cfg.images.clone()),
            vm: microvm::MicroVm::new(cfg, boot_timeout),
            ns,
            boot_timeout,
        })
    }

    /// The namespace backend's cgroups, when it is the one in use.
    pub fn cgroups(&self) -> Option<&Cgroups> {
        self.ns.as_ref().map(|n| n.cgroups())
    }

    /// The namespace backend, when it is the one in use.
    pub fn namespace(&self) -> Option<&namespace::Namespace> {
        self.ns.as_ref()
    }

    /// The microVM backend (also used to clean what a previous run left).
    pub fn microvm(&self) -> &microvm::MicroVm {
        &self.vm
    }

    /// Whether `image` is configured.
    pub fn has_image(&self, image: &str) -> bool {
        self.image(image).is_some()
    }

    /// The image called `image`.
    pub fn image(&self, image: &str) -> Option<ImageConfig> {
        self.images
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(image)
            .cloned()
    }

    /// Every image, by name.
    pub fn images(&self) -> BTreeMap<String, ImageConfig> {
        self.images.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets an image (guests already booted from it keep running).
    pub fn remove_image(&self, name: &str) -> Option<ImageConfig> {
        self.images.write().unwrap_or_else(|p| p.into_inner()).remove(name)
    }

    /// Adds (or replaces) an image; false when a configured image of that
    /// name exists and `replace` is false.
    pub fn add_image(&self, name: &str, image: ImageConfig, replace: bool) -> bool {
        let mut images = self.images.write().unwrap_or_else(|p| p.into_inner());
        if images.contains_key(name) && !replace {
            return false;
        }
        images.insert(name.to_string(), image);
        true
    }

    /// Boots one guest for `key`, named `id`; `spawned(pid)` is called as
    /// soon as its process exists, so it can be recorded before it could
    /// outlive agentd.
    pub async fn boot(&self, id: &str, key: &PoolKey, spawned: impl FnOnce(u32)) -> Result<Guest, BootError> {
        let image = self
            .image(&key.image)
            .ok_or_else(|| BootError::UnknownImage(key.image.clone()))?;
        // Both backends use the root file system as it is: check it once.
        if let Some(r) = &image.rootfs {
            if !r.is_file() {
                return Err(BootError::MissingArtifact {
                    image: key.image.clone(),
                    what: "rootfs",
                    path: r.clone(),
                    hint: " (build the python image with `cargo xtask images`, or import one with `agentctl image import`)",
                });
            }
        }
        let started = std::time::Instant::now();
        let mut guest = match (self.kind, &self.ns) {
            (BackendKind::Microvm, _) => self.vm.boot(id, key, &image, spawned).await?,
            (BackendKind::Namespace, Some(ns)) => ns.boot(id, key, &image, spawned).await?,
            (BackendKind::Namespace, None) => {
                return Err(BootError::Setup {
                    id: id.into(),
                    message: "the namespace backend is not set up".into(),
                })
            }
        };
        if let Some(port) = image.interpreter_port {
            let left = self.boot_timeout.saturating_sub(started.elapsed());
            match readiness::wait_for_interpreter(&guest.conn, port, left).await {
                Ok(waited) => {
                    tracing::debug!(guest = id, ms = waited.as_millis() as u64, "code interpreter ready");
                    guest.boot_time = started.elapsed();
                }
                Err(message) => {
                    let _ = guest.teardown().await;
                    return Err(BootError::Setup { id: id.into(), message });
                }
            }
        }
        Ok(guest)
    }
}

/// Reads the last `max` bytes of a log file, for error messages.
pub(crate) fn log_tail(path: &std::path::Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).trim_end().to_string()
}

/// The start time of `pid` in clock ticks since boot, to tell it from a
/// recycled pid later.
pub fn pid_start_time(pid: u32) -> Option<u64> {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| s.starttime)
        .ok()
}
