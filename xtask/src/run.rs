//! `cargo xtask run`: build everything and show a first guest working.
//!
//! agentd, the daemon that will serve the API, is not built yet; until it
//! is, `run` boots the project's kernel and initramfs under QEMU (the way
//! every host can, see docs/ARCHITECTURE.md), drives guest-agent through a
//! short session a person can follow, and shuts the guest down.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use warren_e2e::qemu::{QemuGuest, QemuOptions};
use warren_images::Cache;
use warren_protocol::{ExecRequest, Stream};

use crate::{images, kernel, packages};

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
    let mut g =
        QemuGuest::boot(&QemuOptions::new(vmlinux, initramfs)).context("booting the guest")?;
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
    g.client.write_file(
        "/tmp/note.txt",
        b"written by the host over the guest protocol\n",
        None,
    )?;
    let back = g.client.read_file("/tmp/note.txt")?;
    print!(
        "\n/tmp/note.txt read back: {}",
        String::from_utf8_lossy(&back)
    );
    g.client.shutdown()?;
    let exit = g.wait_exit(Duration::from_secs(60))?;
    println!(
        "guest shut down ({})",
        exit.map(|s| s.to_string())
            .unwrap_or_else(|| "still running, killed".into())
    );
    println!("\nagentd is not built yet: this is the whole main job for now. `cargo xtask test` runs every test.");
    Ok(())
}
