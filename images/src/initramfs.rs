//! A deterministic newc cpio archive for the guest's initramfs.
//!
//! The kernel unpacks an uncompressed newc archive straight into its rootfs,
//! so that is what we write: no compression (decompression costs boot time
//! and every guest instruction is precious), entries sorted by path, every
//! timestamp and owner fixed, so identical inputs give identical bytes and
//! the same cache key.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Errors building an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A path is empty, absolute after normalising, or climbs with `..`.
    #[error("invalid path {0:?} in initramfs")]
    BadPath(String),
    /// A source file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file exceeds what newc can describe (4 GiB).
    #[error("{0} is too large for a cpio archive")]
    TooLarge(String),
    /// Writing the archive failed.
    #[error("writing the initramfs: {0}")]
    Write(#[from] io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
    CharDev { major: u32, minor: u32, mode: u32 },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// The archive being assembled, keyed by path (no leading `/`).
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    nodes: BTreeMap<String, Node>,
}

fn normalise(path: &str) -> Result<String, InitramfsError> {
    let p = path.trim_start_matches('/');
    if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(InitramfsError::BadPath(path.into()));
    }
    Ok(p.to_string())
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<&mut Self, InitramfsError> {
        let p = normalise(path)?;
        // Parents first, so the kernel can create the children.
        let mut parent = String::new();
        for comp in p
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|x| x.1)
            .unwrap_or(&[])
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            self.nodes.entry(parent.clone()).or_insert(Node::Dir { mode: 0o755 });
        }
        self.nodes.insert(p, node);
        Ok(self)
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, InitramfsError> {
        self.insert(path, Node::Dir { mode })
    }

    /// Adds a file with the given contents.
    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) -> Result<&mut Self, InitramfsError> {
        if data.len() > u32::MAX as usize {
            return Err(InitramfsError::TooLarge(path.into()));
        }
        self.insert(path, Node::File { data, mode })
    }

    /// Adds a copy of the host file `src`.
    pub fn file_from(&mut self, path: &str, src: &Path, mode: u32) -> Result<&mut Self, InitramfsError> {
        let data = std::fs::read(src).map_err(|source| InitramfsError::Read {
            path: src.to_path_buf(),
            source,
        })?;
        self.file(path, data, mode)
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        self.insert(path, Node::Symlink { target: target.into() })
    }

    /// Adds a character device node (e.g. `dev/console`, 5:1), which the
    /// kernel needs before devtmpfs is mounted to give init a console.
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32, mode: u32) -> Result<&mut Self, InitramfsError> {
        self.insert(path, Node::CharDev { major, minor, mode })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// SHA-256 over every entry's path, kind, mode and contents: the cache key.
    pub fn content_key(&self) -> String {
        let mut h = Sha256::new();
        for (path, node) in &self.nodes {
            h.update((path.len() as u64).to_le_bytes());
            h.update(path.as_bytes());
            let (tag, mode, body): (u8, u32, &[u8]) = match node {
                Node::Dir { mode } => (0, *mode, &[]),
                Node::File { data, mode } => (1, *mode, data),
                Node::Symlink { target } => (2, 0o777, target.as_bytes()),
                Node::CharDev { major, minor, mode } => {
                    h.update(major.to_le_bytes());
                    h.update(minor.to_le_bytes());
                    (3, *mode, &[])
                }
            };
            h.update([tag]);
            h.update(mode.to_le_bytes());
            h.update((body.len() as u64).to_le_bytes());
            h.update(body);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Writes the archive, ending with the trailer.
    pub fn write_to<W: Write>(&self, mut w: W) -> Result<W, InitramfsError> {
        for (ino, (path, node)) in self.nodes.iter().enumerate() {
            let b = cpio::newc::Builder::new(path)
                .ino(ino as u32 + 1)
                .uid(0)
                .gid(0)
                .mtime(0);
            let (b, body): (_, &[u8]) = match node {
                Node::Dir { mode } => (b.mode(S_IFDIR | mode).nlink(2), &[]),
                Node::File { data, mode } => (b.mode(S_IFREG | mode).nlink(1), data),
                Node::Symlink { target } => (b.mode(S_IFLNK | 0o777).nlink(1), target.as_bytes()),
                Node::CharDev { major, minor, mode } => (
                    b.mode(S_IFCHR | mode).nlink(1).rdev_major(*major).rdev_minor(*minor),
                    &[],
                ),
            };
            let mut entry = b.write(w, body.len() as u32);
            entry.write_all(body)?;
            w = entry.finish()?;
        }
        Ok(cpio::newc::trailer(w)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Initramfs {
        let mut i = Initramfs::new();
        i.file("/init", b"#!/bin/sh\n".to_vec(), 0o755).unwrap();
        i.file("bin/busybox", vec![7; 1000], 0o755).unwrap();
        i.symlink("bin/sh", "busybox").unwrap();
        i.char_dev("dev/console", 5, 1, 0o600).unwrap();
        i.dir("tmp", 0o1777).unwrap();
        i
    }

    #[test]
    fn archive_reads_back_with_parents_first() {
        let bytes = sample().write_to(Vec::new()).unwrap();
        let mut r = &bytes[..];
        let mut seen = Vec::new();
        loop {
            let e = cpio::newc::Reader::new(r).unwrap();
            if e.entry().is_trailer() {
                break;
            }
            let (name, mode, size) = (e.entry().name().to_string(), e.entry().mode(), e.entry().file_size());
            let (maj, min) = (e.entry().rdev_major(), e.entry().rdev_minor());
            let mut body = Vec::new();
            r = e.to_writer(&mut body).unwrap();
            assert_eq!(body.len() as u32, size);
            seen.push((name, mode, maj, min, body));
        }
        let names: Vec<_> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "init", "tmp"]
        );
        assert_eq!(seen[0].1, S_IFDIR | 0o755);
        assert_eq!(seen[1].4, vec![7; 1000]);
        assert_eq!(
            (seen[2].1, seen[2].4.as_slice()),
            (S_IFLNK | 0o777, b"busybox".as_slice())
        );
        assert_eq!((seen[4].1, seen[4].2, seen[4].3), (S_IFCHR | 0o600, 5, 1));
        assert_eq!(seen[5].1, S_IFREG | 0o755);
        assert_eq!(seen[6].1, S_IFDIR | 0o1777);
    }

    #[test]
    fn output_and_key_are_deterministic_and_content_sensitive() {
        let (a, b) = (sample(), sample());
        assert_eq!(a.write_to(Vec::new()).unwrap(), b.write_to(Vec::new()).unwrap());
        assert_eq!(a.content_key(), b.content_key());
        let mut c = sample();
        c.file("init", b"#!/bin/sh \n".to_vec(), 0o755).unwrap();
        assert_ne!(a.content_key(), c.content_key());
        let mut d = sample();
        d.file("init", b"#!/bin/sh\n".to_vec(), 0o700).unwrap();
        assert_ne!(a.content_key(), d.content_key());
    }

    #[test]
    fn bad_paths_are_refused() {
        let mut i = Initramfs::new();
        for bad in ["", "/", "a/../b", "a//b", "./x"] {
            assert!(matches!(i.dir(bad, 0o755), Err(InitramfsError::BadPath(_))), "{bad}");
        }
        assert!(matches!(
            i.file_from("x", Path::new("/no/such/file"), 0o644),
            Err(InitramfsError::Read { .. })
        ));
    }
}
