//! The container side: what runs as `husk-agent __husk_init`, a fresh,
//! single-threaded process the agent launches (see `launch`) so that the
//! namespace, mount and credential work never happens in the agent's own,
//! multi-threaded process.
//!
//! The launched stage joins the cgroup and namespaces, forks (a new PID
//! namespace takes effect for children only), reports the child's pid and
//! exits; the child — PID 1 of the container, or the exec'd process — is
//! re-parented to the agent, which reaps it. A container's child then
//! builds the rootfs, reports ready and waits for the agent's start word;
//! an exec's child runs at once. Both end in `run_process`, which drops to
//! the process's credentials and calls execve; if that fails, it says why
//! on the channel, which otherwise closes (close-on-exec) at the exec.
//!
//! One file although it is long: it is one sequence of steps in one
//! single-threaded child, whose order matters (namespaces, mounts,
//! credentials, seccomp last), best read top to bottom.
//!
//! Why not youki's libcontainer: the agent is PID 1 and reaps every child
//! with `waitpid(-1)` (see `reaper`), which takes the exit statuses
//! libcontainer waits for on its intermediate processes; and every megabyte
//! of agent costs ~4 s of boot on PVM hosts (initramfs unpack, see
//! docs/measurements.md), where libcontainer with libseccomp would add
//! several.

use std::collections::HashMap;
use std::convert::Infallible;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{
    chdir, chroot, execve, fchdir, fork, pivot_root, setgroups, setresgid, setresuid, setsid,
    ForkResult, Gid, Uid,
};
use oci_spec::runtime::{LinuxNamespaceType, LinuxSeccomp, Mount, PosixRlimitType, Process, Spec};
use rustix::fs::CWD;
use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};
use serde::{Deserialize, Serialize};

use super::paths::secure_join;
use super::{capabilities, seccomp};

/// The hidden first argument that makes husk-agent this stage.
pub const INIT_ARG: &str = "__husk_init";
/// Where the stage finds its channel to the agent.
pub const CHANNEL_FD: RawFd = 3;
/// Where it finds the socket that carries a tty's master to the agent.
pub const CONSOLE_FD: RawFd = 4;
/// What the agent sends to let a created container's process run.
pub const START_WORD: &str = "start";

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the agent sends the stage, as one JSON line.
#[derive(Debug, Serialize, Deserialize)]
pub struct InitConfig {
    /// `cgroup.procs` files to join before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// The process to run, complete (an exec's is merged with its container's).
    pub process: Process,
    pub seccomp: Option<LinuxSeccomp>,
    /// The mount namespace a container's bind mount sources are in, when
    /// it is not the agent's: a host agent's namespace was copied from the
    /// node's when the pod started and misses what was mounted since
    /// (kubelet mounts a pod's volumes later) wherever the node's mounts do
    /// not propagate.
    #[serde(default)]
    pub bind_sources_from: Option<PathBuf>,
    pub target: Target,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Target {
    /// A new container from `spec`, on the rootfs mounted at `rootfs`.
    Container { spec: Box<Spec>, rootfs: PathBuf },
    /// Another process in the container whose main process is `pid`.
    Exec { pid: i32 },
    /// PID 1 of a new PID namespace, which does nothing but reap: a host
    /// pod's own namespace, which its containers join (see `pod_pid`).
    PidNamespaceHolder,
}

/// What the stage and its child tell the agent, one JSON line each.
#[derive(Debug, Serialize, Deserialize)]
pub enum Report {
    /// The container's (or exec's) process, as the agent's PID namespace numbers it.
    Pid(i32),
    /// The container is set up and waits for the start word.
    Ready,
    /// The pty master went out on the console socket.
    Terminal,
    /// Setting up failed; the process exits.
    Failed(String),
    /// execve failed: the process exits with `code` (127 not found, 126 not executable).
    ExecFailed { message: String, code: i32 },
}

#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error("{0}: {1}")]
    Sys(String, Errno),
    #[error("{0}: {1}")]
    Io(String, io::Error),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Capabilities(#[from] capabilities::CapabilitiesError),
}

trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, InitError>;
}

impl<T> Context<T> for Result<T, Errno> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, InitError> {
        self.map_err(|err| InitError::Sys(what(), err))
    }
}

impl<T> Context<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, InitError> {
        self.map_err(|err| InitError::Io(what(), err))
    }
}

struct Channel {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Channel {
    fn report(&mut self, report: &Report) {
        // If the agent is gone there is no one to tell; the exit says enough.
        if let Ok(mut line) = serde_json::to_vec(report) {
            line.push(b'\n');
            let _ = self.writer.write_all(&line);
        }
    }

    fn read_line(&mut self) -> Result<String, InitError> {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .context(|| "reading from the agent".into())?;
        Ok(line)
    }
}

/// The stage's entry point, called from `main` before anything else runs.
pub fn main() -> ! {
    // SAFETY: the agent passes the channel as fd 3 (see launch.rs); nothing
    // else in this fresh process has touched or owns that descriptor.
    let stream = unsafe { UnixStream::from_raw_fd(CHANNEL_FD) };
    // SAFETY: as for the channel, fd 4 is the console socket from launch.rs.
    let console = unsafe { UnixStream::from_raw_fd(CONSOLE_FD) };
    // The container's process must inherit neither.
    let _ = fcntl(&stream, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    let _ = fcntl(&console, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    let mut channel = match stream.try_clone() {
        Ok(reader) => Channel {
            reader: BufReader::new(reader),
            writer: stream,
        },
        Err(_) => std::process::exit(1),
    };
    let result = channel
        .read_line()
        .and_then(|line| {
            serde_json::from_str::<InitConfig>(&line)
                .map_err(|err| InitError::Invalid(format!("bad init config: {err}")))
        })
        .and_then(|config| stage(config, &mut channel, &console));
    let Err(err) = result;
    channel.report(&Report::Failed(err.to_string()));
    std::process::exit(1)
}

fn stage(
    config: InitConfig,
    channel: &mut Channel,
    console: &UnixStream,
) -> Result<Infallible, InitError> {
    for procs in &config.cgroup_procs {
        fs::write(procs, "0").context(|| format!("joining cgroup {}", procs.display()))?;
    }
    let mut bind_sources = BindSources::new();
    let exec_root = match &config.target {
        Target::Container { spec, .. } => {
            if let Some(namespace) = &config.bind_sources_from {
                let mounts = spec.mounts().as_deref().unwrap_or_default();
                bind_sources = open_bind_sources(mounts, namespace)?;
            }
            enter_new_namespaces(spec)?;
            None
        }
        Target::Exec { pid } => Some(join_namespaces_of(*pid)?),
        Target::PidNamespaceHolder => {
            unshare(CloneFlags::CLONE_NEWPID).context(|| "unshare(CLONE_NEWPID)".into())?;
            None
        }
    };
    // SAFETY: this process is single-threaded (freshly exec'd, no threads
    // started), so the child may do anything.
    match unsafe { fork() }.context(|| "fork".into())? {
        ForkResult::Parent { child } => {
            channel.report(&Report::Pid(child.as_raw()));
            std::process::exit(0)
        }
        ForkResult::Child => {}
    }
    if let Target::PidNamespaceHolder = config.target {
        hold_pid_namespace();
    }
    let tty = config.process.terminal() == Some(true);
    if let Target::Container { spec, rootfs } = &config.target {
        build_container(spec, rootfs, bind_sources)?;
        if tty {
            open_terminal(console, &config.process)?;
        }
        channel.report(&Report::Ready);
        if channel.read_line()?.trim_end() != START_WORD {
            // The agent gave up on this container.
            std::process::exit(1);
        }
    }
    if let Some(root) = exec_root {
        fchdir(&root).context(|| "entering the container's root".into())?;
        chroot(".").context(|| "chroot into the container's root".into())?;
        if tty {
            open_terminal(console, &config.process)?;
            channel.report(&Report::Terminal);
        }
    }
    run_process(&config.process, config.seccomp.as_ref(), channel)
}

/// Reaps whatever the namespace's processes leave to their init, for as
/// long as the namespace should live: its end is a SIGKILL (an init gets
/// no other signal it does not handle). It sleeps until a child exits, so
/// an idle pod's guest is not woken for it: SIGCHLD is blocked, so it stays
/// pending until taken here (an init drops a signal left at its default).
fn hold_pid_namespace() -> ! {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let chld = SigSet::from(Signal::SIGCHLD);
    let blocked = chld.thread_block().is_ok();
    loop {
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
        if !blocked || chld.wait().is_err() {
            // Cannot happen (a valid set, a single thread); polling is the
            // fallback that still reaps.
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// Unshares the namespaces `spec` asks for without a path and joins those
/// with one. A new mount namespace is always part of it (validated by the agent).
fn enter_new_namespaces(spec: &Spec) -> Result<(), InitError> {
    let mut flags = CloneFlags::empty();
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for ns in &namespaces {
        let flag = clone_flag(ns.typ())?;
        match ns.path() {
            Some(path) => {
                let file = File::open(path).context(|| format!("opening {}", path.display()))?;
                setns(&file, flag).context(|| format!("joining {}", path.display()))?;
            }
            None => flags |= flag,
        }
    }
    unshare(flags).context(|| format!("unshare({flags:?})"))
}

fn clone_flag(typ: LinuxNamespaceType) -> Result<CloneFlags, InitError> {
    Ok(match typ {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        other => {
            return Err(InitError::Invalid(format!(
                "{other} namespaces are not supported"
            )))
        }
    })
}

/// Joins every namespace of `pid` and returns its root directory, to chroot
/// into once the mount namespace is entered (that namespace's own root may
/// be the initramfs under the container's rootfs, see `enter_rootfs`).
fn join_namespaces_of(pid: i32) -> Result<File, InitError> {
    // Opened first: once in the container's mount namespace /proc is the
    // container's, where `pid` has another number.
    let root =
        File::open(format!("/proc/{pid}/root")).context(|| format!("opening /proc/{pid}/root"))?;
    let kinds = [
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    let mut files = Vec::with_capacity(kinds.len());
    for (name, flag) in kinds {
        let path = format!("/proc/{pid}/ns/{name}");
        files.push((
            File::open(&path).context(|| format!("opening {path}"))?,
            flag,
            path,
        ));
    }
    for (file, flag, path) in files {
        setns(&file, flag).context(|| format!("joining {path}"))?;
    }
    Ok(root)
}

/// Bind mount sources already opened (as detached mount trees), by the
/// index of their mount in the spec.
type BindSources = HashMap<usize, OwnedFd>;

/// Whether a mount of type `typ` with `flags` is a bind mount.
fn is_bind(typ: &str, flags: MsFlags) -> bool {
    typ == "bind" || flags.contains(MsFlags::MS_BIND)
}

/// A bind mount's source, and whether its submounts come along.
fn bind_source(m: &Mount) -> Option<(&Path, bool)> {
    let (flags, _, _) = parse_options(m.options().as_deref().unwrap_or_default());
    let source = m.source().as_deref()?;
    is_bind(m.typ().as_deref().unwrap_or("none"), flags)
        .then_some((source, flags.contains(MsFlags::MS_REC)))
}

/// Clones the trees at the bind mounts' sources in mount namespace
/// `namespace` (open_tree), then comes back to this one.
fn open_bind_sources(mounts: &[Mount], namespace: &Path) -> Result<BindSources, InitError> {
    let ours = File::open("/proc/self/ns/mnt").context(|| "opening /proc/self/ns/mnt".into())?;
    let theirs = File::open(namespace).context(|| format!("opening {}", namespace.display()))?;
    setns(&theirs, CloneFlags::CLONE_NEWNS)
        .context(|| format!("joining mount namespace {}", namespace.display()))?;
    let opened = mounts
        .iter()
        .enumerate()
        .filter_map(|(index, m)| bind_source(m).map(|source| (index, source)))
        .map(|(index, (source, recursive))| {
            let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
            if recursive {
                flags |= OpenTreeFlags::AT_RECURSIVE;
            }
            open_tree(CWD, source, flags)
                .map(|tree| (index, tree))
                .map_err(|e| InitError::Io(format!("bind source {}", source.display()), e.into()))
        })
        .collect();
    // Back whatever happened: the rest happens in this namespace.
    setns(&ours, CloneFlags::CLONE_NEWNS).context(|| "returning to our mount namespace".into())?;
    opened
}

/// Builds the container's filesystem view and moves into it.
fn build_container(
    spec: &Spec,
    rootfs: &Path,
    mut bind_sources: BindSources,
) -> Result<(), InitError> {
    // Nothing done here may propagate back to the agent's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context(|| "making / private".into())?;
    let mounts = spec.mounts().clone().unwrap_or_default();
    for (index, m) in mounts.iter().enumerate() {
        mount_one(rootfs, m, bind_sources.remove(&index))?;
    }
    if mounts.iter().any(|m| m.destination() == Path::new("/dev")) {
        populate_dev(rootfs)?;
    }
    enter_rootfs(rootfs)?;
    if let Some(linux) = spec.linux() {
        for path in linux.masked_paths().iter().flatten() {
            mask(Path::new(path))?;
        }
        for path in linux.readonly_paths().iter().flatten() {
            make_readonly(Path::new(path))?;
        }
        for (key, value) in linux.sysctl().iter().flatten() {
            let file = Path::new("/proc/sys").join(key.replace('.', "/"));
            fs::write(&file, value).context(|| format!("setting sysctl {key}"))?;
        }
    }
    if spec.root().as_ref().and_then(|r| r.readonly()) == Some(true) {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .context(|| "making the rootfs read-only".into())?;
    }
    let new_uts = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n.typ() == LinuxNamespaceType::Uts && n.path().is_none())
        });
    if let (true, Some(hostname)) = (new_uts, spec.hostname()) {
        nix::unistd::sethostname(hostname).context(|| format!("setting hostname {hostname}"))?;
    }
    Ok(())
}

/// The flags and the filesystem data that mount(8) options stand for.
fn parse_options(options: &[String]) -> (MsFlags, MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        let (set, clear) = match option.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            // Recursive read-only: not a mount(2) flag, see `mount_one`.
            RECURSIVE_READONLY => continue,
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                propagation |= match option.trim_start_matches('r') {
                    "private" => MsFlags::MS_PRIVATE,
                    "shared" => MsFlags::MS_SHARED,
                    "slave" => MsFlags::MS_SLAVE,
                    _ => MsFlags::MS_UNBINDABLE,
                };
                if option.starts_with('r') {
                    propagation |= MsFlags::MS_REC;
                }
                continue;
            }
            _ => {
                data.push(option.as_str());
                continue;
            }
        };
        flags = (flags | set) - clear;
    }
    (flags, propagation, data.join(","))
}

/// runc's mount option for a read-only mount whose submounts are read-only too.
const RECURSIVE_READONLY: &str = "rro";

/// Makes the mount at `target` and every mount below it read-only
/// (mount_setattr with AT_RECURSIVE, Linux 5.12; rustix has no wrapper).
fn make_recursively_readonly(target: &Path) -> Result<(), InitError> {
    let what = || format!("making {} recursively read-only", target.display());
    let path = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| InitError::Invalid(format!("{}: NUL in the path", what())))?;
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is a NUL-terminated string and `attr` a mount_attr,
    // both alive across the call; the size passed is attr's.
    let result = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if result != 0 {
        return Err(InitError::Sys(what(), Errno::last()));
    }
    Ok(())
}

/// Mounts `m` below `rootfs`; a bind mount's source is `opened` when
/// `open_bind_sources` opened it.
fn mount_one(rootfs: &Path, m: &Mount, opened: Option<OwnedFd>) -> Result<(), InitError> {
    let destination = m.destination();
    let target = secure_join(rootfs, destination)
        .context(|| format!("resolving mount destination {}", destination.display()))?;
    let typ = m.typ().as_deref().unwrap_or("none");
    let (flags, propagation, data) = parse_options(m.options().as_deref().unwrap_or_default());
    let is_bind = is_bind(typ, flags);
    let what = || format!("mounting {typ} on {}", destination.display());

    if is_bind {
        let source = m
            .source()
            .as_deref()
            .ok_or_else(|| InitError::Invalid(format!("{}: no source", what())))?;
        let tree = opened.map(File::from);
        let source_is_dir = match &tree {
            Some(tree) => tree.metadata(),
            None => fs::metadata(source),
        }
        .context(|| format!("bind source {}", source.display()))?
        .is_dir();
        create_mount_point(&target, source_is_dir).context(what)?;
        match &tree {
            Some(tree) => move_mount(
                tree,
                "",
                CWD,
                &target,
                MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
            )
            .map_err(|e| InitError::Io(what(), e.into()))?,
            None => {
                let bind = MsFlags::MS_BIND | (flags & MsFlags::MS_REC);
                mount(Some(source), &target, None::<&str>, bind, None::<&str>).context(what)?;
            }
        }
        let rest = flags - MsFlags::MS_BIND - MsFlags::MS_REC;
        if !rest.is_empty() {
            // Bind mounts ignore flags until remounted.
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                rest | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None::<&str>,
            )
            .context(what)?;
        }
    } else {
        let typ = match typ {
            "cgroup" | "cgroup2" if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() => {
                "cgroup2"
            }
            "cgroup" | "cgroup2" => {
                // A cgroup v1 host: the per-controller hierarchies are the
                // host's to manage, not the container's.
                tracing::debug!("skipping the cgroup mount on a cgroup v1 host");
                return Ok(());
            }
            other => other,
        };
        create_mount_point(&target, true).context(what)?;
        let source = m.source().clone().unwrap_or_else(|| PathBuf::from(typ));
        let data = (!data.is_empty()).then_some(data.as_str());
        mount(Some(&source), &target, Some(typ), flags, data).context(what)?;
    }
    if !propagation.is_empty() {
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            propagation,
            None::<&str>,
        )
        .context(what)?;
    }
    if m.options()
        .iter()
        .flatten()
        .any(|o| o == RECURSIVE_READONLY)
    {
        make_recursively_readonly(&target)?;
    }
    Ok(())
}

fn create_mount_point(target: &Path, dir: bool) -> io::Result<()> {
    if dir {
        return fs::create_dir_all(target);
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    match OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(target)
    {
        Err(err) if err.kind() == io::ErrorKind::IsADirectory => Ok(()),
        other => other.map(drop),
    }
}

/// The device nodes and links every container's fresh /dev needs: bind
/// mounts of the agent's own nodes, which works whether or not mknod is
/// allowed where the agent runs.
fn populate_dev(rootfs: &Path) -> Result<(), InitError> {
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let source = Path::new("/dev").join(name);
        let target = rootfs.join("dev").join(name);
        create_mount_point(&target, false).context(|| format!("creating /dev/{name}"))?;
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .context(|| format!("binding /dev/{name}"))?;
    }
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ];
    for (name, target) in links {
        match std::os::unix::fs::symlink(target, rootfs.join("dev").join(name)) {
            Err(err) if err.kind() != io::ErrorKind::AlreadyExists => {
                return Err(InitError::Io(format!("linking /dev/{name}"), err))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Makes `rootfs` the root. pivot_root cannot move away from the initramfs
/// (it has no parent mount), which is the agent's root in a guest; there the
/// rootfs is moved over `/` and chrooted into, as runc's no-pivot mode does.
/// The VM around the pod is the boundary that matters in that case.
fn enter_rootfs(rootfs: &Path) -> Result<(), InitError> {
    chdir(rootfs).context(|| format!("entering {}", rootfs.display()))?;
    match pivot_root(".", ".") {
        Ok(()) => {
            // The old root now sits on top of the new one; detach it.
            umount2(".", MntFlags::MNT_DETACH).context(|| "detaching the old root".into())?;
        }
        Err(Errno::EINVAL) => {
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .context(|| "moving the rootfs over /".into())?;
            chroot(".").context(|| "chroot into the rootfs".into())?;
        }
        Err(err) => return Err(InitError::Sys("pivot_root".into(), err)),
    }
    chdir("/").context(|| "chdir /".into())
}

fn mask(path: &Path) -> Result<(), InitError> {
    let what = || format!("masking {}", path.display());
    let (source, typ, flags) = match fs::metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(InitError::Io(what(), err)),
        Ok(meta) if meta.is_dir() => ("tmpfs", Some("tmpfs"), MsFlags::MS_RDONLY),
        Ok(_) => ("/dev/null", None, MsFlags::MS_BIND),
    };
    mount(Some(source), path, typ, flags, None::<&str>).context(what)
}

fn make_readonly(path: &Path) -> Result<(), InitError> {
    let what = || format!("making {} read-only", path.display());
    match mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    ) {
        Err(Errno::ENOENT) => return Ok(()),
        other => other.context(what)?,
    }
    mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None::<&str>,
    )
    .context(what)
}

/// Opens a pty in the container's own /dev/pts (a tty program checks that
/// its terminal's name resolves there), sized as the process's consoleSize
/// says (so that the program's first look at its window is right), makes
/// its slave fds 0-2, and sends the master to the agent over the console
/// socket.
fn open_terminal(console: &UnixStream, process: &Process) -> Result<(), InitError> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let master = posix_openpt(nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY)
        .context(|| "opening /dev/ptmx".into())?;
    grantpt(&master).context(|| "grantpt".into())?;
    unlockpt(&master).context(|| "unlockpt".into())?;
    let name = ptsname_r(&master).context(|| "ptsname".into())?;
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&name)
        .context(|| format!("opening {name}"))?;
    if let Some(size) = process.console_size() {
        let clamp = |n: u64| u16::try_from(n).unwrap_or(u16::MAX);
        super::stdio::set_size(slave.as_fd(), clamp(size.height()), clamp(size.width()))
            .map_err(|e| InitError::Io("sizing the terminal".into(), e))?;
    }
    nix::unistd::dup2_stdin(&slave).context(|| "attaching the terminal".into())?;
    nix::unistd::dup2_stdout(&slave).context(|| "attaching the terminal".into())?;
    nix::unistd::dup2_stderr(&slave).context(|| "attaching the terminal".into())?;
    let fds = [master.as_raw_fd()];
    sendmsg::<()>(
        console.as_raw_fd(),
        &[io::IoSlice::new(b"t")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .context(|| "sending the terminal to the agent".into())?;
    Ok(())
}

/// Drops to the process's credentials and limits, then execs it. Order as
/// runc: capabilities' bounding set before the user changes (with
/// keep-caps), the rest after; seccomp as late as it can be — after the
/// user change when no_new_privs allows installing it unprivileged.
fn run_process(
    process: &Process,
    profile: Option<&LinuxSeccomp>,
    channel: &mut Channel,
) -> Result<Infallible, InitError> {
    setsid().context(|| "setsid".into())?;
    if process.terminal() == Some(true) {
        // SAFETY: TIOCSCTTY takes an int argument; fd 0 is the pty's slave,
        // which the agent passed as this process's stdin.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(InitError::Sys("taking the terminal".into(), Errno::last()));
        }
    }
    for rlimit in process.rlimits().iter().flatten() {
        set_rlimit(rlimit.typ(), rlimit.soft(), rlimit.hard())?;
    }
    if let Some(score) = process.oom_score_adj() {
        fs::write("/proc/self/oom_score_adj", score.to_string())
            .context(|| "setting oom_score_adj".into())?;
    }
    let caps = process
        .capabilities()
        .as_ref()
        .map(capabilities::from_spec)
        .transpose()?;
    let filters = profile.map(seccomp::compile).transpose()?;
    let no_new_privs = process.no_new_privileges() == Some(true);
    if let Some(caps) = &caps {
        capabilities::prepare(caps)?;
    }
    if let (false, Some(filters)) = (no_new_privs, &filters) {
        seccomp::install(filters)?;
    }
    let user = process.user();
    let gids: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    setgroups(&gids).context(|| "setgroups".into())?;
    let gid = Gid::from_raw(user.gid());
    setresgid(gid, gid, gid).context(|| format!("setting gid {gid}"))?;
    let uid = Uid::from_raw(user.uid());
    setresuid(uid, uid, uid).context(|| format!("setting uid {uid}"))?;
    if let Some(umask) = user.umask() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask));
    }
    if let Some(caps) = &caps {
        capabilities::apply(caps)?;
    }
    if no_new_privs {
        nix::sys::prctl::set_no_new_privs().context(|| "setting no_new_privs".into())?;
        if let Some(filters) = &filters {
            seccomp::install(filters)?;
        }
    }
    let cwd = process.cwd();
    chdir(cwd).context(|| format!("chdir to {}", cwd.display()))?;
    exec(process, channel)
}

fn set_rlimit(typ: PosixRlimitType, soft: u64, hard: u64) -> Result<(), InitError> {
    use nix::sys::resource::{setrlimit, Resource};
    let resource = match typ {
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
    };
    setrlimit(resource, soft, hard).context(|| format!("setting {typ}"))
}

/// execve of the process's command, found on the process's own PATH as a
/// shell would; on failure tells the agent why, as runc words it.
fn exec(process: &Process, channel: &mut Channel) -> Result<Infallible, InitError> {
    let args = process.args().clone().unwrap_or_default();
    let env = process.env().clone().unwrap_or_default();
    let Some(command) = args.first() else {
        return Err(InitError::Invalid("the process has no args".into()));
    };
    let (program, code, message) = match resolve(command, &env) {
        Ok(program) => (program, 0, String::new()),
        Err((code, message)) => (PathBuf::new(), code, message),
    };
    if code == 0 {
        let c_args = cstrings(args.iter().map(String::as_bytes))?;
        let c_env = cstrings(env.iter().map(String::as_bytes))?;
        let c_program = cstring(program.as_os_str().as_bytes())?;
        let err = execve(&c_program, &c_args, &c_env).unwrap_err();
        let code = if err == Errno::ENOENT { 127 } else { 126 };
        channel.report(&Report::ExecFailed {
            message: format!("exec: {command:?}: {}", err.desc().to_lowercase()),
            code,
        });
        std::process::exit(code);
    }
    channel.report(&Report::ExecFailed {
        message: message.clone(),
        code,
    });
    std::process::exit(code)
}

/// The program `command` names: as given when it has a slash, else the
/// first executable file of that name on PATH.
fn resolve(command: &str, env: &[String]) -> Result<PathBuf, (i32, String)> {
    if command.contains('/') {
        return Ok(PathBuf::from(command));
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let mut found_not_executable = false;
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(command);
        if let Ok(meta) = fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
            found_not_executable = true;
        }
    }
    if found_not_executable {
        Err((126, format!("exec: {command:?}: permission denied")))
    } else {
        Err((
            127,
            format!("exec: {command:?}: executable file not found in $PATH"),
        ))
    }
}

fn cstring(bytes: &[u8]) -> Result<CString, InitError> {
    CString::new(bytes).map_err(|_| InitError::Invalid("a NUL byte in args or env".into()))
}

fn cstrings<'a>(items: impl Iterator<Item = &'a [u8]>) -> Result<Vec<CString>, InitError> {
    items.map(cstring).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_split_into_flags_propagation_and_data() {
        let opts: Vec<String> = [
            "nosuid",
            "strictatime",
            "mode=755",
            "size=65536k",
            "rslave",
            "ro",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (flags, propagation, data) = parse_options(&opts);
        assert_eq!(
            flags,
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME | MsFlags::MS_RDONLY
        );
        assert_eq!(propagation, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        assert_eq!(data, "mode=755,size=65536k");
    }

    #[test]
    fn commands_resolve_on_the_process_path() {
        let env = vec!["PATH=/nonexistent:/bin:/usr/bin".to_string()];
        assert!(resolve("sh", &env).expect("sh").ends_with("sh"));
        assert_eq!(resolve("/x/y", &env), Ok(PathBuf::from("/x/y")));
        let (code, message) = resolve("no-such-command-here", &env).unwrap_err();
        assert_eq!(code, 127);
        assert!(
            message.contains("executable file not found in $PATH"),
            "{message}"
        );
    }
}
