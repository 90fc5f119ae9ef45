//! The local cache of registry blobs (`cacheConfig`).
//!
//! Each blob is two files in `cacheDir`, both mode 0600:
//! - `<key>.data`: a sparse file the size of the blob, holding the chunks
//!   fetched so far at their own offsets;
//! - `<key>.chunks`: the record of which `refillSize` chunks are present,
//!   with each chunk's CRC32C, so a restart reuses what was fetched, and a
//!   chunk whose data did not reach the disk (a crash between the two
//!   writes) is noticed and fetched again instead of being served.
//!
//! Record layout (little endian): 32-byte header (`OBDCACH1`, blob size,
//! chunk size, zero), then 8 bytes per chunk (u32 CRC32C, u32 flags; bit 0
//! = present).
//!
//! A miss fetches whole aligned chunks, contiguous missing chunks in one
//! request. Concurrent misses for the same chunk are fetched once: the first
//! reader marks the chunk as being fetched, the others wait for it. No lock
//! is held across network or disk I/O; a generation number per blob tells a
//! reader that the blob was evicted while it read the file, and it tries
//! again.
//!
//! Capacity: when the bytes held pass the capacity, whole blobs are evicted,
//! least recently used first, down to max(90 % of capacity, capacity − 50
//! GiB), and by a further tenth whenever the disk has less than 1 GiB free.
//! The blob being filled goes last; an open blob is emptied in place.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::CacheConfig;
use crate::error::{Error, IoContext, Result};
use crate::io::{check_bounds, ReadAt, Source};
use crate::storage::Fetch;

use super::remote_error;

const MAGIC: &[u8; 8] = b"OBDCACH1";
const HEADER: u64 = 32;
const ENTRY: u64 = 8;
const PRESENT: u32 = 1;
/// Below this much free disk, blobs are evicted whatever the capacity.
const MIN_FREE_DISK: u64 = 1 << 30;
/// Longest run of missing chunks fetched with one request.
const MAX_RUN: u64 = 8 << 20;
/// Rounds of "fetch, then read the file" before a read gives up because
/// the blob keeps being evicted under it.
const MAX_ROUNDS: usize = 16;

/// Where the cache lives and how big it may grow.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    pub dir: PathBuf,
    /// Bytes of blob data the cache may hold.
    pub capacity: u64,
    /// Chunk size: misses are fetched in aligned chunks of this size.
    pub refill_size: u64,
}

impl CacheOptions {
    pub fn from_config(config: &CacheConfig) -> Self {
        CacheOptions {
            dir: config.cache_dir.clone(),
            capacity: config.cache_size_gb.saturating_mul(1 << 30),
            refill_size: config.refill_size.max(1),
        }
    }

    /// The size eviction brings the cache down to.
    pub fn eviction_target(&self) -> u64 {
        let ninety = self.capacity / 10 * 9;
        ninety.max(self.capacity.saturating_sub(50 << 30))
    }
}

/// One blob known to the cache, open or only on disk.
struct Entry {
    /// Bytes of present chunks.
    used: u64,
    /// Last use, in seconds since the epoch (the record's mtime on load).
    last_use: u64,
    open: Weak<CachedBlob>,
}

struct Catalog {
    blobs: HashMap<String, Entry>,
    used: u64,
}

/// The cache of every blob in one directory.
pub struct BlobCache {
    options: CacheOptions,
    catalog: Mutex<Catalog>,
    fetched: AtomicU64,
    evictions: AtomicU64,
}

impl BlobCache {
    /// Open (creating it if needed) the cache directory and take stock of
    /// the blobs already in it.
    pub fn open(options: CacheOptions) -> Result<Arc<BlobCache>> {
        if options.refill_size == 0 || options.refill_size > (1 << 30) {
            return Err(Error::Invalid(format!(
                "cacheConfig.refillSize {} must be between 1 byte and 1 GiB",
                options.refill_size
            )));
        }
        let dir = &options.dir;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .context(|| dir.display().to_string())?;
        let mut catalog = Catalog {
            blobs: HashMap::new(),
            used: 0,
        };
        for entry in fs::read_dir(dir).context(|| dir.display().to_string())? {
            let entry = entry.context(|| dir.display().to_string())?;
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".chunks")) else {
                continue;
            };
            let path = entry.path();
            let Ok((used, last_use)) = scan_record(&path) else {
                continue;
            };
            catalog.used += used;
            catalog.blobs.insert(
                key.to_string(),
                Entry {
                    used,
                    last_use,
                    open: Weak::new(),
                },
            );
        }
        let cache = Arc::new(BlobCache {
            options,
            catalog: Mutex::new(catalog),
            fetched: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        });
        cache.evict_if_needed(None);
        Ok(cache)
    }

    pub fn options(&self) -> &CacheOptions {
        &self.options
    }

    /// Bytes of blob data held.
    pub fn used(&self) -> u64 {
        self.catalog().used
    }

    /// Bytes fetched from origins through this cache.
    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Blobs evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn catalog(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached view of `origin`, stored under `key` (a digest such as
    /// `sha256:…`). One process shares one [`CachedBlob`] per key, so
    /// concurrent readers share its single-flight fetches.
    pub fn blob(self: &Arc<Self>, key: &str, origin: Source) -> Result<Arc<CachedBlob>> {
        let file_key = file_key(key)?;
        let mut catalog = self.catalog();
        if let Some(blob) = catalog.blobs.get(&file_key).and_then(|e| e.open.upgrade()) {
            if blob.size == origin.size() {
                return Ok(blob);
            }
            return Err(Error::Invalid(format!(
                "blob {key} is open with {} bytes, asked for {}",
                blob.size,
                origin.size()
            )));
        }
        let blob = Arc::new(CachedBlob::open(self.clone(), &file_key, origin)?);
        let used = blob.present_bytes();
        let old = catalog.blobs.get(&file_key).map_or(0, |e| e.used);
        catalog.used = catalog.used - old.min(catalog.used) + used;
        catalog.blobs.insert(
            file_key,
            Entry {
                used,
                last_use: now_secs(),
                open: Arc::downgrade(&blob),
            },
        );
        Ok(blob)
    }

    /// Account `bytes` newly held by `key`, then evict if over capacity.
    fn filled(&self, key: &str, bytes: u64) {
        self.fetched.fetch_add(bytes, Ordering::Relaxed);
        {
            let mut catalog = self.catalog();
            if let Some(entry) = catalog.blobs.get_mut(key) {
                entry.used += bytes;
                entry.last_use = now_secs();
                catalog.used += bytes;
            }
        }
        self.evict_if_needed(Some(key));
    }

    fn touch(&self, key: &str) {
        if let Some(entry) = self.catalog().blobs.get_mut(key) {
            entry.last_use = now_secs();
        }
    }

    /// Evict whole blobs, least recently used first (`current` last),
    /// until the cache is at its eviction target.
    fn evict_if_needed(&self, current: Option<&str>) {
        let mut catalog = self.catalog();
        let low_disk = free_disk(&self.options.dir).is_some_and(|free| free < MIN_FREE_DISK);
        if catalog.used <= self.options.capacity && !low_disk {
            return;
        }
        // Low on disk: give back an extra tenth of what the cache holds.
        let target = if low_disk {
            self.options.eviction_target().min(catalog.used / 10 * 9)
        } else {
            self.options.eviction_target()
        };
        // Low disk alone never empties the blob just filled: that would
        // only make its next read fetch the same chunks again.
        let over_capacity = catalog.used > self.options.capacity;
        let mut order: Vec<(bool, u64, String)> = catalog
            .blobs
            .iter()
            .filter(|(k, e)| e.used > 0 && (over_capacity || Some(k.as_str()) != current))
            .map(|(k, e)| (Some(k.as_str()) == current, e.last_use, k.clone()))
            .collect();
        order.sort();
        for (_, _, key) in order {
            if catalog.used <= target {
                break;
            }
            let Some(entry) = catalog.blobs.get_mut(&key) else {
                continue;
            };
            let freed = entry.used;
            match entry.open.upgrade() {
                Some(blob) => {
                    blob.empty();
                    entry.used = 0;
                }
                None => {
                    let _ = fs::remove_file(self.options.dir.join(format!("{key}.data")));
                    let _ = fs::remove_file(self.options.dir.join(format!("{key}.chunks")));
                    catalog.blobs.remove(&key);
                }
            }
            catalog.used -= freed.min(catalog.used);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Free bytes for unprivileged users on the file system holding `dir`.
fn free_disk(dir: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// A file name for a cache key: `sha256:abc` → `sha256_abc`; anything
/// outside `[A-Za-z0-9._-]` is refused rather than mapped, so two keys
/// never share a file.
fn file_key(key: &str) -> Result<String> {
    let mapped = key.replacen(':', "_", 1);
    let ok = !mapped.is_empty()
        && mapped.len() <= 200
        && !mapped.starts_with('.')
        && mapped
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(mapped)
    } else {
        Err(Error::Invalid(format!(
            "{key:?} cannot name a cached blob (expected a digest such as sha256:<hex>)"
        )))
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// (bytes present, mtime in seconds) of a record file.
fn scan_record(path: &Path) -> io::Result<(u64, u64)> {
    let bytes = fs::read(path)?;
    let meta = fs::metadata(path)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (size, chunk) = parse_header(&bytes).ok_or(io::ErrorKind::InvalidData)?;
    let chunks = size.div_ceil(chunk);
    let mut used = 0;
    for i in 0..chunks {
        let at = (HEADER + i * ENTRY) as usize;
        let Some(entry) = bytes.get(at..at + 8) else {
            break;
        };
        if u32::from_le_bytes(entry[4..8].try_into().unwrap_or_default()) & PRESENT != 0 {
            used += chunk_len(size, chunk, i);
        }
    }
    Ok((used, mtime))
}

fn parse_header(bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.len() < HEADER as usize || &bytes[..8] != MAGIC {
        return None;
    }
    let size = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    let chunk = u64::from_le_bytes(bytes[16..24].try_into().ok()?);
    (chunk > 0 && size > 0).then_some((size, chunk))
}

fn chunk_len(size: u64, chunk: u64, index: u64) -> u64 {
    chunk.min(size - index * chunk)
}

/// A caller's read in progress: its buffer, where it starts, and which of
/// its chunks (from chunk `first`) are already copied in.
struct PendingRead<'a> {
    buf: &'a mut [u8],
    offset: u64,
    first: u64,
    served: Vec<bool>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Chunk {
    Missing,
    Fetching,
    /// On disk with this CRC32C; `verified` once read back (or written)
    /// by this process.
    Present {
        crc: u32,
        verified: bool,
    },
}

struct BlobState {
    chunks: Vec<Chunk>,
    /// Bumped when the blob is emptied by eviction.
    generation: u64,
}

/// One blob seen through the cache: a [`ReadAt`] that serves present
/// chunks from the local file and fetches missing ones from its origin.
pub struct CachedBlob {
    cache: Arc<BlobCache>,
    key: String,
    origin: Source,
    data: File,
    record: File,
    size: u64,
    chunk: u64,
    state: Mutex<BlobState>,
    fetched_one: Condvar,
    name: String,
}

impl CachedBlob {
    fn open(cache: Arc<BlobCache>, key: &str, origin: Source) -> Result<CachedBlob> {
        let dir = &cache.options.dir;
        let size = origin.size();
        let chunk = cache.options.refill_size;
        let data_path = dir.join(format!("{key}.data"));
        let record_path = dir.join(format!("{key}.chunks"));
        let open = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .context(|| path.display().to_string())
        };
        let data = open(&data_path)?;
        let record = open(&record_path)?;
        let chunks = size.div_ceil(chunk);
        let record_len = HEADER + chunks * ENTRY;
        let mut bytes = Vec::new();
        let existing = record.metadata().map(|m| m.len()).unwrap_or(0);
        if existing == record_len {
            bytes = fs::read(&record_path).context(|| record_path.display().to_string())?;
        }
        let mut states = vec![Chunk::Missing; chunks as usize];
        let reusable = parse_header(&bytes) == Some((size, chunk))
            && data.metadata().map(|m| m.len()).ok() == Some(size);
        if reusable {
            for (i, state) in states.iter_mut().enumerate() {
                let at = HEADER as usize + i * ENTRY as usize;
                let crc = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
                let flags =
                    u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap_or_default());
                if flags & PRESENT != 0 {
                    *state = Chunk::Present {
                        crc,
                        verified: false,
                    };
                }
            }
        } else {
            // New, or from another blob size or chunk size: start empty.
            let context = || record_path.display().to_string();
            record.set_len(0).context(context)?;
            record.set_len(record_len).context(context)?;
            let mut header = [0u8; HEADER as usize];
            header[..8].copy_from_slice(MAGIC);
            header[8..16].copy_from_slice(&size.to_le_bytes());
            header[16..24].copy_from_slice(&chunk.to_le_bytes());
            record.write_all_at(&header, 0).context(context)?;
            data.set_len(0)
                .and_then(|()| data.set_len(size))
                .context(|| data_path.display().to_string())?;
        }
        Ok(CachedBlob {
            name: origin.name().to_string(),
            cache,
            key: key.to_string(),
            origin,
            data,
            record,
            size,
            chunk,
            state: Mutex::new(BlobState {
                chunks: states,
                generation: 0,
            }),
            fetched_one: Condvar::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, BlobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn chunk_len(&self, index: u64) -> u64 {
        chunk_len(self.size, self.chunk, index)
    }

    /// Bytes of present chunks.
    pub fn present_bytes(&self) -> u64 {
        let state = self.state();
        state
            .chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| matches!(c, Chunk::Present { .. }))
            .map(|(i, _)| self.chunk_len(i as u64))
            .sum()
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    pub fn origin(&self) -> &Source {
        &self.origin
    }

    /// Drop every chunk (eviction of an open blob): readers that were
    /// reading the file notice the new generation and fetch again.
    fn empty(&self) {
        {
            let mut state = self.state();
            state.generation += 1;
            for c in state.chunks.iter_mut() {
                if matches!(c, Chunk::Present { .. }) {
                    *c = Chunk::Missing;
                }
            }
        }
        let record_len = HEADER + self.size.div_ceil(self.chunk) * ENTRY;
        let _ = self.record.set_len(HEADER);
        let _ = self.record.set_len(record_len);
        let _ = self.data.set_len(0);
        let _ = self.data.set_len(self.size);
    }

    /// Claim the missing chunks in `first..=last`; say whether some are
    /// being fetched by another reader.
    fn claim(&self, first: u64, last: u64) -> (Vec<u64>, bool, u64) {
        let mut state = self.state();
        let mut claimed = Vec::new();
        let mut busy = false;
        for i in first..=last {
            match state.chunks[i as usize] {
                Chunk::Missing => {
                    state.chunks[i as usize] = Chunk::Fetching;
                    claimed.push(i);
                }
                Chunk::Fetching => busy = true,
                Chunk::Present { .. } => {}
            }
        }
        (claimed, busy, state.generation)
    }

    /// Give claimed chunks back as missing (a fetch failed).
    fn release(&self, chunks: &[u64]) {
        let mut state = self.state();
        for &i in chunks {
            if state.chunks[i as usize] == Chunk::Fetching {
                state.chunks[i as usize] = Chunk::Missing;
            }
        }
        drop(state);
        self.fetched_one.notify_all();
    }

    /// Fetch chunks `first..=last` (all claimed by us) in one request,
    /// store them, and copy what overlaps the caller's read into `read`.
    fn fetch_run(
        &self,
        first: u64,
        last: u64,
        generation: u64,
        read: &mut PendingRead<'_>,
    ) -> io::Result<()> {
        let start = first * self.chunk;
        let end = (last * self.chunk + self.chunk_len(last)).min(self.size);
        let mut buf = vec![0u8; (end - start) as usize];
        self.origin.read_exact_at(&mut buf, start)?;
        self.data.write_all_at(&buf, start)?;
        let mut entries = Vec::with_capacity(((last - first + 1) * ENTRY) as usize);
        let mut crcs = Vec::new();
        for i in first..=last {
            let from = ((i - first) * self.chunk) as usize;
            let to = from + self.chunk_len(i) as usize;
            let crc = crc32c::crc32c(&buf[from..to]);
            crcs.push(crc);
            entries.extend_from_slice(&crc.to_le_bytes());
            entries.extend_from_slice(&PRESENT.to_le_bytes());
        }
        let kept = {
            let mut state = self.state();
            let kept = state.generation == generation;
            for (k, i) in (first..=last).enumerate() {
                state.chunks[i as usize] = if kept {
                    Chunk::Present {
                        crc: crcs[k],
                        verified: true,
                    }
                } else {
                    Chunk::Missing
                };
            }
            kept
        };
        self.fetched_one.notify_all();
        if kept {
            self.record.write_all_at(&entries, HEADER + first * ENTRY)?;
            self.cache.filled(&self.key, end - start);
        }
        // Serve the caller from memory: the chunks may be evicted already.
        let out_end = read.offset + read.buf.len() as u64;
        for i in first..=last {
            let c_start = i * self.chunk;
            let c_end = c_start + self.chunk_len(i);
            let from = c_start.max(read.offset);
            let to = c_end.min(out_end);
            if from < to {
                read.buf[(from - read.offset) as usize..(to - read.offset) as usize]
                    .copy_from_slice(&buf[(from - start) as usize..(to - start) as usize]);
                read.served[(i - read.first) as usize] = true;
            }
        }
        Ok(())
    }

    /// Read `[from, to)` (inside chunk `i`) from the local file if the
    /// chunk is present; `Ok(false)` if it is not (or was evicted meanwhile).
    fn read_local(&self, i: u64, out: &mut [u8], from: u64) -> io::Result<bool> {
        let (crc, verified, generation) = {
            let state = self.state();
            match state.chunks[i as usize] {
                Chunk::Present { crc, verified } => (crc, verified, state.generation),
                _ => return Ok(false),
            }
        };
        if verified {
            self.data.read_exact_at(out, from)?;
        } else {
            // First use since the cache was reopened: check the whole chunk.
            let c_start = i * self.chunk;
            let mut whole = vec![0u8; self.chunk_len(i) as usize];
            self.data.read_exact_at(&mut whole, c_start)?;
            let ok = crc32c::crc32c(&whole) == crc;
            let mut state = self.state();
            if state.generation != generation {
                return Ok(false);
            }
            if !ok {
                state.chunks[i as usize] = Chunk::Missing;
                return Ok(false);
            }
            state.chunks[i as usize] = Chunk::Present {
                crc,
                verified: true,
            };
            let at = (from - c_start) as usize;
            out.copy_from_slice(&whole[at..at + out.len()]);
            return Ok(true);
        }
        Ok(self.state().generation == generation)
    }
}

impl ReadAt for CachedBlob {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self, buf.len(), offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let first = offset / self.chunk;
        let last = (end - 1) / self.chunk;
        let mut read = PendingRead {
            buf,
            offset,
            first,
            served: vec![false; (last - first + 1) as usize],
        };
        self.cache.touch(&self.key);
        for _ in 0..MAX_ROUNDS {
            // 1. Fetch what nobody has, as runs of adjacent chunks.
            let (claimed, busy, generation) = self.claim(first, last);
            let mut k = 0;
            while k < claimed.len() {
                let run_first = claimed[k];
                let mut run_last = run_first;
                while k + 1 < claimed.len()
                    && claimed[k + 1] == run_last + 1
                    && (claimed[k + 1] - run_first + 1) * self.chunk <= MAX_RUN
                {
                    k += 1;
                    run_last = claimed[k];
                }
                k += 1;
                if let Err(e) = self.fetch_run(run_first, run_last, generation, &mut read) {
                    self.release(&claimed);
                    return Err(e);
                }
            }
            // 2. Wait for chunks others are fetching.
            if busy {
                let mut state = self.state();
                while (first..=last).any(|i| state.chunks[i as usize] == Chunk::Fetching) {
                    state = self
                        .fetched_one
                        .wait_timeout(state, Duration::from_millis(200))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            // 3. Read the rest from the file.
            let mut complete = true;
            for i in first..=last {
                if read.served[(i - first) as usize] {
                    continue;
                }
                let c_start = i * self.chunk;
                let from = c_start.max(offset);
                let to = (c_start + self.chunk_len(i)).min(end);
                let part = &mut read.buf[(from - offset) as usize..(to - offset) as usize];
                if self.read_local(i, part, from)? {
                    read.served[(i - first) as usize] = true;
                } else {
                    complete = false;
                }
            }
            if complete {
                return Ok(());
            }
        }
        Err(remote_error(
            libc::EIO,
            format!(
                "{}: the cached copy kept being evicted while it was read (cache too small?)",
                self.name
            ),
        ))
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Fetch for CachedBlob {
    /// Whether every chunk overlapping `[offset, offset + len)` is present.
    fn is_present(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let first = offset / self.chunk;
        let last = (offset + len - 1) / self.chunk;
        let state = self.state();
        (first..=last).all(|i| matches!(state.chunks.get(i as usize), Some(Chunk::Present { .. })))
    }
}
