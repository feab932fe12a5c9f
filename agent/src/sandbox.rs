//! The pod as a whole: hostname, sysctls, network interfaces and routes
//! (inside a microVM), DNS and hosts files, the shared directory huskd
//! writes them into, and the virtio-fs mount kubelet's volumes arrive by.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use husk_proto::v1;
use tracing::info;

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

/// Below the shared directory: where the pod's virtio-fs device is mounted.
const VOLUMES_DIR: &str = "volumes";

/// Where a set-up pod's files are, as the agent sees them.
#[derive(Debug)]
pub struct SandboxDirs {
    /// Where SetupSandbox writes resolv.conf and hosts.
    pub shared: PathBuf,
    /// The mounted volumes filesystem, when the pod has one.
    pub volumes: Option<PathBuf>,
}

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
    pub fn setup(&self, request: &v1::SetupSandboxRequest) -> Result<SandboxDirs, SandboxError> {
        // Checked whole before anything changes.
        let network = network::Plan::new(&request.interfaces, &request.routes)?;
        let wants_namespaced = !request.hostname.is_empty()
            || !request.sysctls.is_empty()
            || !network.is_empty()
            || !request.volumes_tag.is_empty();
        if wants_namespaced && !self.owns_namespaces {
            return Err(SandboxError::FailedPrecondition(
                "this agent shares the host's UTS and network namespaces: it will not set a hostname, sysctls, interfaces, routes or a volumes filesystem".into(),
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
        let volumes = (!request.volumes_tag.is_empty())
            .then(|| self.mount_volumes(&request.volumes_tag))
            .transpose()?;
        info!("set up");
        Ok(SandboxDirs {
            shared: self.shared_dir.clone(),
            volumes,
        })
    }

    /// Mounts the pod's virtio-fs device `tag` at `<shared>/volumes`, once:
    /// a second setup finds it mounted.
    fn mount_volumes(&self, tag: &str) -> Result<PathBuf, SandboxError> {
        use nix::mount::{mount, MsFlags};

        let dir = self.shared_dir.join(VOLUMES_DIR);
        fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let device = |path: &Path| fs::metadata(path).map(|m| m.dev());
        let mounted = device(&dir).map_err(io_error(format!("reading {}", dir.display())))?
            != device(&self.shared_dir)
                .map_err(io_error(format!("reading {}", self.shared_dir.display())))?;
        if !mounted {
            // No nosuid/nodev: the same flags a bind of the host path has.
            mount(
                Some(tag),
                &dir,
                Some("virtiofs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| SandboxError::Io {
                what: format!("mounting virtio-fs {tag:?} at {}", dir.display()),
                source: e.into(),
            })?;
            info!(tag, dir = %dir.display(), "volumes mounted");
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
