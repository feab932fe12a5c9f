//! The pod's images as the guest's disks: husk-vmm's spare virtio-blk
//! slots, which image each holds (`disks.json`), and filling and emptying
//! them through the control API.

use std::fs;
use std::path::Path;

use husk_proto::vmm_api;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::{api_call, MicroVmDriver, API_SOCKET, DISK_TABLE};
use crate::sandbox::{io_err, ImageFiles, RootfsPlan, SandboxError};

/// The disk slots of one sandbox, persisted as `disks.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct DiskTable {
    pub(super) slots: Vec<Slot>,
    /// Counts releases, so the slot freed longest ago is reused first.
    generation: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct Slot {
    /// The image id the slot holds.
    pub(super) image: Option<String>,
    /// `generation` when the slot was last emptied; 0 if never used.
    freed_at: u64,
}

/// The guest's name for disk slot `index` (no `--disk` before the spares).
pub fn guest_device(index: usize) -> Option<String> {
    let letter = u8::try_from(index).ok().filter(|i| *i < 26)?;
    Some(format!("/dev/vd{}", char::from(b'a' + letter)))
}

impl MicroVmDriver {
    pub(super) fn load_table(&self, id: &str, dir: &Path) -> Result<DiskTable, SandboxError> {
        let path = dir.join(DISK_TABLE);
        let mut table: DiskTable = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| SandboxError::Io {
                id: id.to_owned(),
                what: format!("reading {}", path.display()),
                source: e.into(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DiskTable::default(),
            Err(e) => return Err(io_err(id, format!("reading {}", path.display()))(e)),
        };
        table.slots.resize(
            self.config.spare_disks.max(table.slots.len()),
            Slot::default(),
        );
        Ok(table)
    }

    pub(super) fn save_table(
        &self,
        id: &str,
        dir: &Path,
        table: &DiskTable,
    ) -> Result<(), SandboxError> {
        let path = dir.join(DISK_TABLE);
        let tmp = dir.join(format!("{DISK_TABLE}.tmp"));
        let bytes = serde_json::to_vec(table).map_err(|e| SandboxError::Io {
            id: id.to_owned(),
            what: "encoding the disk table".into(),
            source: e.into(),
        })?;
        fs::write(&tmp, bytes).map_err(io_err(id, format!("writing {}", tmp.display())))?;
        fs::rename(&tmp, &path).map_err(io_err(id, format!("writing {}", path.display())))
    }

    /// Puts the image in a disk slot (the one that has it already, else a
    /// free one) and says which guest device it is.
    pub(super) async fn attach_disk_image(
        &self,
        id: &str,
        dir: &Path,
        image: ImageFiles<'_>,
    ) -> Result<RootfsPlan, SandboxError> {
        let _guard = self.disks.lock().await;
        let mut table = self.load_table(id, dir)?;
        let device = |index: usize| {
            guest_device(index).ok_or_else(|| SandboxError::NoDiskSlot {
                id: id.to_owned(),
                detail: format!("disk slot {index} has no /dev/vdX name"),
            })
        };
        if let Some(index) = table
            .slots
            .iter()
            .position(|s| s.image.as_deref() == Some(image.id))
        {
            return Ok(RootfsPlan::BlockDevice(device(index)?));
        }
        // Prefer a slot never used, then the one freed longest ago:
        // the guest has had the most time to drop what it cached of it.
        let index = table
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.image.is_none())
            .min_by_key(|(_, s)| s.freed_at)
            .map(|(i, _)| i)
            .ok_or_else(|| SandboxError::NoDiskSlot {
                id: id.to_owned(),
                detail: format!(
                    "all {} disk slots hold images: a pod's containers can use at most \
                     {} distinct images (spare_disks)",
                    table.slots.len(),
                    table.slots.len()
                ),
            })?;
        // Sent as a descriptor: a jailed VMM cannot open it by path.
        let file = fs::File::open(image.erofs).map_err(io_err(
            id,
            format!("the image's EROFS file {}", image.erofs.display()),
        ))?;
        // Recorded before the VMM is asked: should huskd die before
        // the answer, the slot is known, and releasing the image (as
        // the next huskd does for a half-created container) empties
        // it whether or not the VMM filled it.
        let freed_at = table.slots[index].freed_at;
        table.slots[index].image = Some(image.id.to_owned());
        self.save_table(id, dir, &table)?;
        let request = vmm_api::Request::AttachDisk {
            index,
            path: image.erofs.to_owned(),
            fd: true,
        };
        if let Err(detail) = api_call(&dir.join(API_SOCKET), request, Some(file)).await {
            table.slots[index] = Slot {
                image: None,
                freed_at,
            };
            self.save_table(id, dir, &table)?;
            return Err(SandboxError::Vmm {
                id: id.to_owned(),
                what: format!("attaching {} to disk slot {index}", image.erofs.display()),
                detail,
            });
        }
        let device = device(index)?;
        info!(image = image.id, slot = index, %device, "image attached");
        Ok(RootfsPlan::BlockDevice(device))
    }

    /// Empties the slot that holds the image, if one does.
    pub(super) async fn release_disk_image(
        &self,
        id: &str,
        dir: &Path,
        image_id: &str,
    ) -> Result<(), SandboxError> {
        let _guard = self.disks.lock().await;
        if !dir.join(DISK_TABLE).exists() {
            return Ok(());
        }
        let mut table = self.load_table(id, dir)?;
        let Some(index) = table
            .slots
            .iter()
            .position(|s| s.image.as_deref() == Some(image_id))
        else {
            return Ok(());
        };
        let request = vmm_api::Request::DetachDisk { index };
        api_call(&dir.join(API_SOCKET), request, None)
            .await
            .map_err(|detail| SandboxError::Vmm {
                id: id.to_owned(),
                what: format!("detaching disk slot {index}"),
                detail,
            })?;
        table.generation += 1;
        table.slots[index] = Slot {
            image: None,
            freed_at: table.generation,
        };
        self.save_table(id, dir, &table)?;
        info!(image = image_id, slot = index, "image detached");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::microvm::tests::driver_without_files;

    #[test]
    fn slots_name_guest_devices() {
        assert_eq!(guest_device(0).as_deref(), Some("/dev/vda"));
        assert_eq!(guest_device(7).as_deref(), Some("/dev/vdh"));
        assert_eq!(guest_device(26), None);
    }

    #[test]
    fn the_disk_table_survives_and_grows_to_the_slot_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = driver_without_files(3);
        let mut table = driver.load_table("p", dir.path()).expect("fresh");
        assert_eq!(table.slots.len(), 3);
        table.slots[1].image = Some("sha256:ab".into());
        driver.save_table("p", dir.path(), &table).expect("save");
        let again = driver.load_table("p", dir.path()).expect("load");
        assert_eq!(again.slots[1].image.as_deref(), Some("sha256:ab"));
        assert!(again.slots[0].image.is_none());
    }
}
