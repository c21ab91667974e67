//! What guest-agent does because it is PID 1: mount the basic file systems,
//! name the host, and end the machine on shutdown.

use std::path::Path;
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{sethostname, sync, Pid};

/// Hostname when the command line names none.
const DEFAULT_HOSTNAME: &str = "warren";

/// Mounts proc, sysfs and devtmpfs (what finding and switching to a root
/// device needs). Failures are logged, not fatal: a guest with a missing
/// mount can still answer the host, which then sees what is wrong.
pub fn mount_kernel_fs() {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nodev, None);
    mount_fs("sysfs", "/sys", "sysfs", nodev, None);
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"));
}

/// Mounts the tmpfs file systems (`/dev/shm`, `/tmp`, `/run`) on the final
/// root, and sets a default `PATH`.
pub fn mount_tmpfs() {
    mount_fs(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    default_path();
}

/// Sets a standard `PATH` when the environment has none (the kernel starts
/// PID 1 without one).
pub fn default_path() {
    if std::env::var_os("PATH").is_none() {
        std::env::set_var("PATH", crate::exec::DEFAULT_PATH);
    }
}

/// Sets the hostname (`warren.hostname=` or [`DEFAULT_HOSTNAME`]).
pub fn set_hostname(hostname: Option<&str>) {
    let name = hostname.unwrap_or(DEFAULT_HOSTNAME);
    if let Err(e) = sethostname(name) {
        tracing::warn!(error = %e, name, "cannot set the hostname");
    }
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    if let Err(e) = std::fs::create_dir_all(target) {
        tracing::warn!(error = %e, target, "cannot create mount point");
        return;
    }
    match mount(Some(source), Path::new(target), Some(fstype), flags, data) {
        Ok(()) => {}
        // Already mounted (the kernel may mount devtmpfs itself).
        Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => tracing::warn!(error = %e, target, fstype, "mount failed"),
    }
}

/// Ends every other process, syncs and resets the machine.
///
/// In a namespace sandbox (`--sandboxed`) the same call ends the sandbox:
/// reboot(2) from the init of a non-initial PID namespace kills that init
/// (its parent sees it killed by SIGHUP) and with it the whole namespace;
/// `kill(-1)` there reaches only the sandbox's own processes.
///
/// Reset, not power-off: the VM has no ACPI, so a power-off request would
/// only halt the CPU, while a reset (through the i8042 or a triple fault)
/// is what both our VMM and QEMU's `-no-reboot` treat as the end of the VM.
pub fn shutdown() -> ! {
    tracing::info!("shutting down");
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    sync();
    let err = reboot(RebootMode::RB_AUTOBOOT);
    // Only reached when reboot(2) failed; PID 1 must not exit.
    tracing::error!(?err, "reboot failed; halting here");
    loop {
        std::thread::park();
    }
}

/// Sets IFF_UP on `lo`: the kernel starts it down, and the image's own
/// servers (the agent on 8080, the code interpreter) are reached on
/// 127.0.0.1 through guest-agent's HTTP forwarding.
pub fn loopback_up() {
    if let Err(e) = set_loopback_up() {
        tracing::warn!(error = %e, "cannot bring up lo; servers in the guest are unreachable");
    }
}

fn set_loopback_up() -> std::io::Result<()> {
    use nix::libc;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS writes the flags into the ifreq we own.
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
