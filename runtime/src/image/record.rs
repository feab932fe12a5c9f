//! What huskd remembers about one image, and the parts of the image config it
//! builds a container's OCI process spec from.

use serde::{Deserialize, Serialize};

use super::blobs::Digest;

/// An image's identity: the digest of its config, as containerd and CRI use.
pub type ImageId = Digest;

/// One stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The config digest (`sha256:...`).
    pub id: ImageId,
    /// `docker.io/library/busybox:latest` and the like.
    pub repo_tags: Vec<String>,
    /// `docker.io/library/busybox@sha256:...`: the digest the registry served
    /// for the reference (an index's digest for multi-platform images).
    pub repo_digests: Vec<String>,
    /// The platform manifest's digest.
    pub manifest_digest: Digest,
    /// The index / manifest list the manifest was chosen from, if any.
    pub index_digest: Option<Digest>,
    /// Bytes of the image's blobs as stored (config plus compressed layers).
    pub size: u64,
    /// The config's `User` as written (`1000`, `nobody`, `1000:1000`, or empty).
    pub user: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub stop_signal: Option<String>,
    /// Layers, oldest first.
    pub layers: Vec<LayerRecord>,
}

/// One layer blob of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

impl ImageRecord {
    /// The user part of `User` when it is numeric: CRI's `Image.uid`.
    pub fn uid(&self) -> Option<i64> {
        self.user_part().and_then(|u| u.parse().ok())
    }

    /// The user part of `User` when it is a name: CRI's `Image.username`.
    pub fn username(&self) -> Option<&str> {
        self.user_part().filter(|u| u.parse::<i64>().is_err())
    }

    fn user_part(&self) -> Option<&str> {
        let user = self.user.split(':').next().unwrap_or_default();
        (!user.is_empty()).then_some(user)
    }

    /// Every blob this image holds on to.
    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        [&self.id, &self.manifest_digest]
            .into_iter()
            .chain(self.index_digest.iter())
            .chain(self.layers.iter().map(|l| &l.digest))
    }

    /// Whether `reference` (normalised) is one of this image's tags or digests.
    pub fn has_name(&self, reference: &str) -> bool {
        self.repo_tags.iter().any(|t| t == reference)
            || self.repo_digests.iter().any(|d| d == reference)
    }
}

/// The fields of an OCI (or Docker) image config huskd uses.
#[derive(Debug, Default, Deserialize)]
pub struct ImageConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<ContainerConfig>,
}

/// The `config` object; Docker writes `null` for absent lists.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub stop_signal: Option<String>,
}

#[cfg(test)]
impl ImageRecord {
    /// A record of nothing but the id of `config`, for unit tests to fill in.
    pub fn bare(config: &[u8]) -> ImageRecord {
        ImageRecord {
            id: Digest::of(config),
            repo_tags: vec![],
            repo_digests: vec![],
            manifest_digest: Digest::of(b"m"),
            index_digest: None,
            size: 1,
            user: String::new(),
            entrypoint: vec![],
            cmd: vec![],
            env: vec![],
            working_dir: String::new(),
            stop_signal: None,
            layers: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(user: &str) -> ImageRecord {
        ImageRecord {
            user: user.into(),
            ..ImageRecord::bare(b"c")
        }
    }

    #[test]
    fn user_is_split_into_uid_or_username() {
        assert_eq!(record("1000").uid(), Some(1000));
        assert_eq!(record("1000:50").uid(), Some(1000));
        assert_eq!(record("1000").username(), None);
        assert_eq!(record("nobody:nogroup").username(), Some("nobody"));
        assert_eq!(record("nobody").uid(), None);
        assert_eq!(record("").uid(), None);
        assert_eq!(record("").username(), None);
    }

    #[test]
    fn docker_nulls_parse() {
        let cfg: ImageConfigFile = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","config":{"User":"","Entrypoint":null,"Cmd":["sh"],"Env":null}}"#,
        )
        .unwrap();
        let c = cfg.config.unwrap();
        assert_eq!(c.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(c.entrypoint, None);
    }
}
