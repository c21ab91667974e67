//! The project's Linux kernel and initramfs on this VMM, to guest-agent's
//! hello over virtio-vsock and a command.
//!
//! Needs hardware virtualization: on a host whose KVM is PVM (no VMX/SVM),
//! a stock kernel runs under instruction emulation and takes minutes to
//! boot, so there the test prints that it did not run, and why. The same
//! kernel and guest-agent are tested under QEMU on every host
//! (`tests/tests/qemu_guest.rs`).

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use warren_e2e::vmm::VmmGuest;
use warren_protocol::ExecRequest;

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
    let mut vm = VmmGuest::boot(Path::new(env!("CARGO_BIN_EXE_vmm")), Duration::from_secs(60), |_| {
        let mut a: Vec<OsString> = vec!["--kernel".into(), kernel.into(), "--initramfs".into(), initramfs.into()];
        a.extend(["--mem-mib", "256", "--serial", "--cmdline"].map(OsString::from));
        a.push("console=ttyS0 reboot=k panic=-1 tsc=reliable warren.transport=vsock".into());
        a
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("linux on vmm: spawn -> guest-agent hello in {:?}", vm.spawn_to_hello());
    let release = vm.client.hello().kernel_release.clone();
    assert!(release.starts_with("6.1"), "{release}");
    let out = vm
        .client
        .exec(ExecRequest {
            argv: vec!["uname".into(), "-r".into()],
            timeout_ms: Some(10_000),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), release);
    vm.client.shutdown().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "vmm still running after shutdown");
        std::thread::sleep(Duration::from_millis(10));
    }
}
