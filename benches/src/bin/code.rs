//! Pool handout → first `executeCode` result on the python image.
//!
//! Per run, with a warm pool of one python guest (its interpreter already
//! started and its libraries preloaded, as a pool guest is): `POST
//! /v1/code-interpreter/sessions` (`image: python`), then one `executeCode`
//! in Python that uses pandas, timed to its result; then `DELETE`, and a
//! wait for the pool to refill before the next run. A second series does
//! the same in JavaScript.
//!
//! `--json` prints one line:
//! `{"runs":N,"results":[{"backend","language","handout_ms":{…},"first_exec_ms":{…},"total_ms":{…}},…],"not_run":[…]}`

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use warren_benches::agentd::Daemon;
use warren_benches::Summary;

#[derive(Parser, Debug)]
#[command(about = "Handout to first executeCode result on the python image")]
struct Args {
    /// Runs per backend and language.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Backends to measure (default: every one this host can run).
    #[arg(long, value_delimiter = ',')]
    backend: Vec<String>,
    /// One JSON line instead of a table.
    #[arg(long)]
    json: bool,
}

const PYTHON: &str = "import pandas as pd\ndf = pd.DataFrame({'v': range(100)})\nint(df['v'].sum())";
const JAVASCRIPT: &str = "[...Array(100).keys()].reduce((a, b) => a + b, 0)";

fn ready(d: &Daemon) -> Result<u64> {
    let v: Value = serde_json::from_str(&d.http.get(&format!("{}/v1/pools", d.base)).call()?.into_string()?)?;
    Ok(v[0]["ready"].as_u64().unwrap_or(0))
}

fn post(d: &Daemon, path: &str, body: Value) -> Result<Value> {
    let r = d
        .http
        .post(&format!("{}{path}", d.base))
        .set("content-type", "application/json")
        .send_string(&body.to_string())
        .map_err(|e| anyhow::anyhow!("POST {path}: {e}\n{}", d.log()))?;
    Ok(serde_json::from_str(&r.into_string()?)?)
}

fn measure(d: &Daemon, backend: &str, language: &str, runs: usize) -> Result<Value> {
    let (code, want) = match language {
        "python" => (PYTHON, "4950"),
        _ => (JAVASCRIPT, "4950"),
    };
    let (mut handout, mut first, mut total) = (Vec::new(), Vec::new(), Vec::new());
    // One unmeasured run warms the connection and the code paths.
    for i in 0..=runs {
        let deadline = Instant::now() + Duration::from_secs(120);
        while ready(d)? < 1 {
            if Instant::now() > deadline {
                bail!("the python pool did not refill within 120 s: {}", d.log());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let t0 = Instant::now();
        let s = post(d, "/v1/code-interpreter/sessions", json!({"image": "python"}))?;
        let t1 = Instant::now();
        let id = s["session_id"].as_str().context("no session_id")?.to_string();
        let r = post(
            d,
            &format!("/v1/code-interpreter/sessions/{id}/invoke"),
            json!({"name": "executeCode", "arguments": {"language": language, "code": code}}),
        )?;
        let t2 = Instant::now();
        if r["structuredContent"]["result"] != want {
            bail!("executeCode answered {r}");
        }
        d.http
            .delete(&format!("{}/v1/code-interpreter/sessions/{id}", d.base))
            .call()?;
        if i > 0 {
            handout.push((t1 - t0).as_secs_f64() * 1e3);
            first.push((t2 - t1).as_secs_f64() * 1e3);
            total.push((t2 - t0).as_secs_f64() * 1e3);
        }
    }
    Ok(json!({
        "backend": backend,
        "language": language,
        "handout_ms": Summary::of(&handout).json(),
        "first_exec_ms": Summary::of(&first).json(),
        "total_ms": Summary::of(&total).json(),
    }))
}

/// Linux guests on Warren's VMM need VMX or SVM.
fn hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm")))
        })
        .unwrap_or(false)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut backends = args.backend.clone();
    if backends.is_empty() {
        backends = vec!["microvm".into(), "namespace".into()];
    }
    let mut not_run = Vec::new();
    let mut results = Vec::new();
    for b in &backends {
        if b == "microvm" && !std::path::Path::new("/dev/kvm").exists() {
            not_run.push(json!({"backend": b, "why": "/dev/kvm is missing"}));
            continue;
        }
        if b == "microvm" && !hardware_virtualization() {
            not_run.push(json!({"backend": b, "why": "the python image is a Linux guest, and Linux on Warren's VMM needs VMX or SVM; this host's KVM has neither (PVM)"}));
            continue;
        }
        let d = Daemon::start_python(b, 1)?;
        for language in ["python", "javascript"] {
            results.push(measure(&d, b, language, args.runs)?);
        }
    }
    if args.json {
        println!("{}", json!({"runs": args.runs, "results": results, "not_run": not_run}));
        return Ok(());
    }
    println!(
        "pool handout -> first executeCode result, python image ({} runs each; ms)",
        args.runs
    );
    println!(
        "{:<10} {:<11} {:>16} {:>16} {:>16}",
        "backend", "language", "handout p50/99", "1st exec p50/99", "total p50/99"
    );
    for r in &results {
        let f = |k: &str| warren_benches::p50_p99(&r[k]);
        println!(
            "{:<10} {:<11} {:>16} {:>16} {:>16}",
            r["backend"].as_str().unwrap_or(""),
            r["language"].as_str().unwrap_or(""),
            f("handout_ms"),
            f("first_exec_ms"),
            f("total_ms")
        );
    }
    for n in &not_run {
        println!("{}: DID NOT RUN: {}", n["backend"], n["why"]);
    }
    Ok(())
}
