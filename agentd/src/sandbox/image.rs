//! Unpacking an initramfs (newc cpio) into a directory the namespace
//! backend can use as the read-only lower layer of each sandbox's overlay.
//!
//! The microVM backend boots the initramfs as is; the namespace backend has
//! no kernel to unpack it, so agentd does it once per distinct archive. The
//! directory is named after the archive's SHA-256, so a rebuilt image gets
//! a new directory and running sandboxes keep the old one.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::SandboxError;

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
/// Longest symlink target we accept (PATH_MAX).
const MAX_LINK: u32 = 4096;

fn image_err(path: &Path, why: impl std::fmt::Display) -> SandboxError {
    SandboxError::Image {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Extracts the newc cpio at `cpio` into `images_dir/<name>-<sha256
/// prefix>/` (directories, regular files, symlinks and hard links with
/// their modes and owners; device nodes, FIFOs and sockets are skipped)
/// and returns that directory. An existing directory of that name is
/// reused. Extraction goes to a temporary sibling that is renamed into
/// place, so a crash never leaves a half-unpacked image under the final
/// name.
pub fn unpack_image(cpio: &Path, images_dir: &Path) -> Result<PathBuf, SandboxError> {
    let digest = sha256_file(cpio)?;
    let stem = cpio
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && !s.starts_with('.'))
        .unwrap_or("image");
    let name = format!("{stem}-{}", &digest[..16]);
    let dest = images_dir.join(&name);
    if dest.is_dir() {
        return Ok(dest);
    }
    fs::create_dir_all(images_dir).map_err(|e| SandboxError::io("creating the images directory", images_dir, e))?;
    let tmp = images_dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&tmp)
        .map_err(|e| SandboxError::io("creating the unpack directory", &tmp, e))?;
    if let Err(e) = extract(cpio, &tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match fs::rename(&tmp, &dest) {
        Ok(()) => Ok(dest),
        // Another unpacker won the race: theirs is as good as ours.
        Err(_) if dest.is_dir() => {
            let _ = fs::remove_dir_all(&tmp);
            Ok(dest)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(SandboxError::io("renaming the unpacked image into place", &dest, e))
        }
    }
}

fn sha256_file(path: &Path) -> Result<String, SandboxError> {
    let mut f = fs::File::open(path).map_err(|e| SandboxError::io("opening the image", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| SandboxError::io("reading the image", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A cpio member name as a relative path without `..`; `None` for the
/// archive root (`.`).
fn member_path(name: &str) -> Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(format!("unsafe member name {name:?}")),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

fn extract(cpio: &Path, into: &Path) -> Result<(), SandboxError> {
    let file = fs::File::open(cpio).map_err(|e| SandboxError::io("opening the image", cpio, e))?;
    let mut reader = io::BufReader::new(file);
    // Directory modes are applied last, so a read-only directory can still
    // be filled.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    // Hard links: the data comes with one of the entries sharing an inode
    // number (newc puts it on the last); the others are linked to it.
    let mut linked: HashMap<u32, PathBuf> = HashMap::new();
    let mut pending_links: HashMap<u32, Vec<PathBuf>> = HashMap::new();
    let mut count = 0usize;
    loop {
        let entry = cpio::NewcReader::new(reader).map_err(|e| {
            image_err(
                cpio,
                format!("not a valid newc cpio archive (after {count} members): {e}"),
            )
        })?;
        if entry.entry().is_trailer() {
            break;
        }
        count += 1;
        let e = entry.entry();
        let (mode, size, ino, nlink) = (e.mode(), e.file_size(), e.ino(), e.nlink());
        let (uid, gid) = (e.uid(), e.gid());
        let name = e.name().to_string();
        let rel = member_path(&name).map_err(|why| image_err(cpio, why))?;
        let Some(rel) = rel else {
            reader = entry
                .finish()
                .map_err(|e| image_err(cpio, format!("truncated archive: {e}")))?;
            continue;
        };
        let path = into.join(&rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| SandboxError::io("creating a directory", parent, e))?;
        }
        let perm = mode & 0o7777;
        let mut entry = entry;
        match mode & S_IFMT {
            S_IFDIR => {
                match fs::create_dir(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
                    Err(e) => return Err(SandboxError::io("creating a directory", &path, e)),
                }
                dir_modes.push((path.clone(), perm));
                chown(&path, uid, gid);
            }
            S_IFREG => {
                if nlink > 1 && size == 0 {
                    if let Some(first) = linked.get(&ino) {
                        fs::hard_link(first, &path).map_err(|e| SandboxError::io("linking", &path, e))?;
                    } else {
                        pending_links.entry(ino).or_default().push(path.clone());
                    }
                } else {
                    let mut out = fs::File::create(&path).map_err(|e| SandboxError::io("creating a file", &path, e))?;
                    let copied = io::copy(&mut entry, &mut out)
                        .map_err(|e| image_err(cpio, format!("truncated archive in {name:?}: {e}")))?;
                    if copied != u64::from(size) {
                        return Err(image_err(cpio, format!("truncated archive in {name:?}")));
                    }
                    drop(out);
                    chown(&path, uid, gid);
                    fs::set_permissions(&path, fs::Permissions::from_mode(perm))
                        .map_err(|e| SandboxError::io("setting the mode of", &path, e))?;
                    if nlink > 1 {
                        for other in pending_links.remove(&ino).unwrap_or_default() {
                            fs::hard_link(&path, &other).map_err(|e| SandboxError::io("linking", &other, e))?;
                        }
                        linked.insert(ino, path.clone());
                    }
                }
            }
            S_IFLNK => {
                if size > MAX_LINK {
                    return Err(image_err(cpio, format!("symlink {name:?} has a {size}-byte target")));
                }
                let mut target = Vec::with_capacity(size as usize);
                (&mut entry)
                    .take(u64::from(size))
                    .read_to_end(&mut target)
                    .map_err(|e| image_err(cpio, format!("truncated archive in {name:?}: {e}")))?;
                if target.len() != size as usize {
                    return Err(image_err(cpio, format!("truncated archive in {name:?}")));
                }
                let target = PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(
                    target,
                ));
                let _ = fs::remove_file(&path);
                std::os::unix::fs::symlink(&target, &path)
                    .map_err(|e| SandboxError::io("creating a symlink", &path, e))?;
                lchown(&path, uid, gid);
            }
            // Device nodes, FIFOs, sockets: the sandbox launcher makes the
            // few devices a sandbox gets; the image's own are not wanted.
            _ => {}
        }
        reader = entry
            .finish()
            .map_err(|e| image_err(cpio, format!("truncated archive after {name:?}: {e}")))?;
    }
    // Hard links whose data entry never came: empty files, as cpio does.
    for paths in pending_links.into_values() {
        for p in paths {
            fs::File::create(&p).map_err(|e| SandboxError::io("creating a file", &p, e))?;
        }
    }
    for (dir, perm) in dir_modes.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(perm))
            .map_err(|e| SandboxError::io("setting the mode of", &dir, e))?;
    }
    if count == 0 {
        return Err(image_err(cpio, "the archive is empty"));
    }
    Ok(())
}

/// Keeps the archive's owners when we can (as root); ignored otherwise.
fn chown(path: &Path, uid: u32, gid: u32) {
    let _ = std::os::unix::fs::chown(path, Some(uid), Some(gid));
}

fn lchown(path: &Path, uid: u32, gid: u32) {
    let _ = std::os::unix::fs::lchown(path, Some(uid), Some(gid));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_stay_inside() {
        assert_eq!(member_path("bin/sh").unwrap(), Some(PathBuf::from("bin/sh")));
        assert_eq!(member_path("./etc/passwd").unwrap(), Some(PathBuf::from("etc/passwd")));
        assert_eq!(member_path("/init").unwrap(), Some(PathBuf::from("init")));
        assert_eq!(member_path(".").unwrap(), None);
        assert!(member_path("../etc/shadow").is_err());
        assert!(member_path("a/../../b").is_err());
    }

    fn archive(members: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (name, mode, data)) in members.iter().enumerate() {
            let mut w = cpio::newc::Builder::new(name)
                .ino(i as u32 + 1)
                .mode(*mode)
                .nlink(1)
                .write(&mut out, data.len() as u32);
            io::Write::write_all(&mut w, data).unwrap();
            w.finish().unwrap();
        }
        cpio::newc::trailer(&mut out).unwrap();
        out
    }

    #[test]
    fn unpacks_files_dirs_and_symlinks_and_reuses_the_result() {
        let t = tempfile::tempdir().unwrap();
        let cpio = t.path().join("img.cpio");
        fs::write(
            &cpio,
            archive(&[
                ("bin", 0o040755, b""),
                ("bin/tool", 0o100755, b"#!/bin/sh\necho hi\n"),
                ("bin/alias", 0o120777, b"tool"),
                ("dev/console", 0o020600, b""),
                ("etc", 0o040700, b""),
                ("etc/motd", 0o100644, b"hello"),
            ]),
        )
        .unwrap();
        let images = t.path().join("images");
        let root = unpack_image(&cpio, &images).unwrap();
        assert!(root.file_name().unwrap().to_str().unwrap().starts_with("img-"));
        assert_eq!(fs::read(root.join("etc/motd")).unwrap(), b"hello");
        assert_eq!(fs::read_link(root.join("bin/alias")).unwrap(), PathBuf::from("tool"));
        let mode = |p: &str| fs::symlink_metadata(root.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("bin/tool"), 0o755);
        assert_eq!(mode("etc"), 0o700);
        assert!(!root.join("dev/console").exists(), "device nodes are skipped");
        // Reused: same path, no second directory.
        assert_eq!(unpack_image(&cpio, &images).unwrap(), root);
        assert_eq!(fs::read_dir(&images).unwrap().count(), 1);
    }

    #[test]
    fn rejects_corrupt_and_traversing_archives() {
        let t = tempfile::tempdir().unwrap();
        let images = t.path().join("images");
        let bad = t.path().join("bad.cpio");
        fs::write(&bad, b"this is not a cpio archive at all").unwrap();
        let err = unpack_image(&bad, &images).unwrap_err().to_string();
        assert!(err.contains("not a valid newc cpio"), "{err}");

        let mut truncated = archive(&[("big", 0o100644, &[7u8; 4096])]);
        truncated.truncate(300);
        let cut = t.path().join("cut.cpio");
        fs::write(&cut, truncated).unwrap();
        let err = unpack_image(&cut, &images).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");

        let evil = t.path().join("evil.cpio");
        fs::write(&evil, archive(&[("../escape", 0o100644, b"x")])).unwrap();
        let err = unpack_image(&evil, &images).unwrap_err().to_string();
        assert!(err.contains("unsafe member name"), "{err}");
        assert!(!t.path().join("escape").exists());
        // Nothing half-unpacked is left behind.
        assert_eq!(fs::read_dir(&images).unwrap().count(), 0);
    }
}
