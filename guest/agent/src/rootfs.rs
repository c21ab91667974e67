//! Switching into the image's root file system.
//!
//! With `warren.root=/dev/vda` on the kernel command line, the initramfs
//! is only a loader: guest-agent mounts the device read-only, puts a tmpfs
//! overlay on top (every write of the session lands in guest memory and
//! vanishes with the VM), moves `/dev`, `/proc` and `/sys` over, frees the
//! initramfs and makes the overlay `/` — the same steps as switch_root(8),
//! except that PID 1 does not exec anything: guest-agent stays PID 1, its
//! code already in memory.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot};

/// Where the pieces are mounted inside the initramfs before the switch.
const SYSROOT: &str = "/sysroot";
/// How long to wait for the disk's device node.
const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// Why the switch failed. The caller logs it and carries on in the
/// initramfs, so the host can still ask what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {detail}")]
pub struct SwitchError {
    step: &'static str,
    detail: String,
}

fn fail(step: &'static str, detail: impl std::fmt::Display) -> SwitchError {
    SwitchError {
        step,
        detail: detail.to_string(),
    }
}

/// Mounts `device` (`fstype`, read-only) under a tmpfs overlay and makes it
/// the root. `/proc`, `/sys` and `/dev` must be mounted already.
pub fn switch(device: &str, fstype: &str) -> Result<(), SwitchError> {
    let started = Instant::now();
    while !Path::new(device).exists() {
        if started.elapsed() > DEVICE_WAIT {
            return Err(fail(
                "waiting for the root device",
                format!("{device} did not appear within {DEVICE_WAIT:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (lower, rw, root) = (
        format!("{SYSROOT}/lower"),
        format!("{SYSROOT}/rw"),
        format!("{SYSROOT}/root"),
    );
    for d in [&lower, &rw, &root] {
        std::fs::create_dir_all(d).map_err(|e| fail("creating mount points", format!("{d}: {e}")))?;
    }
    mount(
        Some(device),
        lower.as_str(),
        Some(fstype),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| {
        fail(
            "mounting the root device",
            format!("{device} ({fstype}) on {lower}: {e}"),
        )
    })?;
    mount(
        Some("warren-rw"),
        rw.as_str(),
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
    .map_err(|e| fail("mounting the overlay's tmpfs", e))?;
    for d in ["upper", "work"] {
        std::fs::create_dir_all(format!("{rw}/{d}")).map_err(|e| fail("creating the overlay directories", e))?;
    }
    let opts = format!("lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work");
    mount(
        Some("warren-root"),
        root.as_str(),
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| fail("mounting the overlay", e))?;
    for d in ["dev", "proc", "sys"] {
        let target = format!("{root}/{d}");
        std::fs::create_dir_all(&target).map_err(|e| fail("creating /dev, /proc, /sys in the image", e))?;
        mount(
            Some(format!("/{d}").as_str()),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| fail("moving a kernel file system into the new root", format!("/{d}: {e}")))?;
    }
    chdir(root.as_str()).map_err(|e| fail("entering the new root", e))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| fail("moving the new root onto /", e))?;
    // Until the chroot, "/" is still the initramfs: free it now that
    // nothing can fail any more (a failed switch keeps its busybox).
    free_initramfs();
    chroot(".").map_err(|e| fail("chroot into the new root", e))?;
    chdir("/").map_err(|e| fail("chdir /", e))?;
    tracing::info!(
        device,
        fstype,
        ms = started.elapsed().as_millis() as u64,
        "switched root"
    );
    Ok(())
}

/// Deletes the initramfs's own files (they would otherwise hold guest
/// memory for the life of the VM), staying on its file system: the mounts
/// under `/sysroot`, `/dev`, `/proc` and `/sys` are not touched.
fn free_initramfs() {
    let Ok(root_dev) = std::fs::metadata("/").map(|m| m.dev()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir("/") else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        if matches!(name.to_str(), Some("sysroot" | "dev" | "proc" | "sys")) {
            continue;
        }
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != root_dev {
            continue;
        }
        let result = if meta.is_dir() {
            remove_on_device(&path, root_dev)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(e) = result {
            tracing::debug!(path = %path.display(), error = %e, "cannot free an initramfs file");
        }
    }
}

fn remove_on_device(dir: &Path, dev: u64) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        let path = e.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_on_device(&path, dev)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    std::fs::remove_dir(dir)
}
