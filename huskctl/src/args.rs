//! huskctl's command line: the global flags, the commands and their arguments.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::forward;
use crate::output::Format;

pub const DEFAULT_SOCKET: &str = "unix:///run/husk/husk.sock";

#[derive(Debug, Parser)]
#[command(
    name = "huskctl",
    version,
    about = "A small CRI client for huskd (pods, containers, images, exec, logs)"
)]
pub struct Cli {
    /// huskd's CRI socket.
    #[arg(
        long,
        global = true,
        env = "HUSK_SOCKET",
        default_value = DEFAULT_SOCKET,
        value_name = "unix://PATH"
    )]
    pub socket: String,
    /// Deadline for connecting and for each call (a number of seconds, or
    /// 500ms, 30s, 2m); pulls have none.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// huskd's name and version, and the CRI version it speaks.
    Version {
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// huskd's status: runtime and network conditions, runtime handlers (JSON).
    Info,
    /// Pull an image.
    Pull { image: String },
    /// List images.
    Images {
        /// Only this image.
        image: Option<String>,
        /// Only image ids.
        #[arg(short, long)]
        quiet: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Remove images.
    Rmi {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Run a pod sandbox, from a pod config JSON file (crictl's shape) and/or flags.
    Runp(RunpArgs),
    /// Create a container in a pod: `create POD CONTAINER.json POD.json` as
    /// crictl, or `create POD --image IMAGE [--name NAME] [-- CMD...]`.
    Create(CreateArgs),
    /// Start created containers.
    Start {
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// List containers (running ones unless -a).
    Ps {
        /// All containers, not only running ones.
        #[arg(short, long)]
        all: bool,
        /// Only containers of this pod.
        #[arg(short, long)]
        pod: Option<String>,
        /// Only container ids.
        #[arg(short, long)]
        quiet: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// List pod sandboxes.
    Pods {
        /// Only pod ids.
        #[arg(short, long)]
        quiet: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// A container's status as JSON.
    Inspect { container: String },
    /// A pod's status as JSON.
    Inspectp { pod: String },
    /// Run a command in a running container and exit with its exit code.
    Exec {
        container: String,
        /// Seconds the command may run (0: no limit; not with -i or --tty).
        #[arg(short, long, default_value_t = 0)]
        timeout: i64,
        /// Pass stdin to the command (through huskd's streaming server).
        #[arg(short, long)]
        interactive: bool,
        /// Run the command on a terminal (stdin must be one with -i).
        #[arg(long)]
        tty: bool,
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Attach to a running container's output (and with -i its stdin)
    /// until it exits or Ctrl-C.
    Attach {
        container: String,
        /// Pass stdin to the container (it must have been created with stdin).
        #[arg(short, long)]
        interactive: bool,
        /// The container runs on a terminal.
        #[arg(long)]
        tty: bool,
    },
    /// Forward local ports to ports on a pod's loopback, until Ctrl-C.
    PortForward {
        pod: String,
        /// LOCAL:REMOTE, or PORT for the same on both sides.
        #[arg(required = true, value_parser = forward::parse_mapping, value_name = "[LOCAL:]REMOTE")]
        ports: Vec<(u16, u16)>,
    },
    /// Print a container's logs.
    Logs {
        container: String,
        /// Keep following the log until the container exits.
        #[arg(short, long)]
        follow: bool,
        /// Print each line's time.
        #[arg(short, long)]
        timestamps: bool,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
    },
    /// Stop running containers.
    Stop {
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(short, long, default_value_t = 10)]
        timeout: i64,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Remove containers.
    Rm {
        /// Remove running containers too (they are killed).
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Stop pod sandboxes (and their containers).
    Stopp {
        #[arg(required = true)]
        pods: Vec<String>,
    },
    /// Remove pod sandboxes (and their containers).
    Rmp {
        #[arg(required = true)]
        pods: Vec<String>,
    },
    /// Pull if needed, run IMAGE with CMD in a new pod, print its output,
    /// remove it all, and exit with the container's exit code.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct PodFlags {
    /// Runtime handler (e.g. `host`); "" is huskd's default.
    #[arg(long, default_value = "", value_name = "HANDLER")]
    pub runtime: String,
    /// Pod namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Directory for the pod's container logs
    /// (default /var/log/pods/NAMESPACE_NAME_UID, as kubelet uses).
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Share the host's network namespace (hostNetwork).
    #[arg(long)]
    pub host_network: bool,
    /// Pod labels.
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub struct RunpArgs {
    /// PodSandboxConfig as JSON (crictl's pod config); flags override its fields.
    pub config: Option<PathBuf>,
    /// Pod name.
    #[arg(long)]
    pub name: Option<String>,
    /// Pod uid (default: random).
    #[arg(long)]
    pub uid: Option<String>,
    #[command(flatten)]
    pub pod: PodFlags,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    pub pod: String,
    /// ContainerConfig as JSON (crictl's container config).
    pub container_config: Option<PathBuf>,
    /// The pod's PodSandboxConfig as JSON (default: built from its status).
    pub pod_config: Option<PathBuf>,
    /// Image to run.
    #[arg(long)]
    pub image: Option<String>,
    /// Container name (default: the image's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Environment variables.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub envs: Vec<(String, String)>,
    /// Command and arguments (the image's entrypoint if none).
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    pub image: String,
    /// Pod and container name (default: huskctl-run-RANDOM).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub pod: PodFlags,
    /// Environment variables.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub envs: Vec<(String, String)>,
    /// Command and arguments (the image's entrypoint if none).
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// `30`, `30s`, `500ms`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 30s, 500ms, 2m)"))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

fn parse_key_value(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("2x").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "huskctl",
            "--timeout",
            "5s",
            "exec",
            "-t",
            "3",
            "abc",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .unwrap();
        assert_eq!(cli.timeout, Duration::from_secs(5));
        match cli.command {
            Command::Exec { timeout, cmd, .. } => {
                assert_eq!(timeout, 3);
                assert_eq!(cmd, ["sh", "-c", "exit 3"]);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from([
            "huskctl",
            "run",
            "busybox",
            "--runtime",
            "host",
            "--",
            "echo",
            "hi",
        ])
        .unwrap();
        match cli.command {
            Command::Run(args) => {
                assert_eq!(args.pod.runtime, "host");
                assert_eq!(args.cmd, ["echo", "hi"]);
            }
            other => panic!("{other:?}"),
        }
    }
}
