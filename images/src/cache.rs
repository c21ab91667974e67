//! Content-addressed artifact cache.
//!
//! Layout under the root (default `~/.cache/warren`, see [`Cache::default_root`]):
//!
//! ```text
//! <kind>/<key>/<file>        the artifact
//! <kind>/<key>/MANIFEST      "<sha256>  <size>  <file>" per file, written last
//! current/<name>             symlink to the newest artifact of each name
//! ```
//!
//! An entry counts only when its manifest exists and every file matches it,
//! so an interrupted build or a damaged file is never mistaken for a hit.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file-system operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// No artifact named `name` has been built yet.
    #[error("no {name} has been built yet (looked for {}); run `cargo xtask build`", path.display())]
    Missing {
        /// The artifact's name.
        name: String,
        /// Where it was expected.
        path: PathBuf,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The cache root.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// A cache rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    /// The default root: `$WARREN_CACHE_DIR`, else `$XDG_CACHE_HOME/warren`,
    /// else `$HOME/.cache/warren`, else `/var/cache/warren`.
    pub fn default_root() -> PathBuf {
        if let Some(d) = std::env::var_os("WARREN_CACHE_DIR") {
            return d.into();
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return Path::new(&d).join("warren");
        }
        if let Some(h) = std::env::var_os("HOME") {
            return Path::new(&h).join(".cache/warren");
        }
        PathBuf::from("/var/cache/warren")
    }

    /// The cache at [`Cache::default_root`].
    pub fn open_default() -> Self {
        Self::new(Self::default_root())
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The entry for artifacts of `kind` built from inputs hashing to `key`.
    pub fn entry(&self, kind: &str, key: &str) -> Entry {
        Entry {
            dir: self.root.join(kind).join(key),
        }
    }

    /// A scratch directory under the root (same file system as the entries,
    /// so finished files can be renamed into place).
    pub fn scratch(&self, name: &str) -> Result<PathBuf, CacheError> {
        let d = self.root.join("scratch").join(name);
        fs::create_dir_all(&d).map_err(io_err("cannot create", &d))?;
        Ok(d)
    }

    /// Points `current/<name>` at `target`.
    pub fn set_current(&self, name: &str, target: &Path) -> Result<PathBuf, CacheError> {
        let dir = self.root.join("current");
        fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        let link = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).map_err(io_err("cannot link", &tmp))?;
        fs::rename(&tmp, &link).map_err(io_err("cannot replace", &link))?;
        Ok(link)
    }

    /// The artifact `current/<name>` points at, resolved, if it exists.
    pub fn current(&self, name: &str) -> Result<PathBuf, CacheError> {
        let link = self.root.join("current").join(name);
        fs::canonicalize(&link).map_err(|_| CacheError::Missing {
            name: name.into(),
            path: link,
        })
    }
}

/// One cache entry: a directory of files described by a manifest.
#[derive(Debug, Clone)]
pub struct Entry {
    dir: PathBuf,
}

impl Entry {
    /// The entry's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn manifest(&self) -> PathBuf {
        self.dir.join("MANIFEST")
    }

    /// The path of `file` when the entry is complete and every file in it
    /// matches its manifest; `None` otherwise (a damaged entry is removed).
    pub fn lookup(&self, file: &str) -> Option<PathBuf> {
        let manifest = fs::read_to_string(self.manifest()).ok()?;
        let mut found = false;
        for line in manifest.lines() {
            let mut parts = line.split("  ");
            let (Some(sum), Some(size), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
                return self.discard("manifest line unreadable");
            };
            let path = self.dir.join(name);
            let ok = fs::metadata(&path)
                .map(|m| m.len().to_string() == size)
                .unwrap_or(false)
                && sha256_file(&path).map(|s| s == sum).unwrap_or(false);
            if !ok {
                return self.discard("file does not match its manifest");
            }
            found |= name == file;
        }
        found.then(|| self.dir.join(file))
    }

    fn discard(&self, why: &str) -> Option<PathBuf> {
        eprintln!("cache entry {} is damaged ({why}); rebuilding it", self.dir.display());
        let _ = fs::remove_dir_all(&self.dir);
        None
    }

    /// Moves the built files into the entry and writes its manifest last.
    /// `files` are (name in the entry, built file); each built file is
    /// renamed (or copied, across file systems).
    pub fn store(&self, files: &[(&str, &Path)]) -> Result<(), CacheError> {
        let _ = fs::remove_dir_all(&self.dir);
        fs::create_dir_all(&self.dir).map_err(io_err("cannot create", &self.dir))?;
        let mut manifest = String::new();
        for (name, src) in files {
            let dst = self.dir.join(name);
            if fs::rename(src, &dst).is_err() {
                fs::copy(src, &dst).map_err(io_err("cannot copy", src))?;
            }
            let size = fs::metadata(&dst).map_err(io_err("cannot stat", &dst))?.len();
            let sum = sha256_file(&dst).map_err(io_err("cannot hash", &dst))?;
            manifest.push_str(&format!("{sum}  {size}  {name}\n"));
        }
        let tmp = self.dir.join("MANIFEST.tmp");
        let mut f = fs::File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
        f.write_all(manifest.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io_err("cannot write", &tmp))?;
        fs::rename(&tmp, self.manifest()).map_err(io_err("cannot write", &tmp))?;
        Ok(())
    }
}

/// SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// SHA-256 of a sequence of byte strings, each length-prefixed so that
/// different splits of the same bytes give different keys.
pub fn key_of<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn store_then_lookup_hits() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path().join("cache"));
        let e = cache.entry("kernel", "abc");
        assert!(e.lookup("vmlinux").is_none());
        let src = built(d.path(), "vmlinux", b"kernel bytes");
        e.store(&[("vmlinux", &src)]).unwrap();
        let hit = e.lookup("vmlinux").unwrap();
        assert_eq!(fs::read(hit).unwrap(), b"kernel bytes");
        assert!(e.lookup("other").is_none(), "a file not in the manifest is no hit");
    }

    #[test]
    fn truncated_or_corrupted_entries_are_detected_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path().join("cache"));
        for damage in [
            |p: &Path| fs::write(p, b"kernel byte").unwrap(),  // truncated
            |p: &Path| fs::write(p, b"kernel bytez").unwrap(), // same size, corrupted
            |p: &Path| fs::remove_file(p).unwrap(),
        ] {
            let e = cache.entry("kernel", "k");
            e.store(&[("vmlinux", &built(d.path(), "v", b"kernel bytes"))]).unwrap();
            damage(&e.dir().join("vmlinux"));
            assert!(e.lookup("vmlinux").is_none());
            assert!(!e.dir().exists(), "damaged entry left behind");
        }
    }

    #[test]
    fn entry_without_manifest_is_a_miss() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path());
        let e = cache.entry("initramfs", "x");
        fs::create_dir_all(e.dir()).unwrap();
        fs::write(e.dir().join("initramfs.cpio"), b"half-written").unwrap();
        assert!(e.lookup("initramfs.cpio").is_none());
    }

    #[test]
    fn current_links_follow_the_newest_store() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path());
        assert!(matches!(cache.current("vmlinux"), Err(CacheError::Missing { .. })));
        for key in ["one", "two"] {
            let e = cache.entry("kernel", key);
            e.store(&[("vmlinux", &built(d.path(), "v", key.as_bytes()))]).unwrap();
            cache.set_current("vmlinux", &e.dir().join("vmlinux")).unwrap();
        }
        assert_eq!(fs::read(cache.current("vmlinux").unwrap()).unwrap(), b"two");
    }

    #[test]
    fn keys_depend_on_every_part_and_its_boundaries() {
        let a = key_of([b"ab".as_slice(), b"c"]);
        assert_eq!(a, key_of([b"ab".as_slice(), b"c"]));
        assert_ne!(a, key_of([b"a".as_slice(), b"bc"]));
        assert_eq!(a.len(), 64);
    }
}
