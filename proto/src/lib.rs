//! The protocols between husk's processes: host ⇄ agent (the code generated
//! from `agent.proto` and, in [`client`], the host side's ways to reach an
//! agent), huskd ⇄ husk-vmm ([`vmm_api`], the VMM's control API), and, with
//! the `k8s-stream` feature, the framing of Kubernetes' streaming protocol
//! that huskd serves and huskctl speaks ([`k8s_stream`]).

pub mod client;
#[cfg(feature = "k8s-stream")]
pub mod k8s_stream;
pub mod vmm_api;

/// Generated messages, the `Agent` client (`agent_client`) and server (`agent_server`).
pub mod v1 {
    tonic::include_proto!("husk.agent.v1");
}

/// The protocol revision this crate speaks, reported by the agent's `Version`.
/// It goes up by one with every change to `agent.proto`, so the host can tell
/// which RPCs and fields an agent understands. Changes are additive, except
/// in 4, which dropped CopyFile (volumes reach a guest through virtio-fs
/// since): a host of 3 or older needs an agent of 3 or older.
pub const PROTOCOL_VERSION: u32 = 4;

/// The guest vsock port the agent listens on when it runs as PID 1.
pub const AGENT_VSOCK_PORT: u32 = 1024;
