//! huskd's gRPC server: CRI RuntimeService and ImageService on a unix socket.

mod authority;
mod image;
mod runtime;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;
use tracing::info;

use authority::AuthorityRewrite;
pub use image::Images;
pub use runtime::{Runtime, CRI_API_VERSION, RUNTIME_NAME};

use crate::manager::Manager;
use crate::streaming::Streaming;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("CRI socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serving CRI failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Binds the CRI socket (mode 0660), replacing a stale one.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// Serves both CRI services on `listener` until `shutdown` resolves. Each
/// connection goes through [`AuthorityRewrite`], so that gRPC clients that
/// send the socket's path as `:authority` are served too.
pub async fn serve(
    listener: UnixListener,
    manager: Arc<Manager>,
    streaming: Result<Arc<Streaming>, String>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    info!("serving CRI");
    let connections =
        UnixListenerStream::new(listener).map(|accepted| accepted.map(AuthorityRewrite::new));
    tonic::transport::Server::builder()
        .max_frame_size(authority::MAX_FRAME_SIZE)
        .trace_fn(|request| tracing::info_span!("cri", rpc = %request.uri().path()))
        .add_service(RuntimeServiceServer::new(Runtime::new(
            manager.clone(),
            streaming,
        )))
        .add_service(ImageServiceServer::new(Images::new(manager)))
        .serve_with_incoming_shutdown(connections, shutdown)
        .await?;
    Ok(())
}
