//! OCI / docker image import: an image → `<store>/<name>/rootfs.ext4` and
//! `<store>/<name>/image.json`.
//!
//! [`import`] takes either an OCI image layout directory (`oci-layout`,
//! `index.json`, `blobs/sha256/…`) or a `docker save` tarball (its
//! `manifest.json`, old `<id>/layer.tar` layout or the newer one whose blobs
//! are under `blobs/`); which one is decided by looking: `manifest.json` →
//! docker archive, else `oci-layout` → OCI layout, the same for a directory
//! or a tarball. An index (nested or not) yields its linux/amd64 manifest,
//! else its only one (attestation manifests aside).
//!
//! Trust: every manifest, index and config is checked against the digest
//! (and size) that referenced it before it is parsed; every layer blob
//! against its manifest digest before it is unpacked, and its uncompressed
//! stream against the config's `rootfs.diff_ids` (the only check an old
//! docker archive allows). Layers are plain or gzip tars, told apart by
//! their magic bytes; zstd, bzip2 and xz are refused.
//!
//! Layers are applied in order to a staging tree inside the store
//! (`<store>/.staging-<name>-<pid>-<n>`, mode 0700), with the overlay
//! whiteout rules (`.wh.<name>` removes a lower `<name>`; `.wh..wh..opq`
//! empties a directory of what lower layers put there, whatever its place
//! in the tar). A hostile layer cannot write outside the tree: paths are
//! taken relative to the root and `..` may not climb out of it; every
//! directory on the way is opened with `O_NOFOLLOW` from the tree's own
//! descriptor, so an entry under a symlink (`evil -> /etc`, then
//! `evil/passwd`) is an error; an entry replacing a symlink unlinks it
//! first; symlink targets that climb above the root lexically and hard
//! links to anything but an already extracted non-directory are refused.
//! The sum of file sizes is checked against the limit before each file is
//! written.
//!
//! Kept: modes (setuid, setgid, sticky too), numeric owners, mtimes,
//! symlinks, hard links, directories, fifos, and the `security.capability`
//! attribute from PAX records. Character and block devices are skipped
//! and listed in [`ImportedImage::skipped_devices`]: the guest gets its
//! devices from devtmpfs. The importer must run as root (owners).
//!
//! The metadata is also written into the tree at `/etc/warren/image.json`
//! (for the guest's init) before [`crate::ext4::build`] makes the image in
//! a temporary directory of the store, which is then renamed to
//! `<store>/<name>` with `RENAME_NOREPLACE`: an image is never replaced.
//! On any error the staging and temporary directories are removed (a crash
//! leaves them: [`remove_leftovers`] clears those of dead processes).
//!
//! A layer blob is read twice: once to check its digest before anything
//! is unpacked, once to unpack it (hashing the uncompressed stream for its
//! `diff_id`). A zero-length layer blob is taken as an empty layer; a tar
//! that ends without its end-of-archive marker is truncated.

mod error;
mod layer;
mod manifest;
mod metadata;
mod source;
mod tree;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{self as rfs, Gid, Mode, OFlags, RenameFlags, Uid, CWD};
use rustix::io::Errno;

pub use error::OciError;
pub use metadata::{ImageMetadata, UserSpec};

use crate::ext4::{self, Ext4Error, Ext4Options};

/// The metadata file in an image's directory and (under `/`) in its rootfs.
pub const METADATA_FILE: &str = "image.json";
/// The root file system in an image's directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// Where the metadata is inside the rootfs.
pub const GUEST_METADATA_PATH: &str = "/etc/warren/image.json";

/// How much an import may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportLimits {
    /// Most bytes of file content, summed over all layers (files a later
    /// layer replaces still count) and checked before each file is written;
    /// also the limit handed to [`ext4::build`] for the final tree (which
    /// counts sizes rounded up to 4 KiB).
    pub max_image_bytes: u64,
    /// Most layers in the manifest.
    pub max_layers: usize,
    /// Most tar entries over all layers (bounds inodes and time spent on
    /// empty files, which `max_image_bytes` does not see).
    pub max_entries: usize,
}

impl Default for ImportLimits {
    fn default() -> Self {
        ImportLimits {
            max_image_bytes: 4 << 30,
            max_layers: 128,
            max_entries: 1_000_000,
        }
    }
}

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedImage {
    /// Its name.
    pub name: String,
    /// `<store>/<name>`.
    pub dir: PathBuf,
    /// `<dir>/rootfs.ext4`.
    pub rootfs: PathBuf,
    /// `<dir>/image.json`.
    pub metadata_path: PathBuf,
    /// What `image.json` holds.
    pub metadata: ImageMetadata,
    /// The size of `rootfs.ext4`.
    pub rootfs_bytes: u64,
    /// Bytes of file content extracted (over all layers).
    pub content_bytes: u64,
    /// Character and block device entries that were skipped.
    pub skipped_devices: Vec<String>,
}

/// Checks an image name: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), OciError> {
    let bad = |reason| {
        Err(OciError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    let bytes = name.as_bytes();
    match bytes.first() {
        None => return bad("it is empty"),
        Some(b) if !(b.is_ascii_lowercase() || b.is_ascii_digit()) => {
            return bad("it must start with a lowercase letter or a digit")
        }
        _ => {}
    }
    if bytes.len() > 63 {
        return bad("it is longer than 63 characters");
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only a-z, 0-9, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Reads `<store>/<name>/image.json`.
pub fn read_metadata(store: &Path, name: &str) -> Result<ImageMetadata, OciError> {
    validate_name(name)?;
    let path = store.join(name).join(METADATA_FILE);
    let data = std::fs::read(&path).map_err(|e| OciError::io(&path, e))?;
    serde_json::from_slice(&data).map_err(|e| OciError::malformed(path.display().to_string(), e.to_string()))
}

/// Removes what imports that died left in `store`: `.staging-*` and
/// `.tmp-*` directories whose process no longer exists (an import removes
/// its own on any error; only a crash leaves them). Returns what was
/// removed.
pub fn remove_leftovers(store: &Path) -> Result<Vec<PathBuf>, OciError> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(store) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(OciError::io(store, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| OciError::io(store, e))?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(".staging-").or_else(|| name.strip_prefix(".tmp-")) else {
            continue;
        };
        // <name>-<pid>-<seq>, the name may hold '-'.
        let mut parts = rest.rsplitn(3, '-');
        let (Some(_seq), Some(pid), Some(_name)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        std::fs::remove_dir_all(&path).map_err(|e| OciError::io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Removes its directories when dropped.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for dir in &self.0 {
            if dir.symlink_metadata().is_ok() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Imports the image at `src` into `store` (created when missing) as
/// `name`. See the [module documentation](self).
pub fn import(src: &Path, store: &Path, name: &str, limits: &ImportLimits) -> Result<ImportedImage, OciError> {
    validate_name(name)?;
    std::fs::create_dir_all(store).map_err(|e| OciError::io(store, e))?;
    let dest = store.join(name);
    let exists = || OciError::AlreadyExists {
        name: name.to_string(),
        store: store.to_path_buf(),
    };
    if dest.symlink_metadata().is_ok() {
        return Err(exists());
    }
    let source = source::Source::open(src)?;
    let plan = manifest::plan(&source, src)?;
    if plan.layers.len() > limits.max_layers {
        return Err(OciError::TooManyLayers {
            count: plan.layers.len(),
            limit: limits.max_layers,
        });
    }

    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let staging = store.join(format!(".staging-{name}-{pid}-{seq}"));
    let tmp = store.join(format!(".tmp-{name}-{pid}-{seq}"));
    let _cleanup = Cleanup(vec![staging.clone(), tmp.clone()]);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| OciError::io(&staging, e))?;
    let rootfs_dir = staging.join("rootfs");
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&rootfs_dir)
        .map_err(|e| OciError::io(&rootfs_dir, e))?;
    let tree = tree::Tree::open(&rootfs_dir).map_err(|e| OciError::io(&rootfs_dir, e))?;

    let mut extractor = layer::Extractor::new(&tree, limits.max_image_bytes, limits.max_entries);
    for layer in &plan.layers {
        extractor.apply(&source, layer)?;
    }
    let user = match plan.config.config.as_ref().and_then(|c| c.user.as_deref()) {
        Some(u) => metadata::resolve_user_in(&tree, u)?,
        None => None,
    };
    let metadata = metadata::build(name, &plan, user);
    let mut json = serde_json::to_vec_pretty(&metadata).expect("metadata serializes");
    json.push(b'\n');
    put_guest_metadata(&tree, &json)?;
    extractor.finish()?;
    let (content_bytes, skipped_devices) = (extractor.bytes, std::mem::take(&mut extractor.skipped_devices));
    drop(extractor);
    drop(tree);

    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&tmp)
        .map_err(|e| OciError::io(&tmp, e))?;
    let opts = Ext4Options {
        max_bytes: Some(limits.max_image_bytes),
        ..Ext4Options::default()
    };
    let image = ext4::build(&rootfs_dir, &tmp.join(ROOTFS_FILE), &opts).map_err(|e| match e {
        Ext4Error::TooLarge { bytes, limit } => OciError::TooLarge {
            limit,
            at: format!("the extracted tree takes {bytes} bytes in 4 KiB blocks"),
        },
        e => OciError::Ext4(e),
    })?;
    let meta_tmp = tmp.join(METADATA_FILE);
    std::fs::write(&meta_tmp, &json).map_err(|e| OciError::io(&meta_tmp, e))?;

    match rfs::renameat_with(CWD, &tmp, CWD, &dest, RenameFlags::NOREPLACE) {
        Ok(()) => {}
        Err(Errno::EXIST) | Err(Errno::NOTEMPTY) => return Err(exists()),
        // A file system without RENAME_NOREPLACE: check, then rename (which
        // fails on a non-empty directory anyway).
        Err(Errno::INVAL) | Err(Errno::NOSYS) => {
            if dest.symlink_metadata().is_ok() {
                return Err(exists());
            }
            std::fs::rename(&tmp, &dest).map_err(|e| OciError::io(&dest, e))?;
        }
        Err(e) => return Err(OciError::io(&dest, e.into())),
    }
    Ok(ImportedImage {
        name: name.to_string(),
        rootfs: dest.join(ROOTFS_FILE),
        metadata_path: dest.join(METADATA_FILE),
        dir: dest,
        metadata,
        rootfs_bytes: image.bytes,
        content_bytes,
        skipped_devices,
    })
}

/// Writes `/etc/warren/image.json` into the tree (root-owned, 0644),
/// replacing whatever the image had there.
fn put_guest_metadata(tree: &tree::Tree, json: &[u8]) -> Result<(), OciError> {
    let what = format!("the image's {GUEST_METADATA_PATH}");
    let comps: Vec<OsString> = vec!["etc".into(), "warren".into()];
    let dir = match tree.dir(&comps, true) {
        Ok(d) => d.expect("created"),
        Err(tree::TreeError::Symlink(p)) => {
            return Err(OciError::malformed(what, format!("/{} is a symlink", p.display())))
        }
        Err(tree::TreeError::NotDir(p)) => {
            return Err(OciError::malformed(
                what,
                format!("/{} is not a directory", p.display()),
            ))
        }
        Err(tree::TreeError::Io(e)) => return Err(OciError::io(GUEST_METADATA_PATH, e)),
    };
    let io = |e: std::io::Error| OciError::io(GUEST_METADATA_PATH, e);
    tree::remove_all(std::os::fd::AsFd::as_fd(&dir), METADATA_FILE.as_ref()).map_err(io)?;
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rfs::openat(&dir, METADATA_FILE, flags, Mode::from_raw_mode(0o644)).map_err(|e| io(e.into()))?;
    rfs::fchown(&fd, Some(Uid::ROOT), Some(Gid::ROOT)).map_err(|e| io(e.into()))?;
    rfs::fchmod(&fd, Mode::from_raw_mode(0o644)).map_err(|e| io(e.into()))?;
    std::fs::File::from(fd).write_all(json).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["a", "0", "alpine-3.20", "my_image.v2", &"a".repeat(63)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "A",
            "-a",
            ".a",
            "_a",
            "a/b",
            "a b",
            "..",
            "é",
            &"a".repeat(64),
            "a\0",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn leftovers_of_dead_imports_are_removed() {
        let store = tempfile::tempdir().unwrap();
        let dead = 0x7fff_fff0u32; // above pid_max
        let me = std::process::id();
        for d in [
            format!(".staging-my-img-{dead}-0"),
            format!(".tmp-my-img-{dead}-3"),
            format!(".staging-live-{me}-1"),
            "keep".to_string(),
            ".staging-odd".to_string(),
        ] {
            std::fs::create_dir_all(store.path().join(d).join("x")).unwrap();
        }
        let mut removed = remove_leftovers(store.path()).unwrap();
        removed.sort();
        assert_eq!(
            removed,
            [
                store.path().join(format!(".staging-my-img-{dead}-0")),
                store.path().join(format!(".tmp-my-img-{dead}-3"))
            ]
        );
        let mut left: Vec<String> = std::fs::read_dir(store.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [format!(".staging-live-{me}-1"), ".staging-odd".into(), "keep".into()]
        );
    }
}
