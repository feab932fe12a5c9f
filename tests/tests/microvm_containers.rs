//! The container lifecycle once inside a real microVM: a busybox image packed
//! as EROFS is given to husk-vmm as the guest's read-only /dev/vda, and the
//! agent (PID 1 in the guest) is driven over vsock with the generated client
//! exactly as huskd drives it: SetupSandbox, then a container run to its exit
//! with both output streams, then a long-running container with a memory
//! limit that is exec'd into (with and without a tty), measured, killed and
//! removed, and finally Shutdown ends the VM. One boot for all of it (a PVM
//! boot costs ~30 s of emulated kernel work). Nothing is faked; a guest that
//! does not boot or a step the agent refuses fails the test with the agent's
//! status and the guest console's tail.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

use husk_e2e::microvm::{boot_timeout, MicroVm, MicroVmOptions};
use husk_e2e::oci::spec;
use husk_e2e::rootfs::{add_xstate_probe, busybox_rootfs, erofs_image, XSTATE_PROBE};
use husk_proto::v1::agent_client::AgentClient;
use husk_proto::v1::{self, rootfs_source};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// How long one RPC (or one process) may take inside the guest. Generous:
/// on PVM every syscall a container's setup makes is emulated kernel work.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// The pod's sandbox id; containers' cgroups go below husk/<id>.
const SANDBOX_ID: &str = "pod";
const POD_HOSTNAME: &str = "husk-pod";
/// The EROFS image is the first (and only) disk: the guest's /dev/vda.
const IMAGE_DEVICE: &str = "/dev/vda";
const MEMORY_LIMIT: u64 = 64 << 20;

/// The booted guest, for failure messages that carry its console.
struct Guest {
    vm: MicroVm,
}

impl Guest {
    fn fail(&self, step: &str, why: impl Display) -> ! {
        panic!("{step}: {why}\n{}", self.vm.diagnostics())
    }

    fn status_text(status: &tonic::Status) -> String {
        format!(
            "the agent answered {:?}: {}",
            status.code(),
            status.message()
        )
    }

    /// Awaits one RPC; fails with the agent's status and the console.
    async fn rpc<T>(
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
    async fn read_output(
        &self,
        agent: &mut AgentClient<Channel>,
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
    async fn output(
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

    async fn wait(
        &self,
        agent: &mut AgentClient<Channel>,
        container: &str,
        exec: &str,
    ) -> v1::ExitStatus {
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

    async fn create(&self, agent: &mut AgentClient<Channel>, id: &str, spec: &Value) -> u32 {
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

    async fn start(&self, agent: &mut AgentClient<Channel>, id: &str) {
        self.rpc(
            &format!("StartContainer {id}"),
            agent.start_container(v1::StartContainerRequest {
                container_id: id.into(),
            }),
        )
        .await;
    }

    async fn remove(&self, agent: &mut AgentClient<Channel>, id: &str) {
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
    async fn exec(
        &self,
        agent: &mut AgentClient<Channel>,
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

    fn check_eq<T: PartialEq + std::fmt::Debug>(&self, step: &str, what: &str, got: T, want: T) {
        if got != want {
            self.fail(step, format!("{what}: got {got:?}, expected {want:?}"));
        }
    }

    fn check(&self, step: &str, ok: bool, why: impl Display) {
        if !ok {
            self.fail(step, why);
        }
    }
}

fn process(container: &str, exec: &str) -> v1::ProcessRef {
    v1::ProcessRef {
        container_id: container.into(),
        exec_id: exec.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_lifecycle_inside_a_microvm() {
    let began = Instant::now();

    // The image: busybox packed as EROFS, given as the guest's read-only /dev/vda.
    let dir = tempfile::tempdir().expect("temp dir");
    let tree = dir.path().join("rootfs");
    std::fs::create_dir(&tree).expect("mkdir rootfs");
    busybox_rootfs(&tree).unwrap_or_else(|e| panic!("{e}"));
    add_xstate_probe(&tree).unwrap_or_else(|e| panic!("{e}"));
    let image = dir.path().join("busybox.erofs");
    erofs_image(&tree, &image).unwrap_or_else(|e| panic!("{e}"));

    let mut vm = MicroVm::start(MicroVmOptions {
        extra_args: vec!["--disk".into(), format!("{}:ro", image.display())],
        ..MicroVmOptions::default()
    });
    let (mut agent, timings) = match vm.wait_for_agent(boot_timeout()).await {
        Ok(ok) => ok,
        Err(why) => panic!("the microVM did not boot to its agent: {why}"),
    };
    eprintln!(
        "microVM booted ({} profile), agent answered after {:?}",
        match vm.pvm_profile() {
            Some(true) => "PVM",
            Some(false) => "hardware-KVM",
            None => "unknown",
        },
        timings.agent_answered
    );
    let guest = Guest { vm };
    let agent = &mut agent;

    // 1. The pod: its hostname is the guest's (the agent owns its namespaces).
    let step = "SetupSandbox";
    let setup = guest
        .rpc(
            step,
            agent.setup_sandbox(v1::SetupSandboxRequest {
                sandbox_id: SANDBOX_ID.into(),
                hostname: POD_HOSTNAME.into(),
                ..Default::default()
            }),
        )
        .await;
    guest.check(
        step,
        !setup.shared_dir.is_empty(),
        "SetupSandbox names no shared directory",
    );

    // 2. A container run to its exit: both streams read from the start, the
    // pod's hostname (no UTS namespace of its own), its v2 cgroup below the pod's.
    let phase = Instant::now();
    let c1 = "c1";
    let script =
        "echo out; echo err >&2; echo pid=$$ host=$(hostname); cat /proc/self/cgroup; exit 3";
    let pid = guest
        .create(agent, c1, &spec(&["sh", "-c", script], None))
        .await;
    guest.check("CreateContainer c1", pid > 0, format!("pid {pid}"));
    let stdout = guest
        .read_output(agent, c1, "", v1::OutputStream::Stdout)
        .await;
    let stderr = guest
        .read_output(agent, c1, "", v1::OutputStream::Stderr)
        .await;
    guest.start(agent, c1).await;
    let exit = guest.wait(agent, c1, "").await;
    let stdout = guest.output("c1 stdout", stdout).await;
    let stderr = guest.output("c1 stderr", stderr).await;
    let step = "c1 ran to its exit";
    guest.check_eq(
        step,
        "stdout",
        stdout.as_str(),
        &format!("out\npid=1 host={POD_HOSTNAME}\n0::/husk/{SANDBOX_ID}/{c1}\n"),
    );
    guest.check_eq(step, "stderr", stderr.as_str(), "err\n");
    guest.check_eq(
        step,
        "exit (code, signal, reason)",
        (exit.exit_code, exit.signal, exit.reason.as_str()),
        (3, 0, "Error"),
    );
    guest.check(
        step,
        exit.started_at_ns > 0 && exit.finished_at_ns >= exit.started_at_ns,
        format!("bad times in {exit:?}"),
    );
    guest.remove(agent, c1).await;
    eprintln!("c1: created, ran and removed in {:?}", phase.elapsed());

    // 3. A long-running container with a memory limit and a UTS namespace of
    // its own: execs with and without a tty, its cgroup v2 stats, SIGKILL.
    let phase = Instant::now();
    let c2 = "c2";
    let mut c2_spec = spec(&["sleep", "600"], Some("c2-host"));
    c2_spec["linux"]["resources"] = json!({"memory": {"limit": MEMORY_LIMIT}});
    guest.create(agent, c2, &c2_spec).await;
    guest.start(agent, c2).await;

    let (out, err, exit) = guest
        .exec(
            agent,
            c2,
            "plain",
            json!({"args": ["sh", "-c", "echo exec-ok; id -u"]}),
        )
        .await;
    let step = "exec c2/plain";
    guest.check_eq(
        step,
        "(stdout, stderr, exit code)",
        (out.as_str(), err.as_str(), exit.exit_code),
        ("exec-ok\n0\n", "", 0),
    );

    let (out, _, exit) = guest
        .exec(agent, c2, "tty", json!({"args": ["tty"], "terminal": true}))
        .await;
    let step = "exec c2/tty";
    guest.check(
        step,
        out.starts_with("/dev/pts/"),
        format!("a tty exec prints no /dev/pts/ path: {out:?}"),
    );
    guest.check_eq(step, "exit code", exit.exit_code, 0);

    // The exec runs in c2's UTS namespace and cgroup, where the limit is set
    // (the cgroup2 mount shows the guest's whole hierarchy: no cgroup namespace).
    let (out, err, exit) = guest
        .exec(
            agent,
            c2,
            "limits",
            json!({"args": ["sh", "-c", "hostname; cat /proc/self/cgroup; cat /sys/fs/cgroup/husk/pod/c2/memory.max"]}),
        )
        .await;
    guest.check_eq(
        "exec c2/limits",
        "(stdout, stderr, exit code)",
        (out.as_str(), err.as_str(), exit.exit_code),
        (
            format!("c2-host\n0::/husk/{SANDBOX_ID}/{c2}\n{MEMORY_LIMIT}\n").as_str(),
            "",
            0,
        ),
    );

    // Two processes keep patterns in their AVX registers across task
    // switches: on PVM the guest's user mode runs natively with the host's
    // AVX, and its kernel keeps that state only through husk-vmm.
    let (out, err, exit) = guest
        .exec(agent, c2, "xstate", json!({"args": [XSTATE_PROBE, "200"]}))
        .await;
    eprintln!("xstate probe: {}", out.trim());
    guest.check_eq(
        "exec c2/xstate",
        "(stderr, exit code)",
        (err.as_str(), exit.exit_code),
        ("", 0),
    );
    guest.check(
        "exec c2/xstate",
        out.contains("torn=0"),
        format!("task switches changed a task's vector registers: {out:?}"),
    );

    let step = "Stats c2";
    let stats = guest
        .rpc(
            step,
            agent.stats(v1::StatsRequest {
                container_ids: vec![c2.into()],
            }),
        )
        .await;
    let [c2_stats] = stats.stats.as_slice() else {
        guest.fail(step, format!("expected one entry: {stats:?}"))
    };
    guest.check(
        step,
        c2_stats.container_id == c2 && c2_stats.memory_usage_bytes > 0 && c2_stats.pids >= 1,
        format!("expected memory in use and a pid: {c2_stats:?}"),
    );
    eprintln!("c2 stats: {c2_stats:?}");

    guest
        .rpc(
            "SignalProcess c2 SIGKILL",
            agent.signal_process(v1::SignalProcessRequest {
                process: Some(process(c2, "")),
                signal: 9,
            }),
        )
        .await;
    let exit = guest.wait(agent, c2, "").await;
    guest.check_eq(
        "c2 killed",
        "(exit code, signal)",
        (exit.exit_code, exit.signal),
        (137, 9),
    );
    guest.remove(agent, c2).await;
    eprintln!(
        "c2: created, exec'd into, measured, killed and removed in {:?}",
        phase.elapsed()
    );

    // 4. Shutdown ends the VM, and husk-vmm with 0.
    guest
        .rpc("Shutdown", agent.shutdown(v1::ShutdownRequest {}))
        .await;
    let mut vm = guest.vm;
    let status = vm
        .wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.code(),
        Some(0),
        "a guest shut down by its agent exits husk-vmm with 0\n{}",
        vm.diagnostics()
    );
    // Guest-side trouble that did not fail a step is still worth seeing.
    let console = vm.console_text();
    let warnings: Vec<&str> = console
        .lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .collect();
    if !warnings.is_empty() {
        eprintln!("guest console warnings:\n{}", warnings.join("\n"));
    }
    eprintln!("whole test: {:?}", began.elapsed());
}
