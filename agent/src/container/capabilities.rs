//! OCI `process.capabilities`: from the spec to the container process's
//! capability sets, in runc's order around the switch to the container's
//! user: [`prepare`] (bounding set, keep-caps) before setgroups/setgid/setuid,
//! [`apply`] after.

use caps::{CapSet, Capability, CapsHashSet};
use oci_spec::runtime::{Capabilities, LinuxCapabilities};
use tracing::debug;

#[derive(Debug, thiserror::Error)]
pub enum CapabilitiesError {
    #[error("cannot tell which capabilities this kernel supports: PR_CAPBSET_READ knows none")]
    Probe,
    #[error("cannot read the {set:?} capability set: {source}")]
    Read {
        set: CapSet,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("cannot drop {cap} from the bounding set: {source}")]
    DropBounding {
        cap: Capability,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("cannot set the keep-capabilities flag to {keep}: {source}")]
    KeepCaps {
        keep: bool,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("cannot set the {set:?} capability set to {caps:?}: {source}")]
    Set {
        set: CapSet,
        caps: Vec<Capability>,
        #[source]
        source: caps::errors::CapsError,
    },
}

/// The container process's capability sets. A set the spec omits is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapabilitySets {
    pub bounding: CapsHashSet,
    pub effective: CapsHashSet,
    pub permitted: CapsHashSet,
    pub inheritable: CapsHashSet,
    pub ambient: CapsHashSet,
}

/// Maps the spec's capabilities to the ones this agent holds. Names the caps
/// crate or the running kernel does not know are skipped, so a spec written
/// for a newer kernel still runs; so are capabilities outside the agent's
/// own bounding set, which no process it starts can have: a privileged
/// container (or one that adds `ALL`) gets every capability the runtime has,
/// as with containerd, on hosts that withhold some from the runtime.
pub fn from_spec(spec: &LinuxCapabilities) -> Result<CapabilitySets, CapabilitiesError> {
    // Probed with PR_CAPBSET_READ: needs no /proc, which the container may not have yet.
    let supported: CapsHashSet = caps::runtime::thread_all_supported()
        .into_iter()
        .filter(|&cap| caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false))
        .collect();
    if supported.is_empty() {
        return Err(CapabilitiesError::Probe);
    }
    let set = |caps: &Option<Capabilities>, which: &str| -> CapsHashSet {
        caps.iter()
            .flatten()
            .filter_map(|cap| {
                // oci-spec prints CHOWN for CAP_CHOWN.
                let name = format!("CAP_{cap}");
                match name.parse::<Capability>() {
                    Ok(cap) if supported.contains(&cap) => Some(cap),
                    _ => {
                        debug!(
                            capability = %name,
                            set = which,
                            "capability unknown to this kernel or outside the agent's \
                             bounding set, skipped"
                        );
                        None
                    }
                }
            })
            .collect()
    };
    Ok(CapabilitySets {
        bounding: set(spec.bounding(), "bounding"),
        effective: set(spec.effective(), "effective"),
        permitted: set(spec.permitted(), "permitted"),
        inheritable: set(spec.inheritable(), "inheritable"),
        ambient: set(spec.ambient(), "ambient"),
    })
}

/// Before switching to the container's user: drops from the bounding set what
/// `sets.bounding` lacks (needs CAP_SETPCAP, so it must happen while still
/// privileged), and sets PR_SET_KEEPCAPS so the permitted set survives setuid
/// away from root.
pub fn prepare(sets: &CapabilitySets) -> Result<(), CapabilitiesError> {
    let current = caps::read(None, CapSet::Bounding).map_err(|source| CapabilitiesError::Read {
        set: CapSet::Bounding,
        source,
    })?;
    for &cap in current.difference(&sets.bounding) {
        caps::drop(None, CapSet::Bounding, cap)
            .map_err(|source| CapabilitiesError::DropBounding { cap, source })?;
    }
    set_keepcaps(true)
}

/// After setgroups/setgid/setuid: clears keep-caps, then sets effective,
/// inheritable, permitted and ambient, in that order.
///
/// The caps crate sets one set per capset(2), each checked by the kernel
/// against the sets of the moment:
/// - effective first: it must stay within permitted, and a process that is
///   still root has a full effective set that a smaller permitted set would
///   not contain (after setuid away from root it is empty);
/// - inheritable before permitted shrinks: the new inheritable set must be
///   within the old inheritable and permitted sets;
/// - ambient last: a capability can only be raised there when it is both
///   permitted and inheritable.
pub fn apply(sets: &CapabilitySets) -> Result<(), CapabilitiesError> {
    set_keepcaps(false)?;
    for (set, caps) in [
        (CapSet::Effective, &sets.effective),
        (CapSet::Inheritable, &sets.inheritable),
        (CapSet::Permitted, &sets.permitted),
        (CapSet::Ambient, &sets.ambient),
    ] {
        caps::set(None, set, caps).map_err(|source| CapabilitiesError::Set {
            set,
            caps: caps.iter().copied().collect(),
            source,
        })?;
    }
    Ok(())
}

fn set_keepcaps(keep: bool) -> Result<(), CapabilitiesError> {
    caps::securebits::set_keepcaps(keep)
        .map_err(|source| CapabilitiesError::KeepCaps { keep, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    use serde_json::json;

    fn spec(json: serde_json::Value) -> LinuxCapabilities {
        serde_json::from_value(json).expect("valid OCI capabilities")
    }

    fn caps_set(caps: &[Capability]) -> CapsHashSet {
        caps.iter().copied().collect()
    }

    #[test]
    fn from_spec_maps_names_and_leaves_omitted_sets_empty() {
        let sets = from_spec(&spec(json!({
            "bounding": ["CAP_CHOWN", "CAP_NET_RAW"],
            "effective": ["CAP_CHOWN"],
            "permitted": ["CAP_CHOWN"]
        })))
        .unwrap();
        assert_eq!(
            sets,
            CapabilitySets {
                bounding: caps_set(&[Capability::CAP_CHOWN, Capability::CAP_NET_RAW]),
                effective: caps_set(&[Capability::CAP_CHOWN]),
                permitted: caps_set(&[Capability::CAP_CHOWN]),
                ..CapabilitySets::default()
            }
        );
    }

    #[test]
    fn capabilities_the_agent_lacks_are_left_out() {
        // A child whose bounding set lacks CAP_SYS_RESOURCE, as this
        // machine's runtime does: a privileged spec names it, and gets the rest.
        let status = in_child(|| {
            if caps::drop(None, CapSet::Bounding, Capability::CAP_SYS_RESOURCE).is_err() {
                return 10;
            }
            let all = from_spec(&spec(json!({
                "bounding": ["CAP_SYS_RESOURCE", "CAP_CHOWN"],
                "effective": ["CAP_SYS_RESOURCE", "CAP_CHOWN"],
                "permitted": ["CAP_SYS_RESOURCE", "CAP_CHOWN"]
            })));
            match all {
                Ok(sets) if sets.effective == caps_set(&[Capability::CAP_CHOWN]) => 0,
                _ => 11,
            }
        });
        assert_eq!(status, WaitStatus::Exited(status.pid().expect("pid"), 0));
    }

    /// Forks a child that runs `body` and exits with its code. The child
    /// allocates (the caps crate does): tolerable with glibc, whose fork
    /// resets the malloc locks; nothing else it uses takes locks.
    fn in_child(body: impl FnOnce() -> i32) -> WaitStatus {
        // SAFETY: see above; the child ends in _exit.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let code = body();
                // SAFETY: ends the child without running the harness's atexit handlers.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
        }
    }

    /// 0 when the thread's sets are `sets` (bounding and ambient included).
    fn check_sets(sets: &CapabilitySets) -> i32 {
        let read = |set| caps::read(None, set).unwrap_or_default();
        for (code, set, want) in [
            (20, CapSet::Bounding, &sets.bounding),
            (21, CapSet::Effective, &sets.effective),
            (22, CapSet::Permitted, &sets.permitted),
            (23, CapSet::Inheritable, &sets.inheritable),
            (24, CapSet::Ambient, &sets.ambient),
        ] {
            if read(set) != *want {
                return code;
            }
        }
        0
    }

    /// The errno of socket(AF_INET, SOCK_RAW), 0 if it worked (needs CAP_NET_RAW).
    fn raw_socket() -> i32 {
        // SAFETY: plain values; the fd, if any, is closed right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        if fd < 0 {
            return Errno::last_raw();
        }
        // SAFETY: we own `fd`.
        unsafe { libc::close(fd) };
        0
    }

    #[test]
    fn switch_to_user_1000_keeping_three_capabilities() {
        let small = from_spec(&spec(json!({
            "bounding": ["CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"],
            "effective": ["CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"],
            "permitted": ["CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"],
            "inheritable": ["CAP_CHOWN"],
            "ambient": ["CAP_CHOWN"]
        })))
        .unwrap();
        let status = in_child(|| {
            if prepare(&small).is_err() {
                return 10;
            }
            // SAFETY: plain values.
            if unsafe { libc::setresgid(1000, 1000, 1000) } != 0 {
                return 11;
            }
            // SAFETY: plain values.
            if unsafe { libc::setresuid(1000, 1000, 1000) } != 0 {
                return 12;
            }
            if apply(&small).is_err() {
                return 13;
            }
            match check_sets(&small) {
                0 if raw_socket() == libc::EPERM => 0,
                0 => 30,
                code => code,
            }
        });
        assert!(
            matches!(status, WaitStatus::Exited(_, 0)),
            "child: {status:?}"
        );
    }

    #[test]
    fn root_without_setuid_needs_effective_shrunk_first() {
        // Staying root keeps a full effective set until apply(): setting the
        // smaller permitted set first would fail.
        let sets = from_spec(&spec(json!({
            "bounding": ["CAP_CHOWN", "CAP_NET_RAW"],
            "effective": ["CAP_CHOWN", "CAP_NET_RAW"],
            "permitted": ["CAP_CHOWN", "CAP_NET_RAW"]
        })))
        .unwrap();
        let status = in_child(|| {
            if prepare(&sets).is_err() {
                return 10;
            }
            if apply(&sets).is_err() {
                return 13;
            }
            match check_sets(&sets) {
                // CAP_NET_RAW kept: the raw socket works.
                0 if raw_socket() == 0 => 0,
                0 => 30,
                code => code,
            }
        });
        assert!(
            matches!(status, WaitStatus::Exited(_, 0)),
            "child: {status:?}"
        );
    }
}
