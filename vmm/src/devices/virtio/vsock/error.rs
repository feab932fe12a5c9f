//! Errors of the vsock device's construction.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or out of range (3..=0xffff_fffe)")]
    InvalidCid(u64),
    #[error("{} exists and is not a unix socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot inspect {}: {source}", path.display())]
    Stat { path: PathBuf, source: io::Error },
    #[error("cannot remove the stale socket {}: {source}", path.display())]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot create a vsock queue eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("cannot create the vsock epoll instance: {0}")]
    Epoll(#[source] io::Error),
    #[error("cannot create the vsock timer: {0}")]
    Timer(#[source] vmm_sys_util::errno::Error),
}
