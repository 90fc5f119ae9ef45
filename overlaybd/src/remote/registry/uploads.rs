//! Uploads: whether a blob exists (`HEAD`), and a whole blob pushed in one
//! piece (`POST .../blobs/uploads/`, then `PUT <location>?digest=...`).
//! Each request carries the repository's credentials, learns a challenge
//! and retries once on 401, and is retried with the client's backoff when
//! it failed in a way that may pass.

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;

use backon::BlockingRetryable;
use ureq::http::Response;
use ureq::Body;

use crate::remote::auth::query_escape;
use crate::remote::remote_error;

use super::authorization::challenge_of;
use super::{
    repo_key, resolve_location, status_failure, transport_failure, Failure, Registry, RepoAuth,
};

impl Registry {
    /// Whether `repo_url/blobs/<digest>` exists (`repo_url` is
    /// `http(s)://host/v2/<repo>`).
    pub fn blob_exists(&self, repo_url: &str, digest: &str) -> io::Result<bool> {
        let url = format!("{}/blobs/{digest}", repo_url.trim_end_matches('/'));
        let response = self.exchange("HEAD", &url, None)?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(status_failure(&response, &url).error),
        }
    }

    /// Upload the file at `path` as `repo_url/blobs/<digest>` in one piece
    /// (`POST .../blobs/uploads/`, then `PUT <location>?digest=...`).
    pub fn upload_blob(&self, repo_url: &str, digest: &str, path: &Path) -> io::Result<()> {
        let start = format!("{}/blobs/uploads/", repo_url.trim_end_matches('/'));
        let response = self.exchange("POST", &start, None)?;
        if response.status().as_u16() != 202 {
            return Err(status_failure(&response, &start).error);
        }
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(|l| resolve_location(&start, l))
            .ok_or_else(|| {
                remote_error(
                    libc::EIO,
                    format!("POST {start}: the registry gave no upload Location"),
                )
            })?;
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{separator}digest={}", query_escape(digest));
        let response = self.exchange("PUT", &put, Some(path))?;
        match response.status().as_u16() {
            201 | 204 => Ok(()),
            _ => Err(status_failure(&response, &put).error),
        }
    }

    /// Send one request with the repository's credentials, learning a
    /// challenge and retrying once on 401, and retrying transient failures.
    fn exchange(&self, method: &str, url: &str, body: Option<&Path>) -> io::Result<Response<Body>> {
        (|| self.exchange_once(method, url, body))
            .retry(self.options.retry_delays())
            .sleep(std::thread::sleep)
            .when(|failure| failure.retry)
            .call()
            .map_err(|failure| failure.error)
    }

    fn exchange_once(
        &self,
        method: &str,
        url: &str,
        body: Option<&Path>,
    ) -> std::result::Result<Response<Body>, Failure> {
        let known = self.state().repos.get(repo_key(url)).cloned();
        let mut auth = known.unwrap_or(RepoAuth::Anonymous);
        let mut renewed = false;
        loop {
            let authorization = self.authorization(url, &auth, renewed)?;
            let request = ureq::http::Request::builder()
                .method(method)
                .uri(url)
                .header("Content-Type", "application/octet-stream");
            let request = match &authorization {
                Some(value) => request.header("Authorization", value),
                None => request,
            };
            self.requests.fetch_add(1, Ordering::Relaxed);
            let result = match body {
                Some(path) => {
                    let file = std::fs::File::open(path)?;
                    let request = request
                        .body(file)
                        .map_err(|e| Failure::fatal(libc::EINVAL, e.to_string()))?;
                    self.agent.run(request)
                }
                None => {
                    let request = request
                        .body(())
                        .map_err(|e| Failure::fatal(libc::EINVAL, e.to_string()))?;
                    self.agent.run(request)
                }
            };
            let response = result.map_err(|e| transport_failure(e, method, url))?;
            let status = response.status().as_u16();
            if status == 401 && !renewed {
                if let Some(challenge) = challenge_of(&response) {
                    auth = self.set_repo_auth(url, challenge);
                    renewed = true;
                    continue;
                }
            }
            if status == 429 || status >= 500 {
                return Err(status_failure(&response, url));
            }
            return Ok(response);
        }
    }
}
