//! The byte streams guest-agent can serve the host over.
//!
//! The serve loop only needs a reader and a writer; which device or socket
//! they come from is decided here.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

/// Host CID in AF_VSOCK addressing.
const VSOCK_HOST_CID: u32 = 2;

/// Where guest-agent meets the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// `vsock[:PORT]`: connect to the host (CID 2) on a vsock port.
    Vsock(u32),
    /// `port:NAME`: a virtio console port the host named NAME.
    Port(String),
    /// `unix:PATH`: connect to a Unix socket (host-side tests, where the
    /// agent runs as an ordinary process).
    Unix(PathBuf),
}

impl FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "vsock" {
            return Ok(Transport::Vsock(warren_protocol::AGENT_VSOCK_PORT));
        }
        if let Some(p) = s.strip_prefix("vsock:") {
            return p
                .parse()
                .map(Transport::Vsock)
                .map_err(|_| format!("bad vsock port {p:?} in transport {s:?}"));
        }
        if let Some(name) = s.strip_prefix("port:") {
            if name.is_empty() {
                return Err("transport port: needs a port name".into());
            }
            return Ok(Transport::Port(name.into()));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("transport unix: needs a socket path".into());
            }
            return Ok(Transport::Unix(path.into()));
        }
        Err(format!(
            "unknown transport {s:?}: expected vsock[:PORT], port:NAME or unix:PATH"
        ))
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Vsock(p) => write!(f, "vsock:{p}"),
            Transport::Port(n) => write!(f, "port:{n}"),
            Transport::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected transport, split into its two directions.
pub struct Connection {
    /// Bytes from the host.
    pub reader: Box<dyn Read + Send>,
    /// Bytes to the host.
    pub writer: Box<dyn Write + Send>,
}

impl Transport {
    /// Opens the transport once; the caller retries.
    pub fn connect(&self) -> io::Result<Connection> {
        match self {
            Transport::Unix(path) => {
                let s = UnixStream::connect(path)?;
                Ok(Connection {
                    reader: Box::new(s.try_clone()?),
                    writer: Box::new(s),
                })
            }
            Transport::Vsock(port) => {
                let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
                connect(fd.as_raw_fd(), &VsockAddr::new(VSOCK_HOST_CID, *port))?;
                // A connected stream socket reads and writes like a file.
                let s = File::from(fd);
                Ok(Connection {
                    reader: Box::new(s.try_clone()?),
                    writer: Box::new(s),
                })
            }
            Transport::Port(name) => {
                let dev = find_virtio_port(Path::new("/sys/class/virtio-ports"), name)?;
                let f = OpenOptions::new().read(true).write(true).open(&dev)?;
                let reader: File = f.try_clone()?;
                Ok(Connection {
                    reader: Box::new(reader),
                    writer: Box::new(f),
                })
            }
        }
    }
}

/// Finds `/dev/vportNpM` of the virtio console port named `name`: the
/// kernel publishes each port's name in sysfs; without udev there is no
/// `/dev/virtio-ports/NAME` link.
fn find_virtio_port(sysfs: &Path, name: &str) -> io::Result<PathBuf> {
    for entry in std::fs::read_dir(sysfs)? {
        let entry = entry?;
        let Ok(n) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if n.trim_end() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio console port named {name:?} in {}", sysfs.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spec() {
        assert_eq!("vsock".parse(), Ok(Transport::Vsock(1024)));
        assert_eq!("vsock:5000".parse(), Ok(Transport::Vsock(5000)));
        assert_eq!("port:warren.0".parse(), Ok(Transport::Port("warren.0".into())));
        assert_eq!("unix:/run/a.sock".parse(), Ok(Transport::Unix("/run/a.sock".into())));
    }

    #[test]
    fn rejects_bad_specs_naming_them() {
        for bad in ["vsock:x", "port:", "unix:", "tcp:1"] {
            let err = bad.parse::<Transport>().unwrap_err();
            assert!(err.contains(bad.split(':').next().unwrap()), "{err}");
        }
    }

    #[test]
    fn finds_a_port_by_name_in_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        for (dev, name) in [("vport0p0", "other"), ("vport0p1", "warren.0")] {
            std::fs::create_dir(dir.path().join(dev)).unwrap();
            std::fs::write(dir.path().join(dev).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find_virtio_port(dir.path(), "warren.0").unwrap(),
            Path::new("/dev/vport0p1")
        );
        assert_eq!(
            find_virtio_port(dir.path(), "missing").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
