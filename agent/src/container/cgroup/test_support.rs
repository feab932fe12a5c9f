//! What the cgroup tests share. They use real cgroups on this machine, as root: v1 through the system's
//! hierarchies when they are v1, v2 on a controller-less cgroup2 mount
//! (/sys/fs/cgroup/unified on a hybrid host). Tests that cannot run here
//! say so and pass.

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub(super) use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder,
};

use super::{Cgroup, CgroupVersion, Hierarchy};

pub(super) const MIB: i64 = 1 << 20;

/// A unique top-level test cgroup, killed and removed (with all below
/// it) on drop, even when the test fails.
pub(super) struct TestTree {
    pub(super) hierarchy: Hierarchy,
    pub(super) top: Cgroup,
}

impl TestTree {
    pub(super) fn new(hierarchy: Hierarchy) -> TestTree {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "husk-test-{}-{nanos:x}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let top = Cgroup::create_in(&hierarchy, Path::new(&name)).unwrap();
        TestTree { hierarchy, top }
    }

    pub(super) fn child(&self, name: &str) -> Cgroup {
        Cgroup::create_in(&self.hierarchy, &self.top.relative().join(name)).unwrap()
    }
}

impl Drop for TestTree {
    fn drop(&mut self) {
        if let Err(err) = self.top.kill_all() {
            eprintln!("cleanup: {err}");
        }
        if let Err(err) = self.top.remove() {
            eprintln!("cleanup: {err}");
        }
    }
}

pub(super) fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The system's hierarchy if it is v1 and we may use it.
pub(super) fn v1() -> Option<Hierarchy> {
    let hierarchy = Hierarchy::detect();
    if !is_root() || hierarchy.version() != CgroupVersion::V1 {
        eprintln!("skipped: needs root on a cgroup v1 host");
        return None;
    }
    Some(hierarchy)
}

/// A cgroup2 mount: the system's if it is v2, else the hybrid host's
/// /sys/fs/cgroup/unified.
pub(super) fn v2() -> Option<Hierarchy> {
    let system = Hierarchy::detect();
    let hierarchy = if system.version() == CgroupVersion::V2 {
        system
    } else {
        Hierarchy::detect_at(Path::new("/sys/fs/cgroup/unified"))
    };
    if !is_root() || hierarchy.version() != CgroupVersion::V2 {
        eprintln!("skipped: needs root and a cgroup2 mount");
        return None;
    }
    Some(hierarchy)
}

/// `script` in sh, held until released, so that it runs in the cgroup
/// it is added to meanwhile.
pub(super) fn held(script: &str) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!("read _; {script}"))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap()
}

pub(super) fn release(child: &mut Child) {
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
}

pub(super) fn read(cgroup: &Cgroup, controller: &str, file: &str) -> String {
    let dir = cgroup.controller_dir(controller).unwrap();
    fs::read_to_string(dir.join(file))
        .unwrap()
        .trim()
        .to_string()
}

pub(super) fn resources(memory: i64, pids: i64) -> LinuxResources {
    LinuxResourcesBuilder::default()
        .memory(LinuxMemoryBuilder::default().limit(memory).build().unwrap())
        .pids(LinuxPidsBuilder::default().limit(pids).build().unwrap())
        .build()
        .unwrap()
}
