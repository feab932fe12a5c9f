//! The CPUID the guest sees: what KVM supports, with per-vCPU topology fixed
//! up, the hypervisor bit set, and (on request) features masked off.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

/// A CPUID feature bit: (leaf, subleaf, register, bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureBit {
    pub leaf: u32,
    pub index: u32,
    pub reg: Reg,
    pub bit: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Ebx,
    Ecx,
    Edx,
}

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const HYPERVISOR_BIT: u32 = 31;

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("cannot read the CPUID KVM supports: {0}")]
    Supported(kvm_ioctls::Error),
    #[error("KVM refused the CPUID of vCPU {vcpu}: {source}")]
    Set { vcpu: u8, source: kvm_ioctls::Error },
}

/// The supported CPUID with `masked` features cleared; shared by all vCPUs.
pub fn base_cpuid(kvm: &Kvm, masked: &[FeatureBit]) -> Result<CpuId, CpuidError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?;
    for entry in cpuid.as_mut_slice() {
        if entry.function == LEAF_FEATURES {
            entry.ecx |= 1 << HYPERVISOR_BIT;
        }
        for feature in masked {
            if entry.function == feature.leaf && entry.index == feature.index {
                let reg = match feature.reg {
                    Reg::Ebx => &mut entry.ebx,
                    Reg::Ecx => &mut entry.ecx,
                    Reg::Edx => &mut entry.edx,
                };
                *reg &= !(1 << feature.bit);
            }
        }
    }
    Ok(cpuid)
}

/// Sets `base` on the vCPU with its own APIC ID and the vCPU count.
pub fn set_vcpu_cpuid(vcpu: &VcpuFd, base: &CpuId, id: u8, count: u8) -> Result<(), CpuidError> {
    let mut cpuid = base.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processor count.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24);
                entry.ebx |= u32::from(count) << 16;
            }
            LEAF_EXT_TOPOLOGY => entry.edx = u32::from(id),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)
        .map_err(|source| CpuidError::Set { vcpu: id, source })
}
