//! Driving a booted guest's agent as huskd does, for end-to-end tests: each
//! RPC bounded in time, and every failure a panic that carries the agent's
//! status and the guest console's tail.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

use husk_proto::client::Agent;
use husk_proto::v1::{self, rootfs_source};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::microvm::{boot_timeout, MicroVm, MicroVmOptions};

/// How long one RPC (or one process) may take inside the guest. Generous:
/// on PVM every syscall a container's setup makes is emulated kernel work.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// The image is the guest's first disk, given with `--disk IMAGE:ro`.
pub const IMAGE_DEVICE: &str = "/dev/vda";

/// The booted guest, for failure messages that carry its console.
pub struct Guest {
    pub vm: MicroVm,
}

impl Guest {
    /// Starts husk-vmm with `options` and waits for its agent; a guest that
    /// does not boot fails the test.
    pub async fn boot(options: MicroVmOptions) -> (Guest, Agent) {
        let mut vm = MicroVm::start(options);
        let (agent, timings) = match vm.wait_for_agent(boot_timeout()).await {
            Ok(ok) => ok,
            Err(why) => panic!("the microVM did not boot to its agent: {why}"),
        };
        eprintln!(
            "microVM booted on {}, agent answered after {:?}",
            vm.kvm_kind(),
            timings.agent_answered
        );
        (Guest { vm }, agent)
    }

    /// Asks the agent to shut the guest down; husk-vmm must exit with 0.
    /// The stopped VM, for a look at its logs.
    pub async fn shut_down(self, agent: &mut Agent) -> MicroVm {
        self.rpc("Shutdown", agent.shutdown(v1::ShutdownRequest {}))
            .await;
        let mut vm = self.vm;
        vm.expect_clean_exit();
        vm
    }

    pub fn fail(&self, step: &str, why: impl Display) -> ! {
        panic!("{step}: {why}\n{}", self.vm.diagnostics())
    }

    pub fn status_text(status: &tonic::Status) -> String {
        format!(
            "the agent answered {:?}: {}",
            status.code(),
            status.message()
        )
    }

    /// Awaits one RPC; fails with the agent's status and the console.
    pub async fn rpc<T>(
        &self,
        step: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> T {
        let began = Instant::now();
        let answer = tokio::time::timeout(STEP_TIMEOUT, call).await;
        // Where the time goes inside the guest (PVM emulates its kernel mode).
        eprintln!("  {step}: {:.1?}", began.elapsed());
        match answer {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => self.fail(step, Self::status_text(&status)),
            Err(_) => self.fail(step, format!("no answer within {STEP_TIMEOUT:?}")),
        }
    }

    /// Starts reading a process's stream to its end in the background.
    pub async fn read_output(
        &self,
        agent: &mut Agent,
        container: &str,
        exec: &str,
        stream: v1::OutputStream,
    ) -> JoinHandle<Result<String, tonic::Status>> {
        let step = format!("ReadOutput {stream:?} of {container}/{exec}");
        let mut chunks = self
            .rpc(
                &step,
                agent.read_output(v1::ReadOutputRequest {
                    process: Some(process(container, exec)),
                    stream: stream.into(),
                }),
            )
            .await;
        tokio::spawn(async move {
            let mut data = Vec::new();
            while let Some(chunk) = chunks.message().await? {
                data.extend(chunk.data);
            }
            Ok(String::from_utf8_lossy(&data).into_owned())
        })
    }

    /// What a background reader collected.
    pub async fn output(
        &self,
        step: &str,
        reader: JoinHandle<Result<String, tonic::Status>>,
    ) -> String {
        match tokio::time::timeout(STEP_TIMEOUT, reader).await {
            Ok(Ok(Ok(text))) => text,
            Ok(Ok(Err(status))) => self.fail(step, Self::status_text(&status)),
            Ok(Err(join)) => self.fail(step, format!("the reader failed: {join}")),
            Err(_) => self.fail(
                step,
                format!("the stream did not end within {STEP_TIMEOUT:?}"),
            ),
        }
    }

    pub async fn wait(&self, agent: &mut Agent, container: &str, exec: &str) -> v1::ExitStatus {
        let step = format!("WaitProcess {container}/{exec}");
        let response = self
            .rpc(
                &step,
                agent.wait_process(v1::WaitProcessRequest {
                    process: Some(process(container, exec)),
                }),
            )
            .await;
        response
            .status
            .unwrap_or_else(|| self.fail(&step, "the answer carries no exit status"))
    }

    pub async fn create(&self, agent: &mut Agent, id: &str, spec: &Value) -> u32 {
        let response = self
            .rpc(
                &format!("CreateContainer {id} on {IMAGE_DEVICE}"),
                agent.create_container(v1::CreateContainerRequest {
                    container_id: id.into(),
                    oci_spec_json: serde_json::to_vec(spec).expect("spec json"),
                    rootfs: Some(v1::RootfsSource {
                        source: Some(rootfs_source::Source::BlockDevice(IMAGE_DEVICE.into())),
                        writable_layer_bytes: 64 << 20,
                    }),
                    stdin: false,
                }),
            )
            .await;
        response.pid
    }

    pub async fn start(&self, agent: &mut Agent, id: &str) {
        self.rpc(
            &format!("StartContainer {id}"),
            agent.start_container(v1::StartContainerRequest {
                container_id: id.into(),
            }),
        )
        .await;
    }

    pub async fn remove(&self, agent: &mut Agent, id: &str) {
        self.rpc(
            &format!("RemoveContainer {id}"),
            agent.remove_container(v1::RemoveContainerRequest {
                container_id: id.into(),
                force: false,
            }),
        )
        .await;
    }

    /// Runs an exec to its end: stdout, stderr (empty for a tty), exit.
    pub async fn exec(
        &self,
        agent: &mut Agent,
        container: &str,
        exec: &str,
        process_json: Value,
    ) -> (String, String, v1::ExitStatus) {
        let tty = process_json["terminal"].as_bool() == Some(true);
        let step = format!("ExecProcess {container}/{exec}");
        self.rpc(
            &step,
            agent.exec_process(v1::ExecProcessRequest {
                container_id: container.into(),
                exec_id: exec.into(),
                oci_process_json: serde_json::to_vec(&process_json).expect("json"),
                stdin: false,
                timeout_ms: 0,
            }),
        )
        .await;
        let stdout = self
            .read_output(agent, container, exec, v1::OutputStream::Stdout)
            .await;
        let stderr = if tty {
            None
        } else {
            Some(
                self.read_output(agent, container, exec, v1::OutputStream::Stderr)
                    .await,
            )
        };
        let status = self.wait(agent, container, exec).await;
        let stdout = self.output(&format!("{step}: stdout"), stdout).await;
        let stderr = match stderr {
            Some(reader) => self.output(&format!("{step}: stderr"), reader).await,
            None => String::new(),
        };
        (stdout, stderr, status)
    }

    pub fn check_eq<T: PartialEq + std::fmt::Debug>(
        &self,
        step: &str,
        what: &str,
        got: T,
        want: T,
    ) {
        if got != want {
            self.fail(step, format!("{what}: got {got:?}, expected {want:?}"));
        }
    }

    pub fn check(&self, step: &str, ok: bool, why: impl Display) {
        if !ok {
            self.fail(step, why);
        }
    }
}

pub fn process(container: &str, exec: &str) -> v1::ProcessRef {
    v1::ProcessRef {
        container_id: container.into(),
        exec_id: exec.into(),
    }
}
