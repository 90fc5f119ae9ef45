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
//! Where credentials go: Basic credentials only to the host of the URL they
//! were looked up for, a token request with credentials only to the realm
//! the registry's challenge names, nothing to a redirect target or a p2p
//! peer, and credentials at all only over https or plain http to a
//! loopback address ([`super::auth::may_send_credentials`]): a Basic
//! registry on plain http elsewhere is refused with a message saying why,
//! and a plain-http token realm elsewhere is asked for an anonymous token.
//!
//! Every answer is checked before a byte is used: the status, the
//! `Content-Range` (start, end and total size), the `Content-Length`, and
//! the body length. A 200 to a range request is accepted by skipping to the
//! wanted slice. A failure that may pass (a transport error, a timeout, a
//! short body, 5xx, 429) is retried with exponential backoff, a bounded
//! number of times and within a deadline; one that will not (401/403, 404,
//! a bad request) is reported at once.

//!
//! The work is split by job: [`authorization`] (the probe, Basic, Bearer
//! tokens), [`ranged_reads`] (blob reads, redirects, answer checks) and
//! [`uploads`] (`HEAD`, `POST` + `PUT` of whole blobs). This file holds what
//! they share: the client and its caches, the options, the retry policy and
//! what a failed answer means.

mod authorization;
mod ranged_reads;
mod uploads;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use backon::ExponentialBuilder;
use ureq::http::Response;
use ureq::Body;

use crate::config::GlobalConfig;
use crate::error::Result;

use super::auth::{credential_source, CredentialSource, Token};
use super::{redact_url, remote_error};

pub use ranged_reads::{parse_content_range, RegistryBlob};

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

    /// The waits between the attempts of one read or upload: `backoff`,
    /// doubled each time up to `max_backoff`, `tries - 1` of them (no
    /// jitter: `with_jitter()` would add up to one more wait at random).
    fn retry_delays(&self) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_min_delay(self.backoff)
            .with_factor(2.0)
            .with_max_delay(self.max_backoff)
            .with_max_times(self.tries.saturating_sub(1) as usize)
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
    /// Token realms already reported as getting no credentials (plain
    /// http to a host that is not loopback), so the log says it once.
    warned: std::collections::HashSet<String>,
    /// p2p peers that failed: skipped until then, and the pause that the
    /// next failure doubles.
    peers_down: HashMap<String, (Instant, Duration)>,
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
    /// A client using the global config's credentials and `certConfig`.
    pub fn new(options: RegistryOptions, global: &GlobalConfig) -> Result<Registry> {
        let agent = make_agent(&options, super::tls::registry_tls(&global.cert_config)?);
        let credentials = credential_source(&global.credential_config, &options.user_agent)?;
        Ok(Self::from_parts(agent, options, credentials))
    }

    /// A client with explicit credentials and the default TLS roots.
    pub fn with_credentials(
        options: RegistryOptions,
        credentials: Box<dyn CredentialSource>,
    ) -> Registry {
        let agent = make_agent(&options, super::tls::default_tls());
        Self::from_parts(agent, options, credentials)
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
}

fn make_agent(options: &RegistryOptions, tls: ureq::tls::TlsConfig) -> ureq::Agent {
    ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_connect(Some(options.connect_timeout))
        .timeout_per_read(Some(options.read_timeout))
        .timeout_per_call(Some(options.deadline))
        .user_agent(options.user_agent.as_str())
        .build()
        .into()
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

/// A `Location` made absolute against the URL that answered with it (RFC
/// 3986 reference resolution). One that does not resolve is kept as it is,
/// and the request to it then fails as a bad URL.
pub fn resolve_location(base: &str, location: &str) -> String {
    url::Url::parse(base)
        .and_then(|base| base.join(location))
        .map(String::from)
        .unwrap_or_else(|_| location.to_string())
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

/// `e` with `suffix` appended to its message, kind and errno kept.
fn with_suffix(e: io::Error, suffix: &str) -> io::Error {
    if suffix.is_empty() {
        return e;
    }
    let errno = super::errno_of(&e);
    remote_error(errno, format!("{e}{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_keys() {
        let url = "https://r.example.com/v2/ns/app/blobs/sha256:ab";
        assert_eq!(repo_key(url), "https://r.example.com/v2/ns/app/blobs");
        assert_eq!(
            repo_key("http://h/v2/a/blobs/uploads/xyz?_state=1"),
            "http://h/v2/a/blobs"
        );
        assert_eq!(repo_key("http://h/other"), "http://h/other");
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
        assert_eq!(
            resolve_location("http://h/v2/a/blobs/uploads/?x=1", "u1?_state=s"),
            "http://h/v2/a/blobs/uploads/u1?_state=s"
        );
        assert_eq!(
            resolve_location(base, "../b/blobs/x"),
            "http://h:5000/v2/a/b/blobs/x"
        );
    }

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        use backon::BackoffBuilder;
        let options = RegistryOptions {
            tries: 6,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            ..RegistryOptions::default()
        };
        let delays: Vec<u128> = options
            .retry_delays()
            .build()
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        let once = RegistryOptions {
            tries: 1,
            ..RegistryOptions::default()
        };
        assert_eq!(once.retry_delays().build().count(), 0);
    }
}
