//! The `namespace` isolation backend, host side: one sandbox per session.
//!
//! On hosts whose KVM cannot run a Linux guest at native speed, agentd runs
//! guest-agent as an ordinary process instead, inside fresh namespaces
//! (mount, PID, network, IPC, UTS), with the session's image as its root,
//! in its own cgroup and under seccomp. It is a weaker boundary than a VM
//! (it shares the host kernel) but keeps the rest of the contract: the same
//! guest protocol, metering from the cgroup, and a teardown that scrubs
//! what the session wrote and leaves nothing behind.
//!
//! A sandbox's state on the host, all under `runtime_dir/ns/<id>/`:
//!
//! ```text
//! scratch/        tmpfs (size = the session's memory): everything writable
//!   upper/ work/  the overlay's upper and work directories
//!   nsinit.log    warren-nsinit's and guest-agent's stderr
//! root/           overlayfs: the unpacked image (read-only lower) + upper
//! sock/agent.sock the Unix socket guest-agent connects to (bound read-only
//!                 at /.warren: connecting works, writing files does not)
//! ```
//!
//! The log is on the scratch tmpfs because the sandbox can reach it (as
//! `/proc/1/fd/2`): there its size is bounded and it is scrubbed.
//!
//! Both mounts live in the host's mount namespace, so agentd can scrub and
//! unmount them whatever the sandbox did; the sandbox gets its own copy and
//! detaches everything else (see `warren-nsinit`). The cgroup is
//! `warren/<id>` in every hierarchy, and warren-nsinit joins it before it
//! runs, so every process of the sandbox is in it from the start. After an
//! agentd crash, [`leftover_ids`] and [`clean_leftover`] find and remove
//! what the dead agentd left.

mod image;
pub mod rootfs;
mod scrub;

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::mount::{mount, MsFlags};

use crate::cgroup::{CgroupError, Cgroups, Limits, SessionCgroup};

pub use image::unpack_image;
pub use scrub::ScrubReport;

/// Memory the cgroup allows on top of the session's `memory_mib`: room for
/// guest-agent itself and the kernel's per-process overhead.
const MEMORY_HEADROOM_MIB: u64 = 64;
/// Process limit per sandbox (fork bombs stop here).
const PIDS_MAX: u32 = 4096;
/// How long teardown waits for killed processes to go.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest sandbox id.
const MAX_ID: usize = 40;

/// What can go wrong running a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The id is not `[a-z0-9-]{1,40}`.
    #[error("invalid sandbox id {0:?}: use [a-z0-9-], 1 to {MAX_ID} characters")]
    InvalidId(String),
    /// Some other field of the spec is unusable.
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    /// A sandbox with this id already has state on the host.
    #[error("sandbox {id} already exists at {}; tear it down or clean it first", dir.display())]
    Exists {
        /// The id.
        id: String,
        /// Its directory.
        dir: PathBuf,
    },
    /// A file system step failed (creating, mounting, binding, reading).
    #[error("{step} {}: {source}", path.display())]
    Io {
        /// The step.
        step: &'static str,
        /// The path it was working on.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Creating or reading the cgroup failed.
    #[error("{step}: {source}")]
    Cgroup {
        /// The step.
        step: &'static str,
        /// Why it failed.
        #[source]
        source: CgroupError,
    },
    /// warren-nsinit could not be started.
    #[error("cannot start {}: {source}", nsinit.display())]
    Spawn {
        /// The binary.
        nsinit: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image archive is unusable.
    #[error("image {}: {why}", path.display())]
    Image {
        /// The archive.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Teardown or cleanup could not remove everything; each entry names
    /// the step that failed. The other steps were still attempted.
    #[error("tearing down {}: {}", dir.display(), failures.join("; "))]
    Teardown {
        /// The sandbox directory.
        dir: PathBuf,
        /// What failed, step by step.
        failures: Vec<String>,
    },
}

impl SandboxError {
    pub(crate) fn io(step: &'static str, path: &Path, source: io::Error) -> SandboxError {
        SandboxError::Io {
            step,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Where the backend keeps things.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The `warren-nsinit` binary.
    pub nsinit: PathBuf,
    /// agentd's runtime directory; sandboxes live in `runtime_dir/ns/<id>`.
    pub runtime_dir: PathBuf,
}

impl SandboxConfig {
    /// The directory holding every sandbox's directory.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.runtime_dir.join("ns")
    }

    /// The directory of sandbox `id`.
    pub fn dir_of(&self, id: &str) -> PathBuf {
        self.sandboxes_dir().join(id)
    }
}

/// One sandbox to start.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// `[a-z0-9-]`, at most 40 characters; also the cgroup's name.
    pub id: String,
    /// The image's root: an unpacked initramfs ([`unpack_image`]) or a
    /// mounted ext4 root file system ([`rootfs::ensure_mounted`]); the
    /// overlay's read-only bottom layer, never written.
    pub image_root: PathBuf,
    /// A read-only layer put above the image with `/init` (guest-agent) in
    /// it, for images that do not carry guest-agent themselves.
    pub agent_layer: Option<PathBuf>,
    /// Memory for the session: the size of the scratch tmpfs (everything
    /// it writes) and, plus a little headroom, the cgroup's memory limit.
    pub memory_mib: u32,
    /// CPU limit in whole CPUs.
    pub vcpus: u32,
    /// The sandbox's hostname.
    pub hostname: String,
}

/// What a sandbox used so far, from its cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// On-CPU time of all its processes, in nanoseconds.
    pub cpu_ns: u64,
    /// Memory charged to it now, in bytes (includes its scratch files).
    pub memory_bytes: u64,
}

/// What [`clean_leftover`] found and removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanReport {
    /// Processes that were still running in the sandbox's cgroup.
    pub killed: usize,
    /// The scrub of its scratch files.
    pub scrub: ScrubReport,
    /// Mounts that were removed.
    pub unmounted: usize,
}

/// A running sandbox. Dropping it without [`Sandbox::teardown`] tears it
/// down too (errors are then only logged).
pub struct Sandbox {
    id: String,
    dir: PathBuf,
    child: Child,
    pid: u32,
    cgroup: SessionCgroup,
    listener: UnixListener,
    done: bool,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Overlay options are comma-separated and `lowerdir` is colon-separated:
/// paths holding either (or a backslash, the escape) would be misread.
fn overlay_safe(p: &Path) -> bool {
    !p.as_os_str()
        .as_bytes()
        .iter()
        .any(|b| matches!(b, b',' | b':' | b'\\'))
}

fn mkdir(path: &Path, mode: u32, step: &'static str) -> Result<(), SandboxError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(|e| SandboxError::io(step, path, e))
}

impl Sandbox {
    /// Prepares the sandbox's file systems, socket and cgroup and starts
    /// warren-nsinit with guest-agent (`/init --sandboxed`) in it. Returns
    /// once the process is started; guest-agent then connects to
    /// [`Sandbox::listener`]. On failure everything created so far is
    /// removed again.
    pub fn start(cfg: &SandboxConfig, cgroups: &Cgroups, spec: &SandboxSpec) -> Result<Sandbox, SandboxError> {
        if !valid_id(&spec.id) {
            return Err(SandboxError::InvalidId(spec.id.clone()));
        }
        if spec.hostname.is_empty()
            || spec.hostname.len() > 64
            || !spec
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(SandboxError::InvalidSpec(format!(
                "hostname {:?}: use [A-Za-z0-9.-], 1 to 64 characters",
                spec.hostname
            )));
        }
        if spec.memory_mib == 0 {
            return Err(SandboxError::InvalidSpec("memory_mib must be at least 1".into()));
        }
        let init_layer = spec.agent_layer.as_ref().unwrap_or(&spec.image_root);
        if !init_layer.join("init").is_file() {
            return Err(SandboxError::InvalidSpec(format!(
                "{} has no /init (guest-agent)",
                init_layer.display()
            )));
        }
        let dir = cfg.dir_of(&spec.id);
        for p in [&spec.image_root, &dir].into_iter().chain(spec.agent_layer.as_ref()) {
            if !overlay_safe(p) || !p.is_absolute() {
                return Err(SandboxError::InvalidSpec(format!(
                    "{} must be absolute and free of ',', ':' and '\\' (overlayfs options)",
                    p.display()
                )));
            }
        }
        let base = cfg.sandboxes_dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&base)
            .map_err(|e| SandboxError::io("creating the sandboxes directory", &base, e))?;
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Exists {
                    id: spec.id.clone(),
                    dir,
                })
            }
            Err(e) => return Err(SandboxError::io("creating the sandbox directory", &dir, e)),
        }
        let cgroup = cgroups.open(&spec.id);
        match Self::prepare_and_spawn(cfg, cgroups, spec, &dir) {
            Ok((child, listener, cgroup)) => Ok(Sandbox {
                id: spec.id.clone(),
                dir,
                pid: child.id(),
                child,
                cgroup,
                listener,
                done: false,
            }),
            Err(e) => {
                let (_, _, failures) = dismantle(&dir, &cgroup, None);
                if !failures.is_empty() {
                    tracing::warn!(dir = %dir.display(), ?failures, "cleanup after a failed start was incomplete");
                }
                Err(e)
            }
        }
    }

    fn prepare_and_spawn(
        cfg: &SandboxConfig,
        cgroups: &Cgroups,
        spec: &SandboxSpec,
        dir: &Path,
    ) -> Result<(Child, UnixListener, SessionCgroup), SandboxError> {
        let scratch = dir.join("scratch");
        mkdir(&scratch, 0o700, "creating the scratch mount point")?;
        let opts = format!("size={}m,mode=0700", spec.memory_mib);
        mount(
            Some("warren-scratch"),
            &scratch,
            Some("tmpfs"),
            MsFlags::MS_NOSUID,
            Some(opts.as_str()),
        )
        .map_err(|e| SandboxError::io("mounting the scratch tmpfs on", &scratch, e.into()))?;
        let (upper, work) = (scratch.join("upper"), scratch.join("work"));
        mkdir(&upper, 0o755, "creating the overlay upper directory")?;
        mkdir(&work, 0o700, "creating the overlay work directory")?;
        let root = dir.join("root");
        mkdir(&root, 0o755, "creating the overlay mount point")?;
        let lower = match &spec.agent_layer {
            Some(agent) => format!("{}:{}", agent.display(), spec.image_root.display()),
            None => spec.image_root.display().to_string(),
        };
        let opts = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        mount(
            Some("warren-root"),
            &root,
            Some("overlay"),
            MsFlags::MS_NOSUID,
            Some(opts.as_str()),
        )
        .map_err(|e| SandboxError::io("mounting the overlay on", &root, e.into()))?;

        let sock_dir = dir.join("sock");
        mkdir(&sock_dir, 0o700, "creating the socket directory")?;
        let sock = sock_dir.join("agent.sock");
        let listener = UnixListener::bind(&sock).map_err(|e| SandboxError::io("binding", &sock, e))?;

        let limits = Limits {
            memory_bytes: Some((u64::from(spec.memory_mib) + MEMORY_HEADROOM_MIB) << 20),
            cpus: Some(spec.vcpus.max(1)),
            pids: Some(PIDS_MAX),
        };
        let cgroup = cgroups
            .create(&spec.id, limits)
            .map_err(|source| SandboxError::Cgroup {
                step: "creating the sandbox's cgroup",
                source,
            })?;

        let log_path = scratch.join("nsinit.log");
        let log = fs::File::create(&log_path).map_err(|e| SandboxError::io("creating", &log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| SandboxError::io("duplicating the log of", &log_path, e))?;
        let procs: Vec<CString> = cgroup
            .procs_files()
            .iter()
            .map(|p| CString::new(p.as_os_str().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| SandboxError::InvalidSpec("NUL in a cgroup path".into()))?;

        let mut cmd = Command::new(&cfg.nsinit);
        cmd.arg("--root")
            .arg(&root)
            .arg("--hostname")
            .arg(&spec.hostname)
            .arg("--bind-ro")
            .arg(format!("{}:/.warren", sock_dir.display()))
            .args(["--", "/init", "--sandboxed", "--transport", "unix:/.warren/agent.sock"])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: the hook runs in the forked child before exec and only
        // makes async-signal-safe calls (open, write, close) on buffers
        // prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for p in &procs {
                    join_cgroup(p)?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| SandboxError::Spawn {
            nsinit: cfg.nsinit.clone(),
            source,
        })?;
        Ok((child, listener, cgroup))
    }

    /// The sandbox's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// warren-nsinit's pid (outside the sandbox's PID namespace).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The warren-nsinit process: its exit means the sandbox ended (see
    /// the exit statuses documented in `warren-nsinit`: 0 after guest-agent
    /// shut the sandbox down).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The socket guest-agent connects to; the caller accepts and does the
    /// handshake.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// `runtime_dir/ns/<id>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The overlay's merged view (the sandbox's `/`, as the host sees it).
    pub fn root_dir(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The overlay's upper directory: everything the sandbox wrote.
    pub fn upper_dir(&self) -> PathBuf {
        self.dir.join("scratch").join("upper")
    }

    /// The sandbox's cgroup.
    pub fn cgroup(&self) -> &SessionCgroup {
        &self.cgroup
    }

    /// warren-nsinit's and guest-agent's stderr so far (why a sandbox that
    /// ended early failed).
    pub fn log(&self) -> String {
        fs::read(self.dir.join("scratch").join("nsinit.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// CPU time and memory used, from the cgroup.
    pub fn usage(&self) -> Result<Usage, SandboxError> {
        let cg = |step, source| SandboxError::Cgroup { step, source };
        Ok(Usage {
            cpu_ns: self.cgroup.cpu_ns().map_err(|e| cg("reading CPU usage", e))?,
            memory_bytes: self.cgroup.memory_bytes().map_err(|e| cg("reading memory usage", e))?,
        })
    }

    /// Kills the sandbox, scrubs what it wrote and removes every trace of
    /// it: processes, mounts, files, socket, cgroup. Every step is
    /// attempted even when an earlier one failed; the error lists the
    /// steps that did.
    pub fn teardown(mut self) -> Result<ScrubReport, SandboxError> {
        self.done = true;
        let (report, _, failures) = dismantle(&self.dir, &self.cgroup, Some(&mut self.child));
        if failures.is_empty() {
            Ok(report)
        } else {
            Err(SandboxError::Teardown {
                dir: self.dir.clone(),
                failures,
            })
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if !self.done {
            let (_, _, failures) = dismantle(&self.dir, &self.cgroup, Some(&mut self.child));
            if !failures.is_empty() {
                tracing::error!(id = %self.id, ?failures, "dropped sandbox was not fully removed");
            }
        }
    }
}

/// Writes "0" (the writer itself) to one `cgroup.procs` file. Runs between
/// fork and exec: no allocation, errors as raw OS errors.
fn join_cgroup(procs: &CString) -> io::Result<()> {
    // SAFETY: a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: writes one byte from a static buffer to the descriptor we
    // just opened.
    let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    let err = io::Error::last_os_error();
    // SAFETY: closes the descriptor we opened, once.
    unsafe { libc::close(fd) };
    if n == 1 {
        Ok(())
    } else {
        Err(err)
    }
}

/// Kills, scrubs, unmounts and removes; returns the scrub, how many
/// processes were killed, and the failed steps.
fn dismantle(dir: &Path, cgroup: &SessionCgroup, child: Option<&mut Child>) -> (ScrubReport, usize, Vec<String>) {
    let mut failures = Vec::new();
    // 1. Kill: the cgroup holds nsinit and everything in the sandbox.
    let killed = cgroup.pids().len();
    cgroup.kill_all();
    if let Some(child) = child {
        let _ = child.kill();
        if let Err(e) = child.wait() {
            failures.push(format!("reaping warren-nsinit: {e}"));
        }
    }
    if cgroup.exists() {
        if let Err(e) = cgroup.kill_and_wait(KILL_TIMEOUT) {
            failures.push(format!("killing the sandbox's processes: {e}"));
        }
    }
    // 2. Scrub the scratch file system (the overlay's upper and work dirs).
    let (report, errors) = scrub::scrub_tree(&dir.join("scratch"));
    failures.extend(errors.into_iter().map(|e| format!("scrubbing {e}")));
    // 3. Unmount the overlay, then the scratch tmpfs.
    let errors = scrub::unmount_under(dir);
    let still_mounted = !errors.is_empty();
    failures.extend(errors);
    // 4. Remove the directory, but never through a mount that is still
    // there (that would delete through the overlay).
    if still_mounted {
        failures.push(format!("not removing {} while mounts remain", dir.display()));
    } else {
        match fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => failures.push(format!("removing {}: {e}", dir.display())),
        }
    }
    // 5. Remove the cgroup.
    if let Err(e) = cgroup.remove() {
        failures.push(format!("removing the cgroup: {e}"));
    }
    (report, killed, failures)
}

/// Removes what a sandbox left after agentd died without tearing it down:
/// kills whatever still runs in its cgroup, scrubs its scratch files,
/// unmounts and removes `runtime_dir/ns/<id>`, removes the cgroup.
/// Cleaning an id that left nothing is not an error.
pub fn clean_leftover(cfg: &SandboxConfig, cgroups: &Cgroups, id: &str) -> Result<CleanReport, SandboxError> {
    if !valid_id(id) {
        return Err(SandboxError::InvalidId(id.to_string()));
    }
    let dir = cfg.dir_of(id);
    let cgroup = cgroups.open(id);
    let unmounted = scrub::mounts_under(&dir).len();
    let (scrub, killed, failures) = dismantle(&dir, &cgroup, None);
    if failures.is_empty() {
        Ok(CleanReport {
            killed,
            scrub,
            unmounted,
        })
    } else {
        Err(SandboxError::Teardown { dir, failures })
    }
}

/// Ids of the sandboxes that have a directory under `runtime_dir/ns`
/// (after a restart: what a previous agentd left).
pub fn leftover_ids(cfg: &SandboxConfig) -> Vec<String> {
    let mut ids: Vec<String> = fs::read_dir(cfg.sandboxes_dir())
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| valid_id(n))
        .collect();
    ids.sort();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_overlay_paths_are_checked() {
        assert!(valid_id("s-1"));
        assert!(!valid_id(""));
        assert!(!valid_id("../x"));
        assert!(!valid_id(&"a".repeat(41)));
        assert!(overlay_safe(Path::new("/var/lib/warren/images/init-01")));
        assert!(!overlay_safe(Path::new("/a,b")));
        assert!(!overlay_safe(Path::new("/a:b")));
    }

    #[test]
    fn leftover_ids_lists_valid_dirs_only() {
        let t = tempfile::tempdir().unwrap();
        let cfg = SandboxConfig {
            nsinit: PathBuf::from("/nonexistent"),
            runtime_dir: t.path().to_path_buf(),
        };
        assert!(leftover_ids(&cfg).is_empty());
        for d in ["b-2", "a-1", "Not_Valid"] {
            fs::create_dir_all(cfg.dir_of(d)).unwrap();
        }
        assert_eq!(leftover_ids(&cfg), vec!["a-1", "b-2"]);
    }
}
