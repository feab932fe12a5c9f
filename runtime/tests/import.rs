//! ImageStore::import of a `docker save` archive and of an OCI image layout
//! tarball, both built here. Needs root (the unpacker keeps ownership) and
//! mkfs.erofs.

use std::io::Write;

use husk_runtime::image::{Digest, ImageStore};
use sha2::Digest as _;

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, *data).expect("tar a file");
    }
    b.into_inner().expect("finish the tar")
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

fn config(user: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "User": user, "Cmd": ["/hello"] },
    }))
    .expect("encode the image config")
}

#[tokio::test]
async fn docker_save_archives_import() {
    let layer = tar_of(&[("hello", b"from docker save")]);
    let config = config("nobody");
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": "config.json",
        "RepoTags": ["husk/saved:1"],
        "Layers": ["abc/layer.tar"],
    }]))
    .unwrap();
    let archive = tar_of(&[
        ("manifest.json", &manifest),
        ("config.json", &config),
        ("abc/layer.tar", &layer),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("saved.tar");
    std::fs::write(&path, archive).unwrap();

    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let records = store.import(&path).await.unwrap();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.id, Digest::parse(&sha(&config)).unwrap());
    assert_eq!(r.repo_tags, ["docker.io/husk/saved:1"]);
    assert_eq!(r.username(), Some("nobody"));
    assert_eq!(
        std::fs::read(store.rootfs_dir(&r.id).join("hello")).unwrap(),
        b"from docker save"
    );
    assert!(store.erofs_path(&r.id).is_file());
    assert_eq!(store.status("husk/saved:1").unwrap().as_ref(), Some(r));
}

#[tokio::test]
async fn oci_layout_tarballs_import_and_bad_blobs_are_refused() {
    let layer = {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar_of(&[("etc/hostname", b"oci")])).unwrap();
        gz.finish().unwrap()
    };
    let config = config("1234");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(&layer), "size": layer.len() }],
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(&manifest), "size": manifest.len(),
            "annotations": { "io.containerd.image.name": "127.0.0.1:5000/husk/oci:v1", "org.opencontainers.image.ref.name": "v1" },
        }],
    }))
    .unwrap();
    let blob = |d: &[u8]| format!("blobs/sha256/{}", &sha(d)["sha256:".len()..]);
    let (mb, cb, lb) = (blob(&manifest), blob(&config), blob(&layer));
    let layout = |layer_bytes: &[u8]| {
        tar_of(&[
            ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
            ("index.json", &index),
            (&mb, &manifest),
            (&cb, &config),
            (&lb, layer_bytes),
        ])
    };
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path().join("store")).unwrap();

    // A layer whose bytes do not match its digest never enters the store.
    let bad = dir.path().join("bad.tar");
    std::fs::write(&bad, layout(b"not the layer")).unwrap();
    let err = store.import(&bad).await.unwrap_err();
    assert!(
        err.to_string().contains("does not match its digest"),
        "{err}"
    );
    assert_eq!(store.list().unwrap(), []);

    let good = dir.path().join("good.tar");
    std::fs::write(&good, layout(&layer)).unwrap();
    let records = store.import(&good).await.unwrap();
    let r = &records[0];
    assert_eq!(r.repo_tags, ["127.0.0.1:5000/husk/oci:v1"]);
    assert_eq!(
        r.repo_digests,
        [format!("127.0.0.1:5000/husk/oci@{}", sha(&manifest))]
    );
    assert_eq!(r.uid(), Some(1234));
    assert_eq!(
        std::fs::read(store.rootfs_dir(&r.id).join("etc/hostname")).unwrap(),
        b"oci"
    );
}
