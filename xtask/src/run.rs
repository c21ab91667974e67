//! `cargo xtask run`: build everything and show a first guest working.
//!
//! agentd, the daemon that will serve the API, is not built yet; until it
//! is, `run` boots the project's kernel and initramfs under QEMU (the way
//! every host can, see docs/ARCHITECTURE.md), drives guest-agent through a
//! short session a person can follow and shuts the guest down, then boots
//! the probe guest on Warren's own VMM on KVM and talks to it over vsock.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use warren_e2e::qemu::{QemuGuest, QemuOptions};
use warren_e2e::vmm::VmmGuest;
use warren_images::Cache;
use warren_protocol::{ExecRequest, Stream};

use crate::{images, kernel, packages, probe, sh};

/// Builds, boots, runs a few commands, shuts down.
pub fn run(cache: &Cache) -> Result<()> {
    let host = vmm::host::HostVirt::detect();
    eprintln!("xtask: host: {}", host.describe());
    packages::ensure(packages::TESTS)?;
    let vmlinux = kernel::build(cache)?;
    let initramfs = images::build_initramfs(cache)?;
    println!("kernel:    {}", vmlinux.display());
    println!("initramfs: {}", initramfs.display());
    println!("\nbooting the guest under QEMU TCG (software CPU emulation; a few seconds)...");
    let mut g = QemuGuest::boot(&QemuOptions::new(vmlinux, initramfs)).context("booting the guest")?;
    let hello = g.client.hello().clone();
    println!(
        "guest-agent says hello: {} speaking protocol v{}, kernel {}, ready {} ms after guest boot, {:.1} s after spawning QEMU",
        hello.agent,
        hello.protocol_version,
        hello.kernel_release,
        hello.boot_time_ns / 1_000_000,
        g.spawn_to_hello.as_secs_f64()
    );
    let script = "echo \"hello from $(hostname), PID 1 is $(cat /proc/1/comm)\"; uname -a; \
                  echo; cat /proc/meminfo | head -2; echo; mount | grep -E 'proc|sys|tmp'";
    println!("\n$ {script}");
    let status = g.client.exec_streaming(
        ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            timeout_ms: Some(30_000),
            ..Default::default()
        },
        |stream, data| {
            let _ = match stream {
                Stream::Stdout => std::io::stdout().write_all(data),
                Stream::Stderr => std::io::stderr().write_all(data),
            };
        },
    )?;
    println!("(exit {:?})", status.code);
    g.client
        .write_file("/tmp/note.txt", b"written by the host over the guest protocol\n", None)?;
    let back = g.client.read_file("/tmp/note.txt")?;
    print!("\n/tmp/note.txt read back: {}", String::from_utf8_lossy(&back));
    g.client.shutdown()?;
    let exit = g.wait_exit(Duration::from_secs(60))?;
    println!(
        "guest shut down ({})",
        exit.map(|s| s.to_string())
            .unwrap_or_else(|| "still running, killed".into())
    );
    vmm_session(&host)?;
    println!("\nagentd is not built yet: this is the whole main job for now. `cargo xtask test` runs every test.");
    Ok(())
}

/// Boots the probe guest on Warren's own VMM, on KVM, and talks to it over
/// virtio-vsock.
fn vmm_session(host: &vmm::host::HostVirt) -> Result<()> {
    if let Err(e) = &host.kvm {
        println!("\nWarren's VMM needs KVM and this host has none usable ({e}); skipping its demo.");
        return Ok(());
    }
    let vmm = sh::build_vmm_release()?;
    let probe = probe::build()?;
    println!("\nbooting the probe guest on Warren's VMM (KVM, 1 vCPU, 128 MiB)...");
    let mut vm = VmmGuest::boot(&vmm, Duration::from_secs(30), |_| vec!["--kernel".into(), probe.into()])?;
    let ready = vm.spawn_to_hello();
    let t = Instant::now();
    for n in 0..10 {
        vm.client.ping(n)?;
    }
    let rtt = t.elapsed() / 10;
    let (status, report) = vm.shutdown()?;
    println!(
        "{} said hello over virtio-vsock {:.1} ms after the VMM was spawned; ping round trip {:.2} ms \
         (the probe's instructions are emulated on this host: {})",
        vm.client.hello().agent,
        ready.as_secs_f64() * 1e3,
        rtt.as_secs_f64() * 1e3,
        if host.runs_linux_natively() { "no" } else { "yes" }
    );
    println!(
        "vmm exited with {status}; its report: {}",
        report.lines().last().unwrap_or("")
    );
    Ok(())
}
