//! Invocation overhead: `POST /v1/runtimes/{name}/invocations` through
//! agentd against the same request sent raw over the guest connection
//! (vsock to the probe on microvm; the sandbox's socket to guest-agent and
//! the sample agent on namespace), warm (same session), p50/p99 in ms.
//!
//! namespace: 1 KiB and 10 MiB bodies, which the sample agent reads whole
//! and answers with their length and hash. microvm: the probe echoes the
//! body; 1 KiB and 64 KiB, because on a PVM host the probe's emulated
//! vsock path moves only tens of KB/s (10 MiB would take minutes and
//! measure the emulator) — reported under `not_run` with that reason.
//!
//! `--json` prints one line:
//! `{"runs":N,"results":[{"backend":…,"payload_bytes":…,"raw_ms":{…},"agentd_ms":{…},
//!   "overhead_p50_ms":…,"overhead_p99_ms":…},…],"not_run":[…]}`

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use warren_benches::agentd::{env_path, image_of, Daemon};
use warren_benches::Summary;
use warren_e2e::vmm::VmmGuest;
use warren_protocol::client::AgentClient;
use warren_protocol::{ExecRequest, HttpRequest, Reply, Request, MAX_CHUNK};

#[derive(Parser, Debug)]
#[command(about = "Invocation overhead of agentd against a raw guest round trip")]
struct Args {
    /// Runs per backend and payload.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Backends to measure (default: every one this host can run).
    #[arg(long, value_delimiter = ',')]
    backend: Vec<String>,
    /// One JSON line instead of a table.
    #[arg(long)]
    json: bool,
}

/// Body sizes per backend.
fn sizes(backend: &str) -> [usize; 2] {
    if backend == "microvm" {
        [1024, 64 << 10]
    } else {
        [1024, 10 << 20]
    }
}

/// Bytes the agent's answer must hold: the echo (probe) or a small JSON
/// with `received_bytes` (sample agent).
fn check_answer(backend: &str, n: usize, answer: &[u8]) -> Result<()> {
    if backend == "microvm" {
        anyhow::ensure!(answer.len() == n, "echoed {} of {n} bytes", answer.len());
    } else {
        let v: serde_json::Value = serde_json::from_slice(answer)?;
        anyhow::ensure!(
            v["received_bytes"] == n,
            "the agent received {} of {n} bytes",
            v["received_bytes"]
        );
    }
    Ok(())
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 + i / 977) as u8).collect()
}

type Client = AgentClient<UnixStream, UnixStream>;

/// The raw round trip: the same Http request agentd would send, with the
/// same window of body pieces; returns the bytes echoed.
fn raw_invoke(c: &mut Client, body: &[u8]) -> Result<Vec<u8>> {
    let (first, rest) = body.split_at(body.len().min(MAX_CHUNK));
    let id = c.send(Request::Http(HttpRequest {
        port: 8080,
        method: "POST".into(),
        path: "/invocations".into(),
        headers: vec![
            ("content-type".into(), "application/octet-stream".into()),
            ("content-length".into(), body.len().to_string()),
        ],
        body: first.to_vec(),
        more_body: !rest.is_empty(),
        timeout_ms: None,
    }))?;
    let mut pending = std::collections::VecDeque::new();
    let pieces: Vec<&[u8]> = rest.chunks(MAX_CHUNK).collect();
    for (i, p) in pieces.iter().enumerate() {
        if pending.len() >= 4 {
            let b = pending.pop_front().context("window")?;
            c.next_reply(b)?;
        }
        pending.push_back(c.send(Request::HttpBody {
            request: id,
            data: p.to_vec(),
            end: i + 1 == pieces.len(),
        })?);
    }
    for b in pending {
        c.next_reply(b)?;
    }
    let mut got = Vec::new();
    loop {
        match c.next_reply(id)? {
            Reply::HttpHead { status: 200, .. } => {}
            Reply::HttpHead { status, .. } => bail!("the agent answered {status}"),
            Reply::HttpChunk { data } => got.extend(data),
            Reply::Done => return Ok(got),
            other => bail!("unexpected {other:?}"),
        }
    }
}

/// Raw round trips on a guest made without agentd.
fn raw_series(backend: &str, runs: usize) -> Result<Vec<Vec<f64>>> {
    let mut out = Vec::new();
    let mut measure = |c: &mut Client| -> Result<()> {
        for n in sizes(backend) {
            let body = payload(n);
            let mut v = Vec::new();
            for i in 0..=runs {
                let t = Instant::now();
                let got = raw_invoke(c, &body)?;
                check_answer(backend, n, &got)?;
                if i > 0 {
                    v.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            out.push(v);
        }
        Ok(())
    };
    if backend == "microvm" {
        let probe = env_path("WARREN_PROBE")?;
        let mut vm = VmmGuest::boot(&env_path("WARREN_VMM")?, Duration::from_secs(30), |_| {
            vec!["--kernel".into(), probe.into(), "--mem-mib".into(), "64".into()]
        })?;
        measure(&mut vm.client)?;
        return Ok(out);
    }
    let cgroups = agentd::cgroup::Cgroups::detect()?;
    let work = tempfile::Builder::new().prefix("warren-invoke-raw-").tempdir()?;
    let root = agentd::sandbox::unpack_image(&env_path("WARREN_INITRAMFS")?, &work.path().join("images"))?;
    let cfg = agentd::sandbox::SandboxConfig {
        nsinit: env_path("WARREN_NSINIT")?,
        runtime_dir: work.path().join("run"),
    };
    let sb = agentd::sandbox::Sandbox::start(
        &cfg,
        &cgroups,
        &agentd::sandbox::SandboxSpec {
            id: "bench-raw".into(),
            image_root: root,
            agent_layer: None,
            memory_mib: 128,
            vcpus: 1,
            hostname: "bench-raw".into(),
        },
    )?;
    let (s, _) = sb.listener().accept()?;
    let mut c = AgentClient::handshake(s.try_clone()?, s)?;
    // The sample agent runs as long as the sandbox; its exec is never awaited.
    c.send(Request::Exec(ExecRequest {
        argv: vec!["/usr/bin/warren-sample-agent".into()],
        ..Default::default()
    }))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let id = c.send(Request::Http(HttpRequest {
            port: 8080,
            method: "GET".into(),
            path: "/ping".into(),
            ..Default::default()
        }))?;
        let ok = loop {
            match c.next_reply(id) {
                Ok(Reply::Done) => break true,
                Ok(_) => {}
                Err(_) => break false,
            }
        };
        if ok {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the sample agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    measure(&mut c)?;
    drop(c);
    sb.teardown()?;
    Ok(out)
}

/// The same through agentd's API, same session every time.
fn agentd_series(backend: &str, runs: usize) -> Result<Vec<Vec<f64>>> {
    let d = Daemon::start(backend, 0)?;
    let spec =
        json!({"name": "bench", "image": image_of(backend), "memory_mib": if backend == "microvm" { 64 } else { 128 }});
    d.http
        .post(&format!("{}/v1/runtimes", d.base))
        .send_string(&spec.to_string())
        .map_err(|e| anyhow::anyhow!("creating the runtime: {e}; {}", d.log()))?;
    let sid = "bench-session-0000000000000000000000000001";
    let mut out = Vec::new();
    for n in sizes(backend) {
        let body = payload(n);
        let mut v = Vec::new();
        for i in 0..=runs {
            let t = Instant::now();
            let r = d
                .http
                .post(&format!("{}/v1/runtimes/bench/invocations", d.base))
                .set("x-session-id", sid)
                .set("content-type", "application/octet-stream")
                .send_bytes(&body)
                .map_err(|e| anyhow::anyhow!("invocation: {e}; {}", d.log()))?;
            let mut back = Vec::with_capacity(n);
            std::io::Read::read_to_end(&mut r.into_reader(), &mut back)?;
            check_answer(backend, n, &back)?;
            if i > 0 {
                v.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        out.push(v);
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let backends = if args.backend.is_empty() {
        vec!["microvm".to_string(), "namespace".to_string()]
    } else {
        args.backend.clone()
    };
    let (mut results, mut not_run) = (Vec::new(), Vec::new());
    for b in &backends {
        if b == "microvm" && !Path::new("/dev/kvm").exists() {
            not_run.push(json!({"backend": b, "why": "/dev/kvm is missing"}));
            continue;
        }
        if b == "microvm" {
            not_run.push(json!({"backend": b, "payload_bytes": 10 << 20,
                "why": "the probe's emulated vsock path moves tens of KB/s on this PVM host; 64 KiB measured instead"}));
        }
        let raw = raw_series(b, args.runs)?;
        let via = agentd_series(b, args.runs)?;
        for (i, n) in sizes(b).into_iter().enumerate() {
            let (r, a) = (Summary::of(&raw[i]), Summary::of(&via[i]));
            results.push(json!({
                "backend": b,
                "payload_bytes": n,
                "raw_ms": r.json(),
                "agentd_ms": a.json(),
                "overhead_p50_ms": a.p50 - r.p50,
                "overhead_p99_ms": a.p99 - r.p99,
            }));
        }
    }
    if args.json {
        println!("{}", json!({"runs": args.runs, "results": results, "not_run": not_run}));
        return Ok(());
    }
    println!("invocation echo, warm session ({} runs each; ms)", args.runs);
    println!(
        "{:<10} {:>10} {:>16} {:>16} {:>18}",
        "backend", "payload", "raw p50/p99", "agentd p50/p99", "overhead p50/p99"
    );
    for r in &results {
        let f = |k: &str| warren_benches::p50_p99(&r[k]);
        println!(
            "{:<10} {:>10} {:>16} {:>16} {:>18}",
            r["backend"].as_str().unwrap_or(""),
            r["payload_bytes"],
            f("raw_ms"),
            f("agentd_ms"),
            format!(
                "{:.2}/{:.2}",
                r["overhead_p50_ms"].as_f64().unwrap_or(0.0),
                r["overhead_p99_ms"].as_f64().unwrap_or(0.0)
            )
        );
    }
    for n in &not_run {
        println!("{} {}: DID NOT RUN: {}", n["backend"], n["payload_bytes"], n["why"]);
    }
    Ok(())
}
