//! virtio-vsock (virtio 1.2 spec, section 5.10) implemented in userspace and
//! bridged to unix sockets on the host, Firecracker's "hybrid vsock":
//!
//! - A host client connects to the device's unix socket, writes
//!   `CONNECT <port>\n`, and reads back `OK <host port>\n` once the guest
//!   accepted on vsock port `<port>`; the socket is closed if the guest
//!   refuses or does not answer in time. After that the socket carries the
//!   stream.
//! - A guest connection to host CID 2, port P, is connected to the unix
//!   socket `<uds path>_P`.
//!
//! Modules: `packet` (header codec), `handshake` (the CONNECT line),
//! `connection` (one stream: state, credit, buffering), `muxer` (host
//! sockets, routing, rx scheduling) and `device` (virtqueues).

mod connection;
mod device;
mod error;
mod handshake;
mod muxer;
mod packet;

#[cfg(test)]
mod tests;

pub use device::Vsock;
pub use error::VsockError;
pub use muxer::{DEFAULT_CONNECT_TIMEOUT, FIRST_LOCAL_PORT};
