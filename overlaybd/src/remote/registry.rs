//! The registry protocol for blobs: how to get the bytes `[offset, offset +
//! len)` of `repoBlobUrl/<digest>`, and how to upload a blob.
//!
//! For each repository the first read sends an anonymous probe (`Range:
//! bytes=0-0`, redirects not followed). Its answer decides how the
//! repository is read from then on: anonymously, with Basic auth on every
//! request, or with a Bearer token from the challenge's realm (cached until
//! it expires, renewed once when the registry refuses it). A 3xx to blob
//! storage is remembered for [`RegistryOptions::redirect_ttl`] and followed
//! without credentials; if storage refuses the cached location, the
//! registry is asked again.
//!
//! Every answer is checked before a byte is used: the status, the
//! `Content-Range` (start, end and total size), the `Content-Length`, and
//! the body length. A 200 to a range request is accepted by skipping to the
//! wanted slice. A failure that may pass (a transport error, a timeout, a
//! short body, 5xx, 429) is retried with exponential backoff, a bounded
//! number of times and within a deadline; one that will not (401/403, 404,
//! a bad request) is reported at once.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ureq::http::Response;
use ureq::Body;

use crate::config::GlobalConfig;
use crate::credentials::Credential;
use crate::error::Result;
use crate::io::{check_bounds, ReadAt};
use crate::storage::Fetch;

use super::auth::{
    basic_header, credential_source, parse_challenges, query_escape, token_lifetime, Challenge,
    CredentialSource, Token,
};
use super::{redact_url, remote_error};

/// Timeouts, retries and identity of registry requests.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Longest wait for a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Longest wait for any bytes of an answer (headers or body).
    pub read_timeout: Duration,
    /// Attempts per read, the first included.
    pub tries: u32,
    /// Wait before the second attempt; doubled each time, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// A read gives up after this long, whatever `tries` says (also the
    /// limit for one request, so a trickling body cannot hold a read forever).
    pub deadline: Duration,
    /// How long a redirect to blob storage is reused.
    pub redirect_ttl: Duration,
    pub user_agent: String,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
            tries: 5,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            deadline: Duration::from_secs(60),
            redirect_ttl: Duration::from_secs(300),
            user_agent: concat!("obd/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

impl RegistryOptions {
    pub fn from_global(global: &GlobalConfig) -> Self {
        let mut options = RegistryOptions::default();
        if let Some(agent) = &global.user_agent {
            options.user_agent = agent.clone();
        }
        options
    }
}

/// How a repository wants to be read, learnt from the probe.
#[derive(Clone, Debug)]
enum RepoAuth {
    Anonymous,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

#[derive(Default)]
struct State {
    /// Repository key (the URL up to `/blobs`) → how it authenticates.
    repos: HashMap<String, RepoAuth>,
    /// `realm service scope` → token.
    tokens: HashMap<String, Token>,
    /// Blob URL → (storage location, valid until).
    redirects: HashMap<String, (String, Instant)>,
}

/// A failed attempt, and whether trying again may help.
struct Failure {
    error: io::Error,
    retry: bool,
}

impl Failure {
    fn retry(errno: i32, message: String) -> Failure {
        Failure {
            error: remote_error(errno, message),
            retry: true,
        }
    }
    fn fatal(errno: i32, message: String) -> Failure {
        Failure {
            error: remote_error(errno, message),
            retry: false,
        }
    }
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        Failure {
            error,
            retry: false,
        }
    }
}

/// A registry client: one HTTP agent (connection pool), and the auth,
/// token and redirect caches shared by every blob read through it.
pub struct Registry {
    agent: ureq::Agent,
    options: RegistryOptions,
    credentials: Box<dyn CredentialSource>,
    state: Mutex<State>,
    requests: AtomicU64,
    body_bytes: AtomicU64,
}

impl Registry {
    /// A client using the global config's credentials.
    pub fn new(options: RegistryOptions, global: &GlobalConfig) -> Result<Registry> {
        let agent = make_agent(&options);
        let credentials = credential_source(&global.credential_config, &agent)?;
        Ok(Self::from_parts(agent, options, credentials))
    }

    /// A client with explicit credentials.
    pub fn with_credentials(
        options: RegistryOptions,
        credentials: Box<dyn CredentialSource>,
    ) -> Registry {
        Self::from_parts(make_agent(&options), options, credentials)
    }

    fn from_parts(
        agent: ureq::Agent,
        options: RegistryOptions,
        credentials: Box<dyn CredentialSource>,
    ) -> Registry {
        Registry {
            agent,
            options,
            credentials,
            state: Mutex::new(State::default()),
            requests: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
        }
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// HTTP requests sent so far (token requests included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Blob bytes received so far.
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes.load(Ordering::Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fill `buf` with the bytes at `offset` of the `size`-byte blob at `url`.
    pub fn read_range(&self, url: &str, size: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let started = Instant::now();
        let mut done = 0usize;
        let mut failures = 0u32;
        let mut backoff = self.options.backoff;
        while done < buf.len() {
            let at = offset + done as u64;
            match self.read_once(url, size, at, &mut buf[done..]) {
                Ok(n) => done += n,
                Err(failure) => {
                    failures += 1;
                    let elapsed = started.elapsed();
                    if !failure.retry
                        || failures >= self.options.tries
                        || elapsed + backoff >= self.options.deadline
                    {
                        let after = if failures > 1 {
                            format!(" (gave up after {failures} tries in {elapsed:.1?})")
                        } else {
                            String::new()
                        };
                        return Err(with_suffix(failure.error, &after));
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.options.max_backoff);
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

    /// One attempt at a ranged read through a p2p peer: `<peer>/<url>`,
    /// no credentials, no retries (the caller falls back to the registry).
    pub fn read_via_peer(
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
            let response = self.get(&peer_url, &range, None).map_err(|f| f.error)?;
            match response.status().as_u16() {
                200 | 206 => {
                    done += self
                        .take_body(response, &peer_url, size, at, &mut buf[done..])
                        .map_err(|f| f.error)?
                }
                _ => return Err(status_failure(&response, &peer_url).error),
            }
        }
        Ok(())
    }

    fn read_once(
        &self,
        url: &str,
        size: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<usize, Failure> {
        let range = range_header(offset, buf.len());
        if let Some(location) = self.cached_redirect(url) {
            let response = self.get(&location, &range, None)?;
            if matches!(response.status().as_u16(), 200 | 206) {
                return self.take_body(response, &location, size, offset, buf);
            }
            // Expired signature, moved object...: ask the registry again.
            self.state().redirects.remove(url);
        }
        let mut auth = self.repo_auth(url)?;
        let mut renewed = false;
        loop {
            let authorization = self.authorization(url, &auth, renewed)?;
            let response = self.get(url, &range, authorization.as_deref())?;
            match response.status().as_u16() {
                200 | 206 => return self.take_body(response, url, size, offset, buf),
                301 | 302 | 303 | 307 | 308 => {
                    let location = self.remember_redirect(url, &response)?;
                    let response = self.get(&location, &range, None)?;
                    return match response.status().as_u16() {
                        200 | 206 => self.take_body(response, &location, size, offset, buf),
                        _ => Err(status_failure(&response, &location)),
                    };
                }
                401 if !renewed => {
                    // The token expired, or the registry changed its mind:
                    // learn the challenge again and renew once.
                    if let Some(challenge) = challenge_of(&response) {
                        auth = self.set_repo_auth(url, challenge);
                    }
                    if matches!(auth, RepoAuth::Anonymous) {
                        return Err(status_failure(&response, url));
                    }
                    renewed = true;
                }
                _ => return Err(status_failure(&response, url)),
            }
        }
    }

    /// How `url`'s repository authenticates; the first time, find out with
    /// the anonymous probe.
    fn repo_auth(&self, url: &str) -> std::result::Result<RepoAuth, Failure> {
        let key = repo_key(url);
        if let Some(auth) = self.state().repos.get(key) {
            return Ok(auth.clone());
        }
        let response = self.get(url, "bytes=0-0", None)?;
        let auth = match response.status().as_u16() {
            200 | 206 => RepoAuth::Anonymous,
            301 | 302 | 303 | 307 | 308 => {
                self.remember_redirect(url, &response)?;
                RepoAuth::Anonymous
            }
            401 | 403 => match challenge_of(&response) {
                Some(challenge) => return Ok(self.set_repo_auth(url, challenge)),
                None => return Err(status_failure(&response, url)),
            },
            _ => return Err(status_failure(&response, url)),
        };
        self.state().repos.insert(key.to_string(), auth.clone());
        Ok(auth)
    }

    fn set_repo_auth(&self, url: &str, challenge: Challenge) -> RepoAuth {
        let auth = match challenge {
            Challenge::Basic => RepoAuth::Basic,
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => RepoAuth::Bearer {
                realm,
                service,
                scope: scope.or_else(|| default_scope(url)),
            },
        };
        self.state()
            .repos
            .insert(repo_key(url).to_string(), auth.clone());
        auth
    }

    fn credential(&self, url: &str) -> io::Result<Option<Credential>> {
        self.credentials.lookup(url)
    }

    /// The `Authorization` value for a request to `url`; `renew` forces a
    /// new token.
    fn authorization(
        &self,
        url: &str,
        auth: &RepoAuth,
        renew: bool,
    ) -> std::result::Result<Option<String>, Failure> {
        match auth {
            RepoAuth::Anonymous => Ok(None),
            RepoAuth::Basic => match self.credential(url)? {
                Some(credential) => Ok(Some(basic_header(&credential))),
                None => Err(Failure::fatal(
                    libc::EPERM,
                    format!(
                        "{}: the registry wants a user name and password (Basic auth) and no credential matches this repository",
                        redact_url(url)
                    ),
                )),
            },
            RepoAuth::Bearer {
                realm,
                service,
                scope,
            } => {
                let key = format!(
                    "{realm} {} {}",
                    service.as_deref().unwrap_or(""),
                    scope.as_deref().unwrap_or("")
                );
                if !renew {
                    if let Some(token) = self.state().tokens.get(&key) {
                        if token.expires > Instant::now() {
                            return Ok(Some(format!("Bearer {}", token.value)));
                        }
                    }
                }
                let token = self.fetch_token(url, realm, service.as_deref(), scope.as_deref())?;
                let header = format!("Bearer {}", token.value);
                self.state().tokens.insert(key, token);
                Ok(Some(header))
            }
        }
    }

    fn fetch_token(
        &self,
        url: &str,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> std::result::Result<Token, Failure> {
        let mut query = Vec::new();
        if let Some(service) = service {
            query.push(format!("service={}", query_escape(service)));
        }
        if let Some(scope) = scope {
            query.push(format!("scope={}", query_escape(scope)));
        }
        let separator = if realm.contains('?') { '&' } else { '?' };
        let token_url = if query.is_empty() {
            realm.to_string()
        } else {
            format!("{realm}{separator}{}", query.join("&"))
        };
        let mut request = self.agent.get(&token_url);
        if let Some(credential) = self.credential(url)? {
            request = request.header("Authorization", basic_header(&credential));
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut response = request
            .call()
            .map_err(|e| transport_failure(e, "token request to", realm))?;
        let status = response.status().as_u16();
        if status != 200 {
            let mut failure = status_failure(&response, realm);
            failure.error = with_suffix(
                failure.error,
                &format!(" (token server, for {})", redact_url(url)),
            );
            return Err(failure);
        }
        let text = response
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_string()
            .map_err(|e| transport_failure(e, "token from", realm))?;
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let bad = |what: &str| {
            Failure::fatal(
                libc::EPERM,
                format!("token server {}: {what}", redact_url(realm)),
            )
        };
        let answer: Answer =
            serde_json::from_str(&text).map_err(|_| bad("the answer is not a token (JSON)"))?;
        let value = answer
            .token
            .filter(|t| !t.is_empty())
            .or(answer.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| bad("the answer has neither `token` nor `access_token`"))?;
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("the token holds characters a header cannot carry"));
        }
        Ok(Token {
            value,
            expires: Instant::now() + token_lifetime(answer.expires_in),
        })
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

    fn remember_redirect(
        &self,
        url: &str,
        response: &Response<Body>,
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

    fn get(
        &self,
        url: &str,
        range: &str,
        authorization: Option<&str>,
    ) -> std::result::Result<Response<Body>, Failure> {
        let mut request = self.agent.get(url).header("Range", range);
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        request.call().map_err(|e| transport_failure(e, "GET", url))
    }

    /// Copy the answer to a range request for `[offset, offset +
    /// buf.len())` into `buf`; the number of bytes filled (a 206 may cover
    /// less than was asked).
    fn take_body(
        &self,
        response: Response<Body>,
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
        let mut reader = response
            .into_body()
            .into_with_config()
            .limit(u64::MAX)
            .reader();
        if skip > 0 {
            let skipped = io::copy(&mut (&mut reader).take(skip), &mut io::sink())
                .map_err(|e| body_failure(e, name))?;
            if skipped != skip {
                return Err(bad(format!(
                    "the body ended after {skipped} bytes, before offset {skip}"
                )));
            }
        }
        let mut filled = 0;
        while filled < n {
            match reader.read(&mut buf[filled..n]) {
                Ok(0) => return Err(bad(format!("the body ended after {filled} of {n} bytes"))),
                Ok(k) => filled += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(body_failure(e, name)),
            }
        }
        self.body_bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    // -- uploads --------------------------------------------------------

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
        let mut failures = 0;
        let mut backoff = self.options.backoff;
        loop {
            match self.exchange_once(method, url, body) {
                Ok(response) => return Ok(response),
                Err(failure) => {
                    failures += 1;
                    if !failure.retry || failures >= self.options.tries {
                        return Err(failure.error);
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.options.max_backoff);
                }
            }
        }
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

fn make_agent(options: &RegistryOptions) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_connect(Some(options.connect_timeout))
        .timeout_per_read(Some(options.read_timeout))
        .timeout_per_call(Some(options.deadline))
        .user_agent(options.user_agent.as_str())
        .build()
        .into()
}

/// A `Range` value for `len` (> 0) bytes at `offset`.
fn range_header(offset: u64, len: usize) -> String {
    format!("bytes={offset}-{}", offset + len as u64 - 1)
}

/// The part of a URL naming its repository: up to the last `/blobs`
/// component (the whole URL when there is none).
pub fn repo_key(url: &str) -> &str {
    let path_start = url
        .find("://")
        .map(|i| i + 3)
        .and_then(|i| url[i..].find('/').map(|j| i + j))
        .unwrap_or(url.len());
    let path = &url[path_start..];
    let mut end = None;
    let mut search = 0;
    while let Some(i) = path[search..].find("/blobs") {
        let at = search + i + "/blobs".len();
        if path[at..].is_empty() || path[at..].starts_with('/') {
            end = Some(at);
        }
        search = at;
    }
    match end {
        Some(end) => &url[..path_start + end],
        None => url,
    }
}

/// `repository:<name>:pull` for a `/v2/<name>/blobs/...` URL.
fn default_scope(url: &str) -> Option<String> {
    let key = repo_key(url);
    let path = key.split_once("/v2/")?.1;
    let name = path.strip_suffix("/blobs")?;
    (!name.is_empty()).then(|| format!("repository:{name}:pull"))
}

/// A `Location` made absolute against the URL that answered with it.
pub fn resolve_location(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_string();
    }
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let authority_end = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{}{rest}", &base[..scheme_end]);
    }
    if location.starts_with('/') {
        return format!("{}{location}", &base[..authority_end]);
    }
    let path = redact_url(base);
    let dir_end = path.rfind('/').filter(|&i| i >= authority_end);
    match dir_end {
        Some(i) => format!("{}/{location}", &path[..i]),
        None => format!("{}/{location}", &base[..authority_end]),
    }
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

fn header_u64(response: &Response<Body>, name: &str) -> Option<u64> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn challenge_of(response: &Response<Body>) -> Option<Challenge> {
    parse_challenges(
        response
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

/// What a non-success status means for the caller.
fn status_failure(response: &Response<Body>, url: &str) -> Failure {
    let status = response.status().as_u16();
    let name = redact_url(url);
    match status {
        401 | 403 => Failure::fatal(
            libc::EPERM,
            format!("GET {name}: HTTP {status}: access denied (check the credentials for this repository)"),
        ),
        404 => Failure::fatal(libc::ENOENT, format!("GET {name}: HTTP 404: no such blob")),
        429 => Failure::retry(
            libc::EBUSY,
            format!("GET {name}: HTTP 429: the registry is throttling requests"),
        ),
        408 | 500..=599 => Failure::retry(libc::EIO, format!("GET {name}: HTTP {status}")),
        _ => Failure::fatal(libc::EIO, format!("GET {name}: unexpected HTTP {status}")),
    }
}

fn transport_failure(e: ureq::Error, what: &str, url: &str) -> Failure {
    let name = redact_url(url);
    match e {
        ureq::Error::Timeout(t) => {
            Failure::retry(libc::ETIMEDOUT, format!("{what} {name}: timed out ({t})"))
        }
        ureq::Error::BadUri(_) | ureq::Error::Http(_) => {
            Failure::fatal(libc::EINVAL, format!("{what} {name}: bad request: {e}"))
        }
        e => Failure::retry(libc::EIO, format!("{what} {name}: {e}")),
    }
}

fn body_failure(e: io::Error, name: &str) -> Failure {
    let errno = if e.kind() == io::ErrorKind::TimedOut {
        libc::ETIMEDOUT
    } else {
        libc::EIO
    };
    Failure::retry(errno, format!("GET {name}: reading the body: {e}"))
}

/// `e` with `suffix` appended to its message, kind and errno kept.
fn with_suffix(e: io::Error, suffix: &str) -> io::Error {
    if suffix.is_empty() {
        return e;
    }
    let errno = super::errno_of(&e);
    remote_error(errno, format!("{e}{suffix}"))
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
}

impl ReadAt for RegistryBlob {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self, buf.len(), offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(peer) = &self.peer {
            if self
                .registry
                .read_via_peer(peer, &self.url, self.size, offset, buf)
                .is_ok()
            {
                return Ok(());
            }
        }
        self.registry.read_range(&self.url, self.size, offset, buf)
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

    #[test]
    fn repo_keys_and_scopes() {
        let url = "https://r.example.com/v2/ns/app/blobs/sha256:ab";
        assert_eq!(repo_key(url), "https://r.example.com/v2/ns/app/blobs");
        assert_eq!(
            repo_key("http://h/v2/a/blobs/uploads/xyz?_state=1"),
            "http://h/v2/a/blobs"
        );
        assert_eq!(repo_key("http://h/other"), "http://h/other");
        assert_eq!(
            default_scope(url).as_deref(),
            Some("repository:ns/app:pull")
        );
    }

    #[test]
    fn locations() {
        let base = "http://h:5000/v2/a/blobs/sha256:1";
        assert_eq!(
            resolve_location(base, "https://s3/x?sig=1"),
            "https://s3/x?sig=1"
        );
        assert_eq!(resolve_location(base, "/v2/b"), "http://h:5000/v2/b");
        assert_eq!(resolve_location(base, "//cdn/x"), "http://cdn/x");
        assert_eq!(
            resolve_location(base, "other"),
            "http://h:5000/v2/a/blobs/other"
        );
    }
}
