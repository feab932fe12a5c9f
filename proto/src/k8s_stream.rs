//! Kubernetes' channel protocol over WebSocket
//! (k8s.io/apimachinery/pkg/util/httpstream/wsstream), as huskd's streaming
//! server and huskctl both speak it: every message starts with its channel
//! number; the base64 variants send text messages whose channel is an ASCII
//! digit and whose payload is base64.

use base64::Engine as _;
use bytes::Bytes;
use tokio_tungstenite::tungstenite::Message;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_base64_frames_round_trip() {
        for protocol in ["v5.channel.k8s.io", "v4.base64.channel.k8s.io"] {
            let framing = Framing::of(protocol);
            let message = framing.encode(channel::STDERR, b"\x00hi\xff");
            assert_eq!(message.is_text(), protocol.contains("base64"), "{protocol}");
            let (channel, data) = framing.decode(message).expect("decodes");
            assert_eq!((channel, &data[..]), (channel::STDERR, &b"\x00hi\xff"[..]));
        }
        assert!(Framing::of("v5.channel.k8s.io").json_status);
        assert!(!Framing::of("channel.k8s.io").json_status);
        assert!(Framing::of("base64.channel.k8s.io")
            .decode(Message::text(""))
            .is_none());
    }
}
