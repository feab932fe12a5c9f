//! One vCPU thread: enters the guest and serves the exits that need the VMM
//! (port I/O for the console and reset line, MMIO for virtio registers, and
//! on PVM hosts the emulation failures `pvm` can fix up).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::layout;
use crate::devices::serial::SerialConsole;
use crate::devices::virtio::mmio::MmioTransport;
use crate::pvm;

/// Why a vCPU stopped running the guest.
#[derive(Debug)]
pub enum VcpuStop {
    /// The guest reset the machine (i8042 reset or KVM system event): this is
    /// how a guest without ACPI shuts down, and also how it reboots on panic.
    Reset,
    /// Triple fault or an equivalent: the guest is dead. Carries the vCPU's
    /// state at that moment, for the report.
    TripleFault(String),
    /// KVM or the VMM could not continue; the message says why.
    Fatal(String),
}

/// Devices reachable from vCPU exits.
pub struct ExitDevices {
    pub serial: Mutex<SerialConsole>,
    /// virtio-mmio devices in slot order from `MMIO_GAP_START`.
    pub mmio: Vec<Arc<Mutex<MmioTransport>>>,
}

impl ExitDevices {
    fn mmio_slot(&self, addr: u64) -> Option<(&Arc<Mutex<MmioTransport>>, u64)> {
        let rel = addr.checked_sub(layout::MMIO_GAP_START)?;
        let device = self.mmio.get((rel / layout::MMIO_DEVICE_SIZE) as usize)?;
        Some((device, rel % layout::MMIO_DEVICE_SIZE))
    }

    fn serial_offset(port: u16) -> Option<u8> {
        let rel = port.checked_sub(layout::SERIAL_PORT_BASE)?;
        (rel < layout::SERIAL_PORT_LEN).then_some(rel as u8)
    }
}

pub struct Vcpu {
    pub fd: VcpuFd,
    pub id: u8,
    pub mem: GuestMemoryMmap,
    pub devices: Arc<ExitDevices>,
    /// Whether emulation failures may be fixed up (PVM profile).
    pub pvm: bool,
    /// When the VMM process started, for the boot-timing log line.
    pub vmm_start: Instant,
}

impl Vcpu {
    /// Runs the guest until it resets, dies, or KVM fails.
    pub fn run(mut self) -> VcpuStop {
        let span = tracing::info_span!("vcpu", id = self.id);
        let _enter = span.enter();
        tracing::info!(
            elapsed_us = self.vmm_start.elapsed().as_micros() as u64,
            "guest entered"
        );
        let mut fixups: u64 = 0;
        loop {
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return VcpuStop::Fatal(format!("KVM_RUN failed: {e}")),
            };
            match exit {
                VcpuExit::IoOut(port, data) => {
                    if port == layout::I8042_COMMAND_PORT && data.first() == Some(&0xfe) {
                        return VcpuStop::Reset;
                    }
                    if let (Some(offset), Some(&value)) =
                        (ExitDevices::serial_offset(port), data.first())
                    {
                        lock(&self.devices.serial).write(offset, value);
                    }
                }
                VcpuExit::IoIn(port, data) => match ExitDevices::serial_offset(port) {
                    Some(offset) => data[0] = lock(&self.devices.serial).read(offset),
                    // The i8042's status: input buffer empty. Linux's `reboot=k`
                    // polls it up to 65536 times before writing the reset
                    // command; a floating bus (0xff, "busy") made every guest
                    // shutdown take 65536 exits (5 s on the nested bed).
                    None if port == layout::I8042_COMMAND_PORT => data.fill(0),
                    // No device: the bus floats high.
                    None => data.fill(0xff),
                },
                VcpuExit::MmioRead(addr, data) => match self.devices.mmio_slot(addr) {
                    Some((device, offset)) => lock(device).read(offset, data),
                    None => data.fill(0),
                },
                VcpuExit::MmioWrite(addr, data) => {
                    if let Some((device, offset)) = self.devices.mmio_slot(addr) {
                        lock(device).write(offset, data);
                    }
                }
                VcpuExit::Shutdown => return VcpuStop::TripleFault(self.describe_state()),
                VcpuExit::Hlt => return VcpuStop::Reset,
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_RESET | KVM_SYSTEM_EVENT_SHUTDOWN => return VcpuStop::Reset,
                    other => return VcpuStop::Fatal(format!("unexpected system event {other}")),
                },
                VcpuExit::InternalError => match self.handle_internal_error() {
                    Ok(()) => {
                        fixups += 1;
                        if fixups.is_power_of_two() {
                            tracing::debug!(fixups, "emulation failures fixed up so far");
                        }
                    }
                    Err(reason) => return VcpuStop::Fatal(reason),
                },
                VcpuExit::FailEntry(reason, cpu) => {
                    return VcpuStop::Fatal(format!(
                        "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                    ))
                }
                other => return VcpuStop::Fatal(format!("unexpected vCPU exit {other:?}")),
            }
        }
    }

    /// The vCPU, then RIP, RSP, CS (selector and privilege), CR2 and CR3:
    /// enough to place a guest's death in its System.map. On AMD, KVM resets
    /// a vCPU that triple-faulted to its power-on state before reporting the
    /// shutdown, so those registers say nothing of where it died: say so.
    fn describe_state(&self) -> String {
        let (r, s) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => (r, s),
            _ => return format!("vCPU {}: state unavailable", self.id),
        };
        let registers = format!(
            "rip={:#x} rsp={:#x} rcx={:#x} r11={:#x} cs={:#x} (dpl {}) cr2={:#x} cr3={:#x}",
            r.rip, r.rsp, r.rcx, r.r11, s.cs.selector, s.cs.dpl, s.cr2, s.cr3
        );
        if is_reset_state(&r, &s) {
            format!(
                "vCPU {}: registers are the power-on reset state (KVM on AMD resets a \
                 triple-faulted vCPU before reporting it; where it died is lost; the guest \
                 console may tell): {registers}",
                self.id
            )
        } else {
            format!("vCPU {}: {registers}", self.id)
        }
    }

    fn handle_internal_error(&mut self) -> Result<(), String> {
        // SAFETY: KVM filled the `internal` member of the union for this exit.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            return Err(format!("KVM internal error (suberror {suberror})"));
        }
        if !self.pvm {
            return Err("KVM could not emulate a guest instruction".into());
        }
        pvm::handle_emulation_failure(&self.fd, &self.mem)
            .map(|fixup| tracing::trace!(?fixup, "emulation failure fixed up"))
            .map_err(|e| format!("{e} ({})", self.describe_state()))
    }
}

/// The architectural state after RESET/INIT: CS:IP F000:FFF0 with CS based
/// at 0xffff0000, protected mode off.
fn is_reset_state(r: &kvm_bindings::kvm_regs, s: &kvm_bindings::kvm_sregs) -> bool {
    const RESET_RIP: u64 = 0xfff0;
    const RESET_CS_SELECTOR: u16 = 0xf000;
    const RESET_CS_BASE: u64 = 0xffff_0000;
    const CR0_PE: u64 = 1;
    r.rip == RESET_RIP
        && s.cs.selector == RESET_CS_SELECTOR
        && s.cs.base == RESET_CS_BASE
        && s.cr0 & CR0_PE == 0
}

/// Device locks are only poisoned if a device panicked; keep serving anyway.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_state_is_recognised_and_a_running_kernel_is_not() {
        let mut regs = kvm_bindings::kvm_regs {
            rip: 0xfff0,
            ..Default::default()
        };
        let mut sregs = kvm_bindings::kvm_sregs::default();
        sregs.cs.selector = 0xf000;
        sregs.cs.base = 0xffff_0000;
        sregs.cr0 = 0x6000_0010;
        assert!(is_reset_state(&regs, &sregs));
        regs.rip = 0xffff_ffff_8100_0000;
        sregs.cs.selector = 0x10;
        sregs.cs.base = 0;
        sregs.cr0 = 0x8005_0033;
        assert!(!is_reset_state(&regs, &sregs));
    }
}
