//! A container's seccomp profile (OCI `linux.seccomp`) from its CRI
//! security context: huskd's RuntimeDefault, none (Unconfined, and every
//! privileged container, as runc), or a Localhost profile file on the node
//! in Docker's format (what kubelet's `localhostProfile` names; the
//! Security Profiles Operator and containers/common write it), turned into
//! OCI's here. The agent compiles the result to BPF.
//!
//! No crate reads Docker's format (moby's own loader is Go), so the few
//! fields it adds to OCI's are read here: `archMap`, `name`, and the
//! `includes`/`excludes` conditions on capabilities, architectures and the
//! kernel version.

use std::io::Read;
use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// huskd's RuntimeDefault seccomp profile: a small denylist (everything is
/// allowed except these, which fail with EPERM). It keeps containers from
/// the kernel's module, kexec, reboot, swap, keyring, BPF and perf
/// interfaces; it is deliberately narrower than Docker's allowlist.
pub const RUNTIME_DEFAULT_DENIED: [&str; 19] = [
    "acct",
    "add_key",
    "bpf",
    "delete_module",
    "finit_module",
    "init_module",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "open_by_handle_at",
    "perf_event_open",
    "quotactl",
    "reboot",
    "request_key",
    "swapoff",
    "swapon",
    "userfaultfd",
    "vm86",
];

/// Profiles are small (Docker's default is ~20 KiB); a file far larger is
/// not one.
const MAX_PROFILE_BYTES: u64 = 4 << 20;

/// This machine's architecture as Docker's profiles name it (x86_64 only,
/// as the agent's seccomp compiler).
const NATIVE_ARCH: &str = "SCMP_ARCH_X86_64";
const NATIVE_ARCH_GO: &str = "amd64";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeccompProfileError {
    #[error("seccomp profile {0:?}: the localhost profile must be an absolute path on the node")]
    NotAbsolute(String),
    #[error("seccomp profile {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("seccomp profile {0:?} is unknown (RuntimeDefault, Unconfined or Localhost)")]
    Unknown(String),
}

/// The container's profile; `caps` is its bounding set (`CAP_*` names),
/// which Docker's `includes`/`excludes` conditions test.
pub fn profile(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    caps: &[String],
) -> Result<Option<Value>, SeccompProfileError> {
    use cri::security_profile::ProfileType;
    if sc.is_some_and(|s| s.privileged) {
        return Ok(None);
    }
    let chosen = sc.and_then(|s| s.seccomp.as_ref());
    // kubelet before 1.19 named the profile in this deprecated field.
    #[allow(deprecated)]
    let deprecated_path = sc
        .map(|s| s.seccomp_profile_path.as_str())
        .unwrap_or_default();
    let localhost = match chosen {
        Some(p) => match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault) => return Ok(Some(runtime_default())),
            Ok(ProfileType::Unconfined) => return Ok(None),
            Ok(ProfileType::Localhost) => p.localhost_ref.as_str(),
            Err(_) => return Err(SeccompProfileError::Unknown(p.profile_type.to_string())),
        },
        None => match deprecated_path {
            "" | "unconfined" => return Ok(None),
            "runtime/default" | "docker/default" => return Ok(Some(runtime_default())),
            other => other
                .strip_prefix("localhost/")
                .ok_or_else(|| SeccompProfileError::Unknown(other.to_owned()))?,
        },
    };
    let path = Path::new(localhost);
    if !path.is_absolute() {
        return Err(SeccompProfileError::NotAbsolute(localhost.to_owned()));
    }
    let unreadable = |reason: String| SeccompProfileError::Unreadable {
        path: path.to_owned(),
        reason,
    };
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_PROFILE_BYTES + 1).read_to_end(&mut text))
        .map_err(|e| unreadable(e.to_string()))?;
    if text.len() as u64 > MAX_PROFILE_BYTES {
        return Err(unreadable(format!(
            "more than {MAX_PROFILE_BYTES} bytes is too large for a profile"
        )));
    }
    let docker: DockerProfile =
        serde_json::from_slice(&text).map_err(|e| unreadable(format!("not a profile: {e}")))?;
    Ok(Some(docker.to_oci(caps, &kernel_version())))
}

fn runtime_default() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{
            "names": RUNTIME_DEFAULT_DENIED,
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1
        }]
    })
}

/// Docker's profile: OCI's fields, plus its own.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerProfile {
    default_action: String,
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    arch_map: Vec<ArchMap>,
    #[serde(default)]
    flags: Vec<String>,
    listener_path: Option<String>,
    listener_metadata: Option<String>,
    #[serde(default)]
    syscalls: Vec<DockerSyscall>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArchMap {
    architecture: String,
    #[serde(default)]
    sub_architectures: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerSyscall {
    /// Docker's first format: one name per entry.
    name: Option<String>,
    #[serde(default)]
    names: Vec<String>,
    action: String,
    errno_ret: Option<u32>,
    /// OCI's shape already (index, value, valueTwo, op).
    #[serde(default)]
    args: Vec<Value>,
    #[serde(default)]
    includes: Condition,
    #[serde(default)]
    excludes: Condition,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Condition {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    min_kernel: Option<String>,
}

impl DockerProfile {
    /// OCI's form, keeping the entries whose conditions hold for a
    /// container with bounding set `caps` on kernel `kernel`.
    fn to_oci(&self, caps: &[String], kernel: &[u32]) -> Value {
        let mut architectures = self.architectures.clone();
        for map in self
            .arch_map
            .iter()
            .filter(|m| m.architecture == NATIVE_ARCH)
        {
            architectures.push(map.architecture.clone());
            architectures.extend(map.sub_architectures.iter().cloned());
        }
        let syscalls: Vec<Value> = self
            .syscalls
            .iter()
            .filter(|s| s.applies(caps, kernel))
            .map(|s| {
                let mut names = s.names.clone();
                names.extend(s.name.iter().cloned());
                let mut entry = json!({"names": names, "action": s.action});
                if let Some(errno) = s.errno_ret {
                    entry["errnoRet"] = json!(errno);
                }
                if !s.args.is_empty() {
                    entry["args"] = json!(s.args);
                }
                entry
            })
            .collect();
        let mut oci = Map::new();
        oci.insert("defaultAction".into(), json!(self.default_action));
        if let Some(errno) = self.default_errno_ret {
            oci.insert("defaultErrnoRet".into(), json!(errno));
        }
        if !architectures.is_empty() {
            oci.insert("architectures".into(), json!(architectures));
        }
        if !self.flags.is_empty() {
            oci.insert("flags".into(), json!(self.flags));
        }
        if let Some(path) = &self.listener_path {
            oci.insert("listenerPath".into(), json!(path));
        }
        if let Some(metadata) = &self.listener_metadata {
            oci.insert("listenerMetadata".into(), json!(metadata));
        }
        oci.insert("syscalls".into(), json!(syscalls));
        Value::Object(oci)
    }
}

impl DockerSyscall {
    /// moby's rules: every `includes` capability held, the architecture
    /// among `includes.arches`, the kernel at least `minKernel`; no
    /// `excludes` capability held and the architecture not excluded.
    fn applies(&self, caps: &[String], kernel: &[u32]) -> bool {
        let holds = |cap: &String| caps.iter().any(|c| c == cap);
        let native = |arch: &String| arch == NATIVE_ARCH_GO;
        let include = &self.includes;
        let exclude = &self.excludes;
        include.caps.iter().all(holds)
            && (include.arches.is_empty() || include.arches.iter().any(native))
            && include
                .min_kernel
                .as_deref()
                .is_none_or(|min| kernel >= parse_version(min).as_slice())
            && !exclude.caps.iter().any(holds)
            && !exclude.arches.iter().any(native)
    }
}

/// "5.8" → [5, 8]; what does not parse counts as 0.
fn parse_version(text: &str) -> Vec<u32> {
    text.split(['.', '-'])
        .take(2)
        .map(|part| {
            part.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or(0)
        })
        .collect()
}

fn kernel_version() -> Vec<u32> {
    nix::sys::utsname::uname()
        .map(|u| parse_version(&u.release().to_string_lossy()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn localhost(path: &str) -> cri::LinuxContainerSecurityContext {
        cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Localhost as i32,
                localhost_ref: path.into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn runtime_default_unconfined_and_privileged() {
        let default = cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile::default()),
            ..Default::default()
        };
        let chosen = profile(Some(&default), &[]).unwrap().unwrap();
        assert_eq!(chosen["defaultAction"], "SCMP_ACT_ALLOW");
        assert!(profile(None, &[]).unwrap().is_none());
        let privileged = cri::LinuxContainerSecurityContext {
            privileged: true,
            ..localhost("/nowhere.json")
        };
        assert!(profile(Some(&privileged), &[]).unwrap().is_none());
    }

    #[test]
    fn a_localhost_profile_is_read_by_either_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("block.json");
        std::fs::write(
            &file,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","archMap":[{"architecture":"SCMP_ARCH_X86_64","subArchitectures":["SCMP_ARCH_X86"]},{"architecture":"SCMP_ARCH_AARCH64"}],
                "syscalls":[{"names":["sethostname"],"action":"SCMP_ACT_ERRNO","errnoRet":1,"comment":"x"}]}"#,
        )
        .unwrap();
        let path = file.display().to_string();
        let expected = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
            "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
        assert_eq!(
            profile(Some(&localhost(&path)), &[]).unwrap().unwrap(),
            expected
        );
        #[allow(deprecated)]
        let deprecated = cri::LinuxContainerSecurityContext {
            seccomp_profile_path: format!("localhost/{path}"),
            ..Default::default()
        };
        assert_eq!(profile(Some(&deprecated), &[]).unwrap().unwrap(), expected);
    }

    #[test]
    fn bad_localhost_profiles_say_why() {
        assert_eq!(
            profile(Some(&localhost("rel.json")), &[]),
            Err(SeccompProfileError::NotAbsolute("rel.json".into()))
        );
        let missing = profile(Some(&localhost("/no/such/profile.json")), &[]).unwrap_err();
        assert!(
            missing.to_string().contains("/no/such/profile.json"),
            "{missing}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.json");
        std::fs::write(&file, "{}").unwrap();
        let bad = profile(Some(&localhost(&file.display().to_string())), &[]).unwrap_err();
        assert!(bad.to_string().contains("not a profile"), "{bad}");
        #[allow(deprecated)]
        let unknown = cri::LinuxContainerSecurityContext {
            seccomp_profile_path: "somewhere".into(),
            ..Default::default()
        };
        assert!(matches!(
            profile(Some(&unknown), &[]),
            Err(SeccompProfileError::Unknown(_))
        ));
    }

    #[test]
    fn docker_conditions_pick_the_entries() {
        let docker: DockerProfile = serde_json::from_value(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 1,
            "syscalls": [
                {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                {"name": "mount", "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
                {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "4.8"}},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN"]},
                 "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["s390_pci_mmio_read"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["s390x"]}},
                {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64", "x32"]}}
            ]
        }))
        .unwrap();
        let names = |oci: Value| -> Vec<String> {
            oci["syscalls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["names"][0].as_str().unwrap().to_owned())
                .collect()
        };
        let plain = docker.to_oci(&["CAP_CHOWN".into()], &[6, 1]);
        assert_eq!(plain["defaultErrnoRet"], 1);
        assert_eq!(plain["syscalls"][2]["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        assert_eq!(names(plain), ["read", "ptrace", "clone", "arch_prctl"]);
        let admin = docker.to_oci(&["CAP_SYS_ADMIN".into()], &[4, 4]);
        assert_eq!(names(admin), ["read", "mount", "arch_prctl"]);
    }

    #[test]
    fn versions_compare_by_major_then_minor() {
        assert_eq!(parse_version("6.18.44-fc-v1300"), [6, 18]);
        assert_eq!(parse_version("5.8"), [5, 8]);
        assert!([6u32, 1].as_slice() >= parse_version("4.8").as_slice());
        assert!([4u32, 4].as_slice() < parse_version("4.14").as_slice());
    }
}
