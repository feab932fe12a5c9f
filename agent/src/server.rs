//! Serves the `Agent` service on the agent's listener until a stop request.

use std::time::Duration;

use husk_proto::v1::agent_server::AgentServer;
use tonic::transport::Server;
use tracing::warn;

use crate::listen::Incoming;
use crate::service::AgentService;
use crate::stop::StopSignal;

/// How long, after a stop request, open connections get to finish their
/// calls; a client holding a connection open must not keep the agent alive.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

pub async fn serve(
    incoming: Incoming,
    service: AgentService,
    stopped: StopSignal,
) -> Result<(), tonic::transport::Error> {
    let server = Server::builder()
        .add_service(AgentServer::new(service))
        .serve_with_incoming_shutdown(incoming, stopped.clone().requested());
    tokio::select! {
        result = server => result,
        () = drain_deadline(stopped) => {
            warn!("connections still open {DRAIN_GRACE:?} after the stop request; closing them");
            Ok(())
        }
    }
}

async fn drain_deadline(stopped: StopSignal) {
    stopped.requested().await;
    tokio::time::sleep(DRAIN_GRACE).await;
}
