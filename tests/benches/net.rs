//! Network benchmark: one microVM whose NIC is a tap in a network namespace
//! of its own (the pod network of tests/microvm_net.rs), a busybox container
//! in it, and from the namespace's side:
//!   - ping round trips (busybox ping),
//!   - TCP request/response: 64-byte round trips to `nc -l -e cat`,
//!   - a TCP stream into the guest: up to HUSK_NET_BENCH_BYTES (default
//!     8 MiB) or HUSK_NET_BENCH_SECS (default 120 s) into `nc -l -e wc -c`,
//!     which answers with what it counted once the stream ends,
//!   - a TCP stream out of the guest: HUSK_NET_BENCH_OUT_BYTES (default
//!     2 MiB) from `nc -e head -c N /dev/zero`.
//!
//! Stream times run from the connection to the end, and so include the
//! guest exec'ing its end of it (well under a second here).
//!
//! Figures only, no assertions on them; a guest that does not boot or a
//! byte count that does not match fails the run. On PVM hosts the guest's
//! kernel mode, and with it its whole TCP/IP stack, is emulated: expect low
//! figures there.
//!
//! `cargo bench -p husk-e2e --bench net` (root; needs `guest-image/build.sh`
//! and `cargo build --release --workspace --bins`).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use husk_e2e::guest::Guest;
use husk_e2e::netns::pod::{GUEST_V4, HOST_V4};
use husk_e2e::netns::{
    accept_within, connect_retrying, pod_setup_request, pod_vm_options, TestNetns,
};
use husk_e2e::oci::spec;
use husk_e2e::rootfs::busybox_erofs;
use husk_proto::client::Agent;
use husk_proto::v1;
use serde_json::json;

const ECHO_PORT: u16 = 8081;
const STREAM_PORT: u16 = 8082;
const SINK_PORT: u16 = 9090;
const ROUND_TRIPS: usize = 50;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// `n` 64-byte round trips; their times, sorted.
fn round_trips(addr: SocketAddr, n: usize) -> Result<Vec<Duration>, String> {
    let mut stream = connect_retrying(addr, CONNECT_TIMEOUT)?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut times = Vec::with_capacity(n);
    let mut back = [0u8; 64];
    // Round trip 0 is not counted: it waits for nc to exec cat.
    for i in 0..=n {
        let msg = [i as u8; 64];
        let began = Instant::now();
        stream.write_all(&msg).map_err(|e| e.to_string())?;
        stream
            .read_exact(&mut back)
            .map_err(|e| format!("round trip {i}: {e}"))?;
        if i > 0 {
            times.push(began.elapsed());
        }
        if back != msg {
            return Err(format!("round trip {i}: the echo differs"));
        }
    }
    times.sort();
    Ok(times)
}

/// Streams up to `max` bytes (for at most `secs`) and half-closes; the
/// guest answers with its byte count. Returns (sent, count, time from
/// connect to the answer).
fn stream_in(addr: SocketAddr, max: u64, secs: u64) -> Result<(u64, String, Duration), String> {
    let mut stream = connect_retrying(addr, CONNECT_TIMEOUT)?;
    let began = Instant::now();
    let chunk = vec![0x5au8; 64 << 10];
    let mut sent = 0u64;
    while sent < max && began.elapsed() < Duration::from_secs(secs) {
        let n = chunk.len().min((max - sent) as usize);
        stream
            .write_all(&chunk[..n])
            .map_err(|e| format!("writing after {sent} bytes: {e}"))?;
        sent += n as u64;
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("reading the guest's count: {e}"))?;
    Ok((sent, answer.trim().to_string(), began.elapsed()))
}

/// Accepts one connection and reads it to EOF: (bytes, time from accept).
fn stream_out(listener: TcpListener) -> Result<(u64, Duration), String> {
    let (mut stream, _) = accept_within(&listener, CONNECT_TIMEOUT)?;
    let began = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok((total, began.elapsed())),
            Ok(n) => total += n as u64,
            Err(e) => return Err(format!("reading after {total} bytes: {e}")),
        }
    }
}

async fn start_exec(guest: &Guest, agent: &mut Agent, exec: &str, script: &str) {
    guest
        .rpc(
            &format!("ExecProcess {exec}"),
            agent.exec_process(v1::ExecProcessRequest {
                container_id: "bench".into(),
                exec_id: exec.into(),
                oci_process_json: serde_json::to_vec(&json!({"args": ["sh", "-c", script]}))
                    .expect("json"),
                stdin: false,
                timeout_ms: 0,
            }),
        )
        .await;
}

/// Joins a thread started with `TestNetns::spawn` without blocking the runtime.
async fn join<T: Send + 'static>(
    guest: &Guest,
    what: &str,
    handle: std::thread::JoinHandle<Result<Result<T, String>, String>>,
) -> T {
    match tokio::task::spawn_blocking(move || handle.join()).await {
        Ok(Ok(Ok(Ok(value)))) => value,
        Ok(Ok(Ok(Err(e)) | Err(e))) => guest.fail(what, e),
        Ok(Err(_)) => guest.fail(what, "the thread panicked"),
        Err(e) => guest.fail(what, e),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let in_bytes = husk_e2e::env_number::<u64>("HUSK_NET_BENCH_BYTES", 8 << 20);
    let in_secs = husk_e2e::env_number::<u64>("HUSK_NET_BENCH_SECS", 120);
    let out_bytes = husk_e2e::env_number::<u64>("HUSK_NET_BENCH_OUT_BYTES", 2 << 20);

    let netns = TestNetns::with_pod_tap("husk-netbench").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let image = busybox_erofs(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let (guest, mut agent) = Guest::boot(pod_vm_options(&netns, &image)).await;
    let agent = &mut agent;
    let profile = guest.vm.kvm_kind().label();
    guest
        .rpc(
            "SetupSandbox",
            agent.setup_sandbox(pod_setup_request("bench")),
        )
        .await;
    guest
        .create(agent, "bench", &spec(&["sleep", "3600"], None))
        .await;
    guest.start(agent, "bench").await;

    println!("profile: {profile}");

    // Ping.
    match netns.exec(
        "/bin/busybox",
        &["ping", "-c", "20", "-i", "0.2", "-W", "5", GUEST_V4],
    ) {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let summary = text
                .lines()
                .filter(|l| l.contains("round-trip") || l.contains("packets"));
            println!("ping x20: {}", summary.collect::<Vec<_>>().join("; "));
        }
        Err(e) => guest.fail("ping", e),
    }

    // Request/response.
    start_exec(
        &guest,
        agent,
        "echo",
        &format!("nc -l -p {ECHO_PORT} -e cat"),
    )
    .await;
    let addr: SocketAddr = format!("{GUEST_V4}:{ECHO_PORT}").parse().expect("addr");
    let times = join(
        &guest,
        "round trips",
        netns.spawn(move || round_trips(addr, ROUND_TRIPS)),
    )
    .await;
    let pick = |q: f64| ms(times[((times.len() - 1) as f64 * q).round() as usize]);
    println!(
        "tcp 64-byte round trips x{ROUND_TRIPS}: min {:.2} ms, median {:.2} ms, p90 {:.2} ms, max {:.2} ms",
        pick(0.0),
        pick(0.5),
        pick(0.9),
        pick(1.0)
    );
    guest.wait(agent, "bench", "echo").await;

    // Into the guest.
    start_exec(
        &guest,
        agent,
        "stream-in",
        &format!("nc -l -p {STREAM_PORT} -e wc -c"),
    )
    .await;
    let addr: SocketAddr = format!("{GUEST_V4}:{STREAM_PORT}").parse().expect("addr");
    let (sent, counted, took) = join(
        &guest,
        "stream into the guest",
        netns.spawn(move || stream_in(addr, in_bytes, in_secs)),
    )
    .await;
    if counted != sent.to_string() {
        guest.fail(
            "stream into the guest",
            format!("sent {sent} bytes, the guest counted {counted:?}"),
        );
    }
    println!(
        "tcp stream host -> guest: {sent} bytes in {:.1} s = {:.3} MB/s",
        took.as_secs_f64(),
        mb_per_s(sent, took)
    );
    guest.wait(agent, "bench", "stream-in").await;

    // Out of the guest.
    let listener = join(
        &guest,
        "bind",
        netns.spawn(|| TcpListener::bind((HOST_V4, SINK_PORT)).map_err(|e| e.to_string())),
    )
    .await;
    let received = netns.spawn(move || stream_out(listener));
    start_exec(
        &guest,
        agent,
        "stream-out",
        // head writes to the socket itself: busybox nc would relay through
        // 1 KiB reads and writes, each a syscall (emulated on PVM).
        &format!("nc {HOST_V4} {SINK_PORT} -e head -c {out_bytes} /dev/zero"),
    )
    .await;
    let (got, took) = join(&guest, "stream out of the guest", received).await;
    if got != out_bytes {
        guest.fail(
            "stream out of the guest",
            format!("sent {out_bytes} bytes, {got} arrived"),
        );
    }
    println!(
        "tcp stream guest -> host: {got} bytes in {:.1} s = {:.3} MB/s",
        took.as_secs_f64(),
        mb_per_s(got, took)
    );
    guest.wait(agent, "bench", "stream-out").await;

    let vm = guest.shut_down(agent).await;
    let log = vm.vmm_log_text();
    if log.contains("dropping frames") {
        println!("husk-vmm dropped frames:\n{log}");
    }
    drop(vm);
    drop(netns);
}
