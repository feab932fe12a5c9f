//! Serves gRPC clients that send a unix socket's path as HTTP/2 `:authority`.
//!
//! gRPC's C core (Python grpcio, C++, Ruby) and grpc-java send the socket
//! path of a `unix:` channel, percent-encoded (`tmp%2Fhusk.sock`), as the
//! `:authority` of every request. h2 refuses that as a malformed authority
//! and resets the stream with PROTOCOL_ERROR, so such a client gets
//! `INTERNAL` for every call; h2 keeps that strictness on purpose
//! (hyperium/h2#487, hyperium/hyper#3750), while containerd serves these
//! clients. [`AuthorityRewrite`] sits between the socket and h2 and reads the
//! client's first header block. If its `:authority` is one h2 accepts, or it
//! has none (kubelet and crictl send `localhost`), every later byte passes
//! straight through. Otherwise every header block the client sends on that
//! connection is decoded and encoded again with `:authority: localhost`.
//!
//! Hand-written because no crate rewrites header blocks inside an HTTP/2
//! byte stream, and h2's own HPACK codec is private. Only the frame layer
//! (RFC 9113 §4.1, §6.2, §6.10) and writing literals is done here; HPACK
//! decoding is loona-hpack's: the maintained successor of fluke-hpack, from
//! the loona HTTP/2 server, which runs a port of the h2spec conformance
//! suite (`hpack` and `httlib-hpack` have had no release since 2016 and
//! 2021). Its encoder is not used because it indexes every new field.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use loona_hpack::decoder::DecoderError;
use loona_hpack::encoder::encode_integer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tracing::debug;

/// What an HTTP/2 client sends before its first frame (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
/// The largest frame h2 takes from a client, and so the largest this adapter
/// reads or writes: h2's default SETTINGS_MAX_FRAME_SIZE, which `serve()`
/// sets from here so that the two cannot drift apart.
pub const MAX_FRAME_SIZE: u32 = 16_384;
/// The size of the HPACK table the client encodes against: h2's default
/// SETTINGS_HEADER_TABLE_SIZE, which huskd does not change.
const HEADER_TABLE_SIZE: usize = 4_096;
/// Bounds on one header block held for rewriting: encoded, and decoded as
/// RFC 7541 counts it (name + value + 32 per field). Well above h2's own
/// limit on the decoded list (16 KiB) so that h2, not this adapter, answers
/// large but well-formed requests; they bound what a client can make huskd
/// hold or allocate (an HPACK block of table references expands a lot).
const MAX_HEADER_BLOCK: usize = 64 * 1024;
const MAX_HEADER_LIST: usize = 256 * 1024;
/// How much is read from the socket at a time while frames are parsed.
const READ_CHUNK: usize = 16 * 1024;

const AUTHORITY: &[u8] = b":authority";
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// A HEADERS frame's stream dependency and weight (RFC 9113 §6.2).
const PRIORITY_LEN: usize = 5;

/// A CRI connection as h2 sees it: what the client sends, with its header
/// blocks rewritten if its `:authority` is one h2 refuses; what h2 writes
/// goes to the client unchanged.
pub struct AuthorityRewrite<IO> {
    io: IO,
    rewriter: Rewriter,
    /// Bytes ready for h2 to read.
    readable: BytesMut,
    /// Bytes read from the socket for the rewriter; freed once the
    /// connection passes through.
    from_socket: Vec<u8>,
    /// Why rewriting failed: h2 reads what came before, then only this.
    failure: Option<RewriteError>,
}

impl<IO> AuthorityRewrite<IO> {
    pub fn new(io: IO) -> Self {
        AuthorityRewrite {
            io,
            rewriter: Rewriter::new(),
            readable: BytesMut::new(),
            from_socket: vec![0; READ_CHUNK],
            failure: None,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityRewrite<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.readable.is_empty() {
                let n = this.readable.len().min(buf.remaining());
                buf.put_slice(&this.readable[..n]);
                this.readable.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(failure) = &this.failure {
                let failure = failure.clone();
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, failure)));
            }
            if this.rewriter.passes_through() {
                if this.from_socket.capacity() != 0 {
                    // The rewriter's buffers are done with for good.
                    this.from_socket = Vec::new();
                    this.readable = BytesMut::new();
                }
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            let mut received = ReadBuf::new(&mut this.from_socket);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut received))?;
            if received.filled().is_empty() {
                // The client is gone: h2 gets what it held back, then the end.
                this.rewriter.end_of_input(&mut this.readable);
                continue;
            }
            if let Err(failure) = this.rewriter.feed(received.filled(), &mut this.readable) {
                this.failure = Some(failure);
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AuthorityRewrite<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Requests keep the socket's connect info (peer address and credentials
/// for a `UnixStream`), as without the adapter.
impl<IO: Connected> Connected for AuthorityRewrite<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Why a client's bytes could not be read as HTTP/2 header blocks. Before
/// rewriting starts the connection then passes through and h2 answers as
/// it would have; while rewriting the connection fails, since h2's HPACK
/// state could no longer follow the client's.
#[derive(Clone, Debug, thiserror::Error)]
enum RewriteError {
    #[error("a header frame of {0} bytes, over the maximum frame size")]
    FrameTooLarge(usize),
    #[error("a HEADERS frame on stream 0")]
    HeadersOnStreamZero,
    #[error("a HEADERS frame whose padding or priority overruns its payload")]
    PaddingOverrun,
    #[error("a CONTINUATION frame outside its stream's header block")]
    StrayContinuation,
    #[error("a frame of type {0:#x} inside a header block")]
    InterruptedHeaderBlock(u8),
    #[error("a header block over {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge,
    #[error("a header list over {MAX_HEADER_LIST} bytes")]
    HeaderListTooLarge,
    #[error("HPACK: {0}")]
    Hpack(#[from] DecoderError),
}

/// The 9-byte header of an HTTP/2 frame (RFC 9113 §4.1).
#[derive(Clone, Copy)]
struct FrameHeader {
    payload_len: usize,
    kind: u8,
    flags: u8,
    stream_id: u32,
}

impl FrameHeader {
    fn parse(bytes: &[u8; FRAME_HEADER_LEN]) -> FrameHeader {
        FrameHeader {
            payload_len: usize::from(bytes[0]) << 16
                | usize::from(bytes[1]) << 8
                | usize::from(bytes[2]),
            kind: bytes[3],
            flags: bytes[4],
            stream_id: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
        }
    }

    fn write(&self, out: &mut BytesMut) {
        let len = (self.payload_len as u32).to_be_bytes();
        out.extend_from_slice(&len[1..]);
        out.extend_from_slice(&[self.kind, self.flags]);
        out.extend_from_slice(&self.stream_id.to_be_bytes());
    }
}

enum Phase {
    /// Reading the client preface; `matched` bytes of it so far.
    Preface { matched: usize },
    /// Reading frames up to the end of the client's first header block.
    FirstHeaderBlock,
    /// The client's `:authority` is one h2 refuses: every header block is
    /// encoded again.
    Rewrite,
    /// Every byte goes to h2 as the client sent it.
    PassThrough,
}

/// A header field: name and value.
type Field = (Vec<u8>, Vec<u8>);

/// A header block being collected: a HEADERS frame and its CONTINUATIONs.
struct HeaderBlock {
    stream_id: u32,
    end_stream: bool,
    /// The HPACK fragments of its frames, joined.
    fragments: Vec<u8>,
    /// Its frames as the client sent them.
    raw: Vec<u8>,
}

/// The client-to-server byte stream of one connection, without the IO: takes
/// what the client sent, hands on what h2 should read.
struct Rewriter {
    phase: Phase,
    /// The frame being read: its header and, for frames of a header block,
    /// its payload.
    frame: Vec<u8>,
    /// Payload bytes still to come of a frame that passes unchanged.
    copy_remaining: usize,
    block: Option<HeaderBlock>,
    /// The client's HPACK state (its encoder's dynamic table).
    decoder: loona_hpack::Decoder<'static>,
}

impl Rewriter {
    fn new() -> Rewriter {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Rewriter {
            phase: Phase::Preface { matched: 0 },
            frame: Vec::new(),
            copy_remaining: 0,
            block: None,
            decoder,
        }
    }

    fn passes_through(&self) -> bool {
        matches!(self.phase, Phase::PassThrough)
    }

    /// Takes `input` from the client; appends what h2 should read to `out`.
    fn feed(&mut self, mut input: &[u8], out: &mut BytesMut) -> Result<(), RewriteError> {
        while !input.is_empty() {
            match self.phase {
                Phase::PassThrough => {
                    out.extend_from_slice(input);
                    input = &[];
                }
                Phase::Preface { matched } => {
                    let n = input.len().min(PREFACE.len() - matched);
                    let (head, rest) = input.split_at(n);
                    out.extend_from_slice(head);
                    input = rest;
                    self.phase = if head != &PREFACE[matched..matched + n] {
                        // Not HTTP/2 with prior knowledge: h2 answers that.
                        Phase::PassThrough
                    } else if matched + n == PREFACE.len() {
                        Phase::FirstHeaderBlock
                    } else {
                        Phase::Preface {
                            matched: matched + n,
                        }
                    };
                }
                Phase::FirstHeaderBlock | Phase::Rewrite => {
                    input = self.take_frame_bytes(input, out);
                    if let Err(err) = self.frame_progress(out) {
                        if !matches!(self.phase, Phase::FirstHeaderBlock) {
                            return Err(err);
                        }
                        debug!("CRI connection passed through as is: {err}");
                        self.hand_over_held_bytes(out);
                    }
                }
            }
        }
        Ok(())
    }

    /// The client closed its side: whatever is held goes to h2 as sent.
    fn end_of_input(&mut self, out: &mut BytesMut) {
        self.hand_over_held_bytes(out);
    }

    fn hand_over_held_bytes(&mut self, out: &mut BytesMut) {
        if let Some(block) = self.block.take() {
            out.extend_from_slice(&block.raw);
        }
        out.extend_from_slice(&self.frame);
        self.frame = Vec::new();
        self.phase = Phase::PassThrough;
    }

    /// Copies payload of a frame that passes unchanged to `out`, or moves
    /// bytes of the frame being read into `self.frame`; returns the rest.
    fn take_frame_bytes<'a>(&mut self, input: &'a [u8], out: &mut BytesMut) -> &'a [u8] {
        if self.copy_remaining > 0 {
            let n = input.len().min(self.copy_remaining);
            out.extend_from_slice(&input[..n]);
            self.copy_remaining -= n;
            return &input[n..];
        }
        let wanted = match self.frame_header() {
            None => FRAME_HEADER_LEN,
            Some(header) => FRAME_HEADER_LEN + header.payload_len,
        };
        let n = input.len().min(wanted - self.frame.len());
        self.frame.extend_from_slice(&input[..n]);
        &input[n..]
    }

    fn frame_header(&self) -> Option<FrameHeader> {
        let bytes = self.frame.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        Some(FrameHeader::parse(bytes))
    }

    /// Acts on `self.frame` once enough of it is there: a frame outside a
    /// header block passes on as soon as its header is read; a frame of a
    /// header block is held until it is whole.
    fn frame_progress(&mut self, out: &mut BytesMut) -> Result<(), RewriteError> {
        let Some(header) = self.frame_header() else {
            return Ok(());
        };
        let of_header_block = matches!(header.kind, HEADERS | CONTINUATION) || self.block.is_some();
        if !of_header_block {
            out.extend_from_slice(&self.frame);
            self.frame.clear();
            self.copy_remaining = header.payload_len;
            return Ok(());
        }
        if header.payload_len > MAX_FRAME_SIZE as usize {
            return Err(RewriteError::FrameTooLarge(header.payload_len));
        }
        if self.frame.len() < FRAME_HEADER_LEN + header.payload_len {
            return Ok(());
        }
        let frame = std::mem::take(&mut self.frame);
        let result = self.header_block_frame(header, &frame, out);
        // Kept on failure for hand_over_held_bytes; reused otherwise.
        self.frame = frame;
        if result.is_ok() {
            self.frame.clear();
        }
        result
    }

    /// Adds a whole HEADERS or CONTINUATION frame to the block being
    /// collected, and acts on the block once it ends.
    fn header_block_frame(
        &mut self,
        header: FrameHeader,
        frame: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), RewriteError> {
        let payload = &frame[FRAME_HEADER_LEN..];
        match (header.kind, &mut self.block) {
            (HEADERS, None) => {
                if header.stream_id == 0 {
                    return Err(RewriteError::HeadersOnStreamZero);
                }
                let fragment = headers_fragment(header.flags, payload)?;
                self.block = Some(HeaderBlock {
                    stream_id: header.stream_id,
                    end_stream: header.flags & END_STREAM != 0,
                    fragments: fragment.to_vec(),
                    raw: frame.to_vec(),
                });
            }
            (CONTINUATION, Some(block)) if block.stream_id == header.stream_id => {
                if block.fragments.len() + payload.len() > MAX_HEADER_BLOCK {
                    return Err(RewriteError::HeaderBlockTooLarge);
                }
                block.fragments.extend_from_slice(payload);
                block.raw.extend_from_slice(frame);
            }
            (CONTINUATION, _) => return Err(RewriteError::StrayContinuation),
            (kind, _) => return Err(RewriteError::InterruptedHeaderBlock(kind)),
        }
        if header.flags & END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                self.header_block(block, out)?;
            }
        }
        Ok(())
    }

    fn header_block(&mut self, block: HeaderBlock, out: &mut BytesMut) -> Result<(), RewriteError> {
        let fields = self.decode(&block.fragments);
        if let Phase::Rewrite = self.phase {
            encode_header_block(&fields?, block.stream_id, block.end_stream, out);
            return Ok(());
        }
        match fields {
            Ok(fields) => match fields
                .iter()
                .find(|(name, value)| name == AUTHORITY && !valid_authority(value))
            {
                Some((_, authority)) => {
                    debug!(
                        "client sent :authority {}; serving it as localhost",
                        String::from_utf8_lossy(authority).escape_debug()
                    );
                    self.phase = Phase::Rewrite;
                    encode_header_block(&fields, block.stream_id, block.end_stream, out);
                }
                None => {
                    out.extend_from_slice(&block.raw);
                    self.phase = Phase::PassThrough;
                }
            },
            Err(err) => {
                debug!("CRI connection passed through as is: {err}");
                out.extend_from_slice(&block.raw);
                self.phase = Phase::PassThrough;
            }
        }
        Ok(())
    }

    /// Decodes a header block against the client's HPACK table.
    fn decode(&mut self, fragments: &[u8]) -> Result<Vec<Field>, RewriteError> {
        let mut fields = Vec::new();
        let mut list_size = 0usize;
        self.decoder.decode_with_cb(fragments, |name, value| {
            list_size = list_size.saturating_add(name.len() + value.len() + 32);
            if list_size <= MAX_HEADER_LIST {
                fields.push((name.into_owned(), value.into_owned()));
            }
        })?;
        if list_size > MAX_HEADER_LIST {
            return Err(RewriteError::HeaderListTooLarge);
        }
        Ok(fields)
    }
}

/// The HPACK fragment of a HEADERS frame's payload, without its padding and
/// priority fields (RFC 9113 §6.2).
fn headers_fragment(flags: u8, payload: &[u8]) -> Result<&[u8], RewriteError> {
    let mut start = 0;
    let mut padding = 0;
    if flags & PADDED != 0 {
        padding = usize::from(*payload.first().ok_or(RewriteError::PaddingOverrun)?);
        start = 1;
    }
    if flags & PRIORITY != 0 {
        start += PRIORITY_LEN;
    }
    if start + padding > payload.len() {
        return Err(RewriteError::PaddingOverrun);
    }
    Ok(&payload[start..payload.len() - padding])
}

/// Whether h2 takes `authority` as a request's `:authority`.
fn valid_authority(authority: &[u8]) -> bool {
    http::uri::Authority::try_from(authority).is_ok()
}

/// Appends `fields` to `out` as a HEADERS frame on `stream_id` and as many
/// CONTINUATIONs as needed, with a refused `:authority` replaced. Each field
/// is a literal without indexing (RFC 7541 §6.2.2): h2's HPACK table then
/// stays empty, and never has to follow the client's.
fn encode_header_block(fields: &[Field], stream_id: u32, end_stream: bool, out: &mut BytesMut) {
    let mut block = Vec::new();
    for (name, value) in fields {
        let value = if name == AUTHORITY && !valid_authority(value) {
            REPLACEMENT_AUTHORITY
        } else {
            value
        };
        // Literal without indexing, new name.
        block.push(0x00);
        for string in [name.as_slice(), value] {
            // A 7-bit prefix with the Huffman bit clear: the octets as they are.
            block.extend_from_slice(&encode_integer(string.len(), 7));
            block.extend_from_slice(string);
        }
    }
    // An empty block still needs its HEADERS frame.
    let pieces: Vec<&[u8]> = if block.is_empty() {
        vec![&[]]
    } else {
        block.chunks(MAX_FRAME_SIZE as usize).collect()
    };
    for (i, piece) in pieces.iter().enumerate() {
        let mut flags = 0;
        if i == 0 && end_stream {
            flags |= END_STREAM;
        }
        if i + 1 == pieces.len() {
            flags |= END_HEADERS;
        }
        FrameHeader {
            payload_len: piece.len(),
            kind: if i == 0 { HEADERS } else { CONTINUATION },
            flags,
            stream_id,
        }
        .write(out);
        out.extend_from_slice(piece);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::AsyncReadExt;

    const BAD_AUTHORITY: &[u8] = b"tmp%2Fhd%2Fhusk.sock";
    const SETTINGS: u8 = 0x4;
    const DATA: u8 = 0x0;

    type Fields = Vec<Field>;

    fn request(path: &str, authority: &[u8]) -> Fields {
        [
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (
                b"user-agent",
                b"grpc-python/1.85.4 grpc-c/50.0.0 (linux; chttp2)",
            ),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect()
    }

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        FrameHeader {
            payload_len: payload.len(),
            kind,
            flags,
            stream_id,
        }
        .write(&mut out);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    fn client_start() -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        // SETTINGS_ENABLE_PUSH = 0.
        bytes.extend(frame(SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 0]));
        bytes
    }

    /// A client's stream: hands out at most `chunk` bytes per read.
    struct Chunked {
        bytes: Vec<u8>,
        at: usize,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let n = this
                .chunk
                .min(buf.remaining())
                .min(this.bytes.len() - this.at);
            buf.put_slice(&this.bytes[this.at..this.at + n]);
            this.at += n;
            Poll::Ready(Ok(()))
        }
    }

    /// What h2 reads when the client sends `bytes`, in reads of `chunk`.
    async fn as_h2_reads(bytes: &[u8], chunk: usize) -> io::Result<Vec<u8>> {
        let mut conn = AuthorityRewrite::new(Chunked {
            bytes: bytes.to_vec(),
            at: 0,
            chunk,
        });
        let mut out = Vec::new();
        conn.read_to_end(&mut out).await?;
        Ok(out)
    }

    /// What h2 reads when the client sends `bytes`, up to the read error
    /// that must come.
    async fn h2_reads_until_error(bytes: &[u8]) -> (Vec<u8>, io::Error) {
        let mut conn = AuthorityRewrite::new(Chunked {
            bytes: bytes.to_vec(),
            at: 0,
            chunk: bytes.len(),
        });
        let mut out = Vec::new();
        let mut buf = [0; 1024];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) => panic!("no read error"),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(err) => return (out, err),
            }
        }
    }

    /// Splits what h2 reads into the preface and frames.
    fn frames(bytes: &[u8]) -> Vec<(FrameHeader, Vec<u8>)> {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        let mut rest = &bytes[PREFACE.len()..];
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let header = FrameHeader::parse(rest[..FRAME_HEADER_LEN].try_into().unwrap());
            let end = FRAME_HEADER_LEN + header.payload_len;
            frames.push((header, rest[FRAME_HEADER_LEN..end].to_vec()));
            rest = &rest[end..];
        }
        frames
    }

    /// An HPACK integer with a `prefix_bits` prefix (RFC 7541 §5.1).
    fn hpack_integer(bytes: &mut &[u8], prefix_bits: u32) -> usize {
        let mask = (1 << prefix_bits) - 1;
        let mut value = usize::from(bytes[0]) & mask;
        *bytes = &bytes[1..];
        let mut shift = 0;
        while value >= mask {
            let octet = bytes[0];
            *bytes = &bytes[1..];
            value += usize::from(octet & 0x7f) << shift;
            shift += 7;
            if octet & 0x80 == 0 {
                break;
            }
        }
        value
    }

    /// Reads a header block as h2 would, insisting that every field is a
    /// literal without indexing with a new, plain name and a plain value:
    /// what leaves h2's HPACK table empty.
    fn unindexed_literals(mut fragment: &[u8]) -> Fields {
        let mut fields = Vec::new();
        while !fragment.is_empty() {
            assert_eq!(fragment[0], 0x00, "a literal without indexing, new name");
            fragment = &fragment[1..];
            let mut field = [Vec::new(), Vec::new()];
            for string in &mut field {
                assert_eq!(fragment[0] & 0x80, 0, "no Huffman coding");
                let len = hpack_integer(&mut fragment, 7);
                *string = fragment[..len].to_vec();
                fragment = &fragment[len..];
            }
            let [name, value] = field;
            fields.push((name, value));
        }
        fields
    }

    /// The header blocks among `frames`, each with its stream and
    /// END_STREAM; checks that no frame is over the frame size limit.
    fn header_blocks(frames: &[(FrameHeader, Vec<u8>)]) -> Vec<(u32, bool, Fields)> {
        let mut blocks = Vec::new();
        let mut open: Option<(u32, bool, Vec<u8>)> = None;
        for (header, payload) in frames {
            assert!(header.payload_len <= MAX_FRAME_SIZE as usize);
            match (header.kind, &mut open) {
                (HEADERS, None) => {
                    let fragment = headers_fragment(header.flags, payload).unwrap();
                    open = Some((
                        header.stream_id,
                        header.flags & END_STREAM != 0,
                        fragment.to_vec(),
                    ));
                }
                (CONTINUATION, Some((stream, _, fragments))) if *stream == header.stream_id => {
                    fragments.extend_from_slice(payload)
                }
                (HEADERS | CONTINUATION, _) => panic!("broken header block"),
                _ => continue,
            }
            if header.flags & END_HEADERS != 0 {
                let (stream, end_stream, fragments) = open.take().unwrap();
                blocks.push((stream, end_stream, unindexed_literals(&fragments)));
            }
        }
        blocks
    }

    fn with_authority(fields: &Fields, authority: &[u8]) -> Fields {
        fields
            .iter()
            .map(|(n, v)| match n.as_slice() {
                AUTHORITY => (n.clone(), authority.to_vec()),
                _ => (n.clone(), v.clone()),
            })
            .collect()
    }

    fn encode(encoder: &mut loona_hpack::Encoder<'_>, fields: &Fields) -> Vec<u8> {
        encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    #[tokio::test]
    async fn padded_split_block_with_bad_authority_comes_out_with_localhost() {
        let fields = request("/runtime.v1.RuntimeService/Version", BAD_AUTHORITY);
        let block = encode(&mut loona_hpack::Encoder::new(), &fields);
        let (first, second) = block.split_at(block.len() / 2);
        let mut padded = vec![7];
        padded.extend_from_slice(&[0x80, 0, 0, 3, 15]); // exclusive on stream 3, weight 16
        padded.extend_from_slice(first);
        padded.extend_from_slice(&[0; 7]);
        let data = frame(DATA, END_STREAM, 1, b"\0\0\0\0\0");

        let mut bytes = client_start();
        bytes.extend(frame(HEADERS, PADDED | PRIORITY, 1, &padded));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 1, second));
        bytes.extend(&data);
        // END_STREAM on the HEADERS frame: a request without a body.
        bytes.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            3,
            &encode(&mut loona_hpack::Encoder::new(), &fields)[..],
        ));

        for chunk in [1, 7, 4096] {
            let seen = frames(&as_h2_reads(&bytes, chunk).await.unwrap());
            assert_eq!(seen[0].0.kind, SETTINGS);
            let blocks = header_blocks(&seen);
            let expected = with_authority(&fields, b"localhost");
            assert_eq!(
                blocks,
                vec![(1, false, expected.clone()), (3, true, expected)]
            );
            let data_out: Vec<_> = seen.iter().filter(|(h, _)| h.kind == DATA).collect();
            assert_eq!(data_out.len(), 1);
            assert_eq!(frame(DATA, data_out[0].0.flags, 1, &data_out[0].1), data);
        }
    }

    #[tokio::test]
    async fn valid_authority_passes_through_byte_for_byte() {
        let mut encoder = loona_hpack::Encoder::new();
        let mut bytes = client_start();
        for (stream, path) in [
            (1, "/runtime.v1.RuntimeService/Version"),
            (3, "/runtime.v1.RuntimeService/Status"),
        ] {
            let block = encode(&mut encoder, &request(path, b"localhost"));
            let (first, second) = block.split_at(3);
            bytes.extend(frame(
                HEADERS,
                PADDED,
                stream,
                &[&[2u8][..], first, &[0, 0]].concat(),
            ));
            bytes.extend(frame(CONTINUATION, END_HEADERS, stream, second));
            bytes.extend(frame(DATA, END_STREAM, stream, b"\0\0\0\0\0"));
        }
        for chunk in [1, 5, 4096] {
            assert_eq!(as_h2_reads(&bytes, chunk).await.unwrap(), bytes);
        }
        // Without :authority, as HTTP/1-style clients may send.
        let mut no_authority = request("/x", b"");
        no_authority.retain(|(n, _)| n != AUTHORITY);
        let mut bytes = client_start();
        bytes.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &encode(&mut loona_hpack::Encoder::new(), &no_authority),
        ));
        assert_eq!(as_h2_reads(&bytes, 4096).await.unwrap(), bytes);
    }

    #[tokio::test]
    async fn later_requests_indexing_the_clients_table_come_out_right() {
        // As grpc-core does, the first request puts its fields into the
        // client's dynamic table and the second names the same ones by
        // their index there, :authority included.
        let first = request("/runtime.v1.RuntimeService/Version", BAD_AUTHORITY);
        let second = request("/runtime.v1.RuntimeService/ListPodSandbox", BAD_AUTHORITY);
        let mut first_block = Vec::new();
        for (name, value) in &first {
            // Literal with incremental indexing, new name.
            first_block.push(0x40);
            for string in [name, value] {
                first_block.extend(encode_integer(string.len(), 7));
                first_block.extend(string);
            }
        }
        let mut second_block = Vec::new();
        for (i, field) in second.iter().enumerate() {
            if *field == first[i] {
                // Indexed: the dynamic table starts at 62, newest first.
                second_block.push(0x80 | (62 + first.len() - 1 - i) as u8);
            } else {
                second_block.push(0x00);
                for string in [&field.0, &field.1] {
                    second_block.extend(encode_integer(string.len(), 7));
                    second_block.extend(string);
                }
            }
        }
        assert!(!second_block
            .windows(BAD_AUTHORITY.len())
            .any(|w| w == BAD_AUTHORITY));

        let mut bytes = client_start();
        bytes.extend(frame(HEADERS, END_HEADERS, 1, &first_block));
        bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second_block));
        // A third with a big value: split into several frames on the way out.
        let mut third = request("/runtime.v1.RuntimeService/Status", BAD_AUTHORITY);
        third.push((b"x-big".to_vec(), vec![b'b'; 40_000]));
        let third_block = encode(&mut loona_hpack::Encoder::new(), &third);
        for (i, piece) in third_block.chunks(MAX_FRAME_SIZE as usize).enumerate() {
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            let last = (i + 1) * MAX_FRAME_SIZE as usize >= third_block.len();
            bytes.extend(frame(kind, if last { END_HEADERS } else { 0 }, 5, piece));
        }

        let seen = frames(&as_h2_reads(&bytes, 4096).await.unwrap());
        assert_eq!(seen.iter().filter(|(h, _)| h.stream_id == 5).count(), 3);
        assert_eq!(
            header_blocks(&seen),
            vec![
                (1, false, with_authority(&first, b"localhost")),
                (3, true, with_authority(&second, b"localhost")),
                (5, false, with_authority(&third, b"localhost")),
            ]
        );
    }

    /// A small deterministic generator for the garbage test (xorshift64).
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    #[tokio::test]
    async fn requests_keep_the_sockets_connect_info() {
        let (server, _client) = tokio::net::UnixStream::pair().unwrap();
        let info = AuthorityRewrite::new(server).connect_info();
        let peer = info.peer_cred.expect("peer credentials");
        assert_eq!(peer.pid(), Some(std::process::id() as i32));
    }

    #[tokio::test]
    async fn garbage_neither_panics_nor_gets_changed_before_rewriting() {
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        for round in 0..500 {
            let len = (noise.next() % 300) as usize;
            let junk = noise.bytes(len);
            let chunk = 1 + (noise.next() % 64) as usize;

            // Not HTTP/2, then frames of any kind and flags, then header
            // blocks whose HPACK is junk: h2 gets them as sent.
            assert_eq!(as_h2_reads(&junk, chunk).await.unwrap(), junk);
            let mut bytes = client_start();
            bytes.extend(&junk);
            assert_eq!(
                as_h2_reads(&bytes, chunk).await.unwrap(),
                bytes,
                "round {round}"
            );
            let mut bytes = client_start();
            let flags = noise.next() as u8 | END_HEADERS;
            bytes.extend(frame(HEADERS, flags, 1, &junk));
            assert_eq!(
                as_h2_reads(&bytes, chunk).await.unwrap(),
                bytes,
                "round {round}"
            );

            // Once rewriting, junk may fail the connection, never panic.
            let mut bytes = client_start();
            let block = encode(
                &mut loona_hpack::Encoder::new(),
                &request("/x", BAD_AUTHORITY),
            );
            bytes.extend(frame(HEADERS, END_HEADERS, 1, &block));
            bytes.extend(frame(HEADERS, flags, 3, &junk));
            bytes.extend(&junk);
            if let Err(err) = as_h2_reads(&bytes, chunk).await {
                assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            }
        }
    }

    #[tokio::test]
    async fn broken_framing_passes_through_before_rewriting_and_fails_after() {
        let good = encode(
            &mut loona_hpack::Encoder::new(),
            &request("/x", BAD_AUTHORITY),
        );
        let broken: [Vec<u8>; 5] = [
            frame(CONTINUATION, END_HEADERS, 1, &good),
            frame(HEADERS, PADDED | END_HEADERS, 1, &[200, 1, 2]),
            frame(HEADERS, END_HEADERS, 0, &good),
            [frame(HEADERS, 0, 1, &good), frame(DATA, 0, 1, b"x")].concat(),
            frame(
                HEADERS,
                END_HEADERS,
                1,
                &vec![0; MAX_FRAME_SIZE as usize + 1],
            ),
        ];
        for broken_frames in &broken {
            let mut bytes = client_start();
            bytes.extend(broken_frames);
            assert_eq!(as_h2_reads(&bytes, 4096).await.unwrap(), bytes);

            // In one read: h2 gets the rewritten request, then the error.
            let mut bytes = client_start();
            bytes.extend(frame(HEADERS, END_HEADERS, 1, &good));
            bytes.extend(broken_frames);
            let (read, err) = h2_reads_until_error(&bytes).await;
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            let localhost = with_authority(&request("/x", BAD_AUTHORITY), b"localhost");
            assert_eq!(header_blocks(&frames(&read)), vec![(1, false, localhost)]);
        }
    }
}
