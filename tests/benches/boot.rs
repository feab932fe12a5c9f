//! Boot benchmark: boots husk's guest image under husk-vmm N times and reports,
//! per boot, the time from spawning husk-vmm to
//!   - the guest's first instruction (the VMM's "guest entered" log line),
//!   - the kernel reaching init (the agent's first console line),
//!   - the agent answering a Ping over vsock,
//!
//! and the VMM's resident memory excluding guest RAM.
//!
//! `cargo bench -p husk-e2e --bench boot` (HUSK_BOOT_BENCH_RUNS=N, default 3;
//! HUSK_BOOT_BENCH_VCPUS=N, default 1: more needs standard KVM). The profile
//! column says which KVM kind every figure comes from.
//! Needs `guest-image/build.sh` and `cargo build --release --workspace --bins`.

use std::time::Duration;

use husk_e2e::microvm::{MicroVm, MicroVmOptions};
use husk_proto::v1::ShutdownRequest;

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let runs: usize = husk_e2e::env_number("HUSK_BOOT_BENCH_RUNS", 3);
    let vcpus: u8 = husk_e2e::env_number("HUSK_BOOT_BENCH_VCPUS", 1);
    println!(
        "run  profile  vcpus  guest-entered-ms  init-ms  agent-ping-ms  vmm-rss-excl-guest-KiB"
    );
    for run in 1..=runs {
        let mut vm = MicroVm::start(MicroVmOptions {
            extra_args: vec!["--vcpus".into(), vcpus.to_string()],
            ..MicroVmOptions::default()
        });
        let (mut agent, t) = match vm.wait_for_agent(Duration::from_secs(900)).await {
            Ok(ok) => ok,
            Err(why) => {
                eprintln!("boot {run} failed: {why}");
                std::process::exit(1);
            }
        };
        let rss = vm.vmm_overhead_rss_kib();
        let profile = vm.kvm_kind().label();
        println!(
            "{run:<4} {profile:<8} {vcpus:<6} {:<17} {:<8} {:<14} {}",
            ms(t.guest_entered),
            ms(t.init_reached),
            ms(Some(t.agent_answered)),
            rss.map_or("-".into(), |k| k.to_string())
        );
        let _ = agent.shutdown(ShutdownRequest {}).await;
        if let Err(e) = vm.wait_exit(Duration::from_secs(120)) {
            eprintln!("{e}");
        }
    }
}
