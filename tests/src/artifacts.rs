//! Locating the guest kernel and initramfs.

use std::path::PathBuf;

use warren_images::Cache;

/// An artifact a test needs is not there.
#[derive(Debug, thiserror::Error)]
#[error("no guest {what}: set {var} or build it with `cargo xtask {task}` (`cargo xtask test` builds everything tests need); looked for {}", looked.display())]
pub struct MissingArtifact {
    what: &'static str,
    var: &'static str,
    task: &'static str,
    looked: PathBuf,
}

fn find(what: &'static str, var: &'static str, task: &'static str, name: &str) -> Result<PathBuf, MissingArtifact> {
    let looked = match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => Cache::open_default().root().join("current").join(name),
    };
    if looked.is_file() {
        Ok(looked)
    } else {
        Err(MissingArtifact {
            what,
            var,
            task,
            looked,
        })
    }
}

/// The guest kernel: `$WARREN_KERNEL`, else the cache's `current/vmlinux`.
pub fn kernel() -> Result<PathBuf, MissingArtifact> {
    find("kernel", "WARREN_KERNEL", "kernel", "vmlinux")
}

/// The initramfs: `$WARREN_INITRAMFS`, else the cache's `current/initramfs.cpio`.
pub fn initramfs() -> Result<PathBuf, MissingArtifact> {
    find("initramfs", "WARREN_INITRAMFS", "images", "initramfs.cpio")
}

/// The python root file system: `$WARREN_PYTHON_IMAGE`, else the cache's
/// `current/python.ext4`.
pub fn python_image() -> Result<PathBuf, MissingArtifact> {
    find("python image", "WARREN_PYTHON_IMAGE", "images", "python.ext4")
}

/// The probe guest: `$WARREN_PROBE`, else where `cargo xtask probe` builds it.
pub fn probe() -> Result<PathBuf, MissingArtifact> {
    let looked = std::env::var_os("WARREN_PROBE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../guest/probe/target/x86_64-unknown-linux-gnu/release/warren-probe")
    });
    if looked.is_file() {
        Ok(looked)
    } else {
        Err(MissingArtifact {
            what: "probe",
            var: "WARREN_PROBE",
            task: "probe",
            looked,
        })
    }
}

/// Fails the calling test, saying why, when the host has no `/dev/kvm`:
/// tests that boot VMs on KVM must never skip silently.
pub fn require_kvm() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test boots a VM on KVM and /dev/kvm is missing on this host"
    );
}
