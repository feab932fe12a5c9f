//! husk-agent: PID 1 in a pod's microVM, serving the agent protocol over
//! vsock; the same binary serves on a unix socket when run on the host.

mod cli;
mod guest;
mod listen;
mod reaper;
mod server;
mod service;
mod stop;

use std::io::{self, Write};
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use tracing::{error, info};

use crate::cli::{Args, ListenAddr};
use crate::listen::{ListenError, Listener};

#[derive(Debug, thiserror::Error)]
enum AgentError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("cannot watch for exited children (SIGCHLD): {0}")]
    Reaper(#[source] io::Error),
    #[error("cannot watch for SIGTERM/SIGINT: {0}")]
    Signals(#[source] io::Error),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("serving the agent protocol failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    if pid1 {
        // Nowhere to report a failure to: that is what this is about.
        let _ = guest::attach_console_if_missing();
        marker("husk-agent: init");
    }

    let args = match Args::try_parse() {
        Ok(args) if !pid1 && !args.kernel_words.is_empty() => {
            let err = Args::command().error(
                clap::error::ErrorKind::UnknownArgument,
                format!("unexpected argument '{}'", args.kernel_words[0]),
            );
            err.exit()
        }
        Ok(args) => args,
        Err(err) if !pid1 => err.exit(),
        Err(err) => {
            let _ = err.print();
            guest::reset_vm()
        }
    };
    init_logging(args.log_level);
    // Every log line carries "husk-agent:": the guest console also carries the kernel's.
    let _span = tracing::info_span!("husk-agent").entered();

    if pid1 {
        guest::prepare();
    }
    let result = run(args.listen, pid1);
    if let Err(err) = &result {
        error!("{err}");
    }
    if pid1 {
        guest::reset_vm();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// A boot marker on the console, flushed at once: the VMM benchmark and huskd
/// watch for these. A marker that cannot be written must not stop the agent.
fn marker(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Plain lines on stderr, no timestamps or colours: in the guest that is a
/// slow serial console where every byte costs.
fn init_logging(level: tracing::Level) {
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false)
        .without_time()
        .init();
}

/// One thread: the guest has one vCPU, and start-up work must stay minimal.
fn run(listen: ListenAddr, pid1: bool) -> Result<(), AgentError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?
        .block_on(serve(listen, pid1))
}

async fn serve(listen: ListenAddr, pid1: bool) -> Result<(), AgentError> {
    let (stop, stopped) = stop::channel();
    if pid1 {
        reaper::spawn().map_err(AgentError::Reaper)?;
    } else {
        stop::on_termination_signals(stop.clone()).map_err(AgentError::Signals)?;
    }
    // Held to the end: dropping it removes the unix socket file.
    let Listener {
        incoming,
        socket_file: _socket_file,
    } = listen::bind(&listen)?;
    info!("listening on {listen}");
    marker("husk-agent ready");
    server::serve(incoming, stop, stopped).await?;
    info!("stopped");
    Ok(())
}
