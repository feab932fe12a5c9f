//! Shared pieces of husk's end-to-end tests and benchmarks: where the built
//! binaries and guest image are, and a microVM booted with husk-vmm whose
//! agent is reached over vsock exactly as huskd reaches it.

pub mod guest;
pub mod microvm;
pub mod netns;
pub mod oci;
pub mod rootfs;

use std::path::{Path, PathBuf};

/// A number from the environment variable `var`, else `default` (also when
/// it does not parse): how the tests and benchmarks take their knobs.
pub fn env_number<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The workspace root (this crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A workspace binary built beside the running test (target/<profile>/NAME).
/// Panics with the command that builds it when it is missing: an end-to-end
/// test that cannot find its parts must fail, not skip.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`, \
         as the README's test command does)",
        path.display()
    );
    path
}

/// The guest kernel and initramfs built by `guest-image/build.sh`, or the
/// ones named by HUSK_GUEST_KERNEL / HUSK_GUEST_INITRD.
pub fn guest_image() -> (PathBuf, PathBuf) {
    let pick = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join(default))
    };
    let kernel = pick("HUSK_GUEST_KERNEL", "target/guest/vmlinux");
    let initrd = pick("HUSK_GUEST_INITRD", "target/guest/initramfs.cpio.gz");
    for path in [&kernel, &initrd] {
        assert!(
            path.exists(),
            "{} is missing: build the guest image first (`bash guest-image/build.sh`)",
            path.display()
        );
    }
    (kernel, initrd)
}

/// The mount points below `dir` in this process's mount namespace: what a
/// test checks is gone after a teardown.
pub fn mounts_below(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(str::to_string))
        .filter(|mount_point| mount_point.starts_with(&dir))
        .collect()
}
