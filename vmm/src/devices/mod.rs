//! Devices the guest sees: the serial console, the i8042 reset line, and
//! virtio devices on the virtio-mmio transport.

pub mod irq;
pub mod serial;
pub mod virtio;
