//! PullImage's network half: resolve a reference on its registry (or a
//! mirror), choose the linux/amd64 manifest, and bring the config and layer
//! blobs into the blob store, each verified against its digest.
//!
//! Registries are spoken to through oci-client. huskd decides the endpoints
//! (mirrors from config, tried in order, then the registry itself, as
//! containerd's hosts.toml does) and the scheme: plain http only for loopback
//! hosts and hosts configured as insecure, https otherwise.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    self as mt, ImageIndexEntry, OciImageIndex, OciImageManifest, OciManifest,
};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use serde::Deserialize;
use tracing::{debug, info, warn};

use super::blobs::{BlobError, BlobStore, Digest};
use super::record::LayerRecord;
use super::reference::ImageReference;

/// The only platform huskd runs.
pub const PLATFORM: &str = "linux/amd64";

/// Layer media types huskd can unpack.
pub(crate) const LAYER_MEDIA_TYPES: &[&str] = &[
    mt::IMAGE_LAYER_MEDIA_TYPE,
    mt::IMAGE_LAYER_GZIP_MEDIA_TYPE,
    "application/vnd.oci.image.layer.v1.tar+zstd",
    mt::IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
    mt::IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
];

const MANIFEST_MEDIA_TYPES: &[&str] = &[
    mt::OCI_IMAGE_MEDIA_TYPE,
    mt::IMAGE_MANIFEST_MEDIA_TYPE,
    mt::OCI_IMAGE_INDEX_MEDIA_TYPE,
    mt::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Registry settings, shaped like containerd's `hosts.toml`: per registry
/// host (`docker.io`, `registry.example.com:5000`), mirrors and whether plain
/// http is allowed.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RegistryConfig {
    #[serde(default)]
    pub hosts: BTreeMap<String, RegistryHost>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RegistryHost {
    /// Mirror endpoints tried in order before the registry itself:
    /// `https://mirror.example.com`, `http://127.0.0.1:5001`, or a bare
    /// `host[:port]` (https, unless the mirror is loopback). A path after the
    /// host is not supported: mirrors serve `/v2/` at their root.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Plain http is allowed to this registry (and its bare-host mirrors).
    #[serde(default)]
    pub insecure: bool,
}

/// Credentials from the CRI request.
#[derive(Clone, Default)]
pub enum Credentials {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
    /// A registry token (CRI's `AuthConfig.registry_token`).
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Self::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

impl Credentials {
    fn to_oci(&self) -> RegistryAuth {
        match self {
            Self::Anonymous => RegistryAuth::Anonymous,
            Self::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Self::Bearer(token) => RegistryAuth::Bearer(token.clone()),
        }
    }
}

/// Why a pull failed; each names the reference.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("pulling {reference}: registry {registry} is unreachable: {source}")]
    Unreachable {
        reference: String,
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("pulling {reference}: not found on {registry}: {source}")]
    NotFound {
        reference: String,
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("pulling {reference}: {registry} refused the credentials: {source}")]
    Unauthorized {
        reference: String,
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("pulling {reference}: no manifest for {PLATFORM}; the image has: {}", available.join(", "))]
    NoMatchingPlatform {
        reference: String,
        available: Vec<String>,
    },
    #[error("pulling {reference}: unsupported {what} media type {media_type:?}")]
    UnsupportedMediaType {
        reference: String,
        what: &'static str,
        media_type: String,
    },
    #[error("pulling {reference}: malformed {what}: {detail}")]
    Malformed {
        reference: String,
        what: &'static str,
        detail: String,
    },
    #[error("pulling {reference} from {registry}: {source}")]
    Registry {
        reference: String,
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    /// The registry's own error, after every mirror before it failed too.
    #[error("{last}; before that, {}", mirrors.join("; "))]
    AfterMirrors {
        last: Box<PullError>,
        /// What each mirror answered, in the order they were tried.
        mirrors: Vec<String>,
    },
    #[error("pulling {reference}: storing a blob: {source}")]
    Blob {
        reference: String,
        #[source]
        source: BlobError,
    },
}

/// What a pull brought into the blob store.
#[derive(Debug, Clone)]
pub struct FetchedImage {
    /// The digest the registry served for the reference: the repo digest.
    pub resolved_digest: Digest,
    pub manifest_digest: Digest,
    pub index_digest: Option<Digest>,
    pub config_digest: Digest,
    pub config_size: u64,
    pub layers: Vec<LayerRecord>,
}

/// One place to ask: a mirror or the registry itself.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    host: String,
    plain_http: bool,
    mirror: bool,
}

/// The endpoints for `reference`, in the order they are tried.
fn endpoints(reference: &ImageReference, config: &RegistryConfig) -> Vec<Endpoint> {
    let registry = reference.registry();
    let host_config = config.hosts.get(registry).cloned().unwrap_or_default();
    let mut out = Vec::new();
    for mirror in &host_config.mirrors {
        let (scheme, rest) = match mirror.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, mirror.as_str()),
        };
        let host = rest.split('/').next().unwrap_or_default().to_owned();
        if host.is_empty() {
            warn!(%mirror, "ignoring a mirror without a host");
            continue;
        }
        let plain_http = match scheme {
            Some("http") => true,
            Some(_) => false,
            None => host_config.insecure || is_loopback(&host),
        };
        out.push(Endpoint {
            host,
            plain_http,
            mirror: true,
        });
    }
    out.push(Endpoint {
        host: registry.to_owned(),
        plain_http: host_config.insecure || is_loopback(registry),
        mirror: false,
    });
    out
}

/// Whether `host[:port]` is this machine: 127.0.0.0/8, ::1, localhost.
pub fn is_loopback(host_port: &str) -> bool {
    let host = if let Ok(ip) = host_port.parse::<IpAddr>() {
        return ip.is_loopback();
    } else if let Some(rest) = host_port.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Pulls `reference` into `blobs`, trying each endpoint in turn. An error from
/// a mirror moves on to the next endpoint; the registry's own error is final.
#[tracing::instrument(skip(credentials, config, blobs), fields(reference = %reference))]
pub async fn fetch(
    reference: &ImageReference,
    credentials: &Credentials,
    config: &RegistryConfig,
    blobs: &BlobStore,
) -> Result<FetchedImage, PullError> {
    install_crypto_provider();
    let mut mirrors = Vec::new();
    for endpoint in endpoints(reference, config) {
        match fetch_from(&endpoint, reference, credentials, blobs).await {
            Ok(image) => return Ok(image),
            Err(e) if endpoint.mirror => {
                warn!(mirror = %endpoint.host, error = %e, "mirror failed; trying the next endpoint");
                mirrors.push(format!("mirror {}: {e}", endpoint.host));
            }
            Err(e) if mirrors.is_empty() => return Err(e),
            Err(e) => {
                return Err(PullError::AfterMirrors {
                    last: Box::new(e),
                    mirrors,
                })
            }
        }
    }
    // Only reachable if there were no endpoints, which endpoints() never returns.
    Err(PullError::Malformed {
        reference: reference.to_string(),
        what: "registry configuration",
        detail: "no endpoint to pull from".into(),
    })
}

impl PullError {
    /// The error that decided the pull: the registry's own, after mirrors.
    pub fn deciding(&self) -> &PullError {
        match self {
            PullError::AfterMirrors { last, .. } => last.deciding(),
            other => other,
        }
    }
}

/// rustls needs a process-wide crypto provider; huskd uses ring (see the
/// workspace Cargo.toml for why not the default).
fn install_crypto_provider() {
    // An error means one is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn fetch_from(
    endpoint: &Endpoint,
    reference: &ImageReference,
    credentials: &Credentials,
    blobs: &BlobStore,
) -> Result<FetchedImage, PullError> {
    let client = Client::new(ClientConfig {
        protocol: if endpoint.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        // huskd picks from indexes itself, to name the platforms it saw.
        platform_resolver: None,
        connect_timeout: Some(CONNECT_TIMEOUT),
        ..Default::default()
    });
    let mut oci_ref = reference.oci().clone();
    if endpoint.mirror {
        oci_ref.set_mirror_registry(endpoint.host.clone());
    }
    let auth = credentials.to_oci();
    let ctx = ErrorContext {
        reference: reference.to_string(),
        registry: endpoint.host.clone(),
    };
    debug!(endpoint = %endpoint.host, plain_http = endpoint.plain_http, "resolving");

    let (resolved_digest, manifest) = fetch_manifest(&client, &oci_ref, &auth, blobs, &ctx).await?;
    let (manifest_digest, index_digest, manifest) = match manifest {
        OciManifest::Image(m) => (resolved_digest.clone(), None, m),
        OciManifest::ImageIndex(index) => {
            let chosen =
                choose_platform(&index).map_err(|available| PullError::NoMatchingPlatform {
                    reference: ctx.reference.clone(),
                    available,
                })?;
            let by_digest = oci_ref.clone_with_digest(chosen.digest.clone());
            let (digest, inner) = fetch_manifest(&client, &by_digest, &auth, blobs, &ctx).await?;
            match inner {
                OciManifest::Image(m) => (digest, Some(resolved_digest.clone()), m),
                OciManifest::ImageIndex(_) => {
                    return Err(ctx.malformed("manifest", "an index nested in an index".into()))
                }
            }
        }
    };

    let config_digest = ctx.digest(&manifest.config.digest)?;
    if !blobs.contains(&config_digest) {
        let mut bytes = Vec::new();
        client
            .pull_blob(&oci_ref, &manifest.config, &mut bytes)
            .await
            .map_err(|e| ctx.classify(e))?;
        blobs
            .put_bytes(&config_digest, &bytes)
            .map_err(|e| ctx.blob(e))?;
    }
    check_config_platform(blobs, &config_digest, &ctx)?;

    let layers = fetch_layers(&client, &oci_ref, &manifest, blobs, &ctx).await?;
    Ok(FetchedImage {
        resolved_digest,
        manifest_digest,
        index_digest,
        config_size: u64::try_from(manifest.config.size).unwrap_or(0),
        config_digest,
        layers,
    })
}

/// The linux/amd64 entry of an index, or the platforms it offers instead.
pub(crate) fn choose_platform(index: &OciImageIndex) -> Result<&ImageIndexEntry, Vec<String>> {
    index
        .manifests
        .iter()
        .find(|m| {
            m.platform.as_ref().is_some_and(|p| {
                p.os.to_string() == "linux" && p.architecture.to_string() == "amd64"
            })
        })
        .ok_or_else(|| {
            index
                .manifests
                .iter()
                .map(|m| match &m.platform {
                    Some(p) => match &p.variant {
                        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                        None => format!("{}/{}", p.os, p.architecture),
                    },
                    None => "unknown".into(),
                })
                .collect()
        })
}

/// Fetches one manifest (verified against the digest the registry names, and
/// the reference's digest if it pins one) and keeps its bytes as a blob.
async fn fetch_manifest(
    client: &Client,
    oci_ref: &oci_client::Reference,
    auth: &RegistryAuth,
    blobs: &BlobStore,
    ctx: &ErrorContext,
) -> Result<(Digest, OciManifest), PullError> {
    let (body, digest) = client
        .pull_manifest_raw(oci_ref, auth, MANIFEST_MEDIA_TYPES)
        .await
        .map_err(|e| ctx.classify(e))?;
    let digest = ctx.digest(&digest)?;
    blobs.put_bytes(&digest, &body).map_err(|e| ctx.blob(e))?;
    let manifest: OciManifest =
        serde_json::from_slice(&body).map_err(|e| ctx.malformed("manifest", e.to_string()))?;
    Ok((digest, manifest))
}

/// A single-platform manifest says nothing of its platform; its config does.
fn check_config_platform(
    blobs: &BlobStore,
    config_digest: &Digest,
    ctx: &ErrorContext,
) -> Result<(), PullError> {
    let bytes = blobs.read(config_digest).map_err(|e| ctx.blob(e))?;
    let config: super::record::ImageConfigFile =
        serde_json::from_slice(&bytes).map_err(|e| ctx.malformed("image config", e.to_string()))?;
    let platform = format!("{}/{}", config.os, config.architecture);
    if (!config.os.is_empty() || !config.architecture.is_empty()) && platform != PLATFORM {
        return Err(PullError::NoMatchingPlatform {
            reference: ctx.reference.clone(),
            available: vec![platform],
        });
    }
    Ok(())
}

async fn fetch_layers(
    client: &Client,
    oci_ref: &oci_client::Reference,
    manifest: &OciImageManifest,
    blobs: &BlobStore,
    ctx: &ErrorContext,
) -> Result<Vec<LayerRecord>, PullError> {
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for layer in &manifest.layers {
        if !LAYER_MEDIA_TYPES.contains(&layer.media_type.as_str()) {
            return Err(PullError::UnsupportedMediaType {
                reference: ctx.reference.clone(),
                what: "layer",
                media_type: layer.media_type.clone(),
            });
        }
        let digest = ctx.digest(&layer.digest)?;
        if blobs.contains(&digest) {
            debug!(%digest, "layer already stored");
        } else {
            let started = std::time::Instant::now();
            let mut stream = client
                .pull_blob_stream(oci_ref, layer)
                .await
                .map_err(|e| ctx.classify(e))?;
            // Writes go to the page cache in chunks of the stream's size; not
            // worth a blocking-thread hop per chunk.
            let mut writer = blobs.writer(&digest).map_err(|e| ctx.blob(e))?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| ctx.classify(OciDistributionError::IoError(e)))?;
                std::io::Write::write_all(&mut writer, &chunk).map_err(|source| {
                    ctx.blob(BlobError::Io {
                        path: blobs.path(&digest),
                        source,
                    })
                })?;
            }
            writer.commit().map_err(|e| ctx.blob(e))?;
            info!(%digest, size = layer.size, elapsed_ms = started.elapsed().as_millis() as u64, "layer fetched");
        }
        layers.push(LayerRecord {
            digest,
            media_type: layer.media_type.clone(),
            size: u64::try_from(layer.size).unwrap_or(0),
        });
    }
    Ok(layers)
}

/// Turns oci-client's errors into huskd's, naming reference and registry.
struct ErrorContext {
    reference: String,
    registry: String,
}

impl ErrorContext {
    fn classify(&self, source: OciDistributionError) -> PullError {
        let reference = self.reference.clone();
        let registry = self.registry.clone();
        let kind = match &source {
            OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
                Kind::Unreachable
            }
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => Kind::Unauthorized,
            OciDistributionError::ImageManifestNotFoundError(_) => Kind::NotFound,
            OciDistributionError::ServerError {
                code: 401 | 403, ..
            } => Kind::Unauthorized,
            OciDistributionError::ServerError { code: 404, .. } => Kind::NotFound,
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<_> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    Kind::Unauthorized
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    Kind::NotFound
                } else {
                    Kind::Other
                }
            }
            _ => Kind::Other,
        };
        match kind {
            Kind::Unreachable => PullError::Unreachable {
                reference,
                registry,
                source,
            },
            Kind::Unauthorized => PullError::Unauthorized {
                reference,
                registry,
                source,
            },
            Kind::NotFound => PullError::NotFound {
                reference,
                registry,
                source,
            },
            Kind::Other => PullError::Registry {
                reference,
                registry,
                source,
            },
        }
    }

    fn digest(&self, s: &str) -> Result<Digest, PullError> {
        Digest::parse(s).map_err(|e| self.blob(e))
    }

    fn blob(&self, source: BlobError) -> PullError {
        PullError::Blob {
            reference: self.reference.clone(),
            source,
        }
    }

    fn malformed(&self, what: &'static str, detail: String) -> PullError {
        PullError::Malformed {
            reference: self.reference.clone(),
            what,
            detail,
        }
    }
}

enum Kind {
    Unreachable,
    Unauthorized,
    NotFound,
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "127.0.0.1",
            "127.0.0.1:5000",
            "127.1.2.3:80",
            "localhost",
            "LOCALHOST:5000",
            "::1",
            "[::1]:5000",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in [
            "docker.io",
            "10.0.0.1:5000",
            "[2001:db8::1]:5000",
            "localhost.example.com",
        ] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn mirrors_come_first_then_the_registry() {
        let config: RegistryConfig = serde_json::from_value(serde_json::json!({
            "hosts": {
                "docker.io": { "mirrors": ["http://127.0.0.1:5001", "mirror.example.com", "https://m2.example.com/"] },
                "registry.internal:5000": { "insecure": true },
            }
        }))
        .unwrap();
        let hub = ImageReference::parse("busybox").unwrap();
        let eps = endpoints(&hub, &config);
        let summary: Vec<_> = eps
            .iter()
            .map(|e| (e.host.as_str(), e.plain_http, e.mirror))
            .collect();
        assert_eq!(
            summary,
            [
                ("127.0.0.1:5001", true, true),
                ("mirror.example.com", false, true),
                ("m2.example.com", false, true),
                ("docker.io", false, false),
            ]
        );
        let internal = ImageReference::parse("registry.internal:5000/app:1").unwrap();
        assert_eq!(
            endpoints(&internal, &config),
            [Endpoint {
                host: "registry.internal:5000".into(),
                plain_http: true,
                mirror: false
            }]
        );
        let local = ImageReference::parse("localhost:5000/app").unwrap();
        assert!(endpoints(&local, &config)[0].plain_http);
        let other = ImageReference::parse("quay.io/app").unwrap();
        assert!(!endpoints(&other, &config)[0].plain_http);
    }

    #[test]
    fn credentials_are_not_printed() {
        let c = Credentials::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
