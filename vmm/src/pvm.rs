//! Running guests on a PVM host (`kvm_pvm`: KVM without VT-x/AMD-V, inside
//! another VM). There a stock guest kernel's ring 0 is executed by KVM's
//! instruction emulator, which refuses some instructions. This module keeps the
//! guest off them (measured in ENVIRONMENT.md: CPUID masks did not reliably
//! reach the guest, command-line switches did) and handles, in userspace, the
//! refusals that can be handled: INT3 becomes an injected #BP, FWAIT is stepped.

use std::path::Path;

use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::cpuid::{FeatureBit, Reg};

/// Guest command-line switches that keep a stock kernel off what the emulator
/// refuses: the XSAVE family (FPU init), CMPXCHG16B (SLUB), POPCNT, and the
/// rest of the list ENVIRONMENT.md measured; no page-table isolation and no
/// mitigations, which only add emulated work. `husk.pvm_syscall` turns on the
/// guest kernel's completion of SYSCALLs this host delivers without switching
/// to ring 0 (guest-image/patches); other kernels ignore it.
pub const GUEST_CMDLINE: &str = "noxsave nopti mitigations=off husk.pvm_syscall \
clearcpuid=cx16,popcnt,umip,bmi1,bmi2,erms,fsrm,avx,avx2,sse4_1,sse4_2,movbe,rdrand,rdseed,adx,smap,smep";

/// The same features masked in CPUID too, for guests that do honour it.
pub const MASKED_FEATURES: &[FeatureBit] = &[
    feature(1, 0, Reg::Ecx, 13), // cx16
    feature(1, 0, Reg::Ecx, 23), // popcnt
    feature(1, 0, Reg::Ecx, 26), // xsave
    feature(1, 0, Reg::Ecx, 27), // osxsave
    feature(1, 0, Reg::Ecx, 28), // avx
    feature(1, 0, Reg::Ecx, 19), // sse4_1
    feature(1, 0, Reg::Ecx, 20), // sse4_2
    feature(1, 0, Reg::Ecx, 22), // movbe
    feature(1, 0, Reg::Ecx, 30), // rdrand
    feature(7, 0, Reg::Ebx, 3),  // bmi1
    feature(7, 0, Reg::Ebx, 5),  // avx2
    feature(7, 0, Reg::Ebx, 7),  // smep
    feature(7, 0, Reg::Ebx, 8),  // bmi2
    feature(7, 0, Reg::Ebx, 9),  // erms
    feature(7, 0, Reg::Ebx, 18), // rdseed
    feature(7, 0, Reg::Ebx, 19), // adx
    feature(7, 0, Reg::Ebx, 20), // smap
    feature(7, 0, Reg::Ecx, 2),  // umip
    feature(7, 0, Reg::Edx, 4),  // fsrm
];

const fn feature(leaf: u32, index: u32, reg: Reg, bit: u32) -> FeatureBit {
    FeatureBit {
        leaf,
        index,
        reg,
        bit,
    }
}

/// Whether this host's KVM is PVM.
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

const INT3: u8 = 0xcc;
const FWAIT: u8 = 0x9b;
const BP_VECTOR: u8 = 3;
/// The longest x86 instruction.
const MAX_INSN_LEN: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum EmulationError {
    #[error("cannot access vCPU state while handling an emulation failure: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    #[error("guest RIP {rip:#x} does not map to guest memory")]
    Unmapped { rip: u64 },
    #[error(
        "KVM could not emulate the guest instruction at RIP {rip:#x} (bytes {bytes}); \
         the guest kernel uses an instruction this host cannot run in kernel mode"
    )]
    Unhandled { rip: u64, bytes: String },
}

/// What was done about one emulation failure.
#[derive(Debug, PartialEq, Eq)]
pub enum Fixup {
    InjectedBreakpoint,
    SkippedFwait,
}

/// Handles a KVM emulation failure at the vCPU's current RIP, or explains it.
pub fn handle_emulation_failure(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
) -> Result<Fixup, EmulationError> {
    let mut regs: kvm_regs = vcpu.get_regs()?;
    let insn = read_instruction(vcpu, mem, regs.rip)?;
    match classify(&insn) {
        Some(Fixup::InjectedBreakpoint) => {
            // INT3 is a trap: #BP is delivered with RIP past the instruction.
            regs.rip += 1;
            vcpu.set_regs(&regs)?;
            let mut events = vcpu.get_vcpu_events()?;
            events.exception.injected = 1;
            events.exception.nr = BP_VECTOR;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            vcpu.set_vcpu_events(&events)?;
            Ok(Fixup::InjectedBreakpoint)
        }
        Some(Fixup::SkippedFwait) => {
            // With no pending x87 exceptions (the guest masks them) FWAIT is a no-op.
            regs.rip += 1;
            vcpu.set_regs(&regs)?;
            Ok(Fixup::SkippedFwait)
        }
        None => Err(EmulationError::Unhandled {
            rip: regs.rip,
            bytes: insn
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
        }),
    }
}

/// Which fixup, if any, applies to the instruction starting with `insn`.
fn classify(insn: &[u8]) -> Option<Fixup> {
    match insn.first() {
        Some(&INT3) => Some(Fixup::InjectedBreakpoint),
        Some(&FWAIT) => Some(Fixup::SkippedFwait),
        _ => None,
    }
}

/// Reads the bytes at a guest virtual RIP, page by page through the guest's
/// page tables (an instruction can straddle a page boundary).
fn read_instruction(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    rip: u64,
) -> Result<Vec<u8>, EmulationError> {
    let mut bytes = Vec::with_capacity(MAX_INSN_LEN);
    let mut gva = rip;
    while bytes.len() < MAX_INSN_LEN {
        let translation = vcpu.translate_gva(gva)?;
        if translation.valid == 0 {
            break;
        }
        let in_page = (0x1000 - (gva & 0xfff)) as usize;
        let mut chunk = vec![0u8; in_page.min(MAX_INSN_LEN - bytes.len())];
        if mem
            .read_slice(&mut chunk, GuestAddress(translation.physical_address))
            .is_err()
        {
            break;
        }
        gva += chunk.len() as u64;
        bytes.extend_from_slice(&chunk);
    }
    if bytes.is_empty() {
        return Err(EmulationError::Unmapped { rip });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int3_and_fwait_are_handled_others_are_not() {
        assert_eq!(classify(&[0xcc, 0x90]), Some(Fixup::InjectedBreakpoint));
        assert_eq!(classify(&[0x9b]), Some(Fixup::SkippedFwait));
        assert_eq!(classify(&[0x48, 0x0f, 0xc7, 0x0e]), None); // cmpxchg16b
        assert_eq!(classify(&[]), None);
    }

    #[test]
    fn cmdline_names_the_measured_switches() {
        for switch in ["noxsave", "clearcpuid=", "cx16", "popcnt"] {
            assert!(GUEST_CMDLINE.contains(switch), "{switch}");
        }
    }
}
