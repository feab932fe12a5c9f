//! A running container's output in its log file and to the clients attached
//! to it (CRI Attach): the copiers of its streams, attached when it starts
//! and again when a restarted huskd finds it running, the watcher that
//! records its exit, and ReopenContainerLog.

use std::sync::{Arc, Weak};
use std::time::Duration;

use husk_proto::client::Agent;
use husk_proto::v1 as agent;
use tonic::Streaming;
use tracing::{info, instrument, warn};

use super::attach::AttachPoint;
use super::container::{apply_exit, process};
use super::logs::{copy_stream, LogFile};
use super::{agent_err, CriError, Manager, Result};
use crate::state::{ContainerRecord, ContainerState, PodState};

/// How often a re-attaching huskd asks again for a stream that the agent
/// still serves to the reader of the huskd before.
const REATTACH_POLL: Duration = Duration::from_millis(500);

/// The streams a container has: a tty has only stdout.
fn streams(record: &ContainerRecord) -> &'static [(agent::OutputStream, &'static str)] {
    if record.config.tty {
        &[(agent::OutputStream::Stdout, "stdout")]
    } else {
        &[
            (agent::OutputStream::Stdout, "stdout"),
            (agent::OutputStream::Stderr, "stderr"),
        ]
    }
}

fn read_request(id: &str, stream: agent::OutputStream) -> agent::ReadOutputRequest {
    agent::ReadOutputRequest {
        process: process(id, ""),
        stream: stream.into(),
    }
}

impl Manager {
    /// Opens the container's log file (appending) and registers it for
    /// ReopenContainerLog while its copiers hold it. None without a log path.
    fn open_log(&self, record: &ContainerRecord) -> Result<Option<Arc<LogFile>>> {
        let Some(path) = &record.log_path else {
            return Ok(None);
        };
        let log = LogFile::open(path).map_err(|source| CriError::Io {
            what: format!("opening the log file {}", path.display()),
            source,
        })?;
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.retain(|_, open| open.strong_count() > 0);
        logs.insert(record.id.clone(), Arc::downgrade(&log));
        Ok(Some(log))
    }

    /// A fresh attach point for the container, replacing any before: what
    /// its copiers pass output to from now on.
    fn open_attach_point(&self, id: &str) -> Arc<AttachPoint> {
        let point = Arc::new(AttachPoint::default());
        let before = self
            .attach
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), point.clone());
        if let Some(before) = before {
            before.close();
        }
        point
    }

    /// Before StartContainer: copies the container's streams into its log
    /// and to attached clients from their first byte.
    pub(super) async fn attach_output(
        &self,
        client: &mut Agent,
        record: &ContainerRecord,
    ) -> Result<()> {
        let log = self.open_log(record)?;
        let point = self.open_attach_point(&record.id);
        for &(stream, name) in streams(record) {
            let chunks = client
                .read_output(read_request(&record.id, stream))
                .await
                .map_err(agent_err(format!(
                    "reading the {name} of container {}",
                    record.id
                )))?
                .into_inner();
            tokio::spawn(copy_stream(
                chunks,
                name,
                log.clone(),
                point.publisher(),
                record.id.clone(),
            ));
        }
        Ok(())
    }

    /// After a huskd restart: copies what the running container writes from
    /// now on (and what waits in its pipes) into its log and to attached
    /// clients again.
    fn reattach_output(self: &Arc<Self>, client: &Agent, record: &ContainerRecord) -> Result<()> {
        let log = self.open_log(record)?;
        let point = self.open_attach_point(&record.id);
        for &(stream, name) in streams(record) {
            let manager = self.clone();
            let client = client.clone();
            let id = record.id.clone();
            let log = log.clone();
            let attached = point.publisher();
            tokio::spawn(async move {
                if let Some(chunks) = manager.read_output_when_free(client, &id, stream).await {
                    info!(container = id, stream = name, "output re-attached");
                    copy_stream(chunks, name, log, attached, id).await;
                }
            });
        }
        Ok(())
    }

    /// ReadOutput, asked again while the agent still serves the stream to
    /// the reader of the huskd before: the agent takes it back when that
    /// reader's next chunk finds it gone. None once the container stopped
    /// running or the agent refuses otherwise.
    async fn read_output_when_free(
        &self,
        mut client: Agent,
        id: &str,
        stream: agent::OutputStream,
    ) -> Option<Streaming<agent::OutputChunk>> {
        loop {
            let status = match client.read_output(read_request(id, stream)).await {
                Ok(response) => return Some(response.into_inner()),
                Err(status) => status,
            };
            let running = matches!(
                self.state.container(id),
                Ok(Some(r)) if r.state == ContainerState::Running
            );
            if !running {
                return None;
            }
            if status.code() != tonic::Code::FailedPrecondition {
                warn!(
                    container = id,
                    stream = stream.as_str_name(),
                    "cannot re-attach to the output: {}",
                    status.message()
                );
                return None;
            }
            tokio::time::sleep(REATTACH_POLL).await;
        }
    }

    /// Records the container's exit as soon as the agent reports it; then
    /// (or once the agent is gone) attached clients see the end of output.
    pub(super) fn watch_exit(self: &Arc<Self>, mut client: Agent, id: String) {
        let manager = self.clone();
        tokio::spawn(async move {
            let waited = client
                .wait_process(agent::WaitProcessRequest {
                    process: process(&id, ""),
                })
                .await;
            if let Ok(response) = waited {
                if let Some(exit) = response.into_inner().status {
                    let recorded = manager.update_container(&id, |r| {
                        if r.state != ContainerState::Exited {
                            apply_exit(r, &exit);
                        }
                    });
                    match recorded {
                        // Removed meanwhile (RemoveContainer kills first).
                        Ok(_) | Err(CriError::NotFound(_)) => {}
                        Err(e) => warn!(container = id, "recording the exit: {e}"),
                    }
                    info!(
                        container = id,
                        exit_code = exit.exit_code,
                        "container exited"
                    );
                }
            }
            manager.forget_attach_point(&id);
        });
    }

    /// At startup: the running containers of ready pods get their log
    /// copiers and exit watchers back.
    #[instrument(skip_all)]
    pub async fn reattach_running(self: &Arc<Self>) -> Result<()> {
        for record in self.state.containers()? {
            if record.state != ContainerState::Running {
                continue;
            }
            let client = match self.live_pod(&record.pod_id).await {
                Ok(pod) if pod.state == PodState::Ready => self.agent(&pod).await,
                Ok(_) => continue,
                Err(e) => Err(e),
            };
            let client = match client {
                Ok(client) => client,
                Err(e) => {
                    warn!(container = %record.id, "cannot re-attach: {e}");
                    continue;
                }
            };
            if let Err(e) = self.reattach_output(&client, &record) {
                warn!(container = %record.id, "cannot re-attach: {e}");
            }
            self.watch_exit(client, record.id.clone());
        }
        Ok(())
    }

    /// Closes the running container's log file and opens its path again,
    /// after kubelet renamed it away.
    #[instrument(skip(self))]
    pub async fn reopen_container_log(&self, id: &str) -> Result<()> {
        let record = self.refreshed(self.container(id)?).await?;
        if record.state != ContainerState::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let log = self
            .logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .and_then(Weak::upgrade)
            .ok_or_else(|| {
                CriError::FailedPrecondition(format!(
                    "container {id} has no log file open (its config has no log path)"
                ))
            })?;
        log.reopen().map_err(|source| CriError::Io {
            what: format!("reopening the log file {}", log.path().display()),
            source,
        })?;
        info!(container = id, log = %log.path().display(), "log reopened");
        Ok(())
    }
}
