//! The VM's whole configuration, given once at start (flags or JSON) and
//! validated before anything is built.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::devices::virtio::block::DiskIo;
use crate::layout::{CMDLINE_MAX, MIN_MEM_MIB};

/// Default kernel command line for a Linux guest.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 tsc=reliable";

/// Configuration of one microVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// 64-bit ELF kernel (vmlinux, or the probe guest).
    pub kernel: PathBuf,
    /// Optional initramfs, loaded at the top of low memory.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// vCPUs, 1..=KVM_CAP_MAX_VCPUS.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    /// Kernel command line (virtio-mmio devices are appended).
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Host side of virtio-vsock: a Unix socket path.
    #[serde(default)]
    pub vsock_socket: Option<PathBuf>,
    /// Control socket path.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Read-only base image, the first virtio-blk device.
    #[serde(default)]
    pub disk: Option<PathBuf>,
    /// Writable per-session scratch disk, the second virtio-blk device
    /// (needs `disk`).
    #[serde(default)]
    pub scratch_disk: Option<PathBuf>,
    /// How the disks do their I/O: `auto` (io_uring, or synchronous
    /// system calls with a warning where the kernel refuses it),
    /// `io_uring` (or the VM does not start) or `sync`.
    #[serde(default)]
    pub disk_io: DiskIo,
    /// Emulate an 8250 UART on COM1, its output to the VMM's stderr.
    #[serde(default)]
    pub serial: bool,
    /// Report boot-timer stamps on stderr as they arrive.
    #[serde(default)]
    pub boot_timer: bool,
}

fn default_vcpus() -> u8 {
    1
}
fn default_mem() -> u64 {
    128
}
fn default_cmdline() -> String {
    DEFAULT_CMDLINE.into()
}

/// A configuration that cannot be used, naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The JSON file could not be read or parsed.
    #[error("config file {}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The kernel file is missing or unreadable.
    #[error("kernel {}: {reason}", path.display())]
    Kernel {
        /// The kernel path.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// The initramfs is missing, unreadable or too large.
    #[error("initramfs {}: {reason}", path.display())]
    Initramfs {
        /// The initramfs path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A disk image is missing, not a regular file, too small or
    /// unreadable (or, for the scratch disk, not writable).
    #[error("{which} {}: {reason}", path.display())]
    Disk {
        /// `disk` or `scratch_disk`.
        which: &'static str,
        /// The disk path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// vCPU count out of range.
    #[error("vcpus must be between 1 and {max} (the host's KVM_CAP_MAX_VCPUS), got {got}")]
    Vcpus {
        /// What was asked.
        got: u64,
        /// The host's limit.
        max: u64,
    },
    /// Too little memory.
    #[error("mem_mib must be at least {MIN_MEM_MIB}, got {0}")]
    MemoryTooSmall(u64),
    /// Too much memory for this host.
    #[error("mem_mib {0} exceeds what this VMM supports (1 TiB)")]
    MemoryTooLarge(u64),
    /// Command line too long or not ASCII.
    #[error("cmdline: {0}")]
    Cmdline(String),
    /// A socket path cannot be used.
    #[error("{which} {}: {reason}", path.display())]
    Socket {
        /// `vsock_socket` or `control_socket`.
        which: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initramfs: None,
            vcpus: default_vcpus(),
            mem_mib: default_mem(),
            cmdline: default_cmdline(),
            vsock_socket: None,
            control_socket: None,
            disk: None,
            scratch_disk: None,
            disk_io: DiskIo::Auto,
            serial: false,
            boot_timer: false,
        }
    }

    /// Reads a JSON configuration file.
    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::File {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }

    /// Checks everything that can be checked before KVM is touched;
    /// `max_vcpus` is the host's KVM_CAP_MAX_VCPUS.
    pub fn validate(&self, max_vcpus: u64) -> Result<(), ConfigError> {
        if self.vcpus == 0 || u64::from(self.vcpus) > max_vcpus {
            return Err(ConfigError::Vcpus {
                got: self.vcpus.into(),
                max: max_vcpus,
            });
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemoryTooSmall(self.mem_mib));
        }
        if self.mem_mib > 1 << 20 {
            return Err(ConfigError::MemoryTooLarge(self.mem_mib));
        }
        check_kernel(&self.kernel)?;
        if let Some(initrd) = &self.initramfs {
            let err = |reason: String| ConfigError::Initramfs {
                path: initrd.clone(),
                reason,
            };
            let len = std::fs::metadata(initrd).map_err(|e| err(e.to_string()))?.len();
            // It must fit below the MMIO hole with room for the kernel.
            let low = self.mem_bytes().min(crate::layout::MMIO_START);
            if len >= low / 2 {
                return Err(err(format!(
                    "{len} bytes does not fit in {} MiB of guest memory (it may use at most half)",
                    self.mem_mib
                )));
            }
        }
        let base = match &self.disk {
            Some(disk) => Some(check_disk("disk", disk, false)?),
            None => None,
        };
        if let Some(scratch) = &self.scratch_disk {
            let id = check_disk("scratch_disk", scratch, true)?;
            let err = |reason: &str| ConfigError::Disk {
                which: "scratch_disk",
                path: scratch.clone(),
                reason: reason.into(),
            };
            match base {
                None => return Err(err("needs disk: the read-only base image is always the first disk")),
                Some(b) if b == id => {
                    return Err(err("is the same file as disk, which must stay read-only"));
                }
                Some(_) => {}
            }
        }
        if self.cmdline.len() + 1 > CMDLINE_MAX / 2 {
            return Err(ConfigError::Cmdline(format!(
                "{} bytes is too long (at most {}, the rest is kept for devices)",
                self.cmdline.len(),
                CMDLINE_MAX / 2 - 1
            )));
        }
        if !self.cmdline.is_ascii() || self.cmdline.contains('\0') {
            return Err(ConfigError::Cmdline("must be ASCII without NUL bytes".into()));
        }
        for (which, path) in [
            ("vsock_socket", &self.vsock_socket),
            ("control_socket", &self.control_socket),
        ] {
            if let Some(p) = path {
                check_socket_path(which, p)?;
            }
        }
        Ok(())
    }
}

/// The kernel must be a readable 64-bit x86_64 ELF executable.
fn check_kernel(path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::Kernel {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut hdr = [0u8; 20];
    f.read_exact(&mut hdr)
        .map_err(|_| err("too short to be an ELF kernel".into()))?;
    if &hdr[..4] != b"\x7fELF" {
        return Err(err(
            "not an ELF file (an uncompressed vmlinux is needed, not a bzImage)".into(),
        ));
    }
    if hdr[4] != 2 || hdr[5] != 1 {
        return Err(err("not a 64-bit little-endian ELF".into()));
    }
    let machine = u16::from_le_bytes([hdr[18], hdr[19]]);
    if machine != 62 {
        return Err(err(format!("ELF machine {machine} is not x86_64 (62)")));
    }
    Ok(())
}

/// A disk image must be a regular file of at least one sector that can be
/// opened (read-write for the scratch disk); returns its (device, inode).
fn check_disk(which: &'static str, path: &Path, writable: bool) -> Result<(u64, u64), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let err = |reason: String| ConfigError::Disk {
        which,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => err("does not exist".into()),
        _ => err(e.to_string()),
    })?;
    if !meta.is_file() {
        return Err(err("is not a regular file".into()));
    }
    if meta.len() < crate::devices::virtio::block::SECTOR_BYTES {
        return Err(err(format!(
            "is {} bytes, smaller than one 512-byte sector",
            meta.len()
        )));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| {
            err(if writable {
                format!("cannot be opened for writing: {e}")
            } else {
                format!("cannot be opened: {e}")
            })
        })?;
    Ok((meta.dev(), meta.ino()))
}

/// A socket path must be creatable: its directory exists and nothing is
/// there yet (a stale socket is the caller's to remove, not ours to clobber).
fn check_socket_path(which: &'static str, path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::Socket {
        which,
        path: path.to_path_buf(),
        reason,
    };
    let dir = match path.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => return Err(err("is not a file path".into())),
    };
    if !dir.is_dir() {
        return Err(err(format!("directory {} does not exist", dir.display())));
    }
    if path.symlink_metadata().is_ok() {
        return Err(err("already exists; remove it first".into()));
    }
    if path.as_os_str().len() >= 108 {
        return Err(err("longer than a Unix socket path may be (107 bytes)".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_stub(dir: &Path) -> PathBuf {
        let p = dir.join("k");
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18] = 62;
        std::fs::write(&p, h).unwrap();
        p
    }

    #[test]
    fn defaults_validate() {
        let d = tempfile::tempdir().unwrap();
        VmConfig::new(elf_stub(d.path())).validate(8).unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let d = tempfile::tempdir().unwrap();
        let k = elf_stub(d.path());
        let mut c = VmConfig::new(&k);
        c.vcpus = 0;
        assert!(c.validate(8).unwrap_err().to_string().contains("vcpus"));
        c.vcpus = 9;
        assert!(matches!(c.validate(8), Err(ConfigError::Vcpus { got: 9, max: 8 })));
        let mut c = VmConfig::new(&k);
        c.mem_mib = 4;
        assert!(matches!(c.validate(8), Err(ConfigError::MemoryTooSmall(4))));
        let c = VmConfig::new(d.path().join("missing"));
        assert!(matches!(c.validate(8), Err(ConfigError::Kernel { .. })));
        std::fs::write(d.path().join("text"), "not a kernel at all, just text").unwrap();
        let e = VmConfig::new(d.path().join("text"))
            .validate(8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an ELF"), "{e}");
        let mut c = VmConfig::new(&k);
        c.cmdline = "x".repeat(5000);
        assert!(matches!(c.validate(8), Err(ConfigError::Cmdline(_))));
    }

    #[test]
    fn initramfs_larger_than_memory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut c = VmConfig::new(elf_stub(d.path()));
        c.mem_mib = 16;
        let big = d.path().join("initrd");
        std::fs::File::create(&big).unwrap().set_len(9 << 20).unwrap();
        c.initramfs = Some(big);
        let e = c.validate(8).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
    }

    #[test]
    fn socket_paths_need_a_directory_and_no_file() {
        let d = tempfile::tempdir().unwrap();
        let mut c = VmConfig::new(elf_stub(d.path()));
        c.vsock_socket = Some(d.path().join("no/such/dir/v.sock"));
        assert!(c.validate(8).unwrap_err().to_string().contains("does not exist"));
        let existing = d.path().join("ctl.sock");
        std::fs::write(&existing, "").unwrap();
        c.vsock_socket = None;
        c.control_socket = Some(existing);
        assert!(c.validate(8).unwrap_err().to_string().contains("already exists"));
    }

    #[test]
    fn disks_must_be_regular_files_of_a_sector_or_more() {
        let d = tempfile::tempdir().unwrap();
        let mut c = VmConfig::new(elf_stub(d.path()));
        let disk = |e: ConfigError| match e {
            ConfigError::Disk { which, reason, .. } => format!("{which}: {reason}"),
            other => panic!("not a disk error: {other}"),
        };
        c.disk = Some(d.path().join("missing.img"));
        assert_eq!(disk(c.validate(8).unwrap_err()), "disk: does not exist");
        c.disk = Some(d.path().to_path_buf());
        assert_eq!(disk(c.validate(8).unwrap_err()), "disk: is not a regular file");
        let tiny = d.path().join("tiny.img");
        std::fs::write(&tiny, [0u8; 100]).unwrap();
        c.disk = Some(tiny);
        let e = c.validate(8).unwrap_err();
        assert!(e.to_string().starts_with("disk "), "{e}");
        assert!(disk(e).contains("smaller than one 512-byte sector"));
        let base = d.path().join("base.img");
        std::fs::write(&base, [0u8; 4096]).unwrap();
        c.disk = Some(base.clone());
        c.validate(8).unwrap();
    }

    #[test]
    fn the_scratch_disk_needs_a_base_disk_and_its_own_writable_file() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let mut c = VmConfig::new(elf_stub(d.path()));
        let (base, scratch) = (d.path().join("base.img"), d.path().join("scratch.img"));
        std::fs::write(&base, [0u8; 4096]).unwrap();
        std::fs::write(&scratch, [0u8; 4096]).unwrap();
        c.scratch_disk = Some(scratch.clone());
        let e = c.validate(8).unwrap_err().to_string();
        assert!(e.starts_with("scratch_disk ") && e.contains("needs disk"), "{e}");
        c.disk = Some(base.clone());
        c.validate(8).unwrap();
        c.scratch_disk = Some(base.clone());
        let e = c.validate(8).unwrap_err().to_string();
        assert!(e.contains("same file as disk"), "{e}");
        c.scratch_disk = Some(d.path().join("none.img"));
        assert!(c.validate(8).unwrap_err().to_string().contains("does not exist"));
        // Read-only to its owner; root ignores permissions, so only
        // check the message when the open really fails.
        std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o444)).unwrap();
        c.scratch_disk = Some(scratch.clone());
        if std::fs::OpenOptions::new().write(true).open(&scratch).is_err() {
            let e = c.validate(8).unwrap_err().to_string();
            assert!(e.contains("cannot be opened for writing"), "{e}");
        }
    }

    #[test]
    fn disk_keys_in_json() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.json");
        std::fs::write(
            &p,
            r#"{"kernel": "/k", "disk": "/b.img", "scratch_disk": "/s.img", "disk_io": "io_uring"}"#,
        )
        .unwrap();
        let c = VmConfig::from_json_file(&p).unwrap();
        assert_eq!(c.scratch_disk.as_deref(), Some(Path::new("/s.img")));
        assert_eq!(c.disk_io, DiskIo::IoUring);
        assert_eq!(VmConfig::new("/k").disk_io, DiskIo::Auto);
        std::fs::write(&p, r#"{"kernel": "/k", "disk_io": "aio"}"#).unwrap();
        let e = VmConfig::from_json_file(&p).unwrap_err().to_string();
        assert!(e.contains("aio"), "{e}");
        assert_eq!("sync".parse::<DiskIo>(), Ok(DiskIo::Sync));
        assert!("fast".parse::<DiskIo>().unwrap_err().contains("auto, io_uring or sync"));
    }

    #[test]
    fn json_round_trips_and_rejects_unknown_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.json");
        std::fs::write(&p, r#"{"kernel": "/k", "vcpus": 2, "mem_mib": 256}"#).unwrap();
        let c = VmConfig::from_json_file(&p).unwrap();
        assert_eq!((c.vcpus, c.mem_mib, c.cmdline.as_str()), (2, 256, DEFAULT_CMDLINE));
        std::fs::write(&p, r#"{"kernel": "/k", "vcpu": 2}"#).unwrap();
        assert!(VmConfig::from_json_file(&p).unwrap_err().to_string().contains("vcpu"));
    }
}
