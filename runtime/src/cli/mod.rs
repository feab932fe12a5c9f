//! huskctl: a small CRI client for huskd's socket, for machines without crictl.

pub mod client;
pub mod config;
mod forward;
pub mod logs;
pub mod output;
mod stream;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use k8s_cri::v1 as cri;

use client::{CliError, Huskd, Result};
use output::Format;

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

/// Runs the command line; the process's exit code on success.
pub async fn run(cli: Cli) -> Result<i32> {
    let path = client::socket_path(&cli.socket)?;
    let mut h = Huskd::connect(&path, cli.timeout).await?;
    let mut out = std::io::stdout().lock();
    let stdout = |e| CliError::io("writing to stdout")(e);
    match cli.command {
        Command::Version { output } => {
            let response =
                h.rt.version(h.request(
                    cri::VersionRequest {
                        version: "v1".into(),
                    },
                    Duration::ZERO,
                ))
                .await
                .map_err(h.failed("Version"))?
                .into_inner();
            let text = if output == Format::Json {
                output::json(&response)?
            } else {
                format!(
                    "Version:  {}\nRuntimeName:  {}\nRuntimeVersion:  {}\nRuntimeApiVersion:  {}\n",
                    response.version,
                    response.runtime_name,
                    response.runtime_version,
                    response.runtime_api_version
                )
            };
            out.write_all(text.as_bytes()).map_err(stdout)?;
        }
        Command::Info => {
            let response =
                h.rt.status(h.request(cri::StatusRequest { verbose: true }, Duration::ZERO))
                    .await
                    .map_err(h.failed("Status"))?
                    .into_inner();
            out.write_all(output::json(&response)?.as_bytes())
                .map_err(stdout)?;
        }
        Command::Pull { image } => {
            let image_ref = pull(&mut h, &image).await?;
            writeln!(out, "Image is up to date for {image_ref}").map_err(stdout)?;
        }
        Command::Images {
            image,
            quiet,
            output,
        } => {
            let filter = image.map(|image| cri::ImageFilter {
                image: Some(image_spec(&image)),
            });
            let response = h
                .img
                .list_images(h.request(cri::ListImagesRequest { filter }, Duration::ZERO))
                .await
                .map_err(h.failed("ListImages"))?
                .into_inner();
            let text = if quiet {
                lines(response.images.iter().map(|i| i.id.clone()))
            } else if output == Format::Json {
                output::json(&response)?
            } else {
                images_table(&response.images)
            };
            out.write_all(text.as_bytes()).map_err(stdout)?;
        }
        Command::Rmi { images } => {
            for image in images {
                h.img
                    .remove_image(h.request(
                        cri::RemoveImageRequest {
                            image: Some(image_spec(&image)),
                        },
                        Duration::ZERO,
                    ))
                    .await
                    .map_err(h.failed(format!("RemoveImage {image}")))?;
                writeln!(out, "Deleted: {image}").map_err(stdout)?;
            }
        }
        Command::Runp(args) => {
            let mut config = match &args.config {
                Some(path) => config::pod_config(&config::read_json(path)?)?,
                None => cri::PodSandboxConfig::default(),
            };
            apply_pod_flags(&mut config, args.name, args.uid, &args.pod)?;
            let id = run_pod(&mut h, config, &args.pod.runtime).await?;
            writeln!(out, "{id}").map_err(stdout)?;
        }
        Command::Create(args) => {
            let id = create(&mut h, args).await?;
            writeln!(out, "{id}").map_err(stdout)?;
        }
        Command::Start { containers } => {
            for id in containers {
                let id = resolve_container(&mut h, &id).await?;
                h.rt.start_container(h.request(
                    cri::StartContainerRequest {
                        container_id: id.clone(),
                    },
                    Duration::ZERO,
                ))
                .await
                .map_err(h.failed(format!("StartContainer {id}")))?;
                writeln!(out, "{id}").map_err(stdout)?;
            }
        }
        Command::Ps {
            all,
            pod,
            quiet,
            output,
        } => {
            let pod_sandbox_id = match pod {
                Some(pod) => resolve_pod(&mut h, &pod).await?,
                None => String::new(),
            };
            let filter = cri::ContainerFilter {
                pod_sandbox_id,
                state: (!all).then_some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            };
            let mut response =
                h.rt.list_containers(h.request(
                    cri::ListContainersRequest {
                        filter: Some(filter),
                    },
                    Duration::ZERO,
                ))
                .await
                .map_err(h.failed("ListContainers"))?
                .into_inner();
            response
                .containers
                .sort_by_key(|c| std::cmp::Reverse(c.created_at));
            let text = if quiet {
                lines(response.containers.iter().map(|c| c.id.clone()))
            } else if output == Format::Json {
                output::json(&response)?
            } else {
                let pods = list_pods(&mut h).await?;
                containers_table(&response.containers, &pods)
            };
            out.write_all(text.as_bytes()).map_err(stdout)?;
        }
        Command::Pods { quiet, output } => {
            let mut response =
                h.rt.list_pod_sandbox(
                    h.request(cri::ListPodSandboxRequest { filter: None }, Duration::ZERO),
                )
                .await
                .map_err(h.failed("ListPodSandbox"))?
                .into_inner();
            response
                .items
                .sort_by_key(|p| std::cmp::Reverse(p.created_at));
            let text = if quiet {
                lines(response.items.iter().map(|p| p.id.clone()))
            } else if output == Format::Json {
                output::json(&response)?
            } else {
                pods_table(&response.items)
            };
            out.write_all(text.as_bytes()).map_err(stdout)?;
        }
        Command::Inspect { container } => {
            let id = resolve_container(&mut h, &container).await?;
            let response =
                h.rt.container_status(h.request(
                    cri::ContainerStatusRequest {
                        container_id: id.clone(),
                        verbose: true,
                    },
                    Duration::ZERO,
                ))
                .await
                .map_err(h.failed(format!("ContainerStatus {id}")))?
                .into_inner();
            out.write_all(output::json(&response)?.as_bytes())
                .map_err(stdout)?;
        }
        Command::Inspectp { pod } => {
            let id = resolve_pod(&mut h, &pod).await?;
            let response =
                h.rt.pod_sandbox_status(h.request(
                    cri::PodSandboxStatusRequest {
                        pod_sandbox_id: id.clone(),
                        verbose: true,
                    },
                    Duration::ZERO,
                ))
                .await
                .map_err(h.failed(format!("PodSandboxStatus {id}")))?
                .into_inner();
            out.write_all(output::json(&response)?.as_bytes())
                .map_err(stdout)?;
        }
        Command::Exec {
            container,
            timeout,
            interactive,
            tty,
            cmd,
        } => {
            drop(out);
            if interactive || tty {
                if timeout != 0 {
                    return Err(CliError::Usage(
                        "exec -t SECONDS cannot limit an -i or --tty exec".into(),
                    ));
                }
                let id = resolve_container(&mut h, &container).await?;
                let request = cri::ExecRequest {
                    container_id: id.clone(),
                    cmd,
                    tty,
                    stdin: interactive,
                    stdout: true,
                    stderr: !tty,
                };
                let url =
                    h.rt.exec(h.request(request, Duration::ZERO))
                        .await
                        .map_err(h.failed(format!("Exec in {id}")))?
                        .into_inner()
                        .url;
                return stream::run(&url, interactive, tty).await;
            }
            return exec(&mut h, &container, timeout, cmd).await;
        }
        Command::PortForward { pod, ports } => {
            drop(out);
            let id = resolve_pod(&mut h, &pod).await?;
            return forward::run(&h, &id, &ports).await;
        }
        Command::Attach {
            container,
            interactive,
            tty,
        } => {
            drop(out);
            let id = resolve_container(&mut h, &container).await?;
            let request = cri::AttachRequest {
                container_id: id.clone(),
                stdin: interactive,
                tty,
                stdout: true,
                stderr: !tty,
            };
            let url =
                h.rt.attach(h.request(request, Duration::ZERO))
                    .await
                    .map_err(h.failed(format!("Attach to {id}")))?
                    .into_inner()
                    .url;
            return stream::run(&url, interactive, tty).await;
        }
        Command::Logs {
            container,
            follow,
            timestamps,
            tail,
        } => {
            drop(out);
            let id = resolve_container(&mut h, &container).await?;
            let status = container_status(&mut h, &id).await?;
            if status.log_path.is_empty() {
                return Err(CliError::Usage(format!(
                    "container {id} has no log file (its pod has no log_directory)"
                )));
            }
            print_logs(
                &mut h,
                &id,
                Path::new(&status.log_path),
                follow,
                timestamps,
                tail,
            )
            .await?;
        }
        Command::Stop {
            timeout,
            containers,
        } => {
            for id in containers {
                let id = resolve_container(&mut h, &id).await?;
                stop_container(&mut h, &id, timeout).await?;
                writeln!(out, "{id}").map_err(stdout)?;
            }
        }
        Command::Rm { force, containers } => {
            for id in containers {
                let id = resolve_container(&mut h, &id).await?;
                if !force {
                    let status = container_status(&mut h, &id).await?;
                    if status.state == cri::ContainerState::ContainerRunning as i32 {
                        return Err(CliError::Usage(format!(
                            "container {id} is running: stop it first, or rm -f"
                        )));
                    }
                }
                remove_container(&mut h, &id).await?;
                writeln!(out, "{id}").map_err(stdout)?;
            }
        }
        Command::Stopp { pods } => {
            for id in pods {
                let id = resolve_pod(&mut h, &id).await?;
                stop_pod(&mut h, &id).await?;
                writeln!(out, "Stopped sandbox {id}").map_err(stdout)?;
            }
        }
        Command::Rmp { pods } => {
            for id in pods {
                let id = resolve_pod(&mut h, &id).await?;
                remove_pod(&mut h, &id).await?;
                writeln!(out, "Removed sandbox {id}").map_err(stdout)?;
            }
        }
        Command::Run(args) => {
            drop(out);
            return run_once(&mut h, args).await;
        }
    }
    Ok(0)
}

fn lines(items: impl Iterator<Item = String>) -> String {
    items.map(|s| s + "\n").collect()
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

/// 16 random hex digits.
fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if read.is_err() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64
            ^ u64::from(std::process::id()) << 32;
        bytes = seed.to_le_bytes();
    }
    hex::encode(bytes)
}

/// The image's name without registry path or tag: `busybox` for `r:5000/x/busybox:1`.
fn image_name(image: &str) -> String {
    let (repo, _) = output::split_tag(image.split('@').next().unwrap_or(image));
    let name = repo.rsplit('/').next().unwrap_or(repo);
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() {
        "container".into()
    } else {
        name
    }
}

async fn pull(h: &mut Huskd, image: &str) -> Result<String> {
    // No deadline: a large image takes what it takes.
    Ok(h.img
        .pull_image(cri::PullImageRequest {
            image: Some(image_spec(image)),
            ..Default::default()
        })
        .await
        .map_err(h.failed(format!("PullImage {image}")))?
        .into_inner()
        .image_ref)
}

fn apply_pod_flags(
    config: &mut cri::PodSandboxConfig,
    name: Option<String>,
    uid: Option<String>,
    flags: &PodFlags,
) -> Result<()> {
    let meta = config.metadata.get_or_insert_with(Default::default);
    if let Some(name) = name {
        meta.name = name;
    }
    if let Some(namespace) = &flags.namespace {
        meta.namespace = namespace.clone();
    }
    if let Some(uid) = uid {
        meta.uid = uid;
    }
    if meta.name.is_empty() {
        return Err(CliError::Usage(
            "the pod needs a name: --name NAME, or metadata.name in its config".into(),
        ));
    }
    if meta.namespace.is_empty() {
        meta.namespace = "default".into();
    }
    if meta.uid.is_empty() {
        meta.uid = random_hex();
    }
    if let Some(dir) = &flags.log_dir {
        config.log_directory = dir.display().to_string();
    }
    if config.log_directory.is_empty() {
        config.log_directory = format!(
            "/var/log/pods/{}_{}_{}",
            meta.namespace, meta.name, meta.uid
        );
    }
    if flags.host_network {
        let linux = config.linux.get_or_insert_with(Default::default);
        let context = linux.security_context.get_or_insert_with(Default::default);
        let namespaces = context
            .namespace_options
            .get_or_insert_with(Default::default);
        namespaces.network = cri::NamespaceMode::Node as i32;
    }
    for (k, v) in &flags.labels {
        config.labels.insert(k.clone(), v.clone());
    }
    Ok(())
}

async fn run_pod(h: &mut Huskd, config: cri::PodSandboxConfig, handler: &str) -> Result<String> {
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    Ok(h.rt
        .run_pod_sandbox(h.request(
            cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: handler.to_owned(),
            },
            Duration::ZERO,
        ))
        .await
        .map_err(h.failed(format!("RunPodSandbox {name}")))?
        .into_inner()
        .pod_sandbox_id)
}

/// The pod's config as far as its status tells it, for CreateContainer's `sandbox_config`.
fn config_from_status(status: cri::PodSandboxStatus) -> cri::PodSandboxConfig {
    let namespace_options = status
        .linux
        .and_then(|l| l.namespaces)
        .and_then(|n| n.options);
    cri::PodSandboxConfig {
        metadata: status.metadata,
        labels: status.labels,
        annotations: status.annotations,
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn create(h: &mut Huskd, args: CreateArgs) -> Result<String> {
    let pod = resolve_pod(h, &args.pod).await?;
    let mut config = match &args.container_config {
        Some(path) => config::container_config(&config::read_json(path)?)?,
        None => cri::ContainerConfig::default(),
    };
    if let Some(image) = args.image {
        config.image = Some(image_spec(&image));
    }
    let image = config
        .image
        .as_ref()
        .map(|i| i.image.clone())
        .unwrap_or_default();
    if image.is_empty() {
        return Err(CliError::Usage(
            "the container needs an image: --image IMAGE, or image.image in its config".into(),
        ));
    }
    let meta = config.metadata.get_or_insert_with(Default::default);
    if let Some(name) = args.name {
        meta.name = name;
    }
    if meta.name.is_empty() {
        meta.name = image_name(&image);
    }
    if config.log_path.is_empty() {
        config.log_path = format!("{}/{}.log", meta.name, meta.attempt);
    }
    if !args.cmd.is_empty() {
        config.command = args.cmd;
        config.args.clear();
    }
    config.envs.extend(
        args.envs
            .into_iter()
            .map(|(key, value)| cri::KeyValue { key, value }),
    );
    let sandbox_config = match &args.pod_config {
        Some(path) => config::pod_config(&config::read_json(path)?)?,
        None => config_from_status(pod_status(h, &pod).await?),
    };
    create_container(h, &pod, config, sandbox_config).await
}

async fn create_container(
    h: &mut Huskd,
    pod: &str,
    config: cri::ContainerConfig,
    sandbox_config: cri::PodSandboxConfig,
) -> Result<String> {
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    Ok(h.rt
        .create_container(h.request(
            cri::CreateContainerRequest {
                pod_sandbox_id: pod.to_owned(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            },
            Duration::ZERO,
        ))
        .await
        .map_err(h.failed(format!("CreateContainer {name} in pod {pod}")))?
        .into_inner()
        .container_id)
}

async fn container_status(h: &mut Huskd, id: &str) -> Result<cri::ContainerStatus> {
    h.rt.container_status(h.request(
        cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        },
        Duration::ZERO,
    ))
    .await
    .map_err(h.failed(format!("ContainerStatus {id}")))?
    .into_inner()
    .status
    .ok_or_else(|| CliError::Usage(format!("huskd sent no status for container {id}")))
}

async fn pod_status(h: &mut Huskd, id: &str) -> Result<cri::PodSandboxStatus> {
    h.rt.pod_sandbox_status(h.request(
        cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: false,
        },
        Duration::ZERO,
    ))
    .await
    .map_err(h.failed(format!("PodSandboxStatus {id}")))?
    .into_inner()
    .status
    .ok_or_else(|| CliError::Usage(format!("huskd sent no status for pod {id}")))
}

async fn list_pods(h: &mut Huskd) -> Result<Vec<cri::PodSandbox>> {
    Ok(h.rt
        .list_pod_sandbox(h.request(cri::ListPodSandboxRequest { filter: None }, Duration::ZERO))
        .await
        .map_err(h.failed("ListPodSandbox"))?
        .into_inner()
        .items)
}

/// A full id from a unique prefix of one (tables show 13 characters).
fn resolve<'a>(what: &str, id: &str, ids: impl Iterator<Item = &'a str>) -> Result<String> {
    let matches: Vec<&str> = ids.filter(|full| full.starts_with(id)).collect();
    if matches.contains(&id) {
        return Ok(id.to_owned());
    }
    match matches.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => Ok(id.to_owned()), // huskd says it is not there
        many => Err(CliError::Usage(format!(
            "{what} id {id:?} is ambiguous: {}",
            many.join(", ")
        ))),
    }
}

async fn resolve_container(h: &mut Huskd, id: &str) -> Result<String> {
    if id.is_empty() {
        return Err(CliError::Usage("an empty container id".into()));
    }
    let containers = h
        .rt
        .list_containers(h.request(cri::ListContainersRequest { filter: None }, Duration::ZERO))
        .await
        .map_err(h.failed("ListContainers"))?
        .into_inner()
        .containers;
    resolve("container", id, containers.iter().map(|c| c.id.as_str()))
}

async fn resolve_pod(h: &mut Huskd, id: &str) -> Result<String> {
    if id.is_empty() {
        return Err(CliError::Usage("an empty pod id".into()));
    }
    let pods = list_pods(h).await?;
    resolve("pod", id, pods.iter().map(|p| p.id.as_str()))
}

async fn stop_container(h: &mut Huskd, id: &str, grace: i64) -> Result<()> {
    h.rt.stop_container(h.request(
        cri::StopContainerRequest {
            container_id: id.to_owned(),
            timeout: grace,
        },
        Duration::from_secs(grace.max(0) as u64),
    ))
    .await
    .map_err(h.failed(format!("StopContainer {id}")))?;
    Ok(())
}

async fn remove_container(h: &mut Huskd, id: &str) -> Result<()> {
    h.rt.remove_container(h.request(
        cri::RemoveContainerRequest {
            container_id: id.to_owned(),
        },
        Duration::ZERO,
    ))
    .await
    .map_err(h.failed(format!("RemoveContainer {id}")))?;
    Ok(())
}

async fn stop_pod(h: &mut Huskd, id: &str) -> Result<()> {
    h.rt.stop_pod_sandbox(h.request(
        cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        },
        Duration::ZERO,
    ))
    .await
    .map_err(h.failed(format!("StopPodSandbox {id}")))?;
    Ok(())
}

async fn remove_pod(h: &mut Huskd, id: &str) -> Result<()> {
    h.rt.remove_pod_sandbox(h.request(
        cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        },
        Duration::ZERO,
    ))
    .await
    .map_err(h.failed(format!("RemovePodSandbox {id}")))?;
    Ok(())
}

async fn exec(h: &mut Huskd, container: &str, timeout: i64, cmd: Vec<String>) -> Result<i32> {
    let id = resolve_container(h, container).await?;
    let response =
        h.rt.exec_sync({
            let request = cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd,
                timeout,
            };
            if timeout > 0 {
                h.request(request, Duration::from_secs(timeout as u64))
            } else {
                // No limit on the command: none on the call either.
                tonic::Request::new(request)
            }
        })
        .await
        .map_err(h.failed(format!("ExecSync in {id}")))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    out.write_all(&response.stdout)
        .and_then(|_| out.flush())
        .map_err(CliError::io("writing to stdout"))?;
    let mut err = std::io::stderr().lock();
    err.write_all(&response.stderr)
        .and_then(|_| err.flush())
        .map_err(CliError::io("writing to stderr"))?;
    Ok(response.exit_code)
}

const POLL: Duration = Duration::from_millis(100);
/// After a container exits, how long its log may still grow (the copy is asynchronous).
const LOG_SETTLE: Duration = Duration::from_millis(300);

async fn print_logs(
    h: &mut Huskd,
    id: &str,
    path: &Path,
    follow: bool,
    timestamps: bool,
    tail_lines: Option<usize>,
) -> Result<()> {
    let mut printer = logs::Printer::new(
        std::io::stdout().lock(),
        std::io::stderr().lock(),
        timestamps,
    );
    let write = |e| CliError::io("writing the log")(e);
    let mut tail = logs::Tail::new();
    let mut first = tail.read(path)?;
    if let Some(n) = tail_lines {
        let skip = first.len().saturating_sub(n);
        first.drain(..skip);
    }
    for line in &first {
        printer.line(line).map_err(write)?;
    }
    printer.flush().map_err(write)?;
    if follow {
        follow_log(h, id, path, &mut tail, &mut printer).await?;
    }
    if let Some(rest) = tail.take_rest() {
        printer.line(&rest).map_err(write)?;
    }
    printer.flush().map_err(write)
}

/// Prints new lines until the container has exited (or is gone) and its log has settled.
async fn follow_log<O: Write, E: Write>(
    h: &mut Huskd,
    id: &str,
    path: &Path,
    tail: &mut logs::Tail,
    printer: &mut logs::Printer<O, E>,
) -> Result<()> {
    let write = |e| CliError::io("writing the log")(e);
    let mut exited_at: Option<Instant> = None;
    let mut last_status = Instant::now();
    loop {
        let lines = tail.read(path)?;
        for line in &lines {
            printer.line(line).map_err(write)?;
        }
        if !lines.is_empty() {
            printer.flush().map_err(write)?;
            if let Some(t) = exited_at.as_mut() {
                *t = Instant::now();
            }
        }
        match exited_at {
            Some(t) if t.elapsed() >= LOG_SETTLE && !tail.has_partial() => return Ok(()),
            Some(t) if t.elapsed() >= LOG_SETTLE * 10 => return Ok(()),
            Some(_) => {}
            None if last_status.elapsed() >= POLL * 3 || lines.is_empty() => {
                last_status = Instant::now();
                match container_status(h, id).await {
                    Ok(s)
                        if s.state == cri::ContainerState::ContainerRunning as i32
                            || s.state == cri::ContainerState::ContainerCreated as i32 => {}
                    Ok(_) => exited_at = Some(Instant::now()),
                    Err(CliError::Rpc {
                        code: tonic::Code::NotFound,
                        ..
                    }) => exited_at = Some(Instant::now()),
                    Err(e) => return Err(e),
                }
            }
            None => {}
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `huskctl run`: the whole life of one container, cleaned up whatever happens.
async fn run_once(h: &mut Huskd, args: RunArgs) -> Result<i32> {
    let present = h
        .img
        .image_status(h.request(
            cri::ImageStatusRequest {
                image: Some(image_spec(&args.image)),
                verbose: false,
            },
            Duration::ZERO,
        ))
        .await
        .map_err(h.failed(format!("ImageStatus {}", args.image)))?
        .into_inner()
        .image
        .is_some();
    if !present {
        pull(h, &args.image).await?;
    }
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("huskctl-run-{}", &random_hex()[..8]));
    let mut pod_config = cri::PodSandboxConfig::default();
    apply_pod_flags(&mut pod_config, Some(name.clone()), None, &args.pod)?;
    let pod_config = pod_config;
    // Listening from before the pod exists: a Ctrl-C that comes at any point
    // from here on is seen below (and cleaned up after), never the default
    // action that would leave the pod behind.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(CliError::io("listening for Ctrl-C"))?;
    let pod = run_pod(h, pod_config.clone(), &args.pod.runtime).await?;
    let mut container = None;
    let result = async {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.clone(),
                attempt: 0,
            }),
            image: Some(image_spec(&args.image)),
            command: args.cmd.clone(),
            envs: args
                .envs
                .iter()
                .map(|(key, value)| cri::KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            log_path: format!("{name}/0.log"),
            ..Default::default()
        };
        let id = create_container(h, &pod, config, pod_config.clone()).await?;
        container = Some(id.clone());
        h.rt.start_container(h.request(
            cri::StartContainerRequest {
                container_id: id.clone(),
            },
            Duration::ZERO,
        ))
        .await
        .map_err(h.failed(format!("StartContainer {id}")))?;
        let log_path = PathBuf::from(&pod_config.log_directory).join(format!("{name}/0.log"));
        let mut printer =
            logs::Printer::new(std::io::stdout().lock(), std::io::stderr().lock(), false);
        let mut tail = logs::Tail::new();
        let interrupted = tokio::select! {
            followed = follow_log(h, &id, &log_path, &mut tail, &mut printer) => {
                followed?;
                false
            }
            _ = interrupt.recv() => true,
        };
        if let Some(rest) = tail.take_rest() {
            printer
                .line(&rest)
                .map_err(CliError::io("writing the log"))?;
        }
        printer.flush().map_err(CliError::io("writing the log"))?;
        if interrupted {
            return Ok(130);
        }
        let status = container_status(h, &id).await?;
        if status.reason == "StartError" && !status.message.is_empty() {
            eprintln!("huskctl: container {name}: {}", status.message);
        }
        Ok(status.exit_code)
    }
    .await;
    // Clean up even after an error; the first error is the one reported.
    let mut cleanup: Result<()> = Ok(());
    if let Some(id) = &container {
        cleanup = cleanup.and(remove_container(h, id).await);
    }
    cleanup = cleanup.and(stop_pod(h, &pod).await);
    cleanup = cleanup.and(remove_pod(h, &pod).await);
    if args.pod.log_dir.is_none() {
        let _ = std::fs::remove_dir_all(&pod_config.log_directory);
    }
    let code = result?;
    cleanup?;
    Ok(code)
}

fn images_table(images: &[cri::Image]) -> String {
    let mut rows = Vec::new();
    for image in images {
        let id = output::short_id(&image.id);
        let size = output::human_size(image.size);
        if image.repo_tags.is_empty() {
            let repo = image
                .repo_digests
                .first()
                .map(|d| d.split('@').next().unwrap_or(d).to_owned())
                .unwrap_or_else(|| "<none>".into());
            rows.push(vec![repo, "<none>".into(), id.clone(), size.clone()]);
        }
        for tag in &image.repo_tags {
            let (repo, tag) = output::split_tag(tag);
            rows.push(vec![repo.into(), tag.into(), id.clone(), size.clone()]);
        }
    }
    output::table(&["IMAGE", "TAG", "IMAGE ID", "SIZE"], &rows)
}

fn containers_table(containers: &[cri::Container], pods: &[cri::PodSandbox]) -> String {
    let pod_names: HashMap<&str, &str> = pods
        .iter()
        .map(|p| {
            (
                p.id.as_str(),
                p.metadata.as_ref().map_or("", |m| m.name.as_str()),
            )
        })
        .collect();
    let rows: Vec<Vec<String>> = containers
        .iter()
        .map(|c| {
            let meta = c.metadata.clone().unwrap_or_default();
            vec![
                output::short_id(&c.id),
                c.image
                    .as_ref()
                    .map(|i| i.image.clone())
                    .unwrap_or_default(),
                output::ago(c.created_at),
                output::container_state(c.state).into(),
                meta.name,
                meta.attempt.to_string(),
                output::short_id(&c.pod_sandbox_id),
                pod_names
                    .get(c.pod_sandbox_id.as_str())
                    .copied()
                    .unwrap_or_default()
                    .to_owned(),
            ]
        })
        .collect();
    output::table(
        &[
            "CONTAINER",
            "IMAGE",
            "CREATED",
            "STATE",
            "NAME",
            "ATTEMPT",
            "POD ID",
            "POD",
        ],
        &rows,
    )
}

fn pods_table(pods: &[cri::PodSandbox]) -> String {
    let rows: Vec<Vec<String>> = pods
        .iter()
        .map(|p| {
            let meta = p.metadata.clone().unwrap_or_default();
            vec![
                output::short_id(&p.id),
                output::ago(p.created_at),
                output::pod_state(p.state).into(),
                meta.name,
                meta.namespace,
                meta.attempt.to_string(),
                if p.runtime_handler.is_empty() {
                    "(default)".into()
                } else {
                    p.runtime_handler.clone()
                },
            ]
        })
        .collect();
    output::table(
        &[
            "POD ID",
            "CREATED",
            "STATE",
            "NAME",
            "NAMESPACE",
            "ATTEMPT",
            "RUNTIME",
        ],
        &rows,
    )
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
    fn ids_resolve_by_prefix() {
        let ids = ["abc123", "abd456", "x"];
        assert_eq!(
            resolve("pod", "abc", ids.iter().copied()).unwrap(),
            "abc123"
        );
        assert_eq!(resolve("pod", "x", ids.iter().copied()).unwrap(), "x");
        assert_eq!(resolve("pod", "zz", ids.iter().copied()).unwrap(), "zz");
        assert!(resolve("pod", "ab", ids.iter().copied()).is_err());
    }

    #[test]
    fn image_names() {
        assert_eq!(image_name("127.0.0.1:5000/husk/busybox:latest"), "busybox");
        assert_eq!(image_name("busybox@sha256:abc"), "busybox");
        assert_eq!(image_name("my_img"), "my-img");
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
