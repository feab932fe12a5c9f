//! Pod and container configs from JSON files in crictl's shape: CRI's
//! `PodSandboxConfig` and `ContainerConfig` with the proto's field names
//! (`log_directory`, or `logDirectory` as protobuf JSON writes it), enums as
//! numbers or names. Fields huskctl does not know are refused, so a typo
//! does not pass silently.

use std::collections::HashMap;
use std::path::Path;

use k8s_cri::v1 as cri;
use serde_json::{Map, Value};

use super::client::{CliError, Result};

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(CliError::io(format!("reading {}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| CliError::Usage(format!("{}: not valid JSON: {e}", path.display())))
}

/// One JSON object being read, with the path to it for error messages.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    at: String,
    seen: Vec<&'static str>,
}

fn camel(snake: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn bad(at: &str, what: &str) -> CliError {
    CliError::Usage(format!("{at}: {what}"))
}

impl<'a> Obj<'a> {
    fn new(value: &'a Value, at: &str) -> Result<Obj<'a>> {
        match value {
            Value::Object(map) => Ok(Obj {
                map,
                at: at.to_owned(),
                seen: Vec::new(),
            }),
            _ => Err(bad(at, "expected an object")),
        }
    }

    fn path(&self, field: &str) -> String {
        if self.at.is_empty() {
            field.to_owned()
        } else {
            format!("{}.{field}", self.at)
        }
    }

    fn get(&mut self, field: &'static str) -> Option<&'a Value> {
        self.seen.push(field);
        self.map
            .get(field)
            .or_else(|| self.map.get(&camel(field)))
            .filter(|v| !v.is_null())
    }

    fn string(&mut self, field: &'static str) -> Result<String> {
        match self.get(field) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(bad(&self.path(field), "expected a string")),
        }
    }

    fn bool(&mut self, field: &'static str) -> Result<bool> {
        match self.get(field) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(bad(&self.path(field), "expected true or false")),
        }
    }

    fn int(&mut self, field: &'static str) -> Result<i64> {
        match self.get(field) {
            None => Ok(0),
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| bad(&self.path(field), "expected an integer")),
            // protobuf JSON writes 64-bit integers as strings.
            Some(Value::String(s)) => s
                .parse()
                .map_err(|_| bad(&self.path(field), "expected an integer")),
            Some(_) => Err(bad(&self.path(field), "expected an integer")),
        }
    }

    fn int32(&mut self, field: &'static str) -> Result<i32> {
        let n = self.int(field)?;
        i32::try_from(n).map_err(|_| bad(&self.path(field), "out of range"))
    }

    fn strings(&mut self, field: &'static str) -> Result<Vec<String>> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(bad(&self.path(field), "expected strings")),
                })
                .collect(),
            Some(_) => Err(bad(&self.path(field), "expected a list of strings")),
        }
    }

    fn string_map(&mut self, field: &'static str) -> Result<HashMap<String, String>> {
        match self.get(field) {
            None => Ok(HashMap::new()),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    _ => Err(bad(&self.path(field), "expected string values")),
                })
                .collect(),
            Some(_) => Err(bad(&self.path(field), "expected an object of strings")),
        }
    }

    fn object(&mut self, field: &'static str) -> Result<Option<Obj<'a>>> {
        let at = self.path(field);
        self.get(field).map(|v| Obj::new(v, &at)).transpose()
    }

    fn objects(&mut self, field: &'static str) -> Result<Vec<Obj<'a>>> {
        let at = self.path(field);
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| Obj::new(v, &format!("{at}[{i}]")))
                .collect(),
            Some(_) => Err(bad(&at, "expected a list")),
        }
    }

    /// An enum given as its number or its proto name (`NODE`).
    fn enumeration(&mut self, field: &'static str, names: &[&str]) -> Result<i32> {
        match self.get(field) {
            Some(Value::String(s)) => names
                .iter()
                .position(|n| n.eq_ignore_ascii_case(s))
                .map(|i| i as i32)
                .ok_or_else(|| {
                    bad(
                        &self.path(field),
                        &format!("{s:?} is not one of {}", names.join(", ")),
                    )
                }),
            _ => self.int32(field),
        }
    }

    /// `{ "value": N }`, CRI's Int64Value.
    fn int64_value(&mut self, field: &'static str) -> Result<Option<cri::Int64Value>> {
        let Some(mut o) = self.object(field)? else {
            return Ok(None);
        };
        let value = o.int("value")?;
        o.done()?;
        Ok(Some(cri::Int64Value { value }))
    }

    /// Refuses fields that were not read.
    fn done(self) -> Result<()> {
        for key in self.map.keys() {
            if !self.seen.iter().any(|f| f == key || camel(f) == *key) {
                return Err(bad(
                    &self.path(key),
                    "unknown field (or one huskctl cannot send yet)",
                ));
            }
        }
        Ok(())
    }
}

const NAMESPACE_MODES: &[&str] = &["POD", "CONTAINER", "NODE", "TARGET"];

fn namespace_options(o: &mut Obj<'_>) -> Result<Option<cri::NamespaceOption>> {
    let Some(mut ns) = o.object("namespace_options")? else {
        return Ok(None);
    };
    let options = cri::NamespaceOption {
        network: ns.enumeration("network", NAMESPACE_MODES)?,
        pid: ns.enumeration("pid", NAMESPACE_MODES)?,
        ipc: ns.enumeration("ipc", NAMESPACE_MODES)?,
        target_id: ns.string("target_id")?,
        userns_options: None,
    };
    ns.done()?;
    Ok(Some(options))
}

/// A `PodSandboxConfig` from crictl's pod config JSON.
pub fn pod_config(value: &Value) -> Result<cri::PodSandboxConfig> {
    let mut o = Obj::new(value, "")?;
    let metadata = match o.object("metadata")? {
        Some(mut m) => {
            let meta = cri::PodSandboxMetadata {
                name: m.string("name")?,
                uid: m.string("uid")?,
                namespace: m.string("namespace")?,
                attempt: u32::try_from(m.int("attempt")?)
                    .map_err(|_| bad("metadata.attempt", "out of range"))?,
            };
            m.done()?;
            Some(meta)
        }
        None => None,
    };
    let dns_config = match o.object("dns_config")? {
        Some(mut d) => {
            let dns = cri::DnsConfig {
                servers: d.strings("servers")?,
                searches: d.strings("searches")?,
                options: d.strings("options")?,
            };
            d.done()?;
            Some(dns)
        }
        None => None,
    };
    let linux = match o.object("linux")? {
        Some(mut l) => {
            let security_context = match l.object("security_context")? {
                Some(mut s) => {
                    let sc = cri::LinuxSandboxSecurityContext {
                        namespace_options: namespace_options(&mut s)?,
                        run_as_user: s.int64_value("run_as_user")?,
                        run_as_group: s.int64_value("run_as_group")?,
                        readonly_rootfs: s.bool("readonly_rootfs")?,
                        privileged: s.bool("privileged")?,
                        ..Default::default()
                    };
                    s.done()?;
                    Some(sc)
                }
                None => None,
            };
            let linux = cri::LinuxPodSandboxConfig {
                cgroup_parent: l.string("cgroup_parent")?,
                security_context,
                sysctls: l.string_map("sysctls")?,
                ..Default::default()
            };
            l.done()?;
            Some(linux)
        }
        None => None,
    };
    let config = cri::PodSandboxConfig {
        metadata,
        hostname: o.string("hostname")?,
        log_directory: o.string("log_directory")?,
        dns_config,
        port_mappings: Vec::new(),
        labels: o.string_map("labels")?,
        annotations: o.string_map("annotations")?,
        linux,
        windows: None,
    };
    o.done()?;
    Ok(config)
}

/// A `ContainerConfig` from crictl's container config JSON.
pub fn container_config(value: &Value) -> Result<cri::ContainerConfig> {
    let mut o = Obj::new(value, "")?;
    let metadata = match o.object("metadata")? {
        Some(mut m) => {
            let meta = cri::ContainerMetadata {
                name: m.string("name")?,
                attempt: u32::try_from(m.int("attempt")?)
                    .map_err(|_| bad("metadata.attempt", "out of range"))?,
            };
            m.done()?;
            Some(meta)
        }
        None => None,
    };
    let image = match o.object("image")? {
        Some(mut i) => {
            let spec = cri::ImageSpec {
                image: i.string("image")?,
                annotations: i.string_map("annotations")?,
                ..Default::default()
            };
            i.done()?;
            Some(spec)
        }
        None => None,
    };
    let envs = o
        .objects("envs")?
        .into_iter()
        .map(|mut e| {
            let kv = cri::KeyValue {
                key: e.string("key")?,
                value: e.string("value")?,
            };
            e.done()?;
            Ok(kv)
        })
        .collect::<Result<Vec<_>>>()?;
    let mounts = o
        .objects("mounts")?
        .into_iter()
        .map(|mut m| {
            let mount = cri::Mount {
                container_path: m.string("container_path")?,
                host_path: m.string("host_path")?,
                readonly: m.bool("readonly")?,
                selinux_relabel: m.bool("selinux_relabel")?,
                propagation: m.enumeration(
                    "propagation",
                    &[
                        "PROPAGATION_PRIVATE",
                        "PROPAGATION_HOST_TO_CONTAINER",
                        "PROPAGATION_BIDIRECTIONAL",
                    ],
                )?,
                ..Default::default()
            };
            m.done()?;
            Ok(mount)
        })
        .collect::<Result<Vec<_>>>()?;
    let linux = match o.object("linux")? {
        Some(mut l) => {
            let security_context = match l.object("security_context")? {
                Some(mut s) => {
                    let capabilities = match s.object("capabilities")? {
                        Some(mut c) => {
                            let caps = cri::Capability {
                                add_capabilities: c.strings("add_capabilities")?,
                                drop_capabilities: c.strings("drop_capabilities")?,
                                add_ambient_capabilities: c.strings("add_ambient_capabilities")?,
                            };
                            c.done()?;
                            Some(caps)
                        }
                        None => None,
                    };
                    let sc = cri::LinuxContainerSecurityContext {
                        capabilities,
                        privileged: s.bool("privileged")?,
                        namespace_options: namespace_options(&mut s)?,
                        run_as_user: s.int64_value("run_as_user")?,
                        run_as_group: s.int64_value("run_as_group")?,
                        run_as_username: s.string("run_as_username")?,
                        readonly_rootfs: s.bool("readonly_rootfs")?,
                        no_new_privs: s.bool("no_new_privs")?,
                        ..Default::default()
                    };
                    s.done()?;
                    Some(sc)
                }
                None => None,
            };
            let resources = match l.object("resources")? {
                Some(mut r) => {
                    let res = cri::LinuxContainerResources {
                        cpu_period: r.int("cpu_period")?,
                        cpu_quota: r.int("cpu_quota")?,
                        cpu_shares: r.int("cpu_shares")?,
                        memory_limit_in_bytes: r.int("memory_limit_in_bytes")?,
                        cpuset_cpus: r.string("cpuset_cpus")?,
                        cpuset_mems: r.string("cpuset_mems")?,
                        ..Default::default()
                    };
                    r.done()?;
                    Some(res)
                }
                None => None,
            };
            let linux = cri::LinuxContainerConfig {
                resources,
                security_context,
            };
            l.done()?;
            Some(linux)
        }
        None => None,
    };
    let config = cri::ContainerConfig {
        metadata,
        image,
        command: o.strings("command")?,
        args: o.strings("args")?,
        working_dir: o.string("working_dir")?,
        envs,
        mounts,
        labels: o.string_map("labels")?,
        annotations: o.string_map("annotations")?,
        log_path: o.string("log_path")?,
        stdin: o.bool("stdin")?,
        stdin_once: o.bool("stdin_once")?,
        tty: o.bool("tty")?,
        linux,
        ..Default::default()
    };
    o.done()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn crictl_pod_config() {
        let config = pod_config(&json!({
            "metadata": {"name": "nginx-sandbox", "namespace": "default", "attempt": 1, "uid": "hdishd83djaidwnduwk28bcsb"},
            "log_directory": "/tmp",
            "hostname": "h",
            "labels": {"app.kubernetes.io/name": "x"},
            "linux": {"security_context": {"namespace_options": {"network": "NODE", "pid": 1}}}
        }))
        .unwrap();
        let meta = config.metadata.as_ref().unwrap();
        assert_eq!(meta.name, "nginx-sandbox");
        assert_eq!(meta.attempt, 1);
        assert_eq!(config.log_directory, "/tmp");
        assert_eq!(config.labels["app.kubernetes.io/name"], "x");
        let ns = config
            .linux
            .and_then(|l| l.security_context)
            .and_then(|s| s.namespace_options)
            .unwrap();
        assert_eq!(ns.network, cri::NamespaceMode::Node as i32);
        assert_eq!(ns.pid, cri::NamespaceMode::Container as i32);
    }

    #[test]
    fn camel_case_and_unknown_fields() {
        let config = pod_config(&json!({"logDirectory": "/x", "metadata": {"name": "a"}})).unwrap();
        assert_eq!(config.log_directory, "/x");
        let err = pod_config(&json!({"metadata": {"nmae": "a"}})).unwrap_err();
        assert!(err.to_string().contains("metadata.nmae"), "{err}");
        let err = pod_config(&json!({"log_directory": 3})).unwrap_err();
        assert!(err.to_string().contains("log_directory"), "{err}");
    }

    #[test]
    fn crictl_container_config() {
        let config = container_config(&json!({
            "metadata": {"name": "busybox"},
            "image": {"image": "busybox"},
            "command": ["top"],
            "envs": [{"key": "A", "value": "b"}],
            "log_path": "busybox.0.log",
            "linux": {"security_context": {"run_as_user": {"value": 1000}}}
        }))
        .unwrap();
        assert_eq!(config.metadata.unwrap().name, "busybox");
        assert_eq!(config.image.unwrap().image, "busybox");
        assert_eq!(config.command, ["top"]);
        assert_eq!(config.envs[0].key, "A");
        assert_eq!(config.log_path, "busybox.0.log");
        assert_eq!(
            config
                .linux
                .and_then(|l| l.security_context)
                .and_then(|s| s.run_as_user)
                .map(|u| u.value),
            Some(1000)
        );
    }
}
