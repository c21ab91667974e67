//! agentd's configuration: a TOML file in which every key is optional and
//! documented with its default (see `agentd/agentd.example.toml`), a few
//! flags that override it, and validation that names the offending key.
//!
//! With no file at all agentd serves a default pool of the `base` image,
//! booted from the kernel and initramfs `cargo xtask` builds into the
//! artifact cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Configuration errors, each naming the file or key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config key {key}: {message}")]
    Invalid {
        /// Dotted key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The sample agent server the initramfs ships (`guest/sample-agent`).
pub const SAMPLE_AGENT: &str = "/usr/bin/warren-sample-agent";
/// Memory of the default `python` pool's guests: the interpreter with
/// numpy, pandas and matplotlib loaded is about 100 MiB resident.
pub const PYTHON_MEMORY_MIB: u32 = 512;
/// Where the python image's interpreter server listens (its metadata says
/// so too: label `warren.interpreter.port`).
pub const PYTHON_INTERPRETER_PORT: u16 = 8421;

/// Which isolation backend new guests get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    /// `microvm` where KVM runs Linux natively, else [`Config::fallback_backend`].
    Auto,
    /// One `vmm` process per session.
    Microvm,
    /// guest-agent in fresh namespaces, chrooted into the image.
    Namespace,
}

/// A concrete backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// One `vmm` per session.
    Microvm,
    /// Namespaces + chroot + cgroup + seccomp.
    Namespace,
}

impl BackendKind {
    /// Its name in the API, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Microvm => "microvm",
            BackendKind::Namespace => "namespace",
        }
    }

    /// The isolation boundary, said plainly.
    pub fn isolation(self) -> &'static str {
        match self {
            BackendKind::Microvm => "microvm: hardware-virtualized KVM guest",
            BackendKind::Namespace => {
                "namespace: Linux namespaces + chroot + cgroup + seccomp, a weaker boundary than a VM"
            }
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Loopback TCP address of the API. Default `127.0.0.1:8420`.
    pub listen: String,
    /// Unix socket of the API. Default `<runtime_dir>/agentd.sock`.
    pub socket: Option<PathBuf>,
    /// State (SQLite database, unpacked images). Default `/var/lib/warren`.
    pub data_dir: PathBuf,
    /// Per-guest sockets and scratch. Default `/run/warren`.
    pub runtime_dir: PathBuf,
    /// `auto`, `microvm` or `namespace`. Default `auto`.
    pub backend: BackendChoice,
    /// What `auto` picks where KVM cannot run Linux natively. Default `namespace`.
    pub fallback_backend: BackendKind,
    /// The `vmm` binary. Default: next to `agentd`, else `vmm` on `PATH`.
    pub vmm_binary: Option<PathBuf>,
    /// The `warren-nsinit` binary. Default: next to `agentd`, else on `PATH`.
    pub nsinit_binary: Option<PathBuf>,
    /// Seconds a guest may take from spawn to hello. Default 30.
    pub boot_timeout_s: u64,
    /// Seconds a drain (stop) waits for requests in flight. Default 10.
    pub drain_grace_s: u64,
    /// Host limits.
    pub capacity: Capacity,
    /// Session defaults.
    pub sessions: SessionDefaults,
    /// Images by name. Default: `base` from the artifact cache.
    pub images: BTreeMap<String, ImageConfig>,
    /// Warm pools. Default: 2 `base` guests (1 vCPU, 256 MiB) and 1
    /// `python` guest (1 vCPU, 512 MiB).
    pub pool: Vec<PoolConfig>,
    /// Where imported images live, and their limits.
    pub image_store: ImageStoreConfig,
}

/// The image store: OCI images imported with `POST /v1/images`
/// (`agentctl image import`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageStoreConfig {
    /// Directory. Default `<data_dir>/image-store`.
    pub dir: Option<PathBuf>,
    /// Largest image (unpacked content and ext4 file). Default 4096.
    pub max_image_mib: u64,
    /// Most layers an image may have. Default 128.
    pub max_layers: usize,
    /// The image whose kernel and initramfs (guest-agent) imported images
    /// boot with. Default `base`.
    pub boot_image: String,
}

impl Default for ImageStoreConfig {
    fn default() -> Self {
        ImageStoreConfig {
            dir: None,
            max_image_mib: 4096,
            max_layers: 128,
            boot_image: "base".into(),
        }
    }
}

/// Host capacity: beyond it new sessions get 429.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capacity {
    /// Guests (ready, booting and bound). Default 64.
    pub max_guests: u32,
    /// Sum of guest memory. Default: 80 % of the host's memory.
    pub max_memory_mib: Option<u64>,
    /// `Retry-After` seconds on a 429. Default 5.
    pub retry_after_s: u64,
}

/// Defaults for `POST /v1/sessions` fields left out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionDefaults {
    /// Default 900.
    pub idle_timeout_s: u64,
    /// Default 28,800.
    pub max_lifetime_s: u64,
    /// Default `base`.
    pub image: String,
    /// Default 1.
    pub vcpus: u32,
    /// Default 256.
    pub memory_mib: u32,
    /// Largest vCPU count a session may ask for. Default 8.
    pub max_vcpus: u32,
    /// Largest memory a session may ask for. Default 8192.
    pub max_memory_mib: u32,
}

/// One image: what a guest boots (microvm) or is chrooted into (namespace).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Guest kernel (microvm).
    pub kernel: Option<PathBuf>,
    /// Initramfs: booted by microvm, unpacked as the root by namespace.
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command line (microvm).
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Root file system (ext4, used read-only): the VM's virtio-blk disk,
    /// which guest-agent switches into (microvm), or the loop-mounted
    /// bottom layer of the sandbox's overlay (namespace). None: the
    /// initramfs is the root.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// Loopback port of the image's code interpreter server (the python
    /// image's entrypoint serves Python and JavaScript on 8421). None: the
    /// image runs shell code only.
    #[serde(default)]
    pub interpreter_port: Option<u16>,
    /// The image's agent server, started in a session's guest before its
    /// first invocation (it must serve `GET /ping` and `POST /invocations`
    /// on port 8080). None: the image starts its own, or has none.
    #[serde(default)]
    pub agent_command: Option<Vec<String>>,
}

/// One warm pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Image name.
    pub image: String,
    /// vCPUs. Default 1.
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Memory. Default 256.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// Ready guests to keep. Default 2.
    #[serde(default = "two")]
    pub target: u32,
    /// Boots in flight at once for this pool. Default 1.
    #[serde(default = "one")]
    pub refill_concurrency: u32,
}

fn one() -> u32 {
    1
}
fn two() -> u32 {
    2
}
fn default_memory() -> u32 {
    256
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            max_guests: 64,
            max_memory_mib: None,
            retry_after_s: 5,
        }
    }
}

impl Default for SessionDefaults {
    fn default() -> Self {
        SessionDefaults {
            idle_timeout_s: 900,
            max_lifetime_s: 28_800,
            image: "base".into(),
            vcpus: 1,
            memory_mib: 256,
            max_vcpus: 8,
            max_memory_mib: 8192,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let cache = warren_images::Cache::default_root().join("current");
        let mut images = BTreeMap::new();
        images.insert(
            "base".to_string(),
            ImageConfig {
                kernel: Some(cache.join("vmlinux")),
                initramfs: Some(cache.join("initramfs.cpio")),
                cmdline: None,
                rootfs: None,
                interpreter_port: None,
                agent_command: Some(vec![SAMPLE_AGENT.into()]),
            },
        );
        images.insert(
            "python".to_string(),
            ImageConfig {
                kernel: Some(cache.join("vmlinux")),
                initramfs: Some(cache.join("initramfs.cpio")),
                cmdline: None,
                rootfs: Some(cache.join("python.ext4")),
                interpreter_port: Some(PYTHON_INTERPRETER_PORT),
                agent_command: None,
            },
        );
        Config {
            listen: "127.0.0.1:8420".into(),
            socket: None,
            data_dir: "/var/lib/warren".into(),
            runtime_dir: "/run/warren".into(),
            backend: BackendChoice::Auto,
            fallback_backend: BackendKind::Namespace,
            vmm_binary: None,
            nsinit_binary: None,
            boot_timeout_s: 30,
            drain_grace_s: 10,
            capacity: Capacity::default(),
            sessions: SessionDefaults::default(),
            images,
            pool: vec![
                PoolConfig {
                    image: "base".into(),
                    vcpus: 1,
                    memory_mib: 256,
                    target: 2,
                    refill_concurrency: 1,
                },
                PoolConfig {
                    image: "python".into(),
                    vcpus: 1,
                    memory_mib: PYTHON_MEMORY_MIB,
                    target: 1,
                    refill_concurrency: 1,
                },
            ],
            image_store: ImageStoreConfig::default(),
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses TOML text (`path` is only for messages) and validates it.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges and references.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| {
            Err(ConfigError::Invalid {
                key: key.into(),
                message,
            })
        };
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("listen", format!("{:?} is not an IP:port address", self.listen));
        }
        if self.boot_timeout_s == 0 {
            return bad("boot_timeout_s", "must be at least 1".into());
        }
        if self.capacity.max_guests == 0 {
            return bad("capacity.max_guests", "must be at least 1".into());
        }
        let s = &self.sessions;
        if s.idle_timeout_s == 0 || s.max_lifetime_s == 0 {
            return bad(
                "sessions",
                "idle_timeout_s and max_lifetime_s must be at least 1".into(),
            );
        }
        if !self.images.contains_key(&s.image) {
            return bad("sessions.image", format!("no image {:?} in [images]", s.image));
        }
        if self.image_store.max_image_mib == 0 {
            return bad("image_store.max_image_mib", "must be at least 1".into());
        }
        if self.image_store.max_layers == 0 {
            return bad("image_store.max_layers", "must be at least 1".into());
        }
        for (i, p) in self.pool.iter().enumerate() {
            let key = |k: &str| format!("pool[{i}].{k}");
            if !self.images.contains_key(&p.image) {
                return bad(&key("image"), format!("no image {:?} in [images]", p.image));
            }
            if p.vcpus == 0 || p.vcpus > s.max_vcpus {
                return bad(&key("vcpus"), format!("{} is outside 1..={}", p.vcpus, s.max_vcpus));
            }
            if p.memory_mib < 16 || p.memory_mib > s.max_memory_mib {
                return bad(
                    &key("memory_mib"),
                    format!("{} is outside 16..={}", p.memory_mib, s.max_memory_mib),
                );
            }
            if p.refill_concurrency == 0 {
                return bad(&key("refill_concurrency"), "must be at least 1".into());
            }
        }
        for (name, img) in &self.images {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return bad(
                    &format!("images.{name}"),
                    "image names are letters, digits, '-' or '_'".into(),
                );
            }
            if img.kernel.is_none() && img.initramfs.is_none() {
                return bad(&format!("images.{name}"), "needs a kernel or an initramfs".into());
            }
        }
        Ok(())
    }

    /// The image store's directory.
    pub fn image_store_dir(&self) -> PathBuf {
        self.image_store
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("image-store"))
    }

    /// The API's Unix socket path.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.runtime_dir.join("agentd.sock"))
    }

    /// The memory limit in MiB: configured, else 80 % of the host's memory.
    pub fn max_memory_mib(&self) -> u64 {
        self.capacity.max_memory_mib.unwrap_or_else(|| {
            let total_kib = std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| {
                    m.lines()
                        .find(|l| l.starts_with("MemTotal:"))
                        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
                })
                .unwrap_or(4 << 20);
            total_kib / 1024 * 8 / 10
        })
    }

    /// A helper binary: configured, else next to the running executable,
    /// else the bare name (looked up on `PATH`).
    pub fn helper_binary(configured: &Option<PathBuf>, name: &str) -> PathBuf {
        if let Some(p) = configured {
            return p.clone();
        }
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
        PathBuf::from(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.listen, "127.0.0.1:8420");
        assert_eq!(c.sessions.idle_timeout_s, 900);
        assert_eq!(c.sessions.max_lifetime_s, 28_800);
        assert_eq!(c.pool.len(), 2);
        assert_eq!(c.pool[1].image, "python");
        assert_eq!(c.images["python"].interpreter_port, Some(PYTHON_INTERPRETER_PORT));
        assert!(c.images["python"].rootfs.as_ref().unwrap().ends_with("python.ext4"));
        assert_eq!(c.image_store.max_image_mib, 4096);
        assert_eq!(c.image_store_dir(), Path::new("/var/lib/warren/image-store"));
        assert_eq!(c.socket_path(), Path::new("/run/warren/agentd.sock"));
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../agentd.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.backend, BackendChoice::Auto);
        // The example states the defaults.
        let d = parse("").unwrap();
        let keys = |c: &Config| {
            c.pool
                .iter()
                .map(|p| (p.image.clone(), p.memory_mib, p.target))
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&c), keys(&d));
        assert_eq!(c.image_store.max_layers, d.image_store.max_layers);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = parse("listen_addr = \"x\"").unwrap_err().to_string();
        assert!(e.contains("listen_addr"), "{e}");
        let e = parse("listen = \"nope\"").unwrap_err().to_string();
        assert!(e.contains("listen"), "{e}");
        let e = parse("[[pool]]\nimage = \"missing\"").unwrap_err().to_string();
        assert!(e.contains("pool[0].image") && e.contains("missing"), "{e}");
        let e = parse("[[pool]]\nimage = \"base\"\nvcpus = 0").unwrap_err().to_string();
        assert!(e.contains("pool[0].vcpus"), "{e}");
        let e = parse("[image_store]\nmax_layers = 0").unwrap_err().to_string();
        assert!(e.contains("image_store.max_layers"), "{e}");
        let e = parse("[images.x]\nrootfs = 3").unwrap_err().to_string();
        assert!(e.contains("rootfs"), "{e}");
        let e = parse("backend = \"docker\"").unwrap_err().to_string();
        assert!(e.contains("docker") || e.contains("backend"), "{e}");
    }
}
