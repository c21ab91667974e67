//! `agentctl`: the command-line client of agentd's API.
//!
//! Human-readable output by default, `--json` for scripts (the API's JSON,
//! unchanged). It reaches agentd over loopback TCP (`--url`, default
//! `http://127.0.0.1:8420`, or `$AGENTD_URL`) or its Unix socket
//! (`--socket PATH`). Errors say what agentd answered, or why it could not
//! be reached. `agentctl exec` exits with the command's own exit code.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// agentd's command-line client.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// agentd's address.
    #[arg(long, env = "AGENTD_URL", default_value = "http://127.0.0.1:8420", global = true)]
    url: String,
    /// agentd's Unix socket (instead of --url).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Is agentd up, and on which backend.
    Health,
    /// Warm pools: ready, booting, target per key.
    Pools,
    /// Prometheus metrics, as served.
    Metrics,
    /// Sessions.
    #[command(subcommand)]
    Session(SessionCmd),
    /// Run a command in a session: `agentctl exec ID -- ARGV…`.
    Exec {
        /// Session id.
        id: String,
        /// Stream output as it comes (default: print when done).
        #[arg(long)]
        stream: bool,
        /// Kill the command after this many seconds.
        #[arg(long)]
        timeout_s: Option<f64>,
        /// Working directory in the guest.
        #[arg(long)]
        cwd: Option<String>,
        /// Environment, KEY=VALUE (repeatable).
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Program and arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum SessionCmd {
    /// Create a session (a guest from the pool, or booted on demand).
    Create {
        /// Image.
        #[arg(long)]
        image: Option<String>,
        /// vCPUs.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
        memory_mib: Option<u32>,
        /// Idle timeout in seconds.
        #[arg(long)]
        idle_timeout_s: Option<u64>,
        /// Maximum life in seconds.
        #[arg(long)]
        max_lifetime_s: Option<u64>,
    },
    /// List sessions, running and ended.
    List,
    /// Show one session.
    Get {
        /// Session id.
        id: String,
    },
    /// End a session; prints its final metering and scrub.
    Delete {
        /// Session id.
        id: String,
    },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// One HTTP/1.1 connection to agentd, over TCP or the Unix socket.
struct Client {
    cli_url: String,
    socket: Option<PathBuf>,
}

impl Client {
    fn target(&self) -> String {
        match &self.socket {
            Some(s) => format!("unix:{}", s.display()),
            None => self.cli_url.clone(),
        }
    }

    async fn send(&self, method: &str, path: &str, body: Option<Value>) -> Result<Response<Incoming>> {
        let unreachable = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "cannot reach agentd at {}: {e} (is it running? `systemctl status agentd`, or `cargo xtask run`)",
                self.target()
            )
        };
        let (host, mut sender) = match &self.socket {
            Some(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| unreachable(&e))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
                tokio::spawn(conn);
                ("agentd".to_string(), sender)
            }
            None => {
                let rest = self
                    .cli_url
                    .strip_prefix("http://")
                    .with_context(|| format!("--url {}: only http:// URLs are served", self.cli_url))?;
                let host = rest.trim_end_matches('/').to_string();
                let s = tokio::net::TcpStream::connect(&host)
                    .await
                    .map_err(|e| unreachable(&e))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
                tokio::spawn(conn);
                (host, sender)
            }
        };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        sender.send_request(req).await.map_err(|e| unreachable(&e))
    }

    /// A request whose answer is one JSON document; API errors become
    /// `Err` with agentd's code and message.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let res = self.send(method, path, body).await?;
        let status = res.status();
        let bytes = res.into_body().collect().await?.to_bytes();
        let v: Value =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        if !status.is_success() {
            match (v["code"].as_str(), v["message"].as_str()) {
                (Some(code), Some(msg)) => bail!("agentd answered {status} {code}: {msg}"),
                _ => bail!("agentd answered {status}: {v}"),
            }
        }
        Ok(v)
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn ms(ns: &Value) -> String {
    format!("{:.1}", ns.as_f64().unwrap_or(0.0) / 1e6)
}

fn print_session(s: &Value) {
    println!("session   {}", s["id"].as_str().unwrap_or(""));
    println!(
        "state     {}{}",
        s["state"].as_str().unwrap_or(""),
        match s["end_reason"].as_str() {
            Some(r) => format!(" ({r})"),
            None => String::new(),
        }
    );
    println!("backend   {}", s["isolation"].as_str().unwrap_or(""));
    println!(
        "guest     {} ({} vCPU, {} MiB, image {}), pid {}",
        s["guest_id"].as_str().unwrap_or(""),
        s["vcpus"],
        s["memory_mib"],
        s["image"].as_str().unwrap_or(""),
        s["guest_pid"]
    );
    println!(
        "handout   {:.2} ms, {}",
        s["handout_ms"].as_f64().unwrap_or(0.0),
        if s["from_pool"] == true {
            "from the warm pool"
        } else {
            "booted on demand"
        }
    );
    println!(
        "metering  {} ms CPU, {:.6} GiB·s memory",
        ms(&s["metering"]["cpu_ns"]),
        s["metering"]["memory_gib_s"].as_f64().unwrap_or(0.0)
    );
    if s["scrub"].is_object() {
        println!(
            "scrub     {} bytes in {} ms",
            s["scrub"]["bytes"],
            ms(&s["scrub"]["ns"])
        );
    }
    println!(
        "timeouts  idle {} s, max life {} s",
        s["idle_timeout_s"], s["max_lifetime_s"]
    );
}

async fn run(cli: Cli) -> Result<i32> {
    let c = Client {
        cli_url: cli.url.clone(),
        socket: cli.socket.clone(),
    };
    match cli.cmd {
        Cmd::Health => {
            let h = c.call("GET", "/healthz", None).await?;
            if cli.json {
                print_json(&h);
            } else {
                println!(
                    "agentd {} at {}: {}; {}; {} sessions running, {} guests ready",
                    h["version"].as_str().unwrap_or(""),
                    c.target(),
                    h["status"].as_str().unwrap_or(""),
                    h["isolation"].as_str().unwrap_or(""),
                    h["sessions_running"],
                    h["pool_ready"]
                );
            }
        }
        Cmd::Pools => {
            let p = c.call("GET", "/v1/pools", None).await?;
            if cli.json {
                print_json(&p);
            } else {
                println!(
                    "{:<12} {:>5} {:>7} {:<10} {:>6} {:>5} {:>7} {:>8}",
                    "IMAGE", "VCPUS", "MIB", "BACKEND", "TARGET", "READY", "BOOTING", "FAILURES"
                );
                for k in p.as_array().into_iter().flatten() {
                    println!(
                        "{:<12} {:>5} {:>7} {:<10} {:>6} {:>5} {:>7} {:>8}",
                        k["image"].as_str().unwrap_or(""),
                        k["vcpus"],
                        k["memory_mib"],
                        k["backend"].as_str().unwrap_or(""),
                        k["target"],
                        k["ready"],
                        k["booting"],
                        k["boot_failures"]
                    );
                    if let Some(e) = k["last_error"].as_str() {
                        println!("  last boot failure: {e}");
                    }
                }
            }
        }
        Cmd::Metrics => {
            let res = c.send("GET", "/metrics", None).await?;
            let bytes = res.into_body().collect().await?.to_bytes();
            std::io::stdout().write_all(&bytes)?;
        }
        Cmd::Session(SessionCmd::Create {
            image,
            vcpus,
            memory_mib,
            idle_timeout_s,
            max_lifetime_s,
        }) => {
            let mut body = serde_json::Map::new();
            for (k, v) in [
                ("image", image.map(Value::from)),
                ("vcpus", vcpus.map(Value::from)),
                ("memory_mib", memory_mib.map(Value::from)),
                ("idle_timeout_s", idle_timeout_s.map(Value::from)),
                ("max_lifetime_s", max_lifetime_s.map(Value::from)),
            ] {
                if let Some(v) = v {
                    body.insert(k.into(), v);
                }
            }
            let s = c.call("POST", "/v1/sessions", Some(Value::Object(body))).await?;
            if cli.json {
                print_json(&s);
            } else {
                print_session(&s);
            }
        }
        Cmd::Session(SessionCmd::List) => {
            let l = c.call("GET", "/v1/sessions", None).await?;
            if cli.json {
                print_json(&l);
            } else {
                println!(
                    "{:<29} {:<8} {:<10} {:<8} {:>4} {:>6} {:>10} {:<14}",
                    "ID", "STATE", "BACKEND", "IMAGE", "VCPU", "MIB", "CPU_MS", "END_REASON"
                );
                for s in l.as_array().into_iter().flatten() {
                    println!(
                        "{:<29} {:<8} {:<10} {:<8} {:>4} {:>6} {:>10} {:<14}",
                        s["id"].as_str().unwrap_or(""),
                        s["state"].as_str().unwrap_or(""),
                        s["backend"].as_str().unwrap_or(""),
                        s["image"].as_str().unwrap_or(""),
                        s["vcpus"],
                        s["memory_mib"],
                        ms(&s["metering"]["cpu_ns"]),
                        s["end_reason"].as_str().unwrap_or("-")
                    );
                }
            }
        }
        Cmd::Session(SessionCmd::Get { id }) => {
            let s = c.call("GET", &format!("/v1/sessions/{id}"), None).await?;
            if cli.json {
                print_json(&s);
            } else {
                print_session(&s);
            }
        }
        Cmd::Session(SessionCmd::Delete { id }) => {
            let s = c.call("DELETE", &format!("/v1/sessions/{id}"), None).await?;
            if cli.json {
                print_json(&s);
            } else {
                print_session(&s);
            }
        }
        Cmd::Exec {
            id,
            stream,
            timeout_s,
            cwd,
            env,
            argv,
        } => {
            let body = json!({
                "argv": argv,
                "env": env.into_iter().map(|(k, v)| (k, Value::from(v))).collect::<serde_json::Map<String, Value>>(),
                "cwd": cwd,
                "timeout_s": timeout_s,
            });
            return exec(&c, &id, body, stream, cli.json).await;
        }
    }
    Ok(0)
}

/// Runs a command; returns its exit code (128 + signal when killed).
async fn exec(c: &Client, id: &str, body: Value, stream: bool, json_out: bool) -> Result<i32> {
    let code_of = |v: &Value| -> i32 {
        match (v["exit_code"].as_i64(), v["signal"].as_i64()) {
            (Some(c), _) => c as i32,
            (None, Some(s)) => 128 + s as i32,
            _ => 1,
        }
    };
    if !stream {
        let r = c.call("POST", &format!("/v1/sessions/{id}/exec"), Some(body)).await?;
        if json_out {
            print_json(&r);
        } else {
            print!("{}", r["stdout"].as_str().unwrap_or(""));
            eprint!("{}", r["stderr"].as_str().unwrap_or(""));
            if r["timed_out"] == true {
                eprintln!("agentctl: the command was killed at its timeout");
            }
        }
        return Ok(code_of(&r));
    }
    let res = c
        .send("POST", &format!("/v1/sessions/{id}/exec/stream"), Some(body))
        .await?;
    let status = res.status();
    let mut body = res.into_body();
    if !status.is_success() {
        let bytes = body.collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        bail!(
            "agentd answered {status} {}: {}",
            v["code"].as_str().unwrap_or(""),
            v["message"].as_str().unwrap_or("")
        );
    }
    let mut pending = Vec::new();
    let mut code = 1;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let ev: Value = serde_json::from_slice(&line).context("agentd sent a line that is not JSON")?;
            if json_out {
                println!("{ev}");
            }
            match ev["type"].as_str() {
                Some("stdout") if !json_out => {
                    print!("{}", ev["data"].as_str().unwrap_or(""));
                    std::io::stdout().flush()?;
                }
                Some("stderr") if !json_out => eprint!("{}", ev["data"].as_str().unwrap_or("")),
                Some("exit") => code = code_of(&ev),
                Some("error") => bail!(
                    "the command failed: {} ({})",
                    ev["message"].as_str().unwrap_or(""),
                    ev["code"].as_str().unwrap_or("")
                ),
                _ => {}
            }
        }
    }
    Ok(code)
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentctl: cannot start: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(24 * 3600), run(cli))
            .await
            .unwrap_or_else(|_| bail!("gave up after 24 h"))
    });
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("agentctl: {e:#}");
            std::process::exit(1);
        }
    }
}
