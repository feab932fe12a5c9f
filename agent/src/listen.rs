//! The agent's listening socket: guest vsock or host unix socket, both served
//! as one stream of [`Conn`]s.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};
use tonic::transport::server::Connected;

use crate::cli::ListenAddr;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: ListenAddr, source: io::Error },
    #[error("cannot remove the stale socket {}: {source}", path.display())]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("refusing to listen on {}: it exists and is not a socket", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot listen on {}: another process is serving on it", path.display())]
    InUse { path: PathBuf },
}

/// Accepted connections, whichever kind of socket they come from.
pub type Incoming = Pin<Box<dyn Stream<Item = io::Result<Conn>> + Send>>;

pub struct Listener {
    pub incoming: Incoming,
    /// The unix socket's file, removed when this is dropped; None for vsock.
    pub socket_file: Option<SocketFile>,
}

pub fn bind(addr: &ListenAddr) -> Result<Listener, ListenError> {
    let bind_error = |source| ListenError::Bind {
        addr: addr.clone(),
        source,
    };
    match addr {
        ListenAddr::Vsock { port } => {
            let listener =
                VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, *port)).map_err(bind_error)?;
            Ok(Listener {
                incoming: Box::pin(listener.incoming().map(|conn| conn.map(Conn::Vsock))),
                socket_file: None,
            })
        }
        ListenAddr::Unix(path) => {
            remove_stale_socket(path)?;
            let listener = UnixListener::bind(path).map_err(bind_error)?;
            Ok(Listener {
                incoming: Box::pin(
                    UnixListenerStream::new(listener).map(|conn| conn.map(Conn::Unix)),
                ),
                socket_file: Some(SocketFile(path.clone())),
            })
        }
    }
}

/// A socket file left by an agent that did not exit cleanly would make bind
/// fail; remove it, but never a file that is not a socket or that someone is
/// still serving on.
fn remove_stale_socket(path: &Path) -> Result<(), ListenError> {
    match std::fs::symlink_metadata(path) {
        // Missing: nothing to remove. Anything else: bind reports it.
        Err(_) => return Ok(()),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ListenError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Ok(_) => {}
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ListenError::InUse {
            path: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(|source| ListenError::RemoveStale {
        path: path.to_path_buf(),
        source,
    })
}

/// Removes the unix socket file it names when dropped.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Nothing to do if it is already gone; the agent is ending anyway.
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One accepted connection. tonic needs `Connected` on the stream type, which
/// tokio-vsock only provides behind a feature that pulls in tonic's client
/// side too; an enum also lets both kinds share one server instance.
pub enum Conn {
    Vsock(VsockStream),
    Unix(UnixStream),
}

impl Connected for Conn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Vsock(stream) => Pin::new(stream).poll_read(cx, buf),
            Conn::Unix(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Vsock(stream) => Pin::new(stream).poll_write(cx, buf),
            Conn::Unix(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Vsock(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Conn::Unix(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Vsock(stream) => stream.is_write_vectored(),
            Conn::Unix(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Vsock(stream) => Pin::new(stream).poll_flush(cx),
            Conn::Unix(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Vsock(stream) => Pin::new(stream).poll_shutdown(cx),
            Conn::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
