//! Pod networking inside a real microVM. A network namespace of the test's
//! own stands in for the pod's: a persistent tap in it (tap0, 10.200.0.1/24
//! and fd00:200::1/64), husk-vmm run inside it with `--net tap=tap0,...`, and
//! the agent told through SetupSandbox to give the guest's interface (found
//! by its MAC) 10.200.0.2/24 and fd00:200::2/64 with default routes through
//! the tap's addresses. Then, from the namespace: the guest answers pings
//! (IPv4 and IPv6), a busybox container in the guest serves a known payload
//! over TCP that the host side reads whole, and the container sends one to an
//! address that only the default route reaches. One boot for all of it; a
//! guest that does not boot fails the test. Namespace, tap and VMM are gone
//! afterwards, whatever happened.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use husk_e2e::guest::{process, Guest};
use husk_e2e::netns::pod::{BEYOND_GATEWAY, GUEST_MAC, GUEST_V4, GUEST_V6};
use husk_e2e::netns::{
    accept_within, connect_retrying, pod_setup_request, pod_vm_options, read_all, TestNetns,
};
use husk_e2e::oci::spec;
use husk_e2e::rootfs::busybox_erofs;
use husk_proto::v1;
use serde_json::json;

const SERVE_PORT: u16 = 8080;
const SINK_PORT: u16 = 9090;
const NET_TIMEOUT: Duration = Duration::from_secs(120);

/// What `seq 1 N` prints.
fn seq(n: u32) -> Vec<u8> {
    (1..=n)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

/// Connects (retrying while the guest's listener is not up yet) and reads to EOF.
fn fetch(addr: SocketAddr) -> Result<Vec<u8>, String> {
    let mut stream = connect_retrying(addr, NET_TIMEOUT)?;
    read_all(&mut stream, NET_TIMEOUT)
}

/// Accepts one connection on `listener` and reads it to EOF.
fn sink(listener: TcpListener) -> Result<(Vec<u8>, SocketAddr), String> {
    let (mut stream, peer) = accept_within(&listener, NET_TIMEOUT)?;
    Ok((read_all(&mut stream, NET_TIMEOUT)?, peer))
}

fn ping_summary(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.contains("packets") || l.contains("round-trip"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_network_inside_a_microvm() {
    let began = Instant::now();

    // The pod's namespace: its end of the tap, and an address beyond it.
    let netns = TestNetns::with_pod_tap("husk-nettest").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let image = busybox_erofs(dir.path()).unwrap_or_else(|e| panic!("{e}"));

    let (guest, mut agent) = Guest::boot(pod_vm_options(&netns, &image)).await;
    let agent = &mut agent;

    // 1. The guest's interface, found by its MAC (in capitals here), gets
    // the pod's addresses.
    let mut request = pod_setup_request("pod");
    request.interfaces[0].mac = GUEST_MAC.to_uppercase();
    guest
        .rpc(
            "SetupSandbox with an interface and default routes",
            agent.setup_sandbox(v1::SetupSandboxRequest {
                hostname: "husk-net".into(),
                ..request
            }),
        )
        .await;
    // An unknown MAC is refused, naming it.
    let unknown = agent
        .setup_sandbox(v1::SetupSandboxRequest {
            sandbox_id: "pod".into(),
            interfaces: vec![v1::NetworkInterface {
                mac: "02:00:00:00:00:99".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await;
    match unknown {
        Err(status)
            if status.code() == tonic::Code::InvalidArgument
                && status.message().contains("02:00:00:00:00:99") => {}
        other => guest.fail("SetupSandbox with an unknown MAC", format!("{other:?}")),
    }

    // 2. Pings from the pod's namespace.
    for (step, args) in [
        ("ping", ["ping", "-c", "3", "-W", "5", GUEST_V4]),
        ("ping6", ["ping6", "-c", "3", "-W", "5", GUEST_V6]),
    ] {
        let began = Instant::now();
        match netns.exec("/bin/busybox", &args) {
            Ok(out) => eprintln!("  {step}: {} ({:.1?})", ping_summary(&out), began.elapsed()),
            Err(e) => guest.fail(step, e),
        }
    }

    // 3. A container in the guest's network namespace (the spec asks for none of its own).
    let c1 = "c1";
    guest
        .create(agent, c1, &spec(&["sleep", "600"], None))
        .await;
    guest.start(agent, c1).await;

    // Host side ← guest: a known payload served by `nc -l`, read whole.
    let step = "host fetches from the guest";
    let payload = seq(100_000);
    let phase = Instant::now();
    guest
        .rpc(
            "ExecProcess c1/serve",
            agent.exec_process(v1::ExecProcessRequest {
                container_id: c1.into(),
                exec_id: "serve".into(),
                oci_process_json: serde_json::to_vec(&json!({"args": [
                    "sh", "-c", format!("seq 1 100000 | nc -l -p {SERVE_PORT}")
                ]}))
                .expect("json"),
                stdin: false,
                timeout_ms: 0,
            }),
        )
        .await;
    let addr: SocketAddr = format!("{GUEST_V4}:{SERVE_PORT}").parse().expect("addr");
    let fetched = netns.spawn(move || fetch(addr));
    let fetched = tokio::task::spawn_blocking(move || fetched.join())
        .await
        .expect("join")
        .expect("the fetching thread")
        .and_then(|r| r);
    match fetched {
        Ok(data) => guest.check_eq(
            step,
            "bytes (length, equal)",
            (data.len(), data == payload),
            (payload.len(), true),
        ),
        Err(e) => guest.fail(step, e),
    }
    let exit = guest.wait(agent, c1, "serve").await;
    guest.check_eq(step, "nc's exit code", exit.exit_code, 0);
    eprintln!(
        "  {step}: {} bytes in {:.1?}",
        payload.len(),
        phase.elapsed()
    );

    // Guest → host side, through the default route.
    let step = "the guest sends beyond its gateway";
    let payload = seq(50_000);
    let phase = Instant::now();
    let listener = netns
        .spawn(|| TcpListener::bind((BEYOND_GATEWAY, SINK_PORT)))
        .join()
        .expect("the binding thread")
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("bind {BEYOND_GATEWAY}:{SINK_PORT}: {e}"));
    let received = netns.spawn(move || sink(listener));
    let (out, err, exit) = guest
        .exec(
            agent,
            c1,
            "send",
            json!({"args": ["sh", "-c", format!("seq 1 50000 | nc {BEYOND_GATEWAY} {SINK_PORT}")]}),
        )
        .await;
    guest.check_eq(
        step,
        "(stdout, stderr, exit code)",
        (out.as_str(), err.as_str(), exit.exit_code),
        ("", "", 0),
    );
    let received = tokio::task::spawn_blocking(move || received.join())
        .await
        .expect("join")
        .expect("the receiving thread")
        .and_then(|r| r);
    match received {
        Ok((data, peer)) => {
            guest.check_eq(
                step,
                "bytes (length, equal)",
                (data.len(), data == payload),
                (payload.len(), true),
            );
            guest.check_eq(step, "peer", peer.ip().to_string(), GUEST_V4.to_string());
        }
        Err(e) => guest.fail(step, e),
    }
    eprintln!(
        "  {step}: {} bytes in {:.1?}",
        payload.len(),
        phase.elapsed()
    );

    // The guest's view: its interface and routes as the agent set them.
    let (out, _, _) = guest
        .exec(
            agent,
            c1,
            "show",
            json!({"args": ["sh", "-c", "ip addr show eth0; ip route; ip -6 route"]}),
        )
        .await;
    let step = "ip addr / ip route in the guest";
    for want in [
        "mtu 1500",
        GUEST_MAC,
        "inet 10.200.0.2/24",
        "inet6 fd00:200::2/64",
        "default via 10.200.0.1 dev eth0",
        "default via fd00:200::1 dev eth0",
    ] {
        guest.check(step, out.contains(want), format!("no {want:?} in:\n{out}"));
    }

    guest
        .rpc(
            "SignalProcess c1 SIGKILL",
            agent.signal_process(v1::SignalProcessRequest {
                process: Some(process(c1, "")),
                signal: 9,
            }),
        )
        .await;
    guest.wait(agent, c1, "").await;
    guest.remove(agent, c1).await;

    let vm = guest.shut_down(agent).await;
    let log = vm.vmm_log_text();
    assert!(
        log.contains("virtio-net attached to its tap"),
        "husk-vmm did not attach the tap:\n{log}"
    );
    if log.contains("dropping frames") {
        eprintln!("husk-vmm dropped frames:\n{log}");
    }
    drop(vm);
    drop(netns);
    eprintln!("whole test: {:?}", began.elapsed());
}
