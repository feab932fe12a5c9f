//! The CRI streaming server: Exec, Attach and PortForward answer with a URL
//! on it (`http://IP:PORT/{exec,attach,portforward}/TOKEN`); the client
//! connects there and upgrades to WebSocket or SPDY/3.1, as kubelet's own
//! streaming server (k8s.io/kubelet/pkg/cri/streaming) expects.
//!
//! - `server`: HTTP, tokens, upgrade negotiation.
//! - `websocket`, `spdy`: the two wire protocols.
//! - `remotecommand`: exec and attach over either wire.
//! - `portforward`: TCP into the pod's network over either wire (a host
//!   pod's namespace entered, a microVM pod's agent asked to connect).

mod portforward;
mod remotecommand;
mod server;
mod spdy;
mod token;
mod websocket;

use bytes::Bytes;
use serde::Deserialize;

pub use portforward::{forwardable_pod, PodNetwork};
pub use server::Streaming;
pub use token::{Request, TokenError, Tokens};
pub use websocket::{channel, Framing};

#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    /// The container, its pod or its agent refused.
    #[error(transparent)]
    Cri(#[from] crate::manager::CriError),
    #[error("SPDY: {0}")]
    Spdy(String),
    #[error("the client went away")]
    Disconnected,
}

/// A terminal size as clients send it on the resize stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct TermSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// What the client sends to a command, from either wire.
#[derive(Debug)]
pub enum Input {
    Stdin(Bytes),
    /// The client closed stdin.
    StdinEnd,
    Resize(TermSize),
}

/// What a command sends to the client.
#[derive(Debug)]
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// How the command ended, as the error stream reports it.
#[derive(Debug)]
pub enum Outcome {
    Exited(i32),
    Failed(String),
}

impl Outcome {
    /// The error stream's message: from protocol v4 on a JSON
    /// `metav1.Status` (the exit code as an `ExitCode` cause); before, a
    /// text message, and nothing on success.
    pub fn error_message(&self, json_status: bool) -> Option<Vec<u8>> {
        let status = match self {
            Outcome::Exited(0) if json_status => {
                serde_json::json!({"metadata": {}, "status": "Success"})
            }
            Outcome::Exited(0) => return None,
            Outcome::Exited(code) if json_status => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: {code}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            }),
            Outcome::Exited(code) => {
                return Some(format!("command terminated with non-zero exit code: {code}").into())
            }
            Outcome::Failed(why) if json_status => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": why,
                "reason": "InternalError",
            }),
            Outcome::Failed(why) => return Some(why.clone().into_bytes()),
        };
        Some(status.to_string().into_bytes())
    }
}

/// Parses the resize stream: JSON objects one after another.
#[derive(Default)]
pub struct ResizeDecoder {
    buf: Vec<u8>,
}

impl ResizeDecoder {
    /// Feeds bytes; returns the sizes now complete. Garbage is dropped.
    pub fn push(&mut self, data: &[u8]) -> Vec<TermSize> {
        self.buf.extend_from_slice(data);
        let mut sizes = Vec::new();
        let mut stream = serde_json::Deserializer::from_slice(&self.buf).into_iter::<TermSize>();
        let mut used = 0;
        loop {
            match stream.next() {
                Some(Ok(size)) => {
                    sizes.push(size);
                    used = stream.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(_)) => {
                    used = self.buf.len();
                    break;
                }
                None => {
                    used = self.buf.len();
                    break;
                }
            }
        }
        self.buf.drain(..used);
        sizes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_stream_messages() {
        assert_eq!(Outcome::Exited(0).error_message(false), None);
        let v4: serde_json::Value =
            serde_json::from_slice(&Outcome::Exited(3).error_message(true).unwrap()).unwrap();
        assert_eq!(v4["details"]["causes"][0]["message"], "3");
        assert_eq!(v4["status"], "Failure");
        let ok: serde_json::Value =
            serde_json::from_slice(&Outcome::Exited(0).error_message(true).unwrap()).unwrap();
        assert_eq!(ok["status"], "Success");
    }

    #[test]
    fn resize_messages_may_arrive_split() {
        let mut d = ResizeDecoder::default();
        assert_eq!(d.push(br#"{"Width":80,"He"#), vec![]);
        assert_eq!(
            d.push(br#"ight":24}{"Width":1,"Height":2}"#),
            vec![
                TermSize {
                    width: 80,
                    height: 24
                },
                TermSize {
                    width: 1,
                    height: 2
                }
            ]
        );
        assert_eq!(d.push(b"nonsense"), vec![]);
        assert_eq!(
            d.push(br#"{"Width":3,"Height":4}"#),
            vec![TermSize {
                width: 3,
                height: 4
            }]
        );
    }
}
