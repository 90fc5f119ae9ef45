//! Manifests: read one by tag or digest (`GET .../manifests/<ref>` with
//! the media types obd understands in `Accept`), and write one (`PUT`
//! with its media type as `Content-Type`). `obd convert` needs both: it
//! reads an image's manifest (or index) and writes the converted one last,
//! so a tag never names a half-pushed image.
//!
//! Requests go through the same credentials, challenge and retry handling
//! as blob uploads.

use std::io;

use reqwest::Method;

use super::uploads::Body;
use super::{block_on, read_limited, status_failure, Registry};
use crate::remote::{redact_url, remote_error};

/// The manifest and index media types asked for, most wanted first.
pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Manifests are small; anything bigger is not one.
const MANIFEST_LIMIT: usize = 4 << 20;

impl Registry {
    /// The manifest `repo_url/manifests/<reference>` (a tag or a digest)
    /// and its media type (the answer's `Content-Type`, without
    /// parameters), or `None` when the registry has no such manifest.
    pub fn get_manifest(
        &self,
        repo_url: &str,
        reference: &str,
    ) -> io::Result<Option<(String, Vec<u8>)>> {
        block_on(async {
            let url = format!("{}/manifests/{reference}", repo_url.trim_end_matches('/'));
            let response = self
                .exchange(Method::GET, &url, Body::Accept(MANIFEST_TYPES))
                .await?;
            match response.status().as_u16() {
                200 => {}
                404 => return Ok(None),
                _ => return Err(status_failure(&response, &url).error),
            }
            let media_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
                .unwrap_or_default();
            let body = read_limited(response, MANIFEST_LIMIT)
                .await
                .map_err(|e| remote_error(libc::EIO, format!("GET {}: {e}", redact_url(&url))))?;
            Ok(Some((media_type, body)))
        })
    }

    /// Write `manifest` (of `media_type`) as `repo_url/manifests/<reference>`.
    pub fn put_manifest(
        &self,
        repo_url: &str,
        reference: &str,
        media_type: &str,
        manifest: &[u8],
    ) -> io::Result<()> {
        block_on(async {
            let url = format!("{}/manifests/{reference}", repo_url.trim_end_matches('/'));
            let body = Body::Json {
                bytes: manifest,
                media_type,
            };
            let response = self.exchange(Method::PUT, &url, body).await?;
            match response.status().as_u16() {
                200 | 201 | 202 | 204 => Ok(()),
                status => {
                    let detail = read_limited(response, 4096)
                        .await
                        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                        .unwrap_or_default();
                    Err(remote_error(
                        libc::EIO,
                        format!("PUT {}: HTTP {status}: {detail}", redact_url(&url)),
                    ))
                }
            }
        })
    }
}
