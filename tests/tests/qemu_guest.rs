//! The project's kernel and initramfs, booted for real under QEMU TCG, with
//! guest-agent driven over a virtio console port.
//!
//! This proves the kernel config and guest-agent as PID 1 on hosts whose KVM
//! cannot run a Linux guest at native speed (on this project's CI machines
//! KVM is PVM). Needs the artifacts `cargo xtask test` builds; without them
//! the tests fail and say how to build them.

use std::time::Duration;

use warren_e2e::{artifacts, qemu};
use warren_protocol::client::ClientError;
use warren_protocol::{ErrorKind, ExecRequest};

fn boot(vcpus: u32) -> qemu::QemuGuest {
    let kernel = artifacts::kernel().unwrap_or_else(|e| panic!("{e}"));
    let initramfs = artifacts::initramfs().unwrap_or_else(|e| panic!("{e}"));
    let mut opts = qemu::QemuOptions::new(kernel, initramfs);
    opts.vcpus = vcpus;
    if vcpus > 1 {
        // Bringing up a second CPU under TCG with -icount took from 1.5 s
        // to 44 s here, for no cause found: give it room.
        opts.boot_timeout = std::time::Duration::from_secs(300);
    }
    let g = qemu::QemuGuest::boot(&opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "booted under QEMU TCG ({vcpus} vCPU): spawn -> hello {:?} wall, guest uptime at hello {} ms",
        g.spawn_to_hello,
        g.client.hello().boot_time_ns / 1_000_000
    );
    g
}

fn run(g: &mut qemu::QemuGuest, argv: &[&str]) -> String {
    g.run(argv, 30000)
}

#[test]
fn guest_agent_serves_the_real_kernel_under_qemu() {
    let mut g = boot(1);
    let release = g.client.hello().kernel_release.clone();
    assert!(release.starts_with("6.1"), "kernel release {release:?}");

    // uname -r in the guest agrees with the hello.
    assert_eq!(run(&mut g, &["uname", "-r"]).trim(), release);

    // PID 1 did its mounts and set the hostname.
    let mounts = run(&mut g, &["cat", "/proc/mounts"]);
    for (fs, at) in [
        ("proc", "/proc"),
        ("sysfs", "/sys"),
        ("devtmpfs", "/dev"),
        ("tmpfs", "/tmp"),
        ("tmpfs", "/run"),
    ] {
        assert!(
            mounts.lines().any(|l| {
                let f: Vec<_> = l.split(' ').collect();
                f.len() > 2 && f[1] == at && f[2] == fs
            }),
            "{fs} not mounted on {at}:\n{mounts}"
        );
    }
    assert_eq!(run(&mut g, &["hostname"]).trim(), "warren");
    assert_eq!(run(&mut g, &["cat", "/proc/1/comm"]).trim(), "init");

    // The kernel has what images need.
    let filesystems = run(&mut g, &["cat", "/proc/filesystems"]);
    for fs in ["ext4", "overlay", "tmpfs", "devtmpfs"] {
        assert!(filesystems.contains(fs), "{fs} missing:\n{filesystems}");
    }

    // A file written through the protocol reads back, and the guest sees it.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    g.client.write_file("/tmp/probe/data.bin", &data, None).unwrap();
    assert_eq!(g.client.read_file("/tmp/probe/data.bin").unwrap(), data);
    assert_eq!(
        run(&mut g, &["wc", "-c", "/tmp/probe/data.bin"])
            .split_whitespace()
            .next(),
        Some("300000")
    );
    let entries = g.client.list_dir("/tmp/probe").unwrap();
    assert_eq!(entries.len(), 1);
    g.client.remove("/tmp/probe", true).unwrap();
    match g.client.read_file("/tmp/probe/data.bin") {
        Err(ClientError::Guest(e)) => assert_eq!(e.kind, ErrorKind::NotFound),
        other => panic!("{other:?}"),
    }

    // A command that outlives its timeout is killed.
    let out = g
        .client
        .exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "sleep 60; echo never".into()],
            timeout_ms: Some(500),
            ..Default::default()
        })
        .unwrap();
    assert!(out.status.timed_out, "{:?}", out.status);
    assert_eq!(out.status.signal, Some(9));
    assert!(out.stdout.is_empty());

    g.client.ping(1).unwrap();

    // Clean shutdown: guest-agent acknowledges, resets the machine, QEMU
    // (with -no-reboot) exits successfully.
    g.client.shutdown().unwrap();
    let status = g.wait_exit(Duration::from_secs(60)).unwrap();
    match status {
        Some(st) => assert!(st.success(), "QEMU exited with {st}\n{}", g.qemu_stderr()),
        None => panic!("QEMU still running 60 s after shutdown\n{}", g.serial_log()),
    }
}

#[test]
fn two_vcpus_are_online() {
    let mut g = boot(2);
    assert_eq!(run(&mut g, &["nproc"]).trim(), "2");
    let online = run(&mut g, &["cat", "/sys/devices/system/cpu/online"]);
    assert_eq!(online.trim(), "0-1");
    g.client.shutdown().unwrap();
    assert!(g.wait_exit(Duration::from_secs(60)).unwrap().is_some());
}
