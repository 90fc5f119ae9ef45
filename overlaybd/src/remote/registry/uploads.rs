//! Uploads: whether a blob exists (`HEAD`), a whole blob pushed in one
//! piece (`POST .../blobs/uploads/`, then `PUT <location>?digest=...`, a
//! new session for each try), and a blob mounted from another repository
//! of the same registry (`POST .../blobs/uploads/?mount=...&from=...`).
//! Each request carries the repository's credentials, learns a challenge
//! and retries once on 401, and is retried with the client's backoff when
//! it failed in a way that may pass. An upload can report its bytes as
//! they go out (for a progress bar), through [`UploadProgress`].

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use backon::Retryable;
use futures_util::stream::Stream;
use reqwest::{Method, Response};
use tokio::io::{AsyncRead, ReadBuf};

use crate::remote::auth::query_escape;

use super::authorization::challenge_of;
use super::{
    block_on, repo_key, resolve_location, status_failure, transport_failure, Failure, Registry,
    RepoAuth,
};

/// What a request carries besides its credentials.
#[derive(Clone, Copy)]
pub(super) enum Body<'a> {
    /// Nothing.
    Empty,
    /// A file of this length, streamed from disk, its bytes sent so far
    /// reported to the progress hook if there is one.
    File(&'a Path, u64, Option<&'a UploadProgress>),
    /// A small JSON document (a manifest) of this media type.
    Json {
        bytes: &'a [u8],
        media_type: &'a str,
    },
    /// No body; the answer is wanted in one of these media types.
    Accept(&'a str),
}

/// Told the bytes of the blob sent so far by the current `PUT`, after each
/// piece handed to the connection. A `PUT` sent again (a new session after
/// a failure, or once more after a 401) counts again from 0.
pub type UploadProgress = Arc<dyn Fn(u64) + Send + Sync>;

/// Size of the pieces a file is sent in.
const UPLOAD_PIECE: usize = 1 << 20;

/// A file as a stream of pieces, telling `progress` the running total.
struct ProgressFile {
    file: tokio::fs::File,
    piece: Vec<u8>,
    sent: u64,
    progress: UploadProgress,
}

impl Stream for ProgressFile {
    type Item = io::Result<Vec<u8>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.piece.resize(UPLOAD_PIECE, 0);
        let mut buf = ReadBuf::new(&mut this.piece);
        ready!(Pin::new(&mut this.file).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        if n == 0 {
            return Poll::Ready(None);
        }
        this.sent += n as u64;
        (this.progress)(this.sent);
        let mut piece = std::mem::take(&mut this.piece);
        piece.truncate(n);
        Poll::Ready(Some(Ok(piece)))
    }
}

impl Registry {
    /// Whether `repo_url/blobs/<digest>` exists (`repo_url` is
    /// `http(s)://host/v2/<repo>`).
    pub fn blob_exists(&self, repo_url: &str, digest: &str) -> io::Result<bool> {
        block_on(self.blob_exists_async(repo_url, digest))
    }

    /// [`Registry::blob_exists`], async.
    pub async fn blob_exists_async(&self, repo_url: &str, digest: &str) -> io::Result<bool> {
        let url = format!("{}/blobs/{digest}", repo_url.trim_end_matches('/'));
        let response = self.exchange(Method::HEAD, &url, Body::Empty).await?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(status_failure(&response, &url).error),
        }
    }

    /// Upload the file at `path` as `repo_url/blobs/<digest>` in one piece
    /// (`POST .../blobs/uploads/`, then `PUT <location>?digest=...`).
    pub fn upload_blob(&self, repo_url: &str, digest: &str, path: &Path) -> io::Result<()> {
        block_on(self.upload_blob_async(repo_url, digest, path, None))
    }

    /// [`Registry::upload_blob`], telling `progress` the bytes sent as
    /// they go out.
    pub fn upload_blob_with_progress(
        &self,
        repo_url: &str,
        digest: &str,
        path: &Path,
        progress: UploadProgress,
    ) -> io::Result<()> {
        block_on(self.upload_blob_async(repo_url, digest, path, Some(&progress)))
    }

    /// Mount blob `digest` into `repo_url` from repository `from` of the
    /// same registry (a name like `library/app`) without sending it: the
    /// OCI cross-repository mount, `POST .../blobs/uploads/?mount=<digest>
    /// &from=<from>`. `Ok(true)`: the registry mounted it (201). `Ok(false)`:
    /// it did not (`from` has no such blob, the client may not read it
    /// there, or the registry does not mount) and opened an upload session
    /// instead (202), which is cancelled; upload the blob then.
    pub fn mount_blob(&self, repo_url: &str, digest: &str, from: &str) -> io::Result<bool> {
        block_on(self.mount_blob_async(repo_url, digest, from))
    }

    /// [`Registry::mount_blob`], async.
    pub async fn mount_blob_async(
        &self,
        repo_url: &str,
        digest: &str,
        from: &str,
    ) -> io::Result<bool> {
        let start = format!(
            "{}/blobs/uploads/?mount={}&from={}",
            repo_url.trim_end_matches('/'),
            query_escape(digest),
            query_escape(from)
        );
        let response = self.exchange(Method::POST, &start, Body::Empty).await?;
        match response.status().as_u16() {
            201 => Ok(true),
            202 => {
                // Not mounted: drop the session it opened (best effort; an
                // abandoned session expires on its own).
                let location = response
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .map(|l| resolve_location(&start, l));
                if let Some(location) = location {
                    let _ = self
                        .exchange_once(Method::DELETE, &location, Body::Empty)
                        .await;
                }
                Ok(false)
            }
            _ => Err(status_failure(&response, &start).error),
        }
    }

    /// [`Registry::upload_blob`], async. An upload session is used once:
    /// when its `PUT` fails (a timeout while the registry checks a large
    /// blob, a reset), the registry may have taken the blob or dropped the
    /// session, so the blob is looked for (`HEAD`) and, when it is not
    /// there, sent again in a new session, up to [`RegistryOptions::tries`]
    /// times.
    pub async fn upload_blob_async(
        &self,
        repo_url: &str,
        digest: &str,
        path: &Path,
        progress: Option<&UploadProgress>,
    ) -> io::Result<()> {
        let len = tokio::fs::metadata(path).await?.len();
        let mut tries = 0;
        loop {
            tries += 1;
            let session = self.upload_session(repo_url, digest, path, len, progress);
            let failure = match session.await {
                Ok(()) => return Ok(()),
                Err(failure) => failure,
            };
            if self
                .blob_exists_async(repo_url, digest)
                .await
                .unwrap_or(false)
            {
                return Ok(());
            }
            if !failure.retry || tries >= self.options.tries.max(1) {
                return Err(failure.error);
            }
        }
    }

    /// One upload session: `POST .../blobs/uploads/`, then the whole file
    /// in one `PUT <location>?digest=...`, given time for its size.
    async fn upload_session(
        &self,
        repo_url: &str,
        digest: &str,
        path: &Path,
        len: u64,
        progress: Option<&UploadProgress>,
    ) -> std::result::Result<(), Failure> {
        let start = format!("{}/blobs/uploads/", repo_url.trim_end_matches('/'));
        let response = self
            .exchange(Method::POST, &start, Body::Empty)
            .await
            .map_err(Failure::from)?;
        if response.status().as_u16() != 202 {
            return Err(status_failure(&response, &start));
        }
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(|l| resolve_location(&start, l))
            .ok_or_else(|| {
                Failure::fatal(
                    libc::EIO,
                    format!("POST {start}: the registry gave no upload Location"),
                )
            })?;
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{separator}digest={}", query_escape(digest));
        let response = self
            .exchange_once(Method::PUT, &put, Body::File(path, len, progress))
            .await?;
        match response.status().as_u16() {
            201 | 204 => Ok(()),
            _ => Err(status_failure(&response, &put)),
        }
    }

    /// Send one request with the repository's credentials, learning a
    /// challenge and retrying once on 401, and retrying transient failures.
    pub(super) async fn exchange(
        &self,
        method: Method,
        url: &str,
        body: Body<'_>,
    ) -> io::Result<Response> {
        (|| self.exchange_once(method.clone(), url, body))
            .retry(self.options.retry_delays())
            .sleep(tokio::time::sleep)
            .when(|failure| failure.retry)
            .await
            .map_err(|failure| failure.error)
    }

    async fn exchange_once(
        &self,
        method: Method,
        url: &str,
        body: Body<'_>,
    ) -> std::result::Result<Response, Failure> {
        let known = self.state().repos.get(repo_key(url)).cloned();
        let mut auth = known.unwrap_or(RepoAuth::Anonymous);
        let mut renewed = false;
        loop {
            let authorization = self.authorization(url, &auth, renewed).await?;
            let mut request = self.client.request(method.clone(), url);
            if let Some(value) = &authorization {
                request = request.header("Authorization", value);
            }
            match body {
                Body::Empty => {
                    request = request.header("Content-Type", "application/octet-stream");
                }
                Body::File(path, len, progress) => {
                    // The file is streamed from disk, not read into memory,
                    // with time to send it at 1 MiB/s or faster on top of
                    // the usual deadline.
                    let file = tokio::fs::File::open(path).await?;
                    let body = match progress {
                        Some(progress) => reqwest::Body::wrap_stream(ProgressFile {
                            file,
                            piece: Vec::new(),
                            sent: 0,
                            progress: progress.clone(),
                        }),
                        None => reqwest::Body::from(file),
                    };
                    request = request
                        .header("Content-Type", "application/octet-stream")
                        .header("Content-Length", len)
                        .timeout(self.options.deadline + Duration::from_secs(len >> 20))
                        .body(body);
                }
                Body::Json { bytes, media_type } => {
                    request = request
                        .header("Content-Type", media_type)
                        .body(bytes.to_vec());
                }
                Body::Accept(types) => {
                    request = request.header("Accept", types);
                }
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let result = request.send().await;
            let response = result.map_err(|e| transport_failure(e, method.as_str(), url))?;
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
