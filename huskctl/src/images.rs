//! Image commands: `pull`, `images`, `rmi`, and the image lookups `run` and
//! `create` need.

use std::io::Write;
use std::time::Duration;

use k8s_cri::v1 as cri;

use crate::client::{Huskd, Result};
use crate::output::{self, Format};

/// `pull IMAGE`.
pub async fn pull_and_print(h: &mut Huskd, out: &mut impl Write, image: &str) -> Result<()> {
    let image_ref = pull(h, image).await?;
    output::print(out, &format!("Image is up to date for {image_ref}\n"))
}

/// `images [IMAGE]`.
pub async fn list(
    h: &mut Huskd,
    out: &mut impl Write,
    image: Option<String>,
    quiet: bool,
    format: Format,
) -> Result<()> {
    let filter = image.map(|image| cri::ImageFilter {
        image: Some(image_spec(&image)),
    });
    let response = h
        .img
        .list_images(h.request(cri::ListImagesRequest { filter }, Duration::ZERO))
        .await
        .map_err(h.failed("ListImages"))?
        .into_inner();
    let text = output::listing(
        &response,
        response.images.iter().map(|i| i.id.clone()),
        quiet,
        format,
        || images_table(&response.images),
    )?;
    output::print(out, &text)
}

/// `rmi IMAGE...`.
pub async fn remove(h: &mut Huskd, out: &mut impl Write, images: Vec<String>) -> Result<()> {
    for image in images {
        h.img
            .remove_image(h.request(
                cri::RemoveImageRequest {
                    image: Some(image_spec(&image)),
                },
                Duration::ZERO,
            ))
            .await
            .map_err(h.failed(format!("RemoveImage {image}")))?;
        output::print(out, &format!("Deleted: {image}\n"))?;
    }
    Ok(())
}

/// Whether huskd has the image.
pub async fn present(h: &mut Huskd, image: &str) -> Result<bool> {
    Ok(h.img
        .image_status(h.request(
            cri::ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            },
            Duration::ZERO,
        ))
        .await
        .map_err(h.failed(format!("ImageStatus {image}")))?
        .into_inner()
        .image
        .is_some())
}

pub fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

/// The image's name without registry path or tag: `busybox` for `r:5000/x/busybox:1`.
pub fn image_name(image: &str) -> String {
    let (repo, _) = output::split_tag(image.split('@').next().unwrap_or(image));
    let name = repo.rsplit('/').next().unwrap_or(repo);
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() {
        "container".into()
    } else {
        name
    }
}

pub async fn pull(h: &mut Huskd, image: &str) -> Result<String> {
    // No deadline: a large image takes what it takes.
    Ok(h.img
        .pull_image(cri::PullImageRequest {
            image: Some(image_spec(image)),
            ..Default::default()
        })
        .await
        .map_err(h.failed(format!("PullImage {image}")))?
        .into_inner()
        .image_ref)
}

fn images_table(images: &[cri::Image]) -> String {
    let mut rows = Vec::new();
    for image in images {
        let id = output::short_id(&image.id);
        let size = output::human_size(image.size);
        if image.repo_tags.is_empty() {
            let repo = image
                .repo_digests
                .first()
                .map(|d| d.split('@').next().unwrap_or(d).to_owned())
                .unwrap_or_else(|| "<none>".into());
            rows.push(vec![repo, "<none>".into(), id.clone(), size.clone()]);
        }
        for tag in &image.repo_tags {
            let (repo, tag) = output::split_tag(tag);
            rows.push(vec![repo.into(), tag.into(), id.clone(), size.clone()]);
        }
    }
    output::table(&["IMAGE", "TAG", "IMAGE ID", "SIZE"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        assert_eq!(image_name("127.0.0.1:5000/husk/busybox:latest"), "busybox");
        assert_eq!(image_name("busybox@sha256:abc"), "busybox");
        assert_eq!(image_name("my_img"), "my-img");
    }
}
