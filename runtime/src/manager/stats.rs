//! Stats: ContainerStats, ListContainerStats, PodSandboxStats and
//! ListPodSandboxStats, from the cgroup counters each pod's agent reads.
//! A pod's figures are the sums of its running containers'.

use std::collections::BTreeMap;
use std::path::Path;

use husk_proto::v1 as agent;
use k8s_cri::v1 as cri;

use super::{agent_err, labels_match, now_ns, CriError, Manager, Result};
use crate::state::{ContainerRecord, ContainerState, PodRecord, PodState};

/// A running container's record with what its agent measured.
type Measured = (ContainerRecord, agent::ContainerStats);

impl Manager {
    /// The records of running containers that `keep` accepts, by pod.
    fn running_by_pod(
        &self,
        keep: impl Fn(&ContainerRecord) -> bool,
    ) -> Result<BTreeMap<String, Vec<ContainerRecord>>> {
        let mut by_pod: BTreeMap<String, Vec<ContainerRecord>> = BTreeMap::new();
        for record in self.state.containers()? {
            if record.state == ContainerState::Running && keep(&record) {
                by_pod
                    .entry(record.pod_id.clone())
                    .or_default()
                    .push(record);
            }
        }
        Ok(by_pod)
    }

    /// What the agent of the ready `pod` measures for `records`.
    async fn measure(
        &self,
        pod: &PodRecord,
        records: Vec<ContainerRecord>,
    ) -> Result<Vec<Measured>> {
        // The agent answers for all its containers when none are named.
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = self.agent(pod).await?;
        let stats = client
            .stats(agent::StatsRequest {
                container_ids: records.iter().map(|r| r.id.clone()).collect(),
            })
            .await
            .map_err(agent_err(format!("stats of pod {}", pod.id)))?
            .into_inner()
            .stats;
        Ok(stats
            .into_iter()
            .filter_map(|s| {
                let record = records.iter().find(|r| r.id == s.container_id)?;
                Some((record.clone(), s))
            })
            .collect())
    }

    /// Stats of running containers matching the filter.
    pub async fn container_stats(
        &self,
        filter: Option<cri::ContainerStatsFilter>,
    ) -> Result<Vec<cri::ContainerStats>> {
        let by_pod = self.running_by_pod(|record| match &filter {
            None => true,
            Some(f) => {
                (f.id.is_empty() || record.id.starts_with(&f.id))
                    && (f.pod_sandbox_id.is_empty() || record.pod_id.starts_with(&f.pod_sandbox_id))
                    && labels_match(&f.label_selector, &record.config.labels)
            }
        })?;
        let mut out = Vec::new();
        for (pod_id, records) in by_pod {
            let Ok(pod) = self.ready_pod(&pod_id).await else {
                continue;
            };
            let measured = self.measure(&pod, records).await?;
            out.extend(measured.iter().map(|(r, s)| cri_stats(r, s, &pod.dir)));
        }
        Ok(out)
    }

    pub async fn one_container_stats(&self, id: &str) -> Result<cri::ContainerStats> {
        self.container(id)?;
        let stats = self
            .container_stats(Some(cri::ContainerStatsFilter {
                id: id.to_owned(),
                ..Default::default()
            }))
            .await?;
        stats
            .into_iter()
            .find(|s| s.attributes.as_ref().is_some_and(|a| a.id == id))
            .ok_or_else(|| CriError::FailedPrecondition(format!("container {id} is not running")))
    }

    /// One ready pod's stats: NotFound for an unknown pod,
    /// FailedPrecondition for one that is not ready.
    pub async fn pod_sandbox_stats(&self, id: &str) -> Result<cri::PodSandboxStats> {
        let pod = self.ready_pod(id).await?;
        let mut by_pod = self.running_by_pod(|record| record.pod_id == pod.id)?;
        let records = by_pod.remove(&pod.id).unwrap_or_default();
        let measured = self.measure(&pod, records).await?;
        Ok(pod_stats(&pod, &measured))
    }

    /// Stats of the ready pods matching the filter.
    pub async fn list_pod_sandbox_stats(
        &self,
        filter: Option<cri::PodSandboxStatsFilter>,
    ) -> Result<Vec<cri::PodSandboxStats>> {
        let mut by_pod = self.running_by_pod(|_| true)?;
        let mut out = Vec::new();
        for pod in self.state.pods()? {
            if let Some(f) = &filter {
                if (!f.id.is_empty() && !pod.id.starts_with(&f.id))
                    || !labels_match(&f.label_selector, &pod.config.labels)
                {
                    continue;
                }
            }
            let pod = self.live_pod(&pod.id).await?;
            if pod.state != PodState::Ready {
                continue;
            }
            let records = by_pod.remove(&pod.id).unwrap_or_default();
            let measured = self.measure(&pod, records).await?;
            out.push(pod_stats(&pod, &measured));
        }
        Ok(out)
    }
}

fn counter(value: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value })
}

fn cpu_usage(s: &agent::ContainerStats) -> cri::CpuUsage {
    cri::CpuUsage {
        timestamp: s.timestamp_ns,
        usage_core_nano_seconds: counter(s.cpu_usage_ns),
        usage_nano_cores: None,
    }
}

fn memory_usage(s: &agent::ContainerStats) -> cri::MemoryUsage {
    cri::MemoryUsage {
        timestamp: s.timestamp_ns,
        working_set_bytes: counter(s.memory_working_set_bytes),
        usage_bytes: counter(s.memory_usage_bytes),
        rss_bytes: counter(s.memory_rss_bytes),
        ..Default::default()
    }
}

fn cri_stats(
    r: &ContainerRecord,
    s: &agent::ContainerStats,
    sandbox_dir: &Path,
) -> cri::ContainerStats {
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: r.id.clone(),
            metadata: r.config.metadata.clone(),
            labels: r.config.labels.clone(),
            annotations: r.config.annotations.clone(),
        }),
        cpu: Some(cpu_usage(s)),
        memory: Some(memory_usage(s)),
        writable_layer: Some(cri::FilesystemUsage {
            timestamp: s.timestamp_ns,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: sandbox_dir.display().to_string(),
            }),
            used_bytes: counter(s.writable_layer_bytes),
            inodes_used: None,
        }),
        swap: None,
    }
}

/// The sum of the containers' counters, stamped with the latest of their
/// times (now when there are none).
fn total<'a>(stats: impl Iterator<Item = &'a agent::ContainerStats>) -> agent::ContainerStats {
    let mut sum = agent::ContainerStats::default();
    for s in stats {
        sum.timestamp_ns = sum.timestamp_ns.max(s.timestamp_ns);
        sum.cpu_usage_ns += s.cpu_usage_ns;
        sum.memory_usage_bytes += s.memory_usage_bytes;
        sum.memory_working_set_bytes += s.memory_working_set_bytes;
        sum.memory_rss_bytes += s.memory_rss_bytes;
        sum.pids += s.pids;
        sum.writable_layer_bytes += s.writable_layer_bytes;
    }
    if sum.timestamp_ns == 0 {
        sum.timestamp_ns = now_ns();
    }
    sum
}

fn pod_stats(pod: &PodRecord, measured: &[Measured]) -> cri::PodSandboxStats {
    let sum = total(measured.iter().map(|(_, s)| s));
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: pod.id.clone(),
            metadata: pod.config.metadata.clone(),
            labels: pod.config.labels.clone(),
            annotations: pod.config.annotations.clone(),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: Some(cpu_usage(&sum)),
            memory: Some(memory_usage(&sum)),
            // Pods have no network of their own yet.
            network: None,
            process: Some(cri::ProcessUsage {
                timestamp: sum.timestamp_ns,
                process_count: counter(sum.pids),
            }),
            containers: measured
                .iter()
                .map(|(r, s)| cri_stats(r, s, &pod.dir))
                .collect(),
        }),
        windows: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_figures_are_its_containers_sums() {
        let a = agent::ContainerStats {
            timestamp_ns: 10,
            cpu_usage_ns: 1,
            memory_usage_bytes: 2,
            memory_working_set_bytes: 3,
            memory_rss_bytes: 4,
            pids: 5,
            writable_layer_bytes: 6,
            ..Default::default()
        };
        let b = agent::ContainerStats {
            timestamp_ns: 20,
            ..a.clone()
        };
        let sum = total([a, b].iter());
        assert_eq!(
            (
                sum.timestamp_ns,
                sum.cpu_usage_ns,
                sum.memory_usage_bytes,
                sum.memory_working_set_bytes,
                sum.memory_rss_bytes,
                sum.pids,
                sum.writable_layer_bytes
            ),
            (20, 2, 4, 6, 8, 10, 12)
        );
        assert!(total(std::iter::empty()).timestamp_ns > 0);
    }
}
