//! CRI ImageService on the image store.

use std::sync::Arc;

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService;
use tonic::{Request, Response, Status};

use crate::image::{Credentials, ImageRecord, Removed};
use crate::manager::{now_ns, CriError, Manager};

pub struct Images {
    manager: Arc<Manager>,
}

impl Images {
    pub fn new(manager: Arc<Manager>) -> Images {
        Images { manager }
    }
}

fn cri_image(r: &ImageRecord) -> cri::Image {
    cri::Image {
        id: r.id.to_string(),
        repo_tags: r.repo_tags.clone(),
        repo_digests: r.repo_digests.clone(),
        size: r.size,
        uid: r.uid().map(|value| cri::Int64Value { value }),
        username: r.username().unwrap_or_default().to_owned(),
        spec: Some(cri::ImageSpec {
            image: r.id.to_string(),
            ..Default::default()
        }),
        pinned: false,
    }
}

/// Standard base64 (as in AuthConfig.auth), padding optional.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;
    const PADDING_OPTIONAL: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    PADDING_OPTIONAL.decode(text).ok()
}

/// The credentials a PullImage request carries.
pub fn credentials(auth: Option<&cri::AuthConfig>) -> Result<Credentials, Status> {
    let Some(auth) = auth else {
        return Ok(Credentials::Anonymous);
    };
    if !auth.username.is_empty() {
        return Ok(Credentials::Basic {
            username: auth.username.clone(),
            password: auth.password.clone(),
        });
    }
    if !auth.auth.is_empty() {
        let decoded = base64_decode(&auth.auth)
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| Status::invalid_argument("auth is not base64 of user:password"))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| Status::invalid_argument("auth is not base64 of user:password"))?;
        return Ok(Credentials::Basic {
            username: username.to_owned(),
            password: password.to_owned(),
        });
    }
    for token in [&auth.registry_token, &auth.identity_token] {
        if !token.is_empty() {
            return Ok(Credentials::Bearer(token.clone()));
        }
    }
    Ok(Credentials::Anonymous)
}

fn image_name(spec: Option<&cri::ImageSpec>) -> Result<&str, Status> {
    match spec.map(|s| s.image.as_str()) {
        Some(name) if !name.is_empty() => Ok(name),
        _ => Err(Status::invalid_argument("no image named")),
    }
}

#[tonic::async_trait]
impl ImageService for Images {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.is_empty());
        let images = match filter {
            Some(name) => self
                .manager
                .images
                .status(&name)
                .map_err(CriError::from)?
                .into_iter()
                .collect(),
            None => self.manager.images.list().map_err(CriError::from)?,
        };
        Ok(Response::new(cri::ListImagesResponse {
            images: images.iter().map(cri_image).collect(),
        }))
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        let image = self.manager.images.status(name).map_err(CriError::from)?;
        Ok(Response::new(cri::ImageStatusResponse {
            image: image.as_ref().map(cri_image),
            info: Default::default(),
        }))
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        let credentials = credentials(request.auth.as_ref())?;
        let record = self
            .manager
            .images
            .pull(name, &credentials, &self.manager.config.registry)
            .await
            .map_err(CriError::from)?;
        Ok(Response::new(cri::PullImageResponse {
            image_ref: record.id.to_string(),
        }))
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        let in_use = self.manager.images_in_use()?;
        let removed = self
            .manager
            .images
            .remove(name, move |id| in_use.contains(id.as_str()))
            .await
            .map_err(CriError::from)?;
        match removed {
            Removed::NotFound => tracing::info!(image = name, "not present; nothing to remove"),
            Removed::Untagged(r) | Removed::Deleted(r) => {
                tracing::info!(image = name, id = %r.id, "removed")
            }
        }
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let images = self.manager.images.clone();
        let usage = tokio::task::spawn_blocking(move || images.fs_info())
            .await
            .map_err(|e| Status::internal(format!("image fs info task: {e}")))?
            .map_err(CriError::from)?;
        let fs = cri::FilesystemUsage {
            timestamp: now_ns(),
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: self.manager.images.root().display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value {
                value: usage.used_bytes,
            }),
            inodes_used: Some(cri::UInt64Value {
                value: usage.inodes_used,
            }),
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs],
            container_filesystems: vec![],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_forms() {
        assert!(matches!(credentials(None), Ok(Credentials::Anonymous)));
        let auth = cri::AuthConfig {
            auth: "dXNlcjpwYTpzcw==".into(),
            ..Default::default()
        };
        match credentials(Some(&auth)) {
            Ok(Credentials::Basic { username, password }) => {
                assert_eq!((username.as_str(), password.as_str()), ("user", "pa:ss"))
            }
            other => panic!("{other:?}"),
        }
        // The same without its padding.
        let auth = cri::AuthConfig {
            auth: "dXNlcjpwYTpzcw".into(),
            ..Default::default()
        };
        assert!(
            matches!(credentials(Some(&auth)), Ok(Credentials::Basic { password, .. }) if password == "pa:ss")
        );
        let auth = cri::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        assert!(matches!(
            credentials(Some(&auth)),
            Ok(Credentials::Basic { .. })
        ));
        let auth = cri::AuthConfig {
            auth: "!!".into(),
            ..Default::default()
        };
        assert!(credentials(Some(&auth)).is_err());
    }
}
