//! `logs`: reading kubelet's CRI log format (`<RFC3339Nano> <stdout|stderr> <P|F> <content>`)
//! and following a container's log until it exits.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;

use crate::client::{CliError, Huskd, Result};
use crate::containers::{container_status, resolve_container};

/// One record of a CRI log file.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub time: &'a str,
    pub stderr: bool,
    /// A piece of a longer line (`P`): the line goes on in the next record.
    pub partial: bool,
    pub content: &'a [u8],
}

/// Parses one line (without its newline); `None` if it is not a CRI record.
pub fn parse(line: &[u8]) -> Option<Record<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?;
    let stderr = match parts.next()? {
        b"stdout" => false,
        b"stderr" => true,
        _ => return None,
    };
    let partial = match parts.next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    Some(Record {
        time,
        stderr,
        partial,
        content: parts.next().unwrap_or_default(),
    })
}

/// Writes records to stdout and stderr as the container wrote them.
pub struct Printer<O: Write, E: Write> {
    pub out: O,
    pub err: E,
    pub timestamps: bool,
    /// The stream of each kind in the middle of a line split into `P` records.
    mid_line: [bool; 2],
}

impl<O: Write, E: Write> Printer<O, E> {
    pub fn new(out: O, err: E, timestamps: bool) -> Self {
        Printer {
            out,
            err,
            timestamps,
            mid_line: [false; 2],
        }
    }

    /// Prints one line of the log file (lines that are not records are printed as they are).
    pub fn line(&mut self, line: &[u8]) -> io::Result<()> {
        let Some(record) = parse(line) else {
            self.out.write_all(line)?;
            return self.out.write_all(b"\n");
        };
        let index = usize::from(record.stderr);
        let stream: &mut dyn Write = if record.stderr {
            &mut self.err
        } else {
            &mut self.out
        };
        if self.timestamps && !self.mid_line[index] {
            stream.write_all(record.time.as_bytes())?;
            stream.write_all(b" ")?;
        }
        stream.write_all(record.content)?;
        if !record.partial {
            stream.write_all(b"\n")?;
        }
        self.mid_line[index] = record.partial;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.err.flush()
    }
}

/// Reads a log file from where it was left, handing over whole lines only.
pub struct Tail {
    file: Option<std::fs::File>,
    offset: u64,
    pending: Vec<u8>,
}

impl Tail {
    pub fn new() -> Self {
        Tail {
            file: None,
            offset: 0,
            pending: Vec::new(),
        }
    }

    /// New complete lines since the last call. A missing file (not written
    /// yet) has none.
    pub fn read(&mut self, path: &Path) -> Result<Vec<Vec<u8>>> {
        let what = || format!("reading the log {}", path.display());
        if self.file.is_none() {
            match std::fs::File::open(path) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(CliError::io(what())(e)),
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(Vec::new());
        };
        file.seek(SeekFrom::Start(self.offset))
            .map_err(CliError::io(what()))?;
        let mut buf = Vec::new();
        let n = file.read_to_end(&mut buf).map_err(CliError::io(what()))?;
        self.offset += n as u64;
        self.pending.extend_from_slice(&buf);
        let mut lines = Vec::new();
        while let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.pending.drain(..=i).collect();
            line.pop();
            lines.push(line);
        }
        Ok(lines)
    }

    /// Whether the last read ended in the middle of a line.
    pub fn has_partial(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The unfinished last line, at the end of a log that will not grow.
    pub fn take_rest(&mut self) -> Option<Vec<u8>> {
        (!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending))
    }
}

impl Default for Tail {
    fn default() -> Self {
        Self::new()
    }
}

/// `logs CONTAINER`: its log file as huskd's status names it.
pub async fn show(
    h: &mut Huskd,
    container: &str,
    follow: bool,
    timestamps: bool,
    tail: Option<usize>,
) -> Result<()> {
    let id = resolve_container(h, container).await?;
    let status = container_status(h, &id).await?;
    if status.log_path.is_empty() {
        return Err(CliError::Usage(format!(
            "container {id} has no log file (its pod has no log_directory)"
        )));
    }
    print_logs(
        h,
        &id,
        Path::new(&status.log_path),
        follow,
        timestamps,
        tail,
    )
    .await
}

const POLL: Duration = Duration::from_millis(100);
/// After a container exits, how long its log may still grow (the copy is asynchronous).
const LOG_SETTLE: Duration = Duration::from_millis(300);

async fn print_logs(
    h: &mut Huskd,
    id: &str,
    path: &Path,
    follow: bool,
    timestamps: bool,
    tail_lines: Option<usize>,
) -> Result<()> {
    let mut printer = Printer::new(
        std::io::stdout().lock(),
        std::io::stderr().lock(),
        timestamps,
    );
    let write = |e| CliError::io("writing the log")(e);
    let mut tail = Tail::new();
    let mut first = tail.read(path)?;
    if let Some(n) = tail_lines {
        let skip = first.len().saturating_sub(n);
        first.drain(..skip);
    }
    for line in &first {
        printer.line(line).map_err(write)?;
    }
    printer.flush().map_err(write)?;
    if follow {
        follow_log(h, id, path, &mut tail, &mut printer).await?;
    }
    if let Some(rest) = tail.take_rest() {
        printer.line(&rest).map_err(write)?;
    }
    printer.flush().map_err(write)
}

/// Prints new lines until the container has exited (or is gone) and its log has settled.
pub async fn follow_log<O: Write, E: Write>(
    h: &mut Huskd,
    id: &str,
    path: &Path,
    tail: &mut Tail,
    printer: &mut Printer<O, E>,
) -> Result<()> {
    let write = |e| CliError::io("writing the log")(e);
    let mut exited_at: Option<Instant> = None;
    let mut last_status = Instant::now();
    loop {
        let lines = tail.read(path)?;
        for line in &lines {
            printer.line(line).map_err(write)?;
        }
        if !lines.is_empty() {
            printer.flush().map_err(write)?;
            if let Some(t) = exited_at.as_mut() {
                *t = Instant::now();
            }
        }
        match exited_at {
            Some(t) if t.elapsed() >= LOG_SETTLE && !tail.has_partial() => return Ok(()),
            Some(t) if t.elapsed() >= LOG_SETTLE * 10 => return Ok(()),
            Some(_) => {}
            None if last_status.elapsed() >= POLL * 3 || lines.is_empty() => {
                last_status = Instant::now();
                match container_status(h, id).await {
                    Ok(s)
                        if s.state == cri::ContainerState::ContainerRunning as i32
                            || s.state == cri::ContainerState::ContainerCreated as i32 => {}
                    Ok(_) => exited_at = Some(Instant::now()),
                    Err(CliError::Rpc {
                        code: tonic::Code::NotFound,
                        ..
                    }) => exited_at = Some(Instant::now()),
                    Err(e) => return Err(e),
                }
            }
            None => {}
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records() {
        let r = parse(b"2024-01-01T00:00:00.1Z stderr F oops: a b").unwrap();
        assert_eq!(r.time, "2024-01-01T00:00:00.1Z");
        assert!(r.stderr && !r.partial);
        assert_eq!(r.content, b"oops: a b");
        let r = parse(b"2024-01-01T00:00:00.1Z stdout F ").unwrap();
        assert_eq!(r.content, b"");
        assert!(parse(b"hello world").is_none());
    }

    #[test]
    fn prints_lines_to_their_streams() {
        let mut p = Printer::new(Vec::new(), Vec::new(), false);
        for line in [
            &b"t1 stdout P hel"[..],
            b"t2 stderr F bad",
            b"t3 stdout F lo",
            b"t4 stdout F again",
        ] {
            p.line(line).unwrap();
        }
        assert_eq!(p.out, b"hello\nagain\n");
        assert_eq!(p.err, b"bad\n");
        let mut p = Printer::new(Vec::new(), Vec::new(), true);
        p.line(b"t1 stdout P hel").unwrap();
        p.line(b"t2 stdout F lo").unwrap();
        assert_eq!(p.out, b"t1 hello\n");
    }

    #[test]
    fn tails_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut tail = Tail::new();
        assert!(tail.read(&path).unwrap().is_empty());
        std::fs::write(&path, "a\nb").unwrap();
        assert_eq!(tail.read(&path).unwrap(), vec![b"a".to_vec()]);
        assert!(tail.has_partial());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"c\n").unwrap();
        assert_eq!(tail.read(&path).unwrap(), vec![b"bc".to_vec()]);
        assert!(tail.take_rest().is_none());
    }
}
