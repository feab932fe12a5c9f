//! Unpacking real tarballs built here, honest and malicious ones. These need
//! root (ownership is applied with chown), as huskd does.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use tar::{EntryType, Header};

use super::*;

/// A tar layer built entry by entry. Paths and link names are written into
/// the header raw, so the test can make entries tar-rs would refuse to build.
struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn entry(
        mut self,
        kind: EntryType,
        path: &str,
        link: &str,
        data: &[u8],
        mode: u32,
        owner: (u64, u64),
    ) -> Self {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        {
            let old = header.as_old_mut();
            old.name[..path.len()].copy_from_slice(path.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_uid(owner.0);
        header.set_gid(owner.1);
        header.set_mtime(1_000_000_000);
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self
    }

    fn file(self, path: &str, data: &str) -> Self {
        self.entry(EntryType::Regular, path, "", data.as_bytes(), 0o644, (0, 0))
    }

    fn dir(self, path: &str) -> Self {
        self.entry(EntryType::Directory, path, "", b"", 0o755, (0, 0))
    }

    fn symlink(self, path: &str, target: &str) -> Self {
        self.entry(EntryType::Symlink, path, target, b"", 0o777, (0, 0))
    }

    fn hardlink(self, path: &str, target: &str) -> Self {
        self.entry(EntryType::Link, path, target, b"", 0o644, (0, 0))
    }

    fn tar(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

/// A scratch area: `rootfs/` to unpack into and `outside/`, which no layer
/// may ever touch.
struct Scratch {
    _dir: tempfile::TempDir,
    rootfs: PathBuf,
    outside: PathBuf,
}

fn scratch() -> Scratch {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("a/b/rootfs");
    let outside = dir.path().join("outside");
    fs::create_dir_all(&rootfs).unwrap();
    fs::create_dir_all(&outside).unwrap();
    Scratch {
        _dir: dir,
        rootfs,
        outside,
    }
}

fn apply(rootfs: &Path, layers: &[Vec<u8>]) -> Result<(), UnpackError> {
    let mut unpacker = Unpacker::new(rootfs)?;
    for (i, layer) in layers.iter().enumerate() {
        unpacker.apply(layer.as_slice(), &format!("layer{i}"))?;
    }
    unpacker.finish();
    Ok(())
}

fn assert_refused(result: Result<(), UnpackError>, entry: &str) {
    match result {
        Err(UnpackError::Unsafe { entry: e, .. }) if e == entry => {}
        other => panic!("expected entry {entry:?} to be refused, got {other:?}"),
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn dotdot_entries_are_refused() {
    let s = scratch();
    let layer = Layer::new()
        .file("ok", "x")
        .file("../escape", "pwned")
        .tar();
    assert_refused(apply(&s.rootfs, &[layer]), "../escape");
    assert!(!s.rootfs.parent().unwrap().join("escape").exists());
    let layer = Layer::new().file("a/../../escape2", "pwned").tar();
    assert_refused(apply(&s.rootfs, &[layer]), "a/../../escape2");
}

#[test]
fn absolute_entries_are_refused() {
    let s = scratch();
    let abs = format!("{}/abs", s.outside.display());
    let layer = Layer::new().file(&abs, "pwned").tar();
    assert_refused(apply(&s.rootfs, &[layer]), &abs);
    assert!(!s.outside.join("abs").exists());
    let layer = Layer::new().file("/abs/path", "pwned").tar();
    assert_refused(apply(&s.rootfs, &[layer]), "/abs/path");
}

#[test]
fn writing_through_a_symlink_of_the_same_layer_is_refused() {
    let s = scratch();
    let layer = Layer::new()
        .symlink("evil", s.outside.to_str().unwrap())
        .file("evil/file", "pwned")
        .tar();
    let err = apply(&s.rootfs, &[layer]).unwrap_err();
    assert!(err.to_string().contains("symlink evil"), "{err}");
    assert_refused(Err(err), "evil/file");
    assert!(!s.outside.join("file").exists());
    assert_eq!(listing(&s.outside), Vec::<String>::new());
}

#[test]
fn writing_through_a_symlink_of_a_lower_layer_is_refused() {
    let s = scratch();
    // A relative link climbing out of the rootfs, made in layer 0 ...
    let lower = Layer::new().symlink("evil", "../../../outside").tar();
    // ... and each kind of write through it in layer 1.
    for (kind, path, link) in [
        (EntryType::Regular, "evil/file", ""),
        (EntryType::Directory, "evil/dir", ""),
        (EntryType::Symlink, "evil/link", "/etc/passwd"),
        (EntryType::Link, "evil/hard", "evil"),
        (EntryType::Regular, "evil/.wh.x", ""),
        (EntryType::Regular, "evil/.wh..wh..opq", ""),
    ] {
        let upper = Layer::new()
            .entry(kind, path, link, b"", 0o644, (0, 0))
            .tar();
        assert_refused(apply(&s.rootfs, &[lower.clone(), upper]), path);
        assert_eq!(listing(&s.outside), Vec::<String>::new(), "{path}");
    }
    // A hardlink whose *target* runs through the symlink is refused too.
    fs::write(s.outside.join("secret"), "s").unwrap();
    let upper = Layer::new().hardlink("stolen", "evil/secret").tar();
    assert_refused(apply(&s.rootfs, &[lower, upper]), "stolen");
    assert!(!s.rootfs.join("stolen").exists());
}

#[test]
fn hardlinks_out_of_the_rootfs_are_refused() {
    let s = scratch();
    let layer = Layer::new().hardlink("passwd", "../../etc/passwd").tar();
    assert_refused(apply(&s.rootfs, &[layer]), "passwd");
    let layer = Layer::new().hardlink("passwd", "/etc/passwd").tar();
    assert_refused(apply(&s.rootfs, &[layer]), "passwd");
    assert!(!s.rootfs.join("passwd").exists());
}

#[test]
fn device_nodes_are_skipped_and_fifos_made() {
    let s = scratch();
    let layer = Layer::new()
        .entry(EntryType::Char, "dev/null", "", b"", 0o666, (0, 0))
        .entry(EntryType::Block, "dev/sda", "", b"", 0o660, (0, 6))
        .entry(EntryType::Fifo, "run/fifo", "", b"", 0o620, (7, 8))
        .file("after", "still unpacked")
        .tar();
    apply(&s.rootfs, &[layer]).unwrap();
    assert!(!s.rootfs.join("dev/null").exists());
    assert!(!s.rootfs.join("dev/sda").exists());
    let fifo = fs::symlink_metadata(s.rootfs.join("run/fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o620);
    assert_eq!((fifo.uid(), fifo.gid()), (7, 8));
    assert_eq!(
        fs::read_to_string(s.rootfs.join("after")).unwrap(),
        "still unpacked"
    );
}

#[test]
fn whiteouts_and_opaque_directories_hide_lower_layers_only() {
    let s = scratch();
    let lower = Layer::new()
        .file("a/keep", "1")
        .file("a/gone", "1")
        .dir("a/gonedir")
        .file("a/gonedir/inner", "1")
        .file("opq/lower", "1")
        .file("opq/sub/lower", "1")
        .file("opq/sub/also", "1")
        .tar();
    let upper = Layer::new()
        .file("a/.wh.gone", "")
        .file("a/.wh.gonedir", "")
        .file("a/.wh.never-existed", "")
        // Written before this layer's own whiteout of it: stays (spec: a
        // whiteout hides lower layers only).
        .file("a/same-layer", "2")
        .file("a/.wh.same-layer", "")
        // Written before the opaque marker, inside the opaque directory.
        .file("opq/sub/new", "2")
        .file("opq/.wh..wh..opq", "")
        .file("opq/after", "2")
        .tar();
    apply(&s.rootfs, &[lower, upper]).unwrap();
    assert_eq!(listing(&s.rootfs.join("a")), ["keep", "same-layer"]);
    assert_eq!(listing(&s.rootfs.join("opq")), ["after", "sub"]);
    assert_eq!(listing(&s.rootfs.join("opq/sub")), ["new"]);

    // A third layer whites out what the second wrote.
    let third = Layer::new().file("a/.wh.same-layer", "").tar();
    let mut unpacker = Unpacker::new(&s.rootfs).unwrap();
    unpacker.apply(third.as_slice(), "third").unwrap();
    assert_eq!(listing(&s.rootfs.join("a")), ["keep"]);
}

#[test]
fn later_layers_replace_files_dirs_and_links() {
    let s = scratch();
    let lower = Layer::new()
        .file("x", "file")
        .file("y/inner", "1")
        .symlink("z", "/etc")
        .file("orig", "shared")
        .hardlink("twin", "orig")
        .tar();
    let upper = Layer::new()
        .dir("x")
        .file("x/now-a-dir", "1")
        .file("y", "now a file")
        .file("z", "no longer a link")
        .file("orig", "replaced")
        .tar();
    apply(&s.rootfs, &[lower, upper]).unwrap();
    assert!(s.rootfs.join("x").is_dir());
    assert_eq!(
        fs::read_to_string(s.rootfs.join("y")).unwrap(),
        "now a file"
    );
    assert!(!fs::symlink_metadata(s.rootfs.join("z"))
        .unwrap()
        .is_symlink());
    // Replacing `orig` unlinked it: its lower hardlink twin keeps the old data.
    assert_eq!(
        fs::read_to_string(s.rootfs.join("orig")).unwrap(),
        "replaced"
    );
    assert_eq!(fs::read_to_string(s.rootfs.join("twin")).unwrap(), "shared");
}

#[test]
fn ownership_modes_mtimes_and_links_are_kept() {
    let s = scratch();
    let layer = Layer::new()
        .entry(EntryType::Directory, "srv/", "", b"", 0o750, (1000, 1001))
        .entry(
            EntryType::Regular,
            "srv/tool",
            "",
            b"#!/bin/sh\n",
            0o4755,
            (1234, 5678),
        )
        .entry(
            EntryType::Symlink,
            "srv/link",
            "/srv/tool",
            b"",
            0o777,
            (42, 43),
        )
        .hardlink("srv/tool2", "srv/tool")
        .entry(EntryType::Regular, "./dotted", "", b"d", 0o600, (0, 0))
        .tar();
    apply(&s.rootfs, &[layer]).unwrap();

    let dir = fs::metadata(s.rootfs.join("srv")).unwrap();
    assert_eq!(dir.mode() & 0o7777, 0o750);
    assert_eq!((dir.uid(), dir.gid()), (1000, 1001));
    assert_eq!(
        dir.mtime(),
        1_000_000_000,
        "directory mtime set after its children"
    );

    let tool = fs::metadata(s.rootfs.join("srv/tool")).unwrap();
    assert_eq!(tool.permissions().mode() & 0o7777, 0o4755, "setuid kept");
    assert_eq!((tool.uid(), tool.gid()), (1234, 5678));
    assert_eq!(tool.mtime(), 1_000_000_000);

    let link = fs::symlink_metadata(s.rootfs.join("srv/link")).unwrap();
    assert!(link.is_symlink());
    assert_eq!((link.uid(), link.gid()), (42, 43));
    assert_eq!(
        fs::read_link(s.rootfs.join("srv/link")).unwrap(),
        Path::new("/srv/tool")
    );

    let twin = fs::metadata(s.rootfs.join("srv/tool2")).unwrap();
    assert_eq!(twin.ino(), tool.ino());
    assert_eq!(tool.nlink(), 2);
    assert_eq!(fs::read(s.rootfs.join("dotted")).unwrap(), b"d");
}

#[test]
fn gzip_and_zstd_layers_are_detected_by_magic() {
    let s = scratch();
    let gz = {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&Layer::new().file("from-gzip", "g").tar())
            .unwrap();
        enc.finish().unwrap()
    };
    let zst = {
        let tar = Layer::new().file("from-zstd", "z").tar();
        let mut out = Vec::new();
        ruzstd::encoding::compress(
            tar.as_slice(),
            &mut out,
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        out
    };
    apply(&s.rootfs, &[gz, zst]).unwrap();
    assert_eq!(fs::read(s.rootfs.join("from-gzip")).unwrap(), b"g");
    assert_eq!(fs::read(s.rootfs.join("from-zstd")).unwrap(), b"z");
}

#[test]
fn blank_numeric_fields_mean_zero() {
    let s = scratch();
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::Regular);
    header.set_path("f").unwrap();
    header.set_mode(0o640);
    header.set_size(1);
    header.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&header, &b"x"[..]).unwrap();
    apply(&s.rootfs, &[b.into_inner().unwrap()]).unwrap();
    let meta = fs::metadata(s.rootfs.join("f")).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (0, 0, 0o640));
}

#[test]
fn a_corrupt_layer_is_an_archive_error() {
    let s = scratch();
    let mut tar = Layer::new().file("f", "x").tar();
    tar[148] ^= 0xff; // the header checksum
    match apply(&s.rootfs, &[tar]) {
        Err(UnpackError::Archive { layer, .. }) => assert_eq!(layer, "layer0"),
        other => panic!("expected an archive error, got {other:?}"),
    }
}
