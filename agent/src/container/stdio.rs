//! A process's stdin, stdout and stderr as the agent holds them: pipes, or
//! one pseudo-terminal for a tty process.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::Winsize;
use nix::unistd::pipe2;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Mutex;

/// The ends the launched process gets as fds 0, 1 and 2.
pub struct ChildStdio {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

/// The agent's ends. Each stream is taken by one reader (or writer) at a time.
pub struct ProcessIo {
    pub stdin: Mutex<Option<Input>>,
    pub stdout: Mutex<Option<Output>>,
    pub stderr: Mutex<Option<Output>>,
    pub pty: Option<Arc<PtyMaster>>,
}

pub enum Output {
    Pipe(pipe::Receiver),
    Pty(Arc<PtyMaster>),
}

pub enum Input {
    Pipe(pipe::Sender),
    Pty(Arc<PtyMaster>),
}

/// ^D: how a terminal's reader is told the input ended, as a terminal
/// has no end to close.
const END_OF_TRANSMISSION: u8 = 0x04;

impl Output {
    /// Reads some output; 0 at the end.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Output::Pipe(pipe) => pipe.read(buf).await,
            Output::Pty(pty) => pty.read(buf).await,
        }
    }
}

impl Input {
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Input::Pipe(pipe) => pipe.write_all(data).await,
            Input::Pty(pty) => pty.write_all(data).await,
        }
    }

    /// Ends the input: closes the pipe, or sends ^D to a terminal.
    pub async fn close(self) -> io::Result<()> {
        match self {
            Input::Pipe(pipe) => {
                drop(pipe);
                Ok(())
            }
            Input::Pty(pty) => pty.write_all(&[END_OF_TRANSMISSION]).await,
        }
    }
}

/// A pseudo-terminal's master side, non-blocking under tokio.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

nix::ioctl_write_ptr_bad!(set_window_size, libc::TIOCSWINSZ, Winsize);

impl PtyMaster {
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                // Once the last slave holder is gone the master reads EIO: the end.
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        set_size(self.fd.get_ref().as_fd(), rows, cols)
    }
}

/// Sets the window size of the terminal `fd` is a side of.
pub fn set_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one Winsize, and the pointer is to a live
    // one; a bad fd only makes the call fail.
    unsafe { set_window_size(fd.as_raw_fd(), &size) }
        .map(drop)
        .map_err(io::Error::from)
}

/// A tty process's stdio until its terminal exists: the container's init
/// opens the pty inside the container (its /dev/pts is not the agent's) and
/// sends the master back (see `init::open_terminal`).
pub fn detached() -> ChildStdio {
    ChildStdio {
        stdin: Stdio::null(),
        stdout: Stdio::null(),
        stderr: Stdio::null(),
    }
}

/// The agent's ends of a tty process, from the pty master its init sent.
pub fn terminal(master: OwnedFd, stdin: bool) -> io::Result<ProcessIo> {
    fcntl(&master, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and
    // the same for the AsyncFd's whole life.
    let fd = unsafe { AsyncFd::register(master) }.map_err(io::Error::from)?;
    let master = Arc::new(PtyMaster { fd });
    Ok(ProcessIo {
        stdin: Mutex::new(stdin.then(|| Input::Pty(master.clone()))),
        stdout: Mutex::new(Some(Output::Pty(master.clone()))),
        stderr: Mutex::new(None),
        pty: Some(master),
    })
}

/// Pipes for stdout and stderr, and for stdin when asked for (/dev/null otherwise).
pub fn pipes(stdin: bool) -> io::Result<(ProcessIo, ChildStdio)> {
    let (stdout_read, stdout_write) = pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let (stderr_read, stderr_write) = pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let (input, child_stdin) = if stdin {
        let (read, write) = pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        (
            Some(Input::Pipe(pipe::Sender::from_owned_fd(write)?)),
            Stdio::from(read),
        )
    } else {
        (None, Stdio::null())
    };
    let io = ProcessIo {
        stdin: Mutex::new(input),
        stdout: Mutex::new(Some(Output::Pipe(pipe::Receiver::from_owned_fd(
            stdout_read,
        )?))),
        stderr: Mutex::new(Some(Output::Pipe(pipe::Receiver::from_owned_fd(
            stderr_read,
        )?))),
        pty: None,
    };
    let child = ChildStdio {
        stdin: child_stdin,
        stdout: Stdio::from(stdout_write),
        stderr: Stdio::from(stderr_write),
    };
    Ok((io, child))
}
