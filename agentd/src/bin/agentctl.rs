//! `agentctl`: the command-line client of agentd's API.
//!
//! Human-readable output by default, `--json` for scripts (the API's JSON,
//! unchanged). It reaches agentd over loopback TCP (`--url`, default
//! `http://127.0.0.1:8420`, or `$AGENTD_URL`) or its Unix socket
//! (`--socket PATH`). Errors say what agentd answered, or why it could not
//! be reached. `agentctl exec` and `agentctl ci exec` exit with the
//! command's own exit code.
//!
//! - `health`, `pools`, `metrics`
//! - `session create|list|get|delete`, `exec ID -- ARGV…`
//! - `runtime create|list|get|versions|add-version|pin|delete`
//! - `image list|import PATH --name NAME|delete NAME`: OCI images (an OCI
//!   layout directory or a `docker save` tarball on agentd's host)
//! - `invoke RUNTIME`: the agent's answer streamed to stdout as it comes,
//!   its `X-Session-Id` on stderr (pass it back with `--session-id`)
//! - `ci start|exec|code|read|write|ls|rm|task-start|task|task-stop|stop|tool`:
//!   the code interpreter's tools

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::{Args, Parser, Subcommand};
use control_api::body::{full, ChannelBody, ResponseBody};
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};

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
    /// Agent runtimes: immutable versions and named endpoints.
    #[command(subcommand)]
    Runtime(RuntimeCmd),
    /// Images: list, import an OCI image, delete an imported one.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Invoke a runtime's agent; its answer is streamed to stdout as it
    /// arrives, its X-Session-Id printed to stderr. The body is `--data`,
    /// `--file`, or standard input (`-`); none sends an empty body.
    Invoke {
        /// Runtime name.
        runtime: String,
        /// Endpoint (default DEFAULT, the latest version).
        #[arg(long)]
        endpoint: Option<String>,
        /// Session id (33–256 characters) to reach an earlier invocation's
        /// session; a new one is generated when absent.
        #[arg(long)]
        session_id: Option<String>,
        /// The body, inline.
        #[arg(long, conflicts_with_all = ["file", "stdin"])]
        data: Option<String>,
        /// The body, from a file (`-`: standard input), streamed.
        #[arg(long, conflicts_with = "stdin")]
        file: Option<PathBuf>,
        /// `-`: the body from standard input, streamed.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(["-"]))]
        stdin: Option<String>,
        /// Extra header, `NAME:VALUE` (repeatable), e.g. `--header traceparent:00-…`.
        /// The content type defaults to application/json.
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
    },
    /// The code interpreter: sessions whose guest runs tools.
    #[command(subcommand)]
    Ci(CiCmd),
}

/// What a runtime version runs.
#[derive(Args, Debug, Clone, Default)]
struct SpecArgs {
    /// Image.
    #[arg(long)]
    image: Option<String>,
    /// vCPUs per session.
    #[arg(long)]
    vcpus: Option<u32>,
    /// Memory per session in MiB.
    #[arg(long)]
    memory_mib: Option<u32>,
    /// Environment of the agent, KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Idle timeout of its sessions in seconds.
    #[arg(long)]
    idle_timeout_s: Option<u64>,
    /// Maximum life of its sessions in seconds.
    #[arg(long)]
    max_lifetime_s: Option<u64>,
    /// The agent server to start in the guest: program and arguments
    /// (takes every argument after it, so give it last).
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    command: Option<Vec<String>>,
}

impl SpecArgs {
    /// The JSON fields given (absent ones take the node's defaults).
    fn fields(self) -> Map<String, Value> {
        let mut m = Map::new();
        let env: Map<String, Value> = self.env.into_iter().map(|(k, v)| (k, Value::from(v))).collect();
        for (k, v) in [
            ("image", self.image.map(Value::from)),
            ("vcpus", self.vcpus.map(Value::from)),
            ("memory_mib", self.memory_mib.map(Value::from)),
            ("env", (!env.is_empty()).then_some(Value::Object(env))),
            ("idle_timeout_s", self.idle_timeout_s.map(Value::from)),
            ("max_lifetime_s", self.max_lifetime_s.map(Value::from)),
            ("command", self.command.map(Value::from)),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        }
        m
    }
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// List the images sessions and runtimes can name.
    List,
    /// Import an OCI image layout directory or a `docker save` tarball
    /// (read by agentd: it must be on agentd's host).
    Import {
        /// The layout directory or tarball.
        path: PathBuf,
        /// The image's name: `[a-z0-9][a-z0-9._-]{0,62}`.
        #[arg(long)]
        name: String,
    },
    /// Delete an imported image no session or pool uses.
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum RuntimeCmd {
    /// Create a runtime and its version 1.
    Create {
        /// Name: a letter, then up to 47 letters, digits, '-' or '_'.
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// List runtimes.
    List,
    /// Show one runtime and its endpoints.
    Get {
        /// Runtime name.
        name: String,
    },
    /// List a runtime's versions, oldest first.
    Versions {
        /// Runtime name.
        name: String,
    },
    /// Add an immutable version (DEFAULT then serves it).
    AddVersion {
        /// Runtime name.
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Point a named endpoint at a version (roll forward or back).
    Pin {
        /// Runtime name.
        name: String,
        /// Endpoint name (not DEFAULT, which follows the latest version).
        endpoint: String,
        /// Version number.
        version: u32,
    },
    /// Delete a runtime, its versions and endpoints.
    Delete {
        /// Runtime name.
        name: String,
        /// End its running sessions instead of refusing.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum CiCmd {
    /// Start a code-interpreter session.
    Start {
        /// Image.
        #[arg(long)]
        image: Option<String>,
        /// Session life in seconds.
        #[arg(long)]
        timeout_s: Option<u64>,
    },
    /// Run a shell command (executeCommand), output streamed; exits with its
    /// exit code. The words are joined with spaces and run by `sh -c`.
    Exec {
        /// Session id.
        id: String,
        /// Kill it after this many seconds.
        #[arg(long)]
        timeout_s: Option<f64>,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Run code (executeCode), output streamed; exits with its exit code.
    Code {
        /// Session id.
        id: String,
        /// Language.
        #[arg(long, default_value = "sh")]
        language: String,
        /// Kill it after this many seconds.
        #[arg(long)]
        timeout_s: Option<f64>,
        /// The program text.
        code: String,
    },
    /// Print files (readFiles); binary files are written as they are.
    Read {
        /// Session id.
        id: String,
        /// Paths (relative to /workspace).
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Write a file (writeFiles); TEXT `-` reads standard input.
    Write {
        /// Session id.
        id: String,
        /// Path (relative to /workspace); parents are created.
        path: String,
        /// Content.
        text: String,
    },
    /// List a directory (listFiles).
    Ls {
        /// Session id.
        id: String,
        /// Directory (default /workspace).
        dir: Option<String>,
    },
    /// Remove files or directories (removeFiles).
    Rm {
        /// Session id.
        id: String,
        /// Paths.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Start a background command (startCommandExecution); prints its task id.
    TaskStart {
        /// Session id.
        id: String,
        /// The command (words joined with spaces, run by `sh -c`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Show a background command (getTask).
    Task {
        /// Session id.
        id: String,
        /// Task id.
        task: String,
    },
    /// Stop a background command (stopTask).
    TaskStop {
        /// Session id.
        id: String,
        /// Task id.
        task: String,
    },
    /// End a code-interpreter session.
    Stop {
        /// Session id.
        id: String,
    },
    /// Run any tool with raw JSON arguments; prints the result's JSON.
    Tool {
        /// Session id.
        id: String,
        /// Tool name.
        name: String,
        /// Arguments, a JSON object.
        args: String,
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
        /// Run a runtime's version (which then gives every setting above).
        #[arg(long)]
        runtime: Option<String>,
        /// The runtime's endpoint (default DEFAULT).
        #[arg(long, requires = "runtime")]
        endpoint: Option<String>,
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

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?} is not NAME:VALUE")),
    }
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
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let headers = [("content-type".to_string(), "application/json".to_string())];
        self.send_with(method, path, &headers, full(body)).await
    }

    /// A request with any headers and body (a streamed one included).
    async fn send_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: ResponseBody,
    ) -> Result<Response<Incoming>> {
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
        let mut req = Request::builder().method(method).uri(path).header("host", host);
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(body)
            .with_context(|| format!("{method} {path}: not a valid request"))?;
        sender.send_request(req).await.map_err(|e| unreachable(&e))
    }

    /// A request whose answer is one JSON document; API errors become
    /// `Err` with agentd's code and message.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let res = self.send(method, path, body).await?;
        if !res.status().is_success() {
            return Err(api_error(res).await);
        }
        let bytes = res.into_body().collect().await?.to_bytes();
        let v: Value =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Ok(v)
    }

    /// Runs one code-interpreter tool.
    async fn tool(&self, id: &str, name: &str, arguments: Value) -> Result<Value> {
        let body = json!({"name": name, "arguments": arguments});
        self.call(
            "POST",
            &format!("/v1/code-interpreter/sessions/{id}/invoke"),
            Some(body),
        )
        .await
    }
}

/// agentd's error answer, as an error naming its status, code and message.
async fn api_error(res: Response<Incoming>) -> anyhow::Error {
    let status = res.status();
    let bytes = match res.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return anyhow::anyhow!("agentd answered {status}, then the connection failed: {e}"),
    };
    let v: Value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    match (v["code"].as_str(), v["message"].as_str()) {
        (Some(code), Some(msg)) => anyhow::anyhow!("agentd answered {status} {code}: {msg}"),
        _ => anyhow::anyhow!("agentd answered {status}: {v}"),
    }
}

/// Reads a newline-delimited JSON stream, one event at a time as it comes.
async fn ndjson(res: Response<Incoming>, mut on_event: impl FnMut(Value) -> Result<()>) -> Result<()> {
    let mut body = res.into_body();
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            on_event(serde_json::from_slice(&line).context("agentd sent a line that is not JSON")?)?;
        }
    }
    Ok(())
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
                        k["vcpus"].to_string(),
                        k["memory_mib"].to_string(),
                        k["backend"].as_str().unwrap_or(""),
                        k["target"].to_string(),
                        k["ready"].to_string(),
                        k["booting"].to_string(),
                        k["boot_failures"].to_string()
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
            runtime,
            endpoint,
        }) => {
            let mut body = serde_json::Map::new();
            for (k, v) in [
                ("image", image.map(Value::from)),
                ("vcpus", vcpus.map(Value::from)),
                ("memory_mib", memory_mib.map(Value::from)),
                ("idle_timeout_s", idle_timeout_s.map(Value::from)),
                ("max_lifetime_s", max_lifetime_s.map(Value::from)),
                ("runtime", runtime.map(Value::from)),
                ("endpoint", endpoint.map(Value::from)),
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
                        s["vcpus"].to_string(),
                        s["memory_mib"].to_string(),
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
        Cmd::Runtime(cmd) => runtime(&c, cmd, cli.json).await?,
        Cmd::Image(cmd) => image(&c, cmd, cli.json).await?,
        Cmd::Invoke {
            runtime,
            endpoint,
            session_id,
            data,
            file,
            stdin,
            headers,
        } => {
            let input = match (data, file, stdin) {
                (Some(d), _, _) => Input::Data(d),
                (None, Some(f), _) if f.as_os_str() == "-" => Input::Stdin,
                (None, Some(f), _) => Input::File(f),
                (None, None, Some(_)) => Input::Stdin,
                (None, None, None) => Input::Data(String::new()),
            };
            return invoke(&c, &runtime, endpoint, session_id, input, headers).await;
        }
        Cmd::Ci(cmd) => return ci(&c, cmd, cli.json).await,
    }
    Ok(0)
}

fn print_runtime(r: &Value) {
    println!("runtime   {}", r["name"].as_str().unwrap_or(""));
    println!("created   {}", when(&r["created_at_ms"]));
    println!("latest    v{}", r["latest_version"]);
    println!("endpoints {}", endpoints(&r["endpoints"]));
}

fn endpoints(e: &Value) -> String {
    e.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}→v{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn command_line(c: &Value) -> String {
    match c.as_array() {
        Some(a) => a.iter().map(|x| x.as_str().unwrap_or("")).collect::<Vec<_>>().join(" "),
        None => "(the image's)".into(),
    }
}

fn print_version(v: &Value) {
    println!("runtime   {} v{}", v["runtime"].as_str().unwrap_or(""), v["version"]);
    println!("created   {}", when(&v["created_at_ms"]));
    println!(
        "guest     image {}, {} vCPU, {} MiB",
        v["image"].as_str().unwrap_or(""),
        v["vcpus"],
        v["memory_mib"]
    );
    println!(
        "timeouts  idle {} s, max life {} s",
        v["idle_timeout_s"], v["max_lifetime_s"]
    );
    println!("command   {}", command_line(&v["command"]));
    for (k, val) in v["env"].as_object().into_iter().flatten() {
        println!("env       {k}={}", val.as_str().unwrap_or(""));
    }
}

/// Unix ms as UTC `YYYY-MM-DD HH:MM:SS`.
fn when(ms: &Value) -> String {
    let Some(ms) = ms.as_u64() else {
        return "-".into();
    };
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn print_image(i: &Value) {
    let size = i["rootfs_bytes"]
        .as_u64()
        .map(|b| format!("{:.1} MiB", b as f64 / f64::from(1 << 20)))
        .unwrap_or_else(|| "-".into());
    let argv = i["metadata"]["argv"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    println!(
        "{:<24} {:<9} {:>10}  {}",
        i["name"].as_str().unwrap_or(""),
        i["origin"].as_str().unwrap_or(""),
        size,
        argv
    );
}

async fn image(c: &Client, cmd: ImageCmd, json_out: bool) -> Result<()> {
    let v = match cmd {
        ImageCmd::List => c.call("GET", "/v1/images", None).await?,
        ImageCmd::Import { path, name } => {
            // agentd reads the path itself: make it absolute here.
            let path = std::fs::canonicalize(&path).with_context(|| format!("{}", path.display()))?;
            let body = json!({"name": name, "path": path.display().to_string()});
            c.call("POST", "/v1/images", Some(body)).await?
        }
        ImageCmd::Delete { name } => c.call("DELETE", &format!("/v1/images/{name}"), None).await?,
    };
    if json_out {
        print_json(&v);
        return Ok(());
    }
    println!("{:<24} {:<9} {:>10}  ENTRYPOINT", "NAME", "ORIGIN", "ROOTFS");
    match v.as_array() {
        Some(list) => list.iter().for_each(print_image),
        None => print_image(&v),
    }
    Ok(())
}

async fn runtime(c: &Client, cmd: RuntimeCmd, json_out: bool) -> Result<()> {
    let out = |v: &Value, human: fn(&Value)| {
        if json_out {
            print_json(v);
        } else {
            human(v);
        }
    };
    match cmd {
        RuntimeCmd::Create { name, spec } => {
            let mut body = spec.fields();
            body.insert("name".into(), Value::from(name));
            let r = c.call("POST", "/v1/runtimes", Some(Value::Object(body))).await?;
            out(&r, print_runtime);
        }
        RuntimeCmd::List => {
            let l = c.call("GET", "/v1/runtimes", None).await?;
            out(&l, |l| {
                println!("{:<24} {:>6} {:<24} ENDPOINTS", "NAME", "LATEST", "CREATED");
                for r in l.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:>6} {:<24} {}",
                        r["name"].as_str().unwrap_or(""),
                        format!("v{}", r["latest_version"]),
                        when(&r["created_at_ms"]),
                        endpoints(&r["endpoints"])
                    );
                }
            });
        }
        RuntimeCmd::Get { name } => {
            let r = c.call("GET", &format!("/v1/runtimes/{name}"), None).await?;
            out(&r, print_runtime);
        }
        RuntimeCmd::Versions { name } => {
            let l = c.call("GET", &format!("/v1/runtimes/{name}/versions"), None).await?;
            out(&l, |l| {
                println!(
                    "{:>7} {:<10} {:>4} {:>6} {:>8} {:>8} {:<24} COMMAND",
                    "VERSION", "IMAGE", "VCPU", "MIB", "IDLE_S", "LIFE_S", "CREATED"
                );
                for v in l.as_array().into_iter().flatten() {
                    println!(
                        "{:>7} {:<10} {:>4} {:>6} {:>8} {:>8} {:<24} {}",
                        format!("v{}", v["version"]),
                        v["image"].as_str().unwrap_or(""),
                        v["vcpus"].to_string(),
                        v["memory_mib"].to_string(),
                        v["idle_timeout_s"].to_string(),
                        v["max_lifetime_s"].to_string(),
                        when(&v["created_at_ms"]),
                        command_line(&v["command"])
                    );
                }
            });
        }
        RuntimeCmd::AddVersion { name, spec } => {
            let v = c
                .call(
                    "POST",
                    &format!("/v1/runtimes/{name}/versions"),
                    Some(Value::Object(spec.fields())),
                )
                .await?;
            out(&v, print_version);
        }
        RuntimeCmd::Pin {
            name,
            endpoint,
            version,
        } => {
            let r = c
                .call(
                    "PUT",
                    &format!("/v1/runtimes/{name}/endpoints/{endpoint}"),
                    Some(json!({ "version": version })),
                )
                .await?;
            out(&r, print_runtime);
        }
        RuntimeCmd::Delete { name, force } => {
            let q = if force { "?force=true" } else { "" };
            let r = c.call("DELETE", &format!("/v1/runtimes/{name}{q}"), None).await?;
            out(&r, |r| {
                println!(
                    "deleted runtime {} (versions 1..={}; endpoints {})",
                    r["name"].as_str().unwrap_or(""),
                    r["latest_version"],
                    endpoints(&r["endpoints"])
                )
            });
        }
    }
    Ok(())
}

/// Where an invocation's body comes from.
enum Input {
    Data(String),
    File(PathBuf),
    Stdin,
}

/// Sends an invocation and streams the agent's answer to stdout as it
/// arrives. Exit code 0 when the agent answered 2xx, 1 otherwise.
async fn invoke(
    c: &Client,
    runtime: &str,
    endpoint: Option<String>,
    session_id: Option<String>,
    input: Input,
    extra: Vec<(String, String)>,
) -> Result<i32> {
    let mut path = format!("/v1/runtimes/{runtime}/invocations");
    if let Some(e) = endpoint {
        path.push_str(&format!("?endpoint={e}"));
    }
    let mut headers = Vec::new();
    if !extra.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        headers.push(("content-type".to_string(), "application/json".to_string()));
    }
    if let Some(s) = session_id {
        headers.push(("x-session-id".to_string(), s));
    }
    headers.extend(extra);
    let body = match input {
        Input::Data(d) => full(d),
        Input::File(p) => {
            let f = std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
            if let Ok(m) = f.metadata() {
                headers.push(("content-length".to_string(), m.len().to_string()));
            }
            stream_body(f)
        }
        Input::Stdin => stream_body(std::io::stdin()),
    };
    let res = c.send_with("POST", &path, &headers, body).await?;
    let status = res.status();
    let sid = res
        .headers()
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Some(sid) = sid else {
        // No session id: agentd answered before any agent did.
        if status.is_success() {
            bail!("agentd answered {status} without an X-Session-Id");
        }
        return Err(api_error(res).await);
    };
    eprintln!("X-Session-Id: {sid}");
    let mut body = res.into_body();
    let mut stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.context("the agent's answer ended early")?.into_data() else {
            continue;
        };
        match stdout.write_all(&data).and_then(|()| stdout.flush()) {
            Ok(()) => {}
            // The reader went away (`| head`): not an error of ours.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(i32::from(!status.is_success())),
            Err(e) => return Err(e.into()),
        }
    }
    if !status.is_success() {
        eprintln!("agentctl: the agent answered {status}");
        return Ok(1);
    }
    Ok(0)
}

/// A request body read from `r` piece by piece as the request goes (on a
/// thread of its own: reading a pipe or a file blocks).
fn stream_body(mut r: impl std::io::Read + Send + 'static) -> ResponseBody {
    let (tx, body) = ChannelBody::channel(4);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Dropping the sender ends the body short.
                    eprintln!("agentctl: reading the body: {e}");
                    return;
                }
            }
        }
    });
    body
}

/// The exit code a command tool's result stands for.
fn tool_exit_code(r: &Value) -> i32 {
    let sc = &r["structuredContent"];
    match sc["exitCode"].as_i64() {
        Some(c) => c as i32,
        None if sc["timedOut"] == true => {
            eprintln!("agentctl: the command was killed at its timeout");
            124
        }
        None => {
            if let Some(e) = sc["error"].as_str() {
                eprintln!("agentctl: {e}");
            }
            1
        }
    }
}

/// A tool result that failed (for tools other than commands, whose own
/// exit code says so): its text on stderr, exit code 1.
fn tool_failed(r: &Value) -> Option<i32> {
    if r["isError"] != true {
        return None;
    }
    let text = r["structuredContent"]["error"]
        .as_str()
        .map(str::to_string)
        .or_else(|| r["content"][0]["text"].as_str().map(str::to_string))
        .unwrap_or_else(|| r.to_string());
    eprintln!("agentctl: {text}");
    Some(1)
}

fn print_task(r: &Value) {
    let t = &r["structuredContent"];
    println!("task      {}", t["taskId"].as_str().unwrap_or(""));
    println!(
        "status    {}{}",
        t["status"].as_str().unwrap_or(""),
        match t["exitCode"].as_i64() {
            Some(c) => format!(" (exit code {c})"),
            None => String::new(),
        }
    );
    println!("started   {}", when(&t["startedAt"]));
    if let Some(s) = t["executionTime"].as_f64() {
        println!("ran       {s:.3} s");
    }
    for (name, key) in [("stdout", "stdout"), ("stderr", "stderr")] {
        if let Some(text) = t[key].as_str().filter(|s| !s.is_empty()) {
            println!("--- {name} ---");
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
        }
    }
}

/// Runs a command tool over the streaming route: output printed as it
/// comes; returns the command's exit code.
async fn ci_command(c: &Client, id: &str, name: &str, arguments: Value, json_out: bool) -> Result<i32> {
    let body = json!({"name": name, "arguments": arguments});
    let res = c
        .send(
            "POST",
            &format!("/v1/code-interpreter/sessions/{id}/invoke/stream"),
            Some(body),
        )
        .await?;
    if !res.status().is_success() {
        return Err(api_error(res).await);
    }
    let mut result = None;
    ndjson(res, |ev| {
        match ev["type"].as_str() {
            Some("stdout") if !json_out => {
                print!("{}", ev["data"].as_str().unwrap_or(""));
                std::io::stdout().flush()?;
            }
            Some("stderr") if !json_out => eprint!("{}", ev["data"].as_str().unwrap_or("")),
            Some("result") => result = Some(ev["result"].clone()),
            _ => {}
        }
        Ok(())
    })
    .await?;
    let r = result.context("the stream ended without a result")?;
    if json_out {
        print_json(&r);
        return Ok(tool_exit_code(&r));
    }
    // Interpreted code (python, javascript): the last expression's value,
    // the figures it showed, and the traceback of what it raised.
    let sc = &r["structuredContent"];
    if sc.get("language").is_some() {
        if let Some(v) = sc["result"].as_str() {
            println!("{v}");
        }
        for f in sc["files"].as_array().into_iter().flatten() {
            eprintln!(
                "agentctl: file {} ({})",
                f["path"].as_str().unwrap_or(""),
                f["mimeType"].as_str().unwrap_or("")
            );
        }
        if let Some(tb) = sc["error"]["traceback"].as_str().filter(|t| !t.is_empty()) {
            eprint!("{tb}");
        }
        return Ok(if r["isError"] == true { 1 } else { 0 });
    }
    Ok(tool_exit_code(&r))
}

async fn ci(c: &Client, cmd: CiCmd, json_out: bool) -> Result<i32> {
    let done = |r: &Value, human: &mut dyn FnMut(&Value)| -> i32 {
        if json_out {
            print_json(r);
            i32::from(r["isError"] == true)
        } else if let Some(code) = tool_failed(r) {
            code
        } else {
            human(r);
            0
        }
    };
    let timeout = |t: Option<f64>| t.map(Value::from).unwrap_or(Value::Null);
    Ok(match cmd {
        CiCmd::Start { image, timeout_s } => {
            let body = json!({"image": image, "timeout_s": timeout_s});
            let r = c.call("POST", "/v1/code-interpreter/sessions", Some(body)).await?;
            if json_out {
                print_json(&r);
            } else {
                print_session(&r["session"]);
                println!("workspace {}", r["workspace"].as_str().unwrap_or(""));
            }
            0
        }
        CiCmd::Exec { id, timeout_s, command } => {
            let args = json!({"command": command.join(" "), "timeout_s": timeout(timeout_s)});
            ci_command(c, &id, "executeCommand", args, json_out).await?
        }
        CiCmd::Code {
            id,
            language,
            timeout_s,
            code,
        } => {
            let args = json!({"language": language, "code": code, "timeout_s": timeout(timeout_s)});
            ci_command(c, &id, "executeCode", args, json_out).await?
        }
        CiCmd::Read { id, paths } => {
            let r = c.tool(&id, "readFiles", json!({ "paths": paths })).await?;
            let mut failed = None;
            let code = done(&r, &mut |r| {
                let items = r["content"].as_array().cloned().unwrap_or_default();
                let many = items.len() > 1;
                let mut out = std::io::stdout();
                for item in items {
                    let res = &item["resource"];
                    if many {
                        let _ = writeln!(
                            out,
                            "==> {} <==",
                            res["uri"].as_str().unwrap_or("").trim_start_matches("file://")
                        );
                    }
                    let bytes = match (res["text"].as_str(), res["blob"].as_str()) {
                        (Some(t), _) => t.as_bytes().to_vec(),
                        (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b) {
                            Ok(b) => b,
                            Err(e) => {
                                failed = Some(format!("agentd sent a blob that is not base64: {e}"));
                                continue;
                            }
                        },
                        _ => Vec::new(),
                    };
                    let _ = out.write_all(&bytes);
                }
                let _ = out.flush();
            });
            if let Some(e) = failed {
                bail!(e);
            }
            code
        }
        CiCmd::Write { id, path, text } => {
            let text = if text == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading standard input")?;
                s
            } else {
                text
            };
            let r = c
                .tool(&id, "writeFiles", json!({"content": [{"path": path, "text": text}]}))
                .await?;
            done(&r, &mut |r| {
                for p in r["structuredContent"]["written"].as_array().into_iter().flatten() {
                    println!("wrote {}", p.as_str().unwrap_or(""));
                }
            })
        }
        CiCmd::Ls { id, dir } => {
            let args = match dir {
                Some(d) => json!({ "directoryPath": d }),
                None => json!({}),
            };
            let r = c.tool(&id, "listFiles", args).await?;
            done(&r, &mut |r| {
                let entries = r["structuredContent"]["entries"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for e in entries {
                    let kind = match e["type"].as_str() {
                        Some("directory") => "d",
                        Some("symlink") => "l",
                        Some("file") => "-",
                        _ => "?",
                    };
                    println!(
                        "{kind} {:>4o} {:>10} {}  {}",
                        e["mode"].as_u64().unwrap_or(0) & 0o7777,
                        e["size"].to_string(),
                        when(&Value::from(e["mtime"].as_i64().unwrap_or(0).max(0) as u64 * 1000)),
                        e["name"].as_str().unwrap_or("")
                    );
                }
            })
        }
        CiCmd::Rm { id, paths } => {
            let r = c.tool(&id, "removeFiles", json!({ "paths": paths })).await?;
            done(&r, &mut |r| {
                for p in r["structuredContent"]["removed"].as_array().into_iter().flatten() {
                    println!("removed {}", p.as_str().unwrap_or(""));
                }
            })
        }
        CiCmd::TaskStart { id, command } => {
            let r = c
                .tool(&id, "startCommandExecution", json!({"command": command.join(" ")}))
                .await?;
            done(&r, &mut |r| {
                println!(
                    "{} {}",
                    r["structuredContent"]["taskId"].as_str().unwrap_or(""),
                    r["structuredContent"]["status"].as_str().unwrap_or("")
                )
            })
        }
        CiCmd::Task { id, task } => {
            let r = c.tool(&id, "getTask", json!({ "taskId": task })).await?;
            // A failed task is still shown; its exit code says it failed.
            if json_out {
                print_json(&r);
            } else {
                print_task(&r);
            }
            i32::from(r["isError"] == true)
        }
        CiCmd::TaskStop { id, task } => {
            let r = c.tool(&id, "stopTask", json!({ "taskId": task })).await?;
            if json_out {
                print_json(&r);
            } else {
                print_task(&r);
            }
            0
        }
        CiCmd::Stop { id } => {
            let s = c
                .call("DELETE", &format!("/v1/code-interpreter/sessions/{id}"), None)
                .await?;
            if json_out {
                print_json(&s);
            } else {
                print_session(&s);
            }
            0
        }
        CiCmd::Tool { id, name, args } => {
            let arguments: Value =
                serde_json::from_str(&args).with_context(|| format!("JSON_ARGS {args:?} is not JSON"))?;
            let r = c.tool(&id, &name, arguments).await?;
            print_json(&r);
            i32::from(r["isError"] == true)
        }
    })
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
    if !res.status().is_success() {
        return Err(api_error(res).await);
    }
    let mut code = 1;
    ndjson(res, |ev| {
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
        Ok(())
    })
    .await?;
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
