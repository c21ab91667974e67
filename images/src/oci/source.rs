//! Where the image comes from: a directory or a (`docker save`) tarball,
//! read as a set of named files; and verified reading of blobs.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::OciError;
use super::tree;

/// Largest JSON document (index, manifest, config) read into memory.
pub(crate) const MAX_JSON_BYTES: u64 = 16 << 20;
/// Most members indexed in a source tarball.
const MAX_TAR_MEMBERS: usize = 1_000_000;
/// Most symlink / hard-link hops followed between members of a tarball.
const MAX_LINK_HOPS: usize = 16;

/// A `sha256:<64 hex>` digest, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sha256Digest(pub(crate) String);

impl Sha256Digest {
    /// Parses `digest`, refusing other algorithms and malformed hex (which
    /// also keeps it safe to use in a path).
    pub(crate) fn parse(digest: &str, what: &str) -> Result<Sha256Digest, OciError> {
        let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
            OciError::malformed(
                what,
                format!("unsupported digest {digest:?} (only sha256 is supported)"),
            )
        })?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(OciError::malformed(what, format!("malformed digest {digest:?}")));
        }
        Ok(Sha256Digest(digest.to_string()))
    }

    /// The hex part.
    pub(crate) fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// `blobs/sha256/<hex>`.
    pub(crate) fn blob_path(&self) -> String {
        format!("blobs/sha256/{}", self.hex())
    }
}

/// `sha256:<hex>` of a finished hasher.
pub(crate) fn digest_of(hasher: Sha256) -> String {
    let sum = hasher.finalize();
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in sum {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A member of a source tarball.
#[derive(Debug, Clone)]
pub(crate) enum Member {
    File { offset: u64, size: u64 },
    Link(String),
}

/// The files of the image source.
pub(crate) enum Source {
    /// A directory.
    Dir(PathBuf),
    /// A tarball, indexed: the member data are read in place.
    Tar {
        path: PathBuf,
        members: HashMap<String, Member>,
    },
}

/// A member path as a normalized relative path string.
fn norm(path: &Path) -> Result<String, String> {
    let comps = tree::normalize(path)?;
    let p = tree::join(&comps);
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| "the path is not UTF-8".to_string())
}

impl Source {
    /// Opens `src`: a directory as it is, a file as an (uncompressed) tar.
    pub(crate) fn open(src: &Path) -> Result<Source, OciError> {
        let meta = std::fs::metadata(src).map_err(|e| OciError::io(src, e))?;
        if meta.is_dir() {
            return Ok(Source::Dir(src.to_path_buf()));
        }
        let mut file = File::open(src).map_err(|e| OciError::io(src, e))?;
        let len = meta.len();
        let mut magic = [0u8; 6];
        let n = read_up_to(&mut file, &mut magic).map_err(|e| OciError::io(src, e))?;
        if let Some(kind) = super::layer::compression_of(&magic[..n]) {
            return Err(OciError::UnknownFormat {
                path: src.to_path_buf(),
                reason: format!(
                    "the archive is {kind}-compressed; decompress it first (a docker save tarball is a plain tar)"
                ),
            });
        }
        file.seek(SeekFrom::Start(0)).map_err(|e| OciError::io(src, e))?;
        let bad = |reason: String| OciError::UnknownFormat {
            path: src.to_path_buf(),
            reason: format!("not a readable tar archive: {reason}"),
        };
        let mut archive = tar::Archive::new(file);
        let mut members = HashMap::new();
        for entry in archive.entries_with_seek().map_err(|e| bad(e.to_string()))? {
            let entry = entry.map_err(|e| bad(e.to_string()))?;
            if members.len() >= MAX_TAR_MEMBERS {
                return Err(bad(format!("more than {MAX_TAR_MEMBERS} members")));
            }
            let raw = entry.path().map_err(|e| bad(e.to_string()))?;
            let Ok(name) = norm(&raw) else { continue };
            let kind = entry.header().entry_type();
            let member = match kind {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let offset = entry.raw_file_position();
                    let size = entry.size();
                    if offset.checked_add(size).is_none_or(|end| end > len) {
                        return Err(bad(format!("member {name:?} runs past the end of the file")));
                    }
                    Member::File { offset, size }
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let Some(target) = entry.link_name().map_err(|e| bad(e.to_string()))? else {
                        continue;
                    };
                    // Symlinks resolve from the link's directory, hard links
                    // from the archive root.
                    let full = if kind == tar::EntryType::Symlink && !target.is_absolute() {
                        Path::new(&name).parent().unwrap_or(Path::new("")).join(&target)
                    } else {
                        target.into_owned()
                    };
                    match norm(&full) {
                        Ok(t) => Member::Link(t),
                        Err(_) => continue,
                    }
                }
                _ => continue,
            };
            members.insert(name, member);
        }
        Ok(Source::Tar {
            path: src.to_path_buf(),
            members,
        })
    }

    /// `"<source>:<path>"` or `"<source>/<path>"`, for messages.
    pub(crate) fn describe(&self, path: &str) -> String {
        match self {
            Source::Dir(dir) => dir.join(path).display().to_string(),
            Source::Tar { path: tar, .. } => format!("{}:{path}", tar.display()),
        }
    }

    /// Whether the source has a file at `path`.
    pub(crate) fn exists(&self, path: &str) -> bool {
        match self {
            Source::Dir(dir) => norm(Path::new(path)).is_ok_and(|p| dir.join(p).is_file()),
            Source::Tar { .. } => self.member(path).is_ok(),
        }
    }

    fn member(&self, path: &str) -> Result<(u64, u64), String> {
        let Source::Tar { members, .. } = self else {
            unreachable!("member() on a directory source")
        };
        let mut name = norm(Path::new(path))?;
        for _ in 0..MAX_LINK_HOPS {
            match members.get(&name) {
                Some(Member::File { offset, size }) => return Ok((*offset, *size)),
                Some(Member::Link(target)) => name = target.clone(),
                None => return Err("no such file in the archive".into()),
            }
        }
        Err("too many levels of links in the archive".into())
    }

    /// Opens the file at `path` (relative to the source): a reader and its
    /// length.
    pub(crate) fn open_file(&self, path: &str) -> Result<(Box<dyn Read + Send>, u64), OciError> {
        let what = self.describe(path);
        match self {
            Source::Dir(dir) => {
                let rel = norm(Path::new(path)).map_err(|r| OciError::malformed(&what, r))?;
                let full = dir.join(rel);
                let file = File::open(&full).map_err(|e| OciError::io(&full, e))?;
                let len = file.metadata().map_err(|e| OciError::io(&full, e))?.len();
                Ok((Box::new(file), len))
            }
            Source::Tar { path: tar, .. } => {
                let (offset, size) = self.member(path).map_err(|r| OciError::malformed(&what, r))?;
                let mut file = File::open(tar).map_err(|e| OciError::io(tar, e))?;
                file.seek(SeekFrom::Start(offset)).map_err(|e| OciError::io(tar, e))?;
                Ok((Box::new(file.take(size)), size))
            }
        }
    }

    /// Reads a small file whole (at most [`MAX_JSON_BYTES`]).
    pub(crate) fn read_small(&self, path: &str) -> Result<Vec<u8>, OciError> {
        let (reader, len) = self.open_file(path)?;
        if len > MAX_JSON_BYTES {
            return Err(OciError::malformed(
                self.describe(path),
                format!("{len} bytes, over the limit of {MAX_JSON_BYTES} for a JSON document"),
            ));
        }
        let mut buf = Vec::with_capacity(len as usize);
        reader
            .take(MAX_JSON_BYTES)
            .read_to_end(&mut buf)
            .map_err(|e| OciError::io(self.describe(path), e))?;
        Ok(buf)
    }

    /// Reads the blob at `path` whole, checking it against `digest` and
    /// `size` (when known).
    pub(crate) fn read_blob(
        &self,
        path: &str,
        label: &str,
        digest: &Sha256Digest,
        size: Option<u64>,
    ) -> Result<Vec<u8>, OciError> {
        let data = self.read_small(path)?;
        if let Some(expected) = size {
            if data.len() as u64 != expected {
                return Err(OciError::SizeMismatch {
                    blob: label.to_string(),
                    expected,
                    actual: data.len() as u64,
                });
            }
        }
        let actual = digest_of(Sha256::new_with_prefix(&data));
        if actual != digest.0 {
            return Err(OciError::DigestMismatch {
                blob: label.to_string(),
                expected: digest.0.clone(),
                actual,
            });
        }
        Ok(data)
    }

    /// Streams the blob at `path` through SHA-256 without keeping it, and
    /// checks it against `digest` and `size` (when known). Used to verify a
    /// layer before any of it is unpacked.
    pub(crate) fn verify_blob(
        &self,
        path: &str,
        label: &str,
        digest: &Sha256Digest,
        size: Option<u64>,
    ) -> Result<(), OciError> {
        let (mut reader, len) = self.open_file(path)?;
        if let Some(expected) = size {
            if len != expected {
                return Err(OciError::SizeMismatch {
                    blob: label.to_string(),
                    expected,
                    actual: len,
                });
            }
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(OciError::io(self.describe(path), e)),
            };
            total += n as u64;
            hasher.update(&buf[..n]);
        }
        if total != len {
            return Err(OciError::SizeMismatch {
                blob: label.to_string(),
                expected: len,
                actual: total,
            });
        }
        let actual = digest_of(hasher);
        if actual != digest.0 {
            return Err(OciError::DigestMismatch {
                blob: label.to_string(),
                expected: digest.0.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// Reads until `buf` is full or the end; the count read.
pub(crate) fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
