//! Several vCPUs.
//!
//! On standard KVM (hardware, or the TCG bed of `scripts/test-stdkvm.sh`):
//! a soak of HUSK_SOAK_BOOTS boots (default 10: what every CI run affords;
//! `HUSK_SOAK_BOOTS=100` for the long one, docs/measurements.md) of husk's guest with
//! `--vcpus 4`, each to the agent over vsock, each checked from inside the
//! guest (a container runs `nproc` and reads /proc/cpuinfo), each shut down
//! cleanly. Every boot must pass: a triple fault fails the test with
//! husk-vmm's report and the console.
//!
//! On PVM the soak cannot run (secondary vCPUs start through a trampoline PVM
//! cannot run): it is `#[ignore]`d, so `cargo test` lists it as ignored, and
//! fails if asked for there. The refusal under the PVM profile is checked on
//! every host.

use std::process::Command;
use std::time::{Duration, Instant};

use husk_e2e::guest::Guest;
use husk_e2e::microvm::{KvmKind, MicroVmOptions};
use husk_e2e::oci::spec;
use husk_e2e::rootfs::busybox_erofs;
use husk_proto::v1;

const SOAK_VCPUS: u8 = 4;

fn soak_boots() -> usize {
    husk_e2e::env_number("HUSK_SOAK_BOOTS", 10)
}

#[test]
fn several_vcpus_are_refused_under_the_pvm_profile() {
    let (kernel, initrd) = husk_e2e::guest_image();
    let out = Command::new(husk_e2e::workspace_binary("husk-vmm"))
        .args(["run", "--pvm", "on", "--vcpus", "2", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .output()
        .expect("run husk-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("--vcpus 2") && stderr.contains("PVM host"),
        "the refusal must name the flag and why: {stderr}"
    );
}

// Ignored unless asked for, so that `cargo test` on a PVM host says plainly
// that it did not run; the bed runs ignored tests too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs standard KVM: scripts/test-stdkvm.sh runs it (or --include-ignored)"]
async fn four_vcpus_boot_every_time_on_standard_kvm() {
    assert_eq!(
        KvmKind::expected(),
        KvmKind::Standard,
        "the {SOAK_VCPUS}-vCPU soak needs standard KVM: on PVM guests are single-vCPU \
         (scripts/test-stdkvm.sh runs it on standard KVM)"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let image = busybox_erofs(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let boots = soak_boots();
    let mut agent_ready = Vec::with_capacity(boots);
    let began = Instant::now();
    for boot in 1..=boots {
        eprintln!("boot {boot}/{boots} with {SOAK_VCPUS} vCPUs");
        let (guest, mut agent) = Guest::boot(MicroVmOptions {
            extra_args: vec![
                "--vcpus".into(),
                SOAK_VCPUS.to_string(),
                "--disk".into(),
                format!("{}:ro", image.display()),
            ],
            ..MicroVmOptions::default()
        })
        .await;
        let booted = guest.vm.spawned.elapsed();
        let agent = &mut agent;
        guest
            .rpc(
                "SetupSandbox",
                agent.setup_sandbox(v1::SetupSandboxRequest {
                    sandbox_id: "soak".into(),
                    hostname: "soak".into(),
                    ..Default::default()
                }),
            )
            .await;
        let script = "nproc; grep -c ^processor /proc/cpuinfo";
        guest
            .create(agent, "cpus", &spec(&["sh", "-c", script], None))
            .await;
        let stdout = guest
            .read_output(agent, "cpus", "", v1::OutputStream::Stdout)
            .await;
        guest.start(agent, "cpus").await;
        let exit = guest.wait(agent, "cpus", "").await;
        let stdout = guest.output("cpus stdout", stdout).await;
        let want = format!("{SOAK_VCPUS}\n{SOAK_VCPUS}\n");
        guest.check_eq(
            &format!("boot {boot}: the guest's CPUs (nproc, /proc/cpuinfo)"),
            "(stdout, exit code)",
            (stdout.as_str(), exit.exit_code),
            (want.as_str(), 0),
        );
        let stopping = Instant::now();
        guest.shut_down(agent).await;
        eprintln!("  husk-vmm exited {:?} after Shutdown", stopping.elapsed());
        agent_ready.push(booted);
    }
    agent_ready.sort();
    let median = agent_ready[agent_ready.len() / 2];
    let max = agent_ready.last().copied().unwrap_or(Duration::ZERO);
    eprintln!(
        "soak on {}: {boots} of {boots} boots with {SOAK_VCPUS} vCPUs reached the agent and saw \
         {SOAK_VCPUS} CPUs (agent ready: median {median:?}, max {max:?}; {:?} in all)",
        KvmKind::Standard,
        began.elapsed()
    );
}
