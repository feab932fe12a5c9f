//! The settings as the config file and the flags give them: one type for
//! both ([`Settings`], clap and serde over the same fields), and how the
//! flags are laid over the file.

use std::path::{Path, PathBuf};

use clap::{Args, Parser};
use serde::{Deserialize, Serialize};

use super::{ConfigError, DEFAULT_CONFIG_FILE};
use crate::image::RegistryConfig;

/// huskd: the husk CRI server (RuntimeService and ImageService on a unix socket).
///
/// Every setting is optional, as a flag and as a config file key; defaults
/// are applied by [`Config::from_settings`].
#[derive(Debug, Default, Parser, Serialize, Deserialize)]
#[command(name = "huskd", version)]
#[serde(deny_unknown_fields)]
pub struct Settings {
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
    /// How long each call into a pod's agent may take, and a ready pod's
    /// agent has to answer huskd's health check, in seconds [default: 30].
    #[arg(long, value_name = "SECS")]
    pub agent_timeout_secs: Option<u64>,
    /// How often huskd pings each ready pod's agent, in seconds: a hung
    /// guest is noticed within this plus the agent timeout [default: 30].
    #[arg(long, value_name = "SECS")]
    pub health_check_interval_secs: Option<u64>,
    /// husk-agent, which the host driver runs [default: next to huskd].
    #[arg(long, value_name = "PATH")]
    pub husk_agent: Option<PathBuf>,
    /// Log filter (tracing's EnvFilter syntax, e.g. "info" or "husk_runtime=debug").
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// The configuration file; a missing default file is fine, a missing
    /// named one is an error [default: /etc/husk/config.toml].
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    #[serde(default)]
    pub microvm: MicroVmSettings,
    #[command(flatten)]
    #[serde(default)]
    pub cni: CniSettings,
    #[command(flatten)]
    #[serde(default)]
    pub streaming: StreamingSettings,
    /// Registry mirrors and insecure registries: file only.
    #[arg(skip)]
    #[serde(default, skip_serializing)]
    pub registry: RegistryConfig,
}

/// `[microvm]`: the microvm driver's guests and helpers.
#[derive(Debug, Default, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MicroVmSettings {
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
    /// husk-vmm [default: next to huskd].
    #[arg(long, value_name = "PATH")]
    pub husk_vmm: Option<PathBuf>,
    /// virtiofsd, which serves each microvm pod's volumes [default: on
    /// $PATH, else /usr/libexec/virtiofsd].
    #[arg(long, value_name = "PATH")]
    pub virtiofsd: Option<PathBuf>,
    /// Whether husk-vmm confines itself before its guest runs (new mount,
    /// IPC and UTS namespaces, an empty read-only root, rlimits, a uid and
    /// gid of its own per pod) [default: true].
    #[arg(long = "microvm-jail", value_name = "BOOL")]
    pub jail: Option<bool>,
    /// The first of the 65536 uids (and gids) jailed VMMs run as, one per
    /// pod [default: 3000000000].
    #[arg(long = "microvm-jail-first-id", value_name = "ID")]
    pub jail_first_id: Option<u32>,
}

/// `[cni]`: where pod networks come from.
#[derive(Debug, Default, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CniSettings {
    /// Where pod networks are configured: the first *.conflist, *.conf or
    /// *.json by name [default: /etc/cni/net.d].
    #[arg(long = "cni-conf-dir", value_name = "DIR")]
    pub conf_dir: Option<PathBuf>,
    /// Where the CNI plugins are [default: /usr/lib/cni].
    #[arg(long = "cni-bin-dir", value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
}

/// `[streaming]`: the exec, attach and port-forward server.
#[derive(Debug, Default, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamingSettings {
    /// Where the streaming server (exec, port-forward) listens:
    /// IP:PORT, port 0 for any free one [default: 127.0.0.1:0].
    #[arg(
        id = "streaming_listen",
        long = "streaming-listen",
        value_name = "IP:PORT"
    )]
    pub listen: Option<String>,
    /// How long a streaming URL stays usable, in seconds [default: 60].
    #[arg(long = "streaming-token-ttl-secs", value_name = "SECS")]
    pub token_ttl_secs: Option<u64>,
}

impl Settings {
    /// The flags (`self`) laid over the config file: the named one, or the
    /// default one if it exists.
    pub fn over_file(self) -> Result<Settings, ConfigError> {
        let path = match &self.config {
            Some(path) => path.clone(),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => DEFAULT_CONFIG_FILE.into(),
            None => return Ok(self),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        self.over_text(&text)
            .map_err(|source| ConfigError::Parse { path, source })
    }

    /// The flags laid over a config file's text, key by key.
    pub(super) fn over_text(self, file: &str) -> Result<Settings, toml::de::Error> {
        let config = self.config.clone();
        let mut table = sectioned(toml::from_str(file)?);
        // Only the keys given: None fields are not serialized.
        let flags = toml::Table::try_from(&self).map_err(serde::de::Error::custom)?;
        overlay(&mut table, flags);
        let mut settings = Settings::deserialize(toml::Value::Table(table))?;
        settings.config = config;
        Ok(settings)
    }
}

/// The flat file of earlier huskds in sections: `guest_*`, `husk_vmm`,
/// `virtiofsd` and `microvm_*` keys go to `[microvm]`, `cni_*` to `[cni]`,
/// `streaming_*` to `[streaming]`, without the prefix.
fn sectioned(file: toml::Table) -> toml::Table {
    let mut table = toml::Table::new();
    for (key, value) in file {
        let (section, name) =
            if key.starts_with("guest_") || key == "husk_vmm" || key == "virtiofsd" {
                ("microvm", key.as_str())
            } else if let Some(name) = key.strip_prefix("microvm_") {
                ("microvm", name)
            } else if let Some(name) = key.strip_prefix("cni_") {
                ("cni", name)
            } else if let Some(name) = key.strip_prefix("streaming_") {
                ("streaming", name)
            } else {
                table.insert(key, value);
                continue;
            };
        let mut moved = toml::Table::new();
        moved.insert(name.to_owned(), value);
        overlay(
            &mut table,
            toml::Table::from_iter([(section.to_owned(), moved.into())]),
        );
    }
    table
}

/// Lays `over` on `under` key by key, into tables at any depth.
fn overlay(under: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (under.get_mut(&key), value) {
            (Some(toml::Value::Table(below)), toml::Value::Table(above)) => overlay(below, above),
            (_, value) => {
                under.insert(key, value);
            }
        }
    }
}
