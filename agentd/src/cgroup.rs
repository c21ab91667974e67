//! One cgroup per sandbox: limits, CPU and memory metering, and a reliable
//! way to find and kill every process a session left behind.
//!
//! Warren meters what a session really used, and the kernel already counts
//! that per cgroup: on-CPU time (`cpu.stat` / `cpuacct.usage`) and charged
//! memory (`memory.current` / `memory.usage_in_bytes`). The cgroup is also
//! the one handle on a session's processes that survives an agentd crash,
//! so cleanup after a restart starts from it ([`Cgroups::list`],
//! [`Cgroups::open`]).
//!
//! Both layouts are supported because both exist: most hosts mount the
//! unified (v2) hierarchy at `/sys/fs/cgroup`; older ones (including the
//! development machines) mount one v1 hierarchy per controller there. Every
//! sandbox's cgroup sits under a `warren` parent so that Warren's cgroups
//! are easy to tell apart from everybody else's.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where cgroup file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The parent of every sandbox cgroup.
const PARENT: &str = "warren";
/// How long [`SessionCgroup::remove`] waits for killed processes to go.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// CFS period used to express a CPU limit.
const CPU_PERIOD_US: u64 = 100_000;

/// What can go wrong with cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a v2 hierarchy nor the v1 controllers Warren needs are there.
    #[error("no usable cgroup hierarchy under {CGROUP_ROOT}: {0}")]
    NotFound(String),
    /// A cgroup name that is not a single safe path component.
    #[error("invalid cgroup name {0:?}: use [a-z0-9-], at most 64 characters")]
    InvalidName(String),
    /// Reading, writing, creating or removing a cgroup file failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A cgroup file did not hold what the kernel documents.
    #[error("cannot parse {}: {why}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// Processes were still in the cgroup after they were killed.
    #[error("{} still holds {pids} process(es) after SIGKILL and {timeout:?}", path.display())]
    Busy {
        /// The cgroup directory.
        path: PathBuf,
        /// How many processes remained.
        pids: usize,
        /// How long we waited.
        timeout: Duration,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The detected cgroup layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// The unified hierarchy.
    V2 {
        /// Where it is mounted (`/sys/fs/cgroup`).
        root: PathBuf,
    },
    /// One hierarchy per controller.
    V1 {
        /// The `cpuacct` hierarchy (CPU metering).
        cpuacct: PathBuf,
        /// The `memory` hierarchy (limit and metering).
        memory: PathBuf,
        /// The `cpu` hierarchy (CPU limit), when mounted.
        cpu: Option<PathBuf>,
        /// The `pids` hierarchy (process limit), when mounted.
        pids: Option<PathBuf>,
        /// The `freezer` hierarchy, when mounted: frozen processes cannot
        /// fork while they are being killed.
        freezer: Option<PathBuf>,
    },
}

/// Resource limits for one sandbox; `None` leaves the limit unset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Hard memory limit in bytes (the kernel OOM-kills inside the cgroup).
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in whole CPUs.
    pub cpus: Option<u32>,
    /// Maximum number of processes and threads.
    pub pids: Option<u32>,
}

/// Checks that `name` is one safe path component.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Cgroups {
    /// Detects the layout mounted at `/sys/fs/cgroup`.
    pub fn detect() -> Result<Cgroups, CgroupError> {
        Self::detect_at(Path::new(CGROUP_ROOT))
    }

    /// Detects the layout mounted at `root` (tests point this elsewhere).
    pub fn detect_at(root: &Path) -> Result<Cgroups, CgroupError> {
        if root.join("cgroup.controllers").is_file() {
            return Ok(Cgroups::V2 {
                root: root.to_path_buf(),
            });
        }
        // A v1 hierarchy is a directory with a `cgroup.procs` file; the
        // controller may share its mount with others (`cpu,cpuacct`), in
        // which case the distribution usually adds symlinks per name.
        let hier = |name: &str| {
            let p = root.join(name);
            p.join("cgroup.procs").is_file().then_some(p)
        };
        match (hier("cpuacct"), hier("memory")) {
            (Some(cpuacct), Some(memory)) => Ok(Cgroups::V1 {
                cpuacct,
                memory,
                cpu: hier("cpu"),
                pids: hier("pids"),
                freezer: hier("freezer"),
            }),
            (cpuacct, memory) => {
                let missing: Vec<&str> = [("cpuacct", cpuacct.is_none()), ("memory", memory.is_none())]
                    .into_iter()
                    .filter_map(|(n, m)| m.then_some(n))
                    .collect();
                Err(CgroupError::NotFound(format!(
                    "no cgroup.controllers (v2) and no v1 {} hierarchy",
                    missing.join(" or ")
                )))
            }
        }
    }

    /// Names the layout for logs and the API: `v2 at /sys/fs/cgroup` or
    /// `v1 (cpuacct, memory, pids)`.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::V2 { root } => format!("v2 at {}", root.display()),
            Cgroups::V1 { cpu, pids, freezer, .. } => {
                let mut names = vec!["cpuacct", "memory"];
                if cpu.is_some() {
                    names.insert(0, "cpu");
                }
                if pids.is_some() {
                    names.push("pids");
                }
                if freezer.is_some() {
                    names.push("freezer");
                }
                format!("v1 ({})", names.join(", "))
            }
        }
    }

    /// The `warren` parent directories, one per hierarchy.
    fn parents(&self) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { root } => vec![root.join(PARENT)],
            Cgroups::V1 {
                cpuacct,
                memory,
                cpu,
                pids,
                freezer,
            } => v1_dirs(cpuacct, memory, cpu, pids, freezer)
                .map(|h| h.join(PARENT))
                .collect(),
        }
    }

    /// The cgroup called `name`, whether or not it exists (for cleanup
    /// after a restart). Does not check the name: it only ever names paths
    /// under the `warren` parents, and [`Cgroups::list`] yields names that
    /// are directory entries there.
    pub fn open(&self, name: &str) -> SessionCgroup {
        let dir = |h: &Path| h.join(PARENT).join(name);
        match self {
            Cgroups::V2 { root } => SessionCgroup {
                name: name.to_string(),
                kind: Kind::V2 { dir: dir(root) },
            },
            Cgroups::V1 {
                cpuacct,
                memory,
                cpu,
                pids,
                freezer,
            } => SessionCgroup {
                name: name.to_string(),
                kind: Kind::V1 {
                    cpuacct: dir(cpuacct),
                    memory: dir(memory),
                    cpu: cpu.as_deref().map(dir),
                    pids: pids.as_deref().map(dir),
                    freezer: freezer.as_deref().map(dir),
                },
            },
        }
    }

    /// Creates the cgroup `name` with `limits`. An existing cgroup of that
    /// name is reused (its limits rewritten): it can only be a leftover
    /// whose processes the caller is about to replace.
    pub fn create(&self, name: &str, limits: Limits) -> Result<SessionCgroup, CgroupError> {
        if !valid_name(name) {
            return Err(CgroupError::InvalidName(name.to_string()));
        }
        for parent in self.parents() {
            mkdir(&parent)?;
        }
        if let Cgroups::V2 { root } = self {
            // Delegate the controllers we limit to `warren/` and below.
            // Best effort: a controller the host does not offer is simply
            // not limited (its files will be missing below).
            for ctl in ["cpu", "memory", "pids"] {
                let _ = write_file(&root.join("cgroup.subtree_control"), &format!("+{ctl}"));
                let _ = write_file(&root.join(PARENT).join("cgroup.subtree_control"), &format!("+{ctl}"));
            }
        }
        let cg = self.open(name);
        for dir in cg.paths() {
            mkdir(&dir)?;
        }
        if let Err(e) = cg.apply(limits) {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// Names of the cgroups under `warren/` (sandboxes, live or left over).
    pub fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .parents()
            .iter()
            .filter_map(|p| fs::read_dir(p).ok())
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("cannot create cgroup", dir)(e)),
    }
}

/// Writes `value` in one write(2), as cgroup files require.
fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("cannot open", path))?;
    f.write_all(value.as_bytes()).map_err(io_err("cannot write", path))
}

/// Like [`write_file`] for a controller file that may be missing (the
/// controller is not enabled); logs and skips it then.
fn write_optional(path: &Path, value: &str) -> Result<(), CgroupError> {
    if path.exists() {
        write_file(path, value)
    } else {
        tracing::warn!(file = %path.display(), "controller not available; limit not applied");
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io_err("cannot read", path))
}

/// The v1 hierarchies in use, in a fixed order: the mandatory two, then
/// the optional ones that exist.
fn v1_dirs<'a>(
    cpuacct: &'a PathBuf,
    memory: &'a PathBuf,
    cpu: &'a Option<PathBuf>,
    pids: &'a Option<PathBuf>,
    freezer: &'a Option<PathBuf>,
) -> impl Iterator<Item = &'a PathBuf> {
    [
        Some(cpuacct),
        Some(memory),
        cpu.as_ref(),
        pids.as_ref(),
        freezer.as_ref(),
    ]
    .into_iter()
    .flatten()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    V2 {
        dir: PathBuf,
    },
    V1 {
        cpuacct: PathBuf,
        memory: PathBuf,
        cpu: Option<PathBuf>,
        pids: Option<PathBuf>,
        freezer: Option<PathBuf>,
    },
}

/// One sandbox's cgroup (a directory in each hierarchy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCgroup {
    name: String,
    kind: Kind,
}

impl SessionCgroup {
    /// The cgroup's name under `warren/`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its directories, one per hierarchy.
    pub fn paths(&self) -> Vec<PathBuf> {
        match &self.kind {
            Kind::V2 { dir } => vec![dir.clone()],
            Kind::V1 {
                cpuacct,
                memory,
                cpu,
                pids,
                freezer,
            } => v1_dirs(cpuacct, memory, cpu, pids, freezer).cloned().collect(),
        }
    }

    /// The `cgroup.procs` files a process must be written to, one per
    /// hierarchy (see [`SessionCgroup::add_pid`]; the sandbox launcher
    /// writes them from a pre-exec hook).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.paths().into_iter().map(|p| p.join("cgroup.procs")).collect()
    }

    /// True when any of its directories exists.
    pub fn exists(&self) -> bool {
        self.paths().iter().any(|p| p.is_dir())
    }

    fn apply(&self, limits: Limits) -> Result<(), CgroupError> {
        match &self.kind {
            Kind::V2 { dir } => {
                if let Some(m) = limits.memory_bytes {
                    write_file(&dir.join("memory.max"), &m.to_string())?;
                    // No swapping the session out behind its limit.
                    let swap = dir.join("memory.swap.max");
                    if swap.exists() {
                        write_file(&swap, "0")?;
                    }
                }
                // The CPU and pids controllers are optional, as on v1: a
                // host that does not delegate them gets no such limit.
                // Memory is not: without it the session is not bounded.
                if let Some(c) = limits.cpus {
                    let quota = u64::from(c.max(1)) * CPU_PERIOD_US;
                    write_optional(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
                if let Some(p) = limits.pids {
                    write_optional(&dir.join("pids.max"), &p.to_string())?;
                }
            }
            Kind::V1 { memory, cpu, pids, .. } => {
                if let Some(m) = limits.memory_bytes {
                    write_file(&memory.join("memory.limit_in_bytes"), &m.to_string())?;
                }
                if let (Some(c), Some(cpu)) = (limits.cpus, cpu) {
                    write_file(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    let quota = u64::from(c.max(1)) * CPU_PERIOD_US;
                    write_file(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                if let (Some(p), Some(pids)) = (limits.pids, pids) {
                    write_file(&pids.join("pids.max"), &p.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` into the cgroup (in every hierarchy).
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        for f in self.procs_files() {
            write_file(&f, &pid.to_string())?;
        }
        Ok(())
    }

    /// CPU time used by the cgroup's processes, in nanoseconds.
    pub fn cpu_ns(&self) -> Result<u64, CgroupError> {
        match &self.kind {
            Kind::V2 { dir } => {
                let path = dir.join("cpu.stat");
                parse_cpu_stat(&read_file(&path)?)
                    .map(|usec| usec.saturating_mul(1000))
                    .ok_or_else(|| CgroupError::Parse {
                        path,
                        why: "no usage_usec line".into(),
                    })
            }
            Kind::V1 { cpuacct, .. } => {
                let path = cpuacct.join("cpuacct.usage");
                parse_u64(&path, &read_file(&path)?)
            }
        }
    }

    /// Memory charged to the cgroup (resident pages, page cache and tmpfs
    /// pages its processes wrote), in bytes.
    pub fn memory_bytes(&self) -> Result<u64, CgroupError> {
        let path = match &self.kind {
            Kind::V2 { dir } => dir.join("memory.current"),
            Kind::V1 { memory, .. } => memory.join("memory.usage_in_bytes"),
        };
        parse_u64(&path, &read_file(&path)?)
    }

    /// The pids in the cgroup (union over the hierarchies; a process that
    /// escaped one v1 hierarchy but not another is still found).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .procs_files()
            .iter()
            .filter_map(|f| fs::read_to_string(f).ok())
            .flat_map(|s| parse_pids(&s))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Sends SIGKILL to every process in the cgroup. On v2 this is one
    /// write to `cgroup.kill`, which also catches processes forked while
    /// it runs; on v1 the cgroup is frozen first (when the freezer is
    /// mounted) so nothing forks between reading the list and the kill.
    pub fn kill_all(&self) {
        match &self.kind {
            Kind::V2 { dir } => {
                let kill = dir.join("cgroup.kill");
                if kill.exists() && write_file(&kill, "1").is_ok() {
                    return;
                }
                self.kill_listed();
            }
            Kind::V1 { freezer, .. } => {
                let state = freezer.as_ref().map(|f| f.join("freezer.state"));
                if let Some(s) = &state {
                    let _ = write_file(s, "FROZEN");
                }
                self.kill_listed();
                if let Some(s) = &state {
                    // SIGKILL is delivered once the processes thaw.
                    let _ = write_file(s, "THAWED");
                }
            }
        }
    }

    fn kill_listed(&self) {
        for pid in self.pids() {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    /// Kills everything in the cgroup (again and again, in case something
    /// forks meanwhile) until it is empty or `timeout` passed.
    pub fn kill_and_wait(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.pids();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Busy {
                    path: self.paths()[0].clone(),
                    pids: left.len(),
                    timeout,
                });
            }
            self.kill_all();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Kills everything in the cgroup, waits (up to 5 s) until it is empty
    /// and removes its directories. Removing a cgroup that is already gone
    /// succeeds.
    pub fn remove(&self) -> Result<(), CgroupError> {
        if !self.exists() {
            return Ok(());
        }
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        self.kill_and_wait(REMOVE_TIMEOUT)?;
        let mut first_err = None;
        for dir in self.paths() {
            // A dying process may still be charged for a moment after it
            // left cgroup.procs: rmdir then fails with EBUSY; retry.
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        first_err.get_or_insert(CgroupError::Io {
                            what: "cannot remove cgroup",
                            path: dir.clone(),
                            source: e,
                        });
                        break;
                    }
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// `usage_usec` from a v2 `cpu.stat`.
fn parse_cpu_stat(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some("usage_usec")).then(|| it.next()?.parse().ok())?
    })
}

fn parse_u64(path: &Path, text: &str) -> Result<u64, CgroupError> {
    text.trim().parse().map_err(|e| CgroupError::Parse {
        path: path.to_path_buf(),
        why: format!("{:?} is not a number: {e}", text.trim()),
    })
}

fn parse_pids(text: &str) -> Vec<u32> {
    text.split_whitespace().filter_map(|w| w.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_stat() {
        let text = "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\nnr_periods 0\n";
        assert_eq!(parse_cpu_stat(text), Some(123456));
        assert_eq!(parse_cpu_stat("user_usec 5\n"), None);
        assert_eq!(parse_cpu_stat("usage_usec x\n"), None);
        assert_eq!(parse_cpu_stat(""), None);
    }

    #[test]
    fn parses_numbers_and_pids() {
        assert_eq!(parse_u64(Path::new("f"), "42\n").unwrap(), 42);
        let err = parse_u64(Path::new("/x/memory.current"), "max\n").unwrap_err();
        assert!(err.to_string().contains("/x/memory.current"), "{err}");
        assert_eq!(parse_pids("1\n20\n\n300\n"), vec![1, 20, 300]);
        assert!(parse_pids("").is_empty());
    }

    #[test]
    fn names_are_single_safe_components() {
        assert!(valid_name("sess-01"));
        for bad in ["", "a/b", "..", "A", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    fn fake_v1(root: &Path, with: &[&str]) {
        for h in with {
            fs::create_dir_all(root.join(h)).unwrap();
            fs::write(root.join(h).join("cgroup.procs"), "").unwrap();
        }
    }

    #[test]
    fn detects_layouts() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let v2 = Cgroups::detect_at(t.path()).unwrap();
        assert_eq!(v2.describe(), format!("v2 at {}", t.path().display()));
        let cg = v2.open("s1");
        assert_eq!(cg.paths(), vec![t.path().join("warren/s1")]);

        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), &["cpuacct", "memory", "pids"]);
        let v1 = Cgroups::detect_at(t.path()).unwrap();
        assert_eq!(v1.describe(), "v1 (cpuacct, memory, pids)");
        assert_eq!(
            v1.open("s1").procs_files(),
            vec![
                t.path().join("cpuacct/warren/s1/cgroup.procs"),
                t.path().join("memory/warren/s1/cgroup.procs"),
                t.path().join("pids/warren/s1/cgroup.procs"),
            ]
        );

        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), &["cpuacct"]);
        let err = Cgroups::detect_at(t.path()).unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");
    }

    #[test]
    fn removing_a_missing_cgroup_succeeds() {
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), &["cpuacct", "memory"]);
        let cg = Cgroups::detect_at(t.path()).unwrap().open("gone");
        assert!(!cg.exists());
        cg.remove().unwrap();
    }
}
