//! What huskd says about itself: `version` and `info`.

use std::io::Write;
use std::time::Duration;

use k8s_cri::v1 as cri;

use crate::client::{Huskd, Result};
use crate::output::{self, Format};

/// `version`: huskd's name and version and the CRI version it speaks.
pub async fn version(h: &mut Huskd, out: &mut impl Write, format: Format) -> Result<()> {
    let response =
        h.rt.version(h.request(
            cri::VersionRequest {
                version: "v1".into(),
            },
            Duration::ZERO,
        ))
        .await
        .map_err(h.failed("Version"))?
        .into_inner();
    let text = if format == Format::Json {
        output::json(&response)?
    } else {
        format!(
            "Version:  {}\nRuntimeName:  {}\nRuntimeVersion:  {}\nRuntimeApiVersion:  {}\n",
            response.version,
            response.runtime_name,
            response.runtime_version,
            response.runtime_api_version
        )
    };
    output::print(out, &text)
}

/// `info`: huskd's verbose status (conditions, runtime handlers) as JSON.
pub async fn info(h: &mut Huskd, out: &mut impl Write) -> Result<()> {
    let response =
        h.rt.status(h.request(cri::StatusRequest { verbose: true }, Duration::ZERO))
            .await
            .map_err(h.failed("Status"))?
            .into_inner();
    output::print(out, &output::json(&response)?)
}
