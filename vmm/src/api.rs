//! Serves the control API on `--api-sock` (its requests, replies and wire
//! format: `husk_proto::vmm_api`) from the event loop.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use husk_proto::vmm_api::{Disk, Reply, Request, Status};
use nix::errno::Errno;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::control::{StopReason, VmmControl};
use crate::devices::virtio::block::DiskHandle;
use crate::devices::virtio::mmio::MmioTransport;

/// A request longer than this is refused and the connection closed.
const MAX_REQUEST_LEN: usize = 64 * 1024;

/// A disk slot: its backing and the transport that tells the guest of changes.
pub struct DiskSlot {
    pub handle: DiskHandle,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Facts about the VM the status request reports.
pub struct VmFacts {
    pub vcpus: u8,
    pub mem_mib: u64,
    pub pvm: bool,
    pub started: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on the API socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
}

pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    connections: HashMap<i32, Connection>,
    disks: Vec<DiskSlot>,
    facts: VmFacts,
    control: Arc<VmmControl>,
}

struct Connection {
    stream: UnixStream,
    pending: Vec<u8>,
    /// File descriptors received and not yet taken by a request.
    fds: VecDeque<OwnedFd>,
}

/// File descriptors one read takes at most; more are closed by the kernel.
const MAX_FDS_PER_READ: usize = 4;

impl ApiServer {
    pub fn bind(
        path: &Path,
        disks: Vec<DiskSlot>,
        facts: VmFacts,
        control: Arc<VmmControl>,
    ) -> Result<Self, ApiError> {
        let bind_err = |source| ApiError::Bind {
            path: path.into(),
            source,
        };
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(bind_err(e)),
            _ => {}
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            listener,
            path: path.into(),
            connections: HashMap::new(),
            disks,
            facts,
            control,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn handle(&mut self, request: Request, fds: &mut VecDeque<OwnedFd>) -> Result<Reply, String> {
        let span = tracing::info_span!("api", request = ?request);
        let _enter = span.enter();
        match request {
            Request::Status => Ok(Reply {
                status: Some(self.status()),
                ..Reply::ok()
            }),
            Request::AttachDisk { index, path, fd } => {
                let file = match fd {
                    true => Some(File::from(fds.pop_front().ok_or(
                        "\"fd\":true, but no file descriptor came with the request",
                    )?)),
                    false => None,
                };
                self.swap_disk(index, Some((&path, file)))?;
                Ok(Reply::ok())
            }
            Request::DetachDisk { index } => {
                self.swap_disk(index, None)?;
                Ok(Reply::ok())
            }
            Request::Shutdown => {
                self.control.stop(StopReason::ApiShutdown);
                Ok(Reply::ok())
            }
        }
    }

    fn status(&self) -> Status {
        Status {
            state: "running".into(),
            uptime_ms: self.facts.started.elapsed().as_millis() as u64,
            vcpus: self.facts.vcpus,
            mem_mib: self.facts.mem_mib,
            pvm: self.facts.pvm,
            disks: self
                .disks
                .iter()
                .enumerate()
                .map(|(index, slot)| {
                    let info = slot.handle.info();
                    Disk {
                        index,
                        path: info.path,
                        read_only: info.read_only,
                        sectors: info.sectors,
                    }
                })
                .collect(),
        }
    }

    fn swap_disk(&self, index: usize, new: Option<(&Path, Option<File>)>) -> Result<(), String> {
        let path = new.as_ref().map(|(path, _)| path.to_path_buf());
        let slot = self
            .disks
            .get(index)
            .ok_or_else(|| format!("no disk slot {index} (the VM has {})", self.disks.len()))?;
        slot.handle.set_backing(new).map_err(|e| e.to_string())?;
        slot.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notify_config_change();
        tracing::info!(index, path = ?path, "disk slot changed");
        Ok(())
    }

    fn respond(&mut self, line: &[u8], fds: &mut VecDeque<OwnedFd>) -> Vec<u8> {
        let reply = match serde_json::from_slice::<Request>(line) {
            Ok(request) => self.handle(request, fds).unwrap_or_else(Reply::error),
            Err(e) => Reply::error(format!("bad request: {e}")),
        };
        // A reply holds strings, numbers and paths: encoding cannot fail,
        // and if it did the caller would see a bad reply, not a hang.
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Reads what a connection sent and answers every complete line; false
    /// when the connection is finished.
    fn serve(&mut self, conn: &mut Connection) -> bool {
        let mut buf = [0u8; 4096];
        let open = loop {
            match receive(&conn.stream, &mut buf, &mut conn.fds) {
                Ok(0) => break false,
                Ok(n) => conn.pending.extend_from_slice(&buf[..n]),
                Err(Errno::EAGAIN) => break true,
                Err(Errno::EINTR) => continue,
                Err(_) => break false,
            }
        };
        while let Some(end) = conn.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = conn.pending.drain(..=end).collect();
            let reply = self.respond(&line[..line.len() - 1], &mut conn.fds);
            // Replies are small: write them blocking; a peer that does not
            // read them is dropped.
            let written = conn.stream.set_nonblocking(false).is_ok()
                && conn.stream.write_all(&reply).is_ok()
                && conn.stream.set_nonblocking(true).is_ok();
            if !written {
                return false;
            }
        }
        open && conn.pending.len() <= MAX_REQUEST_LEN
    }
}

/// Reads what `stream` has, keeping any file descriptors sent with it.
fn receive(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut VecDeque<OwnedFd>,
) -> Result<usize, Errno> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS_PER_READ]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in msg.cmsgs().map_err(|_| Errno::EINVAL)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel has just put these descriptors in this
            // process's table for this message; nothing else owns them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(msg.bytes)
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            while let Ok((stream, _)) = self.listener.accept() {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                if let Err(e) = ops.add(Events::new(&stream, EventSet::IN | EventSet::READ_HANG_UP))
                {
                    tracing::warn!("API: cannot watch a connection: {e}");
                    continue;
                }
                let fd = stream.as_raw_fd();
                self.connections.insert(
                    fd,
                    Connection {
                        stream,
                        pending: Vec::new(),
                        fds: VecDeque::new(),
                    },
                );
            }
            return;
        }
        let Some(mut conn) = self.connections.remove(&events.fd()) else {
            return;
        };
        if self.serve(&mut conn) {
            self.connections.insert(events.fd(), conn);
        } else if let Err(e) = ops.remove(Events::empty(&conn.stream)) {
            // Unwatch before the fd closes, or a reused fd number would clash.
            tracing::debug!("API: cannot unwatch a connection: {e}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("API: cannot watch the listener: {e}");
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
