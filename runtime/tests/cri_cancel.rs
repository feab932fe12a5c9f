//! Clients that give up: crictl's default deadline is 2 s, a microVM boots
//! for longer, and tonic drops a handler's future when its client's
//! deadline passes. huskd must finish (or fully undo) what it started
//! anyway, and never leave a VM, namespace or lease nobody can remove.
//! And a guest that stops answering: its pod goes NOTREADY by itself, saying
//! why, and its VM is killed.
//!
//! Real parts only: huskd, husk-vmm and the guest image, a loopback
//! registry, the CNI bridge network; CRI over the unix socket with a 2 s
//! deadline as crictl sets it. Needs root and /dev/kvm (PVM here, standard
//! KVM in scripts/test-stdkvm.sh).

mod support;

use std::time::{Duration, Instant};

use husk_e2e::microvm::boot_timeout;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::Code;

use support::{
    container_config, guest_diagnostics, network_leftovers, virtiofsds_under, vmms_under, Huskd,
    VmReaper,
};

/// huskd's deadline on calls into the agent, and on its health check.
const AGENT_TIMEOUT_SECS: u64 = 20;
/// How often huskd's health check pings (shorter than the default, so that
/// a silent guest is noticed sooner).
const HEALTH_CHECK_SECS: u64 = 10;

/// crictl's default timeout.
const CLIENT_DEADLINE: Duration = Duration::from_secs(2);

/// How a call the client gave up on ends for that client: its own timer
/// (Cancelled, "Timeout expired") or the server's (DeadlineExceeded).
fn gave_up(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded)
}

/// The sizes (in sectors) of the VM's disk slots, from husk-vmm's control
/// API: 0 for an empty slot.
fn vmm_disks(sandbox_dir: &std::path::Path) -> Vec<u64> {
    use std::io::{BufRead, Write};
    let mut api = std::os::unix::net::UnixStream::connect(sandbox_dir.join("api.sock"))
        .expect("husk-vmm's control API");
    api.write_all(b"{\"op\":\"status\"}\n").expect("ask status");
    let mut line = String::new();
    std::io::BufReader::new(api)
        .read_line(&mut line)
        .expect("status");
    let status: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    status["status"]["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| d["sectors"].as_u64().unwrap_or(0))
        .collect()
}

fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_leaves_a_pod_it_can_find_and_remove() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the microvm driver needs /dev/kvm and namespaces: run this as root"
    );
    let (_registry, image) = support::busybox_registry("").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let _reaper = VmReaper(state.clone());
    let config = format!(
        "log_level = \"info\"\nagent_timeout_secs = {AGENT_TIMEOUT_SECS}\n\
         health_check_interval_secs = {HEALTH_CHECK_SECS}\n\
         [microvm]\nguest_boot_timeout_secs = {}\n",
        boot_timeout().as_secs()
    );
    let socket = dir.path().join("husk.sock");
    let args = Huskd::microvm_args(dir.path(), &config);
    let mut huskd = Huskd::spawn(&socket, &args);
    let channel = huskd.connect().await;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut img = ImageServiceClient::new(channel);
    support::pull(&mut img, &image).await;

    let pod_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "impatient".into(),
            uid: "uid-impatient".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "impatient".into(),
        log_directory: dir.path().join("logs").display().to_string(),
        ..Default::default()
    };
    let run = || cri::RunPodSandboxRequest {
        config: Some(pod_config.clone()),
        runtime_handler: String::new(),
    };

    // 1. RunPodSandbox with crictl's deadline: a guest boot takes longer.
    let began = Instant::now();
    let answer = rt
        .run_pod_sandbox(with_deadline(run(), CLIENT_DEADLINE))
        .await;
    let status = answer.expect_err("a guest boots in more than 2 s");
    assert!(gave_up(&status), "{status:?}");

    // 2. The client retries with the same metadata while the first call
    // still boots the VM: a clear answer, never a second VM.
    let retry = rt
        .run_pod_sandbox(with_deadline(run(), CLIENT_DEADLINE))
        .await;
    match retry {
        Err(status) if status.code() == Code::AlreadyExists => assert!(
            status.message().contains("still starting") || status.message().contains("ready"),
            "{status:?}"
        ),
        Err(status) if gave_up(&status) => {}
        other => panic!("a retry must not start a second pod: {other:?}"),
    }

    // 3. The first call finishes without its client: the pod becomes ready.
    let deadline = began + boot_timeout();
    let pod = loop {
        let pods = support::list_pods(&mut rt).await;
        assert!(pods.len() <= 1, "one pod only: {pods:?}");
        if let Some(pod) = pods
            .into_iter()
            .find(|p| p.state == cri::PodSandboxState::SandboxReady as i32)
        {
            break pod.id;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned pod never became ready\n{}",
            guest_diagnostics(&state)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "the abandoned RunPodSandbox finished: pod ready after {:?}",
        began.elapsed()
    );
    let sandbox_dir = state.join("sandboxes").join(&pod);
    assert_eq!(
        vmms_under(&sandbox_dir).len(),
        1,
        "one husk-vmm for the pod"
    );

    // 4. CreateContainer whose client leaves at once: the container is
    // created anyway, listed, and can be removed.
    let answer = rt
        .create_container(with_deadline(
            cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config(
                    "late",
                    &image,
                    &["sleep", "600"],
                    "late/0.log",
                )),
                sandbox_config: Some(pod_config.clone()),
            },
            Duration::from_millis(50),
        ))
        .await;
    let status = answer.expect_err("a container is not created in 50 ms");
    assert!(gave_up(&status), "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(300);
    let container = loop {
        let containers = rt
            .list_containers(cri::ListContainersRequest { filter: None })
            .await
            .expect("ListContainers")
            .into_inner()
            .containers;
        if let Some(c) = containers.into_iter().next() {
            assert_eq!(
                c.state,
                cri::ContainerState::ContainerCreated as i32,
                "{c:?}"
            );
            break c.id;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned CreateContainer never finished\n{}",
            guest_diagnostics(&state)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: container,
    })
    .await
    .expect("RemoveContainer");

    // 5. huskd killed during a CreateContainer (the guest held still so the
    // call is surely in flight): the next huskd removes what the call left
    // in the guest, and the pod stays ready.
    let vmm = vmms_under(&sandbox_dir);
    let vmm = nix::unistd::Pid::from_raw(vmm[0] as i32);
    nix::sys::signal::kill(vmm, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP husk-vmm");
    let mut cut = rt.clone();
    let request = cri::CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(container_config(
            "half",
            &image,
            &["sleep", "600"],
            "half/0.log",
        )),
        sandbox_config: Some(pod_config.clone()),
    };
    let call = tokio::spawn(async move { cut.create_container(request).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    huskd.kill();
    nix::sys::signal::kill(vmm, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT husk-vmm");
    let answer = call.await.expect("join");
    assert!(answer.is_err(), "the call ended with huskd: {answer:?}");
    // The VMM works off what it was sent while stopped before huskd returns.
    tokio::time::sleep(Duration::from_secs(1)).await;
    huskd = Huskd::spawn(&socket, &args);
    rt = RuntimeServiceClient::new(huskd.connect().await);
    let containers = support::list_containers(&mut rt).await;
    assert!(
        containers.is_empty(),
        "the half-created container is listed: {containers:?}"
    );
    assert_eq!(
        support::pod_status(&mut rt, &pod).await.state,
        cri::PodSandboxState::SandboxReady as i32,
        "the pod survives huskd's crash"
    );
    let disks = std::fs::read_to_string(sandbox_dir.join("disks.json")).unwrap_or_default();
    assert!(
        !disks.contains("sha256:"),
        "the half-created container's disk is recorded: {disks}"
    );
    let attached = vmm_disks(&sandbox_dir);
    assert!(
        attached.iter().all(|sectors| *sectors == 0),
        "the half-created container's disk is in the VM: {attached:?}"
    );

    // 6. A guest that stops answering (its VMM stopped, as a hung guest
    // is): huskd's health check fails the pod within its interval and the
    // deadline, with no CRI call, and kills the VM.
    let vmm = vmms_under(&sandbox_dir);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm[0] as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP husk-vmm");
    let within = Duration::from_secs(HEALTH_CHECK_SECS + AGENT_TIMEOUT_SECS + 30);
    let (after, info) = support::wait_pod_failed(&mut rt, &pod, within).await;
    eprintln!("a silent guest's pod went NOTREADY after {after:?}");
    assert!(info.contains("stopped answering"), "{info}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vmms_under(&sandbox_dir).is_empty() {
        assert!(Instant::now() < deadline, "the silent VM was not killed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 7. The pod stops and goes like any other, leaving nothing.
    support::remove_pod(&mut rt, &pod).await;
    assert!(support::list_pods(&mut rt).await.is_empty());
    assert!(vmms_under(&state).is_empty(), "husk-vmm left running");
    assert!(
        virtiofsds_under(&state).is_empty(),
        "virtiofsd left running"
    );
    let mounts = support::mounts_under(&state);
    assert!(mounts.is_empty(), "left mounted: {mounts:?}");
    assert!(!sandbox_dir.exists(), "sandbox directory left");
    let left = network_leftovers(&pod);
    assert!(left.is_empty(), "network left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huskd_killed_while_a_guest_boots_leaves_no_vm() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the microvm driver needs /dev/kvm and namespaces: run this as root"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let _reaper = VmReaper(state.clone());
    let socket = dir.path().join("husk.sock");
    let args = Huskd::microvm_args(dir.path(), "log_level = \"info\"\n");
    let mut huskd = Huskd::spawn(&socket, &args);
    let mut rt = RuntimeServiceClient::new(huskd.connect().await);
    let config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "cut-short".into(),
            uid: "uid-cut-short".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "cut-short".into(),
        ..Default::default()
    };
    let call = tokio::spawn(async move {
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await
    });
    // Killed as soon as its husk-vmm runs: the guest is still booting.
    let deadline = Instant::now() + Duration::from_secs(60);
    while vmms_under(&state).is_empty() {
        assert!(Instant::now() < deadline, "no husk-vmm started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    huskd.kill();
    let answer = call.await.expect("join");
    assert!(answer.is_err(), "the call ended with huskd: {answer:?}");
    let sandboxes: Vec<_> = std::fs::read_dir(state.join("sandboxes"))
        .expect("sandboxes")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(sandboxes.len(), 1, "{sandboxes:?}");
    assert_eq!(vmms_under(&state).len(), 1, "the VM outlived huskd");

    // The next huskd undoes the start before it serves.
    let _huskd = Huskd::spawn(&socket, &args);
    let mut rt = RuntimeServiceClient::new(_huskd.connect().await);
    assert!(support::list_pods(&mut rt).await.is_empty());
    assert!(vmms_under(&state).is_empty(), "husk-vmm left running");
    assert!(
        virtiofsds_under(&state).is_empty(),
        "virtiofsd left running"
    );
    let mounts = support::mounts_under(&state);
    assert!(mounts.is_empty(), "left mounted: {mounts:?}");
    assert!(
        !state.join("sandboxes").join(&sandboxes[0]).exists(),
        "sandbox directory left"
    );
    let left = network_leftovers(&sandboxes[0]);
    assert!(left.is_empty(), "network left behind: {left:?}");
}
