//! Container commands: `create`, `start`, `ps`, `inspect`, `stop`, `rm`, and
//! the container calls the other commands share.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use k8s_cri::v1 as cri;

use crate::args::CreateArgs;
use crate::client::{resolve, CliError, Huskd, Result};
use crate::config;
use crate::images::{image_name, image_spec};
use crate::output::{self, Format};
use crate::pods::{config_from_status, list_pods, pod_status, resolve_pod};

/// `create POD ...`: prints the new container's id.
pub async fn create_and_print(h: &mut Huskd, out: &mut impl Write, args: CreateArgs) -> Result<()> {
    let id = create(h, args).await?;
    output::print(out, &format!("{id}\n"))
}

/// `start CONTAINER...`.
pub async fn start_each(
    h: &mut Huskd,
    out: &mut impl Write,
    containers: Vec<String>,
) -> Result<()> {
    for id in containers {
        let id = resolve_container(h, &id).await?;
        start_container(h, &id).await?;
        output::print(out, &format!("{id}\n"))?;
    }
    Ok(())
}

/// `ps`: running containers (all with `all`), newest first.
pub async fn list(
    h: &mut Huskd,
    out: &mut impl Write,
    all: bool,
    pod: Option<String>,
    quiet: bool,
    format: Format,
) -> Result<()> {
    let pod_sandbox_id = match pod {
        Some(pod) => resolve_pod(h, &pod).await?,
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
    // The table names each container's pod.
    let pods = match quiet || format == Format::Json {
        true => Vec::new(),
        false => list_pods(h).await?,
    };
    let text = output::listing(
        &response,
        response.containers.iter().map(|c| c.id.clone()),
        quiet,
        format,
        || containers_table(&response.containers, &pods),
    )?;
    output::print(out, &text)
}

/// `inspect CONTAINER`: the verbose status as JSON.
pub async fn inspect(h: &mut Huskd, out: &mut impl Write, container: &str) -> Result<()> {
    let id = resolve_container(h, container).await?;
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
    output::print(out, &output::json(&response)?)
}

/// `stop [-t SECONDS] CONTAINER...`.
pub async fn stop_each(
    h: &mut Huskd,
    out: &mut impl Write,
    grace: i64,
    containers: Vec<String>,
) -> Result<()> {
    for id in containers {
        let id = resolve_container(h, &id).await?;
        stop_container(h, &id, grace).await?;
        output::print(out, &format!("{id}\n"))?;
    }
    Ok(())
}

/// `rm [-f] CONTAINER...`: a running one only with `force`.
pub async fn remove_each(
    h: &mut Huskd,
    out: &mut impl Write,
    force: bool,
    containers: Vec<String>,
) -> Result<()> {
    for id in containers {
        let id = resolve_container(h, &id).await?;
        if !force {
            let status = container_status(h, &id).await?;
            if status.state == cri::ContainerState::ContainerRunning as i32 {
                return Err(CliError::Usage(format!(
                    "container {id} is running: stop it first, or rm -f"
                )));
            }
        }
        remove_container(h, &id).await?;
        output::print(out, &format!("{id}\n"))?;
    }
    Ok(())
}

pub async fn start_container(h: &mut Huskd, id: &str) -> Result<()> {
    h.rt.start_container(h.request(
        cri::StartContainerRequest {
            container_id: id.to_owned(),
        },
        Duration::ZERO,
    ))
    .await
    .map_err(h.failed(format!("StartContainer {id}")))?;
    Ok(())
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

pub async fn create_container(
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

pub async fn container_status(h: &mut Huskd, id: &str) -> Result<cri::ContainerStatus> {
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

pub async fn resolve_container(h: &mut Huskd, id: &str) -> Result<String> {
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

pub async fn stop_container(h: &mut Huskd, id: &str, grace: i64) -> Result<()> {
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

pub async fn remove_container(h: &mut Huskd, id: &str) -> Result<()> {
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
