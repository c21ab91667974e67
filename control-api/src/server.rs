//! Accept loops: one per listener (loopback TCP, Unix socket), one task per
//! connection, and a graceful stop that lets in-flight requests finish.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::router::handle;
use crate::Node;

/// Failures setting up a listener.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding failed.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// The address or path.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The sockets the API serves on.
pub struct Listeners {
    /// Loopback TCP.
    pub tcp: Option<TcpListener>,
    /// Unix socket, with its path (removed when serving ends).
    pub unix: Option<(UnixListener, PathBuf)>,
}

impl Listeners {
    /// Binds a TCP address and a Unix socket path (a stale socket file at
    /// the path is replaced).
    pub async fn bind(tcp: Option<&str>, unix: Option<&std::path::Path>) -> Result<Listeners, ServeError> {
        let tcp = match tcp {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| ServeError::Bind {
                what: addr.to_string(),
                source,
            })?),
            None => None,
        };
        let unix = match unix {
            Some(path) => {
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path).map_err(|source| ServeError::Bind {
                    what: path.display().to_string(),
                    source,
                })?;
                Some((l, path.to_path_buf()))
            }
            None => None,
        };
        Ok(Listeners { tcp, unix })
    }

    /// The TCP address actually bound (port 0 picks one).
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Serves `node` on `listeners` until `stop` turns true, then waits up to
/// `grace` for open connections to finish their requests.
pub async fn serve<N: Node>(node: Arc<N>, listeners: Listeners, mut stop: watch::Receiver<bool>, grace: Duration) {
    let mut conns = JoinSet::new();
    let Listeners { tcp, unix } = listeners;
    let unix_path = unix.as_ref().map(|(_, p)| p.clone());
    let (tcp, unix) = (tcp, unix.map(|(l, _)| l));
    loop {
        tokio::select! {
            _ = stop.changed() => if *stop.borrow() { break },
            accepted = accept_tcp(&tcp) => match accepted {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    conns.spawn(connection(node.clone(), s, stop.clone()));
                }
                Err(e) => accept_error(e).await,
            },
            accepted = accept_unix(&unix) => match accepted {
                Ok(s) => { conns.spawn(connection(node.clone(), s, stop.clone())); }
                Err(e) => accept_error(e).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop((tcp, unix));
    if let Some(p) = unix_path {
        let _ = std::fs::remove_file(p);
    }
    let _ = tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
}

async fn accept_tcp(l: &Option<TcpListener>) -> std::io::Result<tokio::net::TcpStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

async fn accept_unix(l: &Option<UnixListener>) -> std::io::Result<tokio::net::UnixStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Out of file descriptors and the like: say so and back off instead of
/// spinning on a listener that keeps failing.
async fn accept_error(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn connection<N: Node, S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    node: Arc<N>,
    stream: S,
    mut stop: watch::Receiver<bool>,
) {
    let service = service_fn(move |req| {
        let node = node.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(node, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "connection ended") },
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
