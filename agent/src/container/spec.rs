//! Checks on what a request asks for, before anything is created: ids, the
//! OCI spec's paths and sizes, and an exec's process merged onto its
//! container's.

use std::path::{Component, Path};

use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

/// What args plus env may add up to: the kernel refuses more than ARG_MAX
/// (2 MiB here) at execve, with a less helpful error.
pub const MAX_ARGS_AND_ENV_BYTES: usize = 1 << 20;
/// Container and exec ids name directories and cgroups.
const MAX_ID_LEN: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid {what} {id:?}: use 1-128 letters, digits, '_', '-' or '.', not starting with '.' or '-'")]
    Id { what: &'static str, id: String },
    #[error("the OCI spec is not valid JSON for a runtime spec: {0}")]
    Json(String),
    #[error("the OCI spec has no process")]
    NoProcess,
    #[error("the process has no args")]
    NoArgs,
    #[error("{what} {path:?} must be an absolute path without '..'")]
    Path { what: &'static str, path: String },
    #[error("args and env add up to {0} bytes, over the limit of {MAX_ARGS_AND_ENV_BYTES}")]
    TooLarge(usize),
    #[error("env entry {0:?} is not NAME=VALUE")]
    Env(String),
    #[error("{0} namespaces are not supported")]
    Namespace(String),
    #[error("the spec must ask for a new mount namespace")]
    NoMountNamespace,
}

pub fn check_id(what: &'static str, id: &str) -> Result<(), SpecError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with(['.', '-'])
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::Id {
            what,
            id: id.to_string(),
        })
    }
}

/// Parses and checks a container's spec.
pub fn parse_spec(json: &[u8]) -> Result<Spec, SpecError> {
    let spec: Spec = serde_json::from_slice(json).map_err(|e| SpecError::Json(e.to_string()))?;
    let process = spec.process().as_ref().ok_or(SpecError::NoProcess)?;
    check_process(process)?;
    for m in spec.mounts().iter().flatten() {
        check_absolute("mount destination", m.destination())?;
        if let Some(source) = m.source() {
            let bind = m.typ().as_deref() == Some("bind")
                || m.options()
                    .iter()
                    .flatten()
                    .any(|o| o == "bind" || o == "rbind");
            if bind {
                check_absolute("bind mount source", source)?;
            }
        }
    }
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    let mut new_mount_ns = false;
    for ns in &namespaces {
        match ns.typ() {
            LinuxNamespaceType::User | LinuxNamespaceType::Time => {
                return Err(SpecError::Namespace(ns.typ().to_string()))
            }
            LinuxNamespaceType::Mount if ns.path().is_none() => new_mount_ns = true,
            _ => {}
        }
        if let Some(path) = ns.path() {
            check_absolute("namespace path", path)?;
        }
    }
    if !new_mount_ns {
        return Err(SpecError::NoMountNamespace);
    }
    Ok(spec)
}

pub fn check_process(process: &Process) -> Result<(), SpecError> {
    let args = process.args().as_deref().unwrap_or_default();
    if args.is_empty() {
        return Err(SpecError::NoArgs);
    }
    check_absolute("cwd", process.cwd())?;
    let env = process.env().as_deref().unwrap_or_default();
    if let Some(bad) = env.iter().find(|e| !e.contains('=')) {
        return Err(SpecError::Env(bad.clone()));
    }
    let bytes: usize = args.iter().chain(env).map(|s| s.len() + 1).sum();
    if bytes > MAX_ARGS_AND_ENV_BYTES {
        return Err(SpecError::TooLarge(bytes));
    }
    Ok(())
}

fn check_absolute(what: &'static str, path: &Path) -> Result<(), SpecError> {
    if path.is_absolute() && !path.components().any(|c| c == Component::ParentDir) {
        Ok(())
    } else {
        Err(SpecError::Path {
            what,
            path: path.display().to_string(),
        })
    }
}

/// An exec's process: its container's, with each field the exec's JSON
/// object names replaced by the exec's value (kubelet's exec names args,
/// and maybe env or tty).
pub fn merge_exec_process(container: &Process, exec_json: &[u8]) -> Result<Process, SpecError> {
    let json = |e: serde_json::Error| SpecError::Json(e.to_string());
    let mut merged = serde_json::to_value(container).map_err(json)?;
    let exec: serde_json::Value = serde_json::from_slice(exec_json).map_err(json)?;
    let (Some(base), serde_json::Value::Object(fields)) = (merged.as_object_mut(), exec) else {
        return Err(SpecError::Json(
            "the exec's process is not a JSON object".into(),
        ));
    };
    base.extend(fields);
    let process: Process = serde_json::from_value(merged).map_err(json)?;
    check_process(&process)?;
    Ok(process)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json(process: &str, extra: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","process":{process},
                "linux":{{"namespaces":[{{"type":"mount"}},{{"type":"pid"}}]}}{extra}}}"#
        )
        .into_bytes()
    }

    const PROCESS: &str =
        r#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},"env":["PATH=/bin"]}"#;

    #[test]
    fn a_plain_spec_passes() {
        parse_spec(&spec_json(PROCESS, "")).expect("valid");
    }

    #[test]
    fn ids_are_checked() {
        for ok in ["a", "abc-DEF_1.2", &"x".repeat(128)] {
            check_id("container id", ok).expect(ok);
        }
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-x",
            &"x".repeat(129),
            "sp ace",
        ] {
            assert!(check_id("container id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let cases = [
            (
                spec_json(
                    r#"{"args":["sh"],"cwd":"rel","user":{"uid":0,"gid":0}}"#,
                    "",
                ),
                "cwd",
            ),
            (
                spec_json(
                    PROCESS,
                    r#","mounts":[{"destination":"../etc","type":"tmpfs"}]"#,
                ),
                "mount destination",
            ),
            (
                spec_json(
                    PROCESS,
                    r#","mounts":[{"destination":"/x","type":"bind","source":"rel"}]"#,
                ),
                "bind mount source",
            ),
            (
                spec_json(r#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#, ""),
                "no args",
            ),
            (b"{not json".to_vec(), "not valid JSON"),
        ];
        for (json, expected) in cases {
            let err = parse_spec(&json).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} lacks {expected}");
        }
    }

    #[test]
    fn a_huge_env_is_refused() {
        let env = format!("[\"BIG={}\"]", "x".repeat(MAX_ARGS_AND_ENV_BYTES));
        let process =
            format!(r#"{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}},"env":{env}}}"#);
        let err = parse_spec(&spec_json(&process, "")).unwrap_err();
        assert!(matches!(err, SpecError::TooLarge(_)), "{err}");
    }

    #[test]
    fn exec_fields_replace_the_containers() {
        let spec = parse_spec(&spec_json(PROCESS, "")).expect("valid");
        let container = spec.process().as_ref().expect("process");
        let merged = merge_exec_process(container, br#"{"args":["id","-u"],"terminal":true}"#)
            .expect("merge");
        assert_eq!(
            merged.args().as_deref(),
            Some(&["id".to_string(), "-u".to_string()][..])
        );
        assert_eq!(merged.terminal(), Some(true));
        assert_eq!(merged.env(), container.env());
    }
}
