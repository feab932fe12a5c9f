//! The content-addressed blob store: `<root>/blobs/sha256/<hex>`.
//!
//! A blob only ever appears under its name by a rename from a temp file in the
//! same directory after its sha256 was checked, so a blob that exists is one
//! whose content matches its name; nothing is trusted on a registry's word.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// A `sha256:<64 lowercase hex>` digest, the only algorithm huskd accepts.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<hex>`.
    pub fn parse(s: &str) -> Result<Self, BlobError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| BlobError::UnsupportedDigest(s.to_owned()))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(BlobError::UnsupportedDigest(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// The hex part, which names the blob's file.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = BlobError;
    fn try_from(s: String) -> Result<Self, BlobError> {
        Self::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("unsupported or malformed digest {0:?} (huskd takes sha256:<64 hex>)")]
    UnsupportedDigest(String),
    #[error("blob content does not match its digest: expected {expected}, got {actual}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("blob store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BlobError {
    let path = path.to_owned();
    move |source| BlobError::Io { path, source }
}

/// The blobs directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    /// Opens (creating) `<root>/blobs/sha256`.
    pub fn open(root: &Path) -> Result<Self, BlobError> {
        let dir = root.join("blobs").join("sha256");
        fs::create_dir_all(&dir).map_err(|source| BlobError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    /// Where the blob `digest` lives (whether or not it is there).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Whether the blob is stored (and so verified).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Reads a whole (small) blob: manifests and configs.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, BlobError> {
        let path = self.path(digest);
        fs::read(&path).map_err(|source| BlobError::Io { path, source })
    }

    /// Starts writing a blob that must turn out to be `expected`.
    pub fn writer(&self, expected: &Digest) -> Result<BlobWriter, BlobError> {
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.dir)
            .map_err(|source| BlobError::Io {
                path: self.dir.clone(),
                source,
            })?;
        Ok(BlobWriter {
            tmp,
            hasher: Sha256::new(),
            expected: expected.clone(),
            dest: self.path(expected),
        })
    }

    /// Stores `bytes` as the blob `expected`.
    pub fn put_bytes(&self, expected: &Digest, bytes: &[u8]) -> Result<PathBuf, BlobError> {
        if self.contains(expected) {
            return Ok(self.path(expected));
        }
        let mut w = self.writer(expected)?;
        w.write_all(bytes).map_err(|source| BlobError::Io {
            path: w.dest.clone(),
            source,
        })?;
        w.commit()
    }

    /// Copies `reader` in as the blob `expected`.
    pub fn put_reader(
        &self,
        expected: &Digest,
        mut reader: impl Read,
    ) -> Result<PathBuf, BlobError> {
        if self.contains(expected) {
            return Ok(self.path(expected));
        }
        let mut w = self.writer(expected)?;
        io::copy(&mut reader, &mut w).map_err(|source| BlobError::Io {
            path: w.dest.clone(),
            source,
        })?;
        w.commit()
    }

    /// Removes every file in the blobs directory whose name `keep` refuses:
    /// blobs and temp files alike. Only while no blob is being written.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) -> Result<(), BlobError> {
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            if !entry.file_name().to_str().is_some_and(&keep) {
                let path = entry.path();
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&path)(e)),
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// A blob being written: hashed as it goes, renamed into place by `commit`
/// only if the hash matches; dropped uncommitted, the temp file goes.
pub struct BlobWriter {
    tmp: tempfile::NamedTempFile,
    hasher: Sha256,
    expected: Digest,
    dest: PathBuf,
}

impl BlobWriter {
    /// Verifies the digest and moves the blob into place.
    pub fn commit(mut self) -> Result<PathBuf, BlobError> {
        self.tmp.flush().map_err(io_err(&self.dest))?;
        let actual = Digest(format!("sha256:{}", hex::encode(self.hasher.finalize())));
        if actual != self.expected {
            return Err(BlobError::Mismatch {
                expected: self.expected,
                actual,
            });
        }
        self.tmp.as_file().sync_all().map_err(io_err(&self.dest))?;
        self.tmp.persist(&self.dest).map_err(|e| BlobError::Io {
            path: self.dest.clone(),
            source: e.error,
        })?;
        Ok(self.dest)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tmp.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tmp.flush()
    }
}

/// Opens a stored blob for reading.
pub fn open_blob(store: &BlobStore, digest: &Digest) -> Result<File, BlobError> {
    let path = store.path(digest);
    File::open(&path).map_err(|source| BlobError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_blobs_land_and_bad_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let good = Digest::of(b"hello");
        let path = store.put_bytes(&good, b"hello").unwrap();
        assert_eq!(path, dir.path().join("blobs/sha256").join(good.hex()));
        assert_eq!(store.read(&good).unwrap(), b"hello");

        let claimed = Digest::of(b"something else");
        match store.put_bytes(&claimed, b"hello") {
            Err(BlobError::Mismatch { expected, actual }) => {
                assert_eq!(expected, claimed);
                assert_eq!(actual, good);
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
        assert!(!store.contains(&claimed));
        // No temp file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [good.hex()]);
    }

    #[test]
    fn digests_are_checked() {
        assert!(Digest::parse("sha512:abcd").is_err());
        assert!(Digest::parse("sha256:ABCD").is_err());
        assert!(Digest::parse(&format!("sha256:{}", "0".repeat(63))).is_err());
        assert!(Digest::parse(&format!("sha256:{}", "0".repeat(64))).is_ok());
    }
}
