//! Sandbox drivers: what runs a pod's agent. `host` runs husk-agent on the
//! host in fresh namespaces; `microvm` boots it in a husk-vmm guest.
//! huskd talks to either through the same agent protocol.

mod cgroups;
pub mod host;
pub mod microvm;
pub mod sizing;
mod startup;
pub mod volumes;

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_proto::client::Agent;
use husk_proto::v1 as agent;

use crate::network::PodNetwork;

pub use host::HostDriver;
pub use microvm::{MicroVmConfig, MicroVmDriver};

/// Boxed futures keep the trait object-safe without an async-trait crate.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The longest path a unix socket can have: `sun_path` less its NUL.
pub const MAX_SOCKET_PATH: usize = 107;
/// The longest socket name a driver makes in a sandbox's directory
/// (`vsock.sock`, `agent.sock`, `api.sock`, `fs.sock`). huskd listens on no host port
/// for guests, so the VMM's `vsock.sock_PORT` sockets are never made.
const LONGEST_SOCKET_NAME: &str = "vsock.sock";
/// Sandbox ids are 64 hex digits.
const SANDBOX_ID_LEN: usize = 64;

/// The longest socket path any sandbox gets under the state directory
/// `state` (`<state>/sandboxes/<id>/<socket>`).
pub fn longest_socket_path(state: &Path) -> PathBuf {
    state
        .join("sandboxes")
        .join("f".repeat(SANDBOX_ID_LEN))
        .join(LONGEST_SOCKET_NAME)
}

/// How long a sandbox's agent has to answer after its start.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox {id}: {what}: {source}")]
    Io {
        id: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox {id}: the agent did not answer within {timeout:?}: {detail}")]
    NotReady {
        id: String,
        timeout: Duration,
        detail: String,
    },
    #[error("sandbox {id}: cannot reach the agent: {source}")]
    Connect {
        id: String,
        #[source]
        source: husk_proto::client::ConnectError,
    },
    #[error("sandbox {id}: the driver {driver:?} is not available: {detail}")]
    Unavailable {
        id: String,
        driver: String,
        detail: String,
    },
    #[error("sandbox {id}: the VMM's control API: {what}: {detail}")]
    Vmm {
        id: String,
        what: String,
        detail: String,
    },
    #[error("sandbox {id}: {detail}")]
    NoDiskSlot { id: String, detail: String },
    #[error("sandbox {id}: {detail}")]
    Unsupported { id: String, detail: String },
    #[error("sandbox {id}: the volumes' backend did not start: {detail}")]
    VolumesBackend { id: String, detail: String },
    #[error("sandbox {id}: volumes: {source}")]
    Volume {
        id: String,
        #[source]
        source: volumes::VolumeError,
    },
    #[error("sandbox {id}: processes {pids:?} of cgroup {} outlived SIGKILL", cgroup.display())]
    Survivors {
        id: String,
        cgroup: PathBuf,
        pids: Vec<i32>,
    },
}

/// Where a container's image root filesystem comes from, as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsPlan {
    /// The unpacked image directory (the agent shares the host's filesystem).
    Directory(PathBuf),
    /// A read-only block device in the guest holding the image's EROFS.
    BlockDevice(String),
}

/// One image a container needs, in both of the store's forms.
#[derive(Debug, Clone, Copy)]
pub struct ImageFiles<'a> {
    /// The image id (`sha256:…`), the key drivers remember attachments by.
    pub id: &'a str,
    pub rootfs_dir: &'a Path,
    pub erofs: &'a Path,
}

/// Whether `pid` is a live process (not one that has exited: [`has_exited`])
/// whose command line names `dir`: how drivers tell their own process from a
/// reused pid.
pub fn is_our_process(pid: u32, dir: &Path) -> bool {
    if pid == 0 || has_exited(pid) {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = dir.as_os_str().as_encoded_bytes();
    !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}

/// Resolves once the sandbox process `pid` (its command line names `dir`,
/// which tells it from a process that got a reused pid) has exited, or at
/// once if it is not running. Waits on a pidfd: the exit is seen when it
/// happens, also for a process an earlier huskd started.
pub async fn exited(pid: u32, dir: &Path) -> std::io::Result<()> {
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    if !is_our_process(pid, dir) {
        return Ok(());
    }
    let pidfd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
        Err(e) => return Err(e),
    };
    // Checked again now that the pidfd pins the process: the pid may have
    // been reused between the first check and the open.
    if !is_our_process(pid, dir) {
        return Ok(());
    }
    // A pidfd polls readable once its process has exited.
    // SAFETY: an OwnedFd's descriptor is valid and open, and stays the same
    // until the AsyncFd that owns it drops it.
    let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let _ready = pidfd.readable().await?;
    Ok(())
}

/// pidfd_open(2): nix and libc have no wrapper for it.
fn pidfd_open(pid: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;

    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: pidfd_open takes a pid and flags by value and touches no memory
    // of ours; it returns a new file descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// SIGKILLs the live processes whose command line names `dir` (a
/// sandbox's directory): what a sandbox whose pid was never recorded left
/// running. Returns their pids.
pub fn kill_processes_naming(dir: &Path) -> Vec<u32> {
    let pids = processes_naming(dir);
    for &pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    pids
}

/// Whether `pid` is gone or has exited: a zombie, or a process being torn
/// down (PF_EXITING: a SIGKILLed one whose memory, and so its command
/// line, is already gone; a VMM whose threads still free guest memory).
pub(crate) fn has_exited(pid: u32) -> bool {
    ProcStat::of(pid).is_none_or(|stat| stat.has_exited())
}

/// What huskd reads of a /proc/PID/stat line.
#[derive(Debug, PartialEq)]
pub(crate) struct ProcStat {
    state: char,
    flags: u64,
}

impl ProcStat {
    /// include/linux/sched.h
    const PF_EXITING: u64 = 0x4;
    const PF_KTHREAD: u64 = 0x0020_0000;

    /// `pid`'s, None if it is gone.
    pub(crate) fn of(pid: u32) -> Option<ProcStat> {
        ProcStat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    fn parse(stat: &str) -> Option<ProcStat> {
        // After the parenthesised command name: state, ppid, pgrp,
        // session, tty_nr, tpgid, flags.
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(ProcStat {
            state: fields.first()?.chars().next()?,
            flags: fields.get(6)?.parse().ok()?,
        })
    }

    /// See [`has_exited`].
    pub(crate) fn has_exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X') || self.flags & ProcStat::PF_EXITING != 0
    }

    /// A kernel thread (PF_KTHREAD), such as the worker KVM starts for each
    /// VM in its VMM's cgroups (`kvm-nx-lpage-recovery-PID`): no signal
    /// ends one; it ends with what it serves.
    pub(crate) fn is_kernel_thread(&self) -> bool {
        self.flags & ProcStat::PF_KTHREAD != 0
    }
}

/// The live processes (not huskd) whose command line names `dir`.
fn processes_naming(dir: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id() && is_our_process(pid, dir))
        .collect()
}

/// What a driver needs to start one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub id: String,
    /// `<state>/sandboxes/<id>`: the driver's own directory for the sandbox.
    pub dir: PathBuf,
    /// The pod's network as CNI made it: its namespace, which the driver's
    /// process joins, and its addresses. None: the host's network
    /// (hostNetwork pods).
    pub network: Option<PodNetwork>,
    /// The pod's Linux config: its resources and overhead size a VM.
    pub linux: Option<k8s_cri::v1::LinuxPodSandboxConfig>,
}

impl SandboxSpec {
    /// Makes the driver's process start in the pod's network namespace, if
    /// the pod has one.
    pub fn join_netns(&self, command: &mut tokio::process::Command) -> Result<(), SandboxError> {
        match &self.network {
            Some(network) => crate::network::netns::join_in_child(command, &network.netns).map_err(
                io_err(&self.id, format!("opening {}", network.netns.display())),
            ),
            None => Ok(()),
        }
    }
}

/// Runs a blocking operation (a namespace's netlink) off the async workers.
async fn blocking<T: Send + 'static>(
    id: &str,
    what: impl Into<String>,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, SandboxError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r)
        .map_err(io_err(id, what))
}

/// Sends `command`'s stdout and stderr to a new file at `path`, the
/// process's log.
fn log_output(
    command: &mut tokio::process::Command,
    id: &str,
    path: &Path,
) -> Result<(), SandboxError> {
    let log =
        std::fs::File::create(path).map_err(io_err(id, format!("creating {}", path.display())))?;
    let log2 = log
        .try_clone()
        .map_err(io_err(id, "duplicating the log file"))?;
    command.stdout(log).stderr(log2);
    Ok(())
}

/// Maps an I/O error to the sandbox's error, saying what was being done.
fn io_err(id: &str, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let id = id.to_owned();
    let what = what.into();
    move |source| SandboxError::Io { id, what, source }
}

/// A started sandbox: where its agent listens and the process that runs it.
#[derive(Debug, Clone)]
pub struct Started {
    pub agent_socket: PathBuf,
    pub pid: u32,
    pub client: Agent,
    /// The VM's size, for drivers that run one.
    pub vm_size: Option<sizing::VmSize>,
    /// The virtio-fs tag the agent mounts the pod's volumes from, for
    /// drivers whose agent cannot see the host's files.
    pub volumes_tag: Option<String>,
    /// The interfaces and routes the agent sets up, for drivers whose
    /// sandbox has a network stack of its own (a VM's); none where the
    /// agent already sits in the pod's network namespace.
    pub interfaces: Vec<agent::NetworkInterface>,
    pub routes: Vec<agent::Route>,
}

/// A way to run a pod's agent.
pub trait SandboxDriver: Send + Sync {
    /// The driver's name, as runtime handlers and state records use it.
    fn name(&self) -> &'static str;
    /// Starts the sandbox and returns once its agent answers Ping.
    fn start<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Started, SandboxError>>;
    /// Connects to the agent of a sandbox started earlier (maybe by another huskd).
    fn connect<'a>(
        &'a self,
        id: &'a str,
        agent_socket: &'a Path,
    ) -> BoxFuture<'a, Result<Agent, SandboxError>>;
    /// Ends the sandbox's process (after the agent's Shutdown, or instead of
    /// it): waits up to `grace`, then kills; with no grace (a failed
    /// sandbox) SIGKILL at once. Idempotent.
    fn stop<'a>(
        &'a self,
        id: &'a str,
        pid: u32,
        dir: &'a Path,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), SandboxError>>;
    /// Whether the sandbox's process still runs.
    fn alive(&self, pid: u32, dir: &Path) -> bool;

    /// Ends what of the sandbox outlives its process, once that was stopped
    /// or died. Idempotent.
    fn kill_leftovers<'a>(
        &'a self,
        id: &'a str,
        dir: &'a Path,
    ) -> BoxFuture<'a, Result<(), SandboxError>>;

    /// What is known of how the sandbox's process ended, if anything.
    fn exit_detail<'a>(&'a self, _dir: &'a Path) -> BoxFuture<'a, Option<String>> {
        Box::pin(async { None })
    }

    /// Whether the pod is its own machine (its own kernel, hostname and,
    /// later, network), rather than a group of host processes.
    fn runs_in_vm(&self) -> bool {
        false
    }

    /// Whether the pod's read-only volumes are read-only all the way down
    /// (CRI's recursive read-only mounts).
    fn recursive_read_only_mounts(&self) -> bool {
        false
    }

    /// Whether the agent sees the host's filesystem, so that the files
    /// huskd writes for the pod (resolv.conf, hosts) are there as they are.
    fn shares_host_fs(&self) -> bool {
        true
    }

    /// Makes a container's host-path mounts reachable by the sandbox's
    /// agent; returns them with each `host_path` as the agent sees it.
    /// `volumes_dir` is where the agent mounted the pod's volumes
    /// (SetupSandbox's answer). Called under the pod's lock.
    fn share_mounts<'a>(
        &'a self,
        _id: &'a str,
        _dir: &'a Path,
        _volumes_dir: &'a str,
        _container: &'a str,
        mounts: &'a [k8s_cri::v1::Mount],
    ) -> BoxFuture<'a, Result<Vec<k8s_cri::v1::Mount>, SandboxError>> {
        let mounts = mounts.to_vec();
        Box::pin(async move { Ok(mounts) })
    }

    /// Undoes [`share_mounts`](Self::share_mounts) once the container is
    /// gone. Idempotent.
    fn unshare_mounts<'a>(
        &'a self,
        _id: &'a str,
        _dir: &'a Path,
        _container: &'a str,
    ) -> BoxFuture<'a, Result<(), SandboxError>> {
        Box::pin(async { Ok(()) })
    }

    /// Makes `image` available to the sandbox's agent and says how the agent
    /// finds it. Called under the pod's lock; a second call for the same
    /// image returns the same answer.
    fn attach_image<'a>(
        &'a self,
        _id: &'a str,
        _dir: &'a Path,
        image: ImageFiles<'a>,
    ) -> BoxFuture<'a, Result<RootfsPlan, SandboxError>> {
        let plan = RootfsPlan::Directory(image.rootfs_dir.to_path_buf());
        Box::pin(async move { Ok(plan) })
    }

    /// Undoes [`attach_image`](Self::attach_image) once no container of the
    /// sandbox uses the image. Called under the pod's lock. Idempotent.
    fn release_image<'a>(
        &'a self,
        _id: &'a str,
        _dir: &'a Path,
        _image_id: &'a str,
    ) -> BoxFuture<'a, Result<(), SandboxError>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_or_an_exiting_process_has_exited() {
        // pid (comm) state ppid pgrp session tty_nr tpgid flags ...
        let exited = |line: &str| ProcStat::parse(line).is_none_or(|s| s.has_exited());
        let running = "42 (virtio fs) S 1 42 42 0 -1 4194560 100 0";
        let zombie = "42 (virtiofsd) Z 1 42 42 0 -1 4194560 100 0";
        let exiting = "42 (virtiofsd) R 1 42 42 0 -1 4194564 100 0";
        assert!(!exited(running));
        assert!(exited(zombie));
        assert!(exited(exiting));
        assert!(exited("garbage"));
        assert!(!has_exited(std::process::id()));
    }

    #[test]
    fn kernel_threads_are_told_apart() {
        let kernel_thread = |stat: Option<ProcStat>| stat.map(|s| s.is_kernel_thread());
        let kvm_worker = "181 (kvm-nx-lpage-recovery-178) S 2 0 0 0 -1 2129984 0 0";
        assert_eq!(kernel_thread(ProcStat::parse(kvm_worker)), Some(true));
        assert_eq!(kernel_thread(ProcStat::of(std::process::id())), Some(false));
        // kthreadd, pid 2 of the root PID namespace huskd runs in.
        assert_eq!(kernel_thread(ProcStat::of(2)), Some(true));
    }
}
