//! Cold start of one microVM on Warren's VMM, for people who measure it.
//!
//! Per run: spawn `vmm` → first guest instruction (the guest's first
//! boot-timer stamp, compared on CLOCK_MONOTONIC with the spawn time taken
//! here), and spawn → process exit (the full cycle: build, boot, guest
//! reset, scrub, exit). One extra run with the guest held running measures
//! the VMM's own memory: its resident set minus the guest memory it maps.
//!
//! `--json` prints exactly one line (the harness contract, see README):
//! `{"runs":N,"kernel":"probe","vcpus":V,"mem_mib":M,"spawn_to_init_ms":{"p50":…,"p90":…,"p99":…,"max":…},
//!   "spawn_to_ready_ms":null|{…},"cycle_ms":{…},"vmm_overhead_kib":…}`

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::Value;
use warren_benches::Summary;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum KernelKind {
    /// The probe guest (`guest/probe`).
    Probe,
    /// The project's Linux kernel + initramfs (needs hardware virtualization).
    Linux,
}

#[derive(Parser, Debug)]
#[command(about = "Cold-start benchmark of Warren's VMM")]
struct Args {
    /// Measured runs.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 128)]
    mem: u64,
    /// Which guest.
    #[arg(long, value_enum, default_value_t = KernelKind::Probe)]
    kernel: KernelKind,
    /// One JSON line instead of text.
    #[arg(long)]
    json: bool,
}

fn env_path(var: &str) -> Result<PathBuf> {
    std::env::var_os(var).map(PathBuf::from).with_context(|| {
        format!("{var} is not set; run this through `cargo xtask bench coldstart`")
    })
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct Run {
    to_init_ms: f64,
    cycle_ms: f64,
}

fn vmm_command(vmm: &PathBuf, kernel: &PathBuf, args: &Args, cmdline: &str) -> Command {
    let mut c = Command::new(vmm);
    c.arg("--kernel")
        .arg(kernel)
        .args([
            "--vcpus",
            &args.vcpus.to_string(),
            "--mem-mib",
            &args.mem.to_string(),
            "--boot-timer",
        ])
        .args(["--cmdline", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

fn one_run(vmm: &PathBuf, kernel: &PathBuf, args: &Args) -> Result<Run> {
    let t0 = monotonic_ns();
    let mut child = vmm_command(vmm, kernel, args, "probe.mode=reset").spawn()?;
    let out = BufReader::new(child.stdout.take().expect("piped"));
    let mut first_stamp = None;
    let mut exit = Value::Null;
    for line in out.lines() {
        let v: Value = serde_json::from_str(&line?)?;
        match v["event"].as_str() {
            Some("boot_timer") if first_stamp.is_none() => first_stamp = v["monotonic_ns"].as_u64(),
            Some("exit") | Some("error") => exit = v,
            _ => {}
        }
    }
    let status = child.wait()?;
    let t_exit = monotonic_ns();
    if !status.success() || exit["reason"] != "guest_reset" {
        bail!("vmm run failed: {status}: {exit}");
    }
    let stamp = first_stamp.context("the guest never wrote the boot timer")?;
    Ok(Run {
        to_init_ms: (stamp.saturating_sub(t0)) as f64 / 1e6,
        cycle_ms: (t_exit - t0) as f64 / 1e6,
    })
}

/// VmRSS minus the guest memory (shared memfd pages) of a running VMM, KiB.
fn vmm_overhead_kib(vmm: &PathBuf, kernel: &PathBuf, args: &Args) -> Result<u64> {
    let mut child = vmm_command(vmm, kernel, args, "probe.mode=halt").spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let first = lines.next().context("vmm printed nothing")??;
    anyhow::ensure!(
        first.contains("boot_timer"),
        "unexpected first line {first}"
    );
    // The guest is up and halted; the VMM is in its steady state.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let overhead = field("VmRSS:").saturating_sub(field("RssShmem:"));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait()?;
    Ok(overhead)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let host = vmm::host::HostVirt::detect();
    if let Err(e) = &host.kvm {
        bail!("cold start needs KVM: {e}");
    }
    if host.pvm && !host.hardware_virt {
        eprintln!("coldstart: warning: {}", host.describe());
    }
    if args.kernel == KernelKind::Linux {
        if !host.runs_linux_natively() {
            eprintln!(
                "coldstart: --kernel linux did not run: it needs hardware virtualization (VMX/SVM) and this host has {}",
                host.describe()
            );
            std::process::exit(3);
        }
        bail!("--kernel linux needs the virtio-vsock hello, which the VMM does not have yet");
    }
    let vmm = env_path("WARREN_VMM")?;
    let kernel = env_path("WARREN_PROBE")?;
    // One unmeasured run warms the page cache for the binaries.
    one_run(&vmm, &kernel, &args)?;
    let runs = (0..args.runs)
        .map(|_| one_run(&vmm, &kernel, &args))
        .collect::<Result<Vec<_>>>()?;
    let init = Summary::of(&runs.iter().map(|r| r.to_init_ms).collect::<Vec<_>>());
    let cycle = Summary::of(&runs.iter().map(|r| r.cycle_ms).collect::<Vec<_>>());
    let overhead = vmm_overhead_kib(&vmm, &kernel, &args)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "runs": args.runs,
                "kernel": "probe",
                "vcpus": args.vcpus,
                "mem_mib": args.mem,
                "spawn_to_init_ms": init.json(),
                // Ready = the guest's hello over vsock, which needs the
                // virtio-vsock device; null until the VMM has it.
                "spawn_to_ready_ms": Value::Null,
                "cycle_ms": cycle.json(),
                "vmm_overhead_kib": overhead,
            })
        );
    } else {
        println!(
            "coldstart: {} runs, probe guest, {} vCPU, {} MiB",
            args.runs, args.vcpus, args.mem
        );
        println!(
            "  spawn -> first guest instruction  p50 {:.2} ms  p90 {:.2}  p99 {:.2}  max {:.2}",
            init.p50, init.p90, init.p99, init.max
        );
        println!(
            "  spawn -> process exit (cycle)     p50 {:.2} ms  p90 {:.2}  p99 {:.2}  max {:.2}",
            cycle.p50, cycle.p90, cycle.p99, cycle.max
        );
        println!("  spawn -> ready (vsock hello)      not measured yet (no virtio-vsock)");
        println!(
            "  VMM memory overhead               {overhead} KiB ({:.2} MiB)",
            overhead as f64 / 1024.0
        );
    }
    Ok(())
}
