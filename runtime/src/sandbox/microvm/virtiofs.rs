//! The pod's volumes: one virtiofsd per pod serving `volumes/`, where each
//! container's host paths are bound.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tracing::info;

use super::{
    tail, MicroVmDriver, VIRTIOFSD_EXIT_WAIT, VIRTIOFSD_LOG, VIRTIOFSD_READY_TIMEOUT,
    VIRTIOFS_SOCKET, VOLUMES_DIR,
};
use crate::sandbox::cgroups::VmCgroup;
use crate::sandbox::{io_err, log_output, volumes, SandboxError};

/// Ends the pod's virtiofsd (and waits for it to go) and detaches every
/// bind below `volumes/`.
/// Idempotent; the directory itself stays until the sandbox's goes.
pub(super) async fn end_volumes(id: &str, dir: &Path) -> Result<(), SandboxError> {
    let socket = dir.join(VIRTIOFS_SOCKET);
    let killed = crate::sandbox::kill_processes_naming(&socket);
    if !killed.is_empty() {
        info!(sandbox = id, pids = ?killed, "virtiofsd killed");
    }
    // Gone before the cgroup is emptied, which would count them as left over.
    let deadline = Instant::now() + VIRTIOFSD_EXIT_WAIT;
    while Instant::now() < deadline && !crate::sandbox::processes_naming(&socket).is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = fs::remove_file(&socket);
    volumes::detach_all(&dir.join(VOLUMES_DIR)).map_err(|source| SandboxError::Volume {
        id: id.to_owned(),
        source,
    })
}

/// Each host path is bound below the pod's `volumes/`, which virtiofsd
/// serves: the guest sees it live at `<volumes_dir>/<container>/<n>`.
pub(super) fn share_mounts(
    id: &str,
    dir: &Path,
    volumes_dir: &str,
    container: &str,
    mounts: &[k8s_cri::v1::Mount],
) -> Result<Vec<k8s_cri::v1::Mount>, SandboxError> {
    use k8s_cri::v1::MountPropagation;

    if volumes_dir.is_empty() {
        return Err(SandboxError::Unsupported {
            id: id.to_owned(),
            detail: "the pod's guest has no volumes filesystem (started by an older \
                 huskd?): recreate the pod to use host-path mounts"
                .into(),
        });
    }
    // Mounts made in the guest cannot reach the node.
    if let Some(m) = mounts
        .iter()
        .find(|m| m.propagation() == MountPropagation::PropagationBidirectional)
    {
        return Err(SandboxError::Unsupported {
            id: id.to_owned(),
            detail: format!(
                "mount {}: propagation BIDIRECTIONAL cannot cross into a VM (the \
             microvm handler): use PRIVATE or HOST_TO_CONTAINER, or the host handler",
                m.container_path
            ),
        });
    }
    let root = dir.join(VOLUMES_DIR);
    let shared = mounts
        .iter()
        .enumerate()
        .map(|(index, mount)| {
            let propagation = match mount.propagation() {
                MountPropagation::PropagationHostToContainer => {
                    volumes::Propagation::HostToContainer
                }
                _ => volumes::Propagation::Private,
            };
            let relative = volumes::share(
                &root,
                container,
                index,
                &mount.host_path,
                mount.readonly,
                propagation,
            )?;
            Ok(k8s_cri::v1::Mount {
                host_path: Path::new(volumes_dir).join(relative).display().to_string(),
                ..mount.clone()
            })
        })
        .collect::<Result<Vec<_>, volumes::VolumeError>>();
    match shared {
        Ok(shared) => Ok(shared),
        Err(source) => {
            let _ = volumes::remove_dir(&root.join(container));
            Err(SandboxError::Volume {
                id: id.to_owned(),
                source,
            })
        }
    }
}

/// Removes the container's binds below `volumes/`.
pub(super) fn unshare_mounts(id: &str, dir: &Path, container: &str) -> Result<(), SandboxError> {
    volumes::remove_dir(&dir.join(VOLUMES_DIR).join(container)).map_err(|source| {
        SandboxError::Volume {
            id: id.to_owned(),
            source,
        }
    })
}

impl MicroVmDriver {
    /// Starts the pod's virtiofsd on `volumes/` (the sandbox's directory is
    /// new: nothing of an earlier one is there) and returns its
    /// socket once it listens. It runs in its own process group, like
    /// husk-vmm, and is found again by its command line (which names the
    /// socket).
    pub(super) async fn start_virtiofsd(
        &self,
        id: &str,
        dir: &Path,
        cgroup: &VmCgroup,
    ) -> Result<PathBuf, SandboxError> {
        let root = dir.join(VOLUMES_DIR);
        let socket = dir.join(VIRTIOFS_SOCKET);
        volumes::prepare(&root).map_err(|source| SandboxError::Volume {
            id: id.to_owned(),
            source,
        })?;
        let log_path = dir.join(VIRTIOFSD_LOG);
        let mut command = tokio::process::Command::new(&self.config.virtiofsd);
        command
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(&root)
            // Attributes and directory entries are cached for a second, so
            // the host's changes (kubelet's `..data` swaps) show within one.
            .arg("--cache=auto")
            .arg("--sandbox=namespace")
            .arg("--seccomp=kill")
            // Binds below the shared directory stay plain directories in
            // the guest: the agent bind-mounts each, and an automount per
            // volume would only add guest work.
            .arg("--no-announce-submounts")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .process_group(0);
        log_output(&mut command, id, &log_path)?;
        cgroup.join_on_exec(&mut command);
        let mut child = command.spawn().map_err(io_err(
            id,
            format!("starting {}", self.config.virtiofsd.display()),
        ))?;
        let deadline = Instant::now() + VIRTIOFSD_READY_TIMEOUT;
        let exited = loop {
            if socket.exists() {
                break None;
            }
            if let Ok(Some(status)) = child.try_wait() {
                break Some(format!("it exited ({status})"));
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                break Some(format!("no socket within {VIRTIOFSD_READY_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Reaped whenever it ends; its end is seen by husk-vmm.
        tokio::spawn(async move {
            let status = child.wait().await;
            info!(?status, "virtiofsd exited");
        });
        if let Some(why) = exited {
            return Err(SandboxError::VolumesBackend {
                id: id.to_owned(),
                detail: format!(
                    "virtiofsd on {}: {why}\n--- {} ---\n{}",
                    root.display(),
                    log_path.display(),
                    tail(dir, VIRTIOFSD_LOG, 15)
                ),
            });
        }
        Ok(socket)
    }
}
