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
