//! The `Agent` gRPC service: each RPC maps onto the sandbox or its containers.

use std::sync::Arc;

use husk_proto::v1::agent_server::Agent;
use husk_proto::v1::{self, OutputStream};
use husk_proto::PROTOCOL_VERSION;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

use crate::container::Containers;
use crate::forward;
use crate::sandbox::Sandbox;
use crate::stop::StopHandle;

/// Bytes per OutputChunk.
const OUTPUT_CHUNK: usize = 32 << 10;

pub struct AgentService {
    stop: StopHandle,
    sandbox: Sandbox,
    containers: Arc<Containers>,
}

impl AgentService {
    pub fn new(stop: StopHandle, sandbox: Sandbox, containers: Arc<Containers>) -> Self {
        AgentService {
            stop,
            sandbox,
            containers,
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn ping(
        &self,
        _: Request<v1::PingRequest>,
    ) -> Result<Response<v1::PingResponse>, Status> {
        Ok(Response::new(v1::PingResponse {}))
    }

    async fn version(
        &self,
        _: Request<v1::VersionRequest>,
    ) -> Result<Response<v1::VersionResponse>, Status> {
        Ok(Response::new(v1::VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol_version: PROTOCOL_VERSION,
        }))
    }

    /// Only raises the stop request: the server drains gracefully, so this
    /// reply still reaches the caller before the agent ends (and removes
    /// its containers).
    async fn shutdown(
        &self,
        _: Request<v1::ShutdownRequest>,
    ) -> Result<Response<v1::ShutdownResponse>, Status> {
        info!("shutdown requested");
        self.stop.request();
        Ok(Response::new(v1::ShutdownResponse {}))
    }

    async fn setup_sandbox(
        &self,
        request: Request<v1::SetupSandboxRequest>,
    ) -> Result<Response<v1::SetupSandboxResponse>, Status> {
        let request = request.into_inner();
        self.containers.set_sandbox(&request.sandbox_id)?;
        let dirs = self.sandbox.setup(&request)?;
        Ok(Response::new(v1::SetupSandboxResponse {
            shared_dir: dirs.shared.display().to_string(),
            volumes_dir: dirs
                .volumes
                .map(|dir| dir.display().to_string())
                .unwrap_or_default(),
        }))
    }

    async fn create_container(
        &self,
        request: Request<v1::CreateContainerRequest>,
    ) -> Result<Response<v1::CreateContainerResponse>, Status> {
        let pid = self.containers.create(request.into_inner()).await?;
        Ok(Response::new(v1::CreateContainerResponse { pid }))
    }

    async fn start_container(
        &self,
        request: Request<v1::StartContainerRequest>,
    ) -> Result<Response<v1::StartContainerResponse>, Status> {
        self.containers
            .start(&request.into_inner().container_id)
            .await?;
        Ok(Response::new(v1::StartContainerResponse {}))
    }

    async fn exec_process(
        &self,
        request: Request<v1::ExecProcessRequest>,
    ) -> Result<Response<v1::ExecProcessResponse>, Status> {
        let pid = self.containers.exec(request.into_inner()).await?;
        Ok(Response::new(v1::ExecProcessResponse { pid }))
    }

    async fn signal_process(
        &self,
        request: Request<v1::SignalProcessRequest>,
    ) -> Result<Response<v1::SignalProcessResponse>, Status> {
        let request = request.into_inner();
        self.containers
            .signal(request.process.as_ref(), request.signal)?;
        Ok(Response::new(v1::SignalProcessResponse {}))
    }

    async fn wait_process(
        &self,
        request: Request<v1::WaitProcessRequest>,
    ) -> Result<Response<v1::WaitProcessResponse>, Status> {
        let status = self
            .containers
            .wait(request.into_inner().process.as_ref())
            .await?;
        Ok(Response::new(v1::WaitProcessResponse {
            status: Some(status),
        }))
    }

    async fn container_status(
        &self,
        request: Request<v1::ContainerStatusRequest>,
    ) -> Result<Response<v1::ContainerStatusResponse>, Status> {
        let status = self
            .containers
            .status(&request.into_inner().container_id)
            .await?;
        Ok(Response::new(status))
    }

    async fn remove_container(
        &self,
        request: Request<v1::RemoveContainerRequest>,
    ) -> Result<Response<v1::RemoveContainerResponse>, Status> {
        let request = request.into_inner();
        self.containers
            .remove(&request.container_id, request.force)
            .await?;
        Ok(Response::new(v1::RemoveContainerResponse {}))
    }

    type ReadOutputStream = ReceiverStream<Result<v1::OutputChunk, Status>>;

    /// Streams from the process's pipe; if the reader goes away before the
    /// end, the pipe goes back for the next reader, so no output is lost
    /// and the process never meets a closed pipe.
    async fn read_output(
        &self,
        request: Request<v1::ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        let request = request.into_inner();
        let entry = self.containers.process(request.process.as_ref())?;
        let stream = OutputStream::try_from(request.stream)
            .map_err(|_| Status::invalid_argument(format!("unknown stream {}", request.stream)))?;
        let output = {
            let slot = match stream {
                OutputStream::Stdout => &entry.io.stdout,
                OutputStream::Stderr => &entry.io.stderr,
            };
            slot.lock().await.take().ok_or_else(|| {
                Status::failed_precondition(format!(
                    "the process's {} is being read already, or it has none (a tty has only stdout)",
                    stream.as_str_name()
                ))
            })?
        };
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut output = output;
            let mut buf = vec![0; OUTPUT_CHUNK];
            loop {
                let chunk = match output.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => Ok(v1::OutputChunk {
                        data: buf[..n].to_vec(),
                    }),
                    Err(err) => Err(Status::internal(format!("reading output: {err}"))),
                };
                let failed = chunk.is_err();
                if sender.send(chunk).await.is_err() {
                    // The reader left: keep the stream for the next one.
                    let slot = match stream {
                        OutputStream::Stdout => &entry.io.stdout,
                        OutputStream::Stderr => &entry.io.stderr,
                    };
                    *slot.lock().await = Some(output);
                    return;
                }
                if failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn write_stdin(
        &self,
        request: Request<Streaming<v1::StdinChunk>>,
    ) -> Result<Response<v1::WriteStdinResponse>, Status> {
        let mut chunks = request.into_inner();
        let Some(first) = chunks.next().await.transpose()? else {
            return Err(Status::invalid_argument("no stdin message"));
        };
        let entry = self.containers.process(first.process.as_ref())?;
        let mut input = entry.io.stdin.lock().await.take().ok_or_else(|| {
            Status::failed_precondition("the process has no open stdin, or another writer holds it")
        })?;
        let mut written = 0u64;
        let mut next = Some(first);
        while let Some(chunk) = next {
            input
                .write_all(&chunk.data)
                .await
                .map_err(|err| Status::aborted(format!("writing stdin: {err}")))?;
            written += chunk.data.len() as u64;
            if chunk.close_stdin {
                break;
            }
            next = chunks.next().await.transpose()?;
        }
        // The end of the client's stream or close_stdin: either way, the end of stdin.
        input
            .close()
            .await
            .map_err(|err| Status::aborted(format!("closing stdin: {err}")))?;
        Ok(Response::new(v1::WriteStdinResponse {
            bytes_written: written,
        }))
    }

    async fn resize_tty(
        &self,
        request: Request<v1::ResizeTtyRequest>,
    ) -> Result<Response<v1::ResizeTtyResponse>, Status> {
        let request = request.into_inner();
        let entry = self.containers.process(request.process.as_ref())?;
        let pty = entry
            .io
            .pty
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("the process has no tty"))?;
        let (rows, cols) = (
            u16::try_from(request.rows)
                .map_err(|_| Status::invalid_argument("rows out of range"))?,
            u16::try_from(request.cols)
                .map_err(|_| Status::invalid_argument("cols out of range"))?,
        );
        pty.resize(rows, cols)
            .map_err(|err| Status::internal(format!("resizing the tty: {err}")))?;
        Ok(Response::new(v1::ResizeTtyResponse {}))
    }

    async fn update_container_resources(
        &self,
        request: Request<v1::UpdateContainerResourcesRequest>,
    ) -> Result<Response<v1::UpdateContainerResourcesResponse>, Status> {
        let request = request.into_inner();
        self.containers
            .update_resources(&request.container_id, &request.oci_resources_json)?;
        Ok(Response::new(v1::UpdateContainerResourcesResponse {}))
    }

    async fn stats(
        &self,
        request: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        let stats = self.containers.stats(&request.into_inner().container_ids)?;
        Ok(Response::new(v1::StatsResponse { stats }))
    }

    type PortForwardStream = forward::ForwardStream;

    async fn port_forward(
        &self,
        request: Request<Streaming<v1::PortForwardRequest>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        Ok(Response::new(forward::start(request.into_inner()).await?))
    }
}
