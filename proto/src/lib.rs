//! The host ⇄ agent protocol of husk: the code generated from `agent.proto`
//! and, in [`client`], the host side's ways to reach an agent.

pub mod client;

/// Generated messages, the `Agent` client (`agent_client`) and server (`agent_server`).
pub mod v1 {
    tonic::include_proto!("husk.agent.v1");
}

/// The protocol revision this crate speaks, reported by the agent's `Version`.
/// It goes up by one with every (additive) change to `agent.proto`, so the host
/// can tell which RPCs and fields an agent understands.
pub const PROTOCOL_VERSION: u32 = 3;

/// The guest vsock port the agent listens on when it runs as PID 1.
pub const AGENT_VSOCK_PORT: u32 = 1024;
