//! The `Agent` gRPC service.

use husk_proto::v1;
use husk_proto::v1::agent_server::Agent;
use husk_proto::v1::{
    PingRequest, PingResponse, ShutdownRequest, ShutdownResponse, VersionRequest, VersionResponse,
};
use husk_proto::PROTOCOL_VERSION;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::stop::StopHandle;

pub struct AgentService {
    stop: StopHandle,
}

impl AgentService {
    pub fn new(stop: StopHandle) -> Self {
        AgentService { stop }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse {}))
    }

    async fn version(
        &self,
        _: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol_version: PROTOCOL_VERSION,
        }))
    }

    /// Only raises the stop request: the server drains gracefully, so this
    /// reply still reaches the caller before the agent ends.
    async fn shutdown(
        &self,
        _: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        info!("shutdown requested");
        self.stop.request();
        Ok(Response::new(ShutdownResponse {}))
    }

    async fn setup_sandbox(
        &self,
        _: Request<v1::SetupSandboxRequest>,
    ) -> Result<Response<v1::SetupSandboxResponse>, Status> {
        Err(Status::unimplemented("setup_sandbox"))
    }

    async fn create_container(
        &self,
        _: Request<v1::CreateContainerRequest>,
    ) -> Result<Response<v1::CreateContainerResponse>, Status> {
        Err(Status::unimplemented("create_container"))
    }

    async fn start_container(
        &self,
        _: Request<v1::StartContainerRequest>,
    ) -> Result<Response<v1::StartContainerResponse>, Status> {
        Err(Status::unimplemented("start_container"))
    }

    async fn exec_process(
        &self,
        _: Request<v1::ExecProcessRequest>,
    ) -> Result<Response<v1::ExecProcessResponse>, Status> {
        Err(Status::unimplemented("exec_process"))
    }

    async fn signal_process(
        &self,
        _: Request<v1::SignalProcessRequest>,
    ) -> Result<Response<v1::SignalProcessResponse>, Status> {
        Err(Status::unimplemented("signal_process"))
    }

    async fn wait_process(
        &self,
        _: Request<v1::WaitProcessRequest>,
    ) -> Result<Response<v1::WaitProcessResponse>, Status> {
        Err(Status::unimplemented("wait_process"))
    }

    async fn container_status(
        &self,
        _: Request<v1::ContainerStatusRequest>,
    ) -> Result<Response<v1::ContainerStatusResponse>, Status> {
        Err(Status::unimplemented("container_status"))
    }

    async fn remove_container(
        &self,
        _: Request<v1::RemoveContainerRequest>,
    ) -> Result<Response<v1::RemoveContainerResponse>, Status> {
        Err(Status::unimplemented("remove_container"))
    }

    async fn resize_tty(
        &self,
        _: Request<v1::ResizeTtyRequest>,
    ) -> Result<Response<v1::ResizeTtyResponse>, Status> {
        Err(Status::unimplemented("resize_tty"))
    }

    async fn copy_file(
        &self,
        _: Request<v1::CopyFileRequest>,
    ) -> Result<Response<v1::CopyFileResponse>, Status> {
        Err(Status::unimplemented("copy_file"))
    }

    async fn update_container_resources(
        &self,
        _: Request<v1::UpdateContainerResourcesRequest>,
    ) -> Result<Response<v1::UpdateContainerResourcesResponse>, Status> {
        Err(Status::unimplemented("update_container_resources"))
    }

    async fn stats(
        &self,
        _: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        Err(Status::unimplemented("stats"))
    }

    type ReadOutputStream = tokio_stream::Empty<Result<v1::OutputChunk, Status>>;
    async fn read_output(
        &self,
        _: Request<v1::ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        Err(Status::unimplemented("read_output"))
    }
    async fn write_stdin(
        &self,
        _: Request<tonic::Streaming<v1::StdinChunk>>,
    ) -> Result<Response<v1::WriteStdinResponse>, Status> {
        Err(Status::unimplemented("write_stdin"))
    }
}
