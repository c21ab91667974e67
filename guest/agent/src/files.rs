//! File requests: read, write, list, remove.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use warren_protocol::{DirEntry, ErrorKind, FileKind, Reply, WriteFileRequest, MAX_CHUNK};

use crate::exec::io_kind;

/// A failed file request: class and message for the error frame.
pub type FileError = (ErrorKind, String);

fn absolute(path: &str) -> Result<&Path, FileError> {
    if !path.starts_with('/') {
        return Err((ErrorKind::InvalidRequest, format!("path {path:?} is not absolute")));
    }
    Ok(Path::new(path))
}

fn failed(what: &str, path: &str, e: std::io::Error) -> FileError {
    (io_kind(&e), format!("{what} {path}: {e}"))
}

/// Reads up to `max_len` bytes (capped at [`MAX_CHUNK`]) from `offset`.
pub fn read(path: &str, offset: u64, max_len: u32) -> Result<Reply, FileError> {
    let p = absolute(path)?;
    let mut f = fs::File::open(p).map_err(|e| failed("cannot open", path, e))?;
    if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err((ErrorKind::InvalidRequest, format!("{path} is a directory")));
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| failed("cannot seek in", path, e))?;
    let want = (max_len as usize).min(MAX_CHUNK);
    let mut data = vec![0u8; want];
    let mut got = 0;
    // Read until the buffer is full or the file ends: a short read is how
    // files without a size (procfs) tell their end.
    while got < want {
        match f.read(&mut data[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed("cannot read", path, e)),
        }
    }
    data.truncate(got);
    Ok(Reply::FileData { data, eof: got < want })
}

/// Writes (or appends) a chunk.
pub fn write(req: &WriteFileRequest) -> Result<Reply, FileError> {
    let path = &req.path;
    let p = absolute(path)?;
    if req.create_parents {
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(|e| failed("cannot create the parent directories of", path, e))?;
        }
    }
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).mode(req.mode.unwrap_or(0o644));
    if req.append {
        opts.append(true);
    } else {
        opts.truncate(true);
    }
    let mut f = opts.open(p).map_err(|e| failed("cannot open", path, e))?;
    f.write_all(&req.data).map_err(|e| failed("cannot write", path, e))?;
    if let Some(mode) = req.mode {
        // `mode` on open only applies to new files (and the umask cuts it).
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| failed("cannot set the mode of", path, e))?;
    }
    Ok(Reply::Done)
}

/// Lists a directory, sorted by name.
pub fn list(path: &str) -> Result<Reply, FileError> {
    let p = absolute(path)?;
    let mut entries = Vec::new();
    for entry in fs::read_dir(p).map_err(|e| failed("cannot list", path, e))? {
        let entry = entry.map_err(|e| failed("cannot list", path, e))?;
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue; // removed while listing
        };
        let ft = meta.file_type();
        entries.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            kind: if ft.is_file() {
                FileKind::File
            } else if ft.is_dir() {
                FileKind::Dir
            } else if ft.is_symlink() {
                FileKind::Symlink
            } else {
                FileKind::Other
            },
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            mtime_s: meta.mtime(),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Reply::Entries(entries))
}

/// Removes a file, symlink or (empty, unless `recursive`) directory.
pub fn remove(path: &str, recursive: bool) -> Result<Reply, FileError> {
    let p = absolute(path)?;
    if p == Path::new("/") {
        return Err((ErrorKind::InvalidRequest, "refusing to remove /".into()));
    }
    let meta = p.symlink_metadata().map_err(|e| failed("cannot remove", path, e))?;
    let r = if meta.is_dir() {
        if recursive {
            fs::remove_dir_all(p)
        } else {
            fs::remove_dir(p)
        }
    } else {
        fs::remove_file(p)
    };
    r.map_err(|e| failed("cannot remove", path, e))?;
    Ok(Reply::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    #[test]
    fn write_append_read_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub/a.txt");
        write(&WriteFileRequest {
            path: s(&f).into(),
            data: b"hello ".to_vec(),
            mode: Some(0o600),
            append: false,
            create_parents: true,
        })
        .unwrap();
        write(&WriteFileRequest {
            path: s(&f).into(),
            data: b"world".to_vec(),
            append: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            read(s(&f), 0, 100).unwrap(),
            Reply::FileData {
                data: b"hello world".to_vec(),
                eof: true
            }
        );
        assert_eq!(
            read(s(&f), 6, 3).unwrap(),
            Reply::FileData {
                data: b"wor".to_vec(),
                eof: false
            }
        );
        let Reply::Entries(e) = list(s(&dir.path().join("sub"))).unwrap() else {
            panic!()
        };
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].name.as_str(), e[0].kind, e[0].size, e[0].mode),
            ("a.txt", FileKind::File, 11, 0o600)
        );
        let err = remove(s(&dir.path().join("sub")), false).unwrap_err();
        assert_eq!(err.0, ErrorKind::Io, "{err:?}");
        remove(s(&dir.path().join("sub")), true).unwrap();
        assert_eq!(read(s(&f), 0, 1).unwrap_err().0, ErrorKind::NotFound);
    }

    #[test]
    fn relative_paths_and_root_are_refused() {
        assert_eq!(read("etc/passwd", 0, 1).unwrap_err().0, ErrorKind::InvalidRequest);
        assert_eq!(remove("/", true).unwrap_err().0, ErrorKind::InvalidRequest);
    }

    #[test]
    fn reading_a_directory_is_invalid() {
        let (kind, msg) = read("/tmp", 0, 1).unwrap_err();
        assert_eq!(kind, ErrorKind::InvalidRequest);
        assert!(msg.contains("directory"));
    }
}
