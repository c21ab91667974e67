//! Cold start of one microVM on Warren's VMM, for people who measure it.
//!
//! Per run, all on CLOCK_MONOTONIC from the moment before `vmm` is spawned:
//! the first guest instruction (the guest's first boot-timer stamp, taken
//! by the VMM), ready (the guest's hello read from vsock here), and the
//! full cycle to process exit (shutdown asked right after the hello; the
//! guest resets, the VMM scrubs and exits). One more run with the guest
//! up measures the VMM's own memory: its resident set minus the guest
//! memory it maps.
//!
//! A second series boots the probe without devices, so it stamps the boot
//! timer and resets at once — the shape of guest Firecracker's published
//! figure for this machine is measured on — as `stub_cycle_ms`.
//!
//! `--json` prints exactly one line (the harness contract, see README):
//! `{"runs":N,"kernel":"probe","vcpus":V,"mem_mib":M,"spawn_to_init_ms":{"p50":…,"p90":…,"p99":…,"max":…},
//!   "spawn_to_ready_ms":{…},"cycle_ms":{…},"stub_cycle_ms":{…},"vmm_overhead_kib":…}`

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::Value;
use warren_benches::Summary;
use warren_e2e::vmm::{monotonic_ns, VmmGuest};

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
    std::env::var_os(var)
        .map(PathBuf::from)
        .with_context(|| format!("{var} is not set; run this through `cargo xtask bench coldstart`"))
}

struct Run {
    to_init_ms: Option<f64>,
    to_ready_ms: f64,
    cycle_ms: f64,
}

/// What to boot.
struct Guest {
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    cmdline: &'static str,
}

/// Kernel command line for the project's Linux guest on the VMM.
const LINUX_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1 tsc=reliable warren.transport=vsock";

fn spawn_vm(vmm: &Path, guest: &Guest, args: &Args) -> Result<VmmGuest> {
    let vm = VmmGuest::boot(vmm, Duration::from_secs(30), |_| {
        let mut a: Vec<OsString> = Vec::new();
        if let Some(i) = &guest.initramfs {
            a.extend(["--initramfs".into(), i.into()]);
        }
        a.extend(["--kernel".into(), guest.kernel.clone().into()]);
        a.extend(["--cmdline", guest.cmdline, "--boot-timer"].map(OsString::from));
        a.extend(["--vcpus".into(), args.vcpus.to_string().into()]);
        a.extend(["--mem-mib".into(), args.mem.to_string().into()]);
        a
    })?;
    Ok(vm)
}

fn one_run(vmm: &Path, guest: &Guest, args: &Args) -> Result<Run> {
    let mut vm = spawn_vm(vmm, guest, args)?;
    let (status, out) = vm.shutdown()?;
    let t_exit = monotonic_ns();
    let mut first_stamp = None;
    let mut exit = Value::Null;
    for line in out.lines() {
        let v: Value = serde_json::from_str(line)?;
        match v["event"].as_str() {
            Some("boot_timer") if first_stamp.is_none() => first_stamp = v["monotonic_ns"].as_u64(),
            Some("exit") | Some("error") => exit = v,
            _ => {}
        }
    }
    if !status.success() || exit["reason"] != "guest_reset" {
        bail!("vmm run failed: {status}: {exit}");
    }
    let t0 = vm.spawned_ns;
    let ms = |t: u64| t.saturating_sub(t0) as f64 / 1e6;
    Ok(Run {
        // Linux has no boot-timer hook: only the probe stamps it.
        to_init_ms: first_stamp.map(ms),
        to_ready_ms: ms(vm.ready_ns),
        cycle_ms: ms(t_exit),
    })
}

/// The cycle of a stub guest, the shape Firecracker's figure is measured
/// on: no devices, the guest stamps the boot timer and resets at once.
fn stub_cycle_ms(vmm: &Path, kernel: &Path, args: &Args) -> Result<f64> {
    let t0 = monotonic_ns();
    let out = Command::new(vmm)
        .arg("--kernel")
        .arg(kernel)
        .args(["--vcpus", &args.vcpus.to_string(), "--mem-mib", &args.mem.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()?;
    let t_exit = monotonic_ns();
    if !out.status.success() {
        bail!("stub run failed: {}", out.status);
    }
    Ok((t_exit - t0) as f64 / 1e6)
}

/// VmRSS minus the guest memory (shared memfd pages) of a running VMM
/// whose guest is up and connected, KiB.
fn vmm_overhead_kib(vmm: &Path, guest: &Guest, args: &Args) -> Result<u64> {
    let mut vm = spawn_vm(vmm, guest, args)?;
    vm.client.ping(0)?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.child.id()))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let overhead = field("VmRSS:").saturating_sub(field("RssShmem:"));
    vm.shutdown()?;
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
    if args.kernel == KernelKind::Linux && !host.runs_linux_natively() {
        eprintln!(
            "coldstart: --kernel linux did not run: it needs hardware virtualization (VMX/SVM) and this host has {}",
            host.describe()
        );
        std::process::exit(3);
    }
    let vmm = env_path("WARREN_VMM")?;
    let guest = match args.kernel {
        KernelKind::Probe => Guest {
            kernel: env_path("WARREN_PROBE")?,
            initramfs: None,
            cmdline: "",
        },
        KernelKind::Linux => Guest {
            kernel: env_path("WARREN_KERNEL")?,
            initramfs: Some(env_path("WARREN_INITRAMFS")?),
            cmdline: LINUX_CMDLINE,
        },
    };
    // One unmeasured run warms the page cache for the binaries.
    one_run(&vmm, &guest, &args)?;
    let runs = (0..args.runs)
        .map(|_| one_run(&vmm, &guest, &args))
        .collect::<Result<Vec<_>>>()?;
    let stamps: Option<Vec<f64>> = runs.iter().map(|r| r.to_init_ms).collect();
    let init = stamps.map(|s| Summary::of(&s));
    let ready = Summary::of(&runs.iter().map(|r| r.to_ready_ms).collect::<Vec<_>>());
    let cycle = Summary::of(&runs.iter().map(|r| r.cycle_ms).collect::<Vec<_>>());
    let stub = match args.kernel {
        KernelKind::Probe => Some(Summary::of(
            &(0..args.runs)
                .map(|_| stub_cycle_ms(&vmm, &guest.kernel, &args))
                .collect::<Result<Vec<_>>>()?,
        )),
        KernelKind::Linux => None,
    };
    let overhead = vmm_overhead_kib(&vmm, &guest, &args)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "runs": args.runs,
                "kernel": match args.kernel { KernelKind::Probe => "probe", KernelKind::Linux => "linux" },
                "vcpus": args.vcpus,
                "mem_mib": args.mem,
                "spawn_to_init_ms": init.map(|i| i.json()),
                "spawn_to_ready_ms": ready.json(),
                "cycle_ms": cycle.json(),
                "stub_cycle_ms": stub.map(|s| s.json()),
                "vmm_overhead_kib": overhead,
            })
        );
    } else {
        let row = |label: &str, s: Option<Summary>| match s {
            Some(s) => println!(
                "  {label:<34}p50 {:.2} ms  p90 {:.2}  p99 {:.2}  max {:.2}",
                s.p50, s.p90, s.p99, s.max
            ),
            None => println!("  {label:<34}not measured for this guest"),
        };
        let name = match args.kernel {
            KernelKind::Probe => "probe guest",
            KernelKind::Linux => "Linux guest",
        };
        println!(
            "coldstart: {} runs, {name}, {} vCPU, {} MiB",
            args.runs, args.vcpus, args.mem
        );
        row("spawn -> first guest instruction", init);
        row("spawn -> ready (hello over vsock)", Some(ready));
        row("spawn -> process exit (cycle)", Some(cycle));
        row("stub guest, spawn -> exit", stub);
        println!(
            "  {:<34}{overhead} KiB ({:.2} MiB)",
            "VMM memory overhead",
            overhead as f64 / 1024.0
        );
    }
    Ok(())
}
