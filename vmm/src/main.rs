//! The `husk-vmm` command: `husk-vmm run --kernel K --initrd I ...`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use husk_vmm::config::{
    DiskConfig, FsConfig, NetConfig, PvmMode, VmConfig, VsockConfig, DEFAULT_CMDLINE,
    DEFAULT_GUEST_CID, DEFAULT_MEM_MIB,
};
use husk_vmm::jail::JailConfig;
use husk_vmm::{Outcome, Vmm};

#[derive(Parser)]
#[command(name = "husk-vmm", version, about = "Runs one KVM microVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and run it until it shuts down.
    ///
    /// Exit status: 0 when the guest shut down (or the API asked), 1 when the
    /// VM could not be built, 2 when the guest died (panic, triple fault, an
    /// instruction KVM could not run), 3 when a device's backend went away
    /// (a virtio-fs backend closed its socket).
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest kernel: an uncompressed ELF vmlinux.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk (cpio, optionally compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line; device declarations (and on PVM hosts the PVM
    /// switches) are appended to it.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    mem_mib: u64,
    /// Number of vCPUs (1 on PVM hosts; up to 64 on standard KVM).
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Host unix socket bridged to the guest's vsock (CONNECT <port> protocol).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock context id.
    #[arg(long, default_value_t = DEFAULT_GUEST_CID)]
    vsock_cid: u64,
    /// A virtio-blk disk, PATH or PATH:ro; repeatable, in guest order.
    #[arg(long = "disk")]
    disks: Vec<DiskConfig>,
    /// A virtio-net device on an existing tap in husk-vmm's network namespace:
    /// tap=NAME,mac=AA:BB:CC:DD:EE:FF[,mtu=N] (mtu defaults to 1500);
    /// repeatable, in guest order (eth0, eth1, ...).
    #[arg(long = "net")]
    nets: Vec<NetConfig>,
    /// A virtio-fs device served by a vhost-user backend (virtiofsd) already
    /// listening on SOCKET: tag=NAME,socket=SOCKET; repeatable. The guest
    /// mounts it with `mount -t virtiofs NAME DIR`. Guest memory is then
    /// shared with the backend.
    #[arg(long = "fs")]
    fs: Vec<FsConfig>,
    /// Empty read-only disk slots after the --disk ones, for attach_disk later.
    #[arg(long, default_value_t = 0)]
    spare_disks: usize,
    /// Write the guest console here instead of stdout.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Serve the control API on this unix socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Run with the PVM profile: auto-detected, or forced on/off.
    #[arg(long, value_enum, default_value_t = PvmMode::Auto)]
    pvm: PvmMode,
    /// Run without the seccomp filters (for debugging a refused system
    /// call; huskd never passes it).
    #[arg(long)]
    no_seccomp: bool,
    /// Once the VM is built, confine husk-vmm: new mount, IPC and UTS
    /// namespaces with this (empty) directory as its whole, read-only, file
    /// system; rlimits; then --uid and --gid. Disks attached later must come
    /// as file descriptors over the control API, and guest connections to
    /// host vsock ports are refused.
    #[arg(long, requires_all = ["uid", "gid"])]
    jail: Option<PathBuf>,
    /// The (non-root) user id the jailed VMM runs as.
    #[arg(long, requires = "jail")]
    uid: Option<u32>,
    /// The (non-root) group id the jailed VMM runs as.
    #[arg(long, requires = "jail")]
    gid: Option<u32>,
}

impl From<RunArgs> for VmConfig {
    fn from(a: RunArgs) -> Self {
        VmConfig {
            kernel: a.kernel,
            initrd: a.initrd,
            cmdline: a.cmdline,
            mem_mib: a.mem_mib,
            vcpus: a.vcpus,
            vsock: a.vsock_uds.map(|uds_path| VsockConfig {
                uds_path,
                guest_cid: a.vsock_cid,
            }),
            disks: a.disks,
            nets: a.nets,
            fs: a.fs,
            spare_disks: a.spare_disks,
            console_log: a.console_log,
            api_sock: a.api_sock,
            pvm: a.pvm,
            seccomp: !a.no_seccomp,
            jail: a.jail.map(|root| JailConfig {
                root,
                uid: a.uid.unwrap_or_default(),
                gid: a.gid.unwrap_or_default(),
            }),
        }
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
                .unwrap_or_else(|_| "husk_vmm=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let Command::Run(args) = Cli::parse().command;
    let config = VmConfig::from(args);
    let result = Vmm::build(&config, started).and_then(Vmm::run);
    match result {
        Ok(Outcome::Shutdown) => {
            tracing::info!("guest shut down");
            ExitCode::SUCCESS
        }
        Ok(outcome) => {
            match &outcome {
                Outcome::GuestDied(why) => eprintln!("husk-vmm: guest died: {why}"),
                Outcome::DeviceFailed(why) => eprintln!("husk-vmm: device failed: {why}"),
                Outcome::Shutdown => {}
            }
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => {
            eprintln!("husk-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}
