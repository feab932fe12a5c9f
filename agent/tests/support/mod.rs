//! What the container tests share: the real agent on a unix socket, a
//! busybox rootfs, and an OCI spec like the one huskd (and containerd) write.

#![allow(dead_code)] // each test file uses its own part of this

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use husk_proto::client::{self, connect_unix};
use husk_proto::v1::{self, rootfs_source};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_stream::StreamExt;

pub const AGENT: &str = env!("CARGO_BIN_EXE_husk-agent");
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The agent as the host driver runs it, killed when dropped.
pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub client: client::Agent,
}

impl Agent {
    pub async fn start() -> Agent {
        require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let mut child = Command::new(AGENT)
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--log-level")
            .arg("info")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn husk-agent");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.expect("agent stdout") {
                if line == "husk-agent ready" {
                    return;
                }
            }
            panic!("husk-agent ended before it was ready");
        })
        .await
        .expect("agent ready in time");
        let client = connect_unix(&socket).await.expect("connect");
        Agent { child, dir, client }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Creates a container running `spec` on `rootfs`, with readers of its
    /// stdout and stderr started (as huskd starts them before Start).
    pub async fn create(
        &mut self,
        id: &str,
        spec: &Value,
        rootfs: rootfs_source::Source,
    ) -> Result<u32, tonic::Status> {
        self.client
            .create_container(v1::CreateContainerRequest {
                container_id: id.into(),
                oci_spec_json: serde_json::to_vec(spec).expect("spec json"),
                rootfs: Some(v1::RootfsSource {
                    source: Some(rootfs),
                    writable_layer_bytes: 64 << 20,
                }),
                stdin: false,
            })
            .await
            .map(|r| r.into_inner().pid)
    }

    /// Creates a container on the busybox rootfs and starts it.
    pub async fn create_running(&mut self, id: &str, spec: &Value) {
        self.create(id, spec, busybox_rootfs_source())
            .await
            .expect("create");
        self.client
            .start_container(v1::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .expect("start");
    }

    /// Starts an exec without waiting for it.
    pub async fn start_exec(
        &mut self,
        container: &str,
        exec: &str,
        process_json: &Value,
        stdin: bool,
    ) -> Result<u32, tonic::Status> {
        self.client
            .exec_process(v1::ExecProcessRequest {
                container_id: container.into(),
                exec_id: exec.into(),
                oci_process_json: serde_json::to_vec(process_json).expect("json"),
                stdin,
                timeout_ms: 0,
            })
            .await
            .map(|r| r.into_inner().pid)
    }

    /// Creates, starts and waits for a container; its stdout, stderr and exit.
    pub async fn run(&mut self, id: &str, spec: &Value) -> (String, String, v1::ExitStatus) {
        self.create(id, spec, busybox_rootfs_source())
            .await
            .expect("create");
        let stdout = self.collect(id, "", v1::OutputStream::Stdout).await;
        let stderr = self.collect(id, "", v1::OutputStream::Stderr).await;
        self.client
            .start_container(v1::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .expect("start");
        let status = self.wait(id, "").await;
        let out = (
            stdout.await.expect("stdout"),
            stderr.await.expect("stderr"),
            status,
        );
        self.remove(id).await;
        out
    }

    /// The process's `stream`, from the start (ReadOutput).
    pub async fn output(
        &mut self,
        container: &str,
        exec: &str,
        stream: v1::OutputStream,
    ) -> tonic::Streaming<v1::OutputChunk> {
        self.client
            .read_output(v1::ReadOutputRequest {
                process: Some(process(container, exec)),
                stream: stream.into(),
            })
            .await
            .expect("read_output")
            .into_inner()
    }

    /// Reads a stream to its end in the background.
    pub async fn collect(
        &mut self,
        container: &str,
        exec: &str,
        stream: v1::OutputStream,
    ) -> tokio::task::JoinHandle<String> {
        let mut chunks = self.output(container, exec, stream).await;
        tokio::spawn(async move {
            let mut data = Vec::new();
            while let Some(chunk) = chunks.next().await {
                data.extend(chunk.expect("chunk").data);
            }
            String::from_utf8_lossy(&data).into_owned()
        })
    }

    pub async fn wait(&mut self, container: &str, exec: &str) -> v1::ExitStatus {
        let wait = self.client.wait_process(v1::WaitProcessRequest {
            process: Some(process(container, exec)),
        });
        tokio::time::timeout(PATIENCE, wait)
            .await
            .expect("exit in time")
            .expect("wait")
            .into_inner()
            .status
            .expect("status")
    }

    pub async fn remove(&mut self, id: &str) {
        self.client
            .remove_container(v1::RemoveContainerRequest {
                container_id: id.into(),
                force: true,
            })
            .await
            .expect("remove");
    }

    /// Runs an exec to its end: stdout, stderr, exit.
    pub async fn exec(
        &mut self,
        container: &str,
        exec: &str,
        process_json: Value,
        timeout_ms: u32,
    ) -> Result<(String, String, v1::ExitStatus), tonic::Status> {
        let tty = process_json["terminal"].as_bool() == Some(true);
        self.client
            .exec_process(v1::ExecProcessRequest {
                container_id: container.into(),
                exec_id: exec.into(),
                oci_process_json: serde_json::to_vec(&process_json).expect("json"),
                stdin: false,
                timeout_ms,
            })
            .await?;
        let stdout = self
            .collect(container, exec, v1::OutputStream::Stdout)
            .await;
        let stderr = if tty {
            None
        } else {
            Some(
                self.collect(container, exec, v1::OutputStream::Stderr)
                    .await,
            )
        };
        let status = self.wait(container, exec).await;
        let stderr = match stderr {
            Some(task) => task.await.expect("stderr"),
            None => String::new(),
        };
        Ok((stdout.await.expect("stdout"), stderr, status))
    }
}

/// A test that fails part way must not leave containers, mounts or cgroups
/// behind: SIGTERM makes the agent remove them all before it exits (a
/// SIGKILLed agent would leave its containers running).
impl Drop for Agent {
    fn drop(&mut self) {
        let Some(pid) = self.child.id() else { return };
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
            return;
        }
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::time::Instant::now() < deadline {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                // Gone, or a zombie: its clean-up is done.
                Err(_) => return,
                Ok(stat)
                    if stat
                        .rsplit(')')
                        .next()
                        .is_some_and(|rest| rest.trim_start().starts_with('Z')) =>
                {
                    return
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

pub fn process(container: &str, exec: &str) -> v1::ProcessRef {
    v1::ProcessRef {
        container_id: container.into(),
        exec_id: exec.into(),
    }
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create namespaces, mounts and cgroups: run them as root"
    );
}

/// A rootfs of Debian's static busybox, made once per test binary.
pub fn busybox_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<tempfile::TempDir> = OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            husk_e2e::rootfs::busybox_rootfs(dir.path()).unwrap_or_else(|e| panic!("{e}"));
            dir
        })
        .path()
}

pub fn busybox_rootfs_source() -> rootfs_source::Source {
    rootfs_source::Source::Directory(busybox_rootfs().display().to_string())
}

/// A containerd-like spec running `args`, in a UTS namespace named husk-test.
pub fn spec(args: &[&str]) -> Value {
    husk_e2e::oci::spec(args, Some("husk-test"))
}
