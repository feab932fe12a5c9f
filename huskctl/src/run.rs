//! `huskctl run`: pull if needed, a pod, one container, its output, and
//! everything removed again, whatever happens.

use std::path::PathBuf;

use k8s_cri::v1 as cri;

use crate::args::RunArgs;
use crate::client::{CliError, Huskd, Result};
use crate::containers::{container_status, create_container, remove_container, start_container};
use crate::images::{image_spec, present, pull};
use crate::logs::{self, follow_log};
use crate::pods::{apply_pod_flags, random_hex, remove_pod, run_pod, stop_pod};

/// `huskctl run`: the whole life of one container, cleaned up whatever happens.
pub async fn run_once(h: &mut Huskd, args: RunArgs) -> Result<i32> {
    if !present(h, &args.image).await? {
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
        start_container(h, &id).await?;
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
