//! husk-vmm: one KVM microVM per pod. Direct 64-bit boot of a Linux `vmlinux`,
//! a serial console, virtio-mmio devices (vsock bridged to a host unix socket,
//! block, net on a host tap), a control API, and a profile for PVM hosts.

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod pvm;
pub mod vstate;

pub use builder::{BuildError, Vmm};
pub use config::VmConfig;
pub use control::Outcome;
