//! Pod commands: `runp`, `pods`, `inspectp`, `stopp`, `rmp`, and the pod
//! calls the other commands share.

use std::io::Write;
use std::time::Duration;

use k8s_cri::v1 as cri;

use crate::args::{PodFlags, RunpArgs};
use crate::client::{resolve, CliError, Huskd, Result};
use crate::config;
use crate::output::{self, Format};

/// `runp [POD.json] [flags]`.
pub async fn runp(h: &mut Huskd, out: &mut impl Write, args: RunpArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => config::pod_config(&config::read_json(path)?)?,
        None => cri::PodSandboxConfig::default(),
    };
    apply_pod_flags(&mut config, args.name, args.uid, &args.pod)?;
    let id = run_pod(h, config, &args.pod.runtime).await?;
    output::print(out, &format!("{id}\n"))
}

/// `pods`, newest first.
pub async fn list(h: &mut Huskd, out: &mut impl Write, quiet: bool, format: Format) -> Result<()> {
    let mut response = h
        .rt
        .list_pod_sandbox(h.request(cri::ListPodSandboxRequest { filter: None }, Duration::ZERO))
        .await
        .map_err(h.failed("ListPodSandbox"))?
        .into_inner();
    response
        .items
        .sort_by_key(|p| std::cmp::Reverse(p.created_at));
    let text = output::listing(
        &response,
        response.items.iter().map(|p| p.id.clone()),
        quiet,
        format,
        || pods_table(&response.items),
    )?;
    output::print(out, &text)
}

/// `inspectp POD`: the verbose status as JSON.
pub async fn inspect(h: &mut Huskd, out: &mut impl Write, pod: &str) -> Result<()> {
    let id = resolve_pod(h, pod).await?;
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
    output::print(out, &output::json(&response)?)
}

/// `stopp POD...`.
pub async fn stop_each(h: &mut Huskd, out: &mut impl Write, pods: Vec<String>) -> Result<()> {
    for id in pods {
        let id = resolve_pod(h, &id).await?;
        stop_pod(h, &id).await?;
        output::print(out, &format!("Stopped sandbox {id}\n"))?;
    }
    Ok(())
}

/// `rmp POD...`.
pub async fn remove_each(h: &mut Huskd, out: &mut impl Write, pods: Vec<String>) -> Result<()> {
    for id in pods {
        let id = resolve_pod(h, &id).await?;
        remove_pod(h, &id).await?;
        output::print(out, &format!("Removed sandbox {id}\n"))?;
    }
    Ok(())
}

/// 16 random hex digits.
pub fn random_hex() -> String {
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

pub fn apply_pod_flags(
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

pub async fn run_pod(
    h: &mut Huskd,
    config: cri::PodSandboxConfig,
    handler: &str,
) -> Result<String> {
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
pub fn config_from_status(status: cri::PodSandboxStatus) -> cri::PodSandboxConfig {
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

pub async fn pod_status(h: &mut Huskd, id: &str) -> Result<cri::PodSandboxStatus> {
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

pub async fn list_pods(h: &mut Huskd) -> Result<Vec<cri::PodSandbox>> {
    Ok(h.rt
        .list_pod_sandbox(h.request(cri::ListPodSandboxRequest { filter: None }, Duration::ZERO))
        .await
        .map_err(h.failed("ListPodSandbox"))?
        .into_inner()
        .items)
}

pub async fn resolve_pod(h: &mut Huskd, id: &str) -> Result<String> {
    if id.is_empty() {
        return Err(CliError::Usage("an empty pod id".into()));
    }
    let pods = list_pods(h).await?;
    resolve("pod", id, pods.iter().map(|p| p.id.as_str()))
}

pub async fn stop_pod(h: &mut Huskd, id: &str) -> Result<()> {
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

pub async fn remove_pod(h: &mut Huskd, id: &str) -> Result<()> {
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
