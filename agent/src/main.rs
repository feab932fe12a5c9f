//! husk-agent: PID 1 in a pod's microVM, serving the agent protocol over
//! vsock; the same binary serves on a unix socket when run on the host.

mod cli;
mod container;
mod forward;
mod guest;
mod listen;
mod network;
mod reaper;
mod sandbox;
mod server;
mod service;
mod stop;

use std::io::{self, Write};
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use tracing::{error, info};

use std::sync::Arc;

use crate::cli::Args;
use crate::container::Containers;
use crate::listen::{ListenError, Listener};
use crate::reaper::Reaper;
use crate::sandbox::Sandbox;
use crate::service::AgentService;

#[derive(Debug, thiserror::Error)]
enum AgentError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("cannot watch for exited children: {0}")]
    Reaper(#[source] io::Error),
    #[error("cannot watch for SIGTERM/SIGINT: {0}")]
    Signals(#[source] io::Error),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("serving the agent protocol failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn main() -> ExitCode {
    // A container's init stage (see container::init): nothing of the
    // agent's own start-up may run there.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == container::init::INIT_ARG)
    {
        container::init::main();
    }
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
    let result = run(&args, pid1);
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
fn run(args: &Args, pid1: bool) -> Result<(), AgentError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?
        .block_on(serve(args, pid1))
}

async fn serve(args: &Args, pid1: bool) -> Result<(), AgentError> {
    let (stop, stopped) = stop::channel();
    if !pid1 {
        reaper::become_subreaper().map_err(AgentError::Reaper)?;
        stop::on_termination_signals(stop.clone()).map_err(AgentError::Signals)?;
    }
    let reaper = Reaper::spawn().map_err(AgentError::Reaper)?;
    let containers = Arc::new(Containers::new(
        &args.state_dir,
        reaper,
        sandbox::node_mount_namespace(),
    ));
    let sandbox = Sandbox::new(&args.state_dir, sandbox::owns_namespaces());
    let listen = &args.listen;
    // Held to the end: dropping it removes the unix socket file.
    let Listener {
        incoming,
        socket_file: _socket_file,
    } = listen::bind(listen)?;
    info!("listening on {listen}");
    marker("husk-agent ready");
    let service = AgentService::new(stop, sandbox, containers.clone());
    let served = server::serve(incoming, service, stopped).await;
    // Nothing of the pod may outlive its agent: processes, mounts, cgroups.
    containers.remove_all().await;
    served?;
    info!("stopped");
    Ok(())
}
