//! Session handout through agentd's API, per backend, with a full pool
//! and with an empty one.
//!
//! Per run: `POST /v1/sessions` (request → session bound), then the first
//! protocol round trip (`POST /v1/sessions/{id}/exec` of `echo`), then
//! `DELETE`. Both requests carry a `Server-Timing` header that splits
//! agentd's own time (the host's share: request in → request written to
//! the guest's socket, reply read → response out) from the guest's (socket
//! write → reply read; for a session booted on demand, its boot). On a PVM
//! host the guest's share is instruction emulation (microvm) or a real
//! process (namespace); the host's share is what agentd owns.
//!
//! `--json` prints one line:
//! `{"runs":N,"results":[{"backend":"microvm","pool":"full","handout_ms":{…},"first_rtt_ms":{…},
//!   "total_ms":{…},"host_ms":{…},"guest_ms":{…},"boot_ms":{…}},…],"not_run":[…]}`

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use warren_benches::agentd::Daemon;
use warren_benches::Summary;

#[derive(Parser, Debug)]
#[command(about = "Handout latency of agentd's sessions")]
struct Args {
    /// Runs per backend and pool state.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Backends to measure (default: every one this host can run).
    #[arg(long, value_delimiter = ',')]
    backend: Vec<String>,
    /// One JSON line instead of a table.
    #[arg(long)]
    json: bool,
}

/// `host;dur=1.2, guest;dur=3.4` → (host ms, other ms).
fn server_timing(r: &ureq::Response) -> (f64, f64) {
    let mut host = 0.0;
    let mut other = 0.0;
    for part in r.header("server-timing").unwrap_or("").split(',') {
        let mut it = part.trim().split(";dur=");
        let (name, dur) = (
            it.next().unwrap_or(""),
            it.next().and_then(|d| d.parse().ok()).unwrap_or(0.0),
        );
        if name == "host" {
            host = dur;
        } else {
            other = dur;
        }
    }
    (host, other)
}

fn ready(d: &Daemon) -> Result<u64> {
    let v: Value = serde_json::from_str(&d.http.get(&format!("{}/v1/pools", d.base)).call()?.into_string()?)?;
    Ok(v[0]["ready"].as_u64().unwrap_or(0))
}

fn measure(backend: &str, full: bool, runs: usize) -> Result<Value> {
    let target = if full { 2 } else { 0 };
    let d = Daemon::start(backend, target)?;
    let (mut handout, mut rtt, mut total, mut host, mut guest, mut boot) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // One unmeasured run warms the connection and the code paths.
    for i in 0..=runs {
        if full {
            let deadline = Instant::now() + Duration::from_secs(60);
            while ready(&d)? < u64::from(target) {
                if Instant::now() > deadline {
                    bail!("the pool did not refill within 60 s: {}", d.log());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let t0 = Instant::now();
        let r = d
            .http
            .post(&format!("{}/v1/sessions", d.base))
            .set("content-type", "application/json")
            .send_string("{}")
            .map_err(|e| anyhow::anyhow!("create session: {e}; log: {}", d.log()))?;
        let t1 = Instant::now();
        let (create_host, create_boot) = server_timing(&r);
        let s: Value = serde_json::from_str(&r.into_string()?)?;
        let id = s["id"].as_str().context("no session id")?.to_string();
        if full && s["from_pool"] != true {
            bail!("a full-pool run was not served from the pool: {s}");
        }
        let r = d
            .http
            .post(&format!("{}/v1/sessions/{id}/exec", d.base))
            .set("content-type", "application/json")
            .send_string(&json!({"argv": ["echo", "hi"]}).to_string())
            .map_err(|e| anyhow::anyhow!("exec: {e}"))?;
        let t2 = Instant::now();
        let (exec_host, exec_guest) = server_timing(&r);
        let out: Value = serde_json::from_str(&r.into_string()?)?;
        if out["stdout"] != "hi\n" {
            bail!("unexpected exec result {out}");
        }
        d.http
            .delete(&format!("{}/v1/sessions/{id}", d.base))
            .call()
            .map_err(|e| anyhow::anyhow!("delete: {e}"))?;
        if i == 0 {
            continue;
        }
        let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
        handout.push(ms(t0, t1));
        rtt.push(ms(t1, t2));
        total.push(ms(t0, t2));
        host.push(create_host + exec_host);
        guest.push(exec_guest);
        boot.push(create_boot);
    }
    Ok(json!({
        "backend": backend,
        "pool": if full { "full" } else { "empty" },
        "handout_ms": Summary::of(&handout).json(),
        "first_rtt_ms": Summary::of(&rtt).json(),
        "total_ms": Summary::of(&total).json(),
        "host_ms": Summary::of(&host).json(),
        "guest_ms": Summary::of(&guest).json(),
        "boot_ms": Summary::of(&boot).json(),
    }))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut backends = args.backend.clone();
    let mut not_run = Vec::new();
    if backends.is_empty() {
        backends = vec!["microvm".into(), "namespace".into()];
    }
    let mut results = Vec::new();
    for b in &backends {
        if b == "microvm" && !Path::new("/dev/kvm").exists() {
            not_run.push(json!({"backend": b, "why": "/dev/kvm is missing"}));
            continue;
        }
        for full in [true, false] {
            results.push(measure(b, full, args.runs)?);
        }
    }
    if args.json {
        println!("{}", json!({"runs": args.runs, "results": results, "not_run": not_run}));
        return Ok(());
    }
    println!("handout through agentd ({} runs each; ms)", args.runs);
    println!(
        "{:<10} {:<6} {:>14} {:>14} {:>14} {:>14} {:>14}",
        "backend", "pool", "handout p50/99", "1st rtt p50/99", "total p50/99", "host p50/99", "guest p50/99"
    );
    for r in &results {
        let f = |k: &str| warren_benches::p50_p99(&r[k]);
        println!(
            "{:<10} {:<6} {:>14} {:>14} {:>14} {:>14} {:>14}",
            r["backend"].as_str().unwrap_or(""),
            r["pool"].as_str().unwrap_or(""),
            f("handout_ms"),
            f("first_rtt_ms"),
            f("total_ms"),
            f("host_ms"),
            f("guest_ms")
        );
    }
    for n in &not_run {
        println!("{}: DID NOT RUN: {}", n["backend"], n["why"]);
    }
    Ok(())
}
