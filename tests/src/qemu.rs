//! Booting the project's kernel + initramfs under QEMU TCG.
//!
//! QEMU's `microvm` machine is the closest match to our own VMM: no PCI, no
//! firmware tables, virtio over MMIO announced on the kernel command line.
//! TCG emulates the CPU, so this runs anywhere; `-icount` keeps the guest
//! clock tied to executed instructions, without which the boot can stall
//! in timer calibration. guest-agent is reached through a virtio console
//! port that QEMU connects to a Unix socket the harness listens on.

use std::fs;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use warren_protocol::client::{AgentClient, ClientError};

use crate::accept::{accept_while_running, AcceptError};

/// Name of the console port guest-agent looks for.
pub const AGENT_PORT_NAME: &str = "warren.0";

/// Kernel command line used for every QEMU boot. `tsc=reliable` and a
/// preset `lpj` skip calibrations that stall under emulation;
/// `cpu_init_udelay=0` drops the 10 ms INIT delay the emulated (AMD family
/// 0xf) CPU would get per secondary CPU; `panic=-1` turns a panic into a
/// reset, and `reboot=t` makes resets a triple fault (QEMU's microvm has
/// no i8042), both of which `-no-reboot` turns into QEMU exiting at once.
pub const BASE_CMDLINE: &str = "console=ttyS0 tsc=reliable lpj=5000000 cpu_init_udelay=0 panic=-1 reboot=t";

/// How QEMU paces the guest clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Icount {
    /// `-icount shift=auto`: fast, clock loosely tied to instructions.
    Auto,
    /// `-icount shift=0`: exactly 1 ns of guest time per instruction, so
    /// guest uptime is a deterministic instruction count.
    Exact,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// Uncompressed vmlinux (needs CONFIG_PVH for QEMU to load it).
    pub kernel: PathBuf,
    /// newc initramfs with guest-agent as /init.
    pub initramfs: PathBuf,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Clock pacing.
    pub icount: Icount,
    /// Appended to [`BASE_CMDLINE`].
    pub extra_cmdline: String,
    /// Give up waiting for the hello after this long.
    pub boot_timeout: Duration,
    /// A root file system (ext4) attached read-only as a virtio-blk disk;
    /// guest-agent switches into it (`warren.root=/dev/vda`).
    pub root_disk: Option<PathBuf>,
}

impl QemuOptions {
    /// The defaults used by tests: 1 vCPU, 256 MiB, `shift=auto`, 120 s.
    pub fn new(kernel: PathBuf, initramfs: PathBuf) -> Self {
        QemuOptions {
            kernel,
            initramfs,
            vcpus: 1,
            mem_mib: 256,
            icount: Icount::Auto,
            extra_cmdline: String::new(),
            boot_timeout: Duration::from_secs(120),
            root_disk: None,
        }
    }
}

/// Failures booting or talking to a QEMU guest.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU is not installed.
    #[error("cannot start {binary}: {source} (install Debian's qemu-system-x86; `cargo xtask test` does)")]
    Spawn {
        /// The binary tried.
        binary: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Local setup (temp dir, socket) failed.
    #[error("{0}")]
    Setup(#[from] std::io::Error),
    /// QEMU exited before guest-agent said hello.
    #[error("QEMU exited ({status}) before guest-agent connected\n--- QEMU stderr ---\n{stderr}\n--- guest serial ---\n{serial}")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// What it printed.
        stderr: String,
        /// The guest console.
        serial: String,
    },
    /// No hello within the timeout.
    #[error("guest-agent did not connect within {timeout:?}\n--- guest serial ---\n{serial}")]
    Timeout {
        /// The timeout.
        timeout: Duration,
        /// The guest console.
        serial: String,
    },
    /// The guest connected but the protocol failed.
    #[error("talking to guest-agent: {source}\n--- guest serial ---\n{serial}")]
    Protocol {
        /// What failed.
        source: ClientError,
        /// The guest console.
        serial: String,
    },
}

/// A running QEMU guest with guest-agent connected.
pub struct QemuGuest {
    child: Child,
    /// Connected, hello already received.
    pub client: AgentClient<UnixStream, UnixStream>,
    /// Wall time from spawning QEMU to the hello.
    pub spawn_to_hello: Duration,
    serial: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

/// The QEMU binary: `$WARREN_QEMU` or `qemu-system-x86_64`.
pub fn qemu_binary() -> String {
    std::env::var("WARREN_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// A QEMU process just started, before anything was heard from the guest.
struct Spawned {
    child: Child,
    listener: UnixListener,
    started: Instant,
    serial: PathBuf,
    stderr: PathBuf,
    dir: tempfile::TempDir,
}

fn spawn(opts: &QemuOptions) -> Result<Spawned, QemuError> {
    let dir = tempfile::Builder::new().prefix("warren-qemu-").tempdir()?;
    let sock = dir.path().join("agent.sock");
    let serial = dir.path().join("serial.log");
    let stderr = dir.path().join("qemu.stderr");
    let listener = UnixListener::bind(&sock)?;
    let root = if opts.root_disk.is_some() {
        " warren.root=/dev/vda"
    } else {
        ""
    };
    let cmdline = format!(
        "{BASE_CMDLINE} warren.transport=port:{AGENT_PORT_NAME}{root} {}",
        opts.extra_cmdline
    );
    let mut disk_args: Vec<String> = Vec::new();
    if let Some(d) = &opts.root_disk {
        disk_args.extend([
            "-drive".into(),
            format!("file={},format=raw,if=none,id=root,readonly=on", d.display()),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
        ]);
    }
    let icount = match opts.icount {
        Icount::Auto => "shift=auto",
        Icount::Exact => "shift=0",
    };
    let binary = qemu_binary();
    let started = Instant::now();
    let child = Command::new(&binary)
        .args(["-M", "microvm,rtc=on,pit=on,pic=on,isa-serial=on,acpi=off"])
        .args(["-accel", "tcg", "-cpu", "max", "-icount", icount])
        .args(["-m", &opts.mem_mib.to_string(), "-smp", &opts.vcpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(&opts.kernel)
        .arg("-initrd")
        .arg(&opts.initramfs)
        .args(["-append", &cmdline])
        .args(&disk_args)
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!("socket,id=agent,path={}", sock.display()))
        .args([
            "-device",
            &format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr)?)
        .spawn()
        .map_err(|source| QemuError::Spawn { binary, source })?;
    Ok(Spawned {
        child,
        listener,
        started,
        serial,
        stderr,
        dir,
    })
}

/// The console line the kernel prints when it starts the initramfs' init.
pub const INIT_LINE: &str = "Run /init as init process";

/// Boots `opts` until the kernel announces `/init` on the console, then
/// stops QEMU; returns the console log. For kernels whose virtio drivers
/// are modules (distribution kernels), where guest-agent cannot connect.
pub fn boot_to_init(opts: &QemuOptions) -> Result<String, QemuError> {
    let mut s = spawn(opts)?;
    let result = loop {
        let log = read_lossy(&s.serial);
        if log.contains(INIT_LINE) {
            break Ok(log);
        }
        if let Some(status) = s.child.try_wait()? {
            break Err(QemuError::Exited {
                status,
                stderr: read_lossy(&s.stderr),
                serial: log,
            });
        }
        if s.started.elapsed() > opts.boot_timeout {
            break Err(QemuError::Timeout {
                timeout: opts.boot_timeout,
                serial: log,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = s.child.kill();
    let _ = s.child.wait();
    result
}

impl QemuGuest {
    /// Boots and waits for guest-agent's hello.
    pub fn boot(opts: &QemuOptions) -> Result<QemuGuest, QemuError> {
        let Spawned {
            mut child,
            listener,
            started,
            serial,
            stderr,
            dir,
        } = spawn(opts)?;
        let stream = match accept_while_running(&listener, &mut child, opts.boot_timeout) {
            Ok(s) => s,
            Err(AcceptError::Exited(status)) => {
                return Err(QemuError::Exited {
                    status,
                    stderr: read_lossy(&stderr),
                    serial: read_lossy(&serial),
                })
            }
            Err(AcceptError::Timeout(timeout)) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(QemuError::Timeout {
                    timeout,
                    serial: read_lossy(&serial),
                });
            }
            Err(AcceptError::Io(e)) => return Err(e.into()),
        };
        // QEMU connects to the socket as soon as it starts; the hello comes
        // when the guest is up, so the wait for it is the boot.
        stream.set_read_timeout(Some(opts.boot_timeout))?;
        let handshake = stream
            .try_clone()
            .map_err(ClientError::from)
            .and_then(|r| AgentClient::handshake(r, stream));
        let client = match handshake {
            Ok(c) => c,
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(QemuError::Protocol {
                    source,
                    serial: read_lossy(&serial),
                });
            }
        };
        let spawn_to_hello = started.elapsed();
        client.reader().set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(QemuGuest {
            child,
            client,
            spawn_to_hello,
            serial,
            stderr,
            _dir: dir,
        })
    }

    /// Runs `argv` in the guest (timeout `timeout_ms`); its stdout. Panics,
    /// with the guest console, when it fails: for tests.
    pub fn run(&mut self, argv: &[&str], timeout_ms: u64) -> String {
        let out = self
            .client
            .exec(warren_protocol::ExecRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                timeout_ms: Some(timeout_ms),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{argv:?}: {e}\n{}", self.serial_log()));
        assert!(
            out.status.success(),
            "{argv:?} failed: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What the guest printed on its serial console so far.
    pub fn serial_log(&self) -> String {
        read_lossy(&self.serial)
    }

    /// What QEMU printed on stderr so far.
    pub fn qemu_stderr(&self) -> String {
        read_lossy(&self.stderr)
    }

    /// Waits for QEMU to exit; `None` when it is still running at the timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
