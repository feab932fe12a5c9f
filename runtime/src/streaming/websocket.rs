//! Kubernetes' channel protocol over WebSocket
//! (k8s.io/apimachinery/pkg/util/httpstream/wsstream): every message starts
//! with its channel number; the base64 variants send text messages whose
//! channel is an ASCII digit and whose payload is base64.

use base64::Engine as _;
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::remotecommand::OutputWire;
use super::{Input, Outcome, Output, ResizeDecoder};

pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// The subprotocols huskd speaks, best first.
pub const PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

/// The remote-command channels.
pub mod channel {
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    pub const ERROR: u8 = 3;
    pub const RESIZE: u8 = 4;
    /// v5: the client closes one channel (its number is the payload).
    pub const CLOSE: u8 = 255;
}

/// One negotiated subprotocol's framing.
#[derive(Debug, Clone, Copy)]
pub struct Framing {
    base64: bool,
    /// v4 and v5: the error channel carries a JSON `metav1.Status`.
    pub json_status: bool,
}

impl Framing {
    /// The framing of a subprotocol; "" (none asked for) is channel.k8s.io.
    pub fn of(protocol: &str) -> Framing {
        Framing {
            base64: protocol.contains("base64"),
            json_status: protocol.starts_with("v4.") || protocol.starts_with("v5."),
        }
    }

    pub fn encode(&self, channel: u8, data: &[u8]) -> Message {
        if self.base64 {
            let mut text = String::with_capacity(1 + data.len() * 4 / 3 + 4);
            text.push(char::from(b'0' + channel));
            base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
            Message::text(text)
        } else {
            let mut frame = Vec::with_capacity(1 + data.len());
            frame.push(channel);
            frame.extend_from_slice(data);
            Message::binary(frame)
        }
    }

    /// A message's channel and payload; None for control messages and
    /// what does not decode.
    pub fn decode(&self, message: Message) -> Option<(u8, Bytes)> {
        match message {
            Message::Binary(data) if !self.base64 && !data.is_empty() => {
                Some((data[0], data.slice(1..)))
            }
            Message::Text(text) if self.base64 && !text.is_empty() => {
                let text = text.as_bytes();
                let channel = text[0].checked_sub(b'0')?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(&text[1..])
                    .ok()?;
                Some((channel, data.into()))
            }
            _ => None,
        }
    }
}

/// A Close with status 1000: Go clients (gorilla/websocket) take any other
/// status, or none, as an error in the middle of the session.
pub fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

/// Reads the client's messages as a command's input until it goes away;
/// dropping `input` then tells the command.
pub async fn read_input(
    mut stream: SplitStream<Socket>,
    framing: Framing,
    input: mpsc::Sender<Input>,
) {
    let mut resize = ResizeDecoder::default();
    while let Some(message) = stream.next().await {
        let message = match message {
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(m) => m,
        };
        let Some((channel, data)) = framing.decode(message) else {
            continue;
        };
        let inputs = match channel {
            channel::STDIN if !data.is_empty() => vec![Input::Stdin(data)],
            channel::RESIZE => resize.push(&data).into_iter().map(Input::Resize).collect(),
            channel::CLOSE if data.first() == Some(&channel::STDIN) => vec![Input::StdinEnd],
            _ => Vec::new(),
        };
        for i in inputs {
            if input.send(i).await.is_err() {
                return;
            }
        }
    }
    debug!("the WebSocket client closed");
}

/// The command's side of the socket.
pub struct Wire {
    pub sink: SplitSink<Socket, Message>,
    pub framing: Framing,
}

impl OutputWire for Wire {
    async fn send(&mut self, output: Output) -> bool {
        let message = match output {
            Output::Stdout(data) => self.framing.encode(channel::STDOUT, &data),
            Output::Stderr(data) => self.framing.encode(channel::STDERR, &data),
        };
        self.sink.send(message).await.is_ok()
    }

    async fn finish(mut self, outcome: Outcome) {
        if let Some(message) = outcome.error_message(self.framing.json_status) {
            let _ = self
                .sink
                .send(self.framing.encode(channel::ERROR, &message))
                .await;
        }
        let _ = self.sink.send(normal_close()).await;
        let _ = self.sink.close().await;
    }
}
