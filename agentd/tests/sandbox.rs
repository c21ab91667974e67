//! The `namespace` backend for real: real namespaces, real cgroups, the
//! real guest-agent from the real initramfs. Needs root (mounts, cgroups,
//! namespaces) and the initramfs (`cargo xtask images`).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use agentd::cgroup::{Cgroups, Limits, SessionCgroup};
use agentd::sandbox::{self, Sandbox, SandboxConfig, SandboxSpec};
use warren_protocol::client::{AgentClient, ExecOutput};
use warren_protocol::ExecRequest;

type Client = AgentClient<UnixStream, UnixStream>;

/// The initramfs, unpacked once per test binary (reused across runs: the
/// directory is named after the archive's hash).
fn image_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let cpio = warren_e2e::artifacts::initramfs().unwrap_or_else(|e| panic!("{e}"));
        let images = Path::new(env!("CARGO_TARGET_TMPDIR")).join("warren-ns-images");
        sandbox::unpack_image(&cpio, &images).expect("unpack the initramfs")
    })
}

fn cgroups() -> Cgroups {
    Cgroups::detect().expect("a cgroup hierarchy")
}

fn unique(name: &str) -> String {
    format!("t{}-{name}", std::process::id())
}

struct Setup {
    _tmp: tempfile::TempDir,
    cfg: SandboxConfig,
    cgroups: Cgroups,
    spec: SandboxSpec,
}

fn setup(name: &str) -> Setup {
    let tmp = tempfile::Builder::new().prefix("warren-ns-test").tempdir().unwrap();
    let cfg = SandboxConfig {
        nsinit: PathBuf::from(env!("CARGO_BIN_EXE_warren-nsinit")),
        runtime_dir: tmp.path().join("run"),
    };
    let spec = SandboxSpec {
        id: unique(name),
        image_root: image_root().to_path_buf(),
        agent_layer: None,
        memory_mib: 128,
        vcpus: 1,
        hostname: format!("box-{name}"),
    };
    Setup {
        _tmp: tmp,
        cfg,
        cgroups: cgroups(),
        spec,
    }
}

/// Accepts guest-agent's connection (failing with nsinit's log if it
/// dies first) and does the handshake.
fn connect(sb: &mut Sandbox) -> Client {
    sb.listener().set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match sb.listener().accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if let Some(status) = sb.child_mut().try_wait().unwrap() {
            panic!(
                "warren-nsinit exited ({status}) before guest-agent connected; log:\n{}",
                sb.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "guest-agent did not connect within 10 s; log:\n{}",
            sb.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let writer = stream.try_clone().unwrap();
    AgentClient::handshake(stream, writer).expect("handshake")
}

fn sh(c: &mut Client, script: &str) -> ExecOutput {
    c.exec(ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        timeout_ms: Some(15_000),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("exec {script:?}: {e}"))
}

fn stdout(c: &mut Client, script: &str) -> String {
    let out = sh(c, script);
    assert_eq!(
        out.status.code,
        Some(0),
        "{script:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn wait_exit(sb: &mut Sandbox, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = sb.child_mut().try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "nsinit still running; log:\n{}", sb.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pid_alive(pid: u32) -> bool {
    // Zombies count as gone: they run nothing and hold nothing.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Nothing of the sandbox remains: directory (files, socket), mounts,
/// cgroup, processes.
fn assert_gone(dir: &Path, cg: &SessionCgroup, pids: &[u32]) {
    assert!(!dir.exists(), "{} still exists", dir.display());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = dir.to_str().unwrap();
    let left: Vec<&str> = mountinfo.lines().filter(|l| l.contains(d)).collect();
    assert!(left.is_empty(), "mounts left: {left:#?}");
    for p in cg.paths() {
        assert!(!p.exists(), "cgroup {} still exists", p.display());
    }
    assert!(!cgroups().list().contains(&cg.name().to_string()));
    for &pid in pids {
        assert!(!pid_alive(pid), "process {pid} of the sandbox is still alive");
    }
}

#[test]
fn guest_agent_runs_isolated_and_teardown_leaves_nothing() {
    let s = setup("iso");
    let mut sb = Sandbox::start(&s.cfg, &s.cgroups, &s.spec).expect("start");
    let mut c = connect(&mut sb);
    c.ping(7).unwrap();

    // UTS namespace and hostname.
    assert_eq!(stdout(&mut c, "hostname").trim(), "box-iso");
    // PID namespace: guest-agent is PID 1.
    let cmdline = stdout(&mut c, "cat /proc/1/cmdline");
    assert!(cmdline.starts_with("/init\0--sandboxed"), "{cmdline:?}");
    // Network namespace: only lo, and it is up.
    let devs = stdout(&mut c, "cat /proc/net/dev");
    let names: Vec<&str> = devs
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(names, vec!["lo"], "{devs}");
    // The host's files are out of reach: a marker next to the sandbox's
    // own directory is not there, nor is the host's /work or the image dir.
    let marker = s.cfg.runtime_dir.join("host-marker");
    std::fs::write(&marker, "host").unwrap();
    let probe = format!(
        "for p in {} {} {} /work /root/.cache; do test -e $p && echo \"visible: $p\"; done; true",
        marker.display(),
        sb.dir().display(),
        image_root().display()
    );
    assert_eq!(stdout(&mut c, &probe), "");
    // Mounts: only what the sandbox set up.
    let mounts = stdout(&mut c, "cat /proc/mounts");
    for line in mounts.lines() {
        let point = line.split(' ').nth(1).unwrap();
        assert!(
            point == "/" || point == "/.warren" || point.starts_with("/proc") || point.starts_with("/dev"),
            "unexpected mount in the sandbox: {line}\n{mounts}"
        );
    }
    assert!(mounts.lines().any(|l| l.split(' ').nth(1) == Some("/proc")), "{mounts}");
    // Device nodes are the hand-made few, no devtmpfs.
    let devls = stdout(&mut c, "ls /dev");
    for want in ["null", "zero", "urandom", "tty", "shm"] {
        assert!(devls.split_whitespace().any(|n| n == want), "no /dev/{want}: {devls}");
    }
    assert!(
        !devls.split_whitespace().any(|n| n == "vda" || n == "kvm" || n == "mem"),
        "{devls}"
    );
    assert_eq!(stdout(&mut c, "head -c 4 /dev/zero | wc -c").trim(), "4");

    // Writes land in the overlay's upper dir, never in the image.
    let payload = "x".repeat(100_000);
    c.write_file("/tmp/x", payload.as_bytes(), None).unwrap();
    assert_eq!(stdout(&mut c, "wc -c < /tmp/x").trim(), "100000");
    assert_eq!(std::fs::read(sb.upper_dir().join("tmp/x")).unwrap(), payload.as_bytes());
    assert!(!image_root().join("tmp/x").exists(), "the image was written to");
    sh(&mut c, "dd if=/dev/urandom of=/root/blob bs=1024 count=64 2>/dev/null");
    assert_eq!(
        std::fs::metadata(sb.upper_dir().join("root/blob")).unwrap().len(),
        65536
    );

    // Locked down: no mounting, no device nodes, no host sysctls, no
    // CAP_SYS_ADMIN, seccomp on.
    let m = sh(&mut c, "mount -t tmpfs x /mnt");
    assert_ne!(m.status.code, Some(0), "mount succeeded in the sandbox");
    let m = sh(&mut c, "mknod /tmp/sda b 8 0");
    assert_ne!(m.status.code, Some(0), "mknod succeeded in the sandbox");
    assert!(!sb.upper_dir().join("tmp/sda").exists());
    let m = sh(&mut c, "touch /.warren/f");
    assert_ne!(m.status.code, Some(0), "the socket directory was writable");
    let m = sh(&mut c, "echo 3 > /proc/sys/vm/drop_caches");
    assert_ne!(m.status.code, Some(0), "a host sysctl was writable");
    let m = sh(&mut c, "echo h > /proc/sysrq-trigger");
    assert_ne!(m.status.code, Some(0), "sysrq-trigger was writable");
    let status = stdout(&mut c, "cat /proc/self/status");
    let field = |name: &str| {
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"));
        u64::from_str_radix(v.trim(), 16).unwrap()
    };
    for set in ["CapBnd:", "CapEff:", "CapPrm:", "CapInh:"] {
        let caps = field(set);
        for (bit, cap) in [
            (21, "SYS_ADMIN"),
            (27, "MKNOD"),
            (16, "SYS_MODULE"),
            (19, "SYS_PTRACE"),
            (2, "DAC_READ_SEARCH"),
        ] {
            assert_eq!(caps & (1 << bit), 0, "{set} has CAP_{cap}");
        }
    }
    assert_ne!(field("CapBnd:") & (1 << 22), 0, "CAP_SYS_BOOT was dropped");
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");

    // Shutdown: guest-agent's reboot(2) ends the PID namespace, and
    // nsinit reports that as a clean exit.
    c.shutdown().unwrap();
    let st = wait_exit(&mut sb, Duration::from_secs(10));
    assert_eq!(
        st.code(),
        Some(0),
        "nsinit after a guest shutdown: {st}; log:\n{}",
        sb.log()
    );

    let (dir, cg, pid) = (sb.dir().to_path_buf(), sb.cgroup().clone(), sb.pid());
    let report = sb.teardown().expect("teardown");
    assert!(report.bytes >= 100_000 + 65_536, "{report:?}");
    assert!(report.ns > 0);
    assert_gone(&dir, &cg, &[pid]);
}

#[test]
fn cgroup_meters_the_cpu_a_busy_loop_burns() {
    let s = setup("cpu");
    let mut sb = Sandbox::start(&s.cfg, &s.cgroups, &s.spec).expect("start");
    let mut c = connect(&mut sb);
    let before = sb.usage().unwrap();
    // The shell reports its own CPU time (utime + stime, in clock ticks).
    let out = stdout(
        &mut c,
        "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; cut -d' ' -f14,15 /proc/$$/stat",
    );
    let after = sb.usage().unwrap();
    let ticks: u64 = out.split_whitespace().map(|t| t.parse::<u64>().unwrap()).sum();
    let loop_ns = ticks * 10_000_000; // USER_HZ = 100
    let metered = after.cpu_ns - before.cpu_ns;
    assert!(loop_ns >= 100_000_000, "the loop burned only {loop_ns} ns");
    assert!(
        metered + 30_000_000 >= loop_ns,
        "cgroup metered {metered} ns, the loop alone burned {loop_ns} ns"
    );
    assert!(
        metered <= loop_ns * 2 + 300_000_000,
        "cgroup metered {metered} ns for a loop of {loop_ns} ns"
    );
    assert!(after.memory_bytes > 0);

    // Teardown without a guest shutdown kills everything.
    let (dir, cg, pid) = (sb.dir().to_path_buf(), sb.cgroup().clone(), sb.pid());
    let pids = cg.pids();
    assert!(pids.len() >= 2, "nsinit and guest-agent are in the cgroup: {pids:?}");
    drop(c);
    sb.teardown().expect("teardown");
    let mut all = pids;
    all.push(pid);
    assert_gone(&dir, &cg, &all);
}

#[test]
fn clean_leftover_removes_what_a_crashed_agentd_left() {
    let s = setup("crash");
    let mut sb = Sandbox::start(&s.cfg, &s.cgroups, &s.spec).expect("start");
    let mut c = connect(&mut sb);
    c.write_file("/tmp/left", &[0xA5; 50_000], None).unwrap();
    sh(&mut c, "sleep 1000 & sleep 1000 &");
    let (dir, cg, pid, id) = (
        sb.dir().to_path_buf(),
        sb.cgroup().clone(),
        sb.pid(),
        sb.id().to_string(),
    );
    let pids = cg.pids();
    // agentd "crashes": the sandbox is neither torn down nor dropped.
    drop(c);
    std::mem::forget(sb);
    assert!(sandbox::leftover_ids(&s.cfg).contains(&id));
    assert!(s.cgroups.list().contains(&id));

    let report = sandbox::clean_leftover(&s.cfg, &s.cgroups, &id).expect("clean_leftover");
    assert!(report.killed >= 4, "{report:?} (pids were {pids:?})");
    assert!(report.scrub.bytes >= 50_000, "{report:?}");
    assert!(report.unmounted >= 2, "{report:?}");
    // Our process was nsinit's parent: reap it like init would.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    let mut all = pids;
    all.push(pid);
    assert_gone(&dir, &cg, &all);
    assert!(sandbox::leftover_ids(&s.cfg).is_empty());
    // Cleaning again finds nothing and is fine.
    assert_eq!(
        sandbox::clean_leftover(&s.cfg, &s.cgroups, &id).unwrap(),
        sandbox::CleanReport::default()
    );
}

#[test]
fn failed_start_cleans_up_and_says_why() {
    let mut s = setup("fail");
    s.cfg.nsinit = PathBuf::from("/nonexistent/warren-nsinit");
    let err = Sandbox::start(&s.cfg, &s.cgroups, &s.spec).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/warren-nsinit"), "{err}");
    assert_gone(&s.cfg.dir_of(&s.spec.id), &s.cgroups.open(&s.spec.id), &[]);

    // nsinit itself failing (an image without what it needs) shows in the log.
    let s = setup("badroot");
    let bad = s.cfg.runtime_dir.with_file_name("bad-image");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("init"), "not an executable").unwrap();
    let spec = SandboxSpec {
        image_root: bad,
        agent_layer: None,
        ..s.spec.clone()
    };
    let mut sb = Sandbox::start(&s.cfg, &s.cgroups, &spec).expect("start");
    let st = wait_exit(&mut sb, Duration::from_secs(10));
    assert_eq!(st.code(), Some(91), "{st}");
    assert!(sb.log().contains("warren-nsinit: execve"), "{}", sb.log());
    let (dir, cg) = (sb.dir().to_path_buf(), sb.cgroup().clone());
    sb.teardown().unwrap();
    assert_gone(&dir, &cg, &[]);
}

#[test]
fn unpack_image_rejects_a_corrupt_cpio() {
    let t = tempfile::tempdir().unwrap();
    let images = t.path().join("images");
    let garbage = t.path().join("garbage.cpio");
    std::fs::write(&garbage, vec![0x42u8; 4096]).unwrap();
    let err = sandbox::unpack_image(&garbage, &images).unwrap_err().to_string();
    assert!(
        err.contains("garbage.cpio") && err.contains("not a valid newc cpio"),
        "{err}"
    );

    let real = std::fs::read(warren_e2e::artifacts::initramfs().unwrap_or_else(|e| panic!("{e}"))).unwrap();
    let cut = t.path().join("cut.cpio");
    std::fs::write(&cut, &real[..real.len() / 2]).unwrap();
    let err = sandbox::unpack_image(&cut, &images).unwrap_err().to_string();
    assert!(err.contains("truncated") || err.contains("not a valid"), "{err}");
    assert_eq!(
        std::fs::read_dir(&images).unwrap().count(),
        0,
        "half-unpacked image left"
    );

    // The real one unpacks into what the sandbox needs.
    let root = image_root();
    assert!(root.join("init").is_file());
    assert!(std::fs::symlink_metadata(root.join("bin/sh"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!root.join("dev/console").exists());
}

#[test]
fn cgroup_create_add_measure_remove() {
    let cgs = cgroups();
    let name = unique("cg");
    let cg = cgs
        .create(
            &name,
            Limits {
                memory_bytes: Some(256 << 20),
                cpus: Some(1),
                pids: Some(64),
            },
        )
        .expect("create");
    assert!(cg.exists());
    assert!(cgs.list().contains(&name), "{:?}", cgs.list());
    let mut busy = Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
    cg.add_pid(busy.id()).unwrap();
    assert_eq!(cg.pids(), vec![busy.id()]);
    std::thread::sleep(Duration::from_millis(400));
    let cpu = cg.cpu_ns().unwrap();
    assert!(cpu >= 100_000_000, "{cpu} ns after 400 ms of a busy loop");
    assert!(cpu <= 2_000_000_000, "{cpu} ns after 400 ms with a 1-CPU limit");
    assert!(cg.memory_bytes().is_ok());
    let limit_file = match &cgs {
        Cgroups::V2 { .. } => "memory.max",
        Cgroups::V1 { .. } => "memory.limit_in_bytes",
    };
    let mem = cg
        .paths()
        .iter()
        .find_map(|p| std::fs::read_to_string(p.join(limit_file)).ok())
        .unwrap();
    assert_eq!(mem.trim(), (256u64 << 20).to_string());

    cg.remove().expect("remove");
    let st = busy.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9), "{st}");
    assert!(!cg.exists());
    assert!(!cgs.list().contains(&name));
    cg.remove().expect("removing again is fine");
    println!("cgroups: {}", cgs.describe());
}

/// The v2 code paths (cgroup.kill, cpu.stat) on a real cgroup2 mount: the
/// host's unified hierarchy when it is pure v2, else the hybrid
/// `/sys/fs/cgroup/unified` mount (no controllers, so no limits).
#[test]
fn cgroup_v2_create_add_measure_kill_remove() {
    let cgs = match cgroups() {
        v2 @ Cgroups::V2 { .. } => v2,
        Cgroups::V1 { .. } => match Cgroups::detect_at(Path::new("/sys/fs/cgroup/unified")) {
            Ok(v2 @ Cgroups::V2 { .. }) => v2,
            _ => {
                eprintln!("SKIPPED: no cgroup2 mount on this host");
                return;
            }
        },
    };
    let name = unique("cg2");
    let cg = cgs.create(&name, Limits::default()).expect("create");
    let mut busy = Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
    cg.add_pid(busy.id()).unwrap();
    assert_eq!(cg.pids(), vec![busy.id()]);
    std::thread::sleep(Duration::from_millis(300));
    let cpu = cg.cpu_ns().unwrap();
    assert!(cpu >= 50_000_000, "{cpu} ns after 300 ms of a busy loop");
    cg.kill_all();
    let st = busy.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9), "{st}");
    cg.remove().expect("remove");
    assert!(!cg.exists());
    println!("cgroup2: {}", cgs.describe());
}

#[test]
fn killing_nsinit_or_dropping_the_sandbox_leaves_nothing() {
    let s = setup("drop");
    let mut sb = Sandbox::start(&s.cfg, &s.cgroups, &s.spec).expect("start");
    let mut c = connect(&mut sb);
    // The scratch tmpfs is as big as the session's memory, no bigger.
    let out = sh(&mut c, "dd if=/dev/zero of=/tmp/big bs=1M count=200");
    assert_ne!(out.status.code, Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "{out:?}"
    );
    sh(&mut c, "rm /tmp/big");
    // SIGKILL to nsinit takes the whole sandbox down (parent death signal
    // to its PID 1, and the kernel kills the rest of the namespace).
    let cg = sb.cgroup().clone();
    let pids = cg.pids();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sb.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_exit(&mut sb, Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| pid_alive(p)) {
        assert!(Instant::now() < deadline, "sandbox survived nsinit: {:?}", cg.pids());
        std::thread::sleep(Duration::from_millis(10));
    }
    let dir = sb.dir().to_path_buf();
    drop(c);
    drop(sb);
    assert_gone(&dir, &cg, &pids);
}

#[test]
fn sigterm_to_nsinit_ends_the_sandbox() {
    let s = setup("term");
    let mut sb = Sandbox::start(&s.cfg, &s.cgroups, &s.spec).expect("start");
    let _c = connect(&mut sb);
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sb.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = wait_exit(&mut sb, Duration::from_secs(6));
    // guest-agent has no SIGTERM handler, so as a namespace init it does
    // not see the forwarded signal; nsinit SIGKILLs it after 2 s.
    assert_eq!(st.code(), Some(128 + 9), "{st}; log:\n{}", sb.log());
    assert!(t.elapsed() >= Duration::from_millis(1900), "{:?}", t.elapsed());
    sb.teardown().expect("teardown");
}
