//! The `microvm` driver: one husk-vmm process per pod, booting husk's guest
//! kernel with husk-agent as PID 1, reached over the VMM's hybrid vsock.
//!
//! Everything of a sandbox lives in its directory `<state>/sandboxes/<id>/`:
//!
//! | file | what |
//! |---|---|
//! | `vsock.sock` | the VMM's hybrid vsock (`CONNECT 1024` reaches the agent) |
//! | `api.sock` | the VMM's control API (attach/detach disks, shutdown) |
//! | `console.log` | the guest's serial console |
//! | `vmm.log` | husk-vmm's own log (stdout and stderr) |
//! | `vmm.exit` | how husk-vmm ended, once it has (if this huskd started it) |
//! | `disks.json` | which spare disk slot holds which image |
//! | `volumes/` | kubelet's host paths, bound in per container ([`super::volumes`]) |
//! | `fs.sock` | virtiofsd's vhost-user socket, serving `volumes/` |
//! | `virtiofsd.log` | virtiofsd's log |
//! | `jail/` | husk-vmm's whole file system once it runs (empty) |
//! | `jail.id` | the uid and gid husk-vmm runs as |
//! | `cgroup.path` | the VM's cgroup, below each hierarchy ([`super::cgroups`]) |
//!
//! The VMM runs in its own process group and outlives huskd: a restarted
//! huskd finds it again by its recorded pid (checked against its command
//! line, which names the directory) and its sockets.
//!
//! Images reach the guest as read-only virtio-blk disks: husk-vmm starts
//! with `spare_disks` empty slots (`/dev/vda`, `/dev/vdb`, … in the guest)
//! and huskd fills one per image the pod's containers use, through the
//! control API. The guest learns of the new capacity from a config-change
//! interrupt; huskd does not wait for that here, the container manager
//! retries the agent's mount for a while instead (see
//! `manager::container`).
//!
//! husk-vmm confines itself before the guest runs (`husk-vmm --jail`,
//! vmm/src/jail.rs): new mount, IPC and UTS namespaces with `jail/` as its
//! root, rlimits, seccomp, and a uid and gid of its own, one pair per pod
//! (from `first` of [`JailIds`] on): a VMM a guest took over cannot signal,
//! trace or share files with another pod's, whatever its filters allow.
//! So images are attached as file descriptors, not paths. It and virtiofsd
//! join the pod's cgroup before they run.
//!
//! Volumes reach the guest live through virtio-fs: huskd starts one
//! virtiofsd per pod (in its own namespace sandbox, with its seccomp filter)
//! on `volumes/` before husk-vmm, which connects to it. virtiofsd ends when
//! husk-vmm does (it serves one connection), and husk-vmm stops the guest
//! if virtiofsd dies first (exit status 3, its log says why).

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_proto::client::{
    check_version, connect, Agent, AgentAddr, ConnectError, VersionError, DEFAULT_CONNECT_TIMEOUT,
};
use husk_proto::{vmm_api, AGENT_VSOCK_PORT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{info, info_span, warn, Instrument};

mod disks;
mod jail;
mod virtiofs;

pub use disks::guest_device;
pub use jail::JailIds;

use crate::network::link::{self, LinkFacts};
use crate::network::{self, POD_IFNAME, VM_TAP};

use super::cgroups::{self, kill_cgroups, VmCgroup, CGROUP_ROOT};
use super::sizing::VmSizing;
use super::startup::{Attempt, Spawned};
use super::{
    blocking, io_err, is_our_process, log_output, BoxFuture, ImageFiles, RootfsPlan, SandboxDriver,
    SandboxError, SandboxSpec, Started,
};

/// Empty disk slots per pod: one per distinct image its containers use.
/// Together with vsock they must fit husk-vmm's 11 device IRQs.
pub const DEFAULT_SPARE_DISKS: usize = 8;
/// One control API exchange.
const API_TIMEOUT: Duration = Duration::from_secs(10);

const VSOCK_SOCKET: &str = "vsock.sock";
const API_SOCKET: &str = "api.sock";
const CONSOLE_LOG: &str = "console.log";
const VMM_LOG: &str = "vmm.log";
/// husk-vmm's exit status, written when it ends (if this huskd started it).
const VMM_EXIT: &str = "vmm.exit";
/// How long a look at a dead VMM waits for its exit status to be recorded.
const EXIT_STATUS_WAIT: Duration = Duration::from_secs(1);
const DISK_TABLE: &str = "disks.json";
const VOLUMES_DIR: &str = "volumes";
const VIRTIOFS_SOCKET: &str = "fs.sock";
const VIRTIOFSD_LOG: &str = "virtiofsd.log";
const JAIL_DIR: &str = "jail";
const JAIL_ID: &str = "jail.id";
const CGROUP_PATH: &str = "cgroup.path";
/// How many jailed VMMs can exist at once, each with its own ids.
const JAIL_IDS: u32 = 65_536;
/// The virtio-fs tag of every pod's volumes.
const VOLUMES_TAG: &str = "husk-volumes";
/// How long a SIGKILLed virtiofsd has to be gone.
const VIRTIOFSD_EXIT_WAIT: Duration = Duration::from_secs(2);
/// How long virtiofsd has to listen on its socket.
const VIRTIOFSD_READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct MicroVmConfig {
    pub vmm: PathBuf,
    /// The virtio-fs backend serving each pod's volumes.
    pub virtiofsd: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// How big each pod's VM is.
    pub sizing: VmSizing,
    /// The guest kernel's command line; None keeps husk-vmm's default.
    pub cmdline: Option<String>,
    pub spare_disks: usize,
    pub boot_timeout: Duration,
    /// Each call into the guest's agent: [`husk_proto::client::CallDeadline`].
    pub call_deadline: Duration,
    /// Whether, and as whom, husk-vmm is jailed.
    pub jail: Option<JailIds>,
}

pub struct MicroVmDriver {
    config: MicroVmConfig,
    /// Serialises read-modify-write of every sandbox's disk table (the pod
    /// lock already does per pod; this covers calls made without it).
    disks: tokio::sync::Mutex<()>,
    /// Serialises choosing jail ids, which pods start concurrently.
    jail_ids: std::sync::Mutex<()>,
}

/// Whether this host's KVM is PVM (husk-vmm's `--pvm auto` decides the same
/// way): guests there get one vCPU.
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The last `n` lines of a file in the sandbox directory.
fn tail(dir: &Path, file: &str, n: usize) -> String {
    let text = fs::read_to_string(dir.join(file)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What an operator needs when a guest does not come up.
pub fn diagnostics(dir: &Path) -> String {
    format!(
        "\n--- husk-vmm log ({}) ---\n{}\n--- guest console, last 30 lines ({}) ---\n{}",
        dir.join(VMM_LOG).display(),
        tail(dir, VMM_LOG, 15),
        dir.join(CONSOLE_LOG).display(),
        tail(dir, CONSOLE_LOG, 30)
    )
}

/// One request on the VMM's control API, with `file`'s descriptor attached
/// if given (SCM_RIGHTS); why not, if it failed.
async fn api_call(
    socket: &Path,
    request: vmm_api::Request,
    file: Option<fs::File>,
) -> Result<vmm_api::Reply, String> {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || {
        let fd = file.as_ref().map(AsFd::as_fd);
        vmm_api::call(&socket, &request, fd, API_TIMEOUT).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("the control API call failed: {e}"))?
}

impl MicroVmDriver {
    /// The runtime handler, and what pod records name the driver by.
    pub const NAME: &'static str = "microvm";

    pub fn new(config: MicroVmConfig) -> MicroVmDriver {
        MicroVmDriver {
            config,
            disks: tokio::sync::Mutex::new(()),
            jail_ids: std::sync::Mutex::new(()),
        }
    }

    pub fn config(&self) -> &MicroVmConfig {
        &self.config
    }

    /// Reaches the guest's agent through the VMM's hybrid vsock socket.
    async fn connect_agent(&self, vsock: &Path) -> Result<Agent, ConnectError> {
        let addr = AgentAddr::HybridVsock {
            uds_path: vsock.to_owned(),
            port: AGENT_VSOCK_PORT,
        };
        connect(&addr, DEFAULT_CONNECT_TIMEOUT, self.config.call_deadline).await
    }

    /// Whether the files the driver needs are there; the message says which is not.
    pub fn check(&self) -> Result<(), String> {
        for (what, path, hint) in [
            (
                "husk-vmm",
                &self.config.vmm,
                "set husk_vmm in the config or --husk-vmm",
            ),
            (
                "virtiofsd",
                &self.config.virtiofsd,
                "install it (scripts/install-deps.sh does) and set virtiofsd or --virtiofsd",
            ),
            (
                "the guest kernel",
                &self.config.kernel,
                "build it with guest-image/build.sh and set guest_kernel or --guest-kernel",
            ),
            (
                "the guest initramfs",
                &self.config.initrd,
                "build it with guest-image/build.sh and set guest_initrd or --guest-initrd",
            ),
        ] {
            if !path.is_file() {
                return Err(format!("{what} not found at {} ({hint})", path.display()));
            }
        }
        Ok(())
    }

    /// Makes the VM's cgroup below the pod's cgroup parent and records
    /// where, for [`SandboxDriver::kill_leftovers`].
    fn make_cgroup(&self, spec: &SandboxSpec) -> Result<VmCgroup, SandboxError> {
        let id = spec.id.as_str();
        let parent = spec
            .linux
            .as_ref()
            .map_or("", |linux| linux.cgroup_parent.as_str());
        let relative =
            cgroups::vm_cgroup(parent, id).map_err(|detail| SandboxError::Unsupported {
                id: id.to_owned(),
                detail,
            })?;
        let record = spec.dir.join(CGROUP_PATH);
        fs::write(&record, relative.as_os_str().as_encoded_bytes())
            .map_err(io_err(id, format!("writing {}", record.display())))?;
        VmCgroup::create(Path::new(CGROUP_ROOT), &relative).map_err(io_err(
            id,
            format!("making the VM's cgroup {}", relative.display()),
        ))
    }

    async fn start_vm(&self, spec: &SandboxSpec) -> Result<Started, SandboxError> {
        let id = spec.id.as_str();
        let dir = &spec.dir;
        self.check().map_err(|detail| SandboxError::Unavailable {
            id: id.to_owned(),
            driver: Self::NAME.into(),
            detail,
        })?;
        fs::create_dir_all(dir).map_err(io_err(id, format!("creating {}", dir.display())))?;
        let vsock = dir.join(VSOCK_SOCKET);
        let api = dir.join(API_SOCKET);
        for stale in [&vsock, &api, &dir.join(VMM_EXIT)] {
            match fs::remove_file(stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err(id, format!("removing {}", stale.display()))(e))
                }
                _ => {}
            }
        }
        // The tap first: should it fail, nothing else has started yet.
        let guest_link = match &spec.network {
            Some(network) => Some(make_tap(id, &network.netns).await?),
            None => None,
        };
        self.save_table(id, dir, &self.load_table(id, dir)?)?;
        let cgroup = self.make_cgroup(spec)?;
        let virtiofs = self.start_virtiofsd(id, dir, &cgroup).await?;
        let pvm = host_is_pvm();
        let size = self.config.sizing.size_for(spec.linux.as_ref(), pvm);
        info!(
            sandbox = id,
            vcpus = size.vcpus,
            mem_mib = size.mem_mib,
            pvm,
            "sizing the pod's VM"
        );
        let mut command = tokio::process::Command::new(&self.config.vmm);
        command
            .arg("run")
            .arg("--kernel")
            .arg(&self.config.kernel)
            .arg("--initrd")
            .arg(&self.config.initrd)
            .arg("--mem-mib")
            .arg(size.mem_mib.to_string())
            .arg("--vcpus")
            .arg(size.vcpus.to_string())
            .arg("--vsock-uds")
            .arg(&vsock)
            .arg("--api-sock")
            .arg(&api)
            .arg("--spare-disks")
            .arg(self.config.spare_disks.to_string())
            .arg("--console-log")
            .arg(dir.join(CONSOLE_LOG))
            .arg("--fs")
            .arg(format!("tag={VOLUMES_TAG},socket={}", virtiofs.display()))
            .args(
                self.config
                    .cmdline
                    .iter()
                    .flat_map(|c| ["--cmdline".to_owned(), c.clone()]),
            )
            .env("HUSK_LOG", "husk_vmm=info")
            .stdin(Stdio::null())
            // Its own group: a signal to huskd's group (Ctrl-C) leaves pods running.
            .process_group(0);
        log_output(&mut command, id, &dir.join(VMM_LOG))?;
        // husk-vmm opens its tap inside the pod's namespace, where it is
        // joined to the pod's CNI interface once the VM runs.
        spec.join_netns(&mut command)?;
        cgroup.join_on_exec(&mut command);
        if let Some(ids) = self.config.jail {
            let uid = self.allocate_jail_id(id, dir, ids)?;
            let jail = dir.join(JAIL_DIR);
            fs::create_dir(&jail).map_err(io_err(id, format!("creating {}", jail.display())))?;
            command
                .arg("--jail")
                .arg(&jail)
                .arg("--uid")
                .arg(uid.to_string())
                .arg("--gid")
                .arg(uid.to_string());
        }
        if let Some(link) = &guest_link {
            command
                .arg("--net")
                .arg(format!("tap={VM_TAP},mac={}", link.mac));
        }
        let started_at = Instant::now();
        let child = command.spawn().map_err(io_err(
            id,
            format!("starting {}", self.config.vmm.display()),
        ))?;
        let spawned = Spawned::reap(child, id, "husk-vmm", Some(dir.join(VMM_EXIT)));
        let pid = spawned.pid;
        let attempt = || {
            let vsock = vsock.clone();
            async move {
                if !vsock.exists() {
                    return Attempt::NotYet("the vsock socket is not there yet".into());
                }
                let mut client = match self.connect_agent(&vsock).await {
                    Ok(client) => client,
                    Err(e) => return Attempt::NotYet(e.to_string()),
                };
                match check_version(&mut client).await {
                    Ok(version) => {
                        info!(
                            protocol = version,
                            elapsed_ms = started_at.elapsed().as_millis() as u64,
                            "the guest's agent answered"
                        );
                        Attempt::Answered(Box::new(Started {
                            agent_socket: vsock,
                            pid,
                            client,
                            vm_size: Some(size),
                            volumes_tag: Some(VOLUMES_TAG.to_owned()),
                            interfaces: Vec::new(),
                            routes: Vec::new(),
                        }))
                    }
                    Err(e @ VersionError::TooOld { .. }) => {
                        Attempt::Refused(format!("the guest's agent cannot serve huskd: {e}"))
                    }
                    Err(e) => Attempt::NotYet(e.to_string()),
                }
            }
        };
        let describe = |why: String| format!("husk-vmm: {why}{}", diagnostics(dir));
        let mut started = spawned
            .wait_for_agent(
                id,
                self.config.boot_timeout,
                Duration::from_millis(100),
                attempt,
                describe,
            )
            .await?;
        if let (Some(network), Some(link)) = (&spec.network, &guest_link) {
            // The tap exists once husk-vmm runs: join it to the pod's
            // interface before the guest configures its side.
            if let Err(e) = join_tap(id, &network.netns).await {
                if let Err(stop) = self.stop(id, started.pid, dir, Duration::ZERO).await {
                    warn!(sandbox = id, "{stop}");
                }
                return Err(e);
            }
            (started.interfaces, started.routes) = network::guest_interfaces(network, link);
        }
        Ok(started)
    }
}

/// Creates the VM's tap in the pod's namespace `netns`; the facts of the
/// pod's CNI interface, whose MAC the guest's interface takes over.
async fn make_tap(id: &str, netns: &Path) -> Result<LinkFacts, SandboxError> {
    link::create_tap(netns, VM_TAP).await.map_err(io_err(
        id,
        format!("creating {VM_TAP} in {}", netns.display()),
    ))?;
    let netns = netns.to_owned();
    blocking(id, format!("reading {POD_IFNAME}"), move || {
        link::link_facts(&netns, POD_IFNAME)
    })
    .await
}

/// Joins the VM's tap to the pod's CNI interface (tc redirects both ways).
async fn join_tap(id: &str, netns: &Path) -> Result<(), SandboxError> {
    let netns = netns.to_owned();
    blocking(id, format!("joining {VM_TAP} to {POD_IFNAME}"), move || {
        link::redirect_tap(&netns, POD_IFNAME, VM_TAP)
    })
    .await
}

impl SandboxDriver for MicroVmDriver {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn start<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Started, SandboxError>> {
        Box::pin(
            self.start_vm(spec)
                .instrument(info_span!("microvm_start", sandbox = %spec.id)),
        )
    }

    fn connect<'a>(
        &'a self,
        id: &'a str,
        agent_socket: &'a Path,
    ) -> BoxFuture<'a, Result<Agent, SandboxError>> {
        Box::pin(async move {
            let mut client =
                self.connect_agent(agent_socket)
                    .await
                    .map_err(|source| SandboxError::Connect {
                        id: id.to_owned(),
                        source,
                    })?;
            check_version(&mut client)
                .await
                .map_err(|e| SandboxError::NotReady {
                    id: id.to_owned(),
                    timeout: Duration::ZERO,
                    detail: format!("the guest's agent does not answer its version: {e}"),
                })?;
            Ok(client)
        })
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        pid: u32,
        dir: &'a Path,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), SandboxError>> {
        Box::pin(
            async move {
                let wait_gone = |wait: Duration| async move {
                    let deadline = Instant::now() + wait;
                    while is_our_process(pid, dir) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    !is_our_process(pid, dir)
                };
                // The agent's Shutdown resets the guest, and the VMM exits.
                // No grace: a failed sandbox, killed at once.
                if !wait_gone(grace).await {
                    let gone = !grace.is_zero() && {
                        warn!(pid, "husk-vmm still runs; asking its control API to stop");
                        let request = vmm_api::Request::Shutdown;
                        if let Err(e) = api_call(&dir.join(API_SOCKET), request, None).await {
                            warn!("control API shutdown: {e}");
                        }
                        wait_gone(Duration::from_secs(5)).await
                    };
                    if !gone {
                        warn!(pid, "husk-vmm still runs; SIGKILL");
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                        if !wait_gone(Duration::from_secs(5)).await {
                            return Err(SandboxError::Io {
                                id: id.to_owned(),
                                what: format!("husk-vmm (pid {pid}) survived SIGKILL"),
                                source: std::io::Error::other("process still running"),
                            });
                        }
                    }
                }
                // The sockets go with the VMM; logs stay until the pod is removed.
                for socket in [VSOCK_SOCKET, API_SOCKET] {
                    let _ = fs::remove_file(dir.join(socket));
                }
                let _ = fs::remove_file(dir.join(DISK_TABLE));
                info!(pid, "husk-vmm gone");
                // virtiofsd and the volumes' binds: kill_leftovers, which
                // every caller runs next.
                Ok(())
            }
            .instrument(info_span!("microvm_stop", sandbox = %id)),
        )
    }

    fn alive(&self, pid: u32, dir: &Path) -> bool {
        is_our_process(pid, dir)
    }

    /// The VM's processes end with it; its volumes' binds and its cgroup
    /// do not.
    fn kill_leftovers<'a>(
        &'a self,
        id: &'a str,
        dir: &'a Path,
    ) -> BoxFuture<'a, Result<(), SandboxError>> {
        Box::pin(async move {
            virtiofs::end_volumes(id, dir).await?;
            if let Ok(relative) = fs::read(dir.join(CGROUP_PATH)) {
                let relative = PathBuf::from(std::ffi::OsString::from_vec(relative));
                let killed = kill_cgroups(id, Path::new(CGROUP_ROOT), &relative).await?;
                if !killed.is_empty() {
                    warn!(
                        sandbox = id,
                        ?killed,
                        "killed what was left in the VM's cgroup"
                    );
                }
            }
            Ok(())
        })
    }

    /// husk-vmm's last word, which says how the guest or a device ended
    /// (or which system call its seccomp filter refused); else how it
    /// ended, if this huskd saw it end (a SIGKILL leaves no word).
    fn exit_detail<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let log = fs::read_to_string(dir.join(VMM_LOG)).unwrap_or_default();
            if let Some(said) = log
                .lines()
                .rev()
                .find(|line| line.starts_with("husk-vmm: "))
            {
                return Some(said.to_owned());
            }
            // Written by the reaper a moment after the exit the caller saw.
            let deadline = Instant::now() + EXIT_STATUS_WAIT;
            let status = loop {
                match fs::read_to_string(dir.join(VMM_EXIT)) {
                    Ok(status) => break status,
                    Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(_) => return None,
                }
            };
            Some(format!("husk-vmm ended: {status}"))
        })
    }

    /// Each host path is bound below the pod's `volumes/`, which virtiofsd
    /// serves: the guest sees it live at `<volumes_dir>/<container>/<n>`.
    fn share_mounts<'a>(
        &'a self,
        id: &'a str,
        dir: &'a Path,
        volumes_dir: &'a str,
        container: &'a str,
        mounts: &'a [k8s_cri::v1::Mount],
    ) -> BoxFuture<'a, Result<Vec<k8s_cri::v1::Mount>, SandboxError>> {
        Box::pin(async move { virtiofs::share_mounts(id, dir, volumes_dir, container, mounts) })
    }

    fn unshare_mounts<'a>(
        &'a self,
        id: &'a str,
        dir: &'a Path,
        container: &'a str,
    ) -> BoxFuture<'a, Result<(), SandboxError>> {
        Box::pin(async move { virtiofs::unshare_mounts(id, dir, container) })
    }

    fn runs_in_vm(&self) -> bool {
        true
    }

    // recursive_read_only_mounts: no. A microVM's volumes pass through
    // virtio-fs, where nothing yet makes or tests the submounts read-only.

    fn shares_host_fs(&self) -> bool {
        false
    }

    fn attach_image<'a>(
        &'a self,
        id: &'a str,
        dir: &'a Path,
        image: ImageFiles<'a>,
    ) -> BoxFuture<'a, Result<RootfsPlan, SandboxError>> {
        Box::pin(
            self.attach_disk_image(id, dir, image)
                .instrument(info_span!("microvm_attach_image", sandbox = %id)),
        )
    }

    fn release_image<'a>(
        &'a self,
        id: &'a str,
        dir: &'a Path,
        image_id: &'a str,
    ) -> BoxFuture<'a, Result<(), SandboxError>> {
        Box::pin(
            self.release_disk_image(id, dir, image_id)
                .instrument(info_span!("microvm_release_image", sandbox = %id)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver whose files are nowhere.
    pub(super) fn driver_without_files(spare_disks: usize) -> MicroVmDriver {
        MicroVmDriver::new(MicroVmConfig {
            vmm: "/nonexistent/husk-vmm".into(),
            virtiofsd: "/nonexistent/virtiofsd".into(),
            kernel: "/nonexistent/vmlinux".into(),
            initrd: "/nonexistent/initrd".into(),
            sizing: VmSizing::default(),
            cmdline: None,
            spare_disks,
            boot_timeout: Duration::from_secs(120),
            call_deadline: husk_proto::client::DEFAULT_CALL_DEADLINE,
            jail: None,
        })
    }

    #[test]
    fn a_missing_vmm_is_named() {
        let driver = driver_without_files(DEFAULT_SPARE_DISKS);
        let err = driver.check().expect_err("nothing exists");
        assert!(err.contains("husk-vmm not found"), "{err}");
    }
}
