//! Importing images from a tarball: an OCI image layout (`oci-layout`,
//! `index.json`, `blobs/sha256/...`) or a `docker save` archive
//! (`manifest.json` naming a config and layer tarballs). Newer `docker save`
//! writes both; the OCI layout is preferred then.
//!
//! The archive is untrusted like any layer, so it is extracted by the layer
//! unpacker with the same rules, and every blob is verified on its way into
//! the blob store.

use std::fs::{self, File};
use std::io;
use std::path::{Component, Path, PathBuf};

use oci_client::manifest::{self as mt, OciImageManifest, OciManifest};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tracing::info;

use super::blobs::Digest;
use super::pull::{choose_platform, FetchedImage};
use super::record::{ImageRecord, LayerRecord};
use super::reference::ImageReference;
use super::store::{ImageStore, Names, StoreError};
use super::unpack::unpack_layers;

impl ImageStore {
    /// Imports an OCI image layout tarball or a `docker save` archive
    /// (plain or gzip); returns the images it held.
    pub async fn import(&self, tarball: &Path) -> Result<Vec<ImageRecord>, StoreError> {
        let store = self.clone();
        let tarball = tarball.to_owned();
        self.unswept(async move {
            tokio::task::spawn_blocking(move || import_tarball(&store, &tarball)).await?
        })
        .await
    }
}

/// The annotation containerd's export writes with the full image name.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI annotation: a tag, or (as skopeo and others write) a full name.
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The work of [`ImageStore::import`], on a blocking thread.
fn import_tarball(store: &ImageStore, tarball: &Path) -> Result<Vec<ImageRecord>, StoreError> {
    let fail = |detail: String| StoreError::Import {
        path: tarball.to_owned(),
        detail,
    };
    let tmp = tempfile::Builder::new()
        .prefix(".import-")
        .tempdir_in(store.root())
        .map_err(|e| fail(format!("making a scratch directory: {e}")))?;
    let name = tarball.display().to_string();
    unpack_layers(tmp.path(), [(name.as_str(), tarball)]).map_err(|e| fail(e.to_string()))?;

    let dir = tmp.path();
    let records = if dir.join("index.json").is_file() {
        import_oci_layout(store, dir, &fail)?
    } else if dir.join("manifest.json").is_file() {
        import_docker_save(store, dir, &fail)?
    } else {
        return Err(fail(
            "neither an OCI layout (index.json) nor a docker save archive (manifest.json)".into(),
        ));
    };
    info!(tarball = %tarball.display(), images = records.len(), "imported");
    Ok(records)
}

fn import_oci_layout(
    store: &ImageStore,
    dir: &Path,
    fail: &dyn Fn(String) -> StoreError,
) -> Result<Vec<ImageRecord>, StoreError> {
    let index: oci_client::manifest::OciImageIndex = read_json(dir, "index.json", fail)?;
    let mut out = Vec::new();
    for entry in &index.manifests {
        let top = Digest::parse(&entry.digest)?;
        let (manifest_digest, index_digest, manifest) = match load_manifest(store, dir, &top, fail)?
        {
            OciManifest::Image(m) => (top.clone(), None, m),
            OciManifest::ImageIndex(inner) => {
                let chosen = choose_platform(&inner).map_err(|available| {
                    fail(format!(
                        "{top}: no manifest for linux/amd64; it has: {}",
                        available.join(", ")
                    ))
                })?;
                let digest = Digest::parse(&chosen.digest)?;
                match load_manifest(store, dir, &digest, fail)? {
                    OciManifest::Image(m) => (digest, Some(top.clone()), m),
                    OciManifest::ImageIndex(_) => {
                        return Err(fail(format!("{digest}: an index nested in an index")))
                    }
                }
            }
        };
        let fetched = store_image_blobs(
            store,
            dir,
            &manifest,
            manifest_digest,
            index_digest,
            &top,
            fail,
        )?;
        let annotations = entry.annotations.clone().unwrap_or_default();
        let reference = [CONTAINERD_NAME, OCI_REF_NAME]
            .iter()
            .filter_map(|k| annotations.get(*k))
            // A bare tag ("1.36") names no repository: such images come in untagged.
            .filter(|v| v.contains('/') || v.contains(':'))
            .find_map(|v| ImageReference::parse(v).ok());
        let names = Names {
            repo_tag: reference.as_ref().and_then(|r| r.repo_tag()),
            repo_digest: reference.as_ref().map(|r| r.repo_digest(top.as_str())),
        };
        out.push(store.materialise(&fetched, names)?);
    }
    Ok(out)
}

fn load_manifest(
    store: &ImageStore,
    dir: &Path,
    digest: &Digest,
    fail: &dyn Fn(String) -> StoreError,
) -> Result<OciManifest, StoreError> {
    copy_blob(store, dir, digest, fail)?;
    let bytes = store.blobs().read(digest)?;
    serde_json::from_slice(&bytes).map_err(|e| fail(format!("manifest {digest}: {e}")))
}

fn store_image_blobs(
    store: &ImageStore,
    dir: &Path,
    manifest: &OciImageManifest,
    manifest_digest: Digest,
    index_digest: Option<Digest>,
    top: &Digest,
    fail: &dyn Fn(String) -> StoreError,
) -> Result<FetchedImage, StoreError> {
    let config_digest = Digest::parse(&manifest.config.digest)?;
    copy_blob(store, dir, &config_digest, fail)?;
    let mut layers = Vec::new();
    for layer in &manifest.layers {
        if !super::pull::LAYER_MEDIA_TYPES.contains(&layer.media_type.as_str()) {
            return Err(fail(format!(
                "unsupported layer media type {:?}",
                layer.media_type
            )));
        }
        let digest = Digest::parse(&layer.digest)?;
        copy_blob(store, dir, &digest, fail)?;
        layers.push(LayerRecord {
            digest,
            media_type: layer.media_type.clone(),
            size: u64::try_from(layer.size).unwrap_or(0),
        });
    }
    Ok(FetchedImage {
        resolved_digest: top.clone(),
        manifest_digest,
        index_digest,
        config_digest,
        config_size: u64::try_from(manifest.config.size).unwrap_or(0),
        layers,
    })
}

/// Copies `blobs/sha256/<hex>` of the layout into the store, verifying it.
fn copy_blob(
    store: &ImageStore,
    dir: &Path,
    digest: &Digest,
    fail: &dyn Fn(String) -> StoreError,
) -> Result<(), StoreError> {
    let path = dir.join("blobs/sha256").join(digest.hex());
    let file = open_regular(&path).map_err(|e| fail(format!("blob {digest}: {e}")))?;
    store.blobs().put_reader(digest, file)?;
    Ok(())
}

/// One entry of a `docker save` manifest.json.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn import_docker_save(
    store: &ImageStore,
    dir: &Path,
    fail: &dyn Fn(String) -> StoreError,
) -> Result<Vec<ImageRecord>, StoreError> {
    let entries: Vec<DockerSaveEntry> = read_json(dir, "manifest.json", fail)?;
    let mut out = Vec::new();
    for entry in entries {
        let config_path = archive_path(dir, &entry.config, fail)?;
        let config = fs::read(&config_path).map_err(|e| fail(format!("{}: {e}", entry.config)))?;
        let config_digest = Digest::of(&config);
        store.blobs().put_bytes(&config_digest, &config)?;
        let mut layers = Vec::new();
        for layer in &entry.layers {
            let path = archive_path(dir, layer, fail)?;
            let (digest, size) = hash_file(&path).map_err(|e| fail(format!("{layer}: {e}")))?;
            let file = open_regular(&path).map_err(|e| fail(format!("{layer}: {e}")))?;
            store.blobs().put_reader(&digest, file)?;
            layers.push(LayerRecord {
                digest,
                media_type: mt::IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE.to_owned(),
                size,
            });
        }
        // docker save carries no registry manifest: write the one a registry
        // would have served, so every image has one.
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": mt::IMAGE_MANIFEST_MEDIA_TYPE,
            "config": {
                "mediaType": mt::IMAGE_DOCKER_CONFIG_MEDIA_TYPE,
                "digest": config_digest.as_str(),
                "size": config.len(),
            },
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": l.media_type, "digest": l.digest.as_str(), "size": l.size,
            })).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest).unwrap_or_default();
        let manifest_digest = Digest::of(&manifest);
        store.blobs().put_bytes(&manifest_digest, &manifest)?;
        let fetched = FetchedImage {
            resolved_digest: manifest_digest.clone(),
            manifest_digest,
            index_digest: None,
            config_digest,
            config_size: config.len() as u64,
            layers,
        };
        let tags = entry.repo_tags.unwrap_or_default();
        let mut record = store.materialise(
            &fetched,
            Names {
                repo_tag: None,
                repo_digest: None,
            },
        )?;
        for tag in tags {
            let reference = ImageReference::parse(&tag)?;
            record = store.materialise(
                &fetched,
                Names {
                    repo_tag: reference.repo_tag(),
                    repo_digest: None,
                },
            )?;
        }
        out.push(record);
    }
    Ok(out)
}

fn read_json<T: serde::de::DeserializeOwned>(
    dir: &Path,
    name: &str,
    fail: &dyn Fn(String) -> StoreError,
) -> Result<T, StoreError> {
    let file = open_regular(&dir.join(name)).map_err(|e| fail(format!("{name}: {e}")))?;
    serde_json::from_reader(io::BufReader::new(file)).map_err(|e| fail(format!("{name}: {e}")))
}

/// A path named inside the archive, below `dir`, through no symlink.
fn archive_path(
    dir: &Path,
    rel: &str,
    fail: &dyn Fn(String) -> StoreError,
) -> Result<PathBuf, StoreError> {
    let mut path = dir.to_owned();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(name) => {
                path.push(name);
                if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Err(fail(format!("{rel:?} runs through a symlink")));
                }
            }
            Component::CurDir => {}
            _ => return Err(fail(format!("{rel:?} points outside the archive"))),
        }
    }
    Ok(path)
}

/// Opens a regular file, refusing a symlink in its place.
fn open_regular(path: &Path) -> io::Result<File> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    File::open(path)
}

fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    let mut hasher = Sha256::new();
    let mut file = open_regular(path)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let digest = Digest::parse(&format!("sha256:{}", hex::encode(hasher.finalize())))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((digest, size))
}
