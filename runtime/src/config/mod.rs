//! huskd's configuration: one type of settings ([`Settings`]) that both the
//! config file (`/etc/husk/config.toml`, every key optional) and the
//! command line fill, flags laid over the file, and the defaults, all
//! written here. This module takes only data types from the modules it
//! configures (none of which imports it back); they take their settings
//! from [`Config`].
//!
//! ```toml
//! listen = "unix:///run/husk/husk.sock"
//! root = "/var/lib/husk"
//! state = "/run/husk"
//! default_runtime = "microvm"         # the handler for runtime_handler ""
//! agent_timeout_secs = 30             # each call into a pod's agent; a silent guest's pod goes NOTREADY
//! health_check_interval_secs = 30     # how often each ready pod's agent is pinged
//! husk_agent = "/usr/bin/husk-agent"  # default: next to huskd
//! log_level = "info"
//!
//! [microvm]
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
//! husk_vmm = "/usr/bin/husk-vmm"      # default: next to huskd
//! virtiofsd = "/usr/libexec/virtiofsd" # default: on $PATH, else this
//! jail = true                         # husk-vmm confines itself: namespaces, empty root, own uid
//! jail_first_id = 3000000000          # jailed VMMs run as uid = gid = this + n, one n per pod
//!
//! [cni]
//! conf_dir = "/etc/cni/net.d"         # the first *.conflist/*.conf/*.json wins
//! bin_dir = "/usr/lib/cni"
//!
//! [streaming]
//! listen = "127.0.0.1:0"              # exec and port-forward; port 0 = any free one
//! token_ttl_secs = 60                 # how long a streaming URL stays usable
//!
//! [registry.hosts."docker.io"]
//! mirrors = ["https://mirror.example.com"]
//! ```
//!
//! Each flag is the section's key with the section as prefix, dashes for
//! underscores: `--guest-kernel`, `--microvm-jail`, `--cni-conf-dir`,
//! `--streaming-listen`. The flat file of earlier huskds (those flag names
//! with underscores, all at the top: `guest_kernel`, `microvm_jail`,
//! `cni_conf_dir`) is still read: each such key is moved into its section.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::image::RegistryConfig;
use crate::network::Network;
use crate::sandbox::microvm::JailIds;
use crate::sandbox::sizing::VmSizing;
use crate::sandbox::{longest_socket_path, MAX_SOCKET_PATH};

mod settings;
pub use settings::{CniSettings, MicroVmSettings, Settings, StreamingSettings};

pub const DEFAULT_CONFIG_FILE: &str = "/etc/husk/config.toml";
pub const DEFAULT_LISTEN: &str = "unix:///run/husk/husk.sock";
pub const DEFAULT_ROOT: &str = "/var/lib/husk";
pub const DEFAULT_STATE: &str = "/run/husk";
pub const DEFAULT_RUNTIME: &str = "microvm";
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Each call into a pod's agent.
pub const DEFAULT_AGENT_TIMEOUT: Duration = husk_proto::client::DEFAULT_CALL_DEADLINE;
/// How often each ready pod's agent must answer a Ping. Each Ping wakes an
/// idle guest (on PVM some 60 ms of emulated guest kernel each), so this is
/// idle CPU traded against how soon a hung guest is noticed: within this
/// plus the agent timeout. A guest that dies is noticed at once either way.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// Where the guest kernel and initramfs are when the config names none.
pub const DEFAULT_GUEST_KERNEL: &str = "/usr/lib/husk/vmlinux";
pub const DEFAULT_GUEST_INITRD: &str = "/usr/lib/husk/initramfs.cpio.gz";
/// How long a guest has to boot to its agent. Hardware KVM needs well under
/// a second; PVM hosts need about 30 s, more when busy.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// The first uid and gid of jailed VMMs when the config names none: far
/// from users', system ids and the subordinate ranges of user namespaces.
pub const DEFAULT_JAIL_FIRST_ID: u32 = 3_000_000_000;
/// Where virtiofsd is looked for when the config names none, after `$PATH`:
/// Debian's package installs it outside it.
const VIRTIOFSD_LIBEXEC: &str = "/usr/libexec/virtiofsd";
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The streaming server (exec, port-forward): loopback, any free
/// port, as containerd's default. Its URLs carry the port it got.
pub const DEFAULT_STREAMING_LISTEN: &str = "127.0.0.1:0";
/// How long a streaming URL stays usable, as kubelet's default.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);

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
    /// How often each ready pod's agent is pinged.
    pub health_check_interval: Duration,
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
    #[error("health_check_interval_secs must be at least 1")]
    HealthCheckInterval,
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
    /// The flags laid over the config file, with the defaults for what
    /// neither gives.
    pub fn load(flags: Settings) -> Result<Config, ConfigError> {
        Config::from_settings(flags.over_file()?)
    }

    /// The settings with the defaults for what they leave out, checked.
    pub fn from_settings(settings: Settings) -> Result<Config, ConfigError> {
        let Settings {
            listen,
            root,
            state,
            default_runtime,
            agent_timeout_secs,
            health_check_interval_secs,
            husk_agent,
            log_level,
            config: _,
            microvm,
            cni,
            streaming,
            registry,
        } = settings;
        let listen = parse_listen(listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
        let beside_me = |what: &'static str| -> Result<PathBuf, ConfigError> {
            let exe =
                std::env::current_exe().map_err(|source| ConfigError::OwnExe { what, source })?;
            Ok(exe.with_file_name(what))
        };
        let husk_vmm = match microvm.husk_vmm {
            Some(p) => p,
            None => beside_me("husk-vmm")?,
        };
        let husk_agent = match husk_agent {
            Some(p) => p,
            None => beside_me("husk-agent")?,
        };
        let default_runtime = default_runtime.unwrap_or_else(|| DEFAULT_RUNTIME.into());
        if !matches!(default_runtime.as_str(), "microvm" | "host") {
            return Err(ConfigError::DefaultRuntime(default_runtime));
        }
        let streaming_listen = streaming
            .listen
            .unwrap_or_else(|| DEFAULT_STREAMING_LISTEN.into());
        let streaming_listen = streaming_listen
            .parse()
            .map_err(|_| ConfigError::StreamingListen(streaming_listen))?;
        let state = state.unwrap_or_else(|| DEFAULT_STATE.into());
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
        let secs = |secs: Option<u64>, default: Duration| secs.map_or(default, Duration::from_secs);
        let agent_timeout = secs(agent_timeout_secs, DEFAULT_AGENT_TIMEOUT);
        if agent_timeout.is_zero() {
            return Err(ConfigError::AgentTimeout);
        }
        let health_check_interval = secs(health_check_interval_secs, DEFAULT_HEALTH_CHECK_INTERVAL);
        if health_check_interval.is_zero() {
            return Err(ConfigError::HealthCheckInterval);
        }
        let sizing = VmSizing::default();
        Ok(Config {
            listen,
            streaming_listen,
            streaming_token_ttl: secs(streaming.token_ttl_secs, DEFAULT_TOKEN_TTL),
            default_runtime,
            root: root.unwrap_or_else(|| DEFAULT_ROOT.into()),
            state,
            guest_kernel: microvm
                .guest_kernel
                .unwrap_or_else(|| DEFAULT_GUEST_KERNEL.into()),
            guest_initrd: microvm
                .guest_initrd
                .unwrap_or_else(|| DEFAULT_GUEST_INITRD.into()),
            guest_sizing: VmSizing {
                default_vcpus: microvm.guest_vcpus.unwrap_or(sizing.default_vcpus),
                default_mem_mib: microvm.guest_mem_mib.unwrap_or(sizing.default_mem_mib),
                base_vcpus: microvm.guest_base_vcpus.unwrap_or(sizing.base_vcpus),
                base_mem_mib: microvm.guest_base_mem_mib.unwrap_or(sizing.base_mem_mib),
                max_vcpus: microvm.guest_max_vcpus.unwrap_or(sizing.max_vcpus),
                max_mem_mib: microvm.guest_max_mem_mib.unwrap_or(sizing.max_mem_mib),
            },
            guest_cmdline: microvm.guest_cmdline,
            guest_boot_timeout: secs(microvm.guest_boot_timeout_secs, DEFAULT_BOOT_TIMEOUT),
            agent_timeout,
            health_check_interval,
            husk_vmm,
            husk_agent,
            virtiofsd: microvm.virtiofsd.unwrap_or_else(default_virtiofsd),
            microvm_jail: microvm.jail.unwrap_or(true).then(|| JailIds {
                first: microvm.jail_first_id.unwrap_or(DEFAULT_JAIL_FIRST_ID),
            }),
            log_level: log_level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.into()),
            registry,
            network: Network {
                conf_dir: cni.conf_dir.unwrap_or_else(|| DEFAULT_CNI_CONF_DIR.into()),
                bin_dir: cni.bin_dir.unwrap_or_else(|| DEFAULT_CNI_BIN_DIR.into()),
            },
        })
    }
}

/// virtiofsd on `$PATH`, else Debian's place for it (which the microvm
/// driver's check then reports missing, with a hint).
fn default_virtiofsd() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("virtiofsd"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(VIRTIOFSD_LIBEXEC))
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
    use clap::Parser;

    fn flags(args: &[&str]) -> Settings {
        Settings::try_parse_from(std::iter::once("huskd").chain(args.iter().copied()))
            .expect("flags")
    }

    fn load(flags: Settings, file: &str) -> Config {
        Config::from_settings(flags.over_text(file).expect("file")).expect("config")
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let config = load(
            flags(&[
                "--root",
                "/flag/root",
                "--guest-max-vcpus",
                "4",
                "--streaming-listen",
                "127.0.0.1:7",
            ]),
            r#"
            listen = "unix:///tmp/file.sock"
            root = "/file/root"
            husk_agent = "/file/husk-agent"
            [microvm]
            guest_mem_mib = 256
            guest_max_vcpus = 3
            jail = false
            [streaming]
            listen = "127.0.0.1:5"
            token_ttl_secs = 9
            [registry.hosts."127.0.0.1:5000"]
            insecure = true
            "#,
        );
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
        assert!(config.microvm_jail.is_none());
        assert_eq!(config.streaming_listen.to_string(), "127.0.0.1:7");
        assert_eq!(config.streaming_token_ttl, Duration::from_secs(9));
        assert!(config.registry.hosts["127.0.0.1:5000"].insecure);
    }

    #[test]
    fn the_flat_file_of_earlier_huskds_reads_as_its_sections() {
        let flat = load(
            Settings::default(),
            r#"
            guest_kernel = "/k"
            guest_boot_timeout_secs = 7
            husk_vmm = "/vmm"
            virtiofsd = "/fsd"
            microvm_jail = true
            microvm_jail_first_id = 5
            cni_conf_dir = "/conf"
            streaming_listen = "127.0.0.1:1"
            agent_timeout_secs = 3
            "#,
        );
        let sectioned = load(
            Settings::default(),
            r#"
            agent_timeout_secs = 3
            [microvm]
            guest_kernel = "/k"
            guest_boot_timeout_secs = 7
            husk_vmm = "/vmm"
            virtiofsd = "/fsd"
            jail = true
            jail_first_id = 5
            [cni]
            conf_dir = "/conf"
            [streaming]
            listen = "127.0.0.1:1"
            "#,
        );
        assert_eq!(format!("{flat:?}"), format!("{sectioned:?}"));
        assert_eq!(flat.guest_kernel, PathBuf::from("/k"));
        assert_eq!(flat.microvm_jail.map(|ids| ids.first), Some(5));
        assert_eq!(flat.network.conf_dir, PathBuf::from("/conf"));
    }

    #[test]
    fn defaults_and_bad_input() {
        let config = load(Settings::default(), "");
        assert_eq!(config.listen, PathBuf::from("/run/husk/husk.sock"));
        assert_eq!(config.root, PathBuf::from(DEFAULT_ROOT));
        assert_eq!(config.default_runtime, "microvm");
        assert_eq!(config.guest_kernel, PathBuf::from(DEFAULT_GUEST_KERNEL));
        assert_eq!(config.guest_sizing, VmSizing::default());
        assert_eq!(config.network.conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(config.network.bin_dir, PathBuf::from("/usr/lib/cni"));
        assert_eq!(config.streaming_listen.to_string(), "127.0.0.1:0");
        assert_eq!(config.health_check_interval, Duration::from_secs(30));
        assert_eq!(
            load(flags(&["--default-runtime", "host"]), "").default_runtime,
            "host"
        );
        let refused = |flags: Settings, file: &str| match flags.over_text(file) {
            Ok(settings) => Config::from_settings(settings).is_err(),
            Err(_) => true,
        };
        assert!(refused(flags(&["--default-runtime", "kata"]), ""));
        assert!(refused(flags(&["--streaming-listen", "localhost"]), ""));
        assert!(refused(flags(&["--health-check-interval-secs", "0"]), ""));
        assert!(refused(Settings::default(), "nonsense = 1"));
        assert!(refused(Settings::default(), "[microvm]\nnonsense = 1"));
        assert!(refused(Settings::default(), "[cni]\nconf_dir = 1"));
        assert!(parse_listen("tcp://1.2.3.4:5").is_err());
        assert!(parse_listen("unix://relative.sock").is_err());
    }

    #[test]
    fn a_state_directory_too_long_for_sandbox_sockets_is_refused() {
        assert!(Config::from_settings(flags(&["--state", "/run/husk"])).is_ok());
        let long = format!("/var/tmp/{}", "x".repeat(20));
        let err = Config::from_settings(flags(&["--state", &long]))
            .expect_err("sockets would not fit")
            .to_string();
        assert!(err.contains("107-byte limit"), "{err}");
    }
}
