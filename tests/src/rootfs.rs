//! Container images for end-to-end tests: a busybox rootfs directory (as the
//! agent's host-side container tests build it) and that directory packed into
//! an EROFS image, the form huskd hands a pod's guest as a read-only disk.

use std::path::Path;
use std::process::Command;

/// Debian's static busybox (package busybox-static).
pub const BUSYBOX: &str = "/bin/busybox";

/// Fills `dir` (existing, empty) with a rootfs of Debian's static busybox: the
/// binary, a link per applet in /bin, the usual top-level directories and an
/// /etc/passwd with root.
pub fn busybox_rootfs(dir: &Path) -> Result<(), String> {
    if !Path::new(BUSYBOX).exists() {
        return Err(format!(
            "{BUSYBOX} is missing: run scripts/install-deps.sh (Debian's busybox-static)"
        ));
    }
    let io = |what: String| move |e: std::io::Error| format!("{what}: {e}");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).map_err(io(format!("creating {}", bin.display())))?;
    std::fs::copy(BUSYBOX, bin.join("busybox")).map_err(io(format!("copying {BUSYBOX}")))?;
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .map_err(io(format!("running {BUSYBOX} --list")))?;
    if !list.status.success() {
        return Err(format!("{BUSYBOX} --list failed: {}", list.status));
    }
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet))
                .map_err(io(format!("linking applet {applet}")))?;
        }
    }
    for d in ["etc", "tmp", "proc", "sys", "dev", "root"] {
        std::fs::create_dir_all(dir.join(d)).map_err(io(format!("creating /{d}")))?;
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(io("writing /etc/passwd".into()))?;
    Ok(())
}

/// Where the vector-state probe is put in a rootfs by [`add_xstate_probe`].
pub const XSTATE_PROBE: &str = "/bin/xstate-probe";

/// Compiles tests/probes/xstate.c (does a guest keep each task's AVX
/// registers its own?) as a static binary into the rootfs at `dir`.
pub fn add_xstate_probe(dir: &Path) -> Result<(), String> {
    let source = crate::workspace_root().join("tests/probes/xstate.c");
    let output = Command::new("cc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(dir.join(XSTATE_PROBE.trim_start_matches('/')))
        .arg(&source)
        .output()
        .map_err(|e| format!("cannot run cc (scripts/install-deps.sh installs it): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cc {} failed: {}",
            source.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// Packs `dir` into an uncompressed EROFS image at `image` with mkfs.erofs
/// (the guest kernel has no EROFS decompression: it would run emulated on PVM).
pub fn erofs_image(dir: &Path, image: &Path) -> Result<(), String> {
    let output = Command::new("mkfs.erofs")
        .arg("-T0") // fixed timestamps: the image depends only on the tree
        .arg(image)
        .arg(dir)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "mkfs.erofs is missing: run scripts/install-deps.sh \
                 (Debian's erofs-utils)"
                .to_string(),
            _ => format!("cannot run mkfs.erofs: {e}"),
        })?;
    if !output.status.success() {
        return Err(format!(
            "mkfs.erofs {} {} failed ({}): {}{}",
            image.display(),
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// A busybox rootfs packed as EROFS in `dir` (as `dir/busybox.erofs`).
pub fn busybox_erofs(dir: &Path) -> Result<std::path::PathBuf, String> {
    let tree = dir.join("rootfs");
    std::fs::create_dir(&tree).map_err(|e| format!("creating {}: {e}", tree.display()))?;
    busybox_rootfs(&tree)?;
    let image = dir.join("busybox.erofs");
    erofs_image(&tree, &image)?;
    Ok(image)
}
