//! Commands that run in a container: `exec` (ExecSync, or a stream with
//! `-i`/`--tty`) and `attach`, both streams through huskd's streaming server.

use std::io::Write;
use std::time::Duration;

use k8s_cri::v1 as cri;

use crate::client::{CliError, Huskd, Result};
use crate::containers::resolve_container;
use crate::stream;

/// `exec [-t SECONDS] [-i] [--tty] CONTAINER -- CMD...`: the command's exit code.
pub async fn exec(
    h: &mut Huskd,
    container: &str,
    timeout: i64,
    interactive: bool,
    tty: bool,
    cmd: Vec<String>,
) -> Result<i32> {
    if !(interactive || tty) {
        return exec_sync(h, container, timeout, cmd).await;
    }
    if timeout != 0 {
        return Err(CliError::Usage(
            "exec -t SECONDS cannot limit an -i or --tty exec".into(),
        ));
    }
    let id = resolve_container(h, container).await?;
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
    stream::run(&url, interactive, tty).await
}

/// `attach [-i] [--tty] CONTAINER`: until it exits or Ctrl-C.
pub async fn attach(h: &mut Huskd, container: &str, interactive: bool, tty: bool) -> Result<i32> {
    let id = resolve_container(h, container).await?;
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
    stream::run(&url, interactive, tty).await
}

async fn exec_sync(h: &mut Huskd, container: &str, timeout: i64, cmd: Vec<String>) -> Result<i32> {
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
