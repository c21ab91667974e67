//! Wiping what a sandbox wrote, and finding and removing its mounts.
//!
//! Everything a session writes lands in its overlay's upper directory on
//! the scratch tmpfs. Unmounting a tmpfs frees its pages without clearing
//! them, so before that every regular file there is overwritten with
//! zeros: the next session (or anybody else) that gets those pages finds
//! nothing. Only data extents are written (SEEK_DATA/SEEK_HOLE), so a huge
//! sparse file costs what it really holds.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::mount::{umount2, MntFlags};

/// What a scrub did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Bytes overwritten with zeros.
    pub bytes: u64,
    /// Wall time the scrub took, in nanoseconds.
    pub ns: u64,
}

/// Overwrites every regular file under `dir` with zeros (without following
/// symlinks or crossing into other file systems). Files that cannot be
/// opened are counted in the error, not skipped silently; the walk goes on.
pub fn scrub_tree(dir: &Path) -> (ScrubReport, Vec<String>) {
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut errors = Vec::new();
    let dev = match fs::symlink_metadata(dir) {
        Ok(m) => std::os::unix::fs::MetadataExt::dev(&m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return (ScrubReport::default(), errors);
        }
        Err(e) => {
            errors.push(format!("{}: {e}", dir.display()));
            return (ScrubReport::default(), errors);
        }
    };
    let mut stack = vec![dir.to_path_buf()];
    let zeros = vec![0u8; 1 << 16];
    while let Some(d) = stack.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) => {
                errors.push(format!("{}: {e}", d.display()));
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                match fs::symlink_metadata(&path) {
                    Ok(m) if std::os::unix::fs::MetadataExt::dev(&m) == dev => stack.push(path),
                    _ => {}
                }
            } else if ft.is_file() {
                match zero_file(&path, &zeros) {
                    Ok(n) => bytes += n,
                    Err(e) => errors.push(format!("{}: {e}", path.display())),
                }
            } else if ft.is_symlink() || ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                // No data of their own worth wiping (a symlink's target
                // name is freed with its inode).
            }
        }
    }
    let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    (ScrubReport { bytes, ns }, errors)
}

/// Overwrites the data extents of one file; returns the bytes written.
fn zero_file(path: &Path, zeros: &[u8]) -> io::Result<u64> {
    let f = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    let len = f.metadata()?.len();
    let fd = f.as_raw_fd();
    let mut written = 0u64;
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a descriptor we own; the result is checked.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (start, end) = (data as u64, if hole < 0 { len } else { (hole as u64).min(len) });
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(zeros.len());
            f.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        written += end - start;
        pos = end.max(start + 1);
    }
    Ok(written)
}

/// Mount points at or under `dir`, deepest (latest) first, from
/// `/proc/self/mountinfo`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.reverse();
    found
}

/// Decodes mountinfo's octal escapes (`\040` for a space, …).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything at or under `dir`, deepest first, falling back to a
/// lazy (MNT_DETACH) unmount when a mount is busy. Returns what failed.
pub fn unmount_under(dir: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    // A path can carry stacked mounts; go round until none is left (bounded).
    for _ in 0..8 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return errors;
        }
        for m in mounts {
            match umount2(&m, MntFlags::empty()) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
                Err(_) => {
                    if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
                        errors.push(format!("umount {}: {e}", m.display()));
                    }
                }
            }
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        errors.push(format!("still mounted: {left:?}"));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/t\\011ab\\134"), "/t\tab\\");
        assert_eq!(unescape("/odd\\04"), "/odd\\04");
    }

    #[test]
    fn scrub_zeroes_files_and_counts_data_only() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("a/b")).unwrap();
        fs::write(t.path().join("a/one"), vec![0xAAu8; 10_000]).unwrap();
        fs::write(t.path().join("a/b/two"), b"secret").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("a/link")).unwrap();
        // Sparse: 1 MiB apparent, one 4 KiB extent at the end.
        let sparse = fs::File::create(t.path().join("sparse")).unwrap();
        sparse.write_all_at(&[0x55u8; 4096], (1 << 20) - 4096).unwrap();
        drop(sparse);
        let (r, errors) = scrub_tree(t.path());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(fs::read(t.path().join("a/one")).unwrap(), vec![0u8; 10_000]);
        assert_eq!(fs::read(t.path().join("a/b/two")).unwrap(), vec![0u8; 6]);
        assert!(fs::read(t.path().join("sparse")).unwrap().iter().all(|&b| b == 0));
        assert!(r.bytes >= 10_006 + 4096, "{r:?}");
        assert!(r.bytes < 10_006 + (1 << 20), "sparse holes are not written: {r:?}");
        // The symlink's target was not touched.
        assert!(fs::read("/etc/passwd").unwrap().iter().any(|&b| b != 0));
    }

    #[test]
    fn scrub_of_a_missing_dir_is_empty() {
        let (r, errors) = scrub_tree(Path::new("/nonexistent/warren-scrub"));
        assert_eq!(r.bytes, 0);
        assert!(errors.is_empty());
    }
}
