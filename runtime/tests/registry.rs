//! PullImage against a real registry on loopback (Debian's docker-registry),
//! with an image built here from Debian's busybox-static. Needs root (the
//! unpacker keeps ownership) and scripts/install-deps.sh's packages.

mod support;

use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use husk_runtime::image::{
    Credentials, ImageStore, PullError, RegistryConfig, RegistryHost, Removed, StoreError,
};
use support::{busybox_layer, image_config, push_image, push_single_platform_index, run, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_list_status_remove_against_a_real_registry() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("husk_runtime=info")
        .try_init();
    let registry = Registry::start();
    let host = registry.host();
    let layer = busybox_layer();
    let busybox = format!("{host}/husk/busybox:latest");
    let manifest_digest = push_image(
        &busybox,
        layer.clone(),
        image_config("amd64", &layer, "1000", &["/bin/sh", "-c", "echo hi"]),
    )
    .await;
    let arm_digest = push_image(
        &format!("{host}/husk/armonly:arm64-manifest"),
        layer.clone(),
        image_config("arm64", &layer, "", &["sh"]),
    )
    .await;
    push_single_platform_index(
        &format!("{host}/husk/armonly:latest"),
        &arm_digest,
        "linux",
        "arm64",
    )
    .await;

    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();
    let anon = Credentials::Anonymous;
    let config = RegistryConfig::default();

    // First pull: fetch, unpack, build the EROFS image.
    let started = Instant::now();
    let record = store.pull(&busybox, &anon, &config).await.unwrap();
    eprintln!("first pull: {:?}", started.elapsed());
    assert_eq!(record.repo_tags, std::slice::from_ref(&busybox));
    assert_eq!(
        record.repo_digests,
        [format!("{host}/husk/busybox@{manifest_digest}")]
    );
    assert_eq!(record.uid(), Some(1000));
    assert_eq!(record.cmd, ["/bin/sh", "-c", "echo hi"]);
    assert_eq!(record.working_dir, "/home/husk");
    assert_eq!(record.layers.len(), 1);
    assert!(record.size > 900_000, "size {}", record.size);

    let rootfs = store.rootfs_dir(&record.id);
    let busybox_meta = std::fs::metadata(rootfs.join("bin/busybox")).unwrap();
    assert_eq!(
        busybox_meta.len(),
        std::fs::metadata(support::BUSYBOX_BIN).unwrap().len()
    );
    assert_eq!(busybox_meta.mode() & 0o777, 0o755);
    assert_eq!(
        std::fs::read_link(rootfs.join("bin/sh")).unwrap().to_str(),
        Some("busybox")
    );

    // The EROFS image is sound and holds the same busybox.
    let erofs = store.erofs_path(&record.id);
    let extracted = tempfile::tempdir().unwrap();
    let target = extracted.path().join("x");
    run(
        "fsck.erofs",
        &[&format!("--extract={}", target.display()), &erofs],
    );
    assert_eq!(
        std::fs::read(target.join("bin/busybox")).unwrap(),
        std::fs::read(support::BUSYBOX_BIN).unwrap()
    );

    // list and status.
    let listed = store.list().unwrap();
    assert_eq!(listed, std::slice::from_ref(&record));
    for query in [
        busybox.clone(),
        format!("{host}/husk/busybox"),
        format!("{host}/husk/busybox@{manifest_digest}"),
        record.id.to_string(),
        record.id.hex().to_owned(),
        // The IMAGE ID crictl prints.
        record.id.hex()[..13].to_owned(),
    ] {
        assert_eq!(
            store.status(&query).unwrap().as_ref(),
            Some(&record),
            "{query}"
        );
    }
    assert_eq!(store.status(&format!("{host}/husk/other:1")).unwrap(), None);
    // A hex prefix of no id is no image.
    let other = if record.id.hex().starts_with('0') {
        "1"
    } else {
        "0"
    };
    assert_eq!(store.status(other).unwrap(), None);
    let usage = store.fs_info().unwrap();
    assert!(
        usage.used_bytes > 2 * 900_000 && usage.inodes_used > 10,
        "{usage:?}"
    );

    // Pulling again is a cache hit: nothing unpacked or rebuilt.
    let erofs_ino = std::fs::metadata(&erofs).unwrap().ino();
    let rootfs_ino = std::fs::metadata(&rootfs).unwrap().ino();
    let started = Instant::now();
    let again = store.pull(&busybox, &anon, &config).await.unwrap();
    eprintln!("cached pull: {:?}", started.elapsed());
    assert_eq!(again, record);
    assert_eq!(std::fs::metadata(&erofs).unwrap().ino(), erofs_ino);
    assert_eq!(std::fs::metadata(&rootfs).unwrap().ino(), rootfs_ino);

    // The records survive reopening the store.
    drop(store);
    let store = ImageStore::open(root.path()).unwrap();
    assert_eq!(store.list().unwrap(), std::slice::from_ref(&record));

    // An index with only linux/arm64.
    let err = store
        .pull(&format!("{host}/husk/armonly:latest"), &anon, &config)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Pull(PullError::NoMatchingPlatform { available, .. }) if available == &["linux/arm64"]),
        "{err}"
    );
    assert!(
        err.to_string().contains("husk/armonly:latest") && err.to_string().contains("linux/arm64"),
        "{err}"
    );
    // A plain arm64 manifest is caught by its config.
    let err = store
        .pull(
            &format!("{host}/husk/armonly:arm64-manifest"),
            &anon,
            &config,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Pull(PullError::NoMatchingPlatform { .. })),
        "{err}"
    );

    // Unknown tag and unknown repository.
    for missing in [
        format!("{host}/husk/busybox:nope"),
        format!("{host}/husk/nothing:latest"),
    ] {
        let err = store.pull(&missing, &anon, &config).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Pull(PullError::NotFound { .. })),
            "{err}"
        );
        assert!(err.to_string().contains(&missing), "{err}");
    }

    // A mirror that is down is skipped; the registry itself answers.
    let mut mirrored = RegistryConfig::default();
    mirrored.hosts.insert(
        host.clone(),
        RegistryHost {
            mirrors: vec![format!("http://127.0.0.1:{}", support::free_port())],
            insecure: false,
        },
    );
    assert_eq!(
        store.pull(&busybox, &anon, &mirrored).await.unwrap().id,
        record.id
    );

    // A mirror that works is used: the registry's own port is listed as the
    // mirror of a registry that does not exist.
    let mut only_mirror = RegistryConfig::default();
    let ghost = format!("127.0.0.1:{}", support::free_port());
    only_mirror.hosts.insert(
        ghost.clone(),
        RegistryHost {
            mirrors: vec![host.clone()],
            insecure: false,
        },
    );
    let via_mirror = store
        .pull(&format!("{ghost}/husk/busybox:latest"), &anon, &only_mirror)
        .await
        .unwrap();
    assert_eq!(via_mirror.id, record.id);
    assert!(via_mirror
        .repo_tags
        .contains(&format!("{ghost}/husk/busybox:latest")));

    // A mirror without the image, then a registry that is down: the error
    // is the registry's (unreachable), and says what the mirror answered.
    let missing = format!("{ghost}/husk/nothing:latest");
    let err = store.pull(&missing, &anon, &only_mirror).await.unwrap_err();
    let StoreError::Pull(pull) = &err else {
        panic!("{err}");
    };
    assert!(
        matches!(pull.deciding(), PullError::Unreachable { .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!("registry {ghost} is unreachable")),
        "{message}"
    );
    assert!(message.contains(&format!("mirror {host}")), "{message}");
    assert!(message.contains("not found"), "{message}");

    // In use: refused, and nothing changes.
    let err = store
        .remove(&record.id.to_string(), |_| true)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    assert!(erofs.is_file());

    // Untag the mirror's name: the image stays.
    let removed = store
        .remove(&format!("{ghost}/husk/busybox:latest"), |_| false)
        .await
        .unwrap();
    assert!(matches!(removed, Removed::Untagged(_)), "{removed:?}");
    assert!(erofs.is_file());

    // Remove the last tag: image, rootfs, EROFS image and blobs go.
    let removed = store.remove(&busybox, |_| false).await.unwrap();
    assert!(matches!(removed, Removed::Deleted(_)), "{removed:?}");
    assert!(!erofs.exists() && !rootfs.exists());
    assert!(!store.blobs().contains(&record.id));
    for l in &record.layers {
        assert!(!store.blobs().contains(&l.digest));
    }
    assert_eq!(store.list().unwrap(), []);
    assert_eq!(
        store.remove(&busybox, |_| false).await.unwrap(),
        Removed::NotFound
    );

    drop(registry);
}

#[tokio::test]
async fn a_closed_port_is_unreachable() {
    let root = tempfile::tempdir().unwrap();
    let store = ImageStore::open(root.path()).unwrap();
    let reference = format!("127.0.0.1:{}/husk/busybox:latest", support::free_port());
    let err = store
        .pull(
            &reference,
            &Credentials::Anonymous,
            &RegistryConfig::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Pull(PullError::Unreachable { .. })),
        "{err}"
    );
    assert!(err.to_string().contains(&reference), "{err}");
}
