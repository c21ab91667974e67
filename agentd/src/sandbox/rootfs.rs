//! Read-only ext4 root file systems for the namespace backend.
//!
//! The microVM backend hands an image's ext4 file to the VMM as its
//! read-only virtio-blk disk; the namespace backend has no guest kernel,
//! so agentd attaches the same file to a loop device (read-only,
//! auto-clearing) and mounts it read-only once, under
//! `<data_dir>/images/rootfs/`. Every sandbox of that image uses the mount
//! as the bottom layer of its overlay, with guest-agent in a small layer
//! above it: the image itself is never written.
//!
//! Loop devices are set up with `LOOP_CONFIGURE` (Linux 5.8+) directly:
//! no dependency on util-linux's `mount` in a hardened unit.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::SandboxError;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn io(step: &'static str, path: &Path, e: impl Into<std::io::Error>) -> SandboxError {
    SandboxError::io(step, path, e.into())
}

/// The directory an image file is mounted on: named after the file and
/// its identity (device, inode, size, mtime), so a rebuilt file gets a new
/// mount and sandboxes running on the old one keep it.
pub fn mount_dir(images_dir: &Path, image: &Path) -> Result<PathBuf, SandboxError> {
    let meta = std::fs::metadata(image).map_err(|e| io("reading the root file system", image, e))?;
    if !meta.is_file() {
        return Err(SandboxError::Image {
            path: image.to_path_buf(),
            why: "not a regular file".into(),
        });
    }
    let stem: String = image
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("rootfs")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok(images_dir.join("rootfs").join(format!(
        "{stem}-{:x}-{:x}-{:x}-{:x}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime()
    )))
}

/// Whether `dir` is a mount point (in this mount namespace).
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(info) = procfs::process::Process::myself().and_then(|p| p.mountinfo()) else {
        return false;
    };
    info.into_iter().any(|m| m.mount_point == dir)
}

/// Mounts `image` (ext4) read-only on its [`mount_dir`] unless it already
/// is (a previous agentd left it: it is reused); returns the directory.
pub fn ensure_mounted(images_dir: &Path, image: &Path) -> Result<PathBuf, SandboxError> {
    // Boots run concurrently; two finding the image unmounted must not
    // stack two mounts (and two loop devices) on one directory.
    static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = MOUNTING.lock().unwrap_or_else(|p| p.into_inner());
    // Only root may walk to the mounts: an image's setuid files must not be
    // reachable from the host (the mount is nosuid too).
    let base = images_dir.join("rootfs");
    std::fs::create_dir_all(&base).map_err(|e| io("creating", &base, e))?;
    std::fs::set_permissions(&base, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| io("restricting", &base, e))?;
    // mountinfo has resolved paths: compare like with like.
    let base = base.canonicalize().map_err(|e| io("resolving", &base, e))?;
    let dir = base.join(mount_dir(images_dir, image)?.file_name().unwrap_or_default());
    if is_mounted(&dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| io("creating the root file system's mount point", &dir, e))?;
    let device = attach(image)?;
    // The loop device auto-clears when its last user goes: after the
    // mount holds it, closing our descriptor is what makes that true.
    let result = mount(
        Some(device.0.as_path()),
        &dir,
        Some("ext4"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some("noload"),
    );
    drop(device);
    result.map_err(|e| SandboxError::Image {
        path: image.to_path_buf(),
        why: format!("mounting it (ext4, read-only) on {}: {e}", dir.display()),
    })?;
    Ok(dir)
}

/// Lazily unmounts the mount of `image` (deleted or replaced), if any.
pub fn unmount(images_dir: &Path, image: &Path) -> bool {
    let Ok(dir) = mount_dir(images_dir, image) else {
        return false;
    };
    let dir = dir.canonicalize().unwrap_or(dir);
    if !is_mounted(&dir) {
        return false;
    }
    let done = umount2(&dir, MntFlags::MNT_DETACH).is_ok();
    let _ = std::fs::remove_dir(&dir);
    done
}

/// Lazily unmounts every root file system under `images_dir` (sandboxes
/// still using one keep it until they end; the loop device then clears).
pub fn unmount_all(images_dir: &Path) -> usize {
    let base = images_dir.join("rootfs");
    let base = base.canonicalize().unwrap_or(base);
    let Ok(info) = procfs::process::Process::myself().and_then(|p| p.mountinfo()) else {
        return 0;
    };
    let mut n = 0;
    for m in info
        .into_iter()
        .filter(|m| m.mount_point.parent() == Some(base.as_path()))
    {
        match umount2(&m.mount_point, MntFlags::MNT_DETACH) {
            Ok(()) => {
                n += 1;
                let _ = std::fs::remove_dir(&m.mount_point);
            }
            Err(e) => tracing::warn!(dir = %m.mount_point.display(), error = %e, "cannot unmount a root file system"),
        }
    }
    n
}

/// A configured loop device, open.
struct Attached(PathBuf, #[allow(dead_code)] File);

fn attach(image: &Path) -> Result<Attached, SandboxError> {
    let backing = File::open(image).map_err(|e| io("opening the root file system", image, e))?;
    let ctl_path = Path::new("/dev/loop-control");
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open(ctl_path)
        .map_err(|e| io("opening (loop devices are needed for ext4 images)", ctl_path, e))?;
    // Another process may take the free device between GET_FREE and
    // CONFIGURE (EBUSY): ask again.
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io(
                "asking for a free loop device",
                ctl_path,
                std::io::Error::last_os_error(),
            ));
        }
        let dev_path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new()
            .read(true)
            .open(&dev_path)
            .map_err(|e| io("opening", &dev_path, e))?;
        let cfg = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
                lo_file_name: [0; 64],
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which
        // `cfg` lays out exactly (repr(C)); it lives across the call.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if rc == 0 {
            return Ok(Attached(dev_path, dev));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(io("configuring", &dev_path, err));
        }
    }
    Err(SandboxError::Image {
        path: image.to_path_buf(),
        why: "every free loop device was taken before it could be configured".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_dir_follows_the_file_identity() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("py thon.ext4");
        std::fs::write(&f, b"x").unwrap();
        let a = mount_dir(dir.path(), &f).unwrap();
        assert!(a.starts_with(dir.path().join("rootfs")));
        assert!(a.file_name().unwrap().to_str().unwrap().starts_with("py_thon-"));
        std::fs::write(&f, b"xy").unwrap();
        assert_ne!(mount_dir(dir.path(), &f).unwrap(), a);
        assert!(mount_dir(dir.path(), dir.path()).is_err());
        assert!(mount_dir(dir.path(), &dir.path().join("missing")).is_err());
    }
}
