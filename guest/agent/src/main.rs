//! `guest-agent`: PID 1 in every Warren microVM.
//!
//! It mounts what the guest needs, reaps zombies, connects to the host
//! (vsock in production, a virtio console port under QEMU, a Unix socket in
//! host-side tests), says hello and serves the guest protocol: commands with
//! streamed output, files, HTTP requests to the agent's own server,
//! shutdown. Run as an ordinary process it skips
//! the PID 1 duties and serves the same protocol. With `--sandboxed` it is
//! PID 1 of a namespace sandbox that agentd's `warren-nsinit` prepared: the
//! sandbox already has its mounts and hostname, so only reaping and the
//! reboot(2) at shutdown (which ends the PID namespace) remain.

mod cmdline;
mod entrypoint;
mod exec;
mod files;
mod http;
mod init;
mod outbox;
mod reaper;
mod rootfs;
mod server;
mod transport;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nix::time::{clock_gettime, ClockId};
use warren_protocol::{Hello, PROTOCOL_VERSION};

use crate::cmdline::KernelOptions;
use crate::server::{Agent, End};
use crate::transport::Transport;

/// Serve the Warren guest protocol to the host.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Where to meet the host: vsock[:PORT], port:NAME or unix:PATH.
    /// Default: `warren.transport=` on the kernel command line, else vsock.
    #[arg(long)]
    transport: Option<Transport>,
    /// Serve one connection, then exit (for tests; ignored as PID 1).
    #[arg(long)]
    once: bool,
    /// Log filter (tracing-subscriber syntax).
    #[arg(long, default_value = "info")]
    log: String,
    /// Running as PID 1 of a namespace sandbox that agentd prepared: skip
    /// mounting and the hostname (the sandbox did them). Shutdown still
    /// ends in reboot(2), which ends the sandbox's PID namespace.
    #[arg(long)]
    sandboxed: bool,
    /// Image metadata naming the entrypoint to start and supervise.
    /// Default: /etc/warren/image.json when PID 1, none otherwise.
    #[arg(long)]
    image_metadata: Option<std::path::PathBuf>,
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let pid1 = std::process::id() == 1;
    // In a sandbox the mounts are the sandbox's: in particular no tmpfs on
    // /tmp, /run or /dev/shm, so whatever the session writes lands in the
    // overlay's upper directory, which agentd scrubs.
    let prepare = pid1 && !args.sandboxed;
    if prepare {
        init::mount_kernel_fs();
    }
    // Only readable once /proc is mounted.
    let kernel = KernelOptions::from_proc();
    if prepare {
        if let Some(dev) = &kernel.root {
            let fstype = kernel.rootfstype.as_deref().unwrap_or("ext4");
            // On failure the guest stays in the initramfs and still
            // answers: the host sees the missing entrypoint and the log.
            if let Err(e) = rootfs::switch(dev, fstype) {
                tracing::error!(error = %e, device = %dev, "cannot switch to the image's root; staying in the initramfs");
            }
        }
        init::mount_tmpfs();
        init::set_hostname(kernel.hostname.as_deref());
        init::loopback_up();
    } else if pid1 {
        init::default_path();
    }
    let transport = match args.transport.clone() {
        Some(t) => t,
        None => match kernel.transport.as_deref().map(str::parse::<Transport>) {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                tracing::error!("{e}; falling back to vsock");
                Transport::Vsock(warren_protocol::AGENT_VSOCK_PORT)
            }
            None => Transport::Vsock(warren_protocol::AGENT_VSOCK_PORT),
        },
    };
    let reaper = reaper::Reaper::start();
    let metadata = args
        .image_metadata
        .clone()
        .or_else(|| pid1.then(|| entrypoint::METADATA_PATH.into()));
    // Started before the host connection so that a slow entrypoint (the
    // interpreter preloading its libraries) warms up while the pool waits.
    let entrypoint = match metadata {
        Some(path) => entrypoint::Supervisor::start(&reaper, &path),
        None => entrypoint::Supervisor::none(),
    };
    let agent = Arc::new(Agent {
        reaper,
        running: exec::Running::default(),
        entrypoint,
    });
    let once = args.once && !pid1;
    loop {
        let conn = connect_retrying(&transport);
        let hello = hello();
        tracing::info!(
            transport = %transport,
            boot_time_ns = hello.boot_time_ns,
            kernel = %hello.kernel_release,
            "guest-agent ready"
        );
        match server::serve(&agent, conn, hello) {
            End::Shutdown => break,
            End::Disconnected(why) if once => {
                tracing::info!("{why}; exiting (--once)");
                return;
            }
            End::Disconnected(why) => tracing::warn!("{why}; reconnecting"),
        }
    }
    if pid1 {
        init::shutdown();
    }
}

fn hello() -> Hello {
    let boot_time_ns = clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0);
    let kernel_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    Hello {
        protocol_version: PROTOCOL_VERSION,
        agent: concat!("guest-agent ", env!("CARGO_PKG_VERSION")).into(),
        boot_time_ns,
        kernel_release,
        boot_stamps: Vec::new(),
    }
}

/// Connects, retrying with backoff: the host side (or the device) may not
/// be there yet, and PID 1 must never give up.
fn connect_retrying(t: &Transport) -> transport::Connection {
    let mut delay = Duration::from_millis(5);
    let mut attempts = 0u32;
    loop {
        match t.connect() {
            Ok(c) => return c,
            Err(e) => {
                attempts += 1;
                if attempts == 1 || attempts.is_power_of_two() {
                    tracing::info!(transport = %t, error = %e, attempts, "cannot reach the host yet");
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}
