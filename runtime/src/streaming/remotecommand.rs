//! Exec and attach over either wire: the process in the agent, its output
//! to the client, the client's stdin and terminal size to it, its exit
//! status on the error stream. A client that goes away takes its exec
//! with it; an attached container runs on.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use husk_proto::client::Agent;
use husk_proto::v1 as agent;
use k8s_cri::v1 as cri;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use super::token::Request;
use super::{Input, Outcome, Output, StreamingError, TermSize};
use crate::manager::{agent_err, process, ExecIo, Manager};

/// The writing half of a wire, as the command loop drives it.
pub trait OutputWire: Send {
    /// Sends one piece of output; false once the client is gone.
    fn send(&mut self, output: Output) -> impl Future<Output = bool> + Send;
    /// Ends the streams, the error stream carrying `outcome`.
    fn finish(self, outcome: Outcome) -> impl Future<Output = ()> + Send;
}

/// Runs `command` while copying its output onto `wire`, then ends the
/// wire with the command's outcome.
pub async fn drive<W, F>(mut wire: W, mut output: mpsc::Receiver<Output>, command: F)
where
    W: OutputWire,
    F: Future<Output = Outcome>,
{
    tokio::pin!(command);
    let mut connected = true;
    let outcome = loop {
        tokio::select! {
            biased;
            Some(out) = output.recv() => {
                if connected {
                    connected = wire.send(out).await;
                }
            }
            outcome = &mut command => break outcome,
        }
    };
    // The command has dropped its senders: what is queued is all there is.
    while let Some(out) = output.recv().await {
        if connected {
            connected = wire.send(out).await;
        }
    }
    if connected {
        wire.finish(outcome).await;
    }
}

/// Copies one output stream of a process to the client (or drops it, when
/// the client did not ask for it: the pipe must be drained all the same).
async fn pump(
    mut client: Agent,
    process: Option<agent::ProcessRef>,
    stream: agent::OutputStream,
    to: Option<mpsc::Sender<Output>>,
) -> Result<(), StreamingError> {
    let mut chunks = client
        .read_output(agent::ReadOutputRequest {
            process,
            stream: stream.into(),
        })
        .await
        .map_err(agent_err(format!("reading the {stream:?} of the exec")))?
        .into_inner();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(agent_err(format!("reading the {stream:?} of the exec")))?;
        let Some(to) = &to else { continue };
        let data = chunk.data.into();
        let out = match stream {
            agent::OutputStream::Stdout => Output::Stdout(data),
            agent::OutputStream::Stderr => Output::Stderr(data),
        };
        if to.send(out).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// How long a tty exec waits for the client's terminal size before it
/// starts without one.
const INITIAL_SIZE_WAIT: Duration = Duration::from_millis(500);

/// Input that arrived before the process started, then the client's.
async fn next_input(early: &mut Vec<Input>, input: &mut mpsc::Receiver<Input>) -> Option<Input> {
    if early.is_empty() {
        input.recv().await
    } else {
        Some(early.remove(0))
    }
}

/// Sets a process's terminal size; a failure only costs the client its
/// layout.
async fn resize(client: &mut Agent, process: Option<agent::ProcessRef>, size: TermSize) {
    let resized = client
        .resize_tty(agent::ResizeTtyRequest {
            process,
            rows: size.height.into(),
            cols: size.width.into(),
        })
        .await;
    if let Err(status) = resized {
        debug!("resizing the tty: {}", status.message());
    }
}

/// Runs an exec, or an attach, to its end: the exit code, or why it could
/// not run.
pub async fn run(
    manager: Arc<Manager>,
    request: Request,
    input: mpsc::Receiver<Input>,
    output: mpsc::Sender<Output>,
) -> Outcome {
    let result = match &request {
        Request::Exec(r) => run_exec(&manager, r, input, output).await,
        Request::Attach(r) => run_attach(&manager, r, input, output).await,
        Request::PortForward(_) => return Outcome::Failed("not a remote command".into()),
    };
    match result {
        Ok(code) => Outcome::Exited(code),
        Err(StreamingError::Disconnected) => Outcome::Failed("the client went away".into()),
        Err(e) => {
            warn!("{} failed: {e}", request.kind());
            Outcome::Failed(e.to_string())
        }
    }
}

async fn run_exec(
    manager: &Manager,
    request: &cri::ExecRequest,
    mut input: mpsc::Receiver<Input>,
    output: mpsc::Sender<Output>,
) -> Result<i32, StreamingError> {
    let id = request.container_id.as_str();
    // A tty program may look at its window size first thing: the client's
    // first size (sent as soon as it connects) goes into the process's
    // start, what comes meanwhile waits.
    let mut early = Vec::new();
    let mut console = None;
    if request.tty {
        let deadline = tokio::time::Instant::now() + INITIAL_SIZE_WAIT;
        while let Ok(message) = tokio::time::timeout_at(deadline, input.recv()).await {
            match message {
                Some(Input::Resize(size)) => {
                    console = Some((size.height, size.width));
                    break;
                }
                Some(other) => early.push(other),
                None => return Err(StreamingError::Disconnected),
            }
        }
    }
    let io = ExecIo {
        tty: request.tty,
        stdin: request.stdin,
        console,
    };
    let (mut client, exec_id) = manager.start_exec(id, &request.cmd, io, 0).await?;
    debug!(exec = %exec_id, "exec started");
    let target = process(id, &exec_id);
    let mut pumps = JoinSet::new();
    let mut streams = vec![(agent::OutputStream::Stdout, request.stdout)];
    if !request.tty {
        streams.push((agent::OutputStream::Stderr, request.stderr));
    }
    for (stream, wanted) in streams {
        pumps.spawn(pump(
            client.clone(),
            target.clone(),
            stream,
            wanted.then(|| output.clone()),
        ));
    }
    drop(output);
    let mut stdin = if request.stdin {
        let (tx, rx) = mpsc::channel(16);
        // The first message names the process.
        let first = agent::StdinChunk {
            process: target.clone(),
            ..Default::default()
        };
        tx.send(first)
            .await
            .map_err(|_| StreamingError::Disconnected)?;
        let mut writer = client.clone();
        tokio::spawn(async move {
            if let Err(status) = writer.write_stdin(ReceiverStream::new(rx)).await {
                debug!("exec stdin: {}", status.message());
            }
        });
        Some(tx)
    } else {
        None
    };
    let mut waiter = client.clone();
    let wait = waiter.wait_process(agent::WaitProcessRequest {
        process: target.clone(),
    });
    tokio::pin!(wait);
    let exit = loop {
        tokio::select! {
            waited = &mut wait => break waited,
            message = next_input(&mut early, &mut input) => match message {
                Some(Input::Stdin(data)) => {
                    if let Some(tx) = &stdin {
                        let chunk = agent::StdinChunk { data: data.into(), ..Default::default() };
                        if tx.send(chunk).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Some(Input::StdinEnd) => {
                    if let Some(tx) = stdin.take() {
                        let close = agent::StdinChunk { close_stdin: true, ..Default::default() };
                        let _ = tx.send(close).await;
                    }
                }
                Some(Input::Resize(size)) if request.tty => {
                    resize(&mut client, target.clone(), size).await;
                }
                Some(Input::Resize(_)) => {}
                None => {
                    debug!(exec = %exec_id, "the client went away: killing the exec");
                    let killed = client
                        .signal_process(agent::SignalProcessRequest {
                            process: target.clone(),
                            signal: libc::SIGKILL as u32,
                        })
                        .await;
                    if let Err(status) = killed {
                        debug!("killing the exec: {}", status.message());
                    }
                    pumps.abort_all();
                    return Err(StreamingError::Disconnected);
                }
            },
        }
    };
    drop(stdin);
    let exit = exit
        .map_err(agent_err(format!("waiting for exec {exec_id}")))?
        .into_inner()
        .status
        .unwrap_or_default();
    while let Some(pumped) = pumps.join_next().await {
        if let Ok(Err(e)) = pumped {
            debug!("exec output: {e}");
        }
    }
    Ok(exit.exit_code)
}

/// How long an attach waits, after the container's exit, for the rest of
/// its output.
const ATTACH_DRAIN: Duration = Duration::from_secs(5);

async fn run_attach(
    manager: &Manager,
    request: &cri::AttachRequest,
    mut input: mpsc::Receiver<Input>,
    output: mpsc::Sender<Output>,
) -> Result<i32, StreamingError> {
    let id = request.container_id.as_str();
    let (record, pod) = manager.running_container(id).await?;
    let point = manager.attach_point(id)?;
    let mut chunks = point.subscribe();
    let mut client = manager.agent(&pod).await?;
    let target = process(id, "");
    let use_stdin = request.stdin && record.config.stdin;
    let stdin_once = record.config.stdin_once;
    let mut waiter = client.clone();
    let wait = waiter.wait_process(agent::WaitProcessRequest {
        process: target.clone(),
    });
    tokio::pin!(wait);
    let mut exited = false;
    let mut streams_open = true;
    let drained = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drained);
    loop {
        tokio::select! {
            waited = &mut wait, if !exited => {
                waited.map_err(agent_err(format!("waiting for container {id}")))?;
                exited = true;
                if !streams_open {
                    break;
                }
                drained.as_mut().reset(tokio::time::Instant::now() + ATTACH_DRAIN);
            }
            () = &mut drained => break,
            chunk = chunks.recv(), if streams_open => match chunk {
                Ok(chunk) => {
                    let wanted = if chunk.stderr { request.stderr } else { request.stdout };
                    let out = if chunk.stderr {
                        Output::Stderr(chunk.data)
                    } else {
                        Output::Stdout(chunk.data)
                    };
                    if wanted && output.send(out).await.is_err() {
                        return Err(StreamingError::Disconnected);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(lost)) => {
                    debug!(lost, "the attached client fell behind: output lost");
                }
                // The container's streams ended.
                Err(broadcast::error::RecvError::Closed) => {
                    streams_open = false;
                    if exited {
                        break;
                    }
                }
            },
            message = input.recv() => match message {
                Some(Input::Stdin(data)) if use_stdin => {
                    point.write_stdin(&client, id, data, false).await;
                }
                Some(Input::StdinEnd) if use_stdin && stdin_once => {
                    point.write_stdin(&client, id, Bytes::new(), true).await;
                }
                Some(Input::Resize(size)) if request.tty => {
                    resize(&mut client, target.clone(), size).await;
                }
                Some(_) => {}
                None => {
                    if use_stdin && stdin_once {
                        point.write_stdin(&client, id, Bytes::new(), true).await;
                    }
                    return Err(StreamingError::Disconnected);
                }
            },
        }
    }
    // As kubelet's attach: the container's end is the session's success,
    // whatever its exit code (ContainerStatus has that).
    Ok(0)
}
