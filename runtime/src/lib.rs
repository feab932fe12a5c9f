//! huskd's library: the parts of the CRI server that are worth testing on their own.

pub mod config;
pub mod image;
pub mod manager;
pub mod network;
pub mod sandbox;
pub mod server;
pub mod state;
pub mod streaming;
