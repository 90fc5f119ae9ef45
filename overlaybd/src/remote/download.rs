//! Background download (`download` in the global and image configs): some
//! minutes after an image opens, fetch each registry layer whole, at a
//! bounded rate, check it against its digest, install it as
//! `dir/overlaybd.commit`, and switch reads to that file, so a long-lived
//! container stops depending on the registry and the cache.
//!
//! Chunks already in the cache are copied from it instead of fetched. A blob
//! whose sha256 does not match its digest is discarded, with a message
//! saying so; reads then go on through the cache as before.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::config::{DownloadConfig, LOCAL_LAYER_NAMES};
use crate::io::{LocalFile, ReadAt};
use crate::storage::Fetch;

use super::cache::CachedBlob;

/// A registry blob that a background download may replace, once, by a
/// local file holding the same bytes: reads go to the blob (through the
/// cache) until then, and to the file after.
pub struct Switchable {
    blob: Arc<dyn Fetch>,
    downloaded: OnceLock<LocalFile>,
}

impl Switchable {
    pub fn new(blob: Arc<dyn Fetch>) -> Self {
        Switchable {
            blob,
            downloaded: OnceLock::new(),
        }
    }

    /// Read from `file` from now on; it must have the blob's size (and
    /// bytes). A second switch is an error.
    pub fn switch_to(&self, file: LocalFile) -> io::Result<()> {
        if file.size() != self.blob.size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: has {} bytes, the blob {}",
                    file.name(),
                    file.size(),
                    self.blob.size()
                ),
            ));
        }
        self.downloaded.set(file).map_err(|file| {
            io::Error::other(format!(
                "{}: the blob was already switched to a downloaded file",
                file.name()
            ))
        })
    }

    /// Whether reads go to the downloaded file.
    pub fn switched(&self) -> bool {
        self.downloaded.get().is_some()
    }
}

impl ReadAt for Switchable {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.downloaded.get() {
            Some(file) => file.read_exact_at(buf, offset),
            None => self.blob.read_exact_at(buf, offset),
        }
    }
    fn size(&self) -> u64 {
        self.blob.size()
    }
    fn name(&self) -> &str {
        self.blob.name()
    }
    fn drop_cached(&self, offset: u64, len: u64) {
        self.blob.drop_cached(offset, len);
    }
}

impl Fetch for Switchable {
    fn is_present(&self, offset: u64, len: u64) -> bool {
        self.switched() || self.blob.is_present(offset, len)
    }
    fn downloaded(&self) -> Option<&LocalFile> {
        self.downloaded.get()
    }
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        match self.downloaded.get() {
            Some(file) => file.read_exact_at(buf, offset).map(|()| true),
            None => self.blob.read_cached(buf, offset),
        }
    }
    fn warm(&self, offset: u64, len: u64) -> io::Result<u64> {
        if self.switched() {
            return Ok(0);
        }
        self.blob.warm(offset, len)
    }
}

/// Why a download did not install a file.
#[derive(Debug)]
pub enum DownloadError {
    /// The bytes fetched do not hash to the digest: nothing was installed.
    Mismatch {
        expected: String,
        actual: String,
    },
    Io(io::Error),
    Cancelled,
}

impl std::fmt::Display for DownloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownloadError::Mismatch { expected, actual } => write!(
                f,
                "the downloaded blob hashes to {actual}, not {expected}: discarded"
            ),
            DownloadError::Io(e) => write!(f, "{e}"),
            DownloadError::Cancelled => f.write_str("cancelled"),
        }
    }
}

impl std::error::Error for DownloadError {}

impl From<io::Error> for DownloadError {
    fn from(e: io::Error) -> Self {
        DownloadError::Io(e)
    }
}

/// Fetch `blob` whole into `dir/overlaybd.commit`: present chunks from the
/// cache, the rest from the origin in `block_size` pieces at no more than
/// `max_mbps` MB/s (0: unlimited). Checks the sha256 against `digest`
/// (`sha256:<hex>`) before installing. Returns the installed path.
pub fn download_blob(
    blob: &CachedBlob,
    digest: &str,
    dir: &Path,
    block_size: u64,
    max_mbps: u64,
    cancel: &AtomicBool,
) -> Result<PathBuf, DownloadError> {
    let expected = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            DownloadError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{digest}: only sha256 digests can be checked"),
            ))
        })?
        .to_ascii_lowercase();
    fs::create_dir_all(dir)?;
    let target = dir.join(LOCAL_LAYER_NAMES[0]);
    let tmp = dir.join(".overlaybd.commit.download");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    let result = fill(blob, &mut file, block_size.max(4096), max_mbps, cancel);
    let actual = match result {
        Ok(hash) => hash,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if actual != expected {
        let _ = fs::remove_file(&tmp);
        return Err(DownloadError::Mismatch {
            expected: digest.to_string(),
            actual: format!("sha256:{actual}"),
        });
    }
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, &target)?;
    Ok(target)
}

fn fill(
    blob: &CachedBlob,
    file: &mut File,
    block: u64,
    max_mbps: u64,
    cancel: &AtomicBool,
) -> Result<String, DownloadError> {
    let size = blob.size();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; block as usize];
    let started = Instant::now();
    let mut fetched = 0u64;
    let mut offset = 0;
    while offset < size {
        if cancel.load(Ordering::Relaxed) {
            return Err(DownloadError::Cancelled);
        }
        let n = block.min(size - offset);
        let piece = &mut buf[..n as usize];
        if blob.is_present(offset, n) {
            blob.read_exact_at(piece, offset)?;
        } else {
            // A background download is prefetch: on-demand reads go first.
            let audit = crate::audit::start();
            let read = super::registry::prefetching(|| blob.origin().read_exact_at(piece, offset));
            crate::audit::record(audit, "bk_download", blob.name(), offset, n, &read);
            read?;
            fetched += n;
            if max_mbps > 0 {
                // Sleep until the average rate is back under the limit.
                let due = Duration::from_secs_f64(fetched as f64 / (max_mbps as f64 * 1e6));
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        hasher.update(&*piece);
        file.write_all(piece)?;
        offset += n;
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A random number of whole seconds below `extra` (0 when `extra` is 0).
fn random_below(extra: u64) -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    if extra == 0 {
        return 0;
    }
    let mut h = RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() % extra
}

/// Start the background download of one layer: after `delay` +
/// rand(`delayExtra`) seconds, up to `tryCnt` attempts; on success reads of
/// `target` switch to the installed file. The thread gives up when the
/// image is closed (`target` dropped). Messages go to stderr.
pub fn spawn(
    settings: DownloadConfig,
    blob: Arc<CachedBlob>,
    digest: String,
    dir: PathBuf,
    target: Weak<Switchable>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let delay = settings.delay + random_below(settings.delay_extra);
        let until = Instant::now() + Duration::from_secs(delay);
        while Instant::now() < until {
            if target.strong_count() == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
        }
        let cancel = AtomicBool::new(false);
        for attempt in 1..=settings.try_cnt.max(1) {
            if target.strong_count() == 0 {
                return;
            }
            match download_blob(
                &blob,
                &digest,
                &dir,
                settings.block_size,
                settings.max_mbps,
                &cancel,
            ) {
                Ok(path) => {
                    let switched = LocalFile::open(&path).map_err(io::Error::from).and_then(
                        |file| match target.upgrade() {
                            Some(t) => t.switch_to(file),
                            None => Ok(()),
                        },
                    );
                    if let Err(e) = switched {
                        eprintln!(
                            "obd: layer {digest}: downloaded to {} but cannot read it: {e}",
                            path.display()
                        );
                    }
                    return;
                }
                Err(e @ DownloadError::Mismatch { .. }) => {
                    eprintln!("obd: layer {digest}: background download: {e}");
                    return;
                }
                Err(e) => {
                    eprintln!("obd: layer {digest}: background download, attempt {attempt}: {e}")
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Bytes, Source};
    use crate::remote::cache::{BlobCache, CacheOptions};

    fn blob(data: &[u8], dir: &Path) -> Arc<CachedBlob> {
        named_blob(data, dir, "blob")
    }

    fn named_blob(data: &[u8], dir: &Path, name: &str) -> Arc<CachedBlob> {
        let cache = BlobCache::open(CacheOptions {
            dir: dir.join("cache"),
            capacity: 1 << 20,
            refill_size: 4096,
        })
        .unwrap();
        let origin: Source = Arc::new(Bytes::new(data.to_vec(), name));
        cache.blob("sha256:test", origin).unwrap()
    }

    #[test]
    fn a_matching_blob_is_installed_using_cached_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        let blob = blob(&data, dir.path());
        blob.read_exact_at(&mut [0u8; 100], 5000).unwrap();
        let layer_dir = dir.path().join("layer");
        let path =
            download_blob(&blob, &digest, &layer_dir, 4096, 0, &AtomicBool::new(false)).unwrap();
        assert_eq!(path, layer_dir.join("overlaybd.commit"));
        assert_eq!(fs::read(&path).unwrap(), data);
    }

    /// Each chunk fetched (not those copied from the cache) is audited.
    #[test]
    fn fetched_chunks_are_audited_as_bk_download() {
        let lines = crate::audit::capture();
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        let blob = named_blob(&data, dir.path(), "bk-audited");
        blob.read_exact_at(&mut [0u8; 100], 5000).unwrap();
        download_blob(
            &blob,
            &digest,
            &dir.path().join("layer"),
            4096,
            0,
            &AtomicBool::new(false),
        )
        .unwrap();
        let lines = lines.lock().unwrap();
        let ours: Vec<(u64, u64)> = lines
            .iter()
            .filter(|l| l.contains(" bk_download file=bk-audited ") && l.ends_with("result=ok"))
            .map(|l| {
                let field = |name: &str| -> u64 {
                    l.split(' ')
                        .find_map(|f| f.strip_prefix(name))
                        .unwrap()
                        .parse()
                        .unwrap()
                };
                (field("offset="), field("size="))
            })
            .collect();
        assert_eq!(
            ours,
            [(0, 4096), (8192, 4096), (12288, 4096), (16384, 3616)],
            "chunk 1 came from the cache: {lines:?}"
        );
    }

    #[test]
    fn a_mismatching_blob_is_discarded_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 10_000];
        let digest = format!("sha256:{}", "ab".repeat(32));
        let blob = blob(&data, dir.path());
        let layer_dir = dir.path().join("layer");
        let err = download_blob(&blob, &digest, &layer_dir, 4096, 0, &AtomicBool::new(false))
            .unwrap_err();
        assert!(matches!(err, DownloadError::Mismatch { .. }));
        assert!(err.to_string().contains("discarded"), "{err}");
        assert_eq!(fs::read_dir(&layer_dir).unwrap().count(), 0);
    }
}
