//! huskctl: a small CRI client for huskd over its unix socket, for people on
//! machines without crictl. One module per command family; the stream
//! framing it shares with huskd's streaming server is
//! `husk_proto::k8s_stream`.

mod args;
mod client;
mod config;
mod containers;
mod exec;
mod forward;
mod images;
mod info;
mod logs;
mod output;
mod pods;
mod run;
mod stream;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};
use client::{Huskd, Result};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("huskctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // A read of stdin may still be blocked in its thread (exec -i): do not
    // wait for it.
    runtime.shutdown_background();
    match result {
        // Exit codes are 0-255; anything else (negative, huge) reads as a failure.
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("huskctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command line; the process's exit code on success.
async fn run(cli: Cli) -> Result<i32> {
    let path = client::socket_path(&cli.socket)?;
    let mut h = Huskd::connect(&path, cli.timeout).await?;
    let h = &mut h;
    let mut stdout = std::io::stdout().lock();
    let out = &mut stdout;
    match cli.command {
        Command::Version { output } => info::version(h, out, output).await?,
        Command::Info => info::info(h, out).await?,
        Command::Pull { image } => images::pull_and_print(h, out, &image).await?,
        Command::Images {
            image,
            quiet,
            output,
        } => images::list(h, out, image, quiet, output).await?,
        Command::Rmi { images } => images::remove(h, out, images).await?,
        Command::Runp(args) => pods::runp(h, out, args).await?,
        Command::Pods { quiet, output } => pods::list(h, out, quiet, output).await?,
        Command::Inspectp { pod } => pods::inspect(h, out, &pod).await?,
        Command::Stopp { pods } => pods::stop_each(h, out, pods).await?,
        Command::Rmp { pods } => pods::remove_each(h, out, pods).await?,
        Command::Create(args) => containers::create_and_print(h, out, args).await?,
        Command::Start { containers } => containers::start_each(h, out, containers).await?,
        Command::Ps {
            all,
            pod,
            quiet,
            output,
        } => containers::list(h, out, all, pod, quiet, output).await?,
        Command::Inspect { container } => containers::inspect(h, out, &container).await?,
        Command::Stop {
            timeout,
            containers,
        } => containers::stop_each(h, out, timeout, containers).await?,
        Command::Rm { force, containers } => {
            containers::remove_each(h, out, force, containers).await?
        }
        // These write to stdout themselves (streams, the command's own
        // output), so the lock is let go first.
        Command::Logs {
            container,
            follow,
            timestamps,
            tail,
        } => {
            drop(stdout);
            logs::show(h, &container, follow, timestamps, tail).await?
        }
        Command::Exec {
            container,
            timeout,
            interactive,
            tty,
            cmd,
        } => {
            drop(stdout);
            return exec::exec(h, &container, timeout, interactive, tty, cmd).await;
        }
        Command::Attach {
            container,
            interactive,
            tty,
        } => {
            drop(stdout);
            return exec::attach(h, &container, interactive, tty).await;
        }
        Command::PortForward { pod, ports } => {
            drop(stdout);
            let id = pods::resolve_pod(h, &pod).await?;
            return forward::run(h, &id, &ports).await;
        }
        Command::Run(args) => {
            drop(stdout);
            return run::run_once(h, args).await;
        }
    }
    Ok(0)
}
