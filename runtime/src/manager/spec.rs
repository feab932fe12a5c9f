//! A container's OCI runtime spec, from kubelet's ContainerConfig and the
//! image's config, the way containerd's CRI plugin builds it.

use std::collections::BTreeSet;
use std::path::Path;

use k8s_cri::v1 as cri;
use serde_json::{json, Value};

use super::seccomp::{self, SeccompProfileError};
use crate::image::ImageRecord;
use crate::state::ProcessUser;

/// containerd's default capability set.
pub const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability up to CAP_CHECKPOINT_RESTORE (Linux 5.9), for privileged containers.
pub const ALL_CAPS: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("no command specified: the container config has no command or args and the image no entrypoint or cmd")]
    NoCommand,
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
    #[error(
        "run_as_group {0} is set without run_as_user or run_as_username: a group needs a user \
         (as in containerd and CRI-O)"
    )]
    GroupWithoutUser(i64),
    #[error(transparent)]
    Seccomp(#[from] SeccompProfileError),
    #[error("mount {0:?}: {1}")]
    Mount(String, String),
    #[error(
        "the node's {0} namespace cannot be shared with a pod in a VM (the microvm \
         handler): run the pod with the host handler"
    )]
    NodeNamespaceInVm(&'static str),
}

/// The container's namespaces (OCI `linux.namespaces`: new ones, or a
/// path to join; what is not listed is the pod's). IPC and UTS are the
/// pod's (the agent's own) unless CONTAINER asks for the container's own,
/// or NODE the node's (huskd's: not init's, as /proc/1 may be closed to
/// huskd). PID: CONTAINER is the container's own, POD the pod's (the
/// guest's in a VM, on the host one the agent keeps for the pod), NODE
/// the node's. A VM cannot share the node's PID or IPC namespace: refused.
fn namespaces(
    options: Option<&cri::NamespaceOption>,
    in_vm: bool,
) -> Result<Vec<Value>, SpecError> {
    use cri::NamespaceMode;
    let pid = options.map(|n| n.pid()).unwrap_or(NamespaceMode::Container);
    let ipc = options.map(|n| n.ipc()).unwrap_or(NamespaceMode::Pod);
    if in_vm {
        for (what, mode) in [("PID", pid), ("IPC", ipc)] {
            if mode == NamespaceMode::Node {
                return Err(SpecError::NodeNamespaceInVm(what));
            }
        }
    }
    let node = |kind: &str| json!({"type": kind, "path": format!("/proc/{}/ns/{kind}", std::process::id())});
    let mut namespaces = vec![json!({"type": "mount"})];
    match pid {
        NamespaceMode::Container => namespaces.push(json!({"type": "pid"})),
        NamespaceMode::Node => namespaces.push(node("pid")),
        _ => {}
    }
    match ipc {
        NamespaceMode::Container => namespaces.push(json!({"type": "ipc"})),
        NamespaceMode::Node => namespaces.push(node("ipc")),
        _ => {}
    }
    Ok(namespaces)
}

/// What the spec is built from.
pub struct SpecInput<'a> {
    pub config: &'a cri::ContainerConfig,
    pub pod: &'a cri::PodSandboxConfig,
    pub image: &'a ImageRecord,
    /// The image's unpacked rootfs (for /etc/passwd and /etc/group).
    pub rootfs: &'a Path,
    /// The pod's resolv.conf as the agent sees it (in its shared
    /// directory), if it has one.
    pub resolv_conf: Option<&'a Path>,
    /// The pod's hosts file, likewise.
    pub hosts: Option<&'a Path>,
    /// The pod is a VM of its own: the node's namespaces are out of reach,
    /// and the guest's PID namespace is the pod's.
    pub in_vm: bool,
}

/// The process's argv: Docker's rules for command/args vs entrypoint/cmd.
pub fn process_args(
    config: &cri::ContainerConfig,
    image: &ImageRecord,
) -> Result<Vec<String>, SpecError> {
    let (command, args) = if config.command.is_empty() {
        let args = if config.args.is_empty() {
            image.cmd.clone()
        } else {
            config.args.clone()
        };
        (image.entrypoint.clone(), args)
    } else {
        (config.command.clone(), config.args.clone())
    };
    let argv: Vec<String> = command.into_iter().chain(args).collect();
    if argv.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(argv)
}

/// The image's env with the container's laid over it, by name.
pub fn process_env(config: &cri::ContainerConfig, image: &ImageRecord) -> Vec<String> {
    let mut env: Vec<String> = image.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_owned());
    }
    for kv in &config.envs {
        let entry = format!("{}={}", kv.key, kv.value);
        let prefix = format!("{}=", kv.key);
        match env.iter_mut().find(|e| e.starts_with(&prefix)) {
            Some(slot) => *slot = entry,
            None => env.push(entry),
        }
    }
    env
}

/// Looks `name` up in an /etc/passwd- or /etc/group-style file: its id
/// (third field) and, for passwd, its primary gid (fourth field).
fn lookup(file: &Path, name: &str) -> Option<(u32, Option<u32>)> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() != Some(&name) || fields.len() < 3 {
            return None;
        }
        let id = fields[2].parse().ok()?;
        Some((id, fields.get(3).and_then(|g| g.parse().ok())))
    })
}

/// The primary gid of uid `uid` per /etc/passwd, 0 if it is not listed.
fn primary_gid(rootfs: &Path, uid: u32) -> u32 {
    let text = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    text.lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 4 && fields[2].parse() == Ok(uid))
                .then(|| fields[3].parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

/// The name of uid `uid` per /etc/passwd.
fn user_name(rootfs: &Path, uid: u32) -> Option<String> {
    let text = std::fs::read_to_string(rootfs.join("etc/passwd")).ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 3 && fields[2].parse() == Ok(uid)).then(|| fields[0].to_owned())
    })
}

/// The gids of the groups /etc/group lists `user` as a member of.
fn member_gids(rootfs: &Path, user: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let members = fields.get(3)?;
            members
                .split(',')
                .any(|member| !member.is_empty() && member == user)
                .then(|| fields.get(2)?.parse().ok())
                .flatten()
        })
        .collect()
}

/// uid and gid: run_as_user / run_as_username / run_as_group first, then the
/// image's `User` (`uid`, `name`, `uid:gid`, `name:group`). Supplementary
/// groups: the config's, and under the Merge policy (the default) also
/// those the image's /etc/group makes the user a member of, as containerd.
pub fn process_user(
    config: &cri::ContainerConfig,
    image: &ImageRecord,
    rootfs: &Path,
) -> Result<(u32, u32, Vec<u32>), SpecError> {
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());
    let resolve_user = |user: &str| -> Result<(u32, Option<u32>), SpecError> {
        match user.parse::<u32>() {
            Ok(uid) => Ok((uid, None)),
            Err(_) => lookup(&rootfs.join("etc/passwd"), user)
                .ok_or_else(|| SpecError::UnknownUser(user.to_owned())),
        }
    };
    let resolve_group = |group: &str| -> Result<u32, SpecError> {
        match group.parse::<u32>() {
            Ok(gid) => Ok(gid),
            Err(_) => lookup(&rootfs.join("etc/group"), group)
                .map(|(gid, _)| gid)
                .ok_or_else(|| SpecError::UnknownGroup(group.to_owned())),
        }
    };
    let (image_user, image_group) = match image.user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image.user.as_str(), None),
    };
    let run_as_user = sc.and_then(|s| s.run_as_user.as_ref()).map(|v| v.value);
    let run_as_username = sc.map(|s| s.run_as_username.as_str()).unwrap_or_default();
    if let Some(gid) = sc.and_then(|s| s.run_as_group.as_ref()) {
        if run_as_user.is_none() && run_as_username.is_empty() {
            return Err(SpecError::GroupWithoutUser(gid.value));
        }
    }
    let (uid, passwd_gid) = if let Some(uid) = run_as_user {
        (
            u32::try_from(uid).map_err(|_| SpecError::UnknownUser(uid.to_string()))?,
            None,
        )
    } else if !run_as_username.is_empty() {
        resolve_user(run_as_username)?
    } else if !image_user.is_empty() {
        resolve_user(image_user)?
    } else {
        (0, Some(0))
    };
    let gid = if let Some(gid) = sc.and_then(|s| s.run_as_group.as_ref()).map(|v| v.value) {
        u32::try_from(gid).map_err(|_| SpecError::UnknownGroup(gid.to_string()))?
    } else if let (Some(g), None, "") = (image_group, run_as_user, run_as_username) {
        resolve_group(g)?
    } else {
        passwd_gid.unwrap_or_else(|| primary_gid(rootfs, uid))
    };
    let mut groups: Vec<u32> = sc
        .map(|s| {
            s.supplemental_groups
                .iter()
                .filter_map(|g| u32::try_from(*g).ok())
                .collect()
        })
        .unwrap_or_default();
    let strict =
        sc.is_some_and(|s| s.supplemental_groups_policy() == cri::SupplementalGroupsPolicy::Strict);
    if !strict {
        let name = match (run_as_username, image_user) {
            ("", image_user)
                if run_as_user.is_none()
                    && !image_user.is_empty()
                    && image_user.parse::<u32>().is_err() =>
            {
                Some(image_user.to_owned())
            }
            ("", _) => user_name(rootfs, uid),
            (name, _) => Some(name.to_owned()),
        };
        for gid in name.map(|n| member_gids(rootfs, &n)).unwrap_or_default() {
            if !groups.contains(&gid) {
                groups.push(gid);
            }
        }
    }
    Ok((uid, gid, groups))
}

/// `NET_ADMIN` and `CAP_NET_ADMIN` both name CAP_NET_ADMIN.
fn cap_name(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    }
}

pub fn capabilities(sc: Option<&cri::LinuxContainerSecurityContext>) -> Vec<String> {
    let Some(sc) = sc else {
        return DEFAULT_CAPS.iter().map(|c| c.to_string()).collect();
    };
    if sc.privileged {
        return ALL_CAPS.iter().map(|c| c.to_string()).collect();
    }
    let mut caps: BTreeSet<String> = DEFAULT_CAPS.iter().map(|c| c.to_string()).collect();
    if let Some(c) = &sc.capabilities {
        for add in &c.add_capabilities {
            if add.eq_ignore_ascii_case("ALL") {
                caps.extend(ALL_CAPS.iter().map(|c| c.to_string()));
            } else {
                caps.insert(cap_name(add));
            }
        }
        for drop in &c.drop_capabilities {
            if drop.eq_ignore_ascii_case("ALL") {
                caps.clear();
            } else {
                caps.remove(&cap_name(drop));
            }
        }
        // An explicit add wins over drop ALL, as in containerd.
        if c.drop_capabilities
            .iter()
            .any(|d| d.eq_ignore_ascii_case("ALL"))
        {
            for add in &c.add_capabilities {
                if !add.eq_ignore_ascii_case("ALL") {
                    caps.insert(cap_name(add));
                }
            }
        }
    }
    caps.into_iter().collect()
}

/// OCI `linux.resources` from CRI's. Fields left 0 or empty are not set:
/// at creation the cgroup's defaults stand, in an update its current values.
pub fn resources(r: &cri::LinuxContainerResources) -> Value {
    let mut out = serde_json::Map::new();
    let mut cpu = serde_json::Map::new();
    if r.cpu_shares > 0 {
        cpu.insert("shares".into(), json!(r.cpu_shares));
    }
    if r.cpu_quota > 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_period > 0 {
        cpu.insert("period".into(), json!(r.cpu_period));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.insert("mems".into(), json!(r.cpuset_mems));
    }
    if !cpu.is_empty() {
        out.insert("cpu".into(), Value::Object(cpu));
    }
    if r.memory_limit_in_bytes > 0 {
        let mut memory = json!({"limit": r.memory_limit_in_bytes});
        if r.memory_swap_limit_in_bytes > 0 {
            memory["swap"] = json!(r.memory_swap_limit_in_bytes);
        }
        out.insert("memory".into(), memory);
    }
    if !r.unified.is_empty() {
        out.insert("unified".into(), json!(r.unified));
    }
    Value::Object(out)
}

/// The whole spec, and the identity its process gets (for ContainerStatus).
pub fn build(input: &SpecInput<'_>) -> Result<(Value, ProcessUser), SpecError> {
    let config = input.config;
    let linux = config.linux.as_ref();
    let sc = linux.and_then(|l| l.security_context.as_ref());
    let privileged = sc.is_some_and(|s| s.privileged);
    let args = process_args(config, input.image)?;
    let env = process_env(config, input.image);
    let (uid, gid, groups) = process_user(config, input.image, input.rootfs)?;
    let cwd = if !config.working_dir.is_empty() {
        config.working_dir.clone()
    } else if !input.image.working_dir.is_empty() {
        input.image.working_dir.clone()
    } else {
        "/".to_owned()
    };
    let caps = capabilities(sc);
    // No rlimits: the process inherits the agent's, as containerd 2 leaves them.
    let mut process = json!({
        "terminal": config.tty,
        "user": {"uid": uid, "gid": gid},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": sc.is_some_and(|s| s.no_new_privs),
    });
    if !groups.is_empty() {
        process["user"]["additionalGids"] = json!(&groups);
    }

    let mut sys_options = vec!["nosuid", "noexec", "nodev"];
    if !privileged {
        sys_options.push("ro");
    }
    let mut cgroup_options = vec!["nosuid", "noexec", "nodev", "relatime"];
    if !privileged {
        cgroup_options.push("ro");
    }
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_options}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": cgroup_options}),
    ];
    let has_mount = |dest: &str| config.mounts.iter().any(|m| m.container_path == dest);
    for (destination, source) in [
        ("/etc/resolv.conf", input.resolv_conf),
        ("/etc/hosts", input.hosts),
    ] {
        if let (false, Some(source)) = (has_mount(destination), source) {
            mounts.push(json!({
                "destination": destination, "type": "bind",
                "source": source, "options": ["rbind", "rprivate", "ro"]
            }));
        }
    }
    for m in &config.mounts {
        if !m.container_path.starts_with('/') {
            return Err(SpecError::Mount(
                m.container_path.clone(),
                "the container path must be absolute".into(),
            ));
        }
        if !m.host_path.starts_with('/') {
            return Err(SpecError::Mount(
                m.container_path.clone(),
                format!("host path {:?} must be absolute", m.host_path),
            ));
        }
        let propagation = match cri::MountPropagation::try_from(m.propagation) {
            Ok(cri::MountPropagation::PropagationHostToContainer) => "rslave",
            Ok(cri::MountPropagation::PropagationBidirectional) => "rshared",
            _ => "rprivate",
        };
        let mut options = vec!["rbind", propagation];
        if m.readonly {
            options.push("ro");
        }
        if m.recursive_read_only {
            // As the CRI says: only on a read-only mount without propagation.
            if !m.readonly || propagation != "rprivate" {
                return Err(SpecError::Mount(
                    m.container_path.clone(),
                    "recursive_read_only needs readonly and PROPAGATION_PRIVATE".into(),
                ));
            }
            // runc's name for it: the agent makes every mount below read-only too.
            options.push("rro");
        }
        mounts.push(json!({
            "destination": m.container_path, "type": "bind",
            "source": m.host_path, "options": options
        }));
    }

    let namespaces = namespaces(sc.and_then(|s| s.namespace_options.as_ref()), input.in_vm)?;
    let mut linux_spec = json!({"namespaces": namespaces});
    if !privileged {
        let masked = sc
            .map(|s| s.masked_paths.clone())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| {
                [
                    "/proc/acpi",
                    "/proc/kcore",
                    "/proc/keys",
                    "/proc/latency_stats",
                    "/proc/timer_list",
                    "/proc/timer_stats",
                    "/proc/sched_debug",
                    "/proc/scsi",
                    "/sys/firmware",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            });
        let readonly = sc
            .map(|s| s.readonly_paths.clone())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| {
                [
                    "/proc/asound",
                    "/proc/bus",
                    "/proc/fs",
                    "/proc/irq",
                    "/proc/sys",
                    "/proc/sysrq-trigger",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            });
        linux_spec["maskedPaths"] = json!(masked);
        linux_spec["readonlyPaths"] = json!(readonly);
    }
    if let Some(profile) = seccomp::profile(sc, &caps)? {
        linux_spec["seccomp"] = profile;
    }
    if let Some(r) = linux.and_then(|l| l.resources.as_ref()) {
        let res = resources(r);
        if res.as_object().is_some_and(|o| !o.is_empty()) {
            linux_spec["resources"] = res;
        }
    }

    let mut annotations = config.annotations.clone();
    annotations.insert(
        "io.kubernetes.cri.container-type".into(),
        "container".into(),
    );
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": "rootfs", "readonly": sc.is_some_and(|s| s.readonly_rootfs)},
        "hostname": input.pod.hostname,
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux_spec,
    });
    Ok((spec, ProcessUser { uid, gid, groups }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entrypoint: &[&str], cmd: &[&str], user: &str) -> ImageRecord {
        ImageRecord {
            user: user.into(),
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/bin".into(), "A=image".into()],
            working_dir: "/home".into(),
            ..ImageRecord::bare(b"c")
        }
    }

    fn config(command: &[&str], args: &[&str]) -> cri::ContainerConfig {
        cri::ContainerConfig {
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn namespaces_by_mode_and_driver() {
        use cri::NamespaceMode::{Container, Node, Pod};
        let types = |pid, ipc, in_vm| {
            let options = cri::NamespaceOption {
                pid: pid as i32,
                ipc: ipc as i32,
                ..Default::default()
            };
            namespaces(Some(&options), in_vm).map(|list| {
                list.iter()
                    .map(|n| n["type"].as_str().unwrap_or_default().to_owned())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(types(Container, Pod, false).unwrap(), ["mount", "pid"]);
        assert_eq!(types(Container, Pod, true).unwrap(), ["mount", "pid"]);
        // POD: not listed, the pod's (the agent knows which).
        assert_eq!(types(Pod, Pod, true).unwrap(), ["mount"]);
        assert_eq!(types(Pod, Pod, false).unwrap(), ["mount"]);
        assert_eq!(
            types(Node, Container, false).unwrap(),
            ["mount", "pid", "ipc"]
        );
        let node_ipc = cri::NamespaceOption {
            pid: Node as i32,
            ipc: Node as i32,
            ..Default::default()
        };
        let huskd = std::process::id();
        assert_eq!(
            namespaces(Some(&node_ipc), false).unwrap()[1..],
            [
                json!({"type": "pid", "path": format!("/proc/{huskd}/ns/pid")}),
                json!({"type": "ipc", "path": format!("/proc/{huskd}/ns/ipc")})
            ]
        );
        assert_eq!(
            types(Node, Pod, true),
            Err(SpecError::NodeNamespaceInVm("PID"))
        );
        assert_eq!(
            types(Container, Node, true),
            Err(SpecError::NodeNamespaceInVm("IPC"))
        );
    }

    #[test]
    fn args_follow_dockers_rules() {
        let img = image(&["/entry"], &["default"], "");
        assert_eq!(
            process_args(&config(&[], &[]), &img).unwrap(),
            ["/entry", "default"]
        );
        assert_eq!(
            process_args(&config(&[], &["x"]), &img).unwrap(),
            ["/entry", "x"]
        );
        assert_eq!(process_args(&config(&["sh"], &[]), &img).unwrap(), ["sh"]);
        assert_eq!(
            process_args(&config(&["sh"], &["-c", "x"]), &img).unwrap(),
            ["sh", "-c", "x"]
        );
        let bare = image(&[], &[], "");
        assert_eq!(
            process_args(&config(&[], &[]), &bare),
            Err(SpecError::NoCommand)
        );
    }

    #[test]
    fn env_overrides_by_name() {
        let mut c = config(&["sh"], &[]);
        c.envs = vec![
            cri::KeyValue {
                key: "A".into(),
                value: "cri".into(),
            },
            cri::KeyValue {
                key: "B".into(),
                value: "b=c".into(),
            },
        ];
        assert_eq!(
            process_env(&c, &image(&[], &[], "")),
            ["PATH=/bin", "A=cri", "B=b=c"]
        );
    }

    #[test]
    fn users_resolve_from_the_security_context_then_the_image() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\nhusk:x:1000:1001::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), "staff:x:50:\n").unwrap();
        let c = config(&["sh"], &[]);
        assert_eq!(
            process_user(&c, &image(&[], &[], ""), root.path()).unwrap(),
            (0, 0, vec![])
        );
        assert_eq!(
            process_user(&c, &image(&[], &[], "husk"), root.path()).unwrap(),
            (1000, 1001, vec![])
        );
        assert_eq!(
            process_user(&c, &image(&[], &[], "1000"), root.path()).unwrap(),
            (1000, 1001, vec![])
        );
        assert_eq!(
            process_user(&c, &image(&[], &[], "husk:staff"), root.path()).unwrap(),
            (1000, 50, vec![])
        );
        assert_eq!(
            process_user(&c, &image(&[], &[], "7:8"), root.path()).unwrap(),
            (7, 8, vec![])
        );
        assert!(process_user(&c, &image(&[], &[], "nobody"), root.path()).is_err());
        let mut c = config(&["sh"], &[]);
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1000 }),
                supplemental_groups: vec![5],
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(
            process_user(&c, &image(&[], &[], "7:8"), root.path()).unwrap(),
            (1000, 1001, vec![5])
        );
        // A group with a user is taken; a group alone is refused.
        let with_group = |user: Option<i64>| {
            let mut c = config(&["sh"], &[]);
            c.linux = Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    run_as_user: user.map(|value| cri::Int64Value { value }),
                    run_as_group: Some(cri::Int64Value { value: 60 }),
                    ..Default::default()
                }),
                ..Default::default()
            });
            process_user(&c, &image(&[], &[], "husk"), root.path())
        };
        assert_eq!(with_group(Some(1000)).unwrap(), (1000, 60, vec![]));
        assert_eq!(with_group(None), Err(SpecError::GroupWithoutUser(60)));
    }

    #[test]
    fn supplemental_groups_merge_the_images_unless_strict() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\nhusk:x:1000:1000::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            root.path().join("etc/group"),
            "husk:x:1000:\nstaff:x:50:root,husk\naudio:x:63:other\ntools:x:70:husk\n",
        )
        .unwrap();
        let groups = |user: Option<i64>, policy| {
            let mut c = config(&["sh"], &[]);
            c.linux = Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    run_as_user: user.map(|value| cri::Int64Value { value }),
                    supplemental_groups: vec![5, 50],
                    supplemental_groups_policy: policy as i32,
                    ..Default::default()
                }),
                ..Default::default()
            });
            process_user(&c, &image(&[], &[], "husk"), root.path())
                .unwrap()
                .2
        };
        use cri::SupplementalGroupsPolicy::{Merge, Strict};
        assert_eq!(groups(None, Merge), [5, 50, 70]);
        assert_eq!(groups(Some(1000), Merge), [5, 50, 70]);
        assert_eq!(groups(Some(0), Merge), [5, 50]);
        assert_eq!(groups(None, Strict), [5, 50]);
    }

    #[test]
    fn capabilities_add_drop_and_privileged() {
        assert_eq!(capabilities(None).len(), DEFAULT_CAPS.len());
        let sc = cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: vec!["NET_ADMIN".into()],
                drop_capabilities: vec!["ALL".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(capabilities(Some(&sc)), ["CAP_NET_ADMIN"]);
        let sc = cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                drop_capabilities: vec!["cap_kill".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(!capabilities(Some(&sc)).contains(&"CAP_KILL".to_string()));
        let sc = cri::LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        };
        assert_eq!(capabilities(Some(&sc)).len(), ALL_CAPS.len());
    }
}
