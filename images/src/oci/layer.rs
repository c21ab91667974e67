//! Applying layers: decompression, digest checks, whiteouts, and each tar
//! entry written into the staging [`Tree`] without ever leaving it.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags};
use sha2::{Digest, Sha256};

use super::error::OciError;
use super::manifest::LayerRef;
use super::source::{digest_of, Source};
use super::tree::{self, Comps, Tree, TreeError};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// Bytes after a tar's end-of-archive marker that are read (for the digest)
/// before the layer is called corrupt.
const MAX_TAIL: u64 = 1 << 20;
/// The only extended attribute kept from PAX records: file capabilities.
/// (`trusted.overlay.*` and the like would be interpreted by whatever
/// mounts the tree, so they are dropped.)
const KEPT_XATTR: &str = "security.capability";

/// The compression its magic bytes say a stream has.
pub(crate) fn compression_of(magic: &[u8]) -> Option<&'static str> {
    if magic.starts_with(&[0x1f, 0x8b]) {
        Some("gzip")
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd")
    } else if magic.starts_with(b"BZh") {
        Some("bzip2")
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some("xz")
    } else {
        None
    }
}

/// Passes reads through, hashing them, and remembers whether the end was
/// reached.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    eof: bool,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Owner, mode and time of an entry.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

fn times(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Applies layers, in order, to one tree.
pub(crate) struct Extractor<'t> {
    tree: &'t Tree,
    limit: u64,
    max_entries: usize,
    /// Bytes of file content written so far.
    pub(crate) bytes: u64,
    /// Tar entries seen so far.
    pub(crate) entries: usize,
    /// Character and block devices skipped (their paths).
    pub(crate) skipped_devices: Vec<String>,
    /// Directory mtimes, set at the end (entries written into a directory
    /// after it would change it).
    dir_mtimes: HashMap<PathBuf, i64>,
}

/// What an entry's failure is reported with.
struct Ctx<'a> {
    blob: &'a str,
    entry: String,
}

impl Ctx<'_> {
    fn unsafe_(&self, reason: impl Into<String>) -> OciError {
        OciError::UnsafeEntry {
            blob: self.blob.to_string(),
            entry: self.entry.clone(),
            reason: reason.into(),
        }
    }
    fn unsupported(&self, reason: impl Into<String>) -> OciError {
        OciError::UnsupportedEntry {
            blob: self.blob.to_string(),
            entry: self.entry.clone(),
            reason: reason.into(),
        }
    }
    fn io(&self, source: impl Into<io::Error>) -> OciError {
        OciError::Extract {
            blob: self.blob.to_string(),
            entry: self.entry.clone(),
            source: source.into(),
        }
    }
    fn corrupt(&self, source: io::Error) -> OciError {
        OciError::CorruptLayer {
            blob: self.blob.to_string(),
            entry: Some(self.entry.clone()),
            source,
        }
    }
    fn tree(&self, e: TreeError) -> OciError {
        match e {
            TreeError::Symlink(p) => {
                self.unsafe_(format!("{} is a symlink; refusing to write through it", p.display()))
            }
            TreeError::NotDir(p) => self.unsupported(format!("{} is not a directory", p.display())),
            TreeError::Io(e) => self.io(e),
        }
    }
}

impl<'t> Extractor<'t> {
    pub(crate) fn new(tree: &'t Tree, limit: u64, max_entries: usize) -> Self {
        Extractor {
            tree,
            limit,
            max_entries,
            bytes: 0,
            entries: 0,
            skipped_devices: Vec::new(),
            dir_mtimes: HashMap::new(),
        }
    }

    /// Verifies and applies one layer.
    pub(crate) fn apply(&mut self, src: &Source, layer: &LayerRef) -> Result<(), OciError> {
        let blob = layer.label.as_str();
        if let Some(digest) = &layer.digest {
            src.verify_blob(&layer.path, blob, digest, layer.size)?;
        }
        let corrupt = |source: io::Error| OciError::CorruptLayer {
            blob: blob.to_string(),
            entry: None,
            source,
        };
        let (reader, _) = src.open_file(&layer.path)?;
        let mut buffered = BufReader::with_capacity(1 << 16, reader);
        let decoder: Box<dyn Read> = match compression_of(
            buffered
                .fill_buf()
                .map_err(|e| OciError::io(src.describe(&layer.path), e))?,
        ) {
            None => Box::new(buffered),
            Some("gzip") => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
            Some(compression) => {
                return Err(OciError::UnsupportedCompression {
                    blob: blob.to_string(),
                    compression,
                })
            }
        };
        let mut plain = Hashing {
            inner: decoder,
            hasher: Sha256::new(),
            count: 0,
            eof: false,
        };
        let mut written = HashSet::new();
        {
            let mut archive = tar::Archive::new(&mut plain);
            for entry in archive.entries().map_err(corrupt)? {
                let mut entry = entry.map_err(corrupt)?;
                self.entries += 1;
                if self.entries > self.max_entries {
                    return Err(OciError::TooManyEntries {
                        limit: self.max_entries,
                        blob: blob.to_string(),
                    });
                }
                self.entry(&mut entry, blob, &mut written)?;
            }
        }
        if plain.eof && plain.count > 0 {
            return Err(corrupt(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the tar ends without its end-of-archive marker",
            )));
        }
        // The rest of the stream, for the digest (and gzip's CRC check).
        let tail = io::copy(&mut (&mut plain).take(MAX_TAIL + 1), &mut io::sink()).map_err(corrupt)?;
        if tail > MAX_TAIL {
            return Err(corrupt(io::Error::other(format!(
                "more than {MAX_TAIL} bytes after the tar's end-of-archive marker"
            ))));
        }
        let actual = digest_of(plain.hasher);
        if actual != layer.diff_id.0 {
            return Err(OciError::DigestMismatch {
                blob: format!("{blob} (uncompressed, rootfs.diff_ids)"),
                expected: layer.diff_id.0.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Sets the deferred directory mtimes. Call after the last layer.
    pub(crate) fn finish(&mut self) -> Result<(), OciError> {
        for (path, mtime) in std::mem::take(&mut self.dir_mtimes) {
            let comps: Comps = path.iter().map(OsStr::to_os_string).collect();
            let err = |e: io::Error| OciError::io(path.clone(), e);
            let (parent, name) = match comps.split_last() {
                Some((name, parent)) => (parent, name.as_os_str()),
                None => {
                    rfs::futimens(self.tree.root(), &times(mtime)).map_err(|e| err(e.into()))?;
                    continue;
                }
            };
            let Ok(Some(dir)) = self.tree.dir(parent, false) else {
                continue;
            };
            if tree::kind_at(dir.as_fd(), name).map_err(err)? == Some(FileType::Directory) {
                rfs::utimensat(&dir, name, &times(mtime), AtFlags::SYMLINK_NOFOLLOW).map_err(|e| err(e.into()))?;
            }
        }
        Ok(())
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        blob: &str,
        written: &mut HashSet<PathBuf>,
    ) -> Result<(), OciError> {
        let raw_path = entry.path_bytes().into_owned();
        let cx = Ctx {
            blob,
            entry: String::from_utf8_lossy(&raw_path).into_owned(),
        };
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            return Ok(());
        }
        let comps = tree::normalize(Path::new(OsStr::from_bytes(&raw_path))).map_err(|r| cx.unsafe_(r))?;
        let meta = self.meta(entry, &cx)?;
        let xattr = match entry.pax_extensions() {
            Ok(Some(exts)) => exts
                .filter_map(Result::ok)
                .find(|e| e.key() == Ok(&format!("SCHILY.xattr.{KEPT_XATTR}")))
                .map(|e| e.value_bytes().to_vec()),
            Ok(None) => None,
            Err(e) => return Err(cx.corrupt(e)),
        };
        let Some((name, parent)) = comps.split_last() else {
            // The root itself ("./").
            if kind != tar::EntryType::Directory {
                return Err(cx.unsupported("a non-directory entry for the root"));
            }
            let root = self.tree.root();
            rfs::fchown(root, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid))).map_err(|e| cx.io(e))?;
            rfs::fchmod(root, Mode::from_raw_mode(meta.mode)).map_err(|e| cx.io(e))?;
            self.dir_mtimes.insert(PathBuf::new(), meta.mtime);
            return Ok(());
        };
        let name_bytes = name.as_bytes();
        if name_bytes == OPAQUE.as_bytes() {
            mark(written, parent);
            let dir = self.tree.dir(parent, true).map_err(|e| cx.tree(e))?.expect("created");
            return prune(dir.as_fd(), &mut parent.to_vec(), written).map_err(|e| cx.io(e));
        }
        if let Some(target) = name_bytes.strip_prefix(WHITEOUT.as_bytes()) {
            if target.starts_with(WHITEOUT.as_bytes()) {
                return Ok(()); // aufs bookkeeping (.wh..wh.plnk, ...)
            }
            if target.is_empty() || target == b"." || target == b".." {
                return Err(cx.unsupported("a whiteout that names nothing"));
            }
            let mut victim = parent.to_vec();
            victim.push(OsStr::from_bytes(target).to_os_string());
            // A whiteout hides lower layers only, not its own layer.
            if written.contains(&tree::join(&victim)) {
                return Ok(());
            }
            // Nothing to delete when the directory is not there (or is a
            // file); a symlink on the way is still an error.
            return match self.tree.dir(parent, false) {
                Ok(Some(dir)) => tree::remove_all(dir.as_fd(), OsStr::from_bytes(target)).map_err(|e| cx.io(e)),
                Ok(None) | Err(TreeError::NotDir(_)) => Ok(()),
                Err(e) => Err(cx.tree(e)),
            };
        }
        let is_dir = kind == tar::EntryType::Directory || (kind == tar::EntryType::Regular && raw_path.ends_with(b"/"));
        match kind {
            tar::EntryType::Char | tar::EntryType::Block => {
                // Device nodes are not created: the guest gets its devices
                // from devtmpfs, and a node in a host-side tree is a hazard.
                self.skipped_devices.push(cx.entry.clone());
                return Ok(());
            }
            tar::EntryType::GNUSparse => return Err(cx.unsupported("GNU sparse files are not supported")),
            tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::Directory
            | tar::EntryType::Symlink
            | tar::EntryType::Link
            | tar::EntryType::Fifo => {}
            other => return Err(cx.unsupported(format!("unsupported entry type {:?}", other.as_byte() as char))),
        }
        // Checks that need no file system first.
        let link = entry.link_name().map_err(|e| cx.corrupt(e))?.map(|l| l.into_owned());
        let link_target = match kind {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                Some(link.ok_or_else(|| cx.unsupported("a link without a target"))?)
            }
            _ => None,
        };
        if kind == tar::EntryType::Symlink {
            tree::symlink_target_ok(parent, link_target.as_deref().expect("set")).map_err(|r| cx.unsafe_(r))?;
        }
        mark(written, &comps);
        let dir = self.tree.dir(parent, true).map_err(|e| cx.tree(e))?.expect("created");
        let dir = dir.as_fd();
        if is_dir {
            return self.directory(dir, name, &comps, &meta, &cx);
        }
        match kind {
            tar::EntryType::Symlink => {
                tree::remove_all(dir, name).map_err(|e| cx.io(e))?;
                rfs::symlinkat(link_target.as_deref().expect("set"), dir, name.as_os_str()).map_err(|e| cx.io(e))?;
                self.owner_at(dir, name, &meta, &cx)
            }
            tar::EntryType::Link => self.hard_link(dir, name, &comps, link_target.as_deref().expect("set"), &cx),
            tar::EntryType::Fifo => {
                tree::remove_all(dir, name).map_err(|e| cx.io(e))?;
                rfs::mknodat(dir, name.as_os_str(), FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                    .map_err(|e| cx.io(e))?;
                self.owner_at(dir, name, &meta, &cx)?;
                rfs::chmodat(dir, name.as_os_str(), Mode::from_raw_mode(meta.mode), AtFlags::empty())
                    .map_err(|e| cx.io(e))
            }
            _ => self.file(entry, dir, name, &meta, xattr.as_deref(), &cx),
        }
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>, cx: &Ctx) -> Result<Meta, OciError> {
        let h = entry.header();
        let bad = |what: &str, e: io::Error| cx.unsupported(format!("bad {what} in the tar header: {e}"));
        let id = |v: u64, what: &str| -> Result<u32, OciError> {
            u32::try_from(v)
                .ok()
                .filter(|v| *v != u32::MAX)
                .ok_or_else(|| cx.unsupported(format!("{what} {v} is out of range")))
        };
        let mode = h.mode().map_err(|e| bad("mode", e))? & 0o7777;
        let uid = id(h.uid().map_err(|e| bad("uid", e))?, "uid")?;
        let gid = id(h.gid().map_err(|e| bad("gid", e))?, "gid")?;
        let mut mtime = i64::try_from(h.mtime().map_err(|e| bad("mtime", e))?).unwrap_or(0);
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                if ext.key() == Ok("mtime") {
                    if let Some(secs) = ext.value().ok().and_then(|v| v.split('.').next()?.parse::<i64>().ok()) {
                        mtime = secs;
                    }
                }
            }
        }
        Ok(Meta { mode, uid, gid, mtime })
    }

    fn owner_at(&self, dir: BorrowedFd<'_>, name: &OsStr, meta: &Meta, cx: &Ctx) -> Result<(), OciError> {
        rfs::chownat(
            dir,
            name,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| cx.io(e))?;
        rfs::utimensat(dir, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW).map_err(|e| cx.io(e))
    }

    fn directory(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsString,
        comps: &Comps,
        meta: &Meta,
        cx: &Ctx,
    ) -> Result<(), OciError> {
        match tree::kind_at(dir, name).map_err(|e| cx.io(e))? {
            Some(FileType::Directory) => {}
            other => {
                if other.is_some() {
                    tree::remove_all(dir, name).map_err(|e| cx.io(e))?;
                }
                rfs::mkdirat(dir, name.as_os_str(), Mode::from_raw_mode(0o700)).map_err(|e| cx.io(e))?;
            }
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(dir, name.as_os_str(), flags, Mode::empty()).map_err(|e| cx.io(e))?;
        rfs::fchown(&fd, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid))).map_err(|e| cx.io(e))?;
        rfs::fchmod(&fd, Mode::from_raw_mode(meta.mode)).map_err(|e| cx.io(e))?;
        self.dir_mtimes.insert(tree::join(comps), meta.mtime);
        Ok(())
    }

    fn hard_link(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsString,
        comps: &Comps,
        target: &Path,
        cx: &Ctx,
    ) -> Result<(), OciError> {
        let tcomps = tree::normalize(target).map_err(|r| cx.unsafe_(format!("hard link target {target:?}: {r}")))?;
        if &tcomps == comps {
            return Ok(());
        }
        let Some((tname, tparent)) = tcomps.split_last() else {
            return Err(cx.unsafe_("a hard link to the root"));
        };
        let missing = || {
            cx.unsafe_(format!(
                "hard link target {target:?} is not an entry extracted before it"
            ))
        };
        let tdir = match self.tree.dir(tparent, false) {
            Ok(Some(d)) => d,
            Ok(None) => return Err(missing()),
            Err(TreeError::NotDir(_)) => return Err(missing()),
            Err(e) => return Err(cx.tree(e)),
        };
        match tree::kind_at(tdir.as_fd(), tname).map_err(|e| cx.io(e))? {
            None => return Err(missing()),
            Some(FileType::Directory) => return Err(cx.unsupported(format!("hard link to the directory {target:?}"))),
            Some(_) => {}
        }
        tree::remove_all(dir, name).map_err(|e| cx.io(e))?;
        rfs::linkat(&tdir, tname.as_os_str(), dir, name.as_os_str(), AtFlags::empty()).map_err(|e| cx.io(e))
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        dir: BorrowedFd<'_>,
        name: &OsString,
        meta: &Meta,
        xattr: Option<&[u8]>,
        cx: &Ctx,
    ) -> Result<(), OciError> {
        let size = entry.size();
        if self.bytes.saturating_add(size) > self.limit {
            return Err(OciError::TooLarge {
                limit: self.limit,
                at: format!("crossed by entry {:?} ({size} bytes) of layer {}", cx.entry, cx.blob),
            });
        }
        self.bytes += size;
        tree::remove_all(dir, name).map_err(|e| cx.io(e))?;
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(dir, name.as_os_str(), flags, Mode::from_raw_mode(0o600)).map_err(|e| cx.io(e))?;
        let mut file = std::fs::File::from(fd);
        let mut buf = vec![0u8; 1 << 16];
        let mut copied = 0u64;
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(cx.corrupt(e)),
            };
            file.write_all(&buf[..n]).map_err(|e| cx.io(e))?;
            copied += n as u64;
        }
        if copied != size {
            return Err(cx.corrupt(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file's content ends after {copied} of {size} bytes"),
            )));
        }
        rfs::fchown(&file, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid))).map_err(|e| cx.io(e))?;
        rfs::fchmod(&file, Mode::from_raw_mode(meta.mode)).map_err(|e| cx.io(e))?;
        if let Some(value) = xattr {
            rfs::fsetxattr(&file, KEPT_XATTR, value, XattrFlags::empty()).map_err(|e| cx.io(e))?;
        }
        rfs::futimens(&file, &times(meta.mtime)).map_err(|e| cx.io(e))
    }
}

/// Records `comps` and its ancestors as written by the current layer.
fn mark(written: &mut HashSet<PathBuf>, comps: &[OsString]) {
    for i in 1..=comps.len() {
        written.insert(tree::join(&comps[..i]));
    }
}

/// An opaque directory: removes everything under `dir` (at `prefix`) that
/// the current layer did not write, keeping the way to what it did.
fn prune(dir: BorrowedFd<'_>, prefix: &mut Comps, written: &HashSet<PathBuf>) -> io::Result<()> {
    for child in tree::list(dir)? {
        prefix.push(child.clone());
        let result = if !written.contains(&tree::join(prefix)) {
            tree::remove_all(dir, &child)
        } else if tree::kind_at(dir, &child)? == Some(FileType::Directory) {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let sub = rfs::openat(dir, child.as_os_str(), flags, Mode::empty())?;
            prune(sub.as_fd(), prefix, written)
        } else {
            Ok(())
        };
        prefix.pop();
        result?;
    }
    Ok(())
}
