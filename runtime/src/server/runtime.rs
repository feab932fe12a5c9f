//! CRI RuntimeService: Version and Status here, pods and containers in
//! [`Manager`], everything else `Unimplemented` with the reason.

use std::pin::Pin;
use std::sync::Arc;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};

use crate::manager::{CriError, Manager};
use crate::streaming::{forwardable_pod, Request as StreamRequest, Streaming};

/// The CRI API version huskd serves.
pub const CRI_API_VERSION: &str = "v1";
/// What Version reports as runtime_name.
pub const RUNTIME_NAME: &str = "husk";

pub struct Runtime {
    manager: Arc<Manager>,
    /// The streaming server, or why huskd has none.
    streaming: Result<Arc<Streaming>, String>,
}

impl Runtime {
    pub fn new(manager: Arc<Manager>, streaming: Result<Arc<Streaming>, String>) -> Runtime {
        Runtime { manager, streaming }
    }

    fn streaming(&self) -> Result<&Streaming, Status> {
        self.streaming
            .as_deref()
            .map_err(|why| Status::unavailable(format!("huskd has no streaming server: {why}")))
    }
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("husk does not implement {what} yet"))
}

/// Runs a call that starts or ends something to its end, whatever the client
/// does. tonic drops a handler's future when its client gives up (a
/// deadline, Ctrl-C): a RunPodSandbox dropped mid-boot left its VM, network
/// namespace and lease behind, and a dropped StopContainer never killed the
/// container. As containerd's CRI plugin defers its cleanup, the work runs
/// in a task of its own; a client that left just does not hear the answer.
async fn to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, CriError>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work)
        .await
        .map_err(|e| Status::internal(format!("huskd's handler failed: {e}")))?
        .map_err(Status::from)
}

impl Runtime {
    /// The full id of the pod a request names (by id or unique prefix).
    fn pod_id(&self, id: &str) -> Result<String, Status> {
        let id = required(id, "pod_sandbox_id")?;
        Ok(self.manager.resolve_pod(id)?)
    }

    /// The full id of the container a request names (by id or unique prefix).
    fn container_id(&self, id: &str) -> Result<String, Status> {
        let id = required(id, "container_id")?;
        Ok(self.manager.resolve_container(id)?)
    }
}

/// For the calls the CRI makes idempotent (stopping and removing): an id
/// that names nothing means there is nothing left to do.
fn unless_gone(id: Result<String, Status>) -> Result<Option<String>, Status> {
    match id {
        Ok(id) => Ok(Some(id)),
        Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
        Err(status) => Err(status),
    }
}

fn required<'a>(id: &'a str, what: &str) -> Result<&'a str, Status> {
    if id.is_empty() {
        Err(Status::invalid_argument(format!("{what} is required")))
    } else {
        Ok(id)
    }
}

type EventStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RuntimeService for Runtime {
    async fn version(
        &self,
        _request: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_API_VERSION.into(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let request = request.into_inner();
        let config = request
            .config
            .ok_or_else(|| Status::invalid_argument("RunPodSandbox needs a config"))?;
        let manager = self.manager.clone();
        let id = to_completion(async move {
            manager
                .run_pod_sandbox(config, &request.runtime_handler)
                .await
        })
        .await?;
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let request = request.into_inner();
        let Some(id) = unless_gone(self.pod_id(&request.pod_sandbox_id))? else {
            return Ok(Response::new(cri::StopPodSandboxResponse {}));
        };
        let manager = self.manager.clone();
        to_completion(async move { manager.stop_pod_sandbox(&id).await }).await?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let request = request.into_inner();
        let Some(id) = unless_gone(self.pod_id(&request.pod_sandbox_id))? else {
            return Ok(Response::new(cri::RemovePodSandboxResponse {}));
        };
        let manager = self.manager.clone();
        to_completion(async move { manager.remove_pod_sandbox(&id).await }).await?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let request = request.into_inner();
        let id = &self.pod_id(&request.pod_sandbox_id)?;
        let (status, info) = self.manager.pod_sandbox_status(id, request.verbose).await?;
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(status),
            info,
            ..Default::default()
        }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let items = self
            .manager
            .list_pod_sandbox(request.into_inner().filter)
            .await?;
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let request = request.into_inner();
        let pod = self.pod_id(&request.pod_sandbox_id)?;
        let config = request
            .config
            .ok_or_else(|| Status::invalid_argument("CreateContainer needs a config"))?;
        let manager = self.manager.clone();
        let id = to_completion(async move { manager.create_container(&pod, config).await }).await?;
        Ok(Response::new(cri::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        request: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let request = request.into_inner();
        let id = self.container_id(&request.container_id)?;
        let manager = self.manager.clone();
        to_completion(async move { manager.start_container(&id).await }).await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let request = request.into_inner();
        let Some(id) = unless_gone(self.container_id(&request.container_id))? else {
            return Ok(Response::new(cri::StopContainerResponse {}));
        };
        let manager = self.manager.clone();
        to_completion(async move { manager.stop_container(&id, request.timeout).await }).await?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let request = request.into_inner();
        let Some(id) = unless_gone(self.container_id(&request.container_id))? else {
            return Ok(Response::new(cri::RemoveContainerResponse {}));
        };
        let manager = self.manager.clone();
        to_completion(async move { manager.remove_container(&id).await }).await?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let containers = self
            .manager
            .list_containers(request.into_inner().filter)
            .await?;
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let request = request.into_inner();
        let id = &self.container_id(&request.container_id)?;
        let status = self.manager.container_status(id).await?;
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(status),
            info: Default::default(),
        }))
    }

    async fn update_container_resources(
        &self,
        request: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let request = request.into_inner();
        let id = &self.container_id(&request.container_id)?;
        self.manager
            .update_container_resources(id, request.linux)
            .await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        request: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let request = request.into_inner();
        let id = &self.container_id(&request.container_id)?;
        self.manager.reopen_container_log(id).await?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        request: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let request = request.into_inner();
        let id = &self.container_id(&request.container_id)?;
        let out = self
            .manager
            .exec_sync(id, request.cmd, request.timeout)
            .await?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
        }))
    }

    async fn exec(
        &self,
        request: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let request = request.into_inner();
        let id = &self.container_id(&request.container_id)?;
        if request.cmd.is_empty() {
            return Err(Status::invalid_argument("Exec needs a command"));
        }
        if !(request.stdin || request.stdout || request.stderr) {
            return Err(Status::invalid_argument(
                "Exec needs one of stdin, stdout and stderr",
            ));
        }
        if request.tty && request.stderr {
            return Err(Status::invalid_argument(
                "Exec with a tty has no separate stderr: set stderr false",
            ));
        }
        self.manager.running_container(id).await?;
        let url = self.streaming()?.url(StreamRequest::Exec(request))?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(
        &self,
        request: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let request = request.into_inner();
        let id = &self.container_id(&request.container_id)?;
        if !(request.stdin || request.stdout || request.stderr) {
            return Err(Status::invalid_argument(
                "Attach needs one of stdin, stdout and stderr",
            ));
        }
        let (record, _) = self.manager.running_container(id).await?;
        if request.stdin && !record.config.stdin {
            return Err(Status::invalid_argument(format!(
                "container {id} was created without stdin"
            )));
        }
        self.manager.attach_point(id)?;
        let url = self.streaming()?.url(StreamRequest::Attach(request))?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let request = request.into_inner();
        let id = &self.pod_id(&request.pod_sandbox_id)?;
        forwardable_pod(&self.manager, id)?;
        let url = self.streaming()?.url(StreamRequest::PortForward(request))?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        request: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let request = request.into_inner();
        let id = &self.container_id(&request.container_id)?;
        let stats = self.manager.one_container_stats(id).await?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let stats = self
            .manager
            .container_stats(request.into_inner().filter)
            .await?;
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let request = request.into_inner();
        let id = &self.pod_id(&request.pod_sandbox_id)?;
        let stats = self.manager.pod_sandbox_stats(id).await?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let stats = self
            .manager
            .list_pod_sandbox_stats(request.into_inner().filter)
            .await?;
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        _request: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        // kubelet sends the pod CIDR here; pod networking is not implemented,
        // so there is nothing to update yet, and kubelet needs a success.
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn status(
        &self,
        _request: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let network = self.manager.config.network.ready();
        let conditions = vec![
            cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: network.is_ok(),
                reason: match network {
                    Ok(()) => String::new(),
                    Err(_) => "NetworkPluginNotReady".into(),
                },
                message: network
                    .as_ref()
                    .err()
                    .map(|e| format!("cni config uninitialized: {e}"))
                    .unwrap_or_default(),
            },
        ];
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            // User namespaces: no driver has them.
            runtime_handlers: self
                .manager
                .drivers()
                .map(|driver| cri::RuntimeHandler {
                    name: driver.name().into(),
                    features: Some(cri::RuntimeHandlerFeatures {
                        recursive_read_only_mounts: driver.recursive_read_only_mounts(),
                        user_namespaces: false,
                    }),
                })
                .collect(),
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: true,
            }),
            ..Default::default()
        }))
    }

    async fn checkpoint_container(
        &self,
        _request: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        Err(unimplemented("CheckpointContainer"))
    }

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(
        &self,
        _request: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        Err(unimplemented("GetContainerEvents (evented PLEG)"))
    }

    async fn list_metric_descriptors(
        &self,
        _request: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Err(unimplemented("ListMetricDescriptors"))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _request: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        Err(unimplemented("ListPodSandboxMetrics"))
    }

    async fn runtime_config(
        &self,
        _request: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        // kubelet builds its pod cgroup hierarchy to match: husk places pods
        // by cgroup path (husk/<pod>/<container>), not through systemd units.
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs.into(),
            }),
        }))
    }
}
