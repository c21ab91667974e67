//! A real agentd for benchmarks: the release binary on a temporary
//! configuration, on one backend, stopped (drained) on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A path the xtask wrapper passes in the environment.
pub fn env_path(var: &str) -> Result<PathBuf> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .with_context(|| format!("${var} is not set (run benchmarks through `cargo xtask bench NAME`)"))
}

/// A running agentd.
pub struct Daemon {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    dir: tempfile::TempDir,
    /// A keep-alive client.
    pub http: ureq::Agent,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// The image sessions use on `backend`: the probe on microvm, the base
/// image (with its sample agent) on namespace.
pub fn image_of(backend: &str) -> &'static str {
    if backend == "microvm" {
        "probe"
    } else {
        "base"
    }
}

impl Daemon {
    /// Starts agentd on `backend` ("microvm" or "namespace") with a pool of
    /// `pool_target` guests and waits for its API.
    pub fn start(backend: &str, pool_target: u32) -> Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("warren-bench-").tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let (image, memory) = match backend {
            "microvm" => (
                format!("[images.probe]\nkernel = \"{}\"\n", env_path("WARREN_PROBE")?.display()),
                64,
            ),
            _ => (
                format!(
                    "[images.base]\ninitramfs = \"{}\"\nagent_command = [\"/usr/bin/warren-sample-agent\"]\n",
                    env_path("WARREN_INITRAMFS")?.display()
                ),
                128,
            ),
        };
        let img = image_of(backend);
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{d}/data\"\nruntime_dir = \"{d}/run\"\nbackend = \"{backend}\"\n\
             vmm_binary = \"{vmm}\"\nnsinit_binary = \"{ns}\"\n[sessions]\nimage = \"{img}\"\nmemory_mib = {memory}\n\
             {image}\n[[pool]]\nimage = \"{img}\"\nmemory_mib = {memory}\ntarget = {pool_target}\nrefill_concurrency = 2\n",
            d = dir.path().display(),
            vmm = env_path("WARREN_VMM")?.display(),
            ns = env_path("WARREN_NSINIT")?.display(),
        );
        Self::spawn(dir, port, &config)
    }

    /// Starts agentd on `backend` with a pool of `pool_target` guests of
    /// the `python` image (its code interpreter on 8421) and waits for its
    /// API. microvm boots the guest kernel with the image as its disk.
    pub fn start_python(backend: &str, pool_target: u32) -> Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("warren-bench-").tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let kernel = match backend {
            "microvm" => format!("kernel = \"{}\"\n", env_path("WARREN_KERNEL")?.display()),
            _ => String::new(),
        };
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{d}/data\"\nruntime_dir = \"{d}/run\"\nbackend = \"{backend}\"\n\
             vmm_binary = \"{vmm}\"\nnsinit_binary = \"{ns}\"\n[sessions]\nimage = \"python\"\nmemory_mib = 512\n\
             [images.python]\n{kernel}initramfs = \"{initramfs}\"\nrootfs = \"{rootfs}\"\ninterpreter_port = 8421\n\
             [[pool]]\nimage = \"python\"\nmemory_mib = 512\ntarget = {pool_target}\nrefill_concurrency = 1\n",
            d = dir.path().display(),
            vmm = env_path("WARREN_VMM")?.display(),
            ns = env_path("WARREN_NSINIT")?.display(),
            initramfs = env_path("WARREN_INITRAMFS")?.display(),
            rootfs = env_path("WARREN_PYTHON_IMAGE")?.display(),
        );
        Self::spawn(dir, port, &config)
    }

    fn spawn(dir: tempfile::TempDir, port: u16, config: &str) -> Result<Daemon> {
        let cfg = dir.path().join("agentd.toml");
        std::fs::write(&cfg, config)?;
        let log = std::fs::File::create(dir.path().join("agentd.log"))?;
        let child = Command::new(env_path("WARREN_AGENTD")?)
            .arg("--config")
            .arg(&cfg)
            .arg("--log")
            .arg("warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning agentd")?;
        let d = Daemon {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while d.http.get(&format!("{}/healthz", d.base)).call().is_err() {
            if Instant::now() > deadline {
                bail!("agentd did not serve within 60 s: {}", d.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// What agentd logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agentd.log")).unwrap_or_default()
    }
}
