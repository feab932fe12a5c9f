//! A guest interrupt line driven through KVM's irqfd.

use std::io;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// One legacy IRQ line: writing the eventfd pulses the line in the in-kernel
/// PIC/IOAPIC without a trip through the vCPU thread.
pub struct IrqLine {
    evt: EventFd,
    gsi: u32,
}

impl IrqLine {
    pub fn new(gsi: u32) -> io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            gsi,
        })
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            evt: self.evt.try_clone()?,
            gsi: self.gsi,
        })
    }

    pub fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        IrqLine::trigger(self)
    }
}
