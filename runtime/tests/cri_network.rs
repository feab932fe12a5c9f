//! Pod networking end to end: huskd with Debian's CNI plugins (bridge,
//! host-local, loopback, portmap) on a real bridge, pods serving HTTP with
//! busybox httpd, reached from the host by pod IP and through a hostPort,
//! and from each other; DNS settings in the container; and after removal
//! no namespace, lease, iptables rule or veth left.
//!
//! Needs root, scripts/install-deps.sh's packages (containernetworking-plugins,
//! iptables, docker-registry, busybox-static); the microvm case also needs
//! /dev/kvm, the guest image and husk-vmm (see cri_microvm.rs).

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use husk_e2e::microvm::boot_timeout;
use support::{
    container_config, guest_diagnostics, network_leftovers, vmms_under, Huskd, VmReaper,
};

/// An HTTP GET of `/` from `addr`, retried until `patience` runs out (the
/// server may still be starting); the body.
fn http_get(addr: &str, patience: Duration) -> String {
    let deadline = Instant::now() + patience;
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(
                &addr.parse().map_err(std::io::Error::other)?,
                Duration::from_secs(5),
            )?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })();
        match attempt {
            Ok(response) if response.starts_with("HTTP/1.") => {
                return response
                    .split_once("\r\n\r\n")
                    .map(|(_, body)| body.to_owned())
                    .unwrap_or_default();
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "GET http://{addr}/ did not answer: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn pod_config(name: &str, host_port: i32, dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "net".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: dir.join(name).display().to_string(),
        // One in the pod's IPC namespace, one in its network namespace.
        linux: Some(cri::LinuxPodSandboxConfig {
            sysctls: HashMap::from([
                ("kernel.shm_rmid_forced".into(), "1".into()),
                ("net.ipv4.ip_local_port_range".into(), "20000 40000".into()),
            ]),
            ..Default::default()
        }),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.199.0.10".into()],
            searches: vec!["net.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        port_mappings: (host_port > 0)
            .then(|| cri::PortMapping {
                protocol: cri::Protocol::Tcp as i32,
                container_port: 8080,
                host_port,
                host_ip: String::new(),
            })
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// A pod running `httpd` on port 8080 that answers its own name.
struct ServingPod {
    id: String,
    container: String,
    ip: String,
}

async fn serving_pod(
    rt: &mut RuntimeServiceClient<Channel>,
    handler: &str,
    image: &str,
    name: &str,
    host_port: i32,
    dir: &Path,
) -> ServingPod {
    let config = pod_config(name, host_port, dir);
    std::fs::create_dir_all(&config.log_directory).expect("log dir");
    let id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("run pod: {e}\n{}", guest_diagnostics(&dir.join("state"))))
        .into_inner()
        .pod_sandbox_id;
    let script =
        format!("mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p 8080 -h /www");
    let web = container_config("web", image, &["sh", "-c", &script], "web.log");
    let container = support::run_container(rt, &id, web, Some(config)).await;
    let ip = support::pod_status(rt, &id)
        .await
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(
        ip.starts_with(support::TEST_SUBNET_PREFIX),
        "pod {name} has IP {ip:?}, not one from the test network"
    );
    ServingPod { id, container, ip }
}

async fn exec(rt: &mut RuntimeServiceClient<Channel>, container: &str, cmd: &[&str]) -> String {
    let response = support::exec_sync(rt, container, cmd).await;
    assert_eq!(
        response.exit_code,
        0,
        "{cmd:?}: {}",
        String::from_utf8_lossy(&response.stderr)
    );
    String::from_utf8_lossy(&response.stdout).into_owned()
}

/// The host side of the pod's veth: its peer's ifindex, read from inside.
fn host_veth_index(pod_id: &str) -> String {
    let out = support::run(
        "ip",
        &[
            &"-n",
            &format!("husk-{pod_id}"),
            &"-o",
            &"link",
            &"show",
            &"eth0",
        ],
    );
    out.split("@if")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no peer index in {out:?}"))
}

fn link_with_index_exists(index: &str) -> bool {
    support::run("ip", &[&"-o", &"link", &"show"])
        .lines()
        .any(|l| l.split(':').next() == Some(index))
}

/// The host's own address a hostPort is reached on: its first
/// non-loopback IPv4 address, else the test bridge's.
fn host_address() -> String {
    support::run("hostname", &[&"-I"])
        .split_whitespace()
        .find(|a| a.contains('.') && !a.starts_with(support::TEST_SUBNET_PREFIX))
        .unwrap_or(support::TEST_GATEWAY)
        .to_owned()
}

/// Two pods on `handler`: reachable from the host and from each other,
/// one through a hostPort, with the pod's DNS settings; then nothing left.
/// Before pod a is stopped, its namespace is removed behind huskd's back
/// (host handler) or its VMM is killed (microvm handler): what CNI set up
/// must go all the same.
async fn two_pods_talk(handler: &str, patience: Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    // Declared after `dir`, dropped before it: a failing test leaves no
    // agents or VMs.
    let _agents = support::AgentSweeper::new(dir.path());
    let _vms = VmReaper(dir.path().join("state"));
    let (registry, image) = support::busybox_registry("").await;
    let args = match handler {
        "host" => Huskd::host_args(dir.path()),
        "microvm" => Huskd::microvm_args(
            dir.path(),
            &format!(
                "log_level = \"info\"\n[microvm]\nguest_boot_timeout_secs = {}\n",
                boot_timeout().as_secs()
            ),
        ),
        _ => unreachable!("handler {handler}"),
    };
    let mut huskd = Huskd::spawn(&dir.path().join("husk.sock"), &args);
    let channel = huskd.connect().await;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut img = ImageServiceClient::new(channel);
    support::pull(&mut img, &image).await;
    let status = support::runtime_status(&mut rt)
        .await
        .status
        .expect("status");
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.r#type == "NetworkReady" && c.status),
        "{status:?}"
    );

    let host_port = support::free_port() as i32;
    let a = serving_pod(&mut rt, handler, &image, "pod-a", 0, dir.path()).await;
    let b = serving_pod(&mut rt, handler, &image, "pod-b", host_port, dir.path()).await;
    assert_ne!(a.ip, b.ip);

    // Host → pod by IP.
    assert_eq!(http_get(&format!("{}:8080", a.ip), patience), "pod-a\n");
    assert_eq!(http_get(&format!("{}:8080", b.ip), patience), "pod-b\n");
    // Pod → pod.
    let fetched = exec(
        &mut rt,
        &a.container,
        &[
            "busybox",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{}:8080/", b.ip),
        ],
    )
    .await;
    assert_eq!(fetched, "pod-b\n");
    // Host port → pod b.
    let host = host_address();
    assert_eq!(
        http_get(&format!("{host}:{host_port}"), patience),
        "pod-b\n",
        "hostPort {host_port} on {host}"
    );
    // DNS as the pod config says.
    let resolv = exec(&mut rt, &a.container, &["cat", "/etc/resolv.conf"]).await;
    assert!(resolv.contains("nameserver 10.199.0.10"), "{resolv}");
    assert!(
        resolv.contains("search net.svc.cluster.local svc.cluster.local"),
        "{resolv}"
    );
    assert!(resolv.contains("options ndots:5"), "{resolv}");
    let hosts = exec(&mut rt, &a.container, &["cat", "/etc/hosts"]).await;
    assert!(hosts.contains(&a.ip), "{hosts}");
    // The pod's own hostname and sysctls, in its own namespaces.
    assert_eq!(
        exec(&mut rt, &a.container, &["busybox", "hostname"]).await,
        "pod-a\n"
    );
    let sysctls = exec(
        &mut rt,
        &a.container,
        &[
            "cat",
            "/proc/sys/kernel/shm_rmid_forced",
            "/proc/sys/net/ipv4/ip_local_port_range",
        ],
    )
    .await;
    assert_eq!(
        sysctls.split_whitespace().collect::<Vec<_>>(),
        ["1", "20000", "40000"],
        "{sysctls}"
    );
    let host_range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("the host's port range");
    assert_ne!(
        host_range.split_whitespace().collect::<Vec<_>>(),
        ["20000", "40000"],
        "the pod's sysctl changed the host's"
    );

    let veths: Vec<String> = [&a, &b].iter().map(|p| host_veth_index(&p.id)).collect();
    if handler == "host" {
        // Someone removed pod a's namespace: Stop's CNI DEL must cope.
        support::run("ip", &[&"netns", &"del", &format!("husk-{}", a.id)]);
    } else {
        let state = dir.path().join("state");
        let vmm = vmms_under(&state.join("sandboxes").join(&a.id));
        assert_eq!(vmm.len(), 1, "pod a's husk-vmm: {vmm:?}");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(vmm[0] as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill husk-vmm");
    }
    for pod in [&a, &b] {
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("stop pod");
        // Stop again: CNI DEL runs once, the second stop finds nothing to do.
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("stop pod again");
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("remove pod");
        assert_eq!(network_leftovers(&pod.id), Vec::<String>::new());
    }
    for index in veths {
        assert!(
            !link_with_index_exists(&index),
            "the host side of a pod's veth (ifindex {index}) is still there"
        );
    }
    assert!(
        TcpStream::connect_timeout(
            &format!("{host}:{host_port}").parse().expect("addr"),
            Duration::from_secs(2)
        )
        .is_err(),
        "hostPort {host_port} still answers after its pod was removed"
    );
    huskd.terminate();
    drop(registry);
}

#[tokio::test(flavor = "multi_thread")]
async fn host_pods_reach_each_other_the_host_and_host_ports() {
    two_pods_talk("host", Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn microvm_pods_reach_each_other_the_host_and_host_ports() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the microvm driver needs /dev/kvm and mounts: run this as root"
    );
    // Guests run their kernels emulated on PVM hosts: a server in one takes
    // seconds to start and answer.
    two_pods_talk("microvm", Duration::from_secs(300)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_cni_config_the_network_is_not_ready_and_pods_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty-cni");
    std::fs::create_dir_all(&empty).expect("dir");
    let mut args = Huskd::host_args(dir.path());
    let flag = args
        .iter()
        .position(|a| a == "--cni-conf-dir")
        .expect("host_args names a CNI config directory");
    args[flag + 1] = empty.clone().into();
    let mut huskd = Huskd::spawn(&dir.path().join("husk.sock"), &args);
    let mut rt = RuntimeServiceClient::new(huskd.connect().await);
    let status = support::runtime_status(&mut rt)
        .await
        .status
        .expect("status");
    let network = status
        .conditions
        .iter()
        .find(|c| c.r#type == "NetworkReady")
        .expect("NetworkReady");
    assert!(!network.status);
    assert_eq!(network.reason, "NetworkPluginNotReady");
    assert!(
        network.message.contains(&empty.display().to_string()),
        "{network:?}"
    );
    let refused = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("no-net", 0, dir.path())),
            runtime_handler: "host".into(),
        })
        .await
        .expect_err("a pod network cannot be set up");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    let pods = support::list_pods(&mut rt).await;
    assert!(pods.is_empty(), "{pods:?}");
    huskd.terminate();
}
