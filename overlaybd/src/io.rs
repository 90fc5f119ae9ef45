//! Random-access byte sources. Every layer representation (a local file, the
//! payload of a tar wrapper, the decompressed view of a ZFile, a registry
//! blob behind the cache) is a [`ReadAt`], so the parsers above it never
//! care where the bytes come from. What a source *is* (and so how a front
//! end may read it) is told by types in [`crate::storage`], not asked of
//! the source.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::error::{IoContext, Result};

/// A sized, thread-safe source of bytes read at absolute offsets.
pub trait ReadAt: Send + Sync {
    /// Fill all of `buf` from `offset`. Reading past [`ReadAt::size`] is an
    /// `UnexpectedEof` error, never a short read.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Number of readable bytes.
    fn size(&self) -> u64;
    /// What to call this source in error messages (usually a path).
    fn name(&self) -> &str;
    /// Forget any local copy of `[offset, offset + len)`, so that the next
    /// read fetches those bytes from their origin again: a check above (a
    /// ZFile block CRC) found them wrong. Sources without a cache have
    /// nothing to forget.
    fn drop_cached(&self, _offset: u64, _len: u64) {}
    /// Fill each `(offset, buf)` of `parts`; the outcome of each, in order.
    /// Sources that can have all of them in flight at once (a registry
    /// blob) do; this default reads them on scoped threads, one each but
    /// the first, which this thread reads.
    fn read_many_at(&self, parts: &mut [(u64, &mut [u8])]) -> Vec<io::Result<()>> {
        let Some(((offset, buf), others)) = parts.split_first_mut() else {
            return Vec::new();
        };
        std::thread::scope(|scope| {
            let others: Vec<_> = others
                .iter_mut()
                .map(|(offset, buf)| scope.spawn(move || self.read_exact_at(buf, *offset)))
                .collect();
            let mut results = vec![self.read_exact_at(buf, *offset)];
            for other in others {
                results.push(
                    other
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("a read thread panicked"))),
                );
            }
            results
        })
    }
    /// Wait for a turn to read from this source in the prefetch class, and
    /// hold it while the returned value lives; this thread's reads of the
    /// source are not admitted again meanwhile. A cache takes the turn
    /// before it claims the chunks a prefetch will fetch, so a prefetch
    /// that waits for its turn never holds chunks an on-demand read needs.
    /// Sources with no bound on prefetch reads give `None`.
    fn prefetch_turn(&self) -> Option<PrefetchTurn> {
        None
    }
}

/// A turn to read in the prefetch class ([`ReadAt::prefetch_turn`]):
/// whatever the source needs to keep while it is held.
pub struct PrefetchTurn(#[allow(dead_code)] Box<dyn std::any::Any>);

impl PrefetchTurn {
    pub fn new(hold: impl std::any::Any) -> Self {
        PrefetchTurn(Box::new(hold))
    }
}

/// Shared handle to any source.
pub type Source = Arc<dyn ReadAt>;

/// A local file opened read-only.
pub struct LocalFile {
    file: File,
    size: u64,
    name: String,
}

impl LocalFile {
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let file = File::open(path).context(|| name.clone())?;
        Self::from_file(file, name)
    }

    pub fn from_file(file: File, name: String) -> Result<Self> {
        let size = file.metadata().context(|| name.clone())?.len();
        Ok(LocalFile { file, size, name })
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl ReadAt for LocalFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self, buf.len(), offset)?;
        let started = crate::audit::start();
        let result = self.file.read_exact_at(buf, offset);
        crate::audit::slow_file_read(started, &self.file, offset, buf.len() as u64, &result);
        result
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// A window `[start, start + len)` of another source (e.g. a tar payload).
pub struct Window {
    inner: Source,
    start: u64,
    len: u64,
    name: String,
}

impl Window {
    /// Fails when the window does not fit inside `inner`.
    pub fn new(inner: Source, start: u64, len: u64) -> io::Result<Self> {
        let end = start.checked_add(len);
        if end.is_none_or(|end| end > inner.size()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: window {start}+{len} lies outside the {} byte source",
                    inner.name(),
                    inner.size()
                ),
            ));
        }
        let name = inner.name().to_string();
        Ok(Window {
            inner,
            start,
            len,
            name,
        })
    }
}

impl ReadAt for Window {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self, buf.len(), offset)?;
        self.inner.read_exact_at(buf, self.start + offset)
    }
    fn size(&self) -> u64 {
        self.len
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn drop_cached(&self, offset: u64, len: u64) {
        self.inner.drop_cached(self.start + offset, len);
    }
}

/// An in-memory source, for tests and small generated files.
pub struct Bytes {
    data: Vec<u8>,
    name: String,
}

impl Bytes {
    pub fn new(data: Vec<u8>, name: impl Into<String>) -> Self {
        Bytes {
            data,
            name: name.into(),
        }
    }
}

impl ReadAt for Bytes {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self, buf.len(), offset)?;
        let start = offset as usize;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// `Err(UnexpectedEof)` unless `[offset, offset + len)` lies inside `src`.
pub fn check_bounds(src: &dyn ReadAt, len: usize, offset: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= src.size() => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{}: read of {len} bytes at {offset} passes the end ({} bytes)",
                src.name(),
                src.size()
            ),
        )),
    }
}
