//! How big a pod's VM is: as big as the pod asks, as Kata sizes its VMs.
//!
//! Kubelet sends the sum of the pod's container limits in
//! `PodSandboxConfig.linux.resources` and the RuntimeClass's overhead in
//! `.linux.overhead`. The rule:
//!
//! - vCPUs = ceil(cpu_quota / cpu_period) of the limits + a base; without a
//!   CPU limit, `default_vcpus`.
//! - memory = the memory limit (in MiB, rounded up) + a base; without a
//!   memory limit, `default_mem_mib`.
//! - The base is the pod's overhead when kubelet sends one (the cluster's
//!   own statement of what the sandbox costs beyond its containers: here the
//!   guest kernel and agent), else the configured `base_vcpus` /
//!   `base_mem_mib`.
//! - Both are bounded by `max_vcpus` / `max_mem_mib`, and at least 1 vCPU
//!   and husk-vmm's minimum memory.
//! - On a PVM host a guest has one vCPU, whatever the pod asks (secondary
//!   vCPUs cannot start there; see `../shared/ENVIRONMENT.md`).
//!
//! The containers' own cgroup limits inside the guest are set as asked,
//! independently of this.

use k8s_cri::v1 as cri;
use serde::{Deserialize, Serialize};

/// Below this husk-vmm refuses to build a VM.
pub const MIN_MEM_MIB: u64 = 32;
/// husk's guest kernel is built with NR_CPUS=16.
pub const GUEST_MAX_VCPUS: u8 = 16;

/// The configured rule's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSizing {
    pub default_vcpus: u8,
    pub default_mem_mib: u64,
    pub base_vcpus: u8,
    pub base_mem_mib: u64,
    pub max_vcpus: u8,
    pub max_mem_mib: u64,
}

impl Default for VmSizing {
    fn default() -> Self {
        Self {
            default_vcpus: 1,
            default_mem_mib: 128,
            base_vcpus: 0,
            base_mem_mib: 64,
            max_vcpus: host_cpus().min(GUEST_MAX_VCPUS),
            max_mem_mib: 8192,
        }
    }
}

/// The size one VM got, as PodSandboxStatus reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSize {
    pub vcpus: u8,
    pub mem_mib: u64,
    /// Whether it runs on PVM (`true`) or standard KVM.
    pub pvm: bool,
}

/// The host's online CPUs (at least 1).
fn host_cpus() -> u8 {
    std::thread::available_parallelism()
        .map(|n| u8::try_from(n.get()).unwrap_or(u8::MAX))
        .unwrap_or(1)
}

/// ceil(quota / period) CPUs, if both are set.
fn cpus(resources: &cri::LinuxContainerResources) -> Option<u64> {
    let quota = u64::try_from(resources.cpu_quota).ok().filter(|q| *q > 0)?;
    let period = u64::try_from(resources.cpu_period)
        .ok()
        .filter(|p| *p > 0)?;
    Some(quota.div_ceil(period))
}

/// The memory limit in MiB (rounded up), if set.
fn mem_mib(resources: &cri::LinuxContainerResources) -> Option<u64> {
    u64::try_from(resources.memory_limit_in_bytes)
        .ok()
        .filter(|m| *m > 0)
        .map(|m| m.div_ceil(1 << 20))
}

impl VmSizing {
    /// The VM for a pod with `linux` (its resources and overhead), on a PVM
    /// host if `pvm`.
    pub fn size_for(&self, linux: Option<&cri::LinuxPodSandboxConfig>, pvm: bool) -> VmSize {
        let limits = linux.and_then(|l| l.resources.as_ref());
        let overhead = linux.and_then(|l| l.overhead.as_ref());
        let vcpus = match limits.and_then(cpus) {
            Some(n) => n.saturating_add(
                overhead
                    .and_then(cpus)
                    .unwrap_or(u64::from(self.base_vcpus)),
            ),
            None => u64::from(self.default_vcpus),
        };
        let mem = match limits.and_then(mem_mib) {
            Some(m) => m.saturating_add(overhead.and_then(mem_mib).unwrap_or(self.base_mem_mib)),
            None => self.default_mem_mib,
        };
        let max_vcpus = if pvm { 1 } else { self.max_vcpus.max(1) };
        VmSize {
            vcpus: u8::try_from(vcpus.clamp(1, u64::from(max_vcpus))).unwrap_or(1),
            mem_mib: mem.clamp(MIN_MEM_MIB, self.max_mem_mib.max(MIN_MEM_MIB)),
            pvm,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZING: VmSizing = VmSizing {
        default_vcpus: 1,
        default_mem_mib: 128,
        base_vcpus: 0,
        base_mem_mib: 64,
        max_vcpus: 8,
        max_mem_mib: 4096,
    };

    fn linux(
        resources: Option<(i64, i64, i64)>,
        overhead: Option<(i64, i64, i64)>,
    ) -> cri::LinuxPodSandboxConfig {
        let r = |(quota, period, mem): (i64, i64, i64)| cri::LinuxContainerResources {
            cpu_quota: quota,
            cpu_period: period,
            memory_limit_in_bytes: mem,
            ..Default::default()
        };
        cri::LinuxPodSandboxConfig {
            resources: resources.map(r),
            overhead: overhead.map(r),
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_without_limits_gets_the_defaults() {
        let want = VmSize {
            vcpus: 1,
            mem_mib: 128,
            pvm: false,
        };
        assert_eq!(SIZING.size_for(None, false), want);
        assert_eq!(SIZING.size_for(Some(&linux(None, None)), false), want);
        // Zeroes are kubelet's "no limit".
        assert_eq!(
            SIZING.size_for(Some(&linux(Some((0, 100_000, 0)), None)), false),
            want
        );
    }

    #[test]
    fn limits_plus_the_base_rounded_up() {
        // 2 CPUs and 256 MiB: 2 vCPUs, 256 + 64 MiB.
        let size = SIZING.size_for(
            Some(&linux(Some((200_000, 100_000, 256 << 20)), None)),
            false,
        );
        assert_eq!((size.vcpus, size.mem_mib), (2, 320));
        // 1.5 CPUs → 2; 100 MiB + 1 byte → 101 MiB.
        let size = SIZING.size_for(
            Some(&linux(Some((150_000, 100_000, (100 << 20) + 1)), None)),
            false,
        );
        assert_eq!((size.vcpus, size.mem_mib), (2, 165));
    }

    #[test]
    fn the_overhead_replaces_the_configured_base() {
        let size = SIZING.size_for(
            Some(&linux(
                Some((100_000, 100_000, 256 << 20)),
                Some((50_000, 100_000, 32 << 20)),
            )),
            false,
        );
        assert_eq!((size.vcpus, size.mem_mib), (2, 288));
    }

    #[test]
    fn bounded_by_the_maximum_and_by_pvm() {
        let huge = linux(Some((6_400_000, 100_000, 64 << 30)), None);
        let size = SIZING.size_for(Some(&huge), false);
        assert_eq!((size.vcpus, size.mem_mib), (8, 4096));
        let size = SIZING.size_for(Some(&huge), true);
        assert_eq!((size.vcpus, size.pvm), (1, true));
    }
}
