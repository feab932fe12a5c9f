//! huskd end to end on the `microvm` sandbox driver: the built huskd and
//! husk-vmm, husk's guest image, a real registry on loopback, and CRI driven
//! over the unix socket as crictl does. Every pod boots a real guest.
//!
//! Needs root and /dev/kvm, scripts/install-deps.sh's packages, the guest
//! image (`bash guest-image/build.sh`, or HUSK_GUEST_KERNEL and
//! HUSK_GUEST_INITRD) and husk-vmm built first: `cargo build -p husk-vmm`
//! (or HUSK_VMM=/path/to/husk-vmm). On PVM hosts a guest boots in ~30 s;
//! HUSK_BOOT_TIMEOUT_SECS (default 600) bounds the boot.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use husk_e2e::microvm::{boot_timeout, KvmKind};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use support::streaming::{
    attach_output, exec_url, exit_code_of, ws_collect, ws_connect, ws_forward, ws_frame,
    ws_read_until, Ws,
};
use support::{
    container_config, exec_sync, guest_diagnostics, virtiofsds_under, vmms_under, Huskd, VmReaper,
};

/// Container steps in a PVM guest take seconds each.
const PATIENCE: Duration = Duration::from_secs(300);

async fn wait_exited(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    state: &Path,
) -> cri::ContainerStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = support::container_status(rt, id).await;
        if status.state == cri::ContainerState::ContainerExited as i32 {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} did not exit: {status:?}\n{}",
            guest_diagnostics(state)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes `WORD N` to the container's stdout (through /proc/1/fd/1 from an
/// exec) every half second until the attached client has read one: after
/// a huskd restart the agent hands the output to the new huskd only once
/// the old reader found itself gone, which costs a chunk.
async fn write_to_stdout_until_attached(
    rt: &mut RuntimeServiceClient<Channel>,
    container: &str,
    attached: &mut Ws,
    word: &str,
) {
    let deadline = Instant::now() + PATIENCE;
    let mut got = HashMap::new();
    for n in 0.. {
        let line = format!("{word} {n}");
        let out = exec_sync(
            rt,
            container,
            &["sh", "-c", &format!("echo {line} > /proc/1/fd/1")],
        )
        .await;
        assert_eq!(out.exit_code, 0, "{out:?}");
        let read = tokio::time::timeout(
            Duration::from_millis(500),
            ws_read_until(attached, &mut got, |got| {
                String::from_utf8_lossy(got.get(&1).map(Vec::as_slice).unwrap_or_default())
                    .contains(word)
            }),
        )
        .await;
        if read.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing attached read of {word:?}: {got:?}"
        );
    }
    let stdout = String::from_utf8_lossy(&got[&1]).into_owned();
    assert!(stdout.starts_with(word), "{stdout:?}");
    assert!(!got.contains_key(&3), "the attach ended: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_microvm_pod_runs_logs_execs_and_goes_away_over_cri() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the microvm driver needs /dev/kvm and mounts: run this as root"
    );
    let (_registry, image) = support::busybox_registry("").await;

    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let logs = dir.path().join("logs");
    let _mounts = support::MountSweeper(dir.path().to_path_buf());
    let _reaper = VmReaper(state.clone());
    let socket = dir.path().join("husk.sock");
    // guest_max_vcpus: the default is the host's CPU count, which differs
    // between machines (the standard-KVM bed's L1 has one).
    let config = format!(
        "log_level = \"info\"\n[microvm]\nguest_boot_timeout_secs = {}\nguest_max_vcpus = 4\n\
         guest_cmdline = \"console=ttyS0 reboot=k panic=-1 loglevel=7 print-fatal-signals=1\"\n",
        boot_timeout().as_secs()
    );
    let args = Huskd::microvm_args(dir.path(), &config);
    let mut huskd = Huskd::spawn(&socket, &args);
    let channel = huskd.connect().await;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut img = ImageServiceClient::new(channel);

    let handlers = support::runtime_status(&mut rt).await.runtime_handlers;
    assert!(handlers.iter().any(|h| h.name == "microvm"), "{handlers:?}");

    support::pull(&mut img, &image).await;

    // A pod with the default handler: a microVM, as big as its containers'
    // limits (kubelet's sum: 2 CPUs, 256 MiB) plus huskd's default base, in
    // a pod cgroup kubelet made.
    let pod_logs = logs.join("default_vm1_uid-vm1");
    let cgroup_parent =
        support::CgroupParent::new(&format!("/husk-test-{}/pod-uid-vm1", std::process::id()));
    let pod_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "vm1".into(),
            uid: "uid-vm1".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "vm1".into(),
        log_directory: pod_logs.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 200_000,
                memory_limit_in_bytes: 256 << 20,
                ..Default::default()
            }),
            cgroup_parent: cgroup_parent.0.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = Instant::now();
    let pod = match rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: String::new(),
        })
        .await
    {
        Ok(r) => r.into_inner().pod_sandbox_id,
        // huskd's error carries the VMM log and the console's tail.
        Err(status) => panic!(
            "RunPodSandbox failed (did the guest boot?): {}",
            status.message()
        ),
    };
    eprintln!("RunPodSandbox (guest boot to agent): {:?}", t.elapsed());
    let sandbox_dir = state.join("sandboxes").join(&pod);
    let vmm_pids = vmms_under(&sandbox_dir);
    assert_eq!(vmm_pids.len(), 1, "one husk-vmm per pod: {vmm_pids:?}");
    // Jailed, filtered, not root, and with virtiofsd in its own cgroup
    // below the pod's.
    let vm_cgroup = format!("{}/husk-{pod}", cgroup_parent.0);
    support::check_vm_confined(&sandbox_dir, &vm_cgroup);
    let pod_status = support::pod_status(&mut rt, &pod).await;
    assert_eq!(pod_status.state, cri::PodSandboxState::SandboxReady as i32);

    // The VM's size in the verbose status: 2 vCPUs (1 on PVM, where guests
    // are single-vCPU) and 256 + 64 MiB, on the KVM kind this run exercises.
    let kind = KvmKind::expected();
    let want_vcpus = if kind == KvmKind::Pvm { 1 } else { 2 };
    let want_mem_mib = 256 + 64;
    let verbose = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: true,
        })
        .await
        .expect("verbose PodSandboxStatus")
        .into_inner();
    let info: serde_json::Value =
        serde_json::from_str(verbose.info.get("info").expect("info[\"info\"]")).expect("json");
    assert_eq!(
        info["vm"],
        serde_json::json!({
            "vcpus": want_vcpus,
            "memoryMiB": want_mem_mib,
            "kvm": if kind == KvmKind::Pvm { "pvm" } else { "standard" },
        }),
        "{info}"
    );
    eprintln!("the pod's VM on {kind}: {}", info["vm"]);

    // A container that writes a line to each stream and exits.
    let t = Instant::now();
    let echo = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config(
                "echo",
                &image,
                &["sh", "-c", "echo hello; echo oops >&2"],
                "echo/0.log",
            )),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "CreateContainer: {}\n{}",
                e.message(),
                guest_diagnostics(&state)
            )
        })
        .into_inner()
        .container_id;
    eprintln!(
        "CreateContainer (attach the image disk, mount it): {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    rt.start_container(cri::StartContainerRequest {
        container_id: echo.clone(),
    })
    .await
    .expect("start");
    let status = wait_exited(&mut rt, &echo, &state).await;
    eprintln!("StartContainer → EXITED: {:?}", t.elapsed());
    if status.exit_code != 0 {
        // Diagnosis before failing: does the same command fail again in
        // this guest (bad data cached), or was it a one-off?
        let mut again_config = container_config(
            "echo-again",
            &image,
            &["sh", "-c", "echo hello; echo oops >&2"],
            "echo-again/0.log",
        );
        again_config.metadata = Some(cri::ContainerMetadata {
            name: "echo-again".into(),
            attempt: 0,
        });
        let again = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(again_config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .expect("create echo-again")
            .into_inner()
            .container_id;
        rt.start_container(cri::StartContainerRequest {
            container_id: again.clone(),
        })
        .await
        .expect("start echo-again");
        let again_status = wait_exited(&mut rt, &again, &state).await;
        eprintln!(
            "the echo container failed with {}; the same command again: {}",
            status.exit_code, again_status.exit_code
        );
    }
    assert_eq!(
        status.exit_code,
        0,
        "{status:?}\nlog: {:?}\n{}",
        std::fs::read_to_string(pod_logs.join("echo/0.log")),
        guest_diagnostics(&state)
    );
    assert!(
        status.created_at <= status.started_at && status.started_at <= status.finished_at,
        "{status:?}"
    );
    assert_eq!(status.reason, "Completed");
    let log_path = pod_logs.join("echo/0.log");
    let deadline = Instant::now() + PATIENCE;
    let log = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.lines().count() >= 2 {
            break text;
        }
        assert!(Instant::now() < deadline, "log incomplete: {text:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(log.contains(" stdout F hello\n"), "{log}");
    assert!(log.contains(" stderr F oops\n"), "{log}");

    // A long-running container of the same image (the same disk), with
    // kubelet-style host files (through the pod's virtio-fs).
    let host_files = dir.path().join("host-files");
    std::fs::create_dir_all(host_files.join("dir/sub")).expect("mkdir");
    std::fs::write(host_files.join("hosts"), "10.0.0.1 husk-test\n").expect("write");
    std::fs::write(host_files.join("dir/sub/key"), "value\n").expect("write");
    std::os::unix::fs::symlink("sub/key", host_files.join("dir/link")).expect("symlink");
    let mut sleeper_config =
        container_config("sleeper", &image, &["sleep", "600"], "sleeper/0.log");
    sleeper_config.mounts = vec![
        cri::Mount {
            container_path: "/etc/hosts".into(),
            host_path: host_files.join("hosts").display().to_string(),
            readonly: false,
            ..Default::default()
        },
        cri::Mount {
            container_path: "/config".into(),
            host_path: host_files.join("dir").display().to_string(),
            readonly: true,
            ..Default::default()
        },
    ];
    let t = Instant::now();
    let sleeper = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(sleeper_config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "CreateContainer: {}\n{}",
                e.message(),
                guest_diagnostics(&state)
            )
        })
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: sleeper.clone(),
    })
    .await
    .expect("start sleeper");
    eprintln!("second container create + start: {:?}", t.elapsed());

    let out = exec_sync(&mut rt, &sleeper, &["echo", "hi"]).await;
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(out.stdout, b"hi\n");

    // Inside the guest: the vCPUs, and RAM that holds the limit but not
    // more than the VM was given (the kernel keeps some for itself).
    let out = exec_sync(
        &mut rt,
        &sleeper,
        &[
            "sh",
            "-c",
            "nproc; awk '/MemTotal/ {print $2}' /proc/meminfo",
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let nproc: u64 = lines.next().and_then(|l| l.parse().ok()).expect("nproc");
    let mem_total_kib: u64 = lines.next().and_then(|l| l.parse().ok()).expect("MemTotal");
    assert_eq!(nproc, want_vcpus, "{out:?}");
    assert!(
        mem_total_kib > 256 * 1024 && mem_total_kib <= want_mem_mib * 1024,
        "MemTotal {mem_total_kib} KiB for a {want_mem_mib} MiB VM"
    );
    eprintln!("in the guest: {nproc} CPUs, MemTotal {mem_total_kib} KiB");
    let out = exec_sync(
        &mut rt,
        &sleeper,
        &[
            "cat",
            "/etc/hosts",
            "/config/sub/key",
            "/config/link",
            "/proc/sys/kernel/hostname",
        ],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "10.0.0.1 husk-test\nvalue\nvalue\nvm1\n",
        "{out:?}"
    );

    // Exec and Attach through huskd's streaming server, which reaches the
    // agent in the guest over vsock. Exec over WebSocket: both streams and
    // the exit code.
    let t = Instant::now();
    let url = exec_url(
        &mut rt,
        &sleeper,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        false,
        false,
    )
    .await;
    let mut ws = ws_connect(&url, "v4.channel.k8s.io").await;
    let got = ws_collect(&mut ws, false).await;
    eprintln!("streaming exec (URL to exit status): {:?}", t.elapsed());
    assert_eq!(
        got.get(&1).map(Vec::as_slice),
        Some(&b"out\n"[..]),
        "{got:?}"
    );
    assert_eq!(
        got.get(&2).map(Vec::as_slice),
        Some(&b"err\n"[..]),
        "{got:?}"
    );
    assert_eq!(exit_code_of(&got[&3]), 3);
    // Attach: what the container writes (here an exec writing to its PID
    // 1's stdout) reaches the attached client.
    let mut attached = attach_output(&mut rt, &sleeper).await;
    write_to_stdout_until_attached(&mut rt, &sleeper, &mut attached, "before").await;
    drop(attached);
    // Port-forward: the agent connects to busybox httpd on the guest's
    // loopback, which came up with the pod's network.
    let out = exec_sync(
        &mut rt,
        &sleeper,
        &["busybox", "httpd", "-p", "127.0.0.1:8080", "-h", "/etc"],
    )
    .await;
    assert_eq!(out.exit_code, 0, "{out:?}");
    let t = Instant::now();
    let mut ws = ws_forward(&mut rt, &pod, 8080).await;
    ws.send(ws_frame(false, 0, b"GET /hosts HTTP/1.0\r\n\r\n"))
        .await
        .expect("send");
    let got = ws_collect(&mut ws, false).await;
    eprintln!("port-forward, one HTTP request: {:?}", t.elapsed());
    let response = String::from_utf8_lossy(got.get(&0).map(Vec::as_slice).unwrap_or_default());
    assert!(
        response.starts_with("HTTP/1.") && response.ends_with("10.0.0.1 husk-test\n"),
        "{response:?} {got:?}"
    );
    assert!(!got.contains_key(&1), "error channel: {got:?}");
    // Nothing listens on 8081: the error channel says so.
    let mut ws = ws_forward(&mut rt, &pod, 8081).await;
    let got = ws_collect(&mut ws, false).await;
    let error = String::from_utf8_lossy(got.get(&1).map(Vec::as_slice).unwrap_or_default());
    assert!(
        error.contains("8081") && error.contains("refused"),
        "{error:?} {got:?}"
    );

    // huskd restarts; the pod's VM keeps running and huskd finds it again.
    huskd.terminate();
    assert_eq!(vmms_under(&sandbox_dir), vmm_pids, "the VM outlives huskd");
    let t = Instant::now();
    let huskd = Huskd::spawn(&socket, &args);
    let channel = huskd.connect().await;
    let mut rt = RuntimeServiceClient::new(channel);
    let out = exec_sync(&mut rt, &sleeper, &["echo", "again"]).await;
    assert_eq!(out.stdout, b"again\n", "{out:?}");
    eprintln!("huskd restart to ExecSync: {:?}", t.elapsed());
    // The restarted huskd copies the running container's output again, to
    // attached clients as well as to its log.
    let t = Instant::now();
    let mut attached = attach_output(&mut rt, &sleeper).await;
    write_to_stdout_until_attached(&mut rt, &sleeper, &mut attached, "after").await;
    drop(attached);
    eprintln!("attach after the restart: {:?}", t.elapsed());

    let status = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: echo.clone(),
            verbose: false,
        })
        .await
        .expect("status")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(status.state, cri::ContainerState::ContainerExited as i32);

    // Once no container uses the image, its disk is detached from the VM.
    let t = Instant::now();
    rt.stop_container(cri::StopContainerRequest {
        container_id: sleeper.clone(),
        timeout: 0,
    })
    .await
    .expect("stop sleeper");
    let status = wait_exited(&mut rt, &sleeper, &state).await;
    assert_ne!(status.exit_code, 0);
    eprintln!("StopContainer: {:?}", t.elapsed());
    let disks = || std::fs::read_to_string(sandbox_dir.join("disks.json")).expect("disks.json");
    for id in [&echo, &sleeper] {
        assert!(disks().contains("sha256:"), "{}", disks());
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("remove container");
    }
    assert!(!disks().contains("sha256:"), "{}", disks());

    // What kubelet's validation suite checks, in a VM.
    support::check_cri_conformance(&mut rt, &pod, &pod_config, &image).await;
    support::check_pid_namespaces(&mut rt, &pod, &pod_config, &image, true).await;
    check_live_volumes(
        &mut rt,
        &pod,
        &pod_config,
        &image,
        &dir.path().join("volumes"),
        &sandbox_dir,
    )
    .await;
    // Mounts made in a VM cannot reach the node.
    let mut propagated = container_config("propagated", &image, &["true"], "");
    propagated.mounts = vec![cri::Mount {
        container_path: "/vol".into(),
        host_path: dir.path().display().to_string(),
        propagation: cri::MountPropagation::PropagationBidirectional as i32,
        ..Default::default()
    }];
    let refused = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(propagated),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect_err("propagation in a VM");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("propagation"), "{refused:?}");

    // The VM dies under a running container: the pod reads NOTREADY and the
    // container EXITED, and stop/remove still clean everything up.
    let last = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config(
                "last",
                &image,
                &["sleep", "600"],
                "last/0.log",
            )),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "CreateContainer last: {}\n{}",
                e.message(),
                guest_diagnostics(&state)
            )
        })
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: last.clone(),
    })
    .await
    .expect("start last");
    // SIGSYS, which the VMM dies of when its seccomp filter refuses a call
    // (vmm/src/seccomp.rs tests that a refused call does, naming it): the
    // VMM's last word reaches the pod's failure, though another huskd
    // started it.
    for pid in vmms_under(&sandbox_dir) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGSYS,
        )
        .expect("kill husk-vmm");
    }
    let (_, info) = support::wait_pod_failed(&mut rt, &pod, PATIENCE).await;
    assert!(
        info.contains("husk-vmm: killed by SIGSYS"),
        "the failure names the signal: {info}"
    );
    let status = wait_exited(&mut rt, &last, &state).await;
    assert!(
        status.exit_code != 0 && !status.message.is_empty(),
        "a container whose VM died: {status:?}"
    );
    rt.stop_container(cri::StopContainerRequest {
        container_id: last.clone(),
        timeout: 0,
    })
    .await
    .expect("stop a container whose VM died");
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: last.clone(),
    })
    .await
    .expect("remove a container whose VM died");

    let t = Instant::now();
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("stop pod");
    eprintln!("StopPodSandbox: {:?}", t.elapsed());
    assert!(
        vmms_under(&sandbox_dir).is_empty(),
        "husk-vmm outlived StopPodSandbox"
    );
    assert!(
        virtiofsds_under(&sandbox_dir).is_empty(),
        "virtiofsd outlived StopPodSandbox"
    );
    assert!(
        !support::cgroup_exists(&vm_cgroup),
        "the VM's cgroup {vm_cgroup} outlived StopPodSandbox"
    );
    let mounts = support::mounts_under(&sandbox_dir);
    assert!(mounts.is_empty(), "left mounted: {mounts:?}");
    assert!(!sandbox_dir.join("fs.sock").exists());
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("remove pod");
    assert!(vmms_under(&state).is_empty());
    assert!(
        !sandbox_dir.exists(),
        "{} left behind",
        sandbox_dir.display()
    );
    let pods = support::list_pods(&mut rt).await;
    assert!(pods.is_empty(), "{pods:?}");

    // A pod whose virtiofsd dies: its VM stops (a guest with a dead
    // filesystem would hang), the pod reads NOTREADY saying why, and stop
    // and remove leave no daemon, bind or socket.
    let vm2_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "vm2".into(),
            uid: "uid-vm2".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        ..Default::default()
    };
    let vm2 = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(vm2_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox vm2: {}", e.message()))
        .into_inner()
        .pod_sandbox_id;
    let vm2_dir = state.join("sandboxes").join(&vm2);
    let vm2_volume = dir.path().join("vm2-volume");
    let mut vm2_sleeper = container_config("sleeper", &image, &["sleep", "600"], "");
    vm2_sleeper.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: vm2_volume.display().to_string(),
        ..Default::default()
    }];
    support::run_container(&mut rt, &vm2, vm2_sleeper, Some(vm2_config)).await;
    assert!(
        vm2_volume.is_dir(),
        "a missing host path is made a directory"
    );
    // Without a cgroup parent the VM goes below husk's own.
    let vm2_cgroup = format!("/husk/{vm2}");
    support::check_vm_confined(&vm2_dir, &vm2_cgroup);
    // virtiofsd and the child it serves from (its namespace sandbox).
    let daemons = virtiofsds_under(&vm2_dir);
    assert!(!daemons.is_empty(), "no virtiofsd for the pod");
    for pid in daemons {
        // The child dies with its parent: it may be gone already.
        match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        ) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => panic!("kill virtiofsd {pid}: {e}"),
        }
    }
    let (took, info) = support::wait_pod_failed(&mut rt, &vm2, PATIENCE).await;
    eprintln!("virtiofsd killed → pod NOTREADY: {took:?}");
    assert!(
        info.contains("virtio-fs") && info.contains("backend closed"),
        "the failure names the volumes' backend: {info}"
    );
    support::remove_pod(&mut rt, &vm2).await;
    assert!(vmms_under(&state).is_empty(), "husk-vmm left running");
    assert!(
        virtiofsds_under(&state).is_empty(),
        "virtiofsd left running"
    );
    let mounts = support::mounts_under(&state);
    assert!(mounts.is_empty(), "left mounted: {mounts:?}");
    assert!(!vm2_dir.exists(), "{} left behind", vm2_dir.display());
    assert!(
        !support::cgroup_exists(&vm2_cgroup),
        "{vm2_cgroup} left behind"
    );
}

/// Runs `cmd` in `container` until its output is `want`; how long that took.
async fn exec_until(
    rt: &mut RuntimeServiceClient<Channel>,
    container: &str,
    cmd: &[&str],
    want: &str,
    within: Duration,
) -> Duration {
    let began = Instant::now();
    loop {
        let out = exec_sync(rt, container, cmd).await;
        if out.exit_code == 0 && out.stdout == want.as_bytes() {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < within,
            "{cmd:?} still gives {out:?} after {within:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kubelet's volumes in a VM are the node's files, live, through virtio-fs
/// (issue 15): shared between containers, the host's changes seen (also
/// kubelet's atomic `..data` swap), read-only honoured, propagation from
/// the node as asked, the termination log reaching the host, a volume far
/// larger than a copy could be. `host` is a scratch directory on the node.
async fn check_live_volumes(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    image: &str,
    host: &Path,
    sandbox_dir: &Path,
) {
    let shared = host.join("shared");
    std::fs::create_dir_all(&shared).expect("mkdir");
    let mount = |container_path: &str, host_path: &Path, readonly: bool| cri::Mount {
        container_path: container_path.into(),
        host_path: host_path.display().to_string(),
        readonly,
        ..Default::default()
    };

    // kubelet's atomic writer: key → ..data/key, ..data → ..<timestamp>.
    let config = host.join("configmap");
    std::fs::create_dir_all(config.join("..v1")).expect("mkdir");
    std::fs::write(config.join("..v1/key"), "v1\n").expect("write");
    std::os::unix::fs::symlink("..v1", config.join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/key", config.join("key")).expect("symlink");

    // 1 GiB, sparse on the host, with a marker in its last bytes.
    let big = host.join("big");
    std::fs::create_dir_all(&big).expect("mkdir");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(big.join("disk.img")).expect("create");
        file.set_len(1 << 30).expect("truncate");
        file.write_all_at(b"end-of-1GiB\n", (1 << 30) - 12)
            .expect("marker");
    }

    let mut writer = container_config(
        "vol-writer",
        image,
        &["sh", "-c", "echo from-writer > /shared/w; sleep 600"],
        "",
    );
    writer.mounts = vec![
        mount("/shared", &shared, false),
        mount("/config", &config, true),
        mount("/big", &big, false),
    ];
    let writer = support::run_container(rt, pod, writer, Some(pod_config.clone())).await;
    let mut reader = container_config("vol-reader", image, &["sleep", "600"], "");
    reader.mounts = vec![mount("/shared", &shared, false)];
    let reader = support::run_container(rt, pod, reader, Some(pod_config.clone())).await;

    // One container writes, the other reads, the host sees it; and back.
    exec_until(
        rt,
        &reader,
        &["cat", "/shared/w"],
        "from-writer\n",
        PATIENCE,
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(shared.join("w")).expect("the host sees the write"),
        "from-writer\n"
    );
    let out = exec_sync(rt, &reader, &["sh", "-c", "echo from-reader > /shared/r"]).await;
    assert_eq!(out.exit_code, 0, "{out:?}");
    exec_until(
        rt,
        &writer,
        &["cat", "/shared/r"],
        "from-reader\n",
        PATIENCE,
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(shared.join("r")).expect("host"),
        "from-reader\n"
    );

    // The host's changes reach a running container.
    std::fs::write(shared.join("h"), "host-1\n").expect("write");
    exec_until(rt, &reader, &["cat", "/shared/h"], "host-1\n", PATIENCE).await;
    std::fs::write(shared.join("h"), "host-2\n").expect("write");
    let took = exec_until(
        rt,
        &reader,
        &["cat", "/shared/h"],
        "host-2\n",
        Duration::from_secs(10),
    )
    .await;
    eprintln!("a file rewritten on the host, seen in the guest after {took:?}");
    exec_until(rt, &writer, &["cat", "/config/key"], "v1\n", PATIENCE).await;
    std::fs::create_dir_all(config.join("..v2")).expect("mkdir");
    std::fs::write(config.join("..v2/key"), "v2\n").expect("write");
    std::os::unix::fs::symlink("..v2", config.join("..data_tmp")).expect("symlink");
    std::fs::rename(config.join("..data_tmp"), config.join("..data")).expect("swap");
    std::fs::remove_dir_all(config.join("..v1")).expect("rm old");
    let took = exec_until(
        rt,
        &writer,
        &["cat", "/config/key"],
        "v2\n",
        Duration::from_secs(10),
    )
    .await;
    eprintln!("kubelet's ..data swap on the host, seen in the guest after {took:?}");

    // Read-only is read-only.
    let out = exec_sync(rt, &writer, &["sh", "-c", "echo x > /config/new"]).await;
    assert_ne!(out.exit_code, 0, "a write to a read-only volume: {out:?}");
    assert!(!config.join("new").exists());

    // 1 GiB through, end to end.
    let out = exec_sync(
        rt,
        &writer,
        &[
            "sh",
            "-c",
            "stat -c %s /big/disk.img; tail -c 12 /big/disk.img",
        ],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1073741824\nend-of-1GiB\n",
        "{out:?}"
    );

    // The node's later mounts below a volume: a HOST_TO_CONTAINER mount
    // sees them, a PRIVATE one does not (the source is shared, as kubelet's
    // directory is on systemd hosts).
    let node_dir = host.join("propagating");
    std::fs::create_dir_all(node_dir.join("sub")).expect("mkdir");
    support::run("mount", &[&"--bind", &node_dir, &node_dir]);
    support::run("mount", &[&"--make-shared", &node_dir]);
    let mut watcher = container_config("vol-propagation", image, &["sleep", "600"], "");
    watcher.mounts = vec![
        cri::Mount {
            propagation: cri::MountPropagation::PropagationHostToContainer as i32,
            ..mount("/following", &node_dir, true)
        },
        mount("/private", &node_dir, true),
    ];
    let watcher = support::run_container(rt, pod, watcher, Some(pod_config.clone())).await;
    support::run("mount", &[&"-t", &"tmpfs", &"tmpfs", &node_dir.join("sub")]);
    std::fs::write(node_dir.join("sub/later"), "later\n").expect("write");
    let took = exec_until(
        rt,
        &watcher,
        &["cat", "/following/sub/later"],
        "later\n",
        Duration::from_secs(10),
    )
    .await;
    eprintln!("a node mount below a HOST_TO_CONTAINER volume, seen after {took:?}");
    let out = exec_sync(rt, &watcher, &["ls", "/private/sub"]).await;
    assert_eq!(
        (out.exit_code, out.stdout.as_slice()),
        (0, &b""[..]),
        "a PRIVATE volume saw the node's later mount: {out:?}"
    );
    // Lazily: virtiofsd may still hold what the guest looked up there.
    support::run("umount", &[&"--lazy", &node_dir]);

    // The termination log, a host file as kubelet mounts it, keeps what the
    // container wrote there.
    let termination_log = host.join("termination-log");
    std::fs::write(&termination_log, "").expect("create");
    let mut last_words = container_config(
        "vol-last-words",
        image,
        &["sh", "-c", "echo goodbye > /dev/termination-log"],
        "",
    );
    last_words.mounts = vec![mount("/dev/termination-log", &termination_log, false)];
    let last_words = support::run_container(rt, pod, last_words, Some(pod_config.clone())).await;
    let status = wait_exited(rt, &last_words, Path::new("/nonexistent")).await;
    assert_eq!(status.exit_code, 0, "{status:?}");
    assert_eq!(
        std::fs::read_to_string(&termination_log).expect("read"),
        "goodbye\n"
    );

    for id in [&writer, &reader, &watcher, &last_words] {
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("remove");
    }
    // Their binds went with them; the host's files stay.
    let volumes = sandbox_dir.join("volumes");
    assert_eq!(support::mounts_under(&volumes), vec![volumes.clone()]);
    assert_eq!(
        std::fs::read_to_string(shared.join("w")).expect("host"),
        "from-writer\n"
    );
}
