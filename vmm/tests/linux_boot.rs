//! The project's Linux kernel and initramfs on this VMM, to guest-agent's
//! hello over virtio-vsock and a command.
//!
//! Needs hardware virtualization: on a host whose KVM is PVM (no VMX/SVM),
//! a stock kernel runs under instruction emulation and takes minutes to
//! boot, so there the test prints that it did not run, and why. The same
//! kernel and guest-agent are tested under QEMU on every host
//! (`tests/tests/qemu_guest.rs`).

use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warren_protocol::client::AgentClient;
use warren_protocol::{ExecRequest, AGENT_VSOCK_PORT};

#[test]
fn project_kernel_boots_to_guest_agent_hello_on_this_vmm() {
    let host = vmm::host::HostVirt::detect();
    if !host.runs_linux_natively() {
        eprintln!(
            "linux_boot: DID NOT RUN: booting the project's Linux kernel on Warren's VMM needs hardware \
             virtualization (VMX/SVM); this host has {}",
            host.describe()
        );
        return;
    }
    let kernel = warren_e2e::artifacts::kernel().unwrap_or_else(|e| panic!("{e}"));
    let initramfs = warren_e2e::artifacts::initramfs().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_{AGENT_VSOCK_PORT}", sock.display())).unwrap();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&initramfs)
        .args(["--mem-mib", "256", "--serial"])
        .args([
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 tsc=reliable warren.transport=vsock",
        ])
        .arg("--vsock-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stream = warren_e2e::accept::accept_while_running(&listener, &mut child, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut client = AgentClient::handshake(stream.try_clone().unwrap(), stream).unwrap();
    eprintln!("linux on vmm: spawn -> guest-agent hello in {:?}", started.elapsed());
    let release = client.hello().kernel_release.clone();
    assert!(release.starts_with("6.1"), "{release}");
    let out = client
        .exec(ExecRequest {
            argv: vec!["uname".into(), "-r".into()],
            timeout_ms: Some(10_000),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), release);
    client.shutdown().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "vmm still running after shutdown");
        std::thread::sleep(Duration::from_millis(10));
    }
}
