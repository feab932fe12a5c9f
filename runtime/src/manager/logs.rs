//! Container logs in kubelet's CRI format: one record per line,
//! `<RFC3339Nano time> <stdout|stderr> <P|F> <content>\n`, where `P` marks a
//! piece of a line split because it was long. A stream that ends without a
//! newline ends with an `F` record all the same, as containerd writes it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use futures_util::StreamExt;
use husk_proto::v1::OutputChunk;
use tokio::sync::broadcast;
use tracing::warn;

use super::attach::Chunk;

/// Lines longer than this are written in pieces marked `P`.
pub const MAX_LINE: usize = 16 * 1024;

/// One container's log file, shared by its stdout and stderr copiers.
pub struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    pub fn open(path: &Path) -> io::Result<Arc<LogFile>> {
        Ok(Arc::new(LogFile {
            path: path.to_owned(),
            file: Mutex::new(open_append(path)?),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the file and opens its path again: kubelet rotates a log by
    /// renaming it, and the records after this go to a new file there.
    pub fn reopen(&self) -> io::Result<()> {
        let file = open_append(&self.path)?;
        *self
            .file
            .lock()
            .map_err(|_| io::Error::other("log file lock poisoned"))? = file;
        Ok(())
    }

    /// Writes one record with a single write, so records of both streams never interleave.
    fn record(&self, stream: &str, partial: bool, content: &[u8]) -> io::Result<()> {
        let mut line = format_record_prefix(stream, partial).into_bytes();
        line.extend_from_slice(content);
        line.push(b'\n');
        let mut file = self
            .file
            .lock()
            .map_err(|_| io::Error::other("log file lock poisoned"))?;
        file.write_all(&line)
    }
}

fn format_record_prefix(stream: &str, partial: bool) -> String {
    let time = Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true);
    format!("{time} {stream} {} ", if partial { "P" } else { "F" })
}

/// Splits a byte stream into records.
#[derive(Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    /// Feeds data; returns the records now complete as (partial, content).
    pub fn push(&mut self, data: &[u8]) -> Vec<(bool, Vec<u8>)> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                if pos <= MAX_LINE {
                    let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                    line.pop();
                    out.push((false, line));
                    continue;
                }
            }
            if self.buf.len() > MAX_LINE {
                out.push((true, self.buf.drain(..MAX_LINE).collect()));
                continue;
            }
            return out;
        }
    }

    /// The end of the stream: what is left, as a full line.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf))
    }
}

/// Copies one output stream of a container into its log file (or drops it
/// when there is no log file: the pipe must be drained all the same), and
/// to the clients attached to the container.
pub async fn copy_stream<S>(
    mut chunks: S,
    stream: &'static str,
    log: Option<Arc<LogFile>>,
    attached: broadcast::Sender<Chunk>,
    container: String,
) where
    S: futures_util::Stream<Item = Result<OutputChunk, tonic::Status>> + Unpin,
{
    let mut splitter = LineSplitter::default();
    let mut failed = false;
    let mut write = |partial: bool, content: &[u8]| {
        if let Some(log) = &log {
            if let Err(e) = log.record(stream, partial, content) {
                if !failed {
                    warn!(container, stream, "writing the container log: {e}");
                    failed = true;
                }
            }
        }
    };
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(chunk) => {
                // Nobody attached is no error.
                let _ = attached.send(Chunk {
                    stderr: stream == "stderr",
                    data: Bytes::copy_from_slice(&chunk.data),
                });
                for (partial, content) in splitter.push(&chunk.data) {
                    write(partial, &content);
                }
            }
            Err(status) => {
                warn!(
                    container,
                    stream,
                    "reading container output: {}",
                    status.message()
                );
                break;
            }
        }
    }
    if let Some(rest) = splitter.finish() {
        write(false, &rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_on_newlines_and_length() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"hel"), vec![]);
        assert_eq!(s.push(b"lo\nwor"), vec![(false, b"hello".to_vec())]);
        assert_eq!(
            s.push(b"ld\n\n"),
            vec![(false, b"world".to_vec()), (false, vec![])]
        );
        let long = vec![b'x'; MAX_LINE + 10];
        let out = s.push(&long);
        assert_eq!(out, vec![(true, vec![b'x'; MAX_LINE])]);
        assert_eq!(s.push(b"\n"), vec![(false, vec![b'x'; 10])]);
        s.push(b"tail");
        assert_eq!(s.finish(), Some(b"tail".to_vec()));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn records_have_kubelets_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/0.log");
        let log = LogFile::open(&path).unwrap();
        log.record("stdout", false, b"hello").unwrap();
        log.record("stderr", true, b"oops").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let (time, rest) = lines[0].split_once(' ').unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{time}");
        assert_eq!(rest, "stdout F hello");
        assert!(lines[1].ends_with(" stderr P oops"));
    }

    #[test]
    fn a_reopened_log_writes_to_a_new_file_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let log = LogFile::open(&path).unwrap();
        log.record("stdout", false, b"before").unwrap();
        let rotated = dir.path().join("0.log.1");
        fs::rename(&path, &rotated).unwrap();
        log.reopen().unwrap();
        log.record("stdout", false, b"after").unwrap();
        let old = fs::read_to_string(&rotated).unwrap();
        let new = fs::read_to_string(&path).unwrap();
        assert!(
            old.ends_with(" stdout F before\n") && old.lines().count() == 1,
            "{old}"
        );
        assert!(
            new.ends_with(" stdout F after\n") && new.lines().count() == 1,
            "{new}"
        );
    }
}
