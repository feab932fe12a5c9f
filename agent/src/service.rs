//! The `Agent` gRPC service.

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
}
