//! The microVM boot path end to end: husk's own guest kernel and initramfs
//! boot under husk-vmm on /dev/kvm, and husk-agent (PID 1 in the guest)
//! answers over vsock through the VMM's hybrid vsock socket, as huskd reaches
//! it. No part is faked. A guest that does not boot fails this test.
//!
//! On PVM hosts the guest kernel's ring 0 is emulated and a boot takes a
//! minute or more; HUSK_BOOT_TIMEOUT_SECS raises the limit (default 600).

use husk_e2e::microvm::{
    boot_timeout, MicroVm, MicroVmOptions, AGENT_INIT_MARKER, AGENT_READY_MARKER,
};
use husk_proto::v1::{ShutdownRequest, VersionRequest};
use husk_proto::PROTOCOL_VERSION;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_and_agent_answers_over_vsock_then_shuts_down() {
    let mut vm = MicroVm::start(MicroVmOptions::default());
    let (mut agent, timings) = match vm.wait_for_agent(boot_timeout()).await {
        Ok(ok) => ok,
        Err(why) => panic!("the microVM did not boot to its agent: {why}"),
    };
    // Say plainly what was exercised: PVM (emulated guest kernel) or standard KVM.
    eprintln!(
        "microVM booted on {}: guest entered {:?}, init {:?}, agent answered {:?}",
        vm.kvm_kind(),
        timings.guest_entered,
        timings.init_reached,
        timings.agent_answered
    );

    let version = agent
        .version(VersionRequest {})
        .await
        .expect("Version over vsock")
        .into_inner();
    assert_eq!(version.protocol_version, PROTOCOL_VERSION);
    assert!(!version.agent_version.is_empty());

    let console = vm.console_text();
    assert!(console.contains(AGENT_INIT_MARKER), "console:\n{console}");
    assert!(console.contains(AGENT_READY_MARKER), "console:\n{console}");

    agent
        .shutdown(ShutdownRequest {})
        .await
        .expect("Shutdown over vsock");
    vm.expect_clean_exit();
    assert!(!vm.api_sock.exists(), "husk-vmm removes its API socket");
    assert!(!vm.vsock_uds.exists(), "husk-vmm removes its vsock socket");
}
