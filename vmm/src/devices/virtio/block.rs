//! virtio-blk backed by a host file, read-only or read-write. The backing file
//! can be swapped while the guest runs (the control API's attach/replace): the
//! new capacity reaches the driver through a config-change interrupt, which is
//! how disks are "attached" to a guest whose devices are fixed at boot.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{check_queues, read_config_bytes, ActivateError, ActiveQueues, VirtioDevice};

const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE];

const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The serial number GET_ID answers with is at most 20 bytes.
const VIRTIO_BLK_ID_BYTES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {path}: the file descriptor given is not open for writing, and the disk is read-write")]
    NotWritable { path: PathBuf },
    #[error("cannot create the queue eventfd: {0}")]
    EventFd(io::Error),
}

/// An open backing file. `None` in the device means an empty slot (capacity 0).
struct Backing {
    file: File,
    path: PathBuf,
    sectors: u64,
}

impl Backing {
    /// Opens `path`, or takes `file` (opened by whoever asked, who may see
    /// paths a jailed VMM cannot) as the file `path` names.
    fn open(path: &Path, file: Option<File>, read_only: bool) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.into(),
            source,
        };
        let file = match file {
            Some(file) => {
                let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)
                    .map_err(|e| open_err(e.into()))?;
                let mode =
                    nix::fcntl::OFlag::from_bits_truncate(flags) & nix::fcntl::OFlag::O_ACCMODE;
                if !read_only && mode != nix::fcntl::OFlag::O_RDWR {
                    return Err(BlockError::NotWritable { path: path.into() });
                }
                file
            }
            None => OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(path)
                .map_err(open_err)?,
        };
        let len = file.metadata().map_err(open_err)?.len();
        Ok(Self {
            file,
            path: path.into(),
            sectors: len / SECTOR_SIZE,
        })
    }
}

/// The backing of one disk slot, shared between the device (which serves
/// requests on the event loop) and the control API (which swaps it).
#[derive(Clone)]
pub struct DiskHandle {
    backing: Arc<Mutex<Option<Backing>>>,
    read_only: bool,
}

/// What the control API reports about a disk slot.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    pub path: Option<PathBuf>,
    pub read_only: bool,
    pub sectors: u64,
}

impl DiskHandle {
    fn lock(&self) -> MutexGuard<'_, Option<Backing>> {
        self.backing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the backing file (None empties the slot): the file at a
    /// path, or the one given for it. The caller raises the config-change
    /// interrupt through the transport.
    pub fn set_backing(&self, new: Option<(&Path, Option<File>)>) -> Result<(), BlockError> {
        let new = new
            .map(|(path, file)| Backing::open(path, file, self.read_only))
            .transpose()?;
        *self.lock() = new;
        Ok(())
    }

    pub fn info(&self) -> DiskInfo {
        let backing = self.lock();
        DiskInfo {
            path: backing.as_ref().map(|b| b.path.clone()),
            read_only: self.read_only,
            sectors: backing.as_ref().map_or(0, |b| b.sectors),
        }
    }
}

pub struct Block {
    disk: DiskHandle,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    queue_evts: [EventFd; 1],
    active: Option<ActiveQueues>,
}

impl Block {
    /// A disk backed by `path`, or an empty slot to be filled later.
    pub fn new(path: Option<&Path>, read_only: bool, id: &str) -> Result<Self, BlockError> {
        let backing = path
            .map(|p| Backing::open(p, None, read_only))
            .transpose()?;
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = id.len().min(VIRTIO_BLK_ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            disk: DiskHandle {
                backing: Arc::new(Mutex::new(backing)),
                read_only,
            },
            id: id_bytes,
            queue_evts: [EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?],
            active: None,
        })
    }

    pub fn handle(&self) -> DiskHandle {
        self.disk.clone()
    }

    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let backing = self.disk.lock();
        let queue = &mut active.queues[0];
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let written = execute(
                backing.as_ref(),
                self.disk.read_only,
                &self.id,
                &active.mem,
                chain,
            );
            if let Err(e) = queue.add_used(&active.mem, head, written) {
                tracing::warn!("virtio-blk: cannot return a used buffer: {e}");
            }
            used_any = true;
        }
        if used_any && queue.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
    }
}

/// Runs one request and writes its status byte; returns the bytes written
/// into the chain (data + status) for the used ring.
fn execute(
    backing: Option<&Backing>,
    read_only: bool,
    id: &[u8],
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        _ => {
            tracing::debug!("virtio-blk: malformed descriptor chain");
            return 0;
        }
    };
    if writer.available_bytes() == 0 {
        tracing::debug!("virtio-blk: request without room for a status byte");
        return 0;
    }
    let Ok(mut status_writer) = writer.split_at(writer.available_bytes() - 1) else {
        return 0;
    };
    let status = match reader.read_obj::<[u8; 16]>() {
        Ok(header) => {
            let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
            run_request(
                backing,
                read_only,
                id,
                kind,
                sector,
                &mut reader,
                &mut writer,
            )
        }
        Err(_) => VIRTIO_BLK_S_IOERR,
    };
    if status_writer.write_all(&[status]).is_err() {
        return 0;
    }
    (writer.bytes_written() + 1) as u32
}

fn run_request(
    backing: Option<&Backing>,
    read_only: bool,
    id: &[u8],
    kind: u32,
    sector: u64,
    reader: &mut virtio_queue::Reader,
    writer: &mut virtio_queue::Writer,
) -> u8 {
    let result = match (kind, backing) {
        (VIRTIO_BLK_T_GET_ID, _) => writer.write_all(&id[..id.len().min(writer.available_bytes())]),
        (VIRTIO_BLK_T_IN, Some(b)) => read_sectors(b, sector, writer),
        (VIRTIO_BLK_T_OUT, Some(_)) if read_only => return VIRTIO_BLK_S_IOERR,
        (VIRTIO_BLK_T_OUT, Some(b)) => write_sectors(b, sector, reader),
        (VIRTIO_BLK_T_FLUSH, Some(b)) => b.file.sync_data(),
        (VIRTIO_BLK_T_FLUSH, None) => Ok(()),
        (VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT, None) => return VIRTIO_BLK_S_IOERR,
        _ => return VIRTIO_BLK_S_UNSUPP,
    };
    match result {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(e) => {
            tracing::debug!(kind, sector, "virtio-blk request failed: {e}");
            VIRTIO_BLK_S_IOERR
        }
    }
}

/// Byte offset of `sector` for a transfer of `len` bytes, if it lies on the disk.
fn disk_offset(backing: &Backing, sector: u64, len: usize) -> io::Result<u64> {
    let start = sector.checked_mul(SECTOR_SIZE);
    let end = start.and_then(|s| s.checked_add(len as u64));
    match (start, end) {
        (Some(start), Some(end)) if end <= backing.sectors * SECTOR_SIZE => Ok(start),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("sector {sector} + {len} bytes is past the end of the disk"),
        )),
    }
}

fn read_sectors(
    backing: &Backing,
    sector: u64,
    writer: &mut virtio_queue::Writer,
) -> io::Result<()> {
    let len = writer.available_bytes();
    let offset = disk_offset(backing, sector, len)?;
    let mut buf = vec![0u8; len];
    backing.file.read_exact_at(&mut buf, offset)?;
    writer.write_all(&buf)
}

fn write_sectors(
    backing: &Backing,
    sector: u64,
    reader: &mut virtio_queue::Reader,
) -> io::Result<()> {
    let len = reader.available_bytes();
    let offset = disk_offset(backing, sector, len)?;
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf)?;
    backing.file.write_all_at(&buf, offset)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        super::TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn features(&self) -> u64 {
        let ro = if self.disk.read_only {
            VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_BLK_F_FLUSH | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.disk.info().sectors.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
        check_queues(&active, QUEUE_SIZES.len())?;
        self.active = Some(active);
        // Requests queued before activation would otherwise wait for a kick.
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            // Draining the counter only fails if it was already empty.
            let _ = self.queue_evts[0].read();
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evts[0], EventSet::IN)) {
            tracing::error!("virtio-blk: cannot watch the queue eventfd: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::devices::irq::IrqLine;
    use crate::devices::virtio::fake_driver::FakeQueue;
    use crate::devices::virtio::Interrupt;

    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    struct Driver {
        mem: GuestMemoryMmap,
        queue: FakeQueue,
        block: Block,
        _image: tempfile::NamedTempFile,
    }

    /// A block device over a 4-sector image whose sector n is filled with n.
    fn driver(read_only: bool) -> Driver {
        let mut image = tempfile::NamedTempFile::new().unwrap();
        for sector in 0..4u8 {
            image.write_all(&[sector; 512]).unwrap();
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let queue = FakeQueue::new(0x1000);
        let mut block = Block::new(Some(image.path()), read_only, "disk-id").unwrap();
        block
            .activate(ActiveQueues {
                mem: mem.clone(),
                queues: vec![queue.queue()],
                interrupt: Interrupt::new(IrqLine::new(5).unwrap()),
            })
            .unwrap();
        Driver {
            mem,
            queue,
            block,
            _image: image,
        }
    }

    impl Driver {
        /// Submits header + data + status; returns (status, used length).
        fn request(
            &mut self,
            kind: u32,
            sector: u64,
            data: &[u8],
            device_writes: bool,
        ) -> (u8, u32) {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
            self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let mut chain = vec![(HEADER, 16, false)];
            if !data.is_empty() {
                chain.push((DATA, data.len() as u32, device_writes));
            }
            chain.push((STATUS, 1, true));
            self.queue.add_chain(&self.mem, &chain);
            self.block.process_queue();
            let used = self.queue.take_used(&self.mem);
            assert_eq!(used.len(), 1);
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), used[0].1)
        }

        fn data(&self, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
            buf
        }

        fn image(&self) -> Vec<u8> {
            std::fs::read(self._image.path()).unwrap()
        }
    }

    #[test]
    fn reads_the_requested_sector() {
        let mut d = driver(true);
        let (status, used) = d.request(VIRTIO_BLK_T_IN, 2, &[0; 512], true);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert_eq!(used, 513);
        assert_eq!(d.data(512), vec![2u8; 512]);
    }

    #[test]
    fn writes_reach_the_image_and_flush_succeeds() {
        let mut d = driver(false);
        let (status, _) = d.request(VIRTIO_BLK_T_OUT, 1, &[0xab; 512], false);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert_eq!(d.image()[512..1024], [0xab; 512]);
        assert_eq!(
            d.request(VIRTIO_BLK_T_FLUSH, 0, &[], false).0,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn a_read_only_disk_refuses_writes_and_keeps_its_data() {
        let mut d = driver(true);
        let (status, _) = d.request(VIRTIO_BLK_T_OUT, 1, &[0xab; 512], false);
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        assert_eq!(d.image()[512..1024], [1u8; 512]);
        assert_ne!(d.block.features() & VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn requests_past_the_end_fail() {
        let mut d = driver(false);
        assert_eq!(
            d.request(VIRTIO_BLK_T_IN, 3, &[0; 1024], true).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            d.request(VIRTIO_BLK_T_IN, u64::MAX, &[0; 512], true).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            d.request(VIRTIO_BLK_T_OUT, 4, &[0; 512], false).0,
            VIRTIO_BLK_S_IOERR
        );
    }

    #[test]
    fn get_id_and_unknown_requests() {
        let mut d = driver(true);
        assert_eq!(
            d.request(VIRTIO_BLK_T_GET_ID, 0, &[0; 20], true).0,
            VIRTIO_BLK_S_OK
        );
        assert_eq!(&d.data(7), b"disk-id");
        assert_eq!(d.request(99, 0, &[], false).0, VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn an_empty_slot_fails_io_until_a_disk_is_attached() {
        let mut d = driver(true);
        let handle = d.block.handle();
        handle.set_backing(None).unwrap();
        assert_eq!(handle.info().sectors, 0);
        assert_eq!(
            d.request(VIRTIO_BLK_T_IN, 0, &[0; 512], true).0,
            VIRTIO_BLK_S_IOERR
        );
        handle.set_backing(Some((d._image.path(), None))).unwrap();
        assert_eq!(handle.info().sectors, 4);
        assert_eq!(
            d.request(VIRTIO_BLK_T_IN, 3, &[0; 512], true).0,
            VIRTIO_BLK_S_OK
        );
        assert!(handle
            .set_backing(Some((Path::new("/no/such/image"), None)))
            .is_err());
    }

    #[test]
    fn a_chain_without_room_for_status_is_returned_unused() {
        let mut d = driver(true);
        d.queue.add_chain(&d.mem, &[(HEADER, 16, false)]);
        d.block.process_queue();
        assert_eq!(d.queue.take_used(&d.mem), vec![(0, 0)]);
    }

    #[test]
    fn a_file_given_backs_the_slot_if_its_access_mode_fits() {
        let mut d = driver(false);
        let handle = d.block.handle();
        let named = Path::new("/seen/by/the/caller");
        let read_only = File::open(d._image.path()).unwrap();
        assert!(matches!(
            handle.set_backing(Some((named, Some(read_only)))),
            Err(BlockError::NotWritable { .. })
        ));
        let read_write = OpenOptions::new()
            .read(true)
            .write(true)
            .open(d._image.path())
            .unwrap();
        handle.set_backing(Some((named, Some(read_write)))).unwrap();
        assert_eq!(handle.info().path.as_deref(), Some(named));
        assert_eq!(
            d.request(VIRTIO_BLK_T_IN, 3, &[0; 512], true).0,
            VIRTIO_BLK_S_OK
        );
    }
}
