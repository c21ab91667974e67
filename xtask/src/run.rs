//! `cargo xtask run`: build everything and show the main job working.
//!
//! It builds the kernel, the initramfs, the VMM and agentd; boots the
//! project's kernel once under QEMU (the way every host can run it) to show
//! guest-agent as PID 1 of a real Linux guest; boots the probe guest on
//! Warren's own VMM on KVM; then starts agentd with its embedded default
//! configuration, drives a first session through its HTTP API — a command,
//! streamed output, metering, teardown with scrub — and leaves agentd
//! serving until Ctrl-C (which drains it).

use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use warren_e2e::qemu::{QemuGuest, QemuOptions};
use warren_e2e::vmm::VmmGuest;
use warren_images::Cache;
use warren_protocol::{ExecRequest, Stream};

use crate::{images, kernel, packages, probe, sh};

/// The address agentd's embedded defaults listen on.
const API: &str = "http://127.0.0.1:8420";

/// Options of `cargo xtask run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Stop agentd after the first session instead of leaving it running.
    #[arg(long)]
    pub no_wait: bool,
    /// Skip the QEMU boot of the Linux guest.
    #[arg(long)]
    pub no_qemu: bool,
}

/// Builds, shows the guests, runs agentd.
pub fn run(cache: &Cache, args: &RunArgs) -> Result<()> {
    let host = vmm::host::HostVirt::detect();
    eprintln!("xtask: host: {}", host.describe());
    packages::ensure(packages::TESTS)?;
    let vmlinux = kernel::build(cache)?;
    let initramfs = images::build_initramfs(cache)?;
    let python = crate::python_image::build(cache)?;
    let vmm = sh::build_vmm_release()?;
    let (agentd, _nsinit) = sh::build_agentd_release()?;
    println!("kernel:    {}", vmlinux.display());
    println!("initramfs: {}", initramfs.display());
    println!("python:    {}", python.display());
    if !args.no_qemu {
        qemu_session(vmlinux, initramfs)?;
    }
    vmm_session(&host, &vmm)?;
    agentd_session(cache, &agentd, args)
}

/// Boots the project's kernel and initramfs under QEMU TCG and drives
/// guest-agent through a few requests.
fn qemu_session(vmlinux: std::path::PathBuf, initramfs: std::path::PathBuf) -> Result<()> {
    println!("\n== 1. the guest kernel under QEMU TCG (software CPU emulation; a few seconds)");
    let mut g = QemuGuest::boot(&QemuOptions::new(vmlinux, initramfs)).context("booting the guest")?;
    let hello = g.client.hello().clone();
    println!(
        "guest-agent says hello: {} speaking protocol v{}, kernel {}, ready {} ms after guest boot, {:.1} s after spawning QEMU",
        hello.agent,
        hello.protocol_version,
        hello.kernel_release,
        hello.boot_time_ns / 1_000_000,
        g.spawn_to_hello.as_secs_f64()
    );
    let script =
        "echo \"hello from $(hostname), PID 1 is $(cat /proc/1/comm)\"; uname -a; mount | grep -E 'proc|tmp' | head -3";
    println!("$ {script}");
    let status = g.client.exec_streaming(
        ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            timeout_ms: Some(30_000),
            ..Default::default()
        },
        |stream, data| {
            let _ = match stream {
                Stream::Stdout => std::io::stdout().write_all(data),
                Stream::Stderr => std::io::stderr().write_all(data),
            };
        },
    )?;
    println!("(exit {:?})", status.code);
    g.client.shutdown()?;
    let exit = g.wait_exit(Duration::from_secs(60))?;
    println!(
        "guest shut down ({})",
        exit.map(|s| s.to_string())
            .unwrap_or_else(|| "still running, killed".into())
    );
    Ok(())
}

/// Boots the probe guest on Warren's own VMM, on KVM, and talks to it over
/// virtio-vsock.
fn vmm_session(host: &vmm::host::HostVirt, vmm: &std::path::Path) -> Result<()> {
    println!("\n== 2. the probe guest on Warren's VMM (KVM, 1 vCPU, 128 MiB)");
    if let Err(e) = &host.kvm {
        println!("DID NOT RUN: Warren's VMM needs KVM and this host has none usable ({e}).");
        return Ok(());
    }
    let probe = probe::build()?;
    let mut vm = VmmGuest::boot(vmm, Duration::from_secs(30), |_| vec!["--kernel".into(), probe.into()])?;
    let ready = vm.spawn_to_hello();
    let t = Instant::now();
    for n in 0..10 {
        vm.client.ping(n)?;
    }
    let rtt = t.elapsed() / 10;
    let (status, report) = vm.shutdown()?;
    println!(
        "{} said hello over virtio-vsock {:.1} ms after the VMM was spawned; ping round trip {:.2} ms \
         (the probe's instructions are emulated on this host: {})",
        vm.client.hello().agent,
        ready.as_secs_f64() * 1e3,
        rtt.as_secs_f64() * 1e3,
        if host.runs_linux_natively() { "no" } else { "yes" }
    );
    println!(
        "vmm exited with {status}; its report: {}",
        report.lines().last().unwrap_or("")
    );
    Ok(())
}

/// Registers the sample runtime (the agent server the initramfs ships) and
/// streams an invocation from it.
fn runtime_session(agent: &ureq::Agent) -> Result<()> {
    println!("\n$ curl -X POST {API}/v1/runtimes -d '{{\"name\":\"sample\",\"env\":{{\"WARREN_SAMPLE_GREETING\":\"hello\"}}}}'");
    let existing = call(agent, "GET", "/v1/runtimes/sample", None);
    let rt = match existing {
        Ok(r) => r,
        Err(_) => call(
            agent,
            "POST",
            "/v1/runtimes",
            Some(json!({"name": "sample", "env": {"WARREN_SAMPLE_GREETING": "hello"}})),
        )?,
    };
    println!(
        "runtime sample, version {}, endpoints {}",
        rt["latest_version"], rt["endpoints"]
    );
    println!(
        "$ curl -N {API}/v1/runtimes/sample/invocations -H 'Accept: text/event-stream' -d '{{\"prompt\":\"hi\"}}'"
    );
    let started = Instant::now();
    let res = agent
        .post(&format!("{API}/v1/runtimes/sample/invocations"))
        .set("accept", "text/event-stream")
        .send_string(r#"{"prompt": "hi"}"#)
        .map_err(|e| anyhow::anyhow!("invocation: {e}"))?;
    println!(
        "X-Session-Id: {} (send it again to reach the same guest)",
        res.header("x-session-id").unwrap_or("")
    );
    for line in std::io::BufReader::new(res.into_reader()).lines() {
        let line = line?;
        if !line.is_empty() {
            println!("  +{:>4} ms  {line}", started.elapsed().as_millis());
        }
    }
    Ok(())
}

/// A code-interpreter session: a command and a file, through the tools.
fn code_interpreter_session(agent: &ureq::Agent) -> Result<()> {
    println!("\n$ curl -X POST {API}/v1/code-interpreter/sessions -d '{{}}'");
    let s = call(agent, "POST", "/v1/code-interpreter/sessions", Some(json!({})))?;
    let id = s["session_id"].as_str().context("no session id")?.to_string();
    let tool = |name: &str, arguments: Value| {
        call(
            agent,
            "POST",
            &format!("/v1/code-interpreter/sessions/{id}/invoke"),
            Some(json!({"name": name, "arguments": arguments})),
        )
    };
    tool(
        "writeFiles",
        json!({"content": [{"path": "notes.txt", "text": "written by writeFiles\n"}]}),
    )?;
    println!("$ … /invoke -d '{{\"name\":\"executeCommand\",\"arguments\":{{\"command\":\"cat notes.txt; ls -l\"}}}}'");
    let r = tool("executeCommand", json!({"command": "cat notes.txt; ls -l"}))?;
    print!("{}", r["structuredContent"]["stdout"].as_str().unwrap_or(""));
    println!(
        "(exitCode {}, {:.1} ms, isError {})",
        r["structuredContent"]["exitCode"],
        r["structuredContent"]["executionTime"].as_f64().unwrap_or(0.0) * 1e3,
        r["isError"]
    );
    call(agent, "DELETE", &format!("/v1/code-interpreter/sessions/{id}"), None)?;
    Ok(())
}

/// A code-interpreter session on the python image: state kept between two
/// calls, pandas, a matplotlib figure coming back as a PNG.
fn python_session(agent: &ureq::Agent) -> Result<()> {
    // The python pool's guest is ready once its interpreter has preloaded
    // its libraries: wait for it, so the session below is a warm handout.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let pools = call(agent, "GET", "/v1/pools", None)?;
        let ready = pools
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["image"] == "python" && p["ready"].as_u64().unwrap_or(0) > 0);
        if ready {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!();
    println!("$ curl -X POST {API}/v1/code-interpreter/sessions -d '{{\"image\":\"python\"}}'");
    let t0 = Instant::now();
    let s = call(
        agent,
        "POST",
        "/v1/code-interpreter/sessions",
        Some(json!({"image": "python"})),
    )?;
    let id = s["session_id"].as_str().context("no session id")?.to_string();
    println!(
        "session {id} in {:.1} ms ({})",
        t0.elapsed().as_secs_f64() * 1e3,
        if s["session"]["from_pool"] == true {
            "from the warm pool"
        } else {
            "booted on demand"
        }
    );
    let code = |language: &str, code: &str| -> Result<Value> {
        println!("executeCode ({language}):");
        for l in code.lines() {
            println!("  >>> {l}");
        }
        let t = Instant::now();
        let r = call(
            agent,
            "POST",
            &format!("/v1/code-interpreter/sessions/{id}/invoke"),
            Some(json!({"name": "executeCode", "arguments": {"language": language, "code": code}})),
        )?;
        let sc = &r["structuredContent"];
        print!("{}", sc["stdout"].as_str().unwrap_or(""));
        if let Some(v) = sc["result"].as_str() {
            println!("{v}");
        }
        println!(
            "  ({:.1} ms, isError {})",
            t.elapsed().as_secs_f64() * 1e3,
            r["isError"]
        );
        Ok(r)
    };
    code("python", "import pandas as pd\ndf = pd.DataFrame({'x': range(1, 6)})\ndf['x2'] = df.x ** 2\nprint(df.to_string(index=False))")?;
    code("python", "df.x2.sum()  # df is still here")?;
    let r = code(
        "python",
        "import matplotlib.pyplot as plt\nplt.plot(df.x, df.x2, marker='o')\nplt.title('squares')\nplt.show()",
    )?;
    for f in r["structuredContent"]["files"].as_array().into_iter().flatten() {
        println!(
            "  figure: {} ({}), readable with readFiles",
            f["path"].as_str().unwrap_or(""),
            f["mimeType"].as_str().unwrap_or("")
        );
    }
    code(
        "javascript",
        "const greet = (n) => `hello, ${n}`; greet('node ' + process.version)",
    )?;
    call(agent, "DELETE", &format!("/v1/code-interpreter/sessions/{id}"), None)?;
    Ok(())
}

/// agentd stopped on drop (SIGTERM: it drains).
struct Agentd(Child);

impl Drop for Agentd {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn http() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build()
}

fn call(agent: &ureq::Agent, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let req = agent.request(method, &format!("{API}{path}"));
    let res = match body {
        Some(b) => req.set("content-type", "application/json").send_string(&b.to_string()),
        None => req.call(),
    };
    match res {
        Ok(r) => Ok(serde_json::from_str(&r.into_string()?)?),
        Err(ureq::Error::Status(code, r)) => bail!("{method} {path}: {code} {}", r.into_string().unwrap_or_default()),
        Err(e) => bail!("{method} {path}: {e}"),
    }
}

/// Starts agentd with its embedded defaults, drives a first session and
/// leaves it serving.
fn agentd_session(cache: &Cache, agentd: &std::path::Path, args: &RunArgs) -> Result<()> {
    println!("\n== 3. agentd with its embedded default configuration");
    let agent = http();
    if agent.get(&format!("{API}/healthz")).call().is_ok() {
        bail!("something already serves {API}: stop the agentd running there first");
    }
    // Warnings only (the backend choice among them): the session below is
    // the output to read.
    let child = Command::new(agentd)
        .args(["--log", "warn"])
        .env("WARREN_CACHE_DIR", cache.root())
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", agentd.display()))?;
    let mut daemon = Agentd(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let health = loop {
        if let Some(st) = daemon.0.try_wait()? {
            bail!("agentd exited with {st} before serving (its log is above)");
        }
        if let Ok(h) = call(&agent, "GET", "/healthz", None) {
            break h;
        }
        if Instant::now() > deadline {
            bail!("agentd did not serve {API} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "agentd serves {API} and unix:/run/warren/agentd.sock; backend: {}",
        health["isolation"].as_str().unwrap_or("")
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while call(&agent, "GET", "/v1/pools", None)?[0]["ready"]
        .as_u64()
        .unwrap_or(0)
        == 0
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("$ curl -X POST {API}/v1/sessions -d '{{}}'");
    let s = call(&agent, "POST", "/v1/sessions", Some(json!({})))?;
    let id = s["id"].as_str().context("no session id")?.to_string();
    println!(
        "session {id}: image {}, {} vCPU, {} MiB, bound in {:.2} ms ({})",
        s["image"].as_str().unwrap_or(""),
        s["vcpus"],
        s["memory_mib"],
        s["handout_ms"].as_f64().unwrap_or(0.0),
        if s["from_pool"] == true {
            "from the warm pool"
        } else {
            "booted on demand"
        }
    );
    let script = "echo \"hello from $(hostname), PID 1 is $(cat /proc/1/comm)\"; uname -sr; ls /";
    println!("$ curl {API}/v1/sessions/{id}/exec -d '{{\"argv\":[\"sh\",\"-c\",\"…\"]}}'");
    let r = call(
        &agent,
        "POST",
        &format!("/v1/sessions/{id}/exec"),
        Some(json!({"argv": ["sh", "-c", script]})),
    )?;
    print!("{}", r["stdout"].as_str().unwrap_or(""));
    print!("{}", r["stderr"].as_str().unwrap_or(""));
    println!(
        "(exit {}, {:.1} ms in the guest)",
        r["exit_code"],
        r["duration_ms"].as_f64().unwrap_or(0.0)
    );
    println!("$ curl -N {API}/v1/sessions/{id}/exec/stream …   (each line as it happens)");
    let res = agent
        .post(&format!("{API}/v1/sessions/{id}/exec/stream"))
        .send_string(&json!({"argv": ["sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.4; done"]}).to_string())
        .map_err(|e| anyhow::anyhow!("streaming exec: {e}"))?;
    let started = Instant::now();
    for line in std::io::BufReader::new(res.into_reader()).lines() {
        let ev: Value = serde_json::from_str(&line?)?;
        println!("  +{:>4} ms  {ev}", started.elapsed().as_millis());
    }
    let ended = call(&agent, "DELETE", &format!("/v1/sessions/{id}"), None)?;
    println!(
        "session ended ({}): metered {:.2} ms of CPU, {:.6} GiB·s of memory; teardown wiped {} bytes in {:.2} ms",
        ended["end_reason"].as_str().unwrap_or(""),
        ended["metering"]["cpu_ns"].as_f64().unwrap_or(0.0) / 1e6,
        ended["metering"]["memory_gib_s"].as_f64().unwrap_or(0.0),
        ended["scrub"]["bytes"],
        ended["scrub"]["ns"].as_f64().unwrap_or(0.0) / 1e6
    );
    runtime_session(&agent)?;
    code_interpreter_session(&agent)?;
    python_session(&agent)?;
    if args.no_wait {
        println!("\nstopping agentd (--no-wait). `cargo xtask test` runs every test.");
        return Ok(());
    }
    println!(
        "\nagentd keeps serving {API}. Try, from another terminal:\n  {ctl} session create\n  {ctl} exec SESSION_ID -- uname -a\n  \
         {ctl} session list\n  {ctl} pools\n  curl -s {API}/metrics\nCtrl-C stops it (it drains: ends the sessions and wipes them). \
         `cargo xtask test` runs every test.",
        ctl = agentd.with_file_name("agentctl").display()
    );
    let status = daemon.0.wait()?;
    std::mem::forget(daemon);
    println!("agentd exited: {status}");
    Ok(())
}
