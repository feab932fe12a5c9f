//! husk-vmm's control API (`--api-sock`): the request and reply types, used
//! by husk-vmm to serve it and by huskd and the tests to call it, and the
//! one client.
//!
//! The wire format is newline-delimited JSON, one request per line and one
//! reply line per request, any number per connection:
//! - `{"op":"status"}` → `{"ok":true,"status":{"state":"running","uptime_ms":..,"vcpus":..,"mem_mib":..,"pvm":..,"disks":[{"index":0,"path":..,"read_only":..,"sectors":..}]}}`
//! - `{"op":"attach_disk","index":N,"path":"/img"}` fills or replaces disk
//!   slot N (the guest sees the new capacity through a config-change
//!   interrupt); with `"fd":true` the image is the file descriptor sent with
//!   the request (SCM_RIGHTS) and `path` only names it: a jailed VMM opens
//!   nothing by path
//! - `{"op":"detach_disk","index":N}` empties slot N (capacity 0)
//! - `{"op":"shutdown"}` stops the VM at once (the graceful path is the
//!   agent's Shutdown, which resets the guest); the VMM exits 0
//!
//! Errors answer `{"ok":false,"error":"..."}`; a malformed line is an error,
//! not a closed connection.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    AttachDisk {
        index: usize,
        path: PathBuf,
        /// The image is the file descriptor that came with the request.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fd: bool,
    },
    DetachDisk {
        index: usize,
    },
    Shutdown,
}

/// One reply line. `status` is there for a `status` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            error: None,
            status: None,
        }
    }

    pub fn error(error: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(error.into()),
            status: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: String,
    pub uptime_ms: u64,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub pvm: bool,
    pub disks: Vec<Disk>,
}

/// A disk slot: its image (none when empty) and its size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    pub index: usize,
    pub path: Option<PathBuf>,
    pub read_only: bool,
    pub sectors: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach husk-vmm's control API at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control API at {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("control API at {path}: bad reply {line:?}: {source}")]
    BadReply {
        path: PathBuf,
        line: String,
        source: serde_json::Error,
    },
    #[error("encoding the request: {0}")]
    Encode(serde_json::Error),
    #[error("{0}")]
    Refused(String),
}

/// Sends `request` (with `fd` attached by SCM_RIGHTS if given) to the
/// control API at `socket` and returns its `ok` reply; a refusal is
/// [`CallError::Refused`] with husk-vmm's reason. Blocking: each read and
/// write waits at most `timeout`. (husk-vmm answers from its event loop
/// without waiting on the guest.)
pub fn call(
    socket: &Path,
    request: &Request,
    fd: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> Result<Reply, CallError> {
    let io = |what: &'static str| {
        move |source: std::io::Error| CallError::Io {
            path: socket.to_owned(),
            what,
            source,
        }
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| CallError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(io("setting timeouts"))?;
    let mut line = serde_json::to_vec(request).map_err(CallError::Encode)?;
    line.push(b'\n');
    // The descriptor goes with the request's first bytes; the rest (if the
    // socket took only part) follows plainly.
    let mut sent = 0;
    if let Some(fd) = fd {
        let fds = [fd.as_raw_fd()];
        sent = nix::sys::socket::sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&line)],
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .map_err(|e| io("sending the request")(e.into()))?;
    }
    stream
        .write_all(&line[sent..])
        .map_err(io("sending the request"))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(io("reading the reply"))?;
    let reply: Reply = serde_json::from_str(&answer).map_err(|source| CallError::BadReply {
        path: socket.to_owned(),
        line: answer.trim_end().to_owned(),
        source,
    })?;
    match reply.ok {
        true => Ok(reply),
        false => Err(CallError::Refused(
            reply
                .error
                .unwrap_or_else(|| "refused, no reason given".into()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_keep_their_wire_form() {
        let cases = [
            (Request::Status, r#"{"op":"status"}"#),
            (Request::Shutdown, r#"{"op":"shutdown"}"#),
            (
                Request::DetachDisk { index: 2 },
                r#"{"op":"detach_disk","index":2}"#,
            ),
            (
                Request::AttachDisk {
                    index: 1,
                    path: "/img".into(),
                    fd: false,
                },
                r#"{"op":"attach_disk","index":1,"path":"/img"}"#,
            ),
            (
                Request::AttachDisk {
                    index: 1,
                    path: "/img".into(),
                    fd: true,
                },
                r#"{"op":"attach_disk","index":1,"path":"/img","fd":true}"#,
            ),
        ];
        for (request, wire) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), wire);
            assert_eq!(serde_json::from_str::<Request>(wire).unwrap(), request);
        }
    }

    #[test]
    fn unknown_ops_and_fields_are_refused() {
        for bad in [
            r#"{"op":"reboot"}"#,
            r#"{"op":"detach_disk","index":1,"force":true}"#,
            r#"{"op":"attach_disk","index":1}"#,
            r#"{"index":1}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_keep_their_wire_form() {
        assert_eq!(
            serde_json::to_string(&Reply::ok()).unwrap(),
            r#"{"ok":true}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::error("no disk slot 9")).unwrap(),
            r#"{"ok":false,"error":"no disk slot 9"}"#
        );
        let status = r#"{"ok":true,"status":{"state":"running","uptime_ms":5,"vcpus":2,"mem_mib":256,"pvm":false,"disks":[{"index":0,"path":null,"read_only":true,"sectors":0}]}}"#;
        let reply: Reply = serde_json::from_str(status).unwrap();
        assert!(reply.status.as_ref().unwrap().disks[0].read_only);
        assert_eq!(serde_json::to_string(&reply).unwrap(), status);
    }

    #[test]
    fn a_refusal_carries_its_reason_and_a_request_its_fd() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let mut answers = Vec::new();
            for reply in [Reply::error("no disk slot 9"), Reply::ok()] {
                let (conn, _) = listener.accept().unwrap();
                let mut buf = [0u8; 256];
                let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let msg = nix::sys::socket::recvmsg::<()>(
                    conn.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    nix::sys::socket::MsgFlags::empty(),
                )
                .unwrap();
                answers.push(msg.cmsgs().unwrap().count());
                let mut line = serde_json::to_vec(&reply).unwrap();
                line.push(b'\n');
                (&conn).write_all(&line).unwrap();
            }
            answers
        });
        let timeout = Duration::from_secs(5);
        let err = call(&socket, &Request::DetachDisk { index: 9 }, None, timeout).unwrap_err();
        assert_eq!(err.to_string(), "no disk slot 9");
        let file = std::fs::File::open("/dev/null").unwrap();
        let request = Request::AttachDisk {
            index: 1,
            path: "/dev/null".into(),
            fd: true,
        };
        let reply = call(
            &socket,
            &request,
            Some(std::os::fd::AsFd::as_fd(&file)),
            timeout,
        );
        assert_eq!(reply.unwrap(), Reply::ok());
        assert_eq!(
            server.join().unwrap(),
            vec![0, 1],
            "control messages per request"
        );
    }
}
