//! Exec: starting a command in a running container (ExecSync, and the
//! streaming server's Exec), and collecting its output.

use futures_util::StreamExt;
use husk_proto::client::Agent;
use husk_proto::v1 as agent;

use super::{agent_err, new_id, process, CriError, Manager, Result};

/// ExecSync keeps at most this much of each stream, as containerd does.
const MAX_EXEC_OUTPUT: usize = 16 << 20;

pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

/// How an exec'd process is wired: a tty, a stdin.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExecIo {
    pub tty: bool,
    pub stdin: bool,
    /// The terminal's size at the start, as (rows, columns).
    pub console: Option<(u16, u16)>,
}

/// Reads a stream to its end, keeping at most `cap` bytes.
async fn collect(
    mut client: Agent,
    container: String,
    exec: String,
    stream: agent::OutputStream,
    cap: usize,
) -> Result<Vec<u8>> {
    let mut chunks = client
        .read_output(agent::ReadOutputRequest {
            process: process(&container, &exec),
            stream: stream.into(),
        })
        .await
        .map_err(agent_err(format!(
            "reading the output of exec {exec} in {container}"
        )))?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(agent_err(format!(
            "reading the output of exec {exec} in {container}"
        )))?;
        let room = cap.saturating_sub(out.len());
        out.extend_from_slice(&chunk.data[..chunk.data.len().min(room)]);
    }
    Ok(out)
}

impl Manager {
    /// Starts `cmd` in a running container; returns the agent and the exec id.
    pub async fn start_exec(
        &self,
        id: &str,
        cmd: &[String],
        io: ExecIo,
        timeout_ms: u32,
    ) -> Result<(Agent, String)> {
        if cmd.is_empty() {
            return Err(CriError::InvalidArgument("exec needs a command".into()));
        }
        let (_, pod) = self.running_container(id).await?;
        let mut client = self.agent(&pod).await?;
        let exec_id = new_id()?[..16].to_owned();
        let mut process = serde_json::json!({ "args": cmd, "terminal": io.tty });
        if let Some((rows, cols)) = io.console.filter(|_| io.tty) {
            process["consoleSize"] = serde_json::json!({ "height": rows, "width": cols });
        }
        client
            .exec_process(agent::ExecProcessRequest {
                container_id: id.to_owned(),
                exec_id: exec_id.clone(),
                oci_process_json: serde_json::to_vec(&process).map_err(|e| CriError::Io {
                    what: "encoding the exec process".into(),
                    source: e.into(),
                })?,
                stdin: io.stdin,
                timeout_ms,
            })
            .await
            .map_err(agent_err(format!("exec in container {id}")))?;
        Ok((client, exec_id))
    }

    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout_s: i64,
    ) -> Result<ExecOutput> {
        let timeout_ms = u32::try_from(timeout_s.max(0).saturating_mul(1000)).unwrap_or(u32::MAX);
        let (mut client, exec_id) = self
            .start_exec(id, &cmd, ExecIo::default(), timeout_ms)
            .await?;
        let stdout = tokio::spawn(collect(
            client.clone(),
            id.to_owned(),
            exec_id.clone(),
            agent::OutputStream::Stdout,
            MAX_EXEC_OUTPUT,
        ));
        let stderr = tokio::spawn(collect(
            client.clone(),
            id.to_owned(),
            exec_id.clone(),
            agent::OutputStream::Stderr,
            MAX_EXEC_OUTPUT,
        ));
        let exit = client
            .wait_process(agent::WaitProcessRequest {
                process: process(id, &exec_id),
            })
            .await
            .map_err(agent_err(format!("waiting for exec in container {id}")))?
            .into_inner()
            .status
            .unwrap_or_default();
        let join =
            |r: std::result::Result<Result<Vec<u8>>, tokio::task::JoinError>| -> Result<Vec<u8>> {
                r.map_err(|e| CriError::Io {
                    what: "collecting exec output".into(),
                    source: std::io::Error::other(e),
                })?
            };
        let stdout = join(stdout.await)?;
        let stderr = join(stderr.await)?;
        if exit.timed_out {
            return Err(CriError::DeadlineExceeded(format!(
                "command {cmd:?} in container {id} timed out after {timeout_s}s"
            )));
        }
        Ok(ExecOutput {
            stdout,
            stderr,
            exit_code: exit.exit_code,
        })
    }
}
