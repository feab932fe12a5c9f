//! huskctl's streaming client for `exec -i`/`--tty` and `attach`: the URL
//! from CRI Exec or Attach, then the channel protocol over WebSocket
//! (`v5.channel.k8s.io`), with the local terminal in raw mode for a tty.

use std::io::Write;
use std::os::fd::AsFd;

use futures_util::{SinkExt, StreamExt};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::client::{CliError, Result};
use husk_proto::k8s_stream::{channel, Framing};

const PROTOCOL: &str = "v5.channel.k8s.io";

fn failed(what: impl Into<String>) -> impl FnOnce(String) -> CliError {
    let what = what.into();
    move |reason| CliError::Io {
        what,
        source: std::io::Error::other(reason),
    }
}

/// The local terminal in raw mode until dropped.
struct RawTerminal(Termios);

impl RawTerminal {
    fn enter() -> Result<RawTerminal> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())
            .map_err(|e| CliError::Usage(format!("--tty needs a terminal on stdin: {e}")))?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
            .map_err(|e| failed("setting the terminal raw")(e.to_string()))?;
        Ok(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.0);
    }
}

nix::ioctl_read_bad!(window_size, libc::TIOCGWINSZ, libc::winsize);

/// The local terminal's size as the resize channel carries it.
fn terminal_size() -> Option<Vec<u8>> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the live struct; a stdout
    // that is no terminal only makes the call fail.
    unsafe { window_size(libc::STDOUT_FILENO, &mut size) }.ok()?;
    let json = serde_json::json!({"Width": size.ws_col, "Height": size.ws_row});
    Some(json.to_string().into_bytes())
}

/// The exit code in the error channel's message (a `metav1.Status`).
fn exit_code(status: &[u8]) -> Result<i32> {
    let status: serde_json::Value = serde_json::from_slice(status)
        .map_err(|e| failed("reading the exit status")(e.to_string()))?;
    if status["status"] == "Success" {
        return Ok(0);
    }
    let code = status["details"]["causes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["reason"] == "ExitCode")
        .and_then(|c| c["message"].as_str()?.parse().ok());
    match code {
        Some(code) => Ok(code),
        None => Err(failed("the command")(
            status["message"].as_str().unwrap_or("failed").to_owned(),
        )),
    }
}

/// Connects to `url`, relays stdin (when `stdin`), stdout, stderr and, for
/// a tty, the terminal's size; returns the command's exit code.
pub async fn run(url: &str, stdin: bool, tty: bool) -> Result<i32> {
    let framing = Framing::of(PROTOCOL);
    let host = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| failed("the streaming URL")(format!("{url:?} is not http://")))?;
    let tcp = TcpStream::connect(host)
        .await
        .map_err(CliError::io(format!("connecting to {host}")))?;
    let mut request = url
        .replacen("http://", "ws://", 1)
        .into_client_request()
        .map_err(|e| failed("the streaming URL")(e.to_string()))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", http_value(PROTOCOL));
    let (socket, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .map_err(|e| failed(format!("upgrading {url}"))(e.to_string()))?;
    let (mut sink, mut stream) = socket.split();
    // Keys go to the remote terminal as they are typed.
    let _raw = if tty && stdin {
        Some(RawTerminal::enter()?)
    } else {
        None
    };
    if tty {
        if let Some(size) = terminal_size() {
            let _ = sink.send(framing.encode(channel::RESIZE, &size)).await;
        }
    }
    let mut winch = signal(SignalKind::window_change())
        .map_err(CliError::io("watching the terminal's size"))?;
    let mut input = tokio::io::stdin();
    let mut buf = vec![0u8; 16 << 10];
    let mut reading = stdin;
    let mut code = None;
    loop {
        tokio::select! {
            n = input.read(&mut buf), if reading => {
                let n = n.map_err(CliError::io("reading stdin"))?;
                let message = if n == 0 {
                    reading = false;
                    framing.encode(channel::CLOSE, &[channel::STDIN])
                } else {
                    framing.encode(channel::STDIN, &buf[..n])
                };
                if sink.send(message).await.is_err() {
                    break;
                }
            }
            _ = winch.recv(), if tty => {
                if let Some(size) = terminal_size() {
                    let _ = sink.send(framing.encode(channel::RESIZE, &size)).await;
                }
            }
            message = stream.next() => {
                let message = match message {
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Err(failed("the stream")(e.to_string())),
                };
                let Some((ch, data)) = framing.decode(message) else { continue };
                match ch {
                    channel::STDOUT => write_all(&mut std::io::stdout(), &data, "stdout")?,
                    channel::STDERR => write_all(&mut std::io::stderr(), &data, "stderr")?,
                    channel::ERROR => code = Some(exit_code(&data)?),
                    _ => {}
                }
            }
        }
    }
    code.ok_or_else(|| failed("the stream")("it ended without an exit status".into()))
}

fn http_value(value: &'static str) -> tokio_tungstenite::tungstenite::http::HeaderValue {
    tokio_tungstenite::tungstenite::http::HeaderValue::from_static(value)
}

fn write_all(out: &mut impl Write, data: &[u8], what: &str) -> Result<()> {
    out.write_all(data)
        .and_then(|_| out.flush())
        .map_err(CliError::io(format!("writing to {what}")))
}
