//! `agentd`: the host daemon. Reads its configuration (or uses the embedded
//! defaults), picks the isolation backend this host can run, cleans what a
//! previous run left, serves the control API on loopback TCP and a Unix
//! socket, tells systemd it is ready, and drains on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentd::backend::Backends;
use agentd::config::{BackendChoice, BackendKind, Config};
use agentd::daemon::Daemon;
use agentd::sandbox::SandboxConfig;
use agentd::store::Store;
use anyhow::{Context, Result};
use clap::Parser;
use sd_notify::NotifyState;

/// Warren's host daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration (every key optional; see agentd.example.toml).
    /// Without it, the embedded defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// API address (overrides `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// State directory (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Runtime directory (overrides `runtime_dir`).
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Backend: auto, microvm or namespace (overrides `backend`).
    #[arg(long)]
    backend: Option<String>,
    /// Log filter (tracing-subscriber syntax); `RUST_LOG` also works.
    #[arg(long, default_value = "info")]
    log: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| args.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let cfg = load_config(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("agentd")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(cfg))
}

fn load_config(args: &Args) -> Result<Config> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => {
            tracing::info!("no --config: using the embedded defaults");
            Config::default()
        }
    };
    if let Some(l) = &args.listen {
        cfg.listen = l.clone();
    }
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(d) = &args.runtime_dir {
        cfg.runtime_dir = d.clone();
    }
    if let Some(b) = &args.backend {
        cfg.backend = match b.as_str() {
            "auto" => BackendChoice::Auto,
            "microvm" => BackendChoice::Microvm,
            "namespace" => BackendChoice::Namespace,
            other => anyhow::bail!("--backend {other:?}: expected auto, microvm or namespace"),
        };
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Picks the backend, saying why when it is not `microvm`.
fn choose_backend(cfg: &Config) -> BackendKind {
    let host = vmm::host::HostVirt::detect();
    match cfg.backend {
        BackendChoice::Microvm => {
            if !host.runs_linux_natively() {
                tracing::warn!(
                    "backend = microvm, but {}: Linux guests will run under instruction emulation",
                    host.describe()
                );
            }
            BackendKind::Microvm
        }
        BackendChoice::Namespace => {
            tracing::warn!("backend = namespace: {}", BackendKind::Namespace.isolation());
            BackendKind::Namespace
        }
        BackendChoice::Auto if host.runs_linux_natively() => BackendKind::Microvm,
        BackendChoice::Auto => {
            let kind = cfg.fallback_backend;
            tracing::warn!(
                "this host's KVM cannot run the guest kernel at native speed ({}); using the {} backend \
                 (fallback_backend): {}",
                host.describe(),
                kind.as_str(),
                kind.isolation()
            );
            kind
        }
    }
}

async fn run(cfg: Config) -> Result<()> {
    for dir in [&cfg.data_dir, &cfg.runtime_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let kind = choose_backend(&cfg);
    let store = Store::open(&cfg.data_dir)?;
    let sandbox_cfg = SandboxConfig {
        nsinit: Config::helper_binary(&cfg.nsinit_binary, "warren-nsinit"),
        runtime_dir: cfg.runtime_dir.clone(),
    };
    let report = agentd::recovery::recover(&store, &cfg.runtime_dir, &sandbox_cfg)?;
    if report != Default::default() {
        tracing::warn!(
            killed = report.processes_killed,
            cleaned = report.guests_cleaned,
            closed = report.sessions_closed,
            errors = ?report.errors,
            "cleaned up after the previous run"
        );
    }
    let backends = Backends::new(&cfg, kind, Duration::from_secs(cfg.boot_timeout_s)).map_err(anyhow::Error::msg)?;
    let listeners = control_api::Listeners::bind(Some(&cfg.listen), Some(&cfg.socket_path())).await?;
    let addr = listeners.tcp_addr();
    let socket = cfg.socket_path();
    let grace = Duration::from_secs(cfg.drain_grace_s);
    let daemon = Daemon::start(cfg, backends, store);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(control_api::serve(Arc::new(daemon.clone()), listeners, stop_rx, grace));
    tracing::info!(
        tcp = ?addr,
        unix = %socket.display(),
        backend = kind.as_str(),
        "agentd serving the API"
    );
    // Type=notify: ready once the API listens.
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
    wait_for_stop().await;
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    daemon.drain().await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    tracing::info!("agentd stopped");
    Ok(())
}

async fn wait_for_stop() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop agentd with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
}
