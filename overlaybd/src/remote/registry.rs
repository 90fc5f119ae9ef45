//! The registry protocol for blobs: how to get the bytes `[offset, offset +
//! len)` of `repoBlobUrl/<digest>`, and how to upload a blob.
//!
//! For each repository the first read is sent anonymously (redirects not
//! followed) as the probe: its answer decides how the repository is read
//! from then on, and when the answer is the bytes they are used, so an
//! anonymous registry costs no extra round trip. The repository is read
//! anonymously, with Basic auth on every request, or with a Bearer token
//! from the challenge's realm (cached until it expires, renewed once when
//! the registry refuses it). A 3xx to blob
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
//! ## The fetch engine
//!
//! One async engine per process: every [`Registry`] sends its requests
//! with reqwest (hyper) on one process-wide tokio runtime ([`runtime`], two
//! worker threads that drive the connections and timers). A `Registry` has
//! one `reqwest::Client`, so one connection pool: connections to a host are
//! reused, many requests to one host and one blob are in flight at once,
//! and HTTP/2 is used where the registry offers it through TLS ALPN (plain
//! http stays HTTP/1.1: reqwest does not try h2c without being told).
//!
//! The engine's callers are synchronous threads (CLI tools, TCMU workers,
//! the ublk offload pool, prefetch workers). The blocking API
//! ([`Registry::read_range`], [`RegistryBlob`]'s `ReadAt`, uploads...) is a
//! thin [`block_on`] over the async functions: the calling thread drives
//! its own request futures and waits, nothing else. A read that covers
//! several separate ranges ([`RegistryBlob::read_ranges`], which the blob
//! cache uses for the separate runs of one miss) sends all of them at once
//! and waits for the last.
//!
//! Priority, kept simple: two classes. On-demand reads (someone is waiting
//! for the bytes) are admitted at once, unbounded. Prefetch reads (a
//! thread inside [`prefetching`]: `Fetch::warm`, the background download)
//! first take a permit from a per-registry semaphore of
//! [`RegistryOptions::prefetch_requests`] permits and hold it for the whole
//! read, retries included. However many prefetch workers there are, at most
//! that many prefetch reads are on the wire, so an on-demand read never
//! queues behind prefetch in the engine; it shares the connections and the
//! link with those few. (A chunk the cache already has a prefetch fetching
//! is waited for, single-flight, rather than asked for twice.)
//!
//! Merging adjacent and overlapping misses and the read-ahead that grows
//! while a reader stays sequential live one level up, in the blob cache
//! (`remote/cache.rs`), which hands the engine one range per run.
//!
//! The work is split by job: [`authorization`] (the probe, Basic, Bearer
//! tokens), [`ranged_reads`] (blob reads, redirects, answer checks) and
//! [`uploads`] (`HEAD`, `POST` + `PUT` of whole blobs), [`manifests`] (`GET`
//! and `PUT` of manifests by tag or digest). This file holds what
//! they share: the runtime, the client and its caches, the options, the
//! retry policy and what a failed answer means.

mod authorization;
mod manifests;
mod ranged_reads;
mod uploads;

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use backon::ExponentialBuilder;
use reqwest::Response;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

use crate::config::GlobalConfig;
use crate::error::Result;
use crate::io::PrefetchTurn;

use super::auth::{credential_source, CredentialSource, Token};
use super::{redact_url, remote_error};

pub use manifests::MANIFEST_TYPES;
pub use ranged_reads::{parse_content_range, RegistryBlob};
pub use uploads::UploadProgress;

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
    /// Prefetch reads on the wire at once (per registry client); on-demand
    /// reads are not limited.
    pub prefetch_requests: usize,
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
            prefetch_requests: 8,
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
    /// doubled each time up to `max_backoff`, `tries - 1` of them, each
    /// plus a random part of up to itself (backon's jitter), so that many
    /// readers failing together do not come back together.
    fn retry_delays(&self) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_min_delay(self.backoff)
            .with_factor(2.0)
            .with_max_delay(self.max_backoff)
            .with_max_times(self.tries.saturating_sub(1) as usize)
            .with_jitter()
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

/// Which class a read belongs to (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Someone is waiting for the bytes: admitted at once.
    OnDemand,
    /// Prefetch or background download: bounded by
    /// [`RegistryOptions::prefetch_requests`].
    Prefetch,
    /// A prefetch that holds its turn already ([`Registry::prefetch_turn`]).
    Admitted,
}

thread_local! {
    static PRIORITY: Cell<Priority> = const { Cell::new(Priority::OnDemand) };
}

/// Run `f` with this thread's registry reads in the prefetch class.
pub fn prefetching<R>(f: impl FnOnce() -> R) -> R {
    let before = PRIORITY.with(|p| p.replace(Priority::Prefetch));
    struct Restore(Priority);
    impl Drop for Restore {
        fn drop(&mut self) {
            PRIORITY.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// The class of this thread's registry reads now.
pub fn current_priority() -> Priority {
    PRIORITY.with(Cell::get)
}

/// The process-wide runtime every registry client's requests run on: two
/// worker threads for connections and timers. Created on first use.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("obd-fetch")
            .enable_io()
            .enable_time()
            .build()
            .expect("cannot start the fetch engine's runtime")
    })
}

/// Run `future` on [`runtime`] and wait for it on this thread. From a
/// thread that is already inside a tokio runtime (where blocking on
/// another is refused), a helper thread waits instead.
pub fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|scope| {
            scope
                .spawn(|| runtime().block_on(future))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    } else {
        runtime().block_on(future)
    }
}

/// A registry client: one HTTP client (connection pool), and the auth,
/// token and redirect caches shared by every blob read through it.
pub struct Registry {
    client: reqwest::Client,
    options: RegistryOptions,
    credentials: Box<dyn CredentialSource>,
    state: Mutex<State>,
    /// Permits for prefetch reads on the wire.
    prefetch: Arc<Semaphore>,
    requests: AtomicU64,
    body_bytes: AtomicU64,
    http2: AtomicU64,
}

impl Registry {
    /// A client using the global config's credentials and `certConfig`.
    pub fn new(options: RegistryOptions, global: &GlobalConfig) -> Result<Registry> {
        let client = make_client(&options, super::tls::registry_tls(&global.cert_config)?)?;
        let credentials = credential_source(&global.credential_config, &options.user_agent)?;
        Ok(Self::from_parts(client, options, credentials))
    }

    /// A client with explicit credentials and the default TLS roots.
    /// Panics when `options.user_agent` cannot be a header value.
    pub fn with_credentials(
        options: RegistryOptions,
        credentials: Box<dyn CredentialSource>,
    ) -> Registry {
        let client = make_client(&options, super::tls::default_tls())
            .expect("an HTTP client with the default TLS settings");
        Self::from_parts(client, options, credentials)
    }

    fn from_parts(
        client: reqwest::Client,
        options: RegistryOptions,
        credentials: Box<dyn CredentialSource>,
    ) -> Registry {
        Registry {
            client,
            prefetch: Arc::new(Semaphore::new(options.prefetch_requests.max(1))),
            options,
            credentials,
            state: Mutex::new(State::default()),
            requests: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            http2: AtomicU64::new(0),
        }
    }

    /// Wait until a read of class `priority` may go on the wire; the
    /// permit (prefetch only) is to be held until it is done.
    pub async fn admit(&self, priority: Priority) -> Option<SemaphorePermit<'_>> {
        match priority {
            Priority::OnDemand | Priority::Admitted => None,
            // The semaphore is never closed: `acquire` cannot fail.
            Priority::Prefetch => self.prefetch.acquire().await.ok(),
        }
    }

    /// Wait (this thread blocks) for a prefetch permit and hold it, with
    /// this thread's reads in [`Priority::Admitted`], until the turn is
    /// dropped (on this thread).
    pub fn prefetch_turn(&self) -> PrefetchTurn {
        struct Turn {
            _permit: Option<OwnedSemaphorePermit>,
            before: Priority,
        }
        impl Drop for Turn {
            fn drop(&mut self) {
                PRIORITY.with(|p| p.set(self.before));
            }
        }
        // The semaphore is never closed: `acquire_owned` cannot fail.
        let permit = block_on(self.prefetch.clone().acquire_owned()).ok();
        let before = PRIORITY.with(|p| p.replace(Priority::Admitted));
        PrefetchTurn::new(Turn {
            _permit: permit,
            before,
        })
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// HTTP requests sent so far (token requests included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Answers to blob GETs that came over HTTP/2.
    pub fn http2_responses(&self) -> u64 {
        self.http2.load(Ordering::Relaxed)
    }

    /// Blob bytes received so far.
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes.load(Ordering::Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The HTTP client: redirects not followed (they are handled here, without
/// credentials), a connect timeout, a timeout for each read of an answer,
/// and `deadline` for a whole request, body included.
fn make_client(options: &RegistryOptions, tls: rustls::ClientConfig) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(options.connect_timeout)
        .read_timeout(options.read_timeout)
        .timeout(options.deadline)
        .user_agent(options.user_agent.as_str())
        .build()
        .map_err(|e| {
            crate::error::Error::Invalid(format!("cannot make the HTTP client: {}", error_text(e)))
        })
}

/// What went wrong, with its causes, and without the URL (which may hold
/// a signed query or user info).
pub fn error_text(e: reqwest::Error) -> String {
    use std::error::Error as _;
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The body of `response`, at most `limit` bytes.
pub async fn read_limited(
    mut response: Response,
    limit: usize,
) -> std::result::Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(error_text)? {
        if body.len() + chunk.len() > limit {
            return Err(format!("the answer is over {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The part of a URL naming its repository: up to the last `/blobs`
/// component, or for a manifest up to `/manifests` (the whole URL when
/// there is neither).
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
    if end.is_none() {
        if let Some(i) = path.rfind("/manifests/") {
            end = Some(i + "/manifests".len());
        }
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
fn status_failure(response: &Response, url: &str) -> Failure {
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

fn transport_failure(e: reqwest::Error, what: &str, url: &str) -> Failure {
    let name = redact_url(url);
    if e.is_timeout() {
        Failure::retry(
            libc::ETIMEDOUT,
            format!("{what} {name}: timed out ({})", error_text(e)),
        )
    } else if e.is_builder() {
        Failure::fatal(
            libc::EINVAL,
            format!("{what} {name}: bad request: {}", error_text(e)),
        )
    } else {
        Failure::retry(libc::EIO, format!("{what} {name}: {}", error_text(e)))
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
        assert_eq!(
            repo_key("http://h/v2/ns/app/manifests/v1"),
            "http://h/v2/ns/app/manifests"
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
    fn retry_delays_double_up_to_the_cap_with_jitter() {
        use backon::BackoffBuilder;
        let options = RegistryOptions {
            tries: 6,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            ..RegistryOptions::default()
        };
        for _ in 0..20 {
            let delays: Vec<u128> = options
                .retry_delays()
                .build()
                .map(|d| d.as_millis())
                .collect();
            assert_eq!(delays.len(), 5);
            for (delay, base) in delays.iter().zip([100, 200, 400, 500, 500]) {
                assert!((base..=2 * base).contains(delay), "{delays:?}");
            }
        }
        let once = RegistryOptions {
            tries: 1,
            ..RegistryOptions::default()
        };
        assert_eq!(once.retry_delays().build().count(), 0);
    }
}
