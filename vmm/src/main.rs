//! `vmm`: runs one microVM until the guest ends it or the VMM is told to
//! stop, then scrubs guest memory and reports.
//!
//! Exit codes: 0 when the guest reset or powered off, or on SIGTERM/SIGINT;
//! 1 when a vCPU failed; 2 when the configuration or host is unusable.
//! The last line on stdout is a JSON report of how the VM ended.
//!
//! `#![no_main]`: std's runtime start-up queries the main thread's stack
//! bounds, which glibc answers by reading /proc/self/maps — measured at
//! 2.5 ms on a PVM host, a tenth of a cold start. The C `main` below skips
//! it; everything else in std works the same.
#![no_main]

use std::path::PathBuf;

use clap::Parser;
use vmm::config::{VmConfig, DEFAULT_CMDLINE};
use vmm::host::HostVirt;
use vmm::runner;

/// Run one Warren microVM.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// JSON configuration file (the flags below are then ignored).
    #[arg(long, conflicts_with_all = ["kernel"])]
    config: Option<PathBuf>,
    /// 64-bit ELF kernel.
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Host side of virtio-vsock (Unix socket path).
    #[arg(long)]
    vsock_socket: Option<PathBuf>,
    /// Control socket path.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Read-only base image (the first virtio-blk disk).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Writable scratch disk (the second virtio-blk disk; needs --disk).
    #[arg(long)]
    scratch_disk: Option<PathBuf>,
    /// Disk I/O: auto (io_uring, else synchronous with a warning), io_uring or sync.
    #[arg(long, default_value = "auto")]
    disk_io: vmm::config::DiskIo,
    /// Emulate COM1, output to stderr.
    #[arg(long)]
    serial: bool,
    /// Print boot-timer stamps on stdout as they arrive.
    #[arg(long)]
    boot_timer: bool,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "warn")]
    log: String,
}

/// C entry point (see the crate comment for why not `fn main`).
#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    let code = real_main();
    // Flush stdout: the last line is the report a parent waits for.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    code
}

fn real_main() -> libc::c_int {
    let args = Args::parse();
    // A plain level, not an EnvFilter: the filter's regex engine would
    // add a few hundred KiB of resident text to every VMM process.
    let level = args.log.parse::<tracing::Level>().unwrap_or(tracing::Level::WARN);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let cfg = match &args.config {
        Some(path) => match VmConfig::from_json_file(path) {
            Ok(c) => c,
            Err(e) => return fail(2, &e.to_string()),
        },
        None => VmConfig {
            kernel: args.kernel.clone().expect("clap requires --kernel"),
            initramfs: args.initramfs,
            vcpus: args.vcpus,
            mem_mib: args.mem_mib,
            cmdline: args.cmdline,
            vsock_socket: args.vsock_socket,
            control_socket: args.control_socket,
            disk: args.disk,
            scratch_disk: args.scratch_disk,
            disk_io: args.disk_io,
            serial: args.serial,
            boot_timer: args.boot_timer,
        },
    };
    let host = HostVirt::detect();
    if host.pvm && !host.hardware_virt {
        tracing::warn!("{}", host.describe());
    }
    runner::block_exit_signals();
    let report_stamps = cfg.boot_timer;
    let result = runner::run(&cfg, |s| {
        if report_stamps {
            println!(
                "{}",
                serde_json::json!({"event": "boot_timer", "value": s.value, "monotonic_ns": s.monotonic_ns})
            );
        }
    });
    match result {
        Ok(out) => {
            let code: libc::c_int = if out.reason.is_clean() { 0 } else { 1 };
            println!(
                "{}",
                serde_json::json!({
                    "event": "exit",
                    "reason": out.reason.name(),
                    "detail": format!("{:?}", out.reason),
                    "exit_code": code,
                    "build_ns": out.build_ns,
                    "scrub": out.scrub,
                    "disks": out.disks.iter().map(|d| d.report()).collect::<Vec<_>>(),
                })
            );
            code
        }
        Err(e) => fail(2, &e.to_string()),
    }
}

fn fail(code: libc::c_int, msg: &str) -> libc::c_int {
    eprintln!("vmm: {msg}");
    println!(
        "{}",
        serde_json::json!({"event": "error", "error": msg, "exit_code": code})
    );
    code
}
