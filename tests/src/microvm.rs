//! A microVM booted with husk's guest image under husk-vmm, watched the way a
//! benchmark needs: every console and VMM log line is timestamped on arrival.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_proto::client::Agent;
use husk_proto::client::{connect_hybrid_vsock, ConnectError};
use husk_proto::v1::PingRequest;
use husk_proto::{vmm_api, AGENT_VSOCK_PORT};

/// What the agent prints first as PID 1, and once it serves.
pub const AGENT_INIT_MARKER: &str = "husk-agent: init";
pub const AGENT_READY_MARKER: &str = "husk-agent ready";
/// What husk-vmm logs just before the first KVM_RUN.
pub const GUEST_ENTERED_MARKER: &str = "guest entered";

/// How long a test waits for a guest to boot to its agent: HUSK_BOOT_TIMEOUT_SECS,
/// default 600 s (a PVM boot takes well over half a minute, more on a busy host).
pub fn boot_timeout() -> Duration {
    Duration::from_secs(crate::env_number("HUSK_BOOT_TIMEOUT_SECS", 600))
}

/// The two kinds of KVM husk is tested on (`../shared/ENVIRONMENT.md`): PVM,
/// where the guest kernel's ring 0 is emulated, and standard KVM (hardware,
/// or the TCG bed of `scripts/test-stdkvm.sh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmKind {
    Pvm,
    Standard,
}

impl KvmKind {
    /// What this machine's /dev/kvm is: PVM when `kvm_pvm` is loaded.
    pub fn of_host() -> Self {
        if husk_runtime::sandbox::microvm::host_is_pvm() {
            Self::Pvm
        } else {
            Self::Standard
        }
    }

    /// The kind this run must exercise: HUSK_EXPECT_KVM (`pvm` or
    /// `standard`; the bed sets it), else the host's.
    pub fn expected() -> Self {
        match std::env::var("HUSK_EXPECT_KVM").as_deref() {
            Ok("pvm") => Self::Pvm,
            Ok("standard") => Self::Standard,
            Ok(other) => panic!("HUSK_EXPECT_KVM={other}: expected `pvm` or `standard`"),
            Err(_) => Self::of_host(),
        }
    }

    /// A short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::Pvm => "pvm",
            Self::Standard => "std-kvm",
        }
    }
}

impl std::fmt::Display for KvmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pvm => "PVM (emulated guest kernel)",
            Self::Standard => "standard KVM",
        })
    }
}

pub struct MicroVmOptions {
    pub mem_mib: u64,
    pub extra_args: Vec<String>,
    /// Run husk-vmm inside this named network namespace (`ip netns exec`),
    /// where its `--net` taps are, as huskd runs it in the pod's.
    pub netns: Option<String>,
}

impl Default for MicroVmOptions {
    fn default() -> Self {
        Self {
            // husk-vmm's own default; on PVM every MiB of guest RAM is also
            // emulated kernel work at boot (initialising its memory map).
            mem_mib: 128,
            extra_args: Vec::new(),
            netns: None,
        }
    }
}

/// Lines seen on a stream, with when each arrived.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

pub struct MicroVm {
    child: Child,
    // Holds the sockets; removed when the VM is dropped.
    dir: tempfile::TempDir,
    pub spawned: Instant,
    pub vsock_uds: PathBuf,
    pub api_sock: PathBuf,
    pub mem_mib: u64,
    console: Lines,
    vmm_log: Lines,
}

/// Boot milestones, each measured from the spawn of husk-vmm.
#[derive(Debug, Clone)]
pub struct BootTimings {
    /// The VMM is about to run the guest's first instruction.
    pub guest_entered: Option<Duration>,
    /// The kernel started init (the agent printed its first line).
    pub init_reached: Option<Duration>,
    /// The agent answered a Ping over vsock.
    pub agent_answered: Duration,
}

impl MicroVm {
    pub fn start(opts: MicroVmOptions) -> Self {
        let (kernel, initrd) = crate::guest_image();
        let dir = tempfile::tempdir().expect("temp dir");
        let vsock_uds = dir.path().join("vsock.sock");
        let api_sock = dir.path().join("api.sock");
        let spawned = Instant::now();
        let vmm = crate::workspace_binary("husk-vmm");
        let mut command = match &opts.netns {
            // `ip netns exec` execs husk-vmm: the child is still husk-vmm.
            Some(netns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns]).arg(&vmm);
                c
            }
            None => Command::new(&vmm),
        };
        let mut child = command
            .arg("run")
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd)
            .arg("--mem-mib")
            .arg(opts.mem_mib.to_string())
            .arg("--vsock-uds")
            .arg(&vsock_uds)
            .arg("--api-sock")
            .arg(&api_sock)
            .args(&opts.extra_args)
            .env("HUSK_LOG", "husk_vmm=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn husk-vmm");
        let console = collect_lines(child.stdout.take().expect("stdout"));
        let vmm_log = collect_lines(child.stderr.take().expect("stderr"));
        Self {
            child,
            dir,
            spawned,
            vsock_uds,
            api_sock,
            mem_mib: opts.mem_mib,
            console,
            vmm_log,
        }
    }

    pub fn console_text(&self) -> String {
        join_lines(&self.console)
    }

    pub fn vmm_log_text(&self) -> String {
        join_lines(&self.vmm_log)
    }

    /// The kind of KVM this VM ran on, from husk-vmm's `pvm=` log line.
    /// Fails the test when it cannot be told, or when it is not the kind
    /// this run must exercise (`KvmKind::expected`): a microVM test never
    /// passes on a kind it did not mean to test.
    pub fn kvm_kind(&self) -> KvmKind {
        let log = self.vmm_log_text();
        let kind = if log.contains("pvm=true") {
            KvmKind::Pvm
        } else if log.contains("pvm=false") {
            KvmKind::Standard
        } else {
            panic!("husk-vmm did not say whether it used its PVM profile\n{log}");
        };
        let expected = KvmKind::expected();
        assert_eq!(
            kind, expected,
            "this guest ran on {kind}, but this run must exercise {expected} (HUSK_EXPECT_KVM)"
        );
        kind
    }

    fn first_line_with(lines: &Lines, needle: &str) -> Option<Instant> {
        lines
            .lock()
            .ok()?
            .iter()
            .find(|(_, line)| line.contains(needle))
            .map(|(at, _)| *at)
    }

    /// Polls the agent over vsock until it answers a Ping, or fails with the
    /// console's tail when the VMM exits or `timeout` passes.
    pub async fn wait_for_agent(
        &mut self,
        timeout: Duration,
    ) -> Result<(Agent, BootTimings), String> {
        let deadline = Instant::now() + timeout;
        let mut last_error: Option<ConnectError> = None;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "husk-vmm exited ({status}) before the agent answered\n{}",
                    self.diagnostics()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the agent did not answer within {timeout:?} (last attempt: {})\n{}",
                    last_error.map_or("none".into(), |e| e.to_string()),
                    self.diagnostics()
                ));
            }
            if self.vsock_uds.exists() {
                match connect_hybrid_vsock(&self.vsock_uds, AGENT_VSOCK_PORT).await {
                    Ok(mut client) => {
                        if client.ping(PingRequest {}).await.is_ok() {
                            let answered = self.spawned.elapsed();
                            let since_spawn = |at: Instant| at.duration_since(self.spawned);
                            let timings = BootTimings {
                                guest_entered: Self::first_line_with(
                                    &self.vmm_log,
                                    GUEST_ENTERED_MARKER,
                                )
                                .map(since_spawn),
                                init_reached: Self::first_line_with(
                                    &self.console,
                                    AGENT_INIT_MARKER,
                                )
                                .map(since_spawn),
                                agent_answered: answered,
                            };
                            return Ok((client, timings));
                        }
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for husk-vmm to exit; kills it and fails after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = self.child.kill();
                    return Err(format!(
                        "husk-vmm did not exit within {timeout:?}\n{}",
                        self.diagnostics()
                    ));
                }
                Err(e) => return Err(format!("cannot wait for husk-vmm: {e}")),
            }
        }
    }

    /// Waits (2 minutes at most) for husk-vmm to exit after the guest was
    /// asked to shut down; fails unless it exits with 0.
    pub fn expect_clean_exit(&mut self) {
        let status = self
            .wait_exit(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            status.code(),
            Some(0),
            "a guest shut down by its agent exits husk-vmm with 0\n{}",
            self.diagnostics()
        );
    }

    /// The VMM process's resident memory that is not guest RAM, in KiB: the
    /// sum of Rss over its mappings except the guest memory mapping itself.
    pub fn vmm_overhead_rss_kib(&self) -> Option<u64> {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", self.child.id())).ok()?;
        let guest_bytes = self.mem_mib << 20;
        let mut total = 0u64;
        let mut in_guest_ram = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, end)) = range.split_once('-') {
                    if let (Ok(start), Ok(end)) =
                        (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
                    {
                        in_guest_ram = end - start == guest_bytes;
                        continue;
                    }
                }
            }
            if let Some(rest) = line.strip_prefix("Rss:") {
                if !in_guest_ram {
                    total += rest
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()?;
                }
            }
        }
        Some(total)
    }

    /// One request to the VMM's control API; its `ok` reply, or why not.
    pub fn api(&self, request: &vmm_api::Request) -> Result<vmm_api::Reply, String> {
        vmm_api::call(&self.api_sock, request, None, Duration::from_secs(10))
            .map_err(|e| e.to_string())
    }

    /// Waits until the console shows a line containing `needle`.
    pub async fn wait_for_console(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.console_text().contains(needle) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "the console never showed {needle:?} within {timeout:?}\n{}",
            self.diagnostics()
        ))
    }

    pub fn diagnostics(&self) -> String {
        let console = self.console_text();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        format!(
            "--- husk-vmm log ---\n{}--- guest console (last 40 lines) ---\n{}",
            self.vmm_log_text(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect_lines(stream: impl Read + Send + 'static) -> Lines {
    let lines: Lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            if let Ok(mut l) = sink.lock() {
                l.push((Instant::now(), line));
            }
            buf.clear();
        }
    });
    lines
}

fn join_lines(lines: &Lines) -> String {
    lines
        .lock()
        .map(|l| l.iter().map(|(_, s)| format!("{s}\n")).collect())
        .unwrap_or_default()
}
