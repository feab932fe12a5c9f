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

use std::time::Instant;

use husk_e2e::guest::{process, Guest};
use husk_e2e::microvm::MicroVmOptions;
use husk_e2e::oci::spec;
use husk_e2e::rootfs::{add_xstate_probe, busybox_rootfs, erofs_image, XSTATE_PROBE};
use husk_proto::v1;
use serde_json::json;

/// The pod's sandbox id; containers' cgroups go below husk/<id>.
const SANDBOX_ID: &str = "pod";
const POD_HOSTNAME: &str = "husk-pod";
const MEMORY_LIMIT: u64 = 64 << 20;

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

    let (guest, mut agent) = Guest::boot(MicroVmOptions {
        extra_args: vec!["--disk".into(), format!("{}:ro", image.display())],
        ..MicroVmOptions::default()
    })
    .await;
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
    let vm = guest.shut_down(agent).await;
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
