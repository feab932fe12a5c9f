//! huskd, the husk CRI server: RuntimeService and ImageService on a unix
//! socket (see `husk_runtime::config` for its settings).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use husk_runtime::config::{Config, Settings};
use husk_runtime::image::ImageStore;
use husk_runtime::manager::Manager;
use husk_runtime::sandbox::microvm::DEFAULT_SPARE_DISKS;
use husk_runtime::sandbox::{HostDriver, MicroVmConfig, MicroVmDriver, SandboxDriver};
use husk_runtime::server;
use husk_runtime::state::State;
use husk_runtime::streaming::Streaming;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
enum HuskdError {
    #[error(transparent)]
    Config(#[from] husk_runtime::config::ConfigError),
    #[error("creating {path}: {source}")]
    Dir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the image store: {0}")]
    Images(#[from] husk_runtime::image::StoreError),
    #[error("opening the state database: {0}")]
    State(#[from] husk_runtime::state::StateError),
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    #[error("cannot watch for SIGTERM/SIGINT: {0}")]
    Signals(#[source] std::io::Error),
}

fn main() -> ExitCode {
    let config = match Config::load(Settings::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("huskd: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log_level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), HuskdError> {
    // First: a SIGTERM during the start-up cleanup stops huskd once it is
    // done, rather than killing it halfway.
    let mut term = signal(SignalKind::terminate()).map_err(HuskdError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(HuskdError::Signals)?;
    for dir in [&config.root, &config.state] {
        std::fs::create_dir_all(dir).map_err(|source| HuskdError::Dir {
            path: dir.clone(),
            source,
        })?;
    }
    let images = ImageStore::open(config.root.join("images"))?;
    let state = State::open(&config.root)?;
    let host = Arc::new(HostDriver::new(
        config.husk_agent.clone(),
        config.agent_timeout,
    ));
    let microvm = Arc::new(MicroVmDriver::new(MicroVmConfig {
        vmm: config.husk_vmm.clone(),
        virtiofsd: config.virtiofsd.clone(),
        kernel: config.guest_kernel.clone(),
        initrd: config.guest_initrd.clone(),
        sizing: config.guest_sizing,
        cmdline: config.guest_cmdline.clone(),
        spare_disks: DEFAULT_SPARE_DISKS,
        boot_timeout: config.guest_boot_timeout,
        call_deadline: config.agent_timeout,
        jail: config.microvm_jail,
    }));
    if let Err(why) = microvm.check() {
        warn!("the microvm sandbox driver cannot start pods: {why}");
    }
    info!(
        listen = %config.listen.display(),
        root = %config.root.display(),
        state = %config.state.display(),
        agent = %config.husk_agent.display(),
        vmm = %config.husk_vmm.display(),
        default_runtime = %config.default_runtime,
        "huskd {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let socket = config.listen.clone();
    let streaming_listen = config.streaming_listen;
    let token_ttl = config.streaming_token_ttl;
    let drivers: [Arc<dyn SandboxDriver>; 2] = [host, microvm];
    let manager = Manager::new(config, images, state, drivers);
    // Before serving: what a crash of the last huskd left behind goes.
    if let Err(e) = manager.reconcile().await {
        warn!("cleaning up after the last huskd: {e}");
    }
    tokio::spawn(manager.clone().watch_sandboxes());
    // Containers that ran on while huskd was away get their logs back.
    let recovering = manager.clone();
    tokio::spawn(async move {
        if let Err(e) = recovering.reattach_running().await {
            warn!("re-attaching running containers' output: {e}");
        }
    });
    // Without its streaming server huskd still serves CRI; Exec, Attach
    // and PortForward then say why they cannot.
    let (streaming, streaming_task) =
        match Streaming::bind(streaming_listen, manager.clone(), token_ttl).await {
            Ok((streaming, listener)) => {
                let task = tokio::spawn(streaming.clone().serve(listener));
                (Ok(streaming), Some(task))
            }
            Err(e) => {
                let why = format!("cannot listen on {streaming_listen}: {e}");
                warn!("streaming server: {why}");
                (Err(why), None)
            }
        };
    // The socket appears once huskd can serve (clients wait for it).
    let listener = server::bind(&socket)?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
        }
    };
    let result = server::serve(listener, manager, streaming, shutdown).await;
    if let Some(task) = streaming_task {
        task.abort();
    }
    let _ = std::fs::remove_file(&socket);
    // Pods keep running: a restarted huskd finds them in its state.
    result?;
    info!("stopped");
    Ok(())
}
