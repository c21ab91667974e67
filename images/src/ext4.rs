//! A directory tree → a read-only ext4 image, as small as the tree allows.
//!
//! `mke2fs -d` copies the tree (modes, owners, symlinks, hard links, device
//! nodes) into a fresh file system; `resize2fs -M` then shrinks it to the
//! blocks it needs and the file is truncated to that size. The image is
//! made for mounting read-only (under an overlay), so no journal and no
//! reserved blocks: both would only cost space.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why an image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// The source is not a directory.
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// A tool could not be started (e2fsprogs missing?).
    #[error("cannot run {tool} (is e2fsprogs installed?): {source}")]
    Spawn {
        /// The program.
        tool: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The program.
        tool: &'static str,
        /// Its exit status.
        status: String,
        /// The end of what it printed.
        stderr: String,
    },
    /// The tree is larger than allowed.
    #[error("the tree is {bytes} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Apparent size of the tree.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// An I/O error on the image file or the tree.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Image {
    /// The image file.
    pub path: PathBuf,
    /// Its size after shrinking.
    pub bytes: u64,
}

/// Options of [`build`].
#[derive(Debug, Clone)]
pub struct Ext4Options {
    /// Volume label.
    pub label: String,
    /// Refuse trees whose apparent size is larger (bytes).
    pub max_bytes: Option<u64>,
    /// Fixed file-system UUID and hash seed, so that the same tree gives
    /// the same image.
    pub uuid: String,
}

impl Default for Ext4Options {
    fn default() -> Self {
        Ext4Options {
            label: "warren".into(),
            max_bytes: None,
            uuid: "5ea1ed00-0000-4000-8000-000000000000".into(),
        }
    }
}

/// Builds `out` from the tree at `src`.
pub fn build(src: &Path, out: &Path, opts: &Ext4Options) -> Result<Ext4Image, Ext4Error> {
    if !src.is_dir() {
        return Err(Ext4Error::NotADirectory(src.to_path_buf()));
    }
    let (bytes, inodes) = tree_size(src)?;
    if let Some(limit) = opts.max_bytes {
        if bytes > limit {
            return Err(Ext4Error::TooLarge { bytes, limit });
        }
    }
    // Sized to the tree plus a little for metadata: mke2fs -d spreads
    // files over the block groups, so an image made roomy and shrunk with
    // resize2fs -M keeps about a third more than it needs. Too tight and
    // mke2fs runs out of space: then grow and try again.
    let inode_count = inodes + inodes / 8 + 256;
    let mut blocks = bytes / 4096 + bytes / 4096 / 50 + inodes / 16 + 2048;
    let io = |source| Ext4Error::Io {
        path: out.to_path_buf(),
        source,
    };
    let mut attempt = 0;
    loop {
        let _ = std::fs::remove_file(out);
        let file = std::fs::File::create(out).map_err(io)?;
        file.set_len(blocks * 4096).map_err(io)?;
        drop(file);
        let made = run(
            "mke2fs",
            Command::new("mke2fs")
                .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
                .args(["-O", "^has_journal,^resize_inode"])
                .args(["-N", &inode_count.to_string()])
                .args(["-L", &opts.label, "-U", &opts.uuid])
                .args(["-E", &format!("hash_seed={},root_owner=0:0", opts.uuid)])
                .arg("-d")
                .arg(src)
                .arg(out)
                .env("E2FSPROGS_FAKE_TIME", "1"),
        );
        match made {
            Ok(_) => break,
            Err(Ext4Error::Tool { .. }) if attempt < 6 => {
                attempt += 1;
                blocks += blocks / 8;
            }
            Err(e) => {
                let _ = std::fs::remove_file(out);
                return Err(e);
            }
        }
    }
    // resize2fs insists on a freshly checked file system.
    // The fake time keeps the superblock's check and write times fixed.
    run(
        "e2fsck",
        Command::new("e2fsck")
            .args(["-f", "-y"])
            .arg(out)
            .env("E2FSPROGS_FAKE_TIME", "1"),
    )?;
    run(
        "resize2fs",
        Command::new("resize2fs")
            .args(["-M"])
            .arg(out)
            .env("E2FSPROGS_FAKE_TIME", "1"),
    )?;
    let bytes = fs_bytes(out)?;
    let file = std::fs::OpenOptions::new().write(true).open(out).map_err(io)?;
    file.set_len(bytes).map_err(io)?;
    Ok(Ext4Image {
        path: out.to_path_buf(),
        bytes,
    })
}

/// Apparent bytes (files rounded up to 4 KiB blocks) and entries of a tree,
/// without following symlinks.
fn tree_size(root: &Path) -> Result<(u64, u64), Ext4Error> {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let io = |source| Ext4Error::Io {
            path: dir.clone(),
            source,
        };
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let meta = entry.metadata().map_err(io)?;
            inodes += 1;
            bytes += meta.len().div_ceil(4096) * 4096;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// The file system's size from its superblock (block count × block size).
fn fs_bytes(image: &Path) -> Result<u64, Ext4Error> {
    let out = run("dumpe2fs", Command::new("dumpe2fs").arg("-h").arg(image))?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (field("Block count:"), field("Block size:")) {
        (Some(count), Some(size)) => Ok(count * size),
        _ => Err(Ext4Error::Tool {
            tool: "dumpe2fs",
            status: "ok".into(),
            stderr: "no block count or size in its output".into(),
        }),
    }
}

fn run(tool: &'static str, cmd: &mut Command) -> Result<String, Ext4Error> {
    let out = cmd.output().map_err(|source| Ext4Error::Spawn { tool, source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(Ext4Error::Tool {
            tool,
            status: out.status.to_string(),
            stderr: tail,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn debugfs(image: &Path, cmd: &str) -> String {
        let out = Command::new("debugfs").args(["-R", cmd]).arg(image).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn a_tree_becomes_a_small_image_with_its_modes_links_and_owners() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("etc/hello"), b"hello\n").unwrap();
        std::fs::set_permissions(src.join("etc/hello"), std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::hard_link(src.join("etc/hello"), src.join("etc/hello2")).unwrap();
        std::os::unix::fs::symlink("/etc/hello", src.join("link")).unwrap();
        std::fs::write(src.join("big"), vec![7u8; 3 << 20]).unwrap();
        let root = nix::unistd::geteuid().is_root();
        if root {
            std::os::unix::fs::lchown(src.join("etc/hello"), Some(1000), Some(1001)).unwrap();
        }
        let out = dir.path().join("root.ext4");
        let img = build(&src, &out, &Ext4Options::default()).unwrap();
        assert_eq!(std::fs::metadata(&out).unwrap().len(), img.bytes);
        // Shrunk: a few MiB of content must not give a big image.
        assert!(img.bytes < 12 << 20, "{} bytes", img.bytes);
        assert_eq!(debugfs(&out, "cat /etc/hello"), "hello\n");
        let stat = debugfs(&out, "stat /etc/hello");
        assert!(stat.contains("Mode:  0640"), "{stat}");
        assert!(stat.contains("Links: 2"), "{stat}");
        if root {
            assert!(stat.contains("User:  1000") && stat.contains("Group:  1001"), "{stat}");
        }
        let link = debugfs(&out, "stat /link");
        assert!(link.contains("Fast link dest: \"/etc/hello\""), "{link}");
        assert_eq!(std::fs::metadata(src.join("big")).unwrap().size(), 3 << 20);
    }

    #[test]
    fn the_limit_and_a_missing_tree_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![0u8; 1 << 20]).unwrap();
        let out = dir.path().join("x.ext4");
        let opts = Ext4Options {
            max_bytes: Some(4096),
            ..Default::default()
        };
        let err = build(dir.path(), &out, &opts).unwrap_err();
        assert!(matches!(err, Ext4Error::TooLarge { .. }), "{err}");
        let err = build(&dir.path().join("nope"), &out, &Ext4Options::default()).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }
}
