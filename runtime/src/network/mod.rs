//! Pod networking: a network namespace per pod, set up by CNI plugins.
//!
//! huskd creates the namespace, runs CNI ADD in it (the pod's interface is
//! `eth0`), and hands the namespace to the sandbox driver: the host driver
//! runs its agent inside it; for the microvm driver huskd creates a tap
//! there, runs husk-vmm inside it attached to the tap, and joins the tap to
//! `eth0` with tc redirect (see [`link`]), so the guest takes the pod's MAC
//! and address. Teardown runs CNI DEL with the
//! ADD result and removes the namespace; both are idempotent.

pub mod cni;
pub mod link;
pub mod netns;

use std::path::PathBuf;

use husk_proto::v1 as agent;
use k8s_cri::v1 as cri;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tracing::{info, warn};

pub use cni::CniError;

/// The pod's interface inside its namespace, as kubelet expects it.
pub const POD_IFNAME: &str = "eth0";
/// The tap husk-vmm opens inside the pod's namespace.
pub const VM_TAP: &str = "tap0";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("pod network not ready: {0}")]
    NotReady(#[source] CniError),
    #[error("{what} network namespace {}: {source}", path.display())]
    Netns {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the pod's network: {0}")]
    Cni(#[source] CniError),
    #[error("tearing down the pod's network: {0}")]
    Teardown(#[source] CniError),
    #[error("the CNI result for the pod has no IP address")]
    NoAddress,
    #[error("the pod's network namespace: {0}")]
    Link(#[source] std::io::Error),
}

/// Where huskd finds CNI's configuration and plugins.
#[derive(Debug, Clone)]
pub struct Network {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
}

/// A pod's network as its record keeps it: enough to tear it down later,
/// even after the config directory changed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PodNetwork {
    pub netns: PathBuf,
    /// The network list ADD ran (name, cniVersion, plugins).
    pub list: Value,
    /// The last plugin's ADD result, the `prevResult` of DEL.
    pub result: Value,
    /// CNI_ARGS and the port mappings ADD was given; DEL gets the same.
    pub args: String,
    pub port_mappings: Vec<Value>,
    /// The pod's addresses, CIDR notation, the first being its primary IP.
    pub ips: Vec<String>,
}

impl PodNetwork {
    /// The pod's IPs without prefix lengths, as PodSandboxStatus wants them.
    pub fn bare_ips(&self) -> Vec<String> {
        self.ips
            .iter()
            .map(|ip| ip.split('/').next().unwrap_or(ip).to_owned())
            .collect()
    }
}

impl Network {
    /// Ok when a network config is present and its plugins are installed:
    /// the NetworkReady condition.
    pub fn ready(&self) -> Result<(), CniError> {
        self.usable_list().map(|_| ())
    }

    /// The pod network list, once it and the loopback plugin are installed.
    fn usable_list(&self) -> Result<cni::NetworkList, CniError> {
        let list = cni::load(&self.conf_dir)?;
        list.check_plugins(&self.bin_dir)?;
        loopback(&list).check_plugins(&self.bin_dir)?;
        Ok(list)
    }

    /// Creates pod `id`'s namespace and runs CNI ADD in it. On failure
    /// nothing is left: what ADD did is deleted and the namespace removed.
    #[tracing::instrument(skip_all, fields(sandbox = id))]
    pub async fn setup(
        &self,
        id: &str,
        config: &cri::PodSandboxConfig,
    ) -> Result<PodNetwork, NetworkError> {
        let list = self.usable_list().map_err(NetworkError::NotReady)?;
        let path = netns::path_for(id);
        // It joins a thread of its own: off the async workers.
        let creating = path.clone();
        tokio::task::spawn_blocking(move || netns::create(&creating))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|source| NetworkError::Netns {
                what: "creating",
                path: path.clone(),
                source,
            })?;
        let mut pod = PodNetwork {
            netns: path,
            list: list_to_value(&list),
            result: Value::Null,
            args: cni_args(id, config),
            port_mappings: port_mappings(config),
            ips: Vec::new(),
        };
        let at = attachment(id, &pod);
        let added = match cni::add(&loopback(&list), &self.bin_dir, &at).await {
            Ok(_) => cni::add(&list, &self.bin_dir, &at).await,
            Err(e) => Err(e),
        };
        let outcome = added.map_err(NetworkError::Cni).and_then(|result| {
            pod.result = result;
            pod.ips = pod_ips(&pod.result)?;
            Ok(())
        });
        if let Err(err) = outcome {
            warn!("{err}; undoing");
            if let Err(e) = self.teardown(id, &pod).await {
                warn!("undoing a failed network setup: {e}");
            }
            return Err(err);
        }
        info!(ips = ?pod.ips, network = %list.name, "pod network up");
        Ok(pod)
    }

    /// What a crash left of pod `id`'s network when no record says what
    /// ADD did: CNI DEL with today's network list and no ADD result (which
    /// releases the pod's address and host ports by its id), then the
    /// namespace goes.
    pub async fn teardown_unrecorded(&self, id: &str) -> Result<(), NetworkError> {
        let path = netns::path_for(id);
        let list = match self.usable_list() {
            Ok(list) => list,
            Err(e) => {
                // No DEL without a network list; the namespace goes anyway.
                let _ = netns::remove(&path);
                return Err(NetworkError::Teardown(e));
            }
        };
        let pod = PodNetwork {
            netns: path,
            list: list_to_value(&list),
            result: Value::Null,
            args: String::new(),
            port_mappings: Vec::new(),
            ips: Vec::new(),
        };
        self.teardown(id, &pod).await
    }

    /// CNI DEL with the ADD result, then the namespace goes. Idempotent,
    /// also when the namespace is already gone.
    #[tracing::instrument(skip_all, fields(sandbox = id))]
    pub async fn teardown(&self, id: &str, pod: &PodNetwork) -> Result<(), NetworkError> {
        let list = list_from_value(&pod.list).map_err(NetworkError::Teardown)?;
        let prev = (!pod.result.is_null()).then_some(&pod.result);
        let deleted = cni::del(&list, &self.bin_dir, &attachment(id, pod), prev).await;
        // The namespace goes even when a plugin failed: nothing runs in it
        // any more, a retried DEL copes with its absence, and a failed
        // start has no record left to retry from.
        netns::remove(&pod.netns).map_err(|source| NetworkError::Netns {
            what: "removing",
            path: pod.netns.clone(),
            source,
        })?;
        deleted.map_err(NetworkError::Teardown)?;
        info!("pod network down");
        Ok(())
    }
}

/// The pod's `lo`, brought up by the loopback plugin as a network of its
/// own, as containerd does: in the pod's list its 127.0.0.1 would become
/// part of the pod's result. It needs no DEL: it goes with the namespace.
fn loopback(pod_list: &cni::NetworkList) -> cni::NetworkList {
    let Value::Object(plugin) = json!({ "type": "loopback" }) else {
        unreachable!("a JSON object literal")
    };
    cni::NetworkList {
        name: "cni-loopback".into(),
        cni_version: pod_list.cni_version.clone(),
        plugins: vec![plugin],
        source: PathBuf::new(),
    }
}

fn attachment<'a>(id: &'a str, pod: &'a PodNetwork) -> cni::Attachment<'a> {
    cni::Attachment {
        container_id: id,
        netns: &pod.netns,
        ifname: POD_IFNAME,
        args: pod.args.clone(),
        port_mappings: pod.port_mappings.clone(),
    }
}

fn list_to_value(list: &cni::NetworkList) -> Value {
    json!({ "name": list.name, "cniVersion": list.cni_version, "plugins": list.plugins })
}

fn list_from_value(value: &Value) -> Result<cni::NetworkList, CniError> {
    let bad = |detail: &str| CniError::Parse {
        path: PathBuf::from("<the pod's record>"),
        detail: detail.into(),
    };
    let text = |key| value.get(key).and_then(Value::as_str).map(str::to_owned);
    let plugins = value
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no plugins"))?
        .iter()
        .map(|p| {
            p.as_object()
                .cloned()
                .ok_or_else(|| bad("a plugin is not an object"))
        })
        .collect::<Result<Vec<Map<String, Value>>, _>>()?;
    Ok(cni::NetworkList {
        name: text("name").ok_or_else(|| bad("no name"))?,
        cni_version: text("cniVersion").ok_or_else(|| bad("no cniVersion"))?,
        plugins,
        source: PathBuf::new(),
    })
}

/// CNI_ARGS as kubelet's runtimes pass them.
fn cni_args(id: &str, config: &cri::PodSandboxConfig) -> String {
    let meta = config.metadata.clone().unwrap_or_default();
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={id};K8S_POD_UID={}",
        meta.namespace, meta.name, meta.uid
    )
}

/// The pod's hostPorts in the `portMappings` capability's shape.
fn port_mappings(config: &cri::PodSandboxConfig) -> Vec<Value> {
    config
        .port_mappings
        .iter()
        .filter(|m| m.host_port > 0)
        .map(|m| {
            let protocol = match cri::Protocol::try_from(m.protocol) {
                Ok(cri::Protocol::Udp) => "udp",
                Ok(cri::Protocol::Sctp) => "sctp",
                _ => "tcp",
            };
            let mut mapping = json!({
                "hostPort": m.host_port,
                "containerPort": m.container_port,
                "protocol": protocol,
            });
            if !m.host_ip.is_empty() {
                mapping["hostIP"] = json!(m.host_ip);
            }
            mapping
        })
        .collect()
}

/// The addresses the result gives the pod's own interface (or, when it
/// names no interface, every address).
fn pod_ips(result: &Value) -> Result<Vec<String>, NetworkError> {
    let parsed: cni::CniResult = serde_json::from_value(result.clone()).unwrap_or_default();
    let ips: Vec<String> = parsed
        .ips
        .iter()
        .filter(|ip| {
            ip.interface
                .and_then(|i| parsed.interfaces.get(i))
                .is_none_or(|iface| !iface.sandbox.is_empty())
        })
        .map(|ip| ip.address.clone())
        .filter(|a| !a.is_empty())
        .collect();
    if ips.is_empty() {
        return Err(NetworkError::NoAddress);
    }
    Ok(ips)
}

/// What the guest agent configures: the interface that took over the pod's
/// MAC, with the pod's addresses, and the routes CNI gave the pod. A route
/// without a gateway goes through the gateway of its address family.
pub fn guest_interfaces(
    pod: &PodNetwork,
    facts: &link::LinkFacts,
) -> (Vec<agent::NetworkInterface>, Vec<agent::Route>) {
    let parsed: cni::CniResult = serde_json::from_value(pod.result.clone()).unwrap_or_default();
    let interface = agent::NetworkInterface {
        name: String::new(),
        mac: facts.mac.clone(),
        addresses: pod.ips.clone(),
        mtu: facts.mtu,
    };
    let gateway_for = |dst: &str| {
        let v6 = dst.contains(':');
        parsed
            .ips
            .iter()
            .map(|ip| ip.gateway.as_str())
            .find(|gw| !gw.is_empty() && gw.contains(':') == v6)
            .unwrap_or_default()
            .to_owned()
    };
    let routes = parsed
        .routes
        .iter()
        .map(|r| agent::Route {
            destination: if r.dst == "0.0.0.0/0" || r.dst == "::/0" {
                String::new()
            } else {
                r.dst.clone()
            },
            gateway: if r.gw.is_empty() {
                gateway_for(&r.dst)
            } else {
                r.gw.clone()
            },
            device: String::new(),
        })
        .collect();
    (vec![interface], routes)
}

/// The pod's /etc/hosts: localhost, and its own name at its addresses.
pub fn hosts_file(hostname: &str, pod: &PodNetwork) -> String {
    let mut hosts =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if !hostname.is_empty() {
        for ip in pod.bare_ips() {
            hosts.push_str(&format!("{ip}\t{hostname}\n"));
        }
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_with(result: Value) -> PodNetwork {
        PodNetwork {
            netns: PathBuf::from("/run/netns/x"),
            list: json!({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}),
            ips: pod_ips(&result).unwrap_or_default(),
            result,
            args: String::new(),
            port_mappings: Vec::new(),
        }
    }

    #[test]
    fn the_pod_gets_the_sandbox_interface_addresses_and_routes() {
        let pod = pod_with(json!({
            "interfaces": [{"name": "cni0", "mac": "aa"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
            "ips": [{"address": "10.88.0.5/16", "gateway": "10.88.0.1", "interface": 1},
                    {"address": "10.88.0.1/16", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.99.0.0/16", "gw": "10.88.0.9"}]
        }));
        assert_eq!(pod.ips, vec!["10.88.0.5/16"]);
        assert_eq!(pod.bare_ips(), vec!["10.88.0.5"]);
        let facts = link::LinkFacts {
            mac: "0a:58:0a:58:00:05".into(),
            mtu: 1450,
        };
        let (interfaces, routes) = guest_interfaces(&pod, &facts);
        assert_eq!(interfaces[0].mac, "0a:58:0a:58:00:05");
        assert_eq!(interfaces[0].mtu, 1450);
        assert_eq!(interfaces[0].addresses, vec!["10.88.0.5/16"]);
        assert_eq!(
            routes
                .iter()
                .map(|r| (r.destination.as_str(), r.gateway.as_str()))
                .collect::<Vec<_>>(),
            vec![("", "10.88.0.1"), ("10.99.0.0/16", "10.88.0.9")]
        );
        assert!(hosts_file("web", &pod).contains("10.88.0.5\tweb\n"));
        assert!(!hosts_file("", &pod).contains("10.88.0.5"));
    }

    #[test]
    fn a_result_without_addresses_is_an_error() {
        assert!(matches!(
            pod_ips(&json!({"ips": []})),
            Err(NetworkError::NoAddress)
        ));
        assert!(matches!(
            pod_ips(&Value::Null),
            Err(NetworkError::NoAddress)
        ));
    }

    #[test]
    fn only_host_ports_are_mapped_and_the_list_survives_the_record() {
        let config = cri::PodSandboxConfig {
            port_mappings: vec![
                cri::PortMapping {
                    protocol: cri::Protocol::Tcp as i32,
                    container_port: 80,
                    host_port: 8080,
                    host_ip: String::new(),
                },
                cri::PortMapping {
                    protocol: cri::Protocol::Udp as i32,
                    container_port: 53,
                    host_port: 0,
                    host_ip: String::new(),
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            port_mappings(&config),
            vec![json!({"hostPort": 8080, "containerPort": 80, "protocol": "tcp"})]
        );
        let pod = pod_with(Value::Null);
        let list = list_from_value(&pod.list).expect("list");
        assert_eq!(list_to_value(&list), pod.list);
    }
}
