//! The staging tree, written only through directory file descriptors.
//!
//! Every directory on the way to an entry is opened with
//! `O_DIRECTORY | O_NOFOLLOW` from the tree's root descriptor, one component
//! at a time, so a symlink anywhere on the path is an error instead of a
//! detour out of the tree; the final component is always created with
//! `O_CREAT | O_EXCL | O_NOFOLLOW` (or `mkdirat` / `symlinkat` / `linkat` /
//! `mknodat`) after whatever was there was unlinked, so an existing symlink
//! is replaced, never written through.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// Longest entry path accepted, in components (bounds the recursion and the
/// descriptors held open while removing a tree).
pub(crate) const MAX_DEPTH: usize = 256;

/// A path inside the tree: normal components only.
pub(crate) type Comps = Vec<OsString>;

/// Why a path inside the tree could not be used.
#[derive(Debug)]
pub(crate) enum TreeError {
    /// This existing component is a symlink.
    Symlink(PathBuf),
    /// This existing component is not a directory.
    NotDir(PathBuf),
    /// Another error.
    Io(io::Error),
}

impl From<io::Error> for TreeError {
    fn from(e: io::Error) -> Self {
        TreeError::Io(e)
    }
}

impl From<Errno> for TreeError {
    fn from(e: Errno) -> Self {
        TreeError::Io(e.into())
    }
}

/// `path` as tree components: a leading `/` and `.` are dropped, `..` pops
/// one component and is an error when it would climb above the root.
pub(crate) fn normalize(path: &Path) -> Result<Comps, String> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                if out.pop().is_none() {
                    return Err("the path climbs out of the root with `..`".into());
                }
            }
            Component::Normal(n) => out.push(n.to_os_string()),
        }
    }
    if out.len() > MAX_DEPTH {
        return Err(format!("the path is deeper than {MAX_DEPTH} components"));
    }
    Ok(out)
}

/// Whether a symlink at `link_dir/<name>` pointing at `target` stays inside
/// the root when resolved lexically (absolute targets from the root).
pub(crate) fn symlink_target_ok(link_dir: &[OsString], target: &Path) -> Result<(), String> {
    if target.as_os_str().is_empty() {
        return Err("the symlink target is empty".into());
    }
    let mut depth: usize = if target.is_absolute() { 0 } else { link_dir.len() };
    for c in target.components() {
        match c {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("the symlink target {:?} climbs above the root", target))?;
            }
            Component::Normal(_) => depth += 1,
        }
    }
    Ok(())
}

/// `comps` joined, for messages and keys.
pub(crate) fn join(comps: &[OsString]) -> PathBuf {
    comps.iter().collect()
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// The file type of `name` in `dir`, without following a symlink; `None`
/// when it does not exist.
pub(crate) fn kind_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<FileType>> {
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The names in a directory, without `.` and `..`.
pub(crate) fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    let mut d = rfs::Dir::read_from(dir)?;
    while let Some(entry) = d.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

/// Removes `name` from `dir`, recursively when it is a directory; no-op
/// when it does not exist. Never follows a symlink.
pub(crate) fn remove_all(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    remove_all_depth(dir, name, 0)
}

fn remove_all_depth(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> io::Result<()> {
    match kind_at(dir, name)? {
        None => Ok(()),
        Some(FileType::Directory) => {
            if depth > MAX_DEPTH * 2 {
                return Err(io::Error::other("directory tree too deep to remove"));
            }
            let sub = rfs::openat(dir, name, dir_flags(), Mode::empty())?;
            for child in list(sub.as_fd())? {
                remove_all_depth(sub.as_fd(), &child, depth + 1)?;
            }
            rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
            Ok(())
        }
        Some(_) => Ok(rfs::unlinkat(dir, name, AtFlags::empty())?),
    }
}

/// The staging tree.
pub(crate) struct Tree {
    root: OwnedFd,
}

impl Tree {
    /// Opens the tree rooted at `path` (which must be a real directory).
    pub(crate) fn open(path: &Path) -> io::Result<Tree> {
        let root = rfs::open(path, dir_flags(), Mode::empty())?;
        Ok(Tree { root })
    }

    /// The root directory's descriptor.
    pub(crate) fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Opens the directory at `comps` (the root when empty). Missing
    /// components are created (mode 0755, owned by the importer) when
    /// `create`, else the answer is `None`.
    pub(crate) fn dir(&self, comps: &[OsString], create: bool) -> Result<Option<OwnedFd>, TreeError> {
        let mut cur = rfs::openat(self.root.as_fd(), ".", dir_flags(), Mode::empty())?;
        for (i, c) in comps.iter().enumerate() {
            match rfs::openat(cur.as_fd(), c.as_os_str(), dir_flags(), Mode::empty()) {
                Ok(fd) => cur = fd,
                Err(err) => match kind_at(cur.as_fd(), c)? {
                    None if create => {
                        rfs::mkdirat(cur.as_fd(), c.as_os_str(), Mode::from_raw_mode(0o755))?;
                        let fd = rfs::openat(cur.as_fd(), c.as_os_str(), dir_flags(), Mode::empty())?;
                        rfs::fchmod(&fd, Mode::from_raw_mode(0o755))?;
                        cur = fd;
                    }
                    None => return Ok(None),
                    Some(FileType::Symlink) => return Err(TreeError::Symlink(join(&comps[..=i]))),
                    Some(FileType::Directory) => return Err(TreeError::Io(err.into())),
                    Some(_) => return Err(TreeError::NotDir(join(&comps[..=i]))),
                },
            }
        }
        Ok(Some(cur))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(s: &str) -> Comps {
        normalize(Path::new(s)).unwrap()
    }

    #[test]
    fn paths_are_normalized_inside_the_root() {
        assert_eq!(join(&comps("/etc/passwd")), PathBuf::from("etc/passwd"));
        assert_eq!(join(&comps("./a//b/./c/")), PathBuf::from("a/b/c"));
        assert_eq!(join(&comps("a/../b")), PathBuf::from("b"));
        assert!(comps("./").is_empty());
        assert!(normalize(Path::new("../x")).is_err());
        assert!(normalize(Path::new("a/../../x")).is_err());
        assert!(normalize(Path::new("/../x")).is_err());
        let deep = "a/".repeat(MAX_DEPTH + 1);
        assert!(normalize(Path::new(&deep)).is_err());
    }

    #[test]
    fn symlink_targets_are_checked_lexically() {
        let ok = |dir: &str, t: &str| symlink_target_ok(&comps(dir), Path::new(t)).is_ok();
        assert!(ok("usr/bin", "../lib/x"));
        assert!(ok("a/b", "../../etc"));
        assert!(!ok("a", "../../../etc"));
        assert!(ok("", "/etc/passwd"));
        assert!(!ok("a/b/c", "/../etc"));
        assert!(!ok("", ".."));
        assert!(!ok("a", ""));
        assert!(ok("a", "./b/../c"));
    }

    #[test]
    fn the_walk_refuses_symlinks_and_creates_missing_dirs() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("evil")).unwrap();
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let tree = Tree::open(dir.path()).unwrap();
        match tree.dir(&comps("evil/sub"), true) {
            Err(TreeError::Symlink(p)) => assert_eq!(p, PathBuf::from("evil")),
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(matches!(tree.dir(&comps("file/x"), true), Err(TreeError::NotDir(_))));
        assert!(tree.dir(&comps("new/a"), false).unwrap().is_none());
        assert!(tree.dir(&comps("new/a"), true).unwrap().is_some());
        assert!(dir.path().join("new/a").is_dir());
        remove_all(tree.root(), OsStr::new("new")).unwrap();
        remove_all(tree.root(), OsStr::new("evil")).unwrap();
        assert!(!dir.path().join("new").exists());
        assert!(std::fs::symlink_metadata(dir.path().join("evil")).is_err());
        assert!(Path::new("/etc/passwd").exists());
    }
}
