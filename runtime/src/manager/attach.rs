//! What CRI Attach needs of a running container: its output as it is
//! written (the agent has one reader per stream, which is huskd's log
//! copier: the copier passes every chunk on here), and one writer of its
//! stdin shared by every attached client.

use bytes::Bytes;
use husk_proto::client::Agent;
use husk_proto::v1 as agent;
use tokio::sync::{broadcast, mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

/// Chunks an attached client may fall behind by before it loses output.
const BACKLOG: usize = 256;

/// A piece of a container's output.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub stderr: bool,
    pub data: Bytes,
}

#[derive(Default)]
enum Stdin {
    /// Nobody has written yet.
    #[default]
    Unopened,
    Open(mpsc::Sender<agent::StdinChunk>),
    Closed,
}

/// One running container's attach point.
pub struct AttachPoint {
    /// Taken away once the container has exited, so that subscribers see
    /// the end as soon as the log copiers have passed on the last output.
    output: std::sync::Mutex<Option<broadcast::Sender<Chunk>>>,
    stdin: Mutex<Stdin>,
}

impl Default for AttachPoint {
    fn default() -> AttachPoint {
        AttachPoint {
            output: std::sync::Mutex::new(Some(broadcast::channel(BACKLOG).0)),
            stdin: Mutex::new(Stdin::Unopened),
        }
    }
}

impl AttachPoint {
    fn sender(&self) -> Option<broadcast::Sender<Chunk>> {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Where the log copier passes output on (nowhere once closed).
    pub fn publisher(&self) -> broadcast::Sender<Chunk> {
        self.sender().unwrap_or_else(|| broadcast::channel(1).0)
    }

    /// Output from now on; closed once the container's streams end after
    /// [`close`](Self::close).
    pub fn subscribe(&self) -> broadcast::Receiver<Chunk> {
        match self.sender() {
            Some(sender) => sender.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// The container has exited: no more output but what the copiers
    /// still hold.
    pub fn close(&self) {
        self.output.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Writes to the container's stdin, opening the agent's stream on
    /// first use; `close` ends it for good (CRI's stdin_once). False once
    /// stdin is closed.
    pub async fn write_stdin(
        &self,
        client: &Agent,
        container: &str,
        data: Bytes,
        close: bool,
    ) -> bool {
        let mut stdin = self.stdin.lock().await;
        if matches!(*stdin, Stdin::Unopened) {
            let (tx, rx) = mpsc::channel(16);
            let mut writer = client.clone();
            tokio::spawn(async move {
                if let Err(status) = writer.write_stdin(ReceiverStream::new(rx)).await {
                    debug!("attach stdin: {}", status.message());
                }
            });
            // The first message names the process.
            let first = agent::StdinChunk {
                process: super::process(container, ""),
                ..Default::default()
            };
            *stdin = match tx.send(first).await {
                Ok(()) => Stdin::Open(tx),
                Err(_) => Stdin::Closed,
            };
        }
        let Stdin::Open(tx) = &*stdin else {
            return false;
        };
        let chunk = agent::StdinChunk {
            data: data.into(),
            close_stdin: close,
            ..Default::default()
        };
        let sent = tx.send(chunk).await.is_ok();
        if close || !sent {
            *stdin = Stdin::Closed;
        }
        sent
    }
}
