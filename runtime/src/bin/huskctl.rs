//! huskctl: a small CRI client for huskd over its unix socket, for people on
//! machines without crictl. See `husk_runtime::cli`.

use std::process::ExitCode;

use clap::Parser;
use husk_runtime::cli::{self, Cli};

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
    let result = runtime.block_on(cli::run(cli));
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
