//! huskd's configuration: `/etc/husk/config.toml` (every key optional), with
//! command-line flags overriding it.
//!
//! ```toml
//! listen = "unix:///run/husk/husk.sock"
//! root = "/var/lib/husk"
//! state = "/run/husk"
//! default_runtime = "microvm"         # the handler for runtime_handler ""
//! guest_kernel = "/usr/lib/husk/vmlinux"
//! guest_initrd = "/usr/lib/husk/initramfs.cpio.gz"
//! guest_vcpus = 1                     # a pod without a CPU limit
//! guest_mem_mib = 128                 # a pod without a memory limit
//! guest_base_vcpus = 0                # added to ceil(CPU limit), unless the pod has an overhead
//! guest_base_mem_mib = 64             # added to the memory limit, unless the pod has an overhead
//! guest_max_vcpus = 2                 # default: the host's CPUs, at most 16
//! guest_max_mem_mib = 8192
//! guest_cmdline = "console=ttyS0 reboot=k panic=-1 loglevel=7"  # default: husk-vmm's
//! guest_boot_timeout_secs = 120
//! agent_timeout_secs = 30             # each call into a pod's agent; a silent guest's pod goes NOTREADY
//! husk_vmm = "/usr/bin/husk-vmm"      # default: next to huskd
//! husk_agent = "/usr/bin/husk-agent"  # default: next to huskd
//! virtiofsd = "/usr/libexec/virtiofsd" # default: on $PATH, else this
//! microvm_jail = true                 # husk-vmm confines itself: namespaces, empty root, own uid
//! microvm_jail_first_id = 3000000000  # jailed VMMs run as uid = gid = this + n, one n per pod
//! log_level = "info"
//! cni_conf_dir = "/etc/cni/net.d"     # the first *.conflist/*.conf/*.json wins
//! cni_bin_dir = "/usr/lib/cni"
//! streaming_listen = "127.0.0.1:0"    # exec and port-forward; port 0 = any free one
//! streaming_token_ttl_secs = 60       # how long a streaming URL stays usable
//!
//! [registry.hosts."docker.io"]
//! mirrors = ["https://mirror.example.com"]
//! ```

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use husk_proto::client::DEFAULT_CALL_DEADLINE;
use serde::Deserialize;

use crate::image::RegistryConfig;
use crate::network::{Network, DEFAULT_CNI_BIN_DIR, DEFAULT_CNI_CONF_DIR};
use crate::sandbox::microvm::{
    default_virtiofsd, JailIds, DEFAULT_BOOT_TIMEOUT, DEFAULT_GUEST_INITRD, DEFAULT_GUEST_KERNEL,
    DEFAULT_JAIL_FIRST_ID,
};
use crate::sandbox::sizing::VmSizing;
use crate::sandbox::{longest_socket_path, MAX_SOCKET_PATH};
use crate::streaming::DEFAULT_TOKEN_TTL;

pub const DEFAULT_CONFIG_FILE: &str = "/etc/husk/config.toml";
pub const DEFAULT_LISTEN: &str = "unix:///run/husk/husk.sock";
pub const DEFAULT_ROOT: &str = "/var/lib/husk";
pub const DEFAULT_STATE: &str = "/run/husk";
/// The streaming server (exec, port-forward): loopback, any free
/// port, as containerd's default. Its URLs carry the port it got.
pub const DEFAULT_STREAMING_LISTEN: &str = "127.0.0.1:0";

/// huskd: the husk CRI server (RuntimeService and ImageService on a unix socket).
#[derive(Debug, Default, Parser)]
#[command(name = "huskd", version)]
pub struct Cli {
    /// Where to serve CRI: unix://PATH [default: unix:///run/husk/husk.sock].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Persistent data: images, state database [default: /var/lib/husk].
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Runtime state: sandboxes' sockets and directories [default: /run/husk].
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// The sandbox driver for pods whose runtime handler is "" (hostNetwork
    /// pods always get "host") [default: microvm].
    #[arg(long, value_name = "HANDLER")]
    pub default_runtime: Option<String>,
    /// The guest kernel the microvm driver boots [default: /usr/lib/husk/vmlinux].
    #[arg(long, value_name = "PATH")]
    pub guest_kernel: Option<PathBuf>,
    /// The guest initramfs the microvm driver boots
    /// [default: /usr/lib/husk/initramfs.cpio.gz].
    #[arg(long, value_name = "PATH")]
    pub guest_initrd: Option<PathBuf>,
    /// vCPUs of a microvm pod without a CPU limit [default: 1].
    #[arg(long, value_name = "N")]
    pub guest_vcpus: Option<u8>,
    /// Guest RAM of a microvm pod without a memory limit, in MiB [default: 128].
    #[arg(long, value_name = "MIB")]
    pub guest_mem_mib: Option<u64>,
    /// vCPUs added to a pod's ceil(CPU limit) when kubelet sends no pod
    /// overhead [default: 0].
    #[arg(long, value_name = "N")]
    pub guest_base_vcpus: Option<u8>,
    /// MiB added to a pod's memory limit when kubelet sends no pod overhead
    /// (the guest kernel and agent) [default: 64].
    #[arg(long, value_name = "MIB")]
    pub guest_base_mem_mib: Option<u64>,
    /// The most vCPUs a pod's VM gets [default: the host's CPUs, at most 16].
    #[arg(long, value_name = "N")]
    pub guest_max_vcpus: Option<u8>,
    /// The most RAM a pod's VM gets, in MiB [default: 8192].
    #[arg(long, value_name = "MIB")]
    pub guest_max_mem_mib: Option<u64>,
    /// The guest kernel's command line [default: husk-vmm's, which is quiet].
    #[arg(long, value_name = "CMDLINE")]
    pub guest_cmdline: Option<String>,
    /// How long a microvm pod's guest has to boot to its agent [default: 120].
    #[arg(long, value_name = "SECS")]
    pub guest_boot_timeout_secs: Option<u64>,
    /// How long each call into a pod's agent may take, and a ready pod's
    /// agent has to answer huskd's health check, in seconds [default: 30].
    #[arg(long, value_name = "SECS")]
    pub agent_timeout_secs: Option<u64>,
    /// husk-vmm [default: next to huskd].
    #[arg(long, value_name = "PATH")]
    pub husk_vmm: Option<PathBuf>,
    /// husk-agent, which the host driver runs [default: next to huskd].
    #[arg(long, value_name = "PATH")]
    pub husk_agent: Option<PathBuf>,
    /// virtiofsd, which serves each microvm pod's volumes [default: on
    /// $PATH, else /usr/libexec/virtiofsd].
    #[arg(long, value_name = "PATH")]
    pub virtiofsd: Option<PathBuf>,
    /// Whether husk-vmm confines itself before its guest runs (new mount,
    /// IPC and UTS namespaces, an empty read-only root, rlimits, a uid and
    /// gid of its own per pod) [default: true].
    #[arg(long, value_name = "BOOL")]
    pub microvm_jail: Option<bool>,
    /// The first of the 65536 uids (and gids) jailed VMMs run as, one per
    /// pod [default: 3000000000].
    #[arg(long, value_name = "ID")]
    pub microvm_jail_first_id: Option<u32>,
    /// The configuration file; a missing default file is fine, a missing
    /// named one is an error [default: /etc/husk/config.toml].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log filter (tracing's EnvFilter syntax, e.g. "info" or "husk_runtime=debug").
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Where pod networks are configured: the first *.conflist, *.conf or
    /// *.json by name [default: /etc/cni/net.d].
    #[arg(long, value_name = "DIR")]
    pub cni_conf_dir: Option<PathBuf>,
    /// Where the CNI plugins are [default: /usr/lib/cni].
    #[arg(long, value_name = "DIR")]
    pub cni_bin_dir: Option<PathBuf>,
    /// Where the streaming server (exec, port-forward) listens:
    /// IP:PORT, port 0 for any free one [default: 127.0.0.1:0].
    #[arg(long, value_name = "IP:PORT")]
    pub streaming_listen: Option<String>,
    /// How long a streaming URL stays usable, in seconds [default: 60].
    #[arg(long, value_name = "SECS")]
    pub streaming_token_ttl_secs: Option<u64>,
}

/// The config file's shape; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub root: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub default_runtime: Option<String>,
    pub guest_kernel: Option<PathBuf>,
    pub guest_initrd: Option<PathBuf>,
    pub guest_vcpus: Option<u8>,
    pub guest_mem_mib: Option<u64>,
    pub guest_base_vcpus: Option<u8>,
    pub guest_base_mem_mib: Option<u64>,
    pub guest_max_vcpus: Option<u8>,
    pub guest_max_mem_mib: Option<u64>,
    pub guest_cmdline: Option<String>,
    pub guest_boot_timeout_secs: Option<u64>,
    pub agent_timeout_secs: Option<u64>,
    pub husk_vmm: Option<PathBuf>,
    pub husk_agent: Option<PathBuf>,
    pub virtiofsd: Option<PathBuf>,
    pub microvm_jail: Option<bool>,
    pub microvm_jail_first_id: Option<u32>,
    pub log_level: Option<String>,
    pub cni_conf_dir: Option<PathBuf>,
    pub cni_bin_dir: Option<PathBuf>,
    pub streaming_listen: Option<String>,
    pub streaming_token_ttl_secs: Option<u64>,
    #[serde(default)]
    pub registry: RegistryConfig,
}

/// The settings huskd runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The CRI socket's path.
    pub listen: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    /// The handler ("microvm" or "host") for runtime handler "".
    pub default_runtime: String,
    pub guest_kernel: PathBuf,
    pub guest_initrd: PathBuf,
    /// How big each pod's VM is (`sandbox::sizing`).
    pub guest_sizing: VmSizing,
    /// None: husk-vmm's default command line.
    pub guest_cmdline: Option<String>,
    pub guest_boot_timeout: Duration,
    /// Each call into an agent, and a ready pod's health check.
    pub agent_timeout: Duration,
    pub husk_vmm: PathBuf,
    pub husk_agent: PathBuf,
    pub virtiofsd: PathBuf,
    /// None: husk-vmm runs unconfined.
    pub microvm_jail: Option<JailIds>,
    pub log_level: String,
    pub registry: RegistryConfig,
    pub network: Network,
    /// The streaming server's address.
    pub streaming_listen: SocketAddr,
    /// How long a streaming URL stays usable.
    pub streaming_token_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("listen address {0:?}: expected unix://PATH with an absolute path")]
    Listen(String),
    #[error("streaming_listen {0:?}: expected IP:PORT, e.g. 127.0.0.1:10010")]
    StreamingListen(String),
    #[error("default_runtime {0:?}: expected \"microvm\" or \"host\"")]
    DefaultRuntime(String),
    #[error("agent_timeout_secs must be at least 1")]
    AgentTimeout,
    #[error(
        "state directory {state}: its sandboxes' sockets would be {len} bytes long \
         (e.g. {example}), over the {max}-byte limit of a unix socket path; \
         choose a shorter --state"
    )]
    StateTooLong {
        state: PathBuf,
        example: PathBuf,
        len: usize,
        max: usize,
    },
    #[error("cannot find huskd's own executable to look for {what} next to it: {source}")]
    OwnExe {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl Config {
    /// Reads the config file (the named one, or the default one if it
    /// exists) and lays the flags over it.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                read_file(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => FileConfig::default(),
        };
        Config::merge(cli, file)
    }

    /// Flags first, then the file, then the defaults.
    pub fn merge(cli: &Cli, file: FileConfig) -> Result<Config, ConfigError> {
        let listen = cli
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = parse_listen(&listen)?;
        let beside_me = |what: &'static str| -> Result<PathBuf, ConfigError> {
            let exe =
                std::env::current_exe().map_err(|source| ConfigError::OwnExe { what, source })?;
            Ok(exe.with_file_name(what))
        };
        let husk_vmm = match cli.husk_vmm.clone().or(file.husk_vmm) {
            Some(p) => p,
            None => beside_me("husk-vmm")?,
        };
        let husk_agent = match cli.husk_agent.clone().or(file.husk_agent) {
            Some(p) => p,
            None => beside_me("husk-agent")?,
        };
        let default_runtime = cli
            .default_runtime
            .clone()
            .or(file.default_runtime)
            .unwrap_or_else(|| "microvm".into());
        if !matches!(default_runtime.as_str(), "microvm" | "host") {
            return Err(ConfigError::DefaultRuntime(default_runtime));
        }
        let streaming = cli
            .streaming_listen
            .clone()
            .or(file.streaming_listen)
            .unwrap_or_else(|| DEFAULT_STREAMING_LISTEN.into());
        let streaming_listen = streaming
            .parse()
            .map_err(|_| ConfigError::StreamingListen(streaming))?;
        let state = cli
            .state
            .clone()
            .or(file.state)
            .unwrap_or_else(|| DEFAULT_STATE.into());
        let example = longest_socket_path(&state);
        let len = example.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(ConfigError::StateTooLong {
                state,
                example,
                len,
                max: MAX_SOCKET_PATH,
            });
        }
        let agent_timeout = cli
            .agent_timeout_secs
            .or(file.agent_timeout_secs)
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_CALL_DEADLINE);
        if agent_timeout.is_zero() {
            return Err(ConfigError::AgentTimeout);
        }
        Ok(Config {
            listen,
            streaming_listen,
            streaming_token_ttl: cli
                .streaming_token_ttl_secs
                .or(file.streaming_token_ttl_secs)
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_TOKEN_TTL),
            default_runtime,
            root: cli
                .root
                .clone()
                .or(file.root)
                .unwrap_or_else(|| DEFAULT_ROOT.into()),
            state,
            guest_kernel: cli
                .guest_kernel
                .clone()
                .or(file.guest_kernel)
                .unwrap_or_else(|| DEFAULT_GUEST_KERNEL.into()),
            guest_initrd: cli
                .guest_initrd
                .clone()
                .or(file.guest_initrd)
                .unwrap_or_else(|| DEFAULT_GUEST_INITRD.into()),
            guest_sizing: {
                let default = VmSizing::default();
                VmSizing {
                    default_vcpus: cli
                        .guest_vcpus
                        .or(file.guest_vcpus)
                        .unwrap_or(default.default_vcpus),
                    default_mem_mib: cli
                        .guest_mem_mib
                        .or(file.guest_mem_mib)
                        .unwrap_or(default.default_mem_mib),
                    base_vcpus: cli
                        .guest_base_vcpus
                        .or(file.guest_base_vcpus)
                        .unwrap_or(default.base_vcpus),
                    base_mem_mib: cli
                        .guest_base_mem_mib
                        .or(file.guest_base_mem_mib)
                        .unwrap_or(default.base_mem_mib),
                    max_vcpus: cli
                        .guest_max_vcpus
                        .or(file.guest_max_vcpus)
                        .unwrap_or(default.max_vcpus),
                    max_mem_mib: cli
                        .guest_max_mem_mib
                        .or(file.guest_max_mem_mib)
                        .unwrap_or(default.max_mem_mib),
                }
            },
            guest_cmdline: cli.guest_cmdline.clone().or(file.guest_cmdline),
            guest_boot_timeout: cli
                .guest_boot_timeout_secs
                .or(file.guest_boot_timeout_secs)
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_BOOT_TIMEOUT),
            agent_timeout,
            husk_vmm,
            husk_agent,
            virtiofsd: cli
                .virtiofsd
                .clone()
                .or(file.virtiofsd)
                .unwrap_or_else(default_virtiofsd),
            microvm_jail: cli
                .microvm_jail
                .or(file.microvm_jail)
                .unwrap_or(true)
                .then(|| JailIds {
                    first: cli
                        .microvm_jail_first_id
                        .or(file.microvm_jail_first_id)
                        .unwrap_or(DEFAULT_JAIL_FIRST_ID),
                }),
            log_level: cli
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            registry: file.registry,
            network: Network {
                conf_dir: cli
                    .cni_conf_dir
                    .clone()
                    .or(file.cni_conf_dir)
                    .unwrap_or_else(|| DEFAULT_CNI_CONF_DIR.into()),
                bin_dir: cli
                    .cni_bin_dir
                    .clone()
                    .or(file.cni_bin_dir)
                    .unwrap_or_else(|| DEFAULT_CNI_BIN_DIR.into()),
            },
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// `unix:///run/husk/husk.sock` (or a bare absolute path) → the path.
pub fn parse_listen(addr: &str) -> Result<PathBuf, ConfigError> {
    let path = addr.strip_prefix("unix://").unwrap_or(addr);
    if path.starts_with('/') {
        Ok(PathBuf::from(path))
    } else {
        Err(ConfigError::Listen(addr.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "unix:///tmp/file.sock"
            root = "/file/root"
            husk_agent = "/file/husk-agent"
            guest_mem_mib = 256
            guest_max_vcpus = 3
            [registry.hosts."127.0.0.1:5000"]
            insecure = true
            "#,
        )
        .expect("parse");
        let cli = Cli {
            root: Some("/flag/root".into()),
            guest_max_vcpus: Some(4),
            ..Cli::default()
        };
        let config = Config::merge(&cli, file).expect("merge");
        assert_eq!(config.guest_sizing.default_mem_mib, 256);
        assert_eq!(config.guest_sizing.max_vcpus, 4);
        assert_eq!(config.listen, PathBuf::from("/tmp/file.sock"));
        assert_eq!(config.root, PathBuf::from("/flag/root"));
        assert_eq!(config.state, PathBuf::from(DEFAULT_STATE));
        assert_eq!(config.husk_agent, PathBuf::from("/file/husk-agent"));
        assert_eq!(
            config.husk_vmm.file_name().and_then(|n| n.to_str()),
            Some("husk-vmm")
        );
        assert!(config.registry.hosts["127.0.0.1:5000"].insecure);
    }

    #[test]
    fn defaults_and_bad_input() {
        let config = Config::merge(&Cli::default(), FileConfig::default()).expect("merge");
        assert_eq!(config.listen, PathBuf::from("/run/husk/husk.sock"));
        assert_eq!(config.root, PathBuf::from(DEFAULT_ROOT));
        assert_eq!(config.default_runtime, "microvm");
        assert_eq!(config.guest_kernel, PathBuf::from(DEFAULT_GUEST_KERNEL));
        assert_eq!(config.guest_sizing, VmSizing::default());
        assert_eq!(config.network.conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(config.network.bin_dir, PathBuf::from("/usr/lib/cni"));
        let host_default = Cli {
            default_runtime: Some("host".into()),
            ..Cli::default()
        };
        assert_eq!(
            Config::merge(&host_default, FileConfig::default())
                .expect("merge")
                .default_runtime,
            "host"
        );
        let bad = Cli {
            default_runtime: Some("kata".into()),
            ..Cli::default()
        };
        assert!(Config::merge(&bad, FileConfig::default()).is_err());
        assert!(parse_listen("tcp://1.2.3.4:5").is_err());
        assert!(parse_listen("unix://relative.sock").is_err());
        assert!(toml::from_str::<FileConfig>("nonsense = 1").is_err());
        assert_eq!(config.streaming_listen.to_string(), "127.0.0.1:0");
        let bad_streaming = Cli {
            streaming_listen: Some("localhost".into()),
            ..Cli::default()
        };
        assert!(Config::merge(&bad_streaming, FileConfig::default()).is_err());
    }

    #[test]
    fn a_state_directory_too_long_for_sandbox_sockets_is_refused() {
        let fits = Cli {
            state: Some("/run/husk".into()),
            ..Cli::default()
        };
        assert!(Config::merge(&fits, FileConfig::default()).is_ok());
        let long = Cli {
            state: Some(format!("/var/tmp/{}", "x".repeat(20)).into()),
            ..Cli::default()
        };
        let err = Config::merge(&long, FileConfig::default())
            .expect_err("sockets would not fit")
            .to_string();
        assert!(err.contains("107-byte limit"), "{err}");
    }
}
