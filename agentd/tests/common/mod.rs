//! Runs the real `agentd` binary with a test configuration on one backend
//! and talks to its HTTP API.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The probe guest on Warren's VMM on KVM.
    Microvm,
    /// The real guest-agent and base image in a namespace sandbox.
    Namespace,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Microvm => "microvm",
            Backend::Namespace => "namespace",
        }
    }

    /// The image sessions ask for.
    pub fn image(self) -> &'static str {
        match self {
            Backend::Microvm => "probe",
            Backend::Namespace => "base",
        }
    }

    /// A command that prints `text` (the probe has a built-in echo).
    pub fn echo(self, text: &str) -> Value {
        serde_json::json!({"argv": ["echo", text]})
    }

    /// What "the guest's process" is called in end reasons.
    pub fn crash_reason(self) -> &'static str {
        match self {
            Backend::Microvm => "vmm_crashed",
            Backend::Namespace => "sandbox_crashed",
        }
    }

    /// The runtime subdirectory its guests live in.
    pub fn guests_subdir(self) -> &'static str {
        match self {
            Backend::Microvm => "vm",
            Backend::Namespace => "ns",
        }
    }
}

/// The `vmm` binary: `$WARREN_VMM` (set by `cargo xtask test`), else the
/// workspace's release or debug build.
pub fn vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("WARREN_VMM") {
        return p.into();
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    for p in [target.join("release/vmm"), target.join("debug/vmm")] {
        if p.is_file() {
            return p;
        }
    }
    panic!("no vmm binary: set WARREN_VMM or run `cargo build -p vmm` (cargo xtask test does both)");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running agentd.
pub struct Agentd {
    pub child: Option<Child>,
    pub backend: Backend,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    agent: ureq::Agent,
}

/// The test configuration: pools of `pool_target` guests of the backend's
/// image, plus whatever `extra` adds (TOML appended at the top level).
pub fn config_text(backend: Backend, dir: &Path, port: u16, pool_target: u32, top: &str, extra: &str) -> String {
    let image = match backend {
        Backend::Microvm => {
            let probe = warren_e2e::artifacts::probe().unwrap_or_else(|e| panic!("{e}"));
            format!("[images.probe]\nkernel = \"{}\"\n", probe.display())
        }
        Backend::Namespace => {
            let initramfs = warren_e2e::artifacts::initramfs().unwrap_or_else(|e| panic!("{e}"));
            format!(
                "[images.base]\ninitramfs = \"{}\"\nagent_command = [\"/usr/bin/warren-sample-agent\"]\n",
                initramfs.display()
            )
        }
    };
    let memory = match backend {
        Backend::Microvm => 64,
        Backend::Namespace => 128,
    };
    format!(
        "listen = \"127.0.0.1:{port}\"\n\
         data_dir = \"{data}\"\n\
         runtime_dir = \"{run}\"\n\
         backend = \"{backend}\"\n\
         vmm_binary = \"{vmm}\"\n\
         nsinit_binary = \"{nsinit}\"\n\
         boot_timeout_s = 30\n\
         {top}\n\
         [sessions]\nimage = \"{img}\"\nmemory_mib = {memory}\n\n\
         {image}\n\
         [[pool]]\nimage = \"{img}\"\nmemory_mib = {memory}\ntarget = {pool_target}\nrefill_concurrency = 2\n\n\
         {extra}\n",
        data = dir.join("data").display(),
        run = dir.join("run").display(),
        backend = backend.name(),
        vmm = vmm_binary().display(),
        nsinit = env!("CARGO_BIN_EXE_warren-nsinit"),
        img = backend.image(),
    )
}

impl Agentd {
    /// Starts agentd with `pool_target` ready guests wanted and waits for
    /// its API.
    pub fn start(backend: Backend, pool_target: u32) -> Agentd {
        Self::start_with(backend, pool_target, "", "")
    }

    /// Starts agentd with extra configuration.
    pub fn start_with(backend: Backend, pool_target: u32, top: &str, extra: &str) -> Agentd {
        if backend == Backend::Microvm {
            warren_e2e::artifacts::require_kvm();
        }
        let dir = tempfile::Builder::new().prefix("agentd-test-").tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("agentd.toml");
        std::fs::write(&config, config_text(backend, dir.path(), port, pool_target, top, extra)).unwrap();
        let mut a = Agentd {
            child: None,
            backend,
            base: format!("http://127.0.0.1:{port}"),
            dir,
            config,
            agent: ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build(),
        };
        a.spawn(&[]);
        a
    }

    /// Spawns the binary (again) on the same configuration and waits for
    /// `/healthz`.
    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agentd.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentd"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--log")
            .arg("info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agentd exited with {st} before serving:\n{}", self.log());
            }
            if let Ok((200, _)) = self.try_request("GET", "/healthz", None) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agentd did not serve within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agentd.log")).unwrap_or_default()
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn guests_dir(&self) -> PathBuf {
        self.runtime_dir().join(self.backend.guests_subdir())
    }

    /// One request; `(status, JSON body)` (a non-JSON body is a string).
    pub fn try_request(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value), String> {
        let req = self.agent.request(method, &format!("{}{path}", self.base));
        let res = match body {
            Some(b) => req.set("content-type", "application/json").send_string(b),
            None => req.call(),
        };
        let res = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e.to_string()),
        };
        let status = res.status();
        let text = res.into_string().map_err(|e| e.to_string())?;
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n--- agentd log ---\n{}", self.log()))
    }

    /// A request builder on the harness's agent (for custom headers).
    pub fn agent_request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent.request(method, &format!("{}{path}", self.base))
    }

    /// A raw response, for headers.
    pub fn raw(&self, method: &str, path: &str, body: &str) -> ureq::Response {
        match self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("content-type", "application/json")
            .send_string(body)
        {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    /// Creates a session and returns its record.
    pub fn create_session(&self) -> Value {
        let (st, v) = self.request("POST", "/v1/sessions", Some("{}"));
        assert_eq!(st, 201, "create session: {v}\n--- agentd log ---\n{}", self.log());
        v
    }

    /// Runs a command; returns the result body.
    pub fn exec(&self, id: &str, body: &Value) -> Value {
        let (st, v) = self.request("POST", &format!("/v1/sessions/{id}/exec"), Some(&body.to_string()));
        assert_eq!(st, 200, "exec {body}: {v}");
        v
    }

    pub fn session(&self, id: &str) -> Value {
        let (st, v) = self.request("GET", &format!("/v1/sessions/{id}"), None);
        assert_eq!(st, 200, "get session: {v}");
        v
    }

    pub fn delete(&self, id: &str) -> Value {
        let (st, v) = self.request("DELETE", &format!("/v1/sessions/{id}"), None);
        assert_eq!(st, 200, "delete session: {v}");
        v
    }

    /// Waits until `f` holds, polling.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !f() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n--- agentd log ---\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the pool to hold `n` ready guests.
    pub fn wait_pool(&self, n: u64) {
        self.wait_until(&format!("{n} ready guests"), Duration::from_secs(60), || {
            let (_, v) = self.request("GET", "/v1/pools", None);
            v[0]["ready"].as_u64() == Some(n)
        });
    }

    /// SIGTERM and wait (drain).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agentd is running");
        nix_kill(c.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "agentd did not stop within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no drain.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("agentd is running");
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Agentd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

pub fn nix_kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    unsafe { libc::kill(pid as i32, sig) };
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Entries left under a directory (missing = empty).
pub fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Mount points under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&d))
        .collect()
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(mut f) = std::fs::File::open(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let mut s = Vec::new();
        let _ = f.read_to_end(&mut s);
        if String::from_utf8_lossy(&s).contains(needle) && pid_alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// A raw HTTP/1.1 GET over a Unix socket (the API's second listener).
pub fn unix_get(socket: &Path, path: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: agentd\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
