//! Command line of husk-agent.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;

/// husk-agent: serves the husk agent protocol; PID 1 in a pod's microVM, or a
/// plain process on the host.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// Where to serve: vsock://PORT (any CID) or unix://PATH.
    #[arg(long, value_name = "ADDR", default_value_t = ListenAddr::Vsock { port: husk_proto::AGENT_VSOCK_PORT })]
    pub listen: ListenAddr,

    /// Where the agent keeps containers' rootfs mounts and the pod's shared
    /// files. Each agent on a host needs its own.
    #[arg(long, value_name = "DIR", default_value = "/run/husk-agent")]
    pub state_dir: PathBuf,

    /// Most verbose log level written to stderr (error, warn, info, debug, trace).
    #[arg(long, value_name = "LEVEL", default_value_t = tracing::Level::INFO)]
    pub log_level: tracing::Level,

    /// Words the kernel handed on from its command line. As PID 1 the agent
    /// receives every word the kernel did not recognise (`noxsave` is one),
    /// and ignores them; anywhere else a stray word is an error.
    #[arg(hide = true)]
    pub kernel_words: Vec<String>,
}

/// An address the agent serves on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Vsock { port: u32 },
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected = "expected vsock://PORT or unix://PATH";
        if let Some(port) = s.strip_prefix("vsock://") {
            let port = port
                .parse()
                .map_err(|_| format!("{expected}: {port:?} is not a vsock port number"))?;
            Ok(ListenAddr::Vsock { port })
        } else if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(format!("{expected}: the unix socket path is empty"));
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else {
            Err(expected.to_string())
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Vsock { port } => write!(f, "vsock://{port}"),
            ListenAddr::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms_and_prints_them_back() {
        for text in ["vsock://1024", "unix:///run/husk/agent.sock"] {
            let addr: ListenAddr = text.parse().expect(text);
            assert_eq!(addr.to_string(), text);
        }
        assert_eq!(
            "unix:///a.sock".parse(),
            Ok(ListenAddr::Unix(PathBuf::from("/a.sock")))
        );
    }

    #[test]
    fn rejects_other_forms_saying_what_it_expects() {
        for text in [
            "tcp://1.2.3.4:5",
            "vsock://",
            "vsock://-1",
            "unix://",
            "/a.sock",
        ] {
            let err = text.parse::<ListenAddr>().unwrap_err();
            assert!(
                err.starts_with("expected vsock://PORT or unix://PATH"),
                "{text}: {err}"
            );
        }
    }
}
