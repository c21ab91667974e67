//! `warren-nsinit`: puts one command in a fresh namespace sandbox.
//!
//! agentd's `namespace` backend runs guest-agent as PID 1 of its own mount,
//! PID, network, IPC and UTS namespaces, with the session's image as its
//! root. agentd itself is multi-threaded (tokio), and setting up namespaces
//! from a forked child of a threaded process is fragile (only
//! async-signal-safe code may run there), so this small single-threaded
//! helper does it instead:
//!
//! ```text
//! warren-nsinit --root MERGED --hostname NAME [--bind[-ro] HOSTDIR:/IN/ROOT]... -- /init ARGS...
//! ```
//!
//! It unshares the namespaces and forks. The parent stays outside the new
//! PID namespace, waits for the child and exits with its status, forwarding
//! SIGTERM/SIGINT (and SIGKILLing the child 2 s later if that did not end
//! it: an init ignores signals it has no handler for). The child, PID 1 of
//! the new namespace, prepares the root (private mounts, binds, a fresh
//! /proc with the host-wide knobs made read-only or masked, a handful of
//! device nodes, never devtmpfs), sets the hostname, brings up `lo`,
//! pivots into the root and detaches the host's mounts, drops dangerous
//! capabilities, sets no_new_privs, installs a seccomp filter and execs the
//! command with a clean environment.
//!
//! Exit status: the command's exit code; 128+N when signal N killed it;
//! **0 when the command ended the sandbox with reboot(2)** (the kernel then
//! reports PID 1 as killed by SIGHUP, or SIGINT for halt/power-off, which
//! no other sender can do: signals from outside reach an init only through
//! a handler, and then they do not kill it). When nsinit itself fails it
//! prints `warren-nsinit: <step>: <error>` on stderr and exits with the
//! step's code ([`Step`]).

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{chdir, fork, pivot_root, sethostname, ForkResult, Pid};
use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The steps that can fail, each with its own exit code.
#[derive(Debug, Clone, Copy)]
enum Step {
    Usage = 64,
    Seccomp = 70,
    Signals = 71,
    Unshare = 72,
    Fork = 73,
    Wait = 74,
    ParentGone = 80,
    NotPid1 = 81,
    MakePrivate = 82,
    Bind = 83,
    Devices = 84,
    Proc = 85,
    Hostname = 86,
    PivotRoot = 88,
    Capabilities = 89,
    Lockdown = 90,
    Exec = 91,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Usage => "usage",
            Step::Seccomp => "building the seccomp filter",
            Step::Signals => "blocking signals",
            Step::Unshare => "unshare(mount, uts, ipc, net, pid)",
            Step::Fork => "fork",
            Step::Wait => "waiting for the sandbox",
            Step::ParentGone => "parent death signal",
            Step::NotPid1 => "checking for a new PID namespace",
            Step::MakePrivate => "making mounts private",
            Step::Bind => "bind mount",
            Step::Devices => "device nodes",
            Step::Proc => "mounting /proc",
            Step::Hostname => "sethostname",
            Step::PivotRoot => "pivot_root",
            Step::Capabilities => "dropping capabilities",
            Step::Lockdown => "no_new_privs and seccomp",
            Step::Exec => "execve",
        }
    }
}

fn fail(step: Step, detail: impl std::fmt::Display) -> ! {
    eprintln!("warren-nsinit: {}: {detail}", step.name());
    std::process::exit(step as i32)
}

trait OrFail<T> {
    fn or_fail(self, step: Step, what: impl std::fmt::Display) -> T;
}

impl<T, E: std::fmt::Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, step: Step, what: impl std::fmt::Display) -> T {
        self.unwrap_or_else(|e| fail(step, format!("{what}: {e}")))
    }
}

/// A host directory to bind into the root.
struct Bind {
    src: PathBuf,
    /// Absolute, as seen inside the sandbox.
    dst: PathBuf,
    /// Read-only (Unix sockets in it can still be connected to).
    read_only: bool,
}

/// Parsed command line.
struct Args {
    root: PathBuf,
    hostname: String,
    binds: Vec<Bind>,
    command: Vec<CString>,
}

const USAGE: &str = "usage: warren-nsinit --root DIR --hostname NAME [--bind HOSTDIR:/PATH]... -- COMMAND [ARGS...]";

fn parse_args() -> Args {
    let mut it = std::env::args_os().skip(1);
    let (mut root, mut hostname, mut binds, mut command) = (None, None, Vec::new(), Vec::new());
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .unwrap_or_else(|| fail(Step::Usage, format!("{name} needs a value")))
        };
        match a.to_str() {
            Some("--root") => root = Some(PathBuf::from(value("--root"))),
            Some("--hostname") => hostname = Some(value("--hostname").to_string_lossy().into_owned()),
            Some(flag @ ("--bind" | "--bind-ro")) => {
                let read_only = flag == "--bind-ro";
                let v = value(flag);
                let v = v.as_bytes();
                let colon = v.iter().rposition(|&b| b == b':');
                match colon {
                    Some(i) if i > 0 && v.get(i + 1) == Some(&b'/') => binds.push(Bind {
                        src: PathBuf::from(OsStr::from_bytes(&v[..i])),
                        dst: PathBuf::from(OsStr::from_bytes(&v[i + 1..])),
                        read_only,
                    }),
                    _ => fail(Step::Usage, format!("{flag} wants HOSTDIR:/ABSOLUTE/PATH")),
                }
            }
            Some("--") => {
                command = it
                    .by_ref()
                    .map(|a| CString::new(a.as_bytes()).unwrap_or_else(|_| fail(Step::Usage, "NUL in argument")))
                    .collect();
            }
            Some("-h" | "--help") => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => fail(Step::Usage, format!("unexpected argument {a:?}\n{USAGE}")),
        }
    }
    let root = root.unwrap_or_else(|| fail(Step::Usage, format!("--root is required\n{USAGE}")));
    let hostname = hostname.unwrap_or_else(|| "warren".into());
    if command.is_empty() {
        fail(Step::Usage, format!("no command after --\n{USAGE}"));
    }
    Args {
        root,
        hostname,
        binds,
        command,
    }
}

fn main() {
    let args = parse_args();
    if !args.root.is_dir() {
        fail(
            Step::Usage,
            format!("--root {} is not a directory", args.root.display()),
        );
    }
    // Built before forking so a bad filter is reported from the parent.
    let filters = seccomp_filters().or_fail(Step::Seccomp, "seccompiler");

    // SIGCHLD, SIGTERM and SIGINT are taken with sigtimedwait below; block
    // them before the fork so none is lost. The child restores the mask.
    let mut waited = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        waited.add(s);
    }
    let mut old_mask = SigSet::empty();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&waited), Some(&mut old_mask))
        .or_fail(Step::Signals, "sigprocmask");
    // The child polls the read end after setting its parent death signal:
    // if the parent died before that, the write end is closed (POLLHUP).
    let (alive_r, alive_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).or_fail(Step::Signals, "pipe2");

    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWPID,
    )
    .or_fail(Step::Unshare, "unshare");

    // SAFETY: nsinit is single-threaded (no thread was started), so the
    // child may run any code, allocation included.
    match unsafe { fork() }.or_fail(Step::Fork, "fork") {
        ForkResult::Parent { child } => {
            drop(alive_r);
            let code = supervise(child, &waited);
            drop(alive_w);
            std::process::exit(code);
        }
        ForkResult::Child => {
            drop(alive_w);
            child(&args, alive_r, &old_mask, &filters)
        }
    }
}

/// Waits for the sandbox's PID 1; returns the exit code nsinit ends with.
fn supervise(child: Pid, waited: &SigSet) -> i32 {
    const GRACE: Duration = Duration::from_secs(2);
    let mut kill_at: Option<Instant> = None;
    loop {
        // Reap first: SIGCHLD may have arrived before we got here.
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return match sig {
                    // reboot(2) from inside: the sandbox shut itself down.
                    Signal::SIGHUP | Signal::SIGINT => 0,
                    s => 128 + s as i32,
                };
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => fail(Step::Wait, format!("waitpid({child}): {e}")),
        }
        let timeout = match kill_at {
            Some(t) => t.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(3600),
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: both pointers are valid for the call; the info argument
        // may be null.
        let sig = unsafe { libc::sigtimedwait(waited.as_ref(), std::ptr::null_mut(), &ts) };
        if sig == libc::SIGTERM || sig == libc::SIGINT {
            let s = Signal::try_from(sig).unwrap_or(Signal::SIGTERM);
            let _ = kill(child, s);
            kill_at.get_or_insert_with(|| Instant::now() + GRACE);
        } else if sig < 0 && kill_at.is_some_and(|t| Instant::now() >= t) {
            let _ = kill(child, Signal::SIGKILL);
        }
    }
}

/// PID 1 of the new namespaces: prepare the root, lock down, exec.
fn child(args: &Args, alive: OwnedFd, old_mask: &SigSet, filters: &[BpfProgram]) -> ! {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) } != 0 {
        fail(Step::ParentGone, std::io::Error::last_os_error());
    }
    // getppid() is 0 here (the parent is outside our PID namespace), so
    // the pipe tells whether the parent died before the prctl.
    let mut pfd = libc::pollfd {
        fd: alive.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n != 0 {
        fail(
            Step::ParentGone,
            "nsinit's parent process exited before the sandbox started",
        );
    }
    drop(alive);
    // The command may call reboot(2): that must only ever end a PID
    // namespace, never the host.
    if std::process::id() != 1 {
        fail(Step::NotPid1, format!("pid is {}, not 1", std::process::id()));
    }

    // Nothing we mount may propagate back to the host, and the host's
    // later mounts must not appear here.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .or_fail(Step::MakePrivate, "mount --make-rprivate /");

    let root = &args.root;
    for Bind { src, dst, read_only } in &args.binds {
        let target = inside(root, dst);
        std::fs::create_dir_all(&target).or_fail(Step::Bind, format!("mkdir {}", target.display()));
        mount(
            Some(src.as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .or_fail(Step::Bind, format!("{} on {}", src.display(), target.display()));
        let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if *read_only {
            flags |= MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC;
        }
        mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
            .or_fail(Step::Bind, format!("remount {} {flags:?}", target.display()));
    }

    make_devices(&root.join("dev"));
    // A private devpts instance for terminals: the host's ptys stay out of
    // reach. Optional (nothing in Warren's protocol needs a pty).
    let pts = root.join("dev/pts");
    if let Err(e) = mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    ) {
        eprintln!(
            "warren-nsinit: devpts on {} (continuing without ptys): {e}",
            pts.display()
        );
    }
    mount_proc(root);

    sethostname(&args.hostname).or_fail(Step::Hostname, &args.hostname);
    if let Err(e) = loopback_up() {
        // Optional: the sandbox works without it (the guest protocol uses
        // the bind-mounted Unix socket).
        eprintln!("warren-nsinit: bringing up lo (continuing): {e}");
    }

    // pivot_root rather than chroot: after detaching the old root the
    // sandbox's mount namespace holds no host mount at all (not even
    // unreachable ones, such as other sandboxes' scratch file systems,
    // which would otherwise stay alive until this sandbox ends).
    chdir(root).or_fail(Step::PivotRoot, format!("chdir {}", root.display()));
    pivot_root(".", ".").or_fail(Step::PivotRoot, "pivot_root(., .)");
    umount2(".", MntFlags::MNT_DETACH).or_fail(Step::PivotRoot, "detaching the old root");
    chdir("/").or_fail(Step::PivotRoot, "chdir /");

    drop_capabilities();

    // Restore the signal mask the exec'd command should start with.
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(old_mask), None).or_fail(Step::Lockdown, "sigprocmask");
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        fail(
            Step::Lockdown,
            format!("PR_SET_NO_NEW_PRIVS: {}", std::io::Error::last_os_error()),
        );
    }
    for f in filters {
        seccompiler::apply_filter(f).or_fail(Step::Lockdown, "installing the seccomp filter");
    }

    let env: Vec<CString> = [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root",
        "TERM=dumb",
    ]
    .iter()
    .map(|s| CString::new(*s).unwrap_or_default())
    .collect();
    let err = nix::unistd::execve(&args.command[0], &args.command, &env).unwrap_err();
    fail(Step::Exec, format!("{:?}: {err}", args.command[0]))
}

/// `dst` (absolute, as seen inside) under `root`.
fn inside(root: &Path, dst: &Path) -> PathBuf {
    root.join(dst.strip_prefix("/").unwrap_or(dst))
}

/// The device nodes a program expects, made by hand: devtmpfs would show
/// the host's devices.
fn make_devices(dev: &Path) {
    std::fs::create_dir_all(dev).or_fail(Step::Devices, format!("mkdir {}", dev.display()));
    // An image may carry device nodes of its own (debootstrap makes
    // /dev/console; OCI layers may hold anything): through the overlay they
    // would open the host's devices. Only the nodes below exist.
    remove_device_nodes(dev);
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let p = dev.join(name);
        let _ = std::fs::remove_file(&p);
        mknod(
            &p,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .or_fail(Step::Devices, format!("mknod {}", p.display()));
        // mknod's mode is filtered by the umask.
        nix::sys::stat::fchmodat(
            None,
            &p,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .or_fail(Step::Devices, format!("chmod {}", p.display()));
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let p = dev.join(name);
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(target, &p).or_fail(Step::Devices, format!("symlink {}", p.display()));
    }
    for (name, mode) in [("shm", 0o1777), ("pts", 0o755)] {
        let p = dev.join(name);
        std::fs::create_dir_all(&p).or_fail(Step::Devices, format!("mkdir {}", p.display()));
        nix::sys::stat::fchmodat(
            None,
            &p,
            Mode::from_bits_truncate(mode),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .or_fail(Step::Devices, format!("chmod {}", p.display()));
    }
}

/// Unlinks every character and block device below `dir` (in the overlay:
/// a whiteout; the image itself is untouched).
fn remove_device_nodes(dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_char_device() || ft.is_block_device() {
            std::fs::remove_file(e.path()).or_fail(Step::Devices, format!("removing {}", e.path().display()));
        } else if ft.is_dir() {
            remove_device_nodes(&e.path());
        }
    }
}

/// A fresh /proc for the new PID namespace. Root in the sandbox is root on
/// the host, and some /proc files act on the whole host (sysctls,
/// sysrq-trigger) or show kernel memory: those are made read-only or
/// masked, as container runtimes do.
fn mount_proc(root: &Path) {
    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir).or_fail(Step::Proc, format!("mkdir {}", proc_dir.display()));
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), &proc_dir, Some("proc"), nosuid, None::<&str>)
        .or_fail(Step::Proc, format!("proc on {}", proc_dir.display()));
    for name in ["sys", "sysrq-trigger", "bus", "fs", "irq"] {
        let p = proc_dir.join(name);
        if !p.exists() {
            continue;
        }
        mount(
            Some(&p),
            &p,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .or_fail(Step::Proc, format!("bind {}", p.display()));
        mount(
            None::<&str>,
            &p,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nosuid,
            None::<&str>,
        )
        .or_fail(Step::Proc, format!("read-only {}", p.display()));
    }
    let null = root.join("dev/null");
    for name in ["kcore", "keys", "timer_list", "sched_debug", "kallsyms", "kmsg"] {
        let p = proc_dir.join(name);
        if p.exists() {
            mount(Some(&null), &p, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .or_fail(Step::Proc, format!("mask {}", p.display()));
        }
    }
}

/// Sets IFF_UP on `lo` in the new network namespace.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags into the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Capabilities the sandbox's root keeps; every other one is dropped from
/// the bounding, inheritable, permitted, effective and ambient sets, so the
/// exec'd command (running as uid 0) cannot get it back.
///
/// Kept: file ownership and permission overrides inside its own root
/// (CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETFCAP), identity changes
/// (SETUID, SETGID, SETPCAP: only ever to fewer privileges here), KILL
/// (it sees only its own PID namespace), NET_BIND_SERVICE, AUDIT_WRITE,
/// and SYS_BOOT: reboot(2) is how guest-agent ends the sandbox, and in a
/// non-initial PID namespace it ends only that namespace (kexec, the other
/// use of SYS_BOOT, is refused by seccomp).
///
/// Dropped, among others: SYS_ADMIN (mount, namespaces, most of the
/// kernel), MKNOD, SYS_MODULE, SYS_RAWIO, SYS_PTRACE, DAC_READ_SEARCH
/// (open_by_handle_at escapes), SYS_TIME, NET_ADMIN, NET_RAW, SYSLOG,
/// MAC_ADMIN, MAC_OVERRIDE, AUDIT_CONTROL, BPF, PERFMON, SYS_PACCT,
/// LINUX_IMMUTABLE, SYS_CHROOT, SYS_RESOURCE, SYS_NICE, IPC_LOCK,
/// SYS_TTY_CONFIG, WAKE_ALARM, BLOCK_SUSPEND, CHECKPOINT_RESTORE, LEASE
/// and every capability newer than this list.
const KEEP_CAPS: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    22, // CAP_SYS_BOOT
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

fn drop_capabilities() {
    // Bounding set first: that needs CAP_SETPCAP, which we keep.
    for cap in 0..64u32 {
        // SAFETY: prctl with integer arguments only.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if present < 0 {
            break; // past the kernel's last capability
        }
        if present == 1 && !KEEP_CAPS.contains(&cap) {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
                fail(
                    Step::Capabilities,
                    format!("PR_CAPBSET_DROP {cap}: {}", std::io::Error::last_os_error()),
                );
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        fail(
            Step::Capabilities,
            format!("clearing ambient capabilities: {}", std::io::Error::last_os_error()),
        );
    }
    let keep: u64 = KEEP_CAPS.iter().fold(0, |m, c| m | (1u64 << c));
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and two data structs, as version 3 requires.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        fail(
            Step::Capabilities,
            format!("capget: {}", std::io::Error::last_os_error()),
        );
    }
    for (i, d) in data.iter_mut().enumerate() {
        let k = (keep >> (32 * i)) as u32;
        d.effective &= k;
        d.permitted &= k;
        d.inheritable &= k;
    }
    // SAFETY: header and two data structs, as version 3 requires.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        fail(
            Step::Capabilities,
            format!("capset: {}", std::io::Error::last_os_error()),
        );
    }
}

/// Syscalls the sandbox may not make (EPERM), and why:
///
/// - file system and namespace changes that would undo the sandbox:
///   mount, umount2, pivot_root, chroot, unshare, setns, the new mount API
///   (fsopen, fsconfig, fsmount, fspick, move_mount, open_tree,
///   mount_setattr), and clone with any CLONE_NEW* flag;
/// - escapes through file handles: open_by_handle_at, name_to_handle_at;
/// - the kernel itself: init_module, finit_module, delete_module,
///   kexec_load, kexec_file_load, bpf, perf_event_open, iopl, ioperm,
///   swapon, swapoff, quotactl, quotactl_fd, acct, syslog, vhangup,
///   lookup_dcookie, uselib, userfaultfd, and io_uring (io_uring_setup,
///   io_uring_enter, io_uring_register: a large attack surface whose
///   operations bypass this filter);
/// - the host's clock: settimeofday, clock_settime, clock_adjtime, adjtimex;
/// - the kernel keyring (not namespaced): keyctl, add_key, request_key;
/// - other processes' memory: ptrace, process_vm_readv, process_vm_writev,
///   kcmp, pidfd_getfd;
/// - device nodes: mknod and mknodat of block or character devices
///   (FIFOs, sockets and regular files stay allowed).
///
/// clone3 gets ENOSYS instead (its flags sit behind a pointer the filter
/// cannot read; libc then falls back to clone, which is filtered), and on
/// x86_64 every x32-ABI syscall gets ENOSYS (the x32 numbers would bypass
/// the rules, which name the 64-bit numbers). Syscalls of another
/// architecture (int 0x80) kill the process: seccompiler's arch check.
fn seccomp_filters() -> Result<Vec<BpfProgram>, seccompiler::BackendError> {
    use std::collections::BTreeMap;
    let arch: TargetArch = std::env::consts::ARCH.try_into()?;
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in [
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_quotactl,
        libc::SYS_quotactl_fd,
        libc::SYS_acct,
        libc::SYS_syslog,
        libc::SYS_vhangup,
        libc::SYS_lookup_dcookie,
        libc::SYS_uselib,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kcmp,
        libc::SYS_pidfd_getfd,
    ] {
        deny.insert(nr, Vec::new());
    }
    let mode_is = |arg: u8, kind: u32| {
        SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(u64::from(libc::S_IFMT)),
            u64::from(kind),
        )?])
    };
    deny.insert(
        libc::SYS_mknod,
        vec![mode_is(1, libc::S_IFCHR)?, mode_is(1, libc::S_IFBLK)?],
    );
    deny.insert(
        libc::SYS_mknodat,
        vec![mode_is(2, libc::S_IFCHR)?, mode_is(2, libc::S_IFBLK)?],
    );
    let mut clone_rules = Vec::new();
    for flag in [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWCGROUP,
    ] {
        let flag = flag as u32 as u64;
        clone_rules.push(SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )?])?);
    }
    deny.insert(libc::SYS_clone, clone_rules);
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let deny: BpfProgram = SeccompFilter::new(deny, SeccompAction::Allow, eperm, arch)?.try_into()?;

    let enosys = SeccompAction::Errno(libc::ENOSYS as u32);
    let clone3: BpfProgram = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into(),
        SeccompAction::Allow,
        enosys,
        arch,
    )?
    .try_into()?;

    let mut filters = vec![deny, clone3];
    if cfg!(target_arch = "x86_64") {
        filters.push(x32_guard());
    }
    Ok(filters)
}

/// ENOSYS for every syscall number with the x32 bit set (see
/// [`seccomp_filters`]). The kernel runs every installed filter and acts on
/// the strictest answer, so seccompiler's arch check (kill for anything
/// that is not AUDIT_ARCH_X86_64) still wins over this filter's ALLOW.
fn x32_guard() -> BpfProgram {
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        // seccomp_data.nr is at offset 0.
        ins(BPF_LD_W_ABS, 0, 0, 0),
        ins(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        ins(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        ins(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}
