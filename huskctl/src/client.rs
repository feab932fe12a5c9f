//! The connection to huskd and huskctl's errors.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Everything that makes huskctl exit 1, as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach huskd at {socket}: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error("{call}: {code:?}: {message} (huskd at {socket})")]
    Rpc {
        call: String,
        socket: String,
        code: tonic::Code,
        message: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, CliError>;

impl CliError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> CliError {
        let what = what.into();
        move |source| CliError::Io { what, source }
    }
}

/// The socket path from `unix:///path` or a bare `/path`.
pub fn socket_path(address: &str) -> Result<PathBuf> {
    let path = match address.strip_prefix("unix://") {
        Some(rest) => rest,
        None if address.contains("://") => {
            return Err(CliError::Usage(format!(
                "--socket {address}: only unix:// sockets are supported"
            )))
        }
        None => address,
    };
    if path.is_empty() {
        return Err(CliError::Usage(format!(
            "--socket {address}: no socket path"
        )));
    }
    Ok(PathBuf::from(path))
}

/// An io error as people read it: "connection refused", not "Connection refused (os error 111)".
pub fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::NotFound => "no such socket (is huskd running?)".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

/// Both CRI services over one channel, and what every call needs.
#[derive(Clone)]
pub struct Huskd {
    pub rt: RuntimeServiceClient<Channel>,
    pub img: ImageServiceClient<Channel>,
    pub socket: String,
    /// Deadline of each call (plus whatever time the call itself asks for).
    pub timeout: Duration,
}

impl Huskd {
    /// Connects, failing with [`CliError::Unreachable`] if nothing answers on the socket.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Huskd> {
        let socket = path.display().to_string();
        let unreachable = |reason: String| CliError::Unreachable {
            socket: socket.clone(),
            reason,
        };
        // A first connection of our own, for an error that says what is wrong.
        match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(unreachable(io_reason(&e))),
            Err(_) => return Err(unreachable(format!("no answer within {timeout:?}"))),
        }
        let path = path.to_owned();
        let channel = Endpoint::try_from("http://[::]:50051")
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
            }))
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        Ok(Huskd {
            rt: RuntimeServiceClient::new(channel.clone()),
            img: ImageServiceClient::new(channel),
            socket,
            timeout,
        })
    }

    /// A request with the call deadline, extended by `extra`.
    pub fn request<T>(&self, message: T, extra: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout.saturating_add(extra));
        request
    }

    /// Turns a failed call into a one-line error naming the call and the socket.
    pub fn failed(&self, call: impl Into<String>) -> impl FnOnce(tonic::Status) -> CliError {
        let call = call.into();
        let socket = self.socket.clone();
        move |status| {
            // The connection failing, as opposed to huskd answering
            // Unavailable (an unreachable registry, say): only then has the
            // status a source error.
            if status.code() == tonic::Code::Unavailable {
                if let Some(source) = std::error::Error::source(&status) {
                    return CliError::Unreachable {
                        socket,
                        reason: error_chain(source),
                    };
                }
            }
            CliError::Rpc {
                call,
                socket,
                code: status.code(),
                message: status.message().to_owned(),
            }
        }
    }
}

/// An error and its sources, innermost last.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// A full id from a unique prefix of one (tables show 13 characters).
pub fn resolve<'a>(what: &str, id: &str, ids: impl Iterator<Item = &'a str>) -> Result<String> {
    let matches: Vec<&str> = ids.filter(|full| full.starts_with(id)).collect();
    if matches.contains(&id) {
        return Ok(id.to_owned());
    }
    match matches.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => Ok(id.to_owned()), // huskd says it is not there
        many => Err(CliError::Usage(format!(
            "{what} id {id:?} is ambiguous: {}",
            many.join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses() {
        assert_eq!(
            socket_path("unix:///run/husk/husk.sock").unwrap(),
            PathBuf::from("/run/husk/husk.sock")
        );
        assert_eq!(
            socket_path("/tmp/x.sock").unwrap(),
            PathBuf::from("/tmp/x.sock")
        );
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://").is_err());
    }

    #[tokio::test]
    async fn huskds_own_unavailable_is_not_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let _listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let h = Huskd::connect(&socket, Duration::from_secs(5))
            .await
            .unwrap();
        let err = h.failed("PullImage x")(tonic::Status::unavailable("registry down"));
        assert_eq!(
            err.to_string(),
            format!(
                "PullImage x: Unavailable: registry down (huskd at {})",
                socket.display()
            )
        );
    }

    #[test]
    fn ids_resolve_by_prefix() {
        let ids = ["abc123", "abd456", "x"];
        assert_eq!(
            resolve("pod", "abc", ids.iter().copied()).unwrap(),
            "abc123"
        );
        assert_eq!(resolve("pod", "x", ids.iter().copied()).unwrap(), "x");
        assert_eq!(resolve("pod", "zz", ids.iter().copied()).unwrap(), "zz");
        assert!(resolve("pod", "ab", ids.iter().copied()).is_err());
    }
}
