//! The agent side of `init`: starts the stage process and talks to it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::init::{InitConfig, Report, CHANNEL_FD, CONSOLE_FD, INIT_ARG, START_WORD};
use super::stdio::ChildStdio;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start the container's init stage: {0}")]
    Spawn(#[source] io::Error),
    #[error("lost the container's init stage: {0}")]
    Channel(#[source] io::Error),
    #[error("the container's init stage ended without a word")]
    Silent,
    #[error("the container's init stage said {0:?} out of turn")]
    OutOfTurn(String),
    #[error("{0}")]
    Failed(String),
}

/// A launched stage: its process's pid and the channel to it.
pub struct Launched {
    pub pid: i32,
    pub channel: InitChannel,
}

pub struct InitChannel {
    lines: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
    /// Reports that came before the pid: the process and its stage write
    /// to the same channel, so their order is not fixed.
    early: VecDeque<Report>,
    console: std::os::unix::net::UnixStream,
}

/// Starts `husk-agent __husk_init` with `stdio`, sends it `config`, and
/// returns once it reported the process's pid.
pub async fn launch(config: &InitConfig, stdio: ChildStdio) -> Result<Launched, LaunchError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(LaunchError::Spawn)?;
    let (console, console_theirs) =
        std::os::unix::net::UnixStream::pair().map_err(LaunchError::Spawn)?;
    let fds = [
        (theirs.as_raw_fd(), CHANNEL_FD),
        (console_theirs.as_raw_fd(), CONSOLE_FD),
    ];
    let mut command = Command::new("/proc/self/exe");
    command
        .arg(INIT_ARG)
        .stdin(stdio.stdin)
        .stdout(stdio.stdout)
        .stderr(stdio.stderr)
        .env_clear();
    // SAFETY: runs between fork and exec; it only calls dup/dup2/fcntl,
    // which are async-signal-safe, on descriptors that stay open meanwhile.
    unsafe {
        command.pre_exec(move || place_fds(&fds));
    }
    // The reaper collects the stage's exit: dropping the Child never waits.
    let spawned = command.spawn().map_err(LaunchError::Spawn);
    drop((theirs, console_theirs));
    drop(spawned?);

    ours.set_nonblocking(true).map_err(LaunchError::Channel)?;
    let (reader, writer) = UnixStream::from_std(ours)
        .map_err(LaunchError::Channel)?
        .into_split();
    let mut channel = InitChannel {
        lines: BufReader::new(reader).lines(),
        writer,
        early: VecDeque::new(),
        console,
    };
    let mut line =
        serde_json::to_vec(config).map_err(|err| LaunchError::Channel(io::Error::other(err)))?;
    line.push(b'\n');
    channel.send(&line).await?;
    loop {
        match channel.read().await? {
            Some(Report::Pid(pid)) => return Ok(Launched { pid, channel }),
            Some(Report::Failed(message)) => return Err(LaunchError::Failed(message)),
            Some(other) => channel.early.push_back(other),
            None => return Err(LaunchError::Silent),
        }
    }
}

/// Moves the stage's ends to fds 3 and 4, where it looks for them. Each is
/// first dup'ed above both targets, so that placing one cannot close the
/// other, and dup2 leaves the results without close-on-exec.
fn place_fds(fds: &[(i32, i32); 2]) -> io::Result<()> {
    let mut moved = [0; 2];
    for (slot, (fd, _)) in moved.iter_mut().zip(fds) {
        // SAFETY: plain fcntl on a descriptor this process has open.
        *slot = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, CONSOLE_FD + 1) };
        if *slot < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    for (fd, (_, target)) in moved.iter().zip(fds) {
        // SAFETY: plain dup2 between descriptors this process has open.
        if unsafe { libc::dup2(*fd, *target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl InitChannel {
    /// The next report; `None` once the process closed the channel, which
    /// is what a successful execve does.
    pub async fn next(&mut self) -> Result<Option<Report>, LaunchError> {
        match self.early.pop_front() {
            Some(report) => Ok(Some(report)),
            None => self.read().await,
        }
    }

    async fn read(&mut self) -> Result<Option<Report>, LaunchError> {
        match self.lines.next_line().await.map_err(LaunchError::Channel)? {
            None => Ok(None),
            Some(line) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|_| LaunchError::OutOfTurn(line)),
        }
    }

    /// Waits for a created container to be set up.
    pub async fn ready(&mut self) -> Result<(), LaunchError> {
        match self.next().await? {
            Some(Report::Ready) => Ok(()),
            Some(Report::Failed(message)) => Err(LaunchError::Failed(message)),
            Some(other) => Err(LaunchError::OutOfTurn(format!("{other:?}"))),
            None => Err(LaunchError::Silent),
        }
    }

    /// The pty master a tty process's init sent, once it said so (a
    /// container's init sends it before Ready, an exec's with Terminal).
    pub async fn terminal(&mut self, announced: bool) -> Result<OwnedFd, LaunchError> {
        if !announced {
            match self.next().await? {
                Some(Report::Terminal) => {}
                Some(Report::Failed(message)) => return Err(LaunchError::Failed(message)),
                Some(other) => return Err(LaunchError::OutOfTurn(format!("{other:?}"))),
                None => return Err(LaunchError::Silent),
            }
        }
        receive_fd(&self.console).map_err(LaunchError::Channel)
    }

    /// Lets a created container's process run.
    pub async fn start(&mut self) -> Result<(), LaunchError> {
        self.send(format!("{START_WORD}\n").as_bytes()).await
    }

    /// How the exec went: `Ok(())` when the channel closed at a successful
    /// execve, the reason and exit code when it failed.
    pub async fn exec_outcome(mut self) -> Result<(), (String, i32)> {
        match self.next().await {
            Ok(None) => Ok(()),
            Ok(Some(Report::ExecFailed { message, code })) => Err((message, code)),
            Ok(Some(Report::Failed(message))) => Err((message, 1)),
            Ok(Some(other)) => Err((format!("unexpected report {other:?}"), 1)),
            Err(err) => Err((err.to_string(), 1)),
        }
    }

    async fn send(&mut self, data: &[u8]) -> Result<(), LaunchError> {
        self.writer
            .write_all(data)
            .await
            .map_err(LaunchError::Channel)
    }
}

/// One fd sent with SCM_RIGHTS; it is queued already when this is called.
fn receive_fd(socket: &std::os::unix::net::UnixStream) -> io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let message = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    for cmsg in message.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor for us;
                // nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(io::Error::other("no terminal came with the message"))
}
