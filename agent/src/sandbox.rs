//! The pod as a whole: hostname, sysctls, network interfaces and routes
//! (inside a microVM), DNS and hosts files, and the shared directory
//! kubelet's files are copied into.

use std::fs::{self, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use husk_proto::v1::{self, FileKind};
use tracing::info;

use crate::container::paths::is_plain_relative;
use crate::network::{self, NetworkError};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

impl From<SandboxError> for tonic::Status {
    fn from(err: SandboxError) -> Self {
        let message = err.to_string();
        match err {
            SandboxError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            SandboxError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            SandboxError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                tonic::Status::not_found(message)
            }
            SandboxError::Io { .. } => tonic::Status::internal(message),
        }
    }
}

impl From<NetworkError> for SandboxError {
    fn from(err: NetworkError) -> Self {
        match err {
            NetworkError::InvalidArgument(message) => SandboxError::InvalidArgument(message),
            NetworkError::Netlink { what, source } => SandboxError::Io { what, source },
        }
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// Files CopyFile accepts per call: the gRPC message limit (4 MiB) bounds it anyway.
const MAX_CHUNK: usize = 4 << 20;

pub struct Sandbox {
    shared_dir: PathBuf,
    /// Whether the agent has namespaces of its own (a guest, or a host
    /// sandbox): only then may it set the hostname, sysctls and network.
    owns_namespaces: bool,
}

impl Sandbox {
    pub fn new(state_dir: &Path, owns_namespaces: bool) -> Sandbox {
        Sandbox {
            shared_dir: state_dir.join("shared"),
            owns_namespaces,
        }
    }

    #[tracing::instrument(skip_all, fields(sandbox = %request.sandbox_id))]
    pub fn setup(&self, request: &v1::SetupSandboxRequest) -> Result<PathBuf, SandboxError> {
        // Checked whole before anything changes.
        let network = network::Plan::new(&request.interfaces, &request.routes)?;
        let wants_namespaced =
            !request.hostname.is_empty() || !request.sysctls.is_empty() || !network.is_empty();
        if wants_namespaced && !self.owns_namespaces {
            return Err(SandboxError::FailedPrecondition(
                "this agent shares the host's UTS and network namespaces: it will not set a hostname, sysctls, interfaces or routes".into(),
            ));
        }
        fs::create_dir_all(&self.shared_dir)
            .map_err(io_error(format!("creating {}", self.shared_dir.display())))?;
        if !request.hostname.is_empty() {
            nix::unistd::sethostname(&request.hostname).map_err(|e| SandboxError::Io {
                what: format!("setting hostname {:?}", request.hostname),
                source: e.into(),
            })?;
        }
        for (key, value) in &request.sysctls {
            if key.contains('/') || key.split('.').any(|part| part.is_empty() || part == "..") {
                return Err(SandboxError::InvalidArgument(format!(
                    "bad sysctl name {key:?}"
                )));
            }
            let file = Path::new("/proc/sys").join(key.replace('.', "/"));
            fs::write(&file, value).map_err(io_error(format!("setting sysctl {key}")))?;
        }
        // After the sysctls, which may shape how interfaces behave.
        if !network.is_empty() {
            network.apply()?;
        }
        for (name, content) in [
            ("resolv.conf", &request.resolv_conf),
            ("hosts", &request.hosts),
        ] {
            if !content.is_empty() {
                let path = self.shared_dir.join(name);
                fs::write(&path, content)
                    .map_err(io_error(format!("writing {}", path.display())))?;
            }
        }
        info!("set up");
        Ok(self.shared_dir.clone())
    }

    /// Writes one entry below the shared directory, following no symlink on the way.
    #[tracing::instrument(skip_all, fields(path = %request.path))]
    pub fn copy_file(&self, request: &v1::CopyFileRequest) -> Result<(), SandboxError> {
        let relative = Path::new(&request.path);
        if !is_plain_relative(relative) {
            return Err(SandboxError::InvalidArgument(format!(
                "{:?} must be a relative path without '..'",
                request.path
            )));
        }
        if request.data.len() > MAX_CHUNK {
            return Err(SandboxError::InvalidArgument(
                "chunk larger than 4 MiB".into(),
            ));
        }
        fs::create_dir_all(&self.shared_dir)
            .map_err(io_error(format!("creating {}", self.shared_dir.display())))?;
        let parent = self.checked_parent(relative)?;
        let name = relative.file_name().ok_or_else(|| {
            SandboxError::InvalidArgument(format!("{:?} names no file", request.path))
        })?;
        let path = parent.join(name);
        let mode = request.mode & 0o7777;
        let kind = FileKind::try_from(request.kind).map_err(|_| {
            SandboxError::InvalidArgument(format!("unknown file kind {}", request.kind))
        })?;
        let what = || format!("writing {}", path.display());
        match kind {
            FileKind::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => {
                        return Err(SandboxError::FailedPrecondition(format!(
                            "{} exists and is not a directory",
                            request.path
                        )))
                    }
                    Err(_) => fs::create_dir(&path).map_err(io_error(what()))?,
                }
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                    .map_err(io_error(what()))?;
            }
            FileKind::Symlink => {
                match fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {
                        return Err(SandboxError::FailedPrecondition(format!(
                            "{} is a directory",
                            request.path
                        )))
                    }
                    Ok(_) => fs::remove_file(&path).map_err(io_error(what()))?,
                    Err(_) => {}
                }
                symlink(&request.symlink_target, &path).map_err(io_error(what()))?;
            }
            FileKind::Regular => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(request.offset == 0)
                    .mode(mode)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(io_error(what()))?;
                file.seek(SeekFrom::Start(request.offset))
                    .map_err(io_error(what()))?;
                file.write_all(&request.data).map_err(io_error(what()))?;
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_error(what()))?;
            }
        }
        std::os::unix::fs::lchown(&path, Some(request.uid), Some(request.gid))
            .map_err(io_error(what()))
    }

    /// The parent directory of `relative`, checked to be real directories
    /// (no symlinks) all the way from the shared directory.
    fn checked_parent(&self, relative: &Path) -> Result<PathBuf, SandboxError> {
        let mut dir = self.shared_dir.clone();
        let parent = relative.parent().unwrap_or(Path::new(""));
        for part in parent.components() {
            dir.push(part);
            let meta = fs::symlink_metadata(&dir).map_err(io_error(format!(
                "parent {} (copy parents first)",
                dir.display()
            )))?;
            if !meta.is_dir() || meta.file_type().is_symlink() {
                return Err(SandboxError::InvalidArgument(format!(
                    "{} is not a directory",
                    dir.display()
                )));
            }
        }
        Ok(dir)
    }
}

/// Whether this process has UTS and network namespaces other than its
/// parent's: PID 1 of a guest does; on the host, the parent is huskd, which
/// gave the agent its own unless the pod shares the node's network. (Not
/// init's: /proc/1 may be closed even to root.)
pub fn owns_namespaces() -> bool {
    std::process::id() == 1
        || ["uts", "net"]
            .iter()
            .all(|kind| parents_other_namespace(kind).is_some())
}

/// The node's mount namespace, for a host agent (which has one of its own,
/// made when its pod started); `None` in a guest.
pub fn node_mount_namespace() -> Option<fs::File> {
    (std::process::id() != 1)
        .then(|| parents_other_namespace("mnt"))
        .flatten()
}

/// The parent's namespace of `kind`, opened, if it is not ours.
fn parents_other_namespace(kind: &str) -> Option<fs::File> {
    let parent = nix::unistd::getppid();
    let theirs = fs::File::open(format!("/proc/{parent}/ns/{kind}")).ok()?;
    let ours = fs::metadata(format!("/proc/self/ns/{kind}")).ok()?;
    (theirs.metadata().ok()?.ino() != ours.ino()).then_some(theirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_interface() -> v1::SetupSandboxRequest {
        v1::SetupSandboxRequest {
            sandbox_id: "pod".into(),
            interfaces: vec![v1::NetworkInterface {
                mac: "02:00:00:00:00:01".into(),
                addresses: vec!["10.88.0.5/16".into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn an_agent_sharing_the_hosts_network_configures_none() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::new(dir.path(), false);
        let err = sandbox.setup(&with_interface()).unwrap_err();
        assert!(matches!(err, SandboxError::FailedPrecondition(_)), "{err}");
        let routes_only = v1::SetupSandboxRequest {
            routes: vec![v1::Route {
                gateway: "10.88.0.1".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = sandbox.setup(&routes_only).unwrap_err();
        assert!(matches!(err, SandboxError::FailedPrecondition(_)), "{err}");
    }

    #[test]
    fn a_bad_network_request_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::new(dir.path(), true);
        let mut request = with_interface();
        request.hosts = "127.0.0.1 localhost\n".into();
        request.interfaces[0].addresses = vec!["10.88.0.5".into()];
        let err = sandbox.setup(&request).unwrap_err();
        assert!(matches!(err, SandboxError::InvalidArgument(_)), "{err}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::InvalidArgument
        );
        assert!(!dir.path().join("shared/hosts").exists());
    }
}
