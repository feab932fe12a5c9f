//! The image store: blobs by digest, one unpacked rootfs and one EROFS image
//! per image, and the image records in an embedded database.
//!
//! ```text
//! <root>/blobs/sha256/<hex>           verified blobs (manifests, configs, layers)
//! <root>/images/<id hex>/rootfs/      the unpacked layers (the host driver mounts it)
//! <root>/images/<id hex>/rootfs.erofs the VM's read-only disk
//! <root>/images.redb                  image records, keyed by id
//! ```
//!
//! Records are few (hundreds at most), so tag and digest look-ups scan them
//! rather than keep index tables in step.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tracing::{info, warn};

use super::blobs::{BlobError, BlobStore, Digest};
use super::fsimage::{ensure_erofs, FsImageError};
use super::pull::{fetch, Credentials, FetchedImage, PullError, RegistryConfig};
use super::record::{ImageConfigFile, ImageId, ImageRecord, LayerRecord};
use super::reference::{ImageReference, ReferenceError};
use super::unpack::{unpack_layers, UnpackError};

const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("image id prefix {prefix:?} is ambiguous: {count} image ids start with it")]
    AmbiguousId { prefix: String, count: usize },
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("unpacking {name} (image {image}): {source}")]
    Unpack {
        /// The tag or digest reference it arrived by, else its id.
        name: String,
        image: ImageId,
        #[source]
        source: Box<UnpackError>,
    },
    #[error("image {image}: {source}")]
    FsImage {
        image: ImageId,
        #[source]
        source: FsImageError,
    },
    #[error("image {image}: malformed config: {source}")]
    Config {
        image: ImageId,
        #[source]
        source: serde_json::Error,
    },
    #[error("image database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("image record {id} in the database is corrupt: {source}")]
    Record {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("image store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {id} ({reference}) is in use by a container")]
    InUse { id: ImageId, reference: String },
    #[error("importing {path}: {detail}")]
    Import { path: PathBuf, detail: String },
    #[error("an image store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What `remove` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    /// Nothing matched: CRI's RemoveImage is idempotent.
    NotFound,
    /// A tag or digest went; the image stays, named otherwise.
    Untagged(ImageRecord),
    /// The image went, with its rootfs, filesystem image and every blob no
    /// other image holds.
    Deleted(ImageRecord),
}

/// Space the store uses, for CRI's ImageFsInfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    pub used_bytes: u64,
    pub inodes_used: u64,
}

/// The image store. Cheap to clone; clones share one database.
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    db_path: PathBuf,
    blobs: BlobStore,
    db: redb::Database,
    /// Pulls and imports hold it shared, removal exclusively: a removal's blob
    /// collection must not delete a blob a pull has just found present.
    gc: tokio::sync::RwLock<()>,
}

/// How an image was named when it arrived.
pub(crate) struct Names {
    pub(crate) repo_tag: Option<String>,
    pub(crate) repo_digest: Option<String>,
}

impl ImageStore {
    /// Opens (creating) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let images = root.join("images");
        fs::create_dir_all(&images).map_err(io_err(&images))?;
        let blobs = BlobStore::open(&root)?;
        let db_path = root.join("images.redb");
        let db = redb::Database::create(&db_path).map_err(|e| StoreError::Db {
            path: db_path.clone(),
            source: e.into(),
        })?;
        let store = Self {
            inner: Arc::new(Inner {
                root,
                db_path,
                blobs,
                db,
                gc: tokio::sync::RwLock::new(()),
            }),
        };
        // Make sure the table exists, so readers never meet a missing one.
        store.write(|_| Ok(()))?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    /// The unpacked rootfs of image `id` (the host sandbox driver mounts it).
    pub fn rootfs_dir(&self, id: &ImageId) -> PathBuf {
        self.image_dir(id).join("rootfs")
    }

    /// The read-only EROFS image of image `id` (a VM's virtio-blk disk).
    pub fn erofs_path(&self, id: &ImageId) -> PathBuf {
        self.image_dir(id).join("rootfs.erofs")
    }

    fn image_dir(&self, id: &ImageId) -> PathBuf {
        self.inner.root.join("images").join(id.hex())
    }

    /// PullImage: fetches `reference`, unpacks it and builds its filesystem
    /// image (each only once: blobs, rootfs and EROFS image already there are
    /// reused), and records it under the reference's tag and digest.
    #[tracing::instrument(skip(self, credentials, config))]
    pub async fn pull(
        &self,
        reference: &str,
        credentials: &Credentials,
        config: &RegistryConfig,
    ) -> Result<ImageRecord, StoreError> {
        let reference = ImageReference::parse(reference)?;
        let pulled = self
            .unswept(async {
                let fetched = fetch(&reference, credentials, config, &self.inner.blobs).await?;
                let names = Names {
                    repo_tag: reference.repo_tag(),
                    repo_digest: Some(reference.repo_digest(fetched.resolved_digest.as_str())),
                };
                let store = self.clone();
                tokio::task::spawn_blocking(move || store.materialise(&fetched, names)).await?
            })
            .await;
        if let Ok(record) = &pulled {
            info!(id = %record.id, size = record.size, "image ready");
        }
        pulled
    }

    /// Every image.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.read_all()
    }

    /// The image `query` names: an id (`sha256:<hex>` or the bare hex), a
    /// tag reference or a digest reference, in any form kubelet passes.
    pub fn status(&self, query: &str) -> Result<Option<ImageRecord>, StoreError> {
        let records = self.read_all()?;
        Ok(find(&records, query)?.map(|(r, _)| r.clone()))
    }

    /// RemoveImage. By id, the whole image goes. By tag or digest, that name
    /// goes, and the image with it once it has no tag left (its repo digests
    /// say where it came from; they do not keep it). Removing an image a
    /// container uses fails with `InUse`: huskd passes `in_use`, which says
    /// whether any container was created from an image id.
    pub async fn remove(
        &self,
        query: &str,
        in_use: impl Fn(&ImageId) -> bool + Send + 'static,
    ) -> Result<Removed, StoreError> {
        let _exclusive = self.inner.gc.write().await;
        let store = self.clone();
        let query = query.to_owned();
        tokio::task::spawn_blocking(move || store.remove_blocking(&query, in_use)).await?
    }

    fn remove_blocking(
        &self,
        query: &str,
        in_use: impl Fn(&ImageId) -> bool,
    ) -> Result<Removed, StoreError> {
        let outcome = self.write(|table| {
            let records = read_table(table)?;
            let Some((record, matched)) = find(&records, query)? else {
                return Ok(Removed::NotFound);
            };
            let mut kept = record.clone();
            match &matched {
                Match::Id => {
                    kept.repo_tags.clear();
                    kept.repo_digests.clear();
                }
                Match::Tag(t) => kept.repo_tags.retain(|x| x != t),
                Match::Digest(d) => kept.repo_digests.retain(|x| x != d),
            }
            let delete = kept.repo_tags.is_empty()
                && (matches!(matched, Match::Id | Match::Tag(_)) || kept.repo_digests.is_empty());
            if delete {
                if in_use(&record.id) {
                    return Err(StoreError::InUse {
                        id: record.id.clone(),
                        reference: query.to_owned(),
                    });
                }
                table
                    .remove(record.id.as_str())
                    .map_err(|e| self.db_err(e))?;
                Ok(Removed::Deleted(record.clone()))
            } else {
                put_record(table, &kept).map_err(|e| self.db_err(e))?;
                Ok(Removed::Untagged(kept))
            }
        })?;
        if let Removed::Deleted(record) = &outcome {
            self.sweep()?;
            info!(id = %record.id, "image deleted");
        }
        Ok(outcome)
    }

    /// Deletes every image directory and blob that no image record holds:
    /// a removed image's, and whatever failed pulls and imports (or a crash)
    /// left. The caller holds the store exclusively, so nothing is half way.
    fn sweep(&self) -> Result<(), StoreError> {
        let records = self.read_all()?;
        let held: HashSet<&str> = records
            .iter()
            .flat_map(|r| r.blobs())
            .map(Digest::hex)
            .collect();
        self.inner.blobs.retain(|name| held.contains(name))?;
        let images = self.inner.root.join("images");
        let ids: HashSet<&str> = records.iter().map(|r| r.id.hex()).collect();
        for entry in fs::read_dir(&images).map_err(io_err(&images))? {
            let dir = entry.map_err(io_err(&images))?.path();
            let held = dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| ids.contains(n));
            if !held {
                // std's remove_dir_all never follows symlinks.
                match fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&dir)(e)),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Bytes and inodes used under the store's root (hardlinks counted once).
    pub fn fs_info(&self) -> Result<FsUsage, StoreError> {
        let mut seen = HashSet::new();
        let mut usage = FsUsage {
            used_bytes: 0,
            inodes_used: 0,
        };
        let mut stack = vec![self.inner.root.clone()];
        while let Some(path) = stack.pop() {
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                // Gone while we walked: a concurrent removal.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            if seen.insert((meta.dev(), meta.ino())) {
                usage.inodes_used += 1;
                usage.used_bytes += meta.blocks() * 512;
            }
            if meta.is_dir() {
                let entries = match fs::read_dir(&path) {
                    Ok(e) => e,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(&path)(e)),
                };
                for entry in entries {
                    stack.push(entry.map_err(io_err(&path))?.path());
                }
            }
        }
        Ok(usage)
    }

    /// Runs a pull's or an import's `work` while no garbage sweep runs (it
    /// stores blobs that no image holds until it ends); after a failure,
    /// sweeps what it may have left, later.
    pub(super) async fn unswept<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let done = async {
            let _shared = self.inner.gc.read().await;
            work.await
        }
        .await;
        if done.is_err() {
            self.collect_garbage_later();
        }
        done
    }

    /// After a failed pull or import, which may have stored blobs and an
    /// unpack directory that no image holds: sweeps them in the background
    /// (as containerd's GC does once a pull's lease ends), since the sweep
    /// waits until no other pull or import is half way.
    fn collect_garbage_later(&self) {
        let store = self.clone();
        tokio::spawn(async move {
            let _exclusive = store.inner.gc.write().await;
            let sweeper = store.clone();
            match tokio::task::spawn_blocking(move || sweeper.sweep()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!("collecting what a failed pull left: {e}"),
                Err(e) => warn!("collecting what a failed pull left: {e}"),
            }
        });
    }

    /// Unpacks, builds the filesystem image and records an image whose blobs
    /// are all in the blob store.
    pub(crate) fn materialise(
        &self,
        fetched: &FetchedImage,
        names: Names,
    ) -> Result<ImageRecord, StoreError> {
        let id = fetched.config_digest.clone();
        let config_bytes = self.inner.blobs.read(&id)?;
        let config: ImageConfigFile =
            serde_json::from_slice(&config_bytes).map_err(|source| StoreError::Config {
                image: id.clone(),
                source,
            })?;
        let name = names
            .repo_tag
            .as_ref()
            .or(names.repo_digest.as_ref())
            .map_or_else(|| id.to_string(), String::clone);
        self.ensure_rootfs(&id, &name, &fetched.layers)?;
        ensure_erofs(&self.rootfs_dir(&id), &self.erofs_path(&id)).map_err(|source| {
            StoreError::FsImage {
                image: id.clone(),
                source,
            }
        })?;

        let c = config.config.unwrap_or_default();
        let fresh = ImageRecord {
            id: id.clone(),
            repo_tags: names.repo_tag.iter().cloned().collect(),
            repo_digests: names.repo_digest.iter().cloned().collect(),
            manifest_digest: fetched.manifest_digest.clone(),
            index_digest: fetched.index_digest.clone(),
            size: fetched.config_size + fetched.layers.iter().map(|l| l.size).sum::<u64>(),
            user: c.user.unwrap_or_default(),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            stop_signal: c.stop_signal,
            layers: fetched.layers.clone(),
        };
        self.write(|table| {
            let mut records = read_table(table)?;
            // A tag names one image: it moves here from wherever it was. The
            // image it leaves keeps its digests (listed untagged, as
            // containerd does) until kubelet's GC removes it by id.
            if let Some(tag) = &names.repo_tag {
                for other in records.iter_mut().filter(|r| r.id != id) {
                    if other.repo_tags.contains(tag) {
                        other.repo_tags.retain(|t| t != tag);
                        put_record(table, other).map_err(|e| self.db_err(e))?;
                    }
                }
            }
            let record = match records.into_iter().find(|r| r.id == id) {
                Some(mut existing) => {
                    let tags: BTreeSet<_> = existing
                        .repo_tags
                        .drain(..)
                        .chain(fresh.repo_tags)
                        .collect();
                    let digests: BTreeSet<_> = existing
                        .repo_digests
                        .drain(..)
                        .chain(fresh.repo_digests)
                        .collect();
                    existing.repo_tags = tags.into_iter().collect();
                    existing.repo_digests = digests.into_iter().collect();
                    existing
                }
                None => fresh,
            };
            put_record(table, &record).map_err(|e| self.db_err(e))?;
            Ok(record)
        })
    }

    /// Unpacks the layers into `images/<id>/rootfs` unless that exists. The
    /// unpack goes to a temp dir renamed into place, so a rootfs that exists
    /// is complete.
    fn ensure_rootfs(
        &self,
        id: &ImageId,
        name: &str,
        layers: &[LayerRecord],
    ) -> Result<(), StoreError> {
        let dest = self.rootfs_dir(id);
        if dest.is_dir() {
            return Ok(());
        }
        let dir = self.image_dir(id);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let tmp = tempfile::Builder::new()
            .prefix(".rootfs.tmp-")
            .tempdir_in(&dir)
            .map_err(io_err(&dir))?;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))
            .map_err(io_err(tmp.path()))?;
        let started = std::time::Instant::now();
        let paths: Vec<(String, PathBuf)> = layers
            .iter()
            .map(|l| (l.digest.to_string(), self.inner.blobs.path(&l.digest)))
            .collect();
        unpack_layers(
            tmp.path(),
            paths.iter().map(|(d, p)| (d.as_str(), p.as_path())),
        )
        .map_err(|source| StoreError::Unpack {
            name: name.to_owned(),
            image: id.clone(),
            source: Box::new(source),
        })?;
        let tmp = tmp.keep();
        if let Err(e) = fs::rename(&tmp, &dest) {
            // Another pull of the same image got there first: keep theirs.
            let _ = fs::remove_dir_all(&tmp);
            if !dest.is_dir() {
                return Err(io_err(&dest)(e));
            }
        }
        info!(%id, layers = layers.len(), elapsed_ms = started.elapsed().as_millis() as u64, "rootfs unpacked");
        Ok(())
    }

    fn read_all(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(IMAGES).map_err(|e| self.db_err(e))?;
        read_table(&table)
    }

    /// Runs `f` in one write transaction, committed if `f` succeeds.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut redb::Table<'_, &'static str, &'static [u8]>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.inner.db.begin_write().map_err(|e| self.db_err(e))?;
        let out = {
            let mut table = txn.open_table(IMAGES).map_err(|e| self.db_err(e))?;
            f(&mut table)?
        };
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(out)
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.inner.db_path.clone(),
            source: e.into(),
        }
    }
}

fn put_record(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    record: &ImageRecord,
) -> Result<(), redb::StorageError> {
    // Serialising our own plain struct to JSON cannot fail.
    let json = serde_json::to_vec(record).unwrap_or_default();
    table.insert(record.id.as_str(), json.as_slice())?;
    Ok(())
}

fn read_table(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<ImageRecord>, StoreError> {
    let db = |e: redb::StorageError| StoreError::Db {
        path: PathBuf::from("images.redb"),
        source: e.into(),
    };
    let mut out = Vec::new();
    for row in table.iter().map_err(db)? {
        let (key, value) = row.map_err(db)?;
        let record =
            serde_json::from_slice(value.value()).map_err(|source| StoreError::Record {
                id: key.value().to_owned(),
                source,
            })?;
        out.push(record);
    }
    Ok(out)
}

/// How a query matched a record.
enum Match {
    Id,
    Tag(String),
    Digest(String),
}

fn find<'a>(
    records: &'a [ImageRecord],
    query: &str,
) -> Result<Option<(&'a ImageRecord, Match)>, StoreError> {
    let as_id = if query.len() == 64 && query.bytes().all(|b| b.is_ascii_hexdigit()) {
        Digest::parse(&format!("sha256:{}", query.to_ascii_lowercase())).ok()
    } else {
        Digest::parse(query).ok()
    };
    if let Some(id) = as_id {
        return Ok(records.iter().find(|r| r.id == id).map(|r| (r, Match::Id)));
    }
    let reference = ImageReference::parse(query)?;
    if let Some(digest) = reference.digest() {
        let name = reference.repo_digest(digest);
        return Ok(records
            .iter()
            .find(|r| r.repo_digests.contains(&name))
            .map(|r| (r, Match::Digest(name.clone()))));
    }
    let tagged = reference.repo_tag().and_then(|tag| {
        records
            .iter()
            .find(|r| r.repo_tags.contains(&tag))
            .map(|r| (r, Match::Tag(tag.clone())))
    });
    if tagged.is_some() {
        return Ok(tagged);
    }
    // What crictl prints as IMAGE ID: the first 13 hex digits of the id.
    // A name wins over an id prefix, as in containerd.
    if !query.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let prefix = query.to_ascii_lowercase();
    let mut matching = records.iter().filter(|r| r.id.hex().starts_with(&prefix));
    match (matching.next(), matching.count()) {
        (None, _) => Ok(None),
        (Some(record), 0) => Ok(Some((record, Match::Id))),
        (Some(_), more) => Err(StoreError::AmbiguousId {
            prefix,
            count: more + 1,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(config: &[u8], tag: &str) -> ImageRecord {
        ImageRecord {
            repo_tags: vec![tag.to_owned()],
            ..ImageRecord::bare(config)
        }
    }

    #[test]
    fn ids_match_by_unique_hex_prefix_after_names() {
        let records: Vec<ImageRecord> = (0u8..40)
            .map(|i| record(&[i], &format!("docker.io/library/i{i}:latest")))
            .collect();
        let first = &records[0];
        let found = |query: &str| find(&records, query).map(|hit| hit.map(|(r, _)| r.id.clone()));
        assert_eq!(
            found(&first.id.hex()[..13]).unwrap(),
            Some(first.id.clone())
        );
        // 40 ids over 16 first digits: some digit starts two of them.
        let shared = (0..16)
            .map(|d| format!("{d:x}"))
            .find(|d| {
                records
                    .iter()
                    .filter(|r| r.id.hex().starts_with(d.as_str()))
                    .count()
                    > 1
            })
            .expect("a shared first digit");
        assert!(matches!(
            found(&shared),
            Err(StoreError::AmbiguousId { .. })
        ));
        // A name wins over an id prefix.
        assert_eq!(found("i1").unwrap(), Some(records[1].id.clone()));
    }
}
