//! husk-vmm: one KVM microVM per pod. Direct 64-bit boot of a Linux `vmlinux`,
//! a serial console, virtio-mmio devices (vsock bridged to a host unix socket,
//! block, net on a host tap, fs through a vhost-user backend), a control
//! API, a profile for PVM hosts, a seccomp filter per thread kind, and a
//! jail it enters before the guest runs.

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod jail;
pub mod pvm;
pub mod seccomp;
pub mod vstate;

pub use builder::{BuildError, Vmm};
pub use config::VmConfig;
pub use control::Outcome;
