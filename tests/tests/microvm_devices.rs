//! husk-vmm's virtio-blk on a real guest kernel: a read-only disk given at
//! boot is seen with its size, and a file attached to an empty slot through
//! the control API reaches the running guest as a capacity change (the
//! config-change interrupt), which is how huskd will hand images to a pod.
//! A guest that does not boot fails this test.

use std::time::Duration;

use husk_e2e::microvm::{boot_timeout, MicroVm, MicroVmOptions};
use husk_proto::vmm_api;

fn sized_file(path: &std::path::Path, bytes: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_sees_boot_disk_and_a_disk_attached_later() {
    let dir = tempfile::tempdir().expect("temp dir");
    let boot_disk = dir.path().join("boot.img");
    let later_disk = dir.path().join("later.img");
    sized_file(&boot_disk, 1 << 20);
    sized_file(&later_disk, 2 << 20);

    let mut vm = MicroVm::start(MicroVmOptions {
        extra_args: vec![
            // The kernel reports disk sizes at notice level, which `quiet` hides.
            "--cmdline".into(),
            "console=ttyS0 reboot=k panic=-1 loglevel=6".into(),
            "--disk".into(),
            format!("{}:ro", boot_disk.display()),
            "--spare-disks".into(),
            "1".into(),
        ],
        ..MicroVmOptions::default()
    });
    if let Err(why) = vm.wait_for_agent(boot_timeout()).await {
        panic!("the microVM did not boot to its agent: {why}");
    }
    let console = vm.console_text();
    assert!(
        console.contains("[vda] 2048 512-byte logical blocks"),
        "the boot disk is not seen with its size:\n{console}"
    );

    let attach = vmm_api::Request::AttachDisk {
        index: 1,
        path: later_disk.clone(),
        fd: false,
    };
    vm.api(&attach).unwrap_or_else(|e| panic!("{e}"));
    vm.wait_for_console(
        "[vdb] new size: 4096 512-byte logical blocks",
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let reply = vm
        .api(&vmm_api::Request::Status)
        .unwrap_or_else(|e| panic!("{e}"));
    let disks = reply.status.map(|s| s.disks).unwrap_or_default();
    assert_eq!(disks.get(1).map(|d| d.sectors), Some(4096), "{disks:?}");
}
