//! SPDY/3.1 framing as Kubernetes clients speak it after `Upgrade:
//! SPDY/3.1` (they use moby/spdystream): the client opens one stream per
//! channel, named by its `streamType` header; header blocks are one zlib
//! stream per direction with SPDY/3's preset dictionary.
//!
//! Written here rather than taken from a crate: no maintained Rust crate
//! implements SPDY (it was retired in favour of HTTP/2 before Rust's
//! ecosystem grew one), and Kubernetes needs only a small part of it: no
//! server push, no priorities and, as spdystream, no flow control.

use std::collections::HashMap;
use std::sync::OnceLock;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use super::remotecommand::OutputWire;
use super::{Input, Outcome, Output, ResizeDecoder, StreamingError};

type Io = TokioIo<Upgraded>;

/// The remote-command subprotocols huskd speaks over SPDY, best first.
pub const EXEC_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// Port forwarding's one subprotocol.
pub const PORTFORWARD_PROTOCOLS: &[&str] = &["portforward.k8s.io"];

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const FLAG_FIN: u8 = 1;
/// RST_STREAM's status for a stream the server will not use.
const REFUSED_STREAM: u32 = 3;
/// A frame's length is 24 bits; output is sent in smaller pieces.
const MAX_DATA: usize = 32 << 10;

/// Header names of the SPDY/3 compression dictionary (draft 3, §2.6.10.1),
/// each preceded there by its 32-bit length.
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];
/// The dictionary's tail, common values without length prefixes; no
/// trailing NUL (spdystream's dictionary, which every Go client uses).
const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

fn dictionary() -> &'static [u8] {
    static DICTIONARY: OnceLock<Vec<u8>> = OnceLock::new();
    DICTIONARY.get_or_init(|| {
        let mut d = Vec::new();
        for word in DICTIONARY_WORDS {
            d.extend_from_slice(&(word.len() as u32).to_be_bytes());
            d.extend_from_slice(word.as_bytes());
        }
        d.extend_from_slice(DICTIONARY_TAIL.as_bytes());
        d
    })
}

fn spdy_err(what: impl Into<String>) -> StreamingError {
    StreamingError::Spdy(what.into())
}

/// One direction's header compression.
struct Inflater(Decompress);

impl Inflater {
    fn inflate(&mut self, mut input: &[u8]) -> Result<Vec<u8>, StreamingError> {
        let mut out = Vec::with_capacity(input.len() * 4 + 256);
        loop {
            let before = self.0.total_in();
            let result = self
                .0
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            input = &input[(self.0.total_in() - before) as usize..];
            match result {
                Ok(_) if input.is_empty() && out.len() < out.capacity() => return Ok(out),
                Ok(_) => out.reserve(out.capacity().max(1024)),
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(dictionary())
                        .map_err(|e| spdy_err(format!("header dictionary: {e}")))?;
                }
                Err(e) => return Err(spdy_err(format!("header block: {e}"))),
            }
        }
    }
}

struct Deflater {
    compress: Compress,
    primed: bool,
}

impl Deflater {
    fn deflate(&mut self, mut input: &[u8]) -> Result<Vec<u8>, StreamingError> {
        if !self.primed {
            self.compress
                .set_dictionary(dictionary())
                .map_err(|e| spdy_err(format!("header dictionary: {e}")))?;
            self.primed = true;
        }
        let mut out = Vec::with_capacity(input.len() + 64);
        loop {
            let before = self.compress.total_in();
            self.compress
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| spdy_err(format!("compressing headers: {e}")))?;
            input = &input[(self.compress.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
            out.reserve(out.capacity().max(256));
        }
    }
}

/// Name/value pairs of a decompressed header block; names lowercased.
fn parse_headers(block: &[u8]) -> Result<Vec<(String, String)>, StreamingError> {
    let truncated = || spdy_err("truncated header block");
    let (count, mut rest) = block.split_first_chunk::<4>().ok_or_else(truncated)?;
    let mut word = || -> Result<String, StreamingError> {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(truncated)?;
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return Err(truncated());
        }
        let (word, tail) = tail.split_at(len);
        rest = tail;
        Ok(String::from_utf8_lossy(word).into_owned())
    };
    let count = u32::from_be_bytes(*count) as usize;
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name = word()?.to_ascii_lowercase();
        let value = word()?;
        headers.push((name, value));
    }
    Ok(headers)
}

/// What the client did.
#[derive(Debug)]
pub enum Event {
    /// A new stream and its headers.
    Stream {
        id: u32,
        headers: Vec<(String, String)>,
    },
    Data {
        id: u32,
        data: Bytes,
        fin: bool,
    },
    Reset {
        id: u32,
    },
}

impl Event {
    pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What huskd sends.
enum Frame {
    Reply(u32),
    Data { id: u32, data: Bytes, fin: bool },
    Refuse(u32),
    Ping([u8; 4]),
    GoAway,
}

/// Sends frames on the session; the connection closes once every clone
/// is dropped.
#[derive(Clone)]
pub struct Writer(mpsc::Sender<Frame>);

impl Writer {
    pub async fn reply(&self, id: u32) -> bool {
        self.0.send(Frame::Reply(id)).await.is_ok()
    }

    pub async fn data(&self, id: u32, data: Bytes, fin: bool) -> bool {
        self.0.send(Frame::Data { id, data, fin }).await.is_ok()
    }

    pub async fn refuse(&self, id: u32) -> bool {
        self.0.send(Frame::Refuse(id)).await.is_ok()
    }

    pub async fn go_away(&self) -> bool {
        self.0.send(Frame::GoAway).await.is_ok()
    }
}

/// A live SPDY connection: the client's events, a writer, and the task
/// reading the socket (stopped when dropped).
pub struct Session {
    pub events: mpsc::Receiver<Event>,
    pub writer: Writer,
    reader: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Session {
    pub fn start(io: Io) -> Session {
        let (read, write) = tokio::io::split(io);
        let (frames_tx, frames_rx) = mpsc::channel(64);
        let (events_tx, events) = mpsc::channel(64);
        tokio::spawn(write_frames(write, frames_rx));
        let writer = Writer(frames_tx);
        let reader = tokio::spawn(read_frames(read, events_tx, writer.clone()));
        Session {
            events,
            writer,
            reader,
        }
    }

    /// Waits for the client's streams until each `streamType` of `wanted`
    /// has arrived; returns their ids. Data arriving meanwhile is kept in
    /// `early`.
    pub async fn accept(
        &mut self,
        wanted: &[&str],
        early: &mut Vec<Event>,
    ) -> Result<HashMap<String, u32>, StreamingError> {
        let mut ids = HashMap::new();
        while ids.len() < wanted.len() {
            let event = self
                .events
                .recv()
                .await
                .ok_or(StreamingError::Disconnected)?;
            let Event::Stream { id, headers } = &event else {
                early.push(event);
                continue;
            };
            let kind = Event::header(headers, "streamtype").unwrap_or_default();
            if wanted.contains(&kind) && !ids.contains_key(kind) {
                ids.insert(kind.to_owned(), *id);
                self.writer.reply(*id).await;
            } else {
                debug!(stream = id, kind, "refusing an unexpected SPDY stream");
                self.writer.refuse(*id).await;
            }
        }
        Ok(ids)
    }
}

fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    frame.extend_from_slice(&kind.to_be_bytes());
    frame.push(flags);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    frame
}

fn data_frame(id: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + data.len());
    frame.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    frame.push(if fin { FLAG_FIN } else { 0 });
    frame.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(data);
    frame
}

async fn write_frames(mut write: WriteHalf<Io>, mut frames: mpsc::Receiver<Frame>) {
    let mut deflater = Deflater {
        compress: Compress::new(Compression::default(), true),
        primed: false,
    };
    while let Some(frame) = frames.recv().await {
        let bytes = match frame {
            Frame::Reply(id) => {
                // An empty header block: a count of zero.
                let block = match deflater.deflate(&0u32.to_be_bytes()) {
                    Ok(b) => b,
                    Err(e) => {
                        debug!("{e}");
                        break;
                    }
                };
                let mut payload = id.to_be_bytes().to_vec();
                payload.extend_from_slice(&block);
                control(SYN_REPLY, 0, &payload)
            }
            Frame::Data { id, data, fin } => {
                let mut out = Vec::new();
                let mut pieces = data.chunks(MAX_DATA).peekable();
                if pieces.peek().is_none() {
                    out = data_frame(id, fin, &[]);
                }
                while let Some(piece) = pieces.next() {
                    out.extend(data_frame(id, fin && pieces.peek().is_none(), piece));
                }
                out
            }
            Frame::Refuse(id) => {
                let mut payload = id.to_be_bytes().to_vec();
                payload.extend_from_slice(&REFUSED_STREAM.to_be_bytes());
                control(RST_STREAM, 0, &payload)
            }
            Frame::Ping(id) => control(PING, 0, &id),
            Frame::GoAway => control(GOAWAY, 0, &[0; 8]),
        };
        if write.write_all(&bytes).await.is_err() {
            break;
        }
    }
    let _ = write.shutdown().await;
}

async fn read_frames(mut read: ReadHalf<Io>, events: mpsc::Sender<Event>, writer: Writer) {
    if let Err(e) = read_loop(&mut read, &events, &writer).await {
        debug!("SPDY session ends: {e}");
    }
}

async fn read_loop(
    read: &mut ReadHalf<Io>,
    events: &mpsc::Sender<Event>,
    writer: &Writer,
) -> Result<(), StreamingError> {
    let mut inflater = Inflater(Decompress::new(true));
    let mut head = [0u8; 8];
    loop {
        if read.read_exact(&mut head).await.is_err() {
            return Err(StreamingError::Disconnected);
        }
        let flags = head[4];
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let mut payload = vec![0u8; len];
        read.read_exact(&mut payload)
            .await
            .map_err(|_| StreamingError::Disconnected)?;
        let fin = flags & FLAG_FIN != 0;
        let first = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let event = if head[0] & 0x80 == 0 {
            Event::Data {
                id: first & 0x7fff_ffff,
                data: payload.into(),
                fin,
            }
        } else {
            let version = (first >> 16) as u16 & 0x7fff;
            if version != VERSION {
                return Err(spdy_err(format!("SPDY version {version}, not 3")));
            }
            let stream_id = |p: &[u8]| -> Result<u32, StreamingError> {
                let b: [u8; 4] = p
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| spdy_err("short control frame"))?;
                Ok(u32::from_be_bytes(b) & 0x7fff_ffff)
            };
            match first as u16 {
                SYN_STREAM => {
                    let id = stream_id(&payload)?;
                    let block = payload
                        .get(10..)
                        .ok_or_else(|| spdy_err("short SYN_STREAM"))?;
                    let headers = parse_headers(&inflater.inflate(block)?)?;
                    if events.send(Event::Stream { id, headers }).await.is_err() {
                        return Ok(());
                    }
                    if !fin {
                        continue;
                    }
                    Event::Data {
                        id,
                        data: Bytes::new(),
                        fin,
                    }
                }
                // Other header blocks are inflated only to keep the zlib
                // stream in step.
                SYN_REPLY | HEADERS => {
                    inflater.inflate(payload.get(4..).unwrap_or_default())?;
                    continue;
                }
                RST_STREAM => Event::Reset {
                    id: stream_id(&payload)?,
                },
                PING => {
                    let id = payload
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .ok_or_else(|| spdy_err("short PING"))?;
                    let _ = writer.0.send(Frame::Ping(id)).await;
                    continue;
                }
                GOAWAY => return Ok(()),
                // SETTINGS, WINDOW_UPDATE and the rest: nothing to do.
                _ => continue,
            }
        };
        if events.send(event).await.is_err() {
            return Ok(());
        }
    }
}

/// An exec's output streams on a SPDY session.
pub struct ExecWire {
    pub writer: Writer,
    pub stdout: Option<u32>,
    pub stderr: Option<u32>,
    pub error: Option<u32>,
    pub json_status: bool,
}

impl OutputWire for ExecWire {
    async fn send(&mut self, output: Output) -> bool {
        let (id, data) = match output {
            Output::Stdout(data) => (self.stdout, data),
            Output::Stderr(data) => (self.stderr, data),
        };
        match id {
            Some(id) => self.writer.data(id, data, false).await,
            None => true,
        }
    }

    async fn finish(self, outcome: Outcome) {
        for id in [self.stdout, self.stderr].into_iter().flatten() {
            self.writer.data(id, Bytes::new(), true).await;
        }
        if let Some(id) = self.error {
            let message = outcome.error_message(self.json_status).unwrap_or_default();
            self.writer.data(id, message.into(), true).await;
        }
        self.writer.go_away().await;
    }
}

/// Turns the client's stdin and resize streams into a command's input
/// until the session ends.
pub async fn read_exec_input(
    mut events: mpsc::Receiver<Event>,
    early: Vec<Event>,
    stdin: Option<u32>,
    resize: Option<u32>,
    input: mpsc::Sender<Input>,
) {
    let mut sizes = ResizeDecoder::default();
    let mut early = early.into_iter();
    loop {
        let event = match early.next() {
            Some(e) => e,
            None => match events.recv().await {
                Some(e) => e,
                None => return,
            },
        };
        let inputs = match event {
            Event::Data { id, data, fin } if Some(id) == stdin => {
                let mut inputs = Vec::new();
                if !data.is_empty() {
                    inputs.push(Input::Stdin(data));
                }
                if fin {
                    inputs.push(Input::StdinEnd);
                }
                inputs
            }
            Event::Reset { id } if Some(id) == stdin => vec![Input::StdinEnd],
            Event::Data { id, data, .. } if Some(id) == resize => {
                sizes.push(&data).into_iter().map(Input::Resize).collect()
            }
            _ => Vec::new(),
        };
        for i in inputs {
            if input.send(i).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert_eq!(&d[..11], b"\0\0\0\x07options");
        assert!(d.ends_with(b"enq=0."));
    }

    #[test]
    fn header_blocks_round_trip_through_zlib_with_the_dictionary() {
        let mut block = 2u32.to_be_bytes().to_vec();
        for word in ["streamType", "stdout", "port", "8080"] {
            block.extend_from_slice(&(word.len() as u32).to_be_bytes());
            block.extend_from_slice(word.as_bytes());
        }
        let mut deflater = Deflater {
            compress: Compress::new(Compression::default(), true),
            primed: false,
        };
        let mut inflater = Inflater(Decompress::new(true));
        for _ in 0..2 {
            let wire = deflater.deflate(&block).unwrap();
            let headers = parse_headers(&inflater.inflate(&wire).unwrap()).unwrap();
            assert_eq!(Event::header(&headers, "streamtype"), Some("stdout"));
            assert_eq!(Event::header(&headers, "port"), Some("8080"));
        }
        assert!(parse_headers(&[0, 0, 0, 1, 0, 0, 0, 9, b'x']).is_err());
    }
}
