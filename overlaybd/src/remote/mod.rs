//! Registry blobs, read lazily: the point of overlaybd is that an image whose
//! layers live in a registry serves its first read after fetching only the
//! layer indexes, and fetches everything else on demand.
//!
//! - [`registry`]: the HTTP side. A [`registry::Registry`] speaks the
//!   registry protocol (anonymous probe, Bearer tokens, Basic auth, cached
//!   redirects to blob storage, ranged GETs with bounded retries) and a
//!   [`registry::RegistryBlob`] is a [`ReadAt`](crate::io::ReadAt) over one
//!   `repoBlobUrl/<digest>`.
//! - [`auth`]: `WWW-Authenticate` parsing and where credentials come from.
//! - [`tls`]: the trusted roots and the client certificate.
//! - [`cache`]: a sparse file per blob filled in `refillSize` chunks, a
//!   persistent record of which chunks are present, single-flight misses and
//!   LRU eviction of whole blobs.
//! - [`download`]: the background download of whole blobs into a lower's
//!   `dir`.
//!
//! One async fetch engine per process: reqwest (one connection pool per
//! client, HTTP/2 where a registry offers it over TLS) on one shared tokio
//! runtime with two worker threads ([`registry::runtime`]). Every caller
//! in the engine is synchronous (CLI tools, TCMU workers, the ublk offload
//! pool, prefetch workers), so the public API stays blocking: each call is
//! a `block_on` of an async function, the calling thread waits for its own
//! requests and nothing holds a lock across network I/O, so many misses
//! are in flight at once. The blob cache merges adjacent misses and reads
//! ahead for sequential readers and hands the separate runs of one read to
//! the engine together; prefetch (`Fetch::warm`, background downloads) is
//! a lower class than on-demand reads (see [`registry`]).
//!
//! Errors are `io::Error`s whose kind and [`errno_of`] say what a block front
//! end should answer: 401/403 → `EPERM`, 404 → `ENOENT`, 429 → `EBUSY`,
//! anything else that failed → `EIO`/`ETIMEDOUT`. Messages name the URL
//! (without its query, which may hold a signed storage token) and never a
//! credential.

pub mod auth;
pub mod cache;
pub mod download;
pub mod registry;
pub mod tls;

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use crate::config::{DownloadConfig, GlobalConfig, ImageConfig};
pub use crate::error::{errno_of, remote_error, RemoteError};
use crate::error::{Error, Result};
use crate::io::Source;

/// `url` without its query and fragment, for messages: a redirect to blob
/// storage usually carries a signature there.
pub fn redact_url(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// (`sha256:<hex>`, size) of a file: the digest a registry stores it under.
pub fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), size))
}

/// Everything an image needs to read registry blobs: one client (token and
/// redirect caches shared by all layers), the blob cache, p2p settings.
/// Built from the global config; the cache directory is created only when a
/// blob is first opened, so images with local layers never touch it.
pub struct Remote {
    global: GlobalConfig,
    registry: Arc<registry::Registry>,
    cache: Mutex<Option<Arc<cache::BlobCache>>>,
    cache_options: cache::CacheOptions,
    downloads: Mutex<Vec<Weak<download::Switchable>>>,
}

impl Remote {
    pub fn new(global: &GlobalConfig) -> Result<Remote> {
        Self::with_options(
            global,
            registry::RegistryOptions::from_global(global),
            cache::CacheOptions::from_config(&global.cache_config),
        )
    }

    /// As [`Remote::new`], with explicit client and cache settings (tests
    /// use short timeouts and a capacity in bytes).
    pub fn with_options(
        global: &GlobalConfig,
        options: registry::RegistryOptions,
        cache_options: cache::CacheOptions,
    ) -> Result<Remote> {
        let registry = registry::Registry::new(options, global)?;
        Ok(Remote {
            global: global.clone(),
            registry: Arc::new(registry),
            cache: Mutex::new(None),
            cache_options,
            downloads: Mutex::new(Vec::new()),
        })
    }

    pub fn registry(&self) -> &Arc<registry::Registry> {
        &self.registry
    }

    pub fn global(&self) -> &GlobalConfig {
        &self.global
    }

    /// The blob cache, opened on first use.
    pub fn cache(&self) -> Result<Arc<cache::BlobCache>> {
        let mut slot = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cache) = &*slot {
            return Ok(cache.clone());
        }
        let cache = cache::BlobCache::open(self.cache_options.clone())?;
        *slot = Some(cache.clone());
        Ok(cache)
    }

    /// The bytes of `repoBlobUrl/<digest>` (`size` bytes), read through the
    /// cache (and a p2p peer first, when one is configured).
    pub fn open_blob(
        &self,
        image: &ImageConfig,
        digest: &str,
        size: u64,
    ) -> Result<Arc<cache::CachedBlob>> {
        let url = image.blob_url(digest)?;
        let origin: Source = Arc::new(registry::RegistryBlob::new(
            self.registry.clone(),
            &url,
            size,
            self.p2p_address(),
        ));
        let cache = self.cache()?;
        let blob = cache.blob(digest, origin).map_err(|e| match e {
            Error::Io { context, source } => Error::Io {
                context: format!("{context} (cache of {})", redact_url(&url)),
                source,
            },
            e => e,
        })?;
        Ok(blob)
    }

    /// Start the background download of a blob into `dir`; reads of
    /// `target` switch to the downloaded file when it is installed.
    pub fn start_download(
        &self,
        settings: DownloadConfig,
        blob: Arc<cache::CachedBlob>,
        digest: &str,
        dir: &Path,
        target: &Arc<download::Switchable>,
    ) {
        let weak = Arc::downgrade(target);
        download::spawn(
            settings,
            blob,
            digest.to_string(),
            dir.to_path_buf(),
            weak.clone(),
        );
        let mut downloads = self.downloads.lock().unwrap_or_else(|e| e.into_inner());
        downloads.retain(|d| d.strong_count() > 0);
        downloads.push(weak);
    }

    /// (downloads started and still open, of which switched to the local file).
    pub fn download_status(&self) -> (usize, usize) {
        let downloads = self.downloads.lock().unwrap_or_else(|e| e.into_inner());
        let open: Vec<_> = downloads.iter().filter_map(Weak::upgrade).collect();
        let switched = open.iter().filter(|d| d.switched()).count();
        (open.len(), switched)
    }

    fn p2p_address(&self) -> Option<String> {
        let p2p = &self.global.p2p_config;
        p2p.enable.then(|| p2p.address.clone()).flatten()
    }
}
