//! huskd's side of Kubernetes' channel protocol over WebSocket: the
//! subprotocols it offers, reading a client's input and sending a command's
//! output. The framing itself is [`husk_proto::k8s_stream`], shared with huskctl.

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

pub use husk_proto::k8s_stream::{channel, Framing};

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
