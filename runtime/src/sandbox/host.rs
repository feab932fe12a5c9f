//! The `host` driver: husk-agent as a plain process on the host, in fresh
//! mount, UTS and IPC namespaces and the pod's network namespace (or the
//! host's network for hostNetwork pods),
//! serving on `<dir>/agent.sock` with its state in `<dir>/agent`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_proto::client::{connect, Agent, AgentAddr, ConnectError, DEFAULT_CONNECT_TIMEOUT};
use husk_proto::v1::PingRequest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::warn;

use super::cgroups::{host_pod_cgroup, kill_cgroups, CGROUP_ROOT};
use super::startup::{Attempt, Spawned};
use super::{
    io_err, log_output, BoxFuture, SandboxDriver, SandboxError, SandboxSpec, Started,
    AGENT_READY_TIMEOUT,
};

pub struct HostDriver {
    agent: PathBuf,
    /// Each call into an agent: [`husk_proto::client::CallDeadline`].
    call_deadline: Duration,
}

impl HostDriver {
    pub fn new(agent: PathBuf, call_deadline: Duration) -> HostDriver {
        HostDriver {
            agent,
            call_deadline,
        }
    }

    async fn connect_agent(&self, socket: &Path) -> Result<Agent, ConnectError> {
        let addr = AgentAddr::Unix(socket.to_owned());
        connect(&addr, DEFAULT_CONNECT_TIMEOUT, self.call_deadline).await
    }
}

/// The last lines of the agent's log, for error messages.
fn log_tail(dir: &Path) -> String {
    let text = fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

fn is_our_agent(pid: u32, dir: &Path) -> bool {
    super::is_our_process(pid, dir)
}

impl HostDriver {
    /// The runtime handler, and what pod records name the driver by.
    pub const NAME: &'static str = "host";
}

impl SandboxDriver for HostDriver {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    /// The agent's mount_setattr (Linux 5.12) makes the submounts read-only.
    fn recursive_read_only_mounts(&self) -> bool {
        true
    }

    fn start<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Started, SandboxError>> {
        Box::pin(async move {
            let id = spec.id.as_str();
            if !self.agent.is_file() {
                return Err(SandboxError::Unavailable {
                    id: id.to_owned(),
                    driver: Self::NAME.into(),
                    detail: format!(
                        "husk-agent not found at {} (set husk_agent in the config or --husk-agent)",
                        self.agent.display()
                    ),
                });
            }
            let agent_dir = spec.dir.join("agent");
            fs::create_dir_all(&agent_dir)
                .map_err(io_err(id, format!("creating {}", agent_dir.display())))?;
            let socket = spec.dir.join("agent.sock");
            let _ = fs::remove_file(&socket);
            let mut command = tokio::process::Command::new(&self.agent);
            command
                .arg("--listen")
                .arg(format!("unix://{}", socket.display()))
                .arg("--state-dir")
                .arg(&agent_dir)
                .stdin(Stdio::null())
                .process_group(0);
            log_output(&mut command, id, &spec.dir.join("agent.log"))?;
            // SAFETY: the closure runs in the forked child before exec and only
            // makes raw syscalls (unshare, mount) with static arguments: no
            // allocation, no locks.
            unsafe {
                command.pre_exec(|| {
                    if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC)
                        != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The host's later mounts (kubelet's volumes) reach the
                    // agent; the agent's (container rootfs) never reach the host.
                    if libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_SLAVE,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            spec.join_netns(&mut command)?;
            let child = command
                .spawn()
                .map_err(io_err(id, format!("starting {}", self.agent.display())))?;
            let spawned = Spawned::reap(child, id, "husk-agent", None);
            let pid = spawned.pid;
            let attempt = || {
                let socket = socket.clone();
                async move {
                    if !socket.exists() {
                        return Attempt::NotYet("its socket is not there yet".into());
                    }
                    match self.connect_agent(&socket).await {
                        Ok(mut client) => match client.ping(PingRequest {}).await {
                            Ok(_) => Attempt::Answered(Box::new(Started {
                                agent_socket: socket,
                                pid,
                                client,
                                vm_size: None,
                                volumes_tag: None,
                                interfaces: Vec::new(),
                                routes: Vec::new(),
                            })),
                            Err(status) => Attempt::NotYet(format!("Ping: {}", status.message())),
                        },
                        Err(e) => Attempt::NotYet(e.to_string()),
                    }
                }
            };
            let describe = |why: String| format!("husk-agent: {why}; log: {}", log_tail(&spec.dir));
            spawned
                .wait_for_agent(
                    id,
                    AGENT_READY_TIMEOUT,
                    Duration::from_millis(10),
                    attempt,
                    describe,
                )
                .await
        })
    }

    fn connect<'a>(
        &'a self,
        id: &'a str,
        agent_socket: &'a Path,
    ) -> BoxFuture<'a, Result<Agent, SandboxError>> {
        Box::pin(async move {
            self.connect_agent(agent_socket)
                .await
                .map_err(|source| SandboxError::Connect {
                    id: id.to_owned(),
                    source,
                })
        })
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        pid: u32,
        dir: &'a Path,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), SandboxError>> {
        Box::pin(async move {
            // No grace: a failed sandbox, killed at once.
            let term = (!grace.is_zero()).then_some(Duration::from_secs(10));
            for (signal, wait) in [
                (None, grace),
                (term.map(|_| Signal::SIGTERM), term.unwrap_or_default()),
                (Some(Signal::SIGKILL), Duration::from_secs(5)),
            ] {
                if !is_our_agent(pid, dir) {
                    return Ok(());
                }
                if let Some(signal) = signal {
                    warn!(sandbox = id, pid, %signal, "husk-agent still runs; signalling it");
                    let _ = kill(Pid::from_raw(pid as i32), signal);
                }
                let deadline = Instant::now() + wait;
                while is_our_agent(pid, dir) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            if is_our_agent(pid, dir) {
                return Err(SandboxError::Io {
                    id: id.to_owned(),
                    what: format!("husk-agent (pid {pid}) survived SIGKILL"),
                    source: std::io::Error::other("process still running"),
                });
            }
            Ok(())
        })
    }

    fn alive(&self, pid: u32, dir: &Path) -> bool {
        is_our_agent(pid, dir)
    }

    /// The containers are host processes: a dead agent leaves them running.
    fn kill_leftovers<'a>(
        &'a self,
        id: &'a str,
        _dir: &'a Path,
    ) -> BoxFuture<'a, Result<(), SandboxError>> {
        Box::pin(async move {
            let killed = kill_cgroups(id, Path::new(CGROUP_ROOT), &host_pod_cgroup(id)).await?;
            if !killed.is_empty() {
                warn!(sandbox = id, ?killed, "killed the processes the agent left");
            }
            Ok(())
        })
    }
}
