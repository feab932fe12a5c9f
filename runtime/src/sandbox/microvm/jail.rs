//! The uid and gid each jailed husk-vmm runs as: one pair per pod, recorded
//! in its directory (`jail.id`).

use std::fs;
use std::path::Path;

use super::{MicroVmDriver, JAIL_ID, JAIL_IDS};
use crate::sandbox::{io_err, SandboxError};

/// The ids jailed VMMs run as: uid = gid = `first` + n, one n per sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailIds {
    pub first: u32,
}

impl MicroVmDriver {
    /// Chooses the uid and gid the sandbox's VMM runs as: the lowest of
    /// `ids` no other sandbox directory holds, recorded in this one's.
    pub(super) fn allocate_jail_id(
        &self,
        id: &str,
        dir: &Path,
        ids: JailIds,
    ) -> Result<u32, SandboxError> {
        let _guard = self.jail_ids.lock().unwrap_or_else(|p| p.into_inner());
        let siblings = dir.parent().unwrap_or(dir);
        let taken: std::collections::HashSet<u32> = fs::read_dir(siblings)
            .map_err(io_err(id, format!("listing {}", siblings.display())))?
            .flatten()
            .filter_map(|entry| fs::read_to_string(entry.path().join(JAIL_ID)).ok())
            .filter_map(|text| text.trim().parse().ok())
            .collect();
        let uid = (0..JAIL_IDS)
            .filter_map(|n| ids.first.checked_add(n))
            .find(|uid| !taken.contains(uid))
            .ok_or_else(|| SandboxError::Unsupported {
                id: id.to_owned(),
                detail: format!(
                    "all {JAIL_IDS} jail ids from {} are taken by other sandboxes",
                    ids.first
                ),
            })?;
        let record = dir.join(JAIL_ID);
        fs::write(&record, uid.to_string())
            .map_err(io_err(id, format!("writing {}", record.display())))?;
        Ok(uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::microvm::tests::driver_without_files;

    #[test]
    fn each_sandbox_gets_jail_ids_no_other_holds() {
        let state = tempfile::tempdir().expect("tempdir");
        let driver = driver_without_files(1);
        let ids = JailIds { first: 5000 };
        let sandbox = |name: &str| {
            let dir = state.path().join(name);
            fs::create_dir(&dir).expect("mkdir");
            dir
        };
        let (a, b, c) = (sandbox("a"), sandbox("b"), sandbox("c"));
        assert_eq!(driver.allocate_jail_id("a", &a, ids).expect("a"), 5000);
        assert_eq!(driver.allocate_jail_id("b", &b, ids).expect("b"), 5001);
        // a's sandbox goes: its ids are free for the next.
        fs::remove_dir_all(&a).expect("rm a");
        assert_eq!(driver.allocate_jail_id("c", &c, ids).expect("c"), 5000);
        assert_eq!(fs::read_to_string(c.join(JAIL_ID)).expect("record"), "5000");
    }
}
