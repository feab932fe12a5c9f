//! Running CNI plugins as the CNI spec (1.0) and libcni do: the first
//! network configuration in the config directory, each plugin of its list
//! executed in turn with the CNI_* environment and its config on stdin,
//! each ADD's result handed to the next as `prevResult`.
//!
//! Written here rather than taken from a crate: the crates that exist
//! implement the plugin side of CNI, not the runtime side, and the runtime
//! side is this file: JSON in, JSON out, one process per plugin.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tracing::debug;

/// How long one plugin may run before it is killed.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no network config found in {}", dir.display())]
    NoConfig { dir: PathBuf },
    #[error("reading CNI config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI config {}: {detail}", path.display())]
    Parse { path: PathBuf, detail: String },
    #[error("CNI plugin {plugin:?} not found in {}", dir.display())]
    PluginMissing { plugin: String, dir: PathBuf },
    #[error("CNI plugin {plugin} ({command}) could not run: {source}")]
    Spawn {
        plugin: String,
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI plugin {plugin} ({command}) failed: {message}")]
    Plugin {
        plugin: String,
        command: &'static str,
        message: String,
    },
    #[error("CNI plugin {plugin} ({command}) did not finish within {PLUGIN_TIMEOUT:?}")]
    Timeout {
        plugin: String,
        command: &'static str,
    },
}

/// A network configuration list, as loaded from the config directory.
#[derive(Debug, Clone)]
pub struct NetworkList {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Map<String, Value>>,
    pub source: PathBuf,
}

impl NetworkList {
    /// Every plugin binary the list needs, checked against `bin_dir`.
    pub fn check_plugins(&self, bin_dir: &Path) -> Result<(), CniError> {
        for plugin in &self.plugins {
            plugin_binary(plugin, bin_dir)?;
        }
        Ok(())
    }
}

/// The first valid network configuration in `dir`, by file name order, as
/// libcni picks it: `*.conflist`, or a single plugin's `*.conf`/`*.json`.
pub fn load(dir: &Path) -> Result<NetworkList, CniError> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(CniError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    files.sort();
    let mut first_error = None;
    for path in files {
        match load_file(&path) {
            Ok(list) => return Ok(list),
            Err(e) => {
                tracing::warn!("skipping CNI config: {e}");
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or(CniError::NoConfig {
        dir: dir.to_path_buf(),
    }))
}

fn load_file(path: &Path) -> Result<NetworkList, CniError> {
    let parse = |detail: String| CniError::Parse {
        path: path.to_path_buf(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|source| CniError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
    let Value::Object(mut conf) = value else {
        return Err(parse("not a JSON object".into()));
    };
    let string = |conf: &Map<String, Value>, key: &str| {
        conf.get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| parse(format!("no {key:?}")))
    };
    let name = string(&conf, "name")?;
    let cni_version = string(&conf, "cniVersion")?;
    let plugins = if path.extension().and_then(|e| e.to_str()) == Some("conflist") {
        let Some(Value::Array(plugins)) = conf.remove("plugins") else {
            return Err(parse("a conflist needs a \"plugins\" array".into()));
        };
        plugins
            .into_iter()
            .map(|p| match p {
                Value::Object(p) => Ok(p),
                _ => Err(parse("a plugin config is not a JSON object".into())),
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![conf]
    };
    if plugins.is_empty() {
        return Err(parse("no plugins".into()));
    }
    for plugin in &plugins {
        string(plugin, "type")?;
    }
    Ok(NetworkList {
        name,
        cni_version,
        plugins,
        source: path.to_path_buf(),
    })
}

/// What one pod's CNI calls share.
#[derive(Debug, Clone)]
pub struct Attachment<'a> {
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub ifname: &'a str,
    /// CNI_ARGS: `K=V;K=V`.
    pub args: String,
    /// The pod's host ports, as the `portMappings` capability wants them.
    pub port_mappings: Vec<Value>,
}

/// A plugin's ADD result (CNI 0.3.0 and later); what huskd reads of it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CniResult {
    pub interfaces: Vec<ResultInterface>,
    pub ips: Vec<ResultIp>,
    pub routes: Vec<ResultRoute>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ResultInterface {
    pub name: String,
    pub mac: String,
    pub sandbox: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ResultIp {
    /// CIDR, e.g. "10.88.0.5/16".
    pub address: String,
    pub gateway: String,
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ResultRoute {
    pub dst: String,
    pub gw: String,
}

/// Runs ADD through the list; returns the last plugin's result (raw JSON,
/// kept for DEL). After a failure the caller runs [`del`] to undo what the
/// earlier plugins did, as libcni leaves it to its caller.
pub async fn add(
    list: &NetworkList,
    bin_dir: &Path,
    at: &Attachment<'_>,
) -> Result<Value, CniError> {
    let mut prev: Option<Value> = None;
    for plugin in &list.plugins {
        let result = invoke(list, plugin, bin_dir, at, "ADD", prev.as_ref()).await?;
        prev = Some(result);
    }
    Ok(prev.unwrap_or(Value::Null))
}

/// Runs DEL through the list in reverse, with the ADD result as
/// `prevResult`. Every plugin runs even after one fails, so that as much as
/// possible is released; the first failure is returned.
pub async fn del(
    list: &NetworkList,
    bin_dir: &Path,
    at: &Attachment<'_>,
    prev: Option<&Value>,
) -> Result<(), CniError> {
    let mut first_error = None;
    for plugin in list.plugins.iter().rev() {
        if let Err(e) = invoke(list, plugin, bin_dir, at, "DEL", prev).await {
            tracing::warn!("{e}");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn plugin_binary(plugin: &Map<String, Value>, bin_dir: &Path) -> Result<PathBuf, CniError> {
    let kind = plugin.get("type").and_then(Value::as_str).unwrap_or("");
    let missing = || CniError::PluginMissing {
        plugin: kind.to_owned(),
        dir: bin_dir.to_path_buf(),
    };
    // A type is a file name, never a path out of the plugin directory.
    if kind.is_empty() || kind.contains('/') || kind.starts_with('.') {
        return Err(missing());
    }
    let path = bin_dir.join(kind);
    if path.is_file() {
        Ok(path)
    } else {
        Err(missing())
    }
}

/// The config one plugin reads on stdin, built as libcni builds it.
fn plugin_config(
    list: &NetworkList,
    plugin: &Map<String, Value>,
    at: &Attachment<'_>,
    prev: Option<&Value>,
) -> Value {
    let mut conf = plugin.clone();
    conf.insert("name".into(), json!(list.name));
    conf.insert("cniVersion".into(), json!(list.cni_version));
    if let Some(prev) = prev {
        conf.insert("prevResult".into(), prev.clone());
    }
    let wants_ports = plugin
        .get("capabilities")
        .and_then(|c| c.get("portMappings"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if wants_ports && !at.port_mappings.is_empty() {
        conf.insert(
            "runtimeConfig".into(),
            json!({ "portMappings": at.port_mappings }),
        );
    }
    Value::Object(conf)
}

async fn invoke(
    list: &NetworkList,
    plugin: &Map<String, Value>,
    bin_dir: &Path,
    at: &Attachment<'_>,
    command: &'static str,
    prev: Option<&Value>,
) -> Result<Value, CniError> {
    let binary = plugin_binary(plugin, bin_dir)?;
    let kind = plugin
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let stdin = plugin_config(list, plugin, at, prev).to_string();
    debug!(plugin = %kind, command, "running CNI plugin");
    let spawn_err = |source| CniError::Spawn {
        plugin: kind.clone(),
        command,
        source,
    };
    let mut plugin = tokio::process::Command::new(&binary);
    plugin
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", at.container_id)
        .env("CNI_NETNS", at.netns)
        .env("CNI_IFNAME", at.ifname)
        .env("CNI_ARGS", &at.args)
        .env("CNI_PATH", bin_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = plugin.spawn().map_err(spawn_err)?;
    if let Some(mut pipe) = child.stdin.take() {
        // A plugin may exit without reading its config (an early error):
        // its exit status and output say what happened, not the pipe.
        match pipe.write_all(stdin.as_bytes()).await {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(spawn_err(e)),
            _ => {}
        }
    }
    let output = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| CniError::Timeout {
            plugin: kind.clone(),
            command,
        })?
        .map_err(spawn_err)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(CniError::Plugin {
            plugin: kind,
            command,
            message: plugin_error(&stdout, &String::from_utf8_lossy(&output.stderr)),
        });
    }
    if command != "ADD" {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout).map_err(|e| CniError::Plugin {
        plugin: kind,
        command,
        message: format!("its result is not JSON ({e}): {:.200}", stdout.trim()),
    })
}

/// A failed plugin's message: the spec's error object on stdout (`msg`,
/// `details`, `code`), else whatever it wrote.
fn plugin_error(stdout: &str, stderr: &str) -> String {
    #[derive(Deserialize)]
    struct ErrorResult {
        code: Option<u32>,
        #[serde(default)]
        msg: String,
        #[serde(default)]
        details: String,
    }
    match serde_json::from_str::<ErrorResult>(stdout) {
        Ok(e) if !e.msg.is_empty() => {
            let mut message = e.msg;
            if !e.details.is_empty() {
                message.push_str(&format!(": {}", e.details));
            }
            if let Some(code) = e.code {
                message.push_str(&format!(" (code {code})"));
            }
            message
        }
        _ => format!("{} {}", stdout.trim(), stderr.trim())
            .trim()
            .chars()
            .take(500)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write");
    }

    #[test]
    fn the_first_valid_config_by_name_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(load(dir.path()), Err(CniError::NoConfig { .. })));
        assert!(matches!(
            load(&dir.path().join("absent")),
            Err(CniError::NoConfig { .. })
        ));
        write(dir.path(), "05-broken.conflist", "{ not json");
        write(
            dir.path(),
            "10-net.conflist",
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        );
        write(
            dir.path(),
            "20-single.conf",
            r#"{"cniVersion":"0.4.0","name":"single","type":"ptp"}"#,
        );
        write(dir.path(), "00-ignored.txt", "{}");
        let list = load(dir.path()).expect("load");
        assert_eq!(list.name, "pods");
        assert_eq!(list.plugins.len(), 2);
        std::fs::remove_file(dir.path().join("10-net.conflist")).expect("rm");
        let single = load(dir.path()).expect("load single");
        assert_eq!((single.name.as_str(), single.plugins.len()), ("single", 1));
    }

    #[test]
    fn configs_missing_what_cni_requires_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, text) in [
            r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#,
            r#"{"name":"n","plugins":[{"type":"bridge"}]}"#,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"bridge":"x"}]}"#,
            r#"[1,2]"#,
        ]
        .into_iter()
        .enumerate()
        {
            let sub = dir.path().join(i.to_string());
            std::fs::create_dir(&sub).expect("mkdir");
            write(&sub, "a.conflist", text);
            assert!(
                matches!(load(&sub), Err(CniError::Parse { .. })),
                "{text} was accepted"
            );
        }
    }

    #[test]
    fn plugins_get_name_version_prev_result_and_ports_they_asked_for() {
        let list = NetworkList {
            name: "pods".into(),
            cni_version: "1.0.0".into(),
            plugins: Vec::new(),
            source: PathBuf::new(),
        };
        let at = Attachment {
            container_id: "c",
            netns: Path::new("/run/netns/x"),
            ifname: "eth0",
            args: String::new(),
            port_mappings: vec![json!({"hostPort": 8080, "containerPort": 80, "protocol": "tcp"})],
        };
        let portmap = json!({"type": "portmap", "capabilities": {"portMappings": true}});
        let Value::Object(portmap) = portmap else {
            unreachable!()
        };
        let prev = json!({"ips": [{"address": "10.0.0.2/24"}]});
        let conf = plugin_config(&list, &portmap, &at, Some(&prev));
        assert_eq!(conf["name"], "pods");
        assert_eq!(conf["cniVersion"], "1.0.0");
        assert_eq!(conf["prevResult"], prev);
        assert_eq!(conf["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        let Value::Object(bridge) = json!({"type": "bridge"}) else {
            unreachable!()
        };
        let conf = plugin_config(&list, &bridge, &at, None);
        assert!(conf.get("runtimeConfig").is_none());
        assert!(conf.get("prevResult").is_none());
    }

    #[test]
    fn plugin_types_cannot_name_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "bridge", "");
        for kind in ["../bridge", "/bin/sh", ".hidden", ""] {
            let Value::Object(p) = json!({ "type": kind }) else {
                unreachable!()
            };
            assert!(plugin_binary(&p, dir.path()).is_err(), "{kind}");
        }
        let Value::Object(p) = json!({ "type": "bridge" }) else {
            unreachable!()
        };
        assert_eq!(
            plugin_binary(&p, dir.path()).ok(),
            Some(dir.path().join("bridge"))
        );
    }

    #[test]
    fn plugin_errors_read_the_spec_error_object() {
        assert_eq!(
            plugin_error(
                r#"{"code":11,"msg":"no IPs left","details":"range full"}"#,
                ""
            ),
            "no IPs left: range full (code 11)"
        );
        assert_eq!(plugin_error("", "panic: boom"), "panic: boom");
    }

    #[test]
    fn results_parse_from_cni_1_0() {
        let result: CniResult = serde_json::from_value(json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "cni0", "mac": "aa"}, {"name": "eth0", "mac": "0a:58:0a:58:00:05", "sandbox": "/run/netns/x"}],
            "ips": [{"address": "10.88.0.5/16", "gateway": "10.88.0.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        }))
        .expect("parse");
        assert_eq!(result.ips[0].interface, Some(1));
        assert_eq!(result.interfaces[1].mac, "0a:58:0a:58:00:05");
        assert_eq!(result.routes[0].gw, "");
    }
}
