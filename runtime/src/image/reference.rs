//! Image references as kubelet and crictl pass them (`busybox`,
//! `library/busybox:1.36`, `127.0.0.1:5000/husk/busybox:latest`,
//! `name@sha256:<hex>`), normalised the way containerd does: Docker Hub names
//! get `docker.io/` and, for one-word names, `library/`; a reference with
//! neither tag nor digest means `:latest`.
//!
//! The parsing and normalising is oci-spec's (re-exported by oci-client as
//! `Reference`); this type wraps it so the rest of huskd speaks one name for a
//! reference and gets the repo-tag / repo-digest strings CRI reports.

use std::fmt;
use std::str::FromStr;

/// Why a string is not an image reference.
#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {input:?}: {source}")]
pub struct ReferenceError {
    pub input: String,
    #[source]
    pub source: oci_client::ParseError,
}

/// A parsed, normalised image reference.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageReference {
    inner: oci_client::Reference,
}

impl ImageReference {
    /// Parses and normalises `input`.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let inner =
            oci_client::Reference::from_str(input.trim()).map_err(|source| ReferenceError {
                input: input.to_owned(),
                source,
            })?;
        Ok(Self { inner })
    }

    /// The registry host (and port), `docker.io` for Docker Hub.
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The repository path inside the registry, e.g. `library/busybox`.
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// The tag, if the reference has one. A reference without tag and digest
    /// parses as `:latest`, so this is `None` only for `name@digest`.
    pub fn tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    /// The manifest digest the reference pins, if any.
    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// `registry/repository`, e.g. `docker.io/library/busybox`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry(), self.repository())
    }

    /// The repo tag CRI lists for an image pulled by this reference
    /// (`docker.io/library/busybox:latest`), or `None` for a digest reference.
    pub fn repo_tag(&self) -> Option<String> {
        self.tag().map(|tag| format!("{}:{tag}", self.name()))
    }

    /// The repo digest of this repository at `manifest_digest`
    /// (`docker.io/library/busybox@sha256:...`).
    pub fn repo_digest(&self, manifest_digest: &str) -> String {
        format!("{}@{manifest_digest}", self.name())
    }

    /// oci-client's form, for talking to registries.
    pub(crate) fn oci(&self) -> &oci_client::Reference {
        &self.inner
    }
}

impl fmt::Display for ImageReference {
    /// The full normalised form: `docker.io/library/busybox:latest`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.whole())
    }
}

impl fmt::Debug for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageReference({self})")
    }
}

impl FromStr for ImageReference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:7b3ccabffc97de872a30dfd234fd972a66d247c8cfc69b0550f276481852627c";

    #[test]
    fn docker_hub_short_names_are_normalised() {
        let r = ImageReference::parse("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/busybox");
        assert_eq!(
            r.repo_tag().as_deref(),
            Some("docker.io/library/busybox:latest")
        );

        let r = ImageReference::parse("library/busybox:1.36").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:1.36");
        let r = ImageReference::parse("husk/tool").unwrap();
        assert_eq!(r.to_string(), "docker.io/husk/tool:latest");
        let r = ImageReference::parse("index.docker.io/library/busybox:1").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:1");
    }

    #[test]
    fn registry_with_port_is_kept() {
        let r = ImageReference::parse("127.0.0.1:5000/husk/busybox:latest").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "husk/busybox");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.name(), "127.0.0.1:5000/husk/busybox");
    }

    #[test]
    fn digest_references_have_no_tag() {
        let r = ImageReference::parse(&format!("busybox@{DIGEST}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(DIGEST));
        assert_eq!(r.repo_tag(), None);
        assert_eq!(
            r.repo_digest(DIGEST),
            format!("docker.io/library/busybox@{DIGEST}")
        );
    }

    #[test]
    fn garbage_is_an_error_naming_the_input() {
        let err = ImageReference::parse("UPPER/Case:tag").unwrap_err();
        assert!(err.to_string().contains("UPPER/Case:tag"), "{err}");
        assert!(ImageReference::parse("").is_err());
    }
}
