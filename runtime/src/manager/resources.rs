//! UpdateContainerResources: new cgroup limits for a created or running
//! container, applied by its agent and kept in its record, so that
//! ContainerStatus reports them.

use husk_proto::v1 as agent;
use k8s_cri::v1 as cri;
use tracing::{info, instrument};

use super::{agent_err, spec, CriError, Manager, Result};
use crate::state::ContainerState;

impl Manager {
    /// Applies `linux` to the container's cgroup. Fields left 0 keep their
    /// current value, as in containerd. Nothing to apply (no Linux
    /// resources) succeeds.
    #[instrument(skip_all, fields(container = id))]
    pub async fn update_container_resources(
        &self,
        id: &str,
        linux: Option<cri::LinuxContainerResources>,
    ) -> Result<()> {
        let record = self.refreshed(self.container(id)?).await?;
        if !matches!(
            record.state,
            ContainerState::Created | ContainerState::Running
        ) {
            return Err(CriError::FailedPrecondition(format!(
                "container {id} is {:?}: only a created or running container's resources change",
                record.state
            )));
        }
        let Some(linux) = linux else {
            return Ok(());
        };
        let json = serde_json::to_vec(&spec::resources(&linux)).map_err(|e| CriError::Io {
            what: "encoding linux.resources".into(),
            source: e.into(),
        })?;
        let pod = self.ready_pod(&record.pod_id).await?;
        let mut client = self.agent(&pod).await?;
        client
            .update_container_resources(agent::UpdateContainerResourcesRequest {
                container_id: id.to_owned(),
                oci_resources_json: json,
            })
            .await
            .map_err(agent_err(format!(
                "updating the resources of container {id}"
            )))?;
        self.update_container(id, |r| {
            r.config
                .linux
                .get_or_insert_with(Default::default)
                .resources = Some(linux);
        })?;
        info!(container = id, "container resources updated");
        Ok(())
    }
}
