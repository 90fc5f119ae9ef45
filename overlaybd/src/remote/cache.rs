//! The local cache of registry blobs (`cacheConfig`), shared by every obd
//! process on the host that names the same `cacheDir`: any number of
//! `obd add` daemons, `obd tcmu` with all its devices, CLI tools.
//!
//! Files in `cacheDir`, all mode 0600:
//! - `<key>.data`: a sparse file the size of the blob, holding the chunks
//!   fetched so far at their own offsets;
//! - `<key>.chunks`: the record: a 32-byte header (`OBDCACH1`, blob size,
//!   chunk size, zero) and one 8-byte entry per `refillSize` chunk, little
//!   endian: the chunk's CRC32C, then a state word (bit 0 = present, the
//!   other bits a sequence number that every change of the entry bumps);
//! - `.obd-cache.lock`: the directory lock, holding the bytes cached as
//!   last counted (u64).
//!
//! How processes share it without ever serving bytes that are not there:
//! - **Readers take no lock.** They read a chunk's entry, then its data,
//!   then the entry again, and use the bytes only if the chunk was present
//!   and its entry did not change (a seqlock). Each process checks a chunk's
//!   CRC the first time it uses it at a given sequence number, so a record
//!   that a power cut left ahead of its data is caught, not served.
//! - **Writers hold `flock(LOCK_EX)` on the data file**: storing a fetched
//!   chunk (data first, then its entry), evicting (entries marked missing
//!   first, then the hole punched) and dropping a chunk that failed a check
//!   above. Writes are local I/O only; nothing holds a lock across the
//!   network.
//! - **A process with a blob open holds `flock(LOCK_SH)` on its record.**
//!   Eviction deletes the files of blobs nobody has open (it gets
//!   `LOCK_EX` without waiting) and empties open blobs in place, chunk
//!   entries first, so their readers see a miss and fetch again.
//! - **Capacity holds for the directory.** Before storing, a writer
//!   reserves the bytes in the lock file's count under `flock(LOCK_EX)`,
//!   evicting least recently used blobs (record mtime; the blob being
//!   filled goes last) down to max(90 % of capacity, capacity − 50 GiB),
//!   and a further tenth whenever the disk has less than 1 GiB free. The
//!   count is recounted from the records when a cache is opened, so a
//!   process that died between reserving and storing leaves no lasting
//!   error; a miss bigger than the whole capacity is served, not stored.
//!
//! Within one process, one [`CachedBlob`] per key serves all readers:
//! concurrent misses of one chunk are fetched once.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{FallocateFlags, FlockOperation};

use crate::config::CacheConfig;
use crate::error::{Error, IoContext, Result};
use crate::io::{check_bounds, ReadAt, Source};
use crate::storage::Fetch;

use super::remote_error;

const MAGIC: &[u8; 8] = b"OBDCACH1";
const HEADER: u64 = 32;
const ENTRY: u64 = 8;
const PRESENT: u32 = 1;
const LOCK_FILE: &str = ".obd-cache.lock";
const TEMP_PREFIX: &str = ".tmp-";
/// Below this much free disk, blobs are evicted whatever the capacity.
const MIN_FREE_DISK: u64 = 1 << 30;
/// Longest run of missing chunks fetched with one request.
const MAX_RUN: u64 = 8 << 20;
/// Rounds of "read the file, fetch what is missing" before a read gives up
/// because the blob keeps being evicted under it.
const MAX_ROUNDS: usize = 16;
/// A record's mtime (its last use, for LRU) is refreshed at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(5);

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
            capacity: match config.cache_size_mb {
                Some(mb) => mb.saturating_mul(1 << 20),
                None => config.cache_size_gb.saturating_mul(1 << 30),
            },
            refill_size: config.refill_size.max(1),
        }
    }

    /// The size eviction brings the cache down to.
    pub fn eviction_target(&self) -> u64 {
        let ninety = self.capacity / 10 * 9;
        ninety.max(self.capacity.saturating_sub(50 << 30))
    }
}

/// `flock` held until dropped.
struct Flock<'a>(&'a File);

impl<'a> Flock<'a> {
    fn exclusive(file: &'a File) -> io::Result<Self> {
        rustix::fs::flock(file, FlockOperation::LockExclusive)?;
        Ok(Flock(file))
    }

    /// `None` when another open file description holds a lock on it.
    fn try_exclusive(file: &'a File) -> io::Result<Option<Self>> {
        match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(Flock(file))),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(self.0, FlockOperation::Unlock);
    }
}

/// The cache of every blob in one directory, as one process sees it.
pub struct BlobCache {
    options: CacheOptions,
    /// `.obd-cache.lock`; the mutex orders this process's threads, the
    /// `flock` orders processes.
    lock: Mutex<File>,
    open: Mutex<HashMap<String, Weak<CachedBlob>>>,
    fetched: AtomicU64,
    evictions: AtomicU64,
}

impl BlobCache {
    /// Open (creating it if needed) the cache directory and recount what it
    /// holds.
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
        let lock_path = dir.join(LOCK_FILE);
        let lock = open_rw(&lock_path)?;
        let cache = Arc::new(BlobCache {
            options,
            lock: Mutex::new(lock),
            open: Mutex::new(HashMap::new()),
            fetched: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        });
        let context = || lock_path.display().to_string();
        {
            let file = cache.lock_file();
            let _dir = Flock::exclusive(&file).context(context)?;
            let (_, held) = cache.scan();
            write_count(&file, held).context(context)?;
            cache.evict_locked(&file, None, 0, held).context(context)?;
        }
        Ok(cache)
    }

    pub fn options(&self) -> &CacheOptions {
        &self.options
    }

    /// Bytes of blob data the directory holds, as counted by every process
    /// that shares it.
    pub fn used(&self) -> u64 {
        let file = self.lock_file();
        let Ok(_dir) = Flock::exclusive(&file) else {
            return 0;
        };
        read_count(&file)
    }

    /// Bytes fetched from origins through this cache (this process).
    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Blobs evicted or emptied so far by this process.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn lock_file(&self) -> MutexGuard<'_, File> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached view of `origin`, stored under `key` (a digest such as
    /// `sha256:…`). One process shares one [`CachedBlob`] per key, so
    /// concurrent readers share its single-flight fetches.
    pub fn blob(self: &Arc<Self>, key: &str, origin: Source) -> Result<Arc<CachedBlob>> {
        let file_key = file_key(key)?;
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(blob) = open.get(&file_key).and_then(Weak::upgrade) {
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
        let _ = blob.me.set(Arc::downgrade(&blob));
        open.retain(|_, weak| weak.strong_count() > 0);
        open.insert(file_key, Arc::downgrade(&blob));
        Ok(blob)
    }

    /// Reserve room for `bytes` about to be stored in blob `key`, evicting
    /// if needed; false when they cannot be held (bigger than the cache).
    fn reserve(&self, key: &str, bytes: u64) -> io::Result<bool> {
        if bytes > self.options.capacity {
            return Ok(false);
        }
        let file = self.lock_file();
        let _dir = Flock::exclusive(&file)?;
        let count = read_count(&file);
        let low_disk = free_disk(&self.options.dir).is_some_and(|free| free < MIN_FREE_DISK);
        let count = if count + bytes > self.options.capacity || low_disk {
            self.evict_locked(&file, Some(key), bytes, count)?
        } else {
            count
        };
        write_count(&file, count + bytes)?;
        Ok(true)
    }

    /// Give back bytes reserved or held that are not held any more.
    fn unreserve(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let file = self.lock_file();
        let Ok(_dir) = Flock::exclusive(&file) else {
            return;
        };
        let count = read_count(&file);
        let _ = write_count(&file, count.saturating_sub(bytes));
    }

    /// Every blob record in the directory; removes temporary files that a
    /// crashed process left. Also returns the bytes held by all of them.
    fn scan(&self) -> (Vec<BlobOnDisk>, u64) {
        let mut blobs = Vec::new();
        let Ok(entries) = fs::read_dir(&self.options.dir) else {
            return (blobs, 0);
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if name.starts_with(TEMP_PREFIX) {
                let old = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age > Duration::from_secs(60));
                if old {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            let Some(key) = name.strip_suffix(".chunks") else {
                continue;
            };
            if let Ok((held, last_use)) = scan_record(&path) {
                blobs.push(BlobOnDisk {
                    key: key.to_string(),
                    held,
                    last_use,
                });
            }
        }
        let total = blobs.iter().map(|b| b.held).sum();
        (blobs, total)
    }

    /// With the directory lock held and `count` bytes counted: evict least
    /// recently used blobs (`current` last) until `need` more bytes fit
    /// under the eviction target. Writes and returns the new count.
    fn evict_locked(
        &self,
        lock: &File,
        current: Option<&str>,
        need: u64,
        mut count: u64,
    ) -> io::Result<u64> {
        let low_disk = free_disk(&self.options.dir).is_some_and(|free| free < MIN_FREE_DISK);
        if count + need <= self.options.capacity && !low_disk {
            return Ok(count);
        }
        let mut target = self
            .options
            .eviction_target()
            .min(self.options.capacity - need.min(self.options.capacity));
        if low_disk {
            target = target.min(count / 10 * 9);
        }
        let (mut blobs, on_disk) = self.scan();
        // Low disk alone never empties the blob being filled: that would
        // only make its next read fetch the same chunks again.
        let over_capacity = count + need > self.options.capacity;
        blobs.retain(|b| b.held > 0 && (over_capacity || Some(b.key.as_str()) != current));
        blobs.sort_by_key(|b| (Some(b.key.as_str()) == current, b.last_use));
        for blob in blobs {
            if count <= target {
                break;
            }
            let started = crate::audit::start();
            let evicted = self.evict_blob(&blob.key);
            let freed = *evicted.as_ref().unwrap_or(&0);
            if started.is_some() {
                let data = self.options.dir.join(format!("{}.data", blob.key));
                let name = data.display().to_string();
                crate::audit::record(started, "eviction", &name, 0, freed, &evicted);
            }
            evicted?;
            count = count.saturating_sub(freed);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        // A count above what the records hold is drift (a process died
        // between reserving and storing): the records are the truth.
        if count > target {
            count = count.min(on_disk);
        }
        write_count(lock, count)?;
        Ok(count)
    }

    /// Delete blob `key` if nobody has it open, else empty it in place.
    /// Returns the bytes it held.
    fn evict_blob(&self, key: &str) -> io::Result<u64> {
        let dir = &self.options.dir;
        let record_path = dir.join(format!("{key}.chunks"));
        let data_path = dir.join(format!("{key}.data"));
        let record = match OpenOptions::new().read(true).write(true).open(&record_path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let held = scan_record(&record_path).map(|(held, _)| held).unwrap_or(0);
        if let Some(_unused) = Flock::try_exclusive(&record)? {
            let _ = fs::remove_file(&data_path);
            fs::remove_file(&record_path)?;
            return Ok(held);
        }
        let data = match OpenOptions::new().read(true).write(true).open(&data_path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let Some(layout) = read_header(&record) else {
            return Ok(0);
        };
        let _writer = Flock::exclusive(&data)?;
        let chunks = layout.chunks();
        let entries = read_entries(&record, 0, chunks)?;
        let mut freed = 0;
        let mut bytes = Vec::with_capacity((chunks * ENTRY) as usize);
        for (i, &entry) in entries.iter().enumerate() {
            let entry = if is_present(entry) {
                freed += layout.chunk_len(i as u64);
                missing_after(entry)
            } else {
                entry
            };
            bytes.extend_from_slice(&entry.to_le_bytes());
        }
        if freed > 0 {
            record.write_all_at(&bytes, HEADER)?;
            punch_hole(&data, 0, layout.size)?;
        }
        Ok(freed)
    }
}

/// A blob record found by a directory scan.
struct BlobOnDisk {
    key: String,
    held: u64,
    last_use: u64,
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .context(|| path.display().to_string())
}

fn read_count(lock: &File) -> u64 {
    let mut bytes = [0u8; 8];
    match lock.read_exact_at(&mut bytes, 0) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => 0,
    }
}

fn write_count(lock: &File, count: u64) -> io::Result<()> {
    lock.write_all_at(&count.to_le_bytes(), 0)
}

/// Free bytes for unprivileged users on the file system holding `dir`.
fn free_disk(dir: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    match rustix::fs::fallocate(file, mode, offset, len) {
        Ok(()) => Ok(()),
        // A file system without holes: zeros take the same space, but the
        // entry is what says the chunk is gone.
        Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        Err(e) => Err(e.into()),
    }
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

/// Whether an entry says its chunk is present.
fn is_present(entry: u64) -> bool {
    (entry >> 32) as u32 & PRESENT != 0
}

fn entry_crc(entry: u64) -> u32 {
    entry as u32
}

/// The next entry of a chunk: `crc`, present or not, sequence bumped.
fn next_entry(old: u64, present: bool, crc: u32) -> u64 {
    let sequence = ((old >> 32) as u32 >> 1).wrapping_add(1);
    let state = (sequence << 1) | u32::from(present);
    (u64::from(state) << 32) | u64::from(crc)
}

fn missing_after(old: u64) -> u64 {
    next_entry(old, false, 0)
}

/// Blob and chunk size, as a record's header says.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Layout {
    size: u64,
    chunk: u64,
}

impl Layout {
    fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk)
    }

    fn chunk_len(&self, index: u64) -> u64 {
        self.chunk.min(self.size - index * self.chunk)
    }

    fn record_len(&self) -> u64 {
        HEADER + self.chunks() * ENTRY
    }
}

fn parse_header(bytes: &[u8]) -> Option<Layout> {
    if bytes.len() < HEADER as usize || &bytes[..8] != MAGIC {
        return None;
    }
    let size = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    let chunk = u64::from_le_bytes(bytes[16..24].try_into().ok()?);
    (chunk > 0 && chunk <= 1 << 30 && size > 0).then_some(Layout { size, chunk })
}

fn read_header(record: &File) -> Option<Layout> {
    let mut header = [0u8; HEADER as usize];
    record.read_exact_at(&mut header, 0).ok()?;
    let layout = parse_header(&header)?;
    let len = record.metadata().ok()?.len();
    (len == layout.record_len()).then_some(layout)
}

fn read_entries(record: &File, first: u64, count: u64) -> io::Result<Vec<u64>> {
    let mut bytes = vec![0u8; (count * ENTRY) as usize];
    record.read_exact_at(&mut bytes, HEADER + first * ENTRY)?;
    Ok(bytes
        .chunks_exact(ENTRY as usize)
        .map(|e| u64::from_le_bytes(e.try_into().unwrap_or_default()))
        .collect())
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
    let layout = parse_header(&bytes).ok_or(io::ErrorKind::InvalidData)?;
    let mut held = 0;
    for (i, entry) in bytes[HEADER as usize..]
        .chunks_exact(ENTRY as usize)
        .take(layout.chunks() as usize)
        .enumerate()
    {
        if is_present(u64::from_le_bytes(entry.try_into().unwrap_or_default())) {
            held += layout.chunk_len(i as u64);
        }
    }
    Ok((held, mtime))
}

/// Where a sequential reader of a blob is, for read-ahead. Windows are in
/// chunks; one window is at most [`MAX_RUN`] bytes (one request).
#[derive(Default)]
struct Stream {
    /// The chunk after the last one fetched, or being fetched, for it.
    end: u64,
    /// The read-ahead window: 0 until a miss starts where the last fetch
    /// ended, then doubling with each such miss up to [`MAX_RUN`].
    window: u64,
    /// Windows being fetched in the background ([`CachedBlob::keep_ahead`]).
    in_flight: u32,
}

/// Windows fetched in the background ahead of one sequential reader.
const WINDOWS_AHEAD: u32 = 2;
/// Fetching ahead in the background starts once the read-ahead window has
/// grown this big (three misses in a row at the end of the last fetch): a
/// reader that goes on for a few chunks and then jumps (a small file read
/// whole, an ELF's sections) is not followed with megabytes it never reads.
const PIPELINE_FROM: u64 = 1 << 20;

/// A caller's read in progress: its buffer, where it starts, and which of
/// its chunks (from chunk `first`) are already copied in.
struct PendingRead<'a> {
    buf: &'a mut [u8],
    offset: u64,
    first: u64,
    served: Vec<bool>,
}

impl PendingRead<'_> {
    /// The part of the caller's buffer inside chunk `index`, and where it
    /// starts in the blob.
    fn part(&mut self, layout: Layout, index: u64) -> (&mut [u8], u64) {
        let end = self.offset + self.buf.len() as u64;
        let c_start = index * layout.chunk;
        let from = c_start.max(self.offset);
        let to = (c_start + layout.chunk_len(index)).min(end);
        let at = (from - self.offset) as usize;
        (&mut self.buf[at..at + (to - from) as usize], from)
    }
}

/// One blob seen through the cache: a [`ReadAt`] that serves present
/// chunks from the local file and fetches missing ones from its origin.
pub struct CachedBlob {
    cache: Arc<BlobCache>,
    key: String,
    origin: Source,
    data: File,
    /// Holds `flock(LOCK_SH)` while the blob is open here.
    record: File,
    size: u64,
    layout: Layout,
    /// The entry each chunk's bytes were last checked at (0: never).
    verified: Vec<AtomicU64>,
    /// Chunks a thread of this process is fetching.
    fetching: Mutex<Vec<bool>>,
    fetched_one: Condvar,
    /// Orders this process's writers; `flock` on `data` orders processes.
    writer: Mutex<()>,
    /// The sequential reader's read-ahead.
    stream: Mutex<Stream>,
    /// This blob, for the threads that fetch ahead of a sequential reader.
    me: OnceLock<Weak<CachedBlob>>,
    last_touch: AtomicU64,
    store_failed: AtomicBool,
    name: String,
}

impl CachedBlob {
    fn open(cache: Arc<BlobCache>, key: &str, origin: Source) -> Result<CachedBlob> {
        let dir = cache.options.dir.clone();
        let size = origin.size();
        let record_path = dir.join(format!("{key}.chunks"));
        let data_path = dir.join(format!("{key}.data"));
        let context = || record_path.display().to_string();
        let wanted = Layout {
            size,
            chunk: cache.options.refill_size,
        };
        let mut tries = 0;
        let (record, layout) = loop {
            tries += 1;
            if tries > 8 {
                return Err(Error::Invalid(format!(
                    "{}: the cache record keeps being replaced while it is opened",
                    record_path.display()
                )));
            }
            let record = match OpenOptions::new().read(true).write(true).open(&record_path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    create_record(&dir, &record_path, wanted).context(context)?;
                    continue;
                }
                Err(e) => return Err(e).context(context),
            };
            rustix::fs::flock(&record, FlockOperation::LockShared)
                .map_err(io::Error::from)
                .context(context)?;
            if record.metadata().context(context)?.nlink() == 0 {
                continue; // Evicted while we waited for the lock.
            }
            match read_header(&record) {
                // Another process's refillSize wins: chunks are only a unit.
                Some(layout) if layout.size == size => break (record, layout),
                _ => {
                    // Not a record of this blob (an older layout, a torn
                    // create, a corrupt file): replace it if nobody uses it.
                    rustix::fs::flock(&record, FlockOperation::Unlock)
                        .map_err(io::Error::from)
                        .context(context)?;
                    match Flock::try_exclusive(&record).context(context)? {
                        Some(_alone) => {
                            let _ = fs::remove_file(&data_path);
                            fs::remove_file(&record_path).context(context)?;
                        }
                        None => {
                            return Err(Error::corrupt(
                                record_path.display().to_string(),
                                format!(
                                    "not a cache record of a {size} byte blob, and another \
                                     process has it open"
                                ),
                            ))
                        }
                    }
                }
            }
        };
        let data = open_rw(&data_path)?;
        if data.metadata().context(context)?.len() < size {
            data.set_len(size)
                .context(|| data_path.display().to_string())?;
        }
        let chunks = layout.chunks() as usize;
        Ok(CachedBlob {
            name: origin.name().to_string(),
            cache,
            key: key.to_string(),
            origin,
            data,
            record,
            size,
            layout,
            verified: (0..chunks).map(|_| AtomicU64::new(0)).collect(),
            fetching: Mutex::new(vec![false; chunks]),
            fetched_one: Condvar::new(),
            writer: Mutex::new(()),
            stream: Mutex::new(Stream::default()),
            me: OnceLock::new(),
            last_touch: AtomicU64::new(0),
            store_failed: AtomicBool::new(false),
        })
    }

    pub fn chunk_size(&self) -> u64 {
        self.layout.chunk
    }

    pub fn origin(&self) -> &Source {
        &self.origin
    }

    fn fetching(&self) -> MutexGuard<'_, Vec<bool>> {
        self.fetching.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry(&self, index: u64) -> io::Result<u64> {
        let mut bytes = [0u8; ENTRY as usize];
        self.record
            .read_exact_at(&mut bytes, HEADER + index * ENTRY)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Mark the blob used now (its record's mtime orders eviction).
    fn touch(&self) {
        let now = now_secs();
        let last = self.last_touch.load(Ordering::Relaxed);
        if now >= last + TOUCH_EVERY.as_secs()
            && self
                .last_touch
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let _ = self.record.set_modified(SystemTime::now());
        }
    }

    /// Take the writer lock of this blob, in this process and on the host.
    fn write_lock(&self) -> io::Result<(MutexGuard<'_, ()>, Flock<'_>)> {
        let guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let flock = Flock::exclusive(&self.data)?;
        Ok((guard, flock))
    }

    /// Read `out` (at blob offset `from`, inside chunk `index`) from the
    /// local file: `Ok(false)` when the chunk is not (or no longer) there.
    fn read_local(&self, index: u64, out: &mut [u8], from: u64) -> io::Result<bool> {
        for _ in 0..MAX_ROUNDS {
            let before = self.entry(index)?;
            if !is_present(before) {
                return Ok(false);
            }
            let checked = self.verified[index as usize].load(Ordering::Relaxed) == before;
            if checked {
                self.data.read_exact_at(out, from)?;
                if self.entry(index)? == before {
                    return Ok(true);
                }
                continue;
            }
            // First use here at this sequence number: check the whole chunk.
            let c_start = index * self.layout.chunk;
            let mut whole = vec![0u8; self.layout.chunk_len(index) as usize];
            self.data.read_exact_at(&mut whole, c_start)?;
            if self.entry(index)? != before {
                continue;
            }
            if crc32c::crc32c(&whole) != entry_crc(before) {
                self.drop_chunks(index, index, Some(before))?;
                return Ok(false);
            }
            self.verified[index as usize].store(before, Ordering::Relaxed);
            let at = (from - c_start) as usize;
            out.copy_from_slice(&whole[at..at + out.len()]);
            return Ok(true);
        }
        Ok(false)
    }

    /// Mark chunks `first..=last` missing and punch their bytes out;
    /// with `only_if`, just the one chunk still at that entry.
    fn drop_chunks(&self, first: u64, last: u64, only_if: Option<u64>) -> io::Result<()> {
        let mut freed = 0;
        {
            let _lock = self.write_lock()?;
            let entries = read_entries(&self.record, first, last - first + 1)?;
            for (k, &entry) in entries.iter().enumerate() {
                let index = first + k as u64;
                let wanted = only_if.is_none_or(|expected| expected == entry);
                if !is_present(entry) || !wanted {
                    continue;
                }
                self.record
                    .write_all_at(&missing_after(entry).to_le_bytes(), HEADER + index * ENTRY)?;
                punch_hole(
                    &self.data,
                    index * self.layout.chunk,
                    self.layout.chunk_len(index),
                )?;
                self.verified[index as usize].store(0, Ordering::Relaxed);
                freed += self.layout.chunk_len(index);
            }
        }
        self.cache.unreserve(freed);
        Ok(())
    }

    /// Store fetched chunks `first..=last` (`buf` holds them all): data
    /// first, then their entries. Chunks another process stored meanwhile
    /// are kept as they are.
    fn store(&self, first: u64, last: u64, buf: &[u8]) -> io::Result<()> {
        let total = buf.len() as u64;
        if !self.cache.reserve(&self.key, total)? {
            return Ok(());
        }
        let mut kept = 0;
        let result = (|| {
            let _lock = self.write_lock()?;
            let count = last - first + 1;
            let old = read_entries(&self.record, first, count)?;
            let start = first * self.layout.chunk;
            if old.iter().all(|&e| !is_present(e)) {
                self.data.write_all_at(buf, start)?;
            }
            let mut entries = Vec::with_capacity((count * ENTRY) as usize);
            let mut written = Vec::with_capacity(count as usize);
            for (k, &entry) in old.iter().enumerate() {
                let index = first + k as u64;
                let from = (index * self.layout.chunk - start) as usize;
                let bytes = &buf[from..from + self.layout.chunk_len(index) as usize];
                let entry = if is_present(entry) {
                    kept += bytes.len() as u64;
                    entry
                } else {
                    if old.iter().any(|&e| is_present(e)) {
                        self.data.write_all_at(bytes, start + from as u64)?;
                    }
                    let new = next_entry(entry, true, crc32c::crc32c(bytes));
                    written.push((index, new));
                    new
                };
                entries.extend_from_slice(&entry.to_le_bytes());
            }
            self.record.write_all_at(&entries, HEADER + first * ENTRY)?;
            for (index, entry) in written {
                self.verified[index as usize].store(entry, Ordering::Relaxed);
            }
            Ok(())
        })();
        match result {
            Ok(()) => self.cache.unreserve(kept),
            Err(_) => self.cache.unreserve(total),
        }
        result
    }

    /// The byte range `[start, end)` of chunks `first..=last`.
    fn run_bounds(&self, first: u64, last: u64) -> (u64, u64) {
        let start = first * self.layout.chunk;
        (
            start,
            last * self.layout.chunk + self.layout.chunk_len(last),
        )
    }

    /// Keep the fetched bytes of run `first..=last` (claimed by this
    /// thread) in the cache; the caller serves them from `buf`, even if
    /// another process evicts them at once.
    fn keep_run(&self, first: u64, last: u64, buf: &[u8]) {
        self.cache
            .fetched
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        if let Err(e) = self.store(first, last, buf) {
            // The bytes are in hand: serve them, say once that the cache
            // could not keep them.
            if !self.store_failed.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "obd: cache {}: cannot store chunks of {}: {e}",
                    self.cache.options.dir.display(),
                    self.name
                );
            }
        }
    }

    /// Copy what run `first..` (its bytes in `buf`) holds of the caller's
    /// read into it.
    fn serve(&self, first: u64, buf: &[u8], read: &mut PendingRead<'_>) {
        let start = first * self.layout.chunk;
        let last = first + (buf.len() as u64).div_ceil(self.layout.chunk) - 1;
        for index in first.max(read.first)..=last {
            let slot = (index - read.first) as usize;
            if slot >= read.served.len() {
                break;
            }
            let (part, from) = read.part(self.layout, index);
            let at = (from - start) as usize;
            part.copy_from_slice(&buf[at..at + part.len()]);
            read.served[slot] = true;
        }
    }

    /// Claim the chunks of `wanted` that nobody here fetches and the record
    /// does not hold, then, when the last of them is ours to fetch, the
    /// missing chunks right after it up to `ahead` (read-ahead: stops at
    /// the first chunk that is present or being fetched). Says whether some of `wanted` are being fetched by
    /// another thread.
    fn claim(&self, wanted: &[u64], ahead: u64) -> io::Result<(Vec<u64>, bool)> {
        let mut fetching = self.fetching();
        let mut claimed = Vec::new();
        let mut busy = false;
        for &index in wanted {
            if fetching[index as usize] {
                busy = true;
            } else if !is_present(self.entry(index)?) {
                fetching[index as usize] = true;
                claimed.push(index);
            }
        }
        // Read ahead only as part of a fetch of our own, and only as far as
        // the run ending at `last` stays one request (MAX_RUN).
        if let Some(&last) = wanted.last().filter(|&&last| claimed.last() == Some(&last)) {
            let run = claimed
                .iter()
                .rev()
                .zip((0..=last).rev())
                .take_while(|(c, i)| c == &i)
                .count() as u64;
            let ahead = ahead.min((MAX_RUN / self.layout.chunk).saturating_sub(run));
            let end = (last + 1 + ahead).min(self.layout.chunks());
            for index in last + 1..end {
                if fetching[index as usize] || is_present(self.entry(index)?) {
                    break;
                }
                fetching[index as usize] = true;
                claimed.push(index);
            }
        }
        Ok((claimed, busy))
    }

    fn release(&self, chunks: &[u64]) {
        let mut fetching = self.fetching();
        for &index in chunks {
            fetching[index as usize] = false;
        }
        drop(fetching);
        self.fetched_one.notify_all();
    }

    /// Wait until no thread here fetches any chunk of `chunks`.
    fn wait_for(&self, chunks: &[u64]) {
        let mut fetching = self.fetching();
        while chunks.iter().any(|&i| fetching[i as usize]) {
            fetching = self
                .fetched_one
                .wait_timeout(fetching, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Fetch the claimed chunks, adjacent ones in one request, separate
    /// runs at the same time; serve the caller's read from them.
    fn fetch_claimed(&self, claimed: &[u64], read: &mut PendingRead<'_>) -> io::Result<()> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &index in claimed {
            match runs.last_mut() {
                Some((first, last))
                    if index == *last + 1
                        && (index - *first + 1) * self.layout.chunk <= MAX_RUN =>
                {
                    *last = index
                }
                _ => runs.push((index, index)),
            }
        }
        // Every run in flight at once: a registry origin sends all the
        // GETs together (see `ReadAt::read_many_at`).
        let mut bufs: Vec<Vec<u8>> = runs
            .iter()
            .map(|&(first, last)| {
                let (start, end) = self.run_bounds(first, last);
                vec![0u8; (end - start) as usize]
            })
            .collect();
        let mut parts: Vec<(u64, &mut [u8])> = runs
            .iter()
            .zip(bufs.iter_mut())
            .map(|(&(first, _), buf)| (first * self.layout.chunk, buf.as_mut_slice()))
            .collect();
        let results = match parts.len() {
            0 => Vec::new(),
            1 => {
                let (offset, buf) = &mut parts[0];
                vec![self.origin.read_exact_at(buf, *offset)]
            }
            _ => self.origin.read_many_at(&mut parts),
        };
        drop(parts);
        let mut outcome = Ok(());
        for ((&(first, last), buf), result) in runs.iter().zip(&bufs).zip(results) {
            match result {
                Ok(()) => {
                    self.keep_run(first, last, buf);
                    self.serve(first, buf, read);
                }
                Err(e) => {
                    if outcome.is_ok() {
                        outcome = Err(e);
                    }
                }
            }
        }
        outcome
    }

    /// Chunks to read ahead of a miss at chunk `first`: none, unless the
    /// miss starts right where the last fetch of this blob (read-ahead
    /// included) ended, so the reader has consumed all of it in order;
    /// then a window that doubles with each such miss, up to [`MAX_RUN`]
    /// (chunks found cached in between do not count as a jump).
    /// Scattered reads (a mount, small files) never grow it; a miss inside
    /// the windows being fetched ahead keeps it.
    fn read_ahead(&self, first: u64) -> u64 {
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let max = (MAX_RUN / self.layout.chunk).max(1);
        // Chunks the reader found cached since the last fetch do not break
        // its stream.
        let continues = stream.end > 0
            && first >= stream.end
            && first - stream.end <= max
            && (stream.end..first).all(|i| self.entry(i).is_ok_and(is_present));
        if continues {
            stream.window = (stream.window * 2).clamp(1, max);
            stream.window
        } else {
            let ahead_span = stream.window * (u64::from(WINDOWS_AHEAD) + 1);
            if first >= stream.end || stream.end - first > ahead_span {
                stream.window = 0;
            }
            0
        }
    }

    /// Note where a fetch ended (the chunk after its last).
    fn fetched_up_to(&self, end: u64) {
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        stream.end = stream.end.max(end);
        if stream.window == 0 {
            stream.end = end;
        }
    }

    /// Pipelined read-ahead: after a read that ended at chunk `last`, when
    /// a sequential reader (a window grown to [`PIPELINE_FROM`]) is within [`WINDOWS_AHEAD`]
    /// windows of where its fetches end, fetch the next (doubled) window on a thread
    /// of its own, so the reader finds its chunks present or on the way
    /// instead of waiting a round trip at each window's end. The window is
    /// claimed here, before the thread starts, so the reader waits for it
    /// (single flight) rather than asking for it again. Never blocks on the
    /// network: ublk queue threads call it.
    fn keep_ahead(&self, last: u64) {
        let chunks = self.layout.chunks();
        let claimed = {
            let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
            if stream.window * self.layout.chunk < PIPELINE_FROM
                || stream.in_flight >= WINDOWS_AHEAD
                || last >= stream.end
                || stream.end - last > u64::from(WINDOWS_AHEAD) * stream.window
                || stream.end >= chunks
            {
                return;
            }
            // Each window fetched ahead doubles it, as a miss at the end
            // would have.
            stream.window = (stream.window * 2).min((MAX_RUN / self.layout.chunk).max(1));
            let next_end = (stream.end + stream.window).min(chunks);
            let wanted: Vec<u64> = (stream.end..next_end).collect();
            let Ok((claimed, _busy)) = self.claim(&wanted, 0) else {
                return;
            };
            stream.end = next_end;
            if claimed.is_empty() {
                return;
            }
            stream.in_flight += 1;
            claimed
        };
        let Some(me) = self.me.get().and_then(Weak::upgrade) else {
            self.release(&claimed);
            self.ahead_done();
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("obd-read-ahead".into())
            .spawn({
                let claimed = claimed.clone();
                move || {
                    let mut nothing = PendingRead {
                        buf: &mut [],
                        offset: 0,
                        first: 0,
                        served: Vec::new(),
                    };
                    // A failure is the reader's to meet: it fetches the
                    // chunks itself when it gets there.
                    let _ = me.fetch_claimed(&claimed, &mut nothing);
                    me.ahead_done();
                    me.release(&claimed);
                }
            });
        if spawned.is_err() {
            self.release(&claimed);
            self.ahead_done();
        }
    }

    fn ahead_done(&self) {
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        stream.in_flight = stream.in_flight.saturating_sub(1);
    }

    /// Fetch every missing chunk of `[offset, offset + len)` into the cache
    /// (prefetch); returns the bytes fetched.
    fn warm_range(&self, offset: u64, len: u64) -> io::Result<u64> {
        if len == 0 || offset >= self.size {
            return Ok(0);
        }
        let end = (offset + len).min(self.size);
        let first = offset / self.layout.chunk;
        let last = (end - 1) / self.layout.chunk;
        let wanted: Vec<u64> = (first..=last).collect();
        let mut nothing = PendingRead {
            buf: &mut [],
            offset,
            first,
            served: Vec::new(),
        };
        // Chunks another thread is fetching are left to it: a prefetch
        // worker goes on to its next range instead of waiting.
        let (claimed, _busy) = self.claim(&wanted, 0)?;
        let fetched = self.fetch_claimed(&claimed, &mut nothing);
        self.release(&claimed);
        fetched?;
        Ok(claimed.iter().map(|&i| self.layout.chunk_len(i)).sum())
    }
}

/// Create the record of a new blob: written whole under a temporary name,
/// then linked into place, so nobody ever sees half a header. Losing the
/// race to another process is fine: its record is used.
fn create_record(dir: &Path, record_path: &Path, layout: Layout) -> io::Result<()> {
    let temp = dir.join(format!(
        "{TEMP_PREFIX}{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.set_len(layout.record_len())?;
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&layout.size.to_le_bytes());
        header[16..24].copy_from_slice(&layout.chunk.to_le_bytes());
        file.write_all_at(&header, 0)?;
        match fs::hard_link(&temp, record_path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    })();
    let _ = fs::remove_file(&temp);
    result
}

impl CachedBlob {
    /// Serve `buf` at `offset` (chunks `first..=last`) from the file, from
    /// fetches of this thread, and from other threads' fetches.
    fn read_chunks(&self, buf: &mut [u8], offset: u64, first: u64, last: u64) -> io::Result<()> {
        let mut read = PendingRead {
            buf,
            offset,
            first,
            served: vec![false; (last - first + 1) as usize],
        };
        self.touch();
        for _ in 0..MAX_ROUNDS {
            // 1. What the file holds.
            let mut missing = Vec::new();
            for index in first..=last {
                if read.served[(index - first) as usize] {
                    continue;
                }
                let (part, from) = read.part(self.layout, index);
                if self.read_local(index, part, from)? {
                    read.served[(index - first) as usize] = true;
                } else {
                    missing.push(index);
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            // 2. Fetch what nobody here is fetching (and, for a reader that
            // goes on where it stopped, what comes next), as runs of
            // adjacent chunks; the caller is served from the fetched bytes.
            let ahead = self.read_ahead(missing[0]);
            let (claimed, busy) = self.claim(&missing, ahead)?;
            if let Some(&last) = claimed.last() {
                self.fetched_up_to(last + 1);
            }
            let fetched = self.fetch_claimed(&claimed, &mut read);
            self.release(&claimed);
            fetched?;
            // 3. Wait for chunks another thread is fetching, then go round
            // again to read them from the file.
            if busy {
                self.wait_for(&missing);
            }
            if read.served.iter().all(|&s| s) {
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
}

impl ReadAt for CachedBlob {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self, buf.len(), offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let first = offset / self.layout.chunk;
        let last = (end - 1) / self.layout.chunk;
        self.read_chunks(buf, offset, first, last)?;
        self.keep_ahead(last);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn drop_cached(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        let first = offset / self.layout.chunk;
        let last = (end - 1) / self.layout.chunk;
        if let Err(e) = self.drop_chunks(first, last, None) {
            eprintln!("obd: cache: cannot drop chunks of {}: {e}", self.name);
        }
    }
}

impl Fetch for CachedBlob {
    /// Whether every chunk overlapping `[offset, offset + len)` is present.
    fn is_present(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        if offset.saturating_add(len) > self.size {
            return false;
        }
        let first = offset / self.layout.chunk;
        let last = (offset + len - 1) / self.layout.chunk;
        read_entries(&self.record, first, last - first + 1)
            .is_ok_and(|entries| entries.into_iter().all(is_present))
    }
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        check_bounds(self, buf.len(), offset)?;
        if buf.is_empty() {
            return Ok(true);
        }
        let end = offset + buf.len() as u64;
        let first = offset / self.layout.chunk;
        let last = (end - 1) / self.layout.chunk;
        let mut read = PendingRead {
            buf,
            offset,
            first,
            served: Vec::new(),
        };
        for index in first..=last {
            let (part, from) = read.part(self.layout, index);
            if !self.read_local(index, part, from)? {
                return Ok(false);
            }
        }
        self.touch();
        self.keep_ahead(last);
        Ok(true)
    }
    /// Prefetch: the registry reads it needs are in the prefetch class,
    /// and the chunks are claimed only once the origin gives a turn, so
    /// an on-demand read never waits on chunks of a prefetch that is still
    /// waiting for its turn.
    fn warm(&self, offset: u64, len: u64) -> io::Result<u64> {
        if self.is_present(offset, len) {
            return Ok(0);
        }
        super::registry::prefetching(|| {
            let _turn = self.origin.prefetch_turn();
            self.warm_range(offset, len)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Bytes;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn options(dir: &Path, capacity: u64, chunk: u64) -> CacheOptions {
        CacheOptions {
            dir: dir.to_path_buf(),
            capacity,
            refill_size: chunk,
        }
    }

    fn origin(data: &[u8]) -> Source {
        Arc::new(Bytes::new(data.to_vec(), "origin"))
    }

    /// An origin that counts its reads.
    struct Counted {
        inner: Source,
        reads: AtomicU64,
    }

    impl ReadAt for Counted {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.inner.read_exact_at(buf, offset)
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn name(&self) -> &str {
            "counted"
        }
    }

    #[test]
    fn read_ahead_grows_for_a_streaming_reader_only() {
        let chunk = 64 << 10;
        let data = pattern(64 * chunk as usize);
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(options(dir.path(), 1 << 30, chunk)).unwrap();
        let counted = Arc::new(Counted {
            inner: origin(&data),
            reads: AtomicU64::new(0),
        });
        let blob = cache.blob("sha256:aa", counted.clone()).unwrap();
        // Scattered reads: exactly the chunks read are fetched.
        let mut buf = vec![0u8; 4096];
        for index in [40u64, 5, 20, 9, 33] {
            blob.read_exact_at(&mut buf, index * chunk).unwrap();
        }
        assert_eq!(cache.fetched(), 5 * chunk);
        // A reader going through chunks in order, a chunk at a time: the
        // window doubles, so far fewer requests than chunks.
        let before = counted.reads.load(Ordering::Relaxed);
        let mut piece = vec![0u8; chunk as usize];
        for index in 0..64u64 {
            blob.read_exact_at(&mut piece, index * chunk).unwrap();
            let at = (index * chunk) as usize;
            assert_eq!(piece, data[at..at + chunk as usize]);
        }
        let requests = counted.reads.load(Ordering::Relaxed) - before;
        // (Chunks 5, 9, 20, 33 and 40 are cached: windows around them
        // split.)
        assert!(requests <= 16, "{requests} requests for 64 streamed chunks");
    }

    /// An origin that takes its time and says which threads asked it.
    struct Slow {
        inner: Source,
        delay: Duration,
        by_reader: AtomicU64,
        ahead: AtomicU64,
    }

    impl ReadAt for Slow {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let counter = match std::thread::current().name() {
                Some("obd-read-ahead") => &self.ahead,
                _ => &self.by_reader,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(self.delay);
            self.inner.read_exact_at(buf, offset)
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn name(&self) -> &str {
            "slow"
        }
    }

    #[test]
    fn a_sequential_reader_finds_the_next_windows_fetched_ahead() {
        let chunk = 64 << 10;
        let data = pattern(128 * chunk as usize);
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(options(dir.path(), 1 << 30, chunk)).unwrap();
        let slow = Arc::new(Slow {
            inner: origin(&data),
            delay: Duration::from_millis(20),
            by_reader: AtomicU64::new(0),
            ahead: AtomicU64::new(0),
        });
        let blob = cache.blob("sha256:aa", slow.clone()).unwrap();
        let mut piece = vec![0u8; chunk as usize];
        for index in 0..100u64 {
            blob.read_exact_at(&mut piece, index * chunk).unwrap();
            let at = (index * chunk) as usize;
            assert_eq!(piece, data[at..at + chunk as usize], "chunk {index}");
        }
        // The reader fetched the first chunks itself, in windows of 1, 2,
        // 4, 8 and 16 chunks (PIPELINE_FROM); everything after came from
        // windows fetched ahead of it, which it waited for or found.
        let by_reader = slow.by_reader.load(Ordering::Relaxed);
        let ahead = slow.ahead.load(Ordering::Relaxed);
        assert!(by_reader <= 6, "the reader fetched {by_reader} times");
        assert!(ahead >= 2, "{ahead} windows fetched ahead");
        // The window ahead of where the reader stopped is on its way or in.
        let started = std::time::Instant::now();
        while !blob.is_present(100 * chunk, chunk) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the chunk after the reader never arrived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn warm_counts_only_what_it_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(1 << 20);
        let cache = BlobCache::open(options(dir.path(), 64 << 20, 64 << 10)).unwrap();
        let blob = cache.blob("sha256:aa", origin(&data)).unwrap();
        let mut buf = vec![0u8; 4096];
        blob.read_exact_at(&mut buf, 0).unwrap();
        // Chunks 0..4: chunk 0 is cached, three are fetched.
        assert_eq!(blob.warm(0, 4 * (64 << 10)).unwrap(), 3 * (64 << 10));
        assert_eq!(blob.warm(0, 4 * (64 << 10)).unwrap(), 0);
    }

    #[test]
    fn read_cached_never_fetches() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(1 << 20);
        let cache = BlobCache::open(options(dir.path(), 64 << 20, 64 << 10)).unwrap();
        let blob = cache.blob("sha256:aa", origin(&data)).unwrap();
        let mut buf = vec![0u8; 100_000];
        assert!(
            !blob.read_cached(&mut buf, 5000).unwrap(),
            "nothing cached yet"
        );
        assert_eq!(cache.fetched(), 0);
        blob.read_exact_at(&mut buf, 5000).unwrap();
        let fetched = cache.fetched();
        buf.fill(0);
        assert!(blob.read_cached(&mut buf, 5000).unwrap());
        assert_eq!(buf, data[5000..105_000]);
        // Evicted (here: dropped) after a plan said "present": no fetch.
        blob.drop_cached(70_000, 1);
        assert!(!blob.read_cached(&mut buf, 5000).unwrap());
        assert_eq!(cache.fetched(), fetched);
    }

    #[test]
    fn entries_bump_their_sequence_on_every_change() {
        let a = next_entry(0, true, 0xdead_beef);
        assert!(is_present(a));
        assert_eq!(entry_crc(a), 0xdead_beef);
        let b = missing_after(a);
        assert!(!is_present(b));
        let c = next_entry(b, true, 0xdead_beef);
        assert!(is_present(c));
        assert_ne!(a, c, "same CRC, new sequence");
    }

    #[test]
    fn two_caches_on_one_directory_share_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(1 << 20);
        let first = BlobCache::open(options(dir.path(), 64 << 20, 64 << 10)).unwrap();
        let second = BlobCache::open(options(dir.path(), 64 << 20, 64 << 10)).unwrap();
        let a = first.blob("sha256:aa", origin(&data)).unwrap();
        let b = second.blob("sha256:aa", origin(&data)).unwrap();
        let mut buf = vec![0u8; 100_000];
        a.read_exact_at(&mut buf, 12_345).unwrap();
        assert_eq!(buf, data[12_345..112_345]);
        assert!(b.is_present(12_345, 100_000), "stored for every process");
        b.read_exact_at(&mut buf, 12_345).unwrap();
        assert_eq!(buf, data[12_345..112_345]);
        assert_eq!(second.fetched(), 0);
        assert_eq!(second.used(), first.used());
    }

    #[test]
    fn eviction_by_another_process_is_a_miss_not_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(4 << 20);
        let other = pattern(4 << 20).into_iter().map(|b| !b).collect::<Vec<_>>();
        let capacity = 5 << 20;
        let reader_cache = BlobCache::open(options(dir.path(), capacity, 64 << 10)).unwrap();
        let filler_cache = BlobCache::open(options(dir.path(), capacity, 64 << 10)).unwrap();
        let blob = reader_cache.blob("sha256:aa", origin(&data)).unwrap();
        let mut buf = vec![0u8; data.len()];
        blob.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data);
        // Another process fills the cache with another blob: ours is open,
        // so it is emptied in place.
        let filler = filler_cache.blob("sha256:bb", origin(&other)).unwrap();
        let mut other_buf = vec![0u8; other.len()];
        filler.read_exact_at(&mut other_buf, 0).unwrap();
        assert!(filler_cache.evictions() > 0);
        assert!(filler_cache.used() <= capacity);
        buf.fill(0xaa);
        blob.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data, "re-fetched, never holes");
    }

    #[test]
    fn an_eviction_is_audited_with_the_bytes_it_freed() {
        let lines = crate::audit::capture();
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(2 << 20);
        let cache = BlobCache::open(options(dir.path(), 3 << 20, 64 << 10)).unwrap();
        let mut buf = vec![0u8; data.len()];
        for key in ["sha256:audit1", "sha256:audit2"] {
            let blob = cache.blob(key, origin(&data)).unwrap();
            blob.read_exact_at(&mut buf, 0).unwrap();
        }
        let evicted = dir.path().join("sha256_audit1.data");
        let wanted = format!(
            " eviction file={} offset=0 size={} ",
            evicted.display(),
            2 << 20
        );
        let lines = lines.lock().unwrap();
        let ours: Vec<&String> = lines.iter().filter(|l| l.contains(&wanted)).collect();
        assert_eq!(ours.len(), 1, "{lines:?}");
        assert!(ours[0].ends_with(" result=ok"), "{}", ours[0]);
    }

    #[test]
    fn a_closed_blob_is_deleted_by_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(2 << 20);
        let cache = BlobCache::open(options(dir.path(), 3 << 20, 64 << 10)).unwrap();
        {
            let blob = cache.blob("sha256:aa", origin(&data)).unwrap();
            let mut buf = vec![0u8; data.len()];
            blob.read_exact_at(&mut buf, 0).unwrap();
        }
        let blob = cache.blob("sha256:bb", origin(&data)).unwrap();
        let mut buf = vec![0u8; data.len()];
        blob.read_exact_at(&mut buf, 0).unwrap();
        assert!(!dir.path().join("sha256_aa.chunks").exists());
        assert!(!dir.path().join("sha256_aa.data").exists());
        assert!(cache.used() <= 3 << 20);
    }

    #[test]
    fn a_chunk_whose_bytes_are_wrong_is_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(1 << 20);
        {
            let cache = BlobCache::open(options(dir.path(), 64 << 20, 64 << 10)).unwrap();
            let blob = cache.blob("sha256:aa", origin(&data)).unwrap();
            let mut buf = vec![0u8; data.len()];
            blob.read_exact_at(&mut buf, 0).unwrap();
        }
        // The record says present, the data is not what it was (a power cut
        // before the data reached the disk, a bit flipped on disk).
        let data_file = OpenOptions::new()
            .write(true)
            .open(dir.path().join("sha256_aa.data"))
            .unwrap();
        data_file.write_all_at(&[0u8; 4096], 200_000).unwrap();
        let cache = BlobCache::open(options(dir.path(), 64 << 20, 64 << 10)).unwrap();
        let blob = cache.blob("sha256:aa", origin(&data)).unwrap();
        let mut buf = vec![0u8; 1000];
        blob.read_exact_at(&mut buf, 201_000).unwrap();
        assert_eq!(buf, data[201_000..202_000]);
        assert_eq!(cache.fetched(), 64 << 10, "one chunk fetched again");
    }

    #[test]
    fn dropped_chunks_come_from_the_origin_again() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(1 << 20);
        let cache = BlobCache::open(options(dir.path(), 64 << 20, 64 << 10)).unwrap();
        let blob = cache.blob("sha256:aa", origin(&data)).unwrap();
        let mut buf = vec![0u8; 4096];
        blob.read_exact_at(&mut buf, 70_000).unwrap();
        let used = cache.used();
        blob.drop_cached(70_000, 4096);
        assert!(!blob.is_present(70_000, 4096));
        assert_eq!(cache.used(), used - (64 << 10));
        blob.read_exact_at(&mut buf, 70_000).unwrap();
        assert_eq!(buf, data[70_000..74_096]);
        assert_eq!(cache.fetched(), 2 * (64 << 10));
    }

    #[test]
    fn a_record_of_another_layout_is_replaced_when_unused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("sha256_aa.chunks"), b"not a record").unwrap();
        let data = pattern(100_000);
        let cache = BlobCache::open(options(dir.path(), 64 << 20, 64 << 10)).unwrap();
        let blob = cache.blob("sha256:aa", origin(&data)).unwrap();
        let mut buf = vec![0u8; data.len()];
        blob.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data);
    }

    #[test]
    fn a_miss_bigger_than_the_cache_is_served_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(1 << 20);
        let cache = BlobCache::open(options(dir.path(), 100 << 10, 256 << 10)).unwrap();
        let blob = cache.blob("sha256:aa", origin(&data)).unwrap();
        let mut buf = vec![0u8; data.len()];
        blob.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data);
        assert_eq!(cache.used(), 0);
    }
}
