//! Ranged reads of registry blobs: `GET` with `Range`, through a cached
//! redirect to blob storage when there is one, and the checks every answer
//! passes before a byte of it is used (status, `Content-Range`,
//! `Content-Length`, body length). Transient failures are retried with the
//! client's backoff, within its deadline.
//!
//! `Content-Range` is parsed here by hand: the crates that parse it
//! (`headers`, `http-content-range`) bring more than the twelve lines they
//! would replace, for one header of one form (`bytes FIRST-LAST/TOTAL`).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use reqwest::Response;

use crate::io::{check_bounds, PrefetchTurn, ReadAt};
use crate::remote::{redact_url, remote_error};
use crate::storage::Fetch;

/// How long a p2p peer is skipped after its first failure.
pub const PEER_PAUSE: Duration = Duration::from_secs(10);
/// The longest it is skipped after failures in a row.
pub const PEER_MAX_PAUSE: Duration = Duration::from_secs(300);

use super::authorization::challenge_of;
use super::{
    block_on, current_priority, error_text, prefetching, resolve_location, status_failure,
    transport_failure, with_suffix, Failure, Priority, Registry, RepoAuth,
};

impl Registry {
    /// Fill `buf` with the bytes at `offset` of the `size`-byte blob at
    /// `url`, in this thread's class ([`super::prefetching`]).
    pub fn read_range(&self, url: &str, size: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let priority = current_priority();
        block_on(async {
            let _permit = self.admit(priority).await;
            self.read_range_async(url, size, offset, buf).await
        })
    }

    /// [`Registry::read_range`], async and not admitted (the caller holds
    /// what [`Registry::admit`] gave it).
    pub async fn read_range_async(
        &self,
        url: &str,
        size: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let started = Instant::now();
        let mut done = 0usize;
        let mut failures = 0u32;
        // Not backon's `retry()`: a read that made progress goes on without
        // counting a failure, and the deadline bounds the next wait.
        let mut delays = self.options.retry_delays().build();
        while done < buf.len() {
            let at = offset + done as u64;
            match self.read_once(url, size, at, &mut buf[done..]).await {
                Ok(n) => done += n,
                Err(failure) => {
                    failures += 1;
                    let elapsed = started.elapsed();
                    // Give up when the failure will not pass, when the tries
                    // are spent, or when the next wait would end past the
                    // deadline.
                    let next = if failure.retry { delays.next() } else { None };
                    let Some(delay) = next.filter(|&d| elapsed + d < self.options.deadline) else {
                        let after = if failures > 1 {
                            format!(" (gave up after {failures} tries in {elapsed:.1?})")
                        } else {
                            String::new()
                        };
                        return Err(with_suffix(failure.error, &after));
                    };
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            if done < buf.len() && started.elapsed() >= self.options.deadline {
                return Err(remote_error(
                    libc::ETIMEDOUT,
                    format!(
                        "GET {}: only {done} of {} bytes arrived within {:?}",
                        redact_url(url),
                        buf.len(),
                        self.options.deadline
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether p2p peer `peer` may be tried now: after a failure it is
    /// skipped for a pause that starts at [`PEER_PAUSE`] and doubles with
    /// each failure that follows, up to [`PEER_MAX_PAUSE`].
    pub fn peer_usable(&self, peer: &str) -> bool {
        self.state()
            .peers_down
            .get(peer)
            .is_none_or(|(until, _)| Instant::now() >= *until)
    }

    /// Record how a read through `peer` went.
    pub fn peer_outcome(&self, peer: &str, ok: bool) {
        let mut state = self.state();
        if ok {
            state.peers_down.remove(peer);
            return;
        }
        let pause = match state.peers_down.get(peer) {
            Some((_, last)) => (*last * 2).min(PEER_MAX_PAUSE),
            None => PEER_PAUSE,
        };
        state
            .peers_down
            .insert(peer.to_string(), (Instant::now() + pause, pause));
    }

    /// One attempt at a ranged read through a p2p peer: `<peer>/<url>`,
    /// no credentials, no retries (the caller falls back to the registry).
    pub async fn read_via_peer(
        &self,
        peer: &str,
        url: &str,
        size: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let peer_url = format!("{}/{url}", peer.trim_end_matches('/'));
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let range = range_header(at, buf.len() - done);
            let response = self
                .get(&peer_url, &range, None)
                .await
                .map_err(|f| f.error)?;
            match response.status().as_u16() {
                200 | 206 => {
                    done += self
                        .take_body(response, &peer_url, size, at, &mut buf[done..])
                        .await
                        .map_err(|f| f.error)?
                }
                _ => return Err(status_failure(&response, &peer_url).error),
            }
        }
        Ok(())
    }

    async fn read_once(
        &self,
        url: &str,
        size: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<usize, Failure> {
        let range = range_header(offset, buf.len());
        if let Some(location) = self.cached_redirect(url) {
            let response = self.get(&location, &range, None).await?;
            if matches!(response.status().as_u16(), 200 | 206) {
                return self.take_body(response, &location, size, offset, buf).await;
            }
            // Expired signature, moved object...: ask the registry again.
            self.state().redirects.remove(url);
        }
        // A repository's first read is its probe: sent anonymously, its
        // answer says how the repository wants to be read, and when that
        // answer is the bytes, they are used (no round trip of its own).
        let mut auth = self.known_repo_auth(url);
        let mut renewed = false;
        loop {
            let authorization = match &auth {
                Some(auth) => self.authorization(url, auth, renewed).await?,
                None => None,
            };
            let response = self.get(url, &range, authorization.as_deref()).await?;
            let status = response.status().as_u16();
            if auth.is_none() && matches!(status, 200 | 206 | 301 | 302 | 303 | 307 | 308) {
                self.set_repo_anonymous(url);
            }
            match status {
                200 | 206 => return self.take_body(response, url, size, offset, buf).await,
                301 | 302 | 303 | 307 | 308 => {
                    let location = self.remember_redirect(url, &response)?;
                    let response = self.get(&location, &range, None).await?;
                    return match response.status().as_u16() {
                        200 | 206 => self.take_body(response, &location, size, offset, buf).await,
                        _ => Err(status_failure(&response, &location)),
                    };
                }
                401 | 403 if auth.is_none() => match challenge_of(&response) {
                    Some(challenge) => auth = Some(self.set_repo_auth(url, challenge)),
                    None => return Err(status_failure(&response, url)),
                },
                401 if !renewed => {
                    // The token expired, or the registry changed its mind:
                    // learn the challenge again and renew once.
                    if let Some(challenge) = challenge_of(&response) {
                        auth = Some(self.set_repo_auth(url, challenge));
                    }
                    if matches!(auth, Some(RepoAuth::Anonymous)) {
                        return Err(status_failure(&response, url));
                    }
                    renewed = true;
                }
                _ => return Err(status_failure(&response, url)),
            }
        }
    }

    fn cached_redirect(&self, url: &str) -> Option<String> {
        let mut state = self.state();
        match state.redirects.get(url) {
            Some((location, until)) if *until > Instant::now() => Some(location.clone()),
            Some(_) => {
                state.redirects.remove(url);
                None
            }
            None => None,
        }
    }

    pub(super) fn remember_redirect(
        &self,
        url: &str,
        response: &Response,
    ) -> std::result::Result<String, Failure> {
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                Failure::retry(
                    libc::EIO,
                    format!(
                        "GET {}: HTTP {} without a Location",
                        redact_url(url),
                        response.status().as_u16()
                    ),
                )
            })?;
        let location = resolve_location(url, location);
        let ttl = self.options.redirect_ttl;
        self.state()
            .redirects
            .insert(url.to_string(), (location.clone(), Instant::now() + ttl));
        Ok(location)
    }

    pub(super) async fn get(
        &self,
        url: &str,
        range: &str,
        authorization: Option<&str>,
    ) -> std::result::Result<Response, Failure> {
        let mut request = self.client.get(url).header("Range", range);
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let response = request
            .send()
            .await
            .map_err(|e| transport_failure(e, "GET", url))?;
        if response.version() == reqwest::Version::HTTP_2 {
            self.http2.fetch_add(1, Ordering::Relaxed);
        }
        Ok(response)
    }

    /// Copy the answer to a range request for `[offset, offset +
    /// buf.len())` into `buf`; the number of bytes filled (a 206 may cover
    /// less than was asked).
    async fn take_body(
        &self,
        mut response: Response,
        url: &str,
        size: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<usize, Failure> {
        let name = redact_url(url);
        let bad = |what: String| Failure::retry(libc::EIO, format!("GET {name}: {what}"));
        let status = response.status().as_u16();
        let content_length = header_u64(&response, "content-length");
        let (skip, n) = if status == 206 {
            let text = response
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| bad("206 without a Content-Range".into()))?;
            let (first, last, total) = parse_content_range(text)
                .ok_or_else(|| bad(format!("unreadable Content-Range {text:?}")))?;
            if let Some(total) = total {
                if total != size {
                    return Err(Failure::fatal(
                        libc::EIO,
                        format!(
                            "GET {name}: the blob has {total} bytes, the image config says {size}"
                        ),
                    ));
                }
            }
            let n = last - first + 1;
            if first != offset || n > buf.len() as u64 {
                return Err(bad(format!(
                    "asked for {} bytes at {offset}, got Content-Range {text:?}",
                    buf.len()
                )));
            }
            if content_length.is_some_and(|len| len != n) {
                return Err(bad(format!(
                    "Content-Length {} does not match Content-Range {text:?}",
                    content_length.unwrap_or_default()
                )));
            }
            (0, n as usize)
        } else {
            // The whole blob: skip to the slice we want.
            if let Some(len) = content_length {
                if len != size {
                    return Err(Failure::fatal(
                        libc::EIO,
                        format!(
                            "GET {name}: the blob has {len} bytes, the image config says {size}"
                        ),
                    ));
                }
            }
            (offset, buf.len())
        };
        let mut skipped = 0u64;
        let mut filled = 0;
        while filled < n {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) if skipped < skip => {
                    return Err(bad(format!(
                        "the body ended after {skipped} bytes, before offset {skip}"
                    )))
                }
                Ok(None) => return Err(bad(format!("the body ended after {filled} of {n} bytes"))),
                Err(e) => return Err(body_failure(e, name)),
            };
            let mut data = &chunk[..];
            if skipped < skip {
                let k = (skip - skipped).min(data.len() as u64) as usize;
                skipped += k as u64;
                data = &data[k..];
            }
            let k = (n - filled).min(data.len());
            buf[filled..filled + k].copy_from_slice(&data[..k]);
            filled += k;
        }
        self.body_bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A `Range` value for `len` (> 0) bytes at `offset`.
fn range_header(offset: u64, len: usize) -> String {
    format!("bytes={offset}-{}", offset + len as u64 - 1)
}

/// `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`) → (first, last, total).
pub fn parse_content_range(text: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = text.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.trim().split_once('-')?;
    let first: u64 = first.trim().parse().ok()?;
    let last: u64 = last.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if last < first || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some((first, last, total))
}

fn header_u64(response: &Response, name: &str) -> Option<u64> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn body_failure(e: reqwest::Error, name: &str) -> Failure {
    let errno = if e.is_timeout() {
        libc::ETIMEDOUT
    } else {
        libc::EIO
    };
    Failure::retry(
        errno,
        format!("GET {name}: reading the body: {}", error_text(e)),
    )
}

/// A registry blob as a byte source: `size` bytes at `url`, read with
/// ranged GETs (through a p2p peer first, when one is given).
pub struct RegistryBlob {
    registry: Arc<Registry>,
    url: String,
    size: u64,
    peer: Option<String>,
    name: String,
}

impl RegistryBlob {
    pub fn new(registry: Arc<Registry>, url: &str, size: u64, peer: Option<String>) -> Self {
        RegistryBlob {
            registry,
            url: url.to_string(),
            size,
            peer,
            name: redact_url(url).to_string(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Fill `buf` from `offset`: through the p2p peer when there is one
    /// and it is not paused, else (or when it fails) from the registry.
    /// Admitted in class `priority` first.
    pub async fn read_async(
        &self,
        buf: &mut [u8],
        offset: u64,
        priority: Priority,
    ) -> io::Result<()> {
        check_bounds(self, buf.len(), offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        let started = crate::audit::start();
        let len = buf.len() as u64;
        let result = self.fetch(buf, offset, priority).await;
        crate::audit::record(started, "download", &self.name, offset, len, &result);
        result
    }

    /// [`RegistryBlob::read_async`] of a non-empty range, not audited.
    async fn fetch(&self, buf: &mut [u8], offset: u64, priority: Priority) -> io::Result<()> {
        let _permit = self.registry.admit(priority).await;
        if let Some(peer) = self.peer.as_deref() {
            if self.registry.peer_usable(peer) {
                let ok = self
                    .registry
                    .read_via_peer(peer, &self.url, self.size, offset, buf)
                    .await
                    .is_ok();
                self.registry.peer_outcome(peer, ok);
                if ok {
                    return Ok(());
                }
            }
        }
        self.registry
            .read_range_async(&self.url, self.size, offset, buf)
            .await
    }

    /// Fill every `(offset, buf)` of `parts`, all requests in flight at
    /// once; the outcome of each part, in order.
    pub async fn read_ranges(
        &self,
        parts: &mut [(u64, &mut [u8])],
        priority: Priority,
    ) -> Vec<io::Result<()>> {
        futures_util::future::join_all(
            parts
                .iter_mut()
                .map(|(offset, buf)| self.read_async(buf, *offset, priority)),
        )
        .await
    }
}

impl ReadAt for RegistryBlob {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        block_on(self.read_async(buf, offset, current_priority()))
    }
    fn read_many_at(&self, parts: &mut [(u64, &mut [u8])]) -> Vec<io::Result<()>> {
        block_on(self.read_ranges(parts, current_priority()))
    }
    fn prefetch_turn(&self) -> Option<PrefetchTurn> {
        Some(self.registry.prefetch_turn())
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Fetch for RegistryBlob {
    /// Nothing of a blob read straight from the registry is local.
    fn is_present(&self, _offset: u64, len: u64) -> bool {
        len == 0
    }

    /// Read `[offset, offset + len)` and drop it, in the prefetch class.
    fn warm(&self, offset: u64, len: u64) -> io::Result<u64> {
        prefetching(|| crate::storage::read_and_drop(self, offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 0-0/100"),
            Some((0, 0, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 10-19/*"), Some((10, 19, None)));
        for bad in [
            "bytes 5-4/100",
            "bytes 0-100/100",
            "bytes -1/2",
            "items 0-1/2",
            "bytes 0-1",
            "bytes 0-99999999999999999999999/1",
            "",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }
}
