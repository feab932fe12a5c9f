//! A named network namespace of a test's own, standing in for a pod's: taps
//! and addresses are set up in it with `ip`, husk-vmm runs in it
//! (`MicroVmOptions::netns`), and the test's host-side sockets are opened
//! from a thread that has joined it. Deleted on drop, with everything in it;
//! namespaces left by test processes that were killed are deleted by the
//! next one.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use husk_proto::v1;
use nix::sched::{setns, CloneFlags};

use crate::microvm::MicroVmOptions;

const NETNS_DIR: &str = "/run/netns";

pub struct TestNetns {
    name: String,
}

fn run(command: &mut Command) -> Result<Output, String> {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{shown} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(output)
}

/// The pod network of the microVM network tests and benchmarks: the guest's
/// NIC on `TAP` in the namespace, the namespace's side of the tap as the
/// gateway, and an address beyond it that only a default route reaches.
pub mod pod {
    pub const TAP: &str = "tap0";
    pub const GUEST_MAC: &str = "02:48:55:53:4b:01";
    pub const HOST_V4: &str = "10.200.0.1";
    pub const GUEST_V4: &str = "10.200.0.2";
    pub const HOST_V6: &str = "fd00:200::1";
    pub const GUEST_V6: &str = "fd00:200::2";
    /// On the namespace's `lo`, not on the tap's subnet.
    pub const BEYOND_GATEWAY: &str = "10.201.0.1";

    /// husk-vmm's option for the guest's NIC.
    pub fn net_arg() -> String {
        format!("tap={TAP},mac={GUEST_MAC}")
    }
}

/// husk-vmm run inside `netns` with the `pod` NIC and `image` as its
/// read-only first disk.
pub fn pod_vm_options(netns: &TestNetns, image: &Path) -> MicroVmOptions {
    MicroVmOptions {
        extra_args: vec![
            "--disk".into(),
            format!("{}:ro", image.display()),
            "--net".into(),
            pod::net_arg(),
        ],
        netns: Some(netns.name().into()),
        ..MicroVmOptions::default()
    }
}

/// Connects to `addr`, retrying while nothing listens there yet (a guest
/// process may still be starting), for at most `timeout`.
pub fn connect_retrying(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() > deadline => return Err(format!("connect {addr}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Accepts one connection within `timeout`; the stream blocks.
pub fn accept_within(
    listener: &TcpListener,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok((stream, peer));
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("no connection within {timeout:?}: {e}")),
        }
    }
}

/// Reads `stream` to its end; fails if no data comes for `timeout`.
pub fn read_all(stream: &mut TcpStream, timeout: Duration) -> Result<Vec<u8>, String> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut data = Vec::new();
    stream
        .read_to_end(&mut data)
        .map_err(|e| format!("reading after {} bytes: {e}", data.len()))?;
    Ok(data)
}

/// What huskd asks the agent for after CNI gave the pod its addresses: the
/// NIC found by its MAC, /24 and /64, default routes through the tap's side.
pub fn pod_setup_request(sandbox_id: &str) -> v1::SetupSandboxRequest {
    v1::SetupSandboxRequest {
        sandbox_id: sandbox_id.into(),
        interfaces: vec![v1::NetworkInterface {
            name: String::new(),
            mac: pod::GUEST_MAC.into(),
            addresses: vec![
                format!("{}/24", pod::GUEST_V4),
                format!("{}/64", pod::GUEST_V6),
            ],
            mtu: 1500,
        }],
        routes: vec![
            v1::Route {
                gateway: pod::HOST_V4.into(),
                ..Default::default()
            },
            v1::Route {
                gateway: pod::HOST_V6.into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

impl TestNetns {
    /// A namespace as `create` makes it, with the persistent tap of the
    /// `pod` network in it, up, and the host-side addresses.
    pub fn with_pod_tap(prefix: &str) -> Result<TestNetns, String> {
        let netns = TestNetns::create(prefix)?;
        let (tap, v4, v6) = (
            pod::TAP,
            format!("{}/24", pod::HOST_V4),
            format!("{}/64", pod::HOST_V6),
        );
        let beyond = format!("{}/32", pod::BEYOND_GATEWAY);
        for args in [
            &["tuntap", "add", "dev", tap, "mode", "tap"][..],
            &["addr", "add", &v4, "dev", tap],
            // Usable at once, without duplicate address detection.
            &["addr", "add", &v6, "dev", tap, "nodad"],
            &["addr", "add", &beyond, "dev", "lo"],
            &["link", "set", tap, "up"],
        ] {
            netns.ip(args)?;
        }
        Ok(netns)
    }

    /// Creates `<prefix>-<pid>` with its `lo` up, after deleting the
    /// `<prefix>-<pid>` namespaces of processes that no longer exist.
    pub fn create(prefix: &str) -> Result<TestNetns, String> {
        if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let stale = name
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
                if stale {
                    let _ = run(Command::new("ip").args(["netns", "delete", &name]));
                }
            }
        }
        let name = format!("{prefix}-{}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let netns = TestNetns { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(drop)
    }

    /// Runs `program ARGS...` inside the namespace; its output, or why it failed.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args))
    }

    /// Runs `f` on a thread of its own that has joined the namespace, so
    /// that the sockets it opens are the namespace's.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T, String>> {
        let path = Path::new(NETNS_DIR).join(&self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            setns(ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("cannot join {}: {e}", path.display()))?;
            Ok(f())
        })
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("ip").args(["netns", "delete", &self.name])) {
            eprintln!("{e}");
        }
    }
}
