//! The host side of the hybrid-vsock handshake: a host client connects to the
//! device's unix socket and names the guest port with `CONNECT <port>\n`.

use std::io::{self, Read};

/// Longest accepted `CONNECT` line, newline included.
pub const MAX_LINE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the host client hung up before finishing its CONNECT line")]
    Eof,
    #[error("cannot read the CONNECT line: {0}")]
    Io(#[source] io::Error),
    #[error("the CONNECT line is longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("malformed CONNECT line {0:?}")]
    Malformed(String),
}

/// Accumulates one `CONNECT <port>\n` line from a non-blocking stream.
#[derive(Debug, Default)]
pub struct ConnectLine {
    line: Vec<u8>,
}

impl ConnectLine {
    /// Reads what `src` has (one byte at a time, so that nothing past the
    /// newline is consumed: those bytes belong to the connection). Returns
    /// `Ok(None)` while the line is incomplete and `src` would block.
    pub fn advance(&mut self, src: &mut impl Read) -> Result<Option<u32>, HandshakeError> {
        let mut byte = [0u8; 1];
        loop {
            match src.read(&mut byte) {
                Ok(0) => return Err(HandshakeError::Eof),
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line).map(Some),
                Ok(_) => {
                    self.line.push(byte[0]);
                    // The newline itself needs one more byte of the budget.
                    if self.line.len() >= MAX_LINE {
                        return Err(HandshakeError::TooLong);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
    }
}

/// Parses `CONNECT <port>` (without its newline; a trailing `\r` is allowed).
pub fn parse_connect(line: &[u8]) -> Result<u32, HandshakeError> {
    let malformed = || HandshakeError::Malformed(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| malformed())?;
    let mut words = text.strip_suffix('\r').unwrap_or(text).split(' ');
    match (words.next(), words.next(), words.next()) {
        (Some(cmd), Some(port), None) if cmd.eq_ignore_ascii_case("connect") => {
            port.parse::<u32>().map_err(|_| malformed())
        }
        _ => Err(malformed()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A non-blocking reader whose data arrives in chunks: each chunk would
    /// block once exhausted, and the next one arrives after that.
    struct Chunks(Vec<Vec<u8>>, usize);

    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(chunk) = self.0.first_mut() else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            if chunk.is_empty() {
                self.0.remove(0);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(chunk.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            chunk.drain(..n);
            self.1 += n;
            Ok(n)
        }
    }

    #[test]
    fn parses_valid_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024").unwrap(), 1024);
        assert_eq!(parse_connect(b"connect 52\r").unwrap(), 52);
        assert_eq!(parse_connect(b"CONNECT 4294967295").unwrap(), u32::MAX);
    }

    #[test]
    fn rejects_malformed_lines() {
        for bad in [
            &b""[..],
            b"CONNECT",
            b"CONNECT ",
            b"CONNECT abc",
            b"CONNECT -1",
            b"CONNECT 4294967296",
            b"CONNECT 1 2",
            b"HELLO 1024",
            b"CONNECT  1024",
            b"\xffCONNECT 1",
        ] {
            assert!(
                matches!(parse_connect(bad), Err(HandshakeError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn partial_reads_accumulate_and_stop_at_the_newline() {
        let mut src = Chunks(
            vec![b"CONN".to_vec(), b"ECT 10".to_vec(), b"24\nDATA".to_vec()],
            0,
        );
        let mut line = ConnectLine::default();
        assert!(line.advance(&mut src).unwrap().is_none());
        assert!(line.advance(&mut src).unwrap().is_none());
        assert_eq!(line.advance(&mut src).unwrap(), Some(1024));
        // Nothing after the newline was consumed.
        assert_eq!(src.1, "CONNECT 1024\n".len());
    }

    #[test]
    fn eof_and_overlong_lines_fail() {
        let mut line = ConnectLine::default();
        assert!(matches!(
            line.advance(&mut &b"CONNECT 1"[..]),
            Err(HandshakeError::Eof)
        ));
        let mut line = ConnectLine::default();
        let long = [b'A'; 100];
        assert!(matches!(
            line.advance(&mut &long[..]),
            Err(HandshakeError::TooLong)
        ));
    }
}
