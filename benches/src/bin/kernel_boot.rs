//! Kernel boot cost as guest instructions, under QEMU TCG with
//! `-icount shift=0` (exactly 1 ns of guest time per instruction): the
//! printk timestamp of "Run /init" is the instruction count to /init, and
//! guest-agent's CLOCK_BOOTTIME at hello the count to ready. Deterministic,
//! whatever else the machine is doing; wall time is reported beside it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use warren_benches::Summary;
use warren_e2e::artifacts;
use warren_e2e::qemu::{self, Icount, QemuGuest, QemuOptions};

#[derive(Parser, Debug)]
#[command(about = "Guest instructions and wall time from kernel entry to /init and to guest-agent hello")]
struct Args {
    /// Boots to measure.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Kernel (default: the one `cargo xtask kernel` built).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (default: the one `cargo xtask images` built).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 256)]
    mem: u32,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// Stop at the kernel's "Run /init" line instead of waiting for
    /// guest-agent's hello: for kernels whose virtio drivers are modules
    /// (a distribution kernel), so guest-agent cannot connect.
    #[arg(long)]
    until_init: bool,
}

/// Seconds in the printk timestamp of the line announcing /init.
fn init_timestamp(serial: &str) -> Option<f64> {
    serial
        .lines()
        .find(|l| l.contains("Run /init as init process"))
        .and_then(|l| {
            let inner = l.split_once('[')?.1.split_once(']')?.0;
            inner.trim().parse().ok()
        })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let kernel = match args.kernel {
        Some(k) => k,
        None => artifacts::kernel()?,
    };
    let initramfs = match args.initramfs {
        Some(i) => i,
        None => artifacts::initramfs()?,
    };
    let (mut to_init, mut to_hello, mut wall) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        let mut opts = QemuOptions::new(kernel.clone(), initramfs.clone());
        opts.vcpus = args.vcpus;
        opts.mem_mib = args.mem;
        opts.icount = Icount::Exact;
        opts.extra_cmdline = "printk.time=1".into();
        opts.boot_timeout = Duration::from_secs(600);
        let started = std::time::Instant::now();
        let serial = if args.until_init {
            qemu::boot_to_init(&opts).with_context(|| format!("boot {}", run + 1))?
        } else {
            let mut g = QemuGuest::boot(&opts).with_context(|| format!("boot {}", run + 1))?;
            to_hello.push(g.client.hello().boot_time_ns as f64 / 1e6);
            let serial = g.serial_log();
            g.client.shutdown()?;
            let _ = g.wait_exit(Duration::from_secs(60));
            serial
        };
        wall.push(started.elapsed().as_secs_f64() * 1e3);
        let init_s = init_timestamp(&serial)
            .with_context(|| format!("no \"Run /init\" line with a timestamp on the console:\n{serial}"))?;
        to_init.push(init_s * 1e3);
    }
    // 1 ns of guest time per instruction: ms → millions of instructions.
    let init = Summary::of(&to_init);
    let hello = (!to_hello.is_empty()).then(|| Summary::of(&to_hello));
    let wall = Summary::of(&wall);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "runs": args.runs,
                "kernel": kernel.display().to_string(),
                "kernel_bytes": std::fs::metadata(&kernel)?.len(),
                "vcpus": args.vcpus,
                "mem_mib": args.mem,
                "instructions_to_init_m": init.json(),
                "instructions_to_hello_m": hello.map(|h| h.json()),
                "wall_ms": wall.json(),
            })
        );
    } else {
        println!(
            "kernel {} ({} runs, {} vCPU, {} MiB, QEMU TCG -icount shift=0)",
            kernel.display(),
            args.runs,
            args.vcpus,
            args.mem
        );
        println!(
            "  guest instructions to /init : p50 {:.1} M  max {:.1} M",
            init.p50, init.max
        );
        if let Some(h) = hello {
            println!("  guest instructions to hello : p50 {:.1} M  max {:.1} M", h.p50, h.max);
        }
        let until = if args.until_init { "/init" } else { "hello" };
        println!(
            "  wall, spawn QEMU -> {until:<6}  : p50 {:.0} ms  max {:.0} ms",
            wall.p50, wall.max
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::init_timestamp;

    #[test]
    fn reads_the_init_timestamp() {
        let log = "[    0.100000] foo\n[    0.301234] Run /init as init process\n";
        assert_eq!(init_timestamp(log), Some(0.301234));
        assert_eq!(init_timestamp("no such line"), None);
    }
}
