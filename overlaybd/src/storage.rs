//! Where a layer's bytes live, as types a front end can match on.
//!
//! A layer blob is stored in a [`Container`]: a local file, a registry blob
//! that may have to be fetched, or any other [`ReadAt`] (bytes in memory).
//! Its LSMT bytes are a [`Stored`] range of that container (all of it, or a
//! tar payload), either plain or ZFile-compressed: [`LayerData`].
//!
//! Front ends never ask a source what it really is; they get an [`At`] — a
//! place with its kind in its type — from the stack's access plan and read
//! it their own way: io_uring for a local file, a thread pool for a blob
//! that may fetch, a plain call for the rest.

use std::fs::File;
use std::io;
use std::sync::Arc;

use crate::io::{check_bounds, Bytes, LocalFile, ReadAt, Source, Window};
use crate::zfile::ZFileReader;

/// A blob whose bytes may have to come over the network (a registry blob,
/// through the cache).
pub trait Fetch: ReadAt {
    /// Whether `[offset, offset + len)` can be read now without the network.
    fn is_present(&self, offset: u64, len: u64) -> bool;
    /// The local file holding every byte of the blob, once it has been
    /// downloaded (see `remote::download`); reads may go straight to it.
    fn downloaded(&self) -> Option<&LocalFile> {
        None
    }
    /// Fill `buf` from `offset` only if every byte is here now: `Ok(false)`
    /// (and `buf` undefined) when any of it would have to be fetched. For
    /// threads that must never wait on the network (a ublk queue): they
    /// hand the read to a pool on `false`. Unlike asking
    /// [`Fetch::is_present`] first, nothing evicted in between is fetched.
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        if !self.is_present(offset, buf.len() as u64) {
            return Ok(false);
        }
        self.read_exact_at(buf, offset)?;
        Ok(true)
    }
    /// Make `[offset, offset + len)` present (prefetch) without handing
    /// the bytes to anyone; returns the bytes fetched from the network.
    fn warm(&self, offset: u64, len: u64) -> io::Result<u64> {
        if self.is_present(offset, len) {
            return Ok(0);
        }
        read_and_drop(self, offset, len)
    }
}

/// Read `[offset, offset + len)` of `source` in pieces of at most 1 MiB and
/// drop the bytes (what warming a source without a cache of its own is);
/// returns `len`.
pub fn read_and_drop(source: &(impl ReadAt + ?Sized), offset: u64, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(buf.len() as u64) as usize;
        source.read_exact_at(&mut buf[..n], at)?;
        at += n as u64;
    }
    Ok(len)
}

/// A layer blob as stored.
#[derive(Clone)]
pub enum Container {
    /// A file on local storage.
    Local(Arc<LocalFile>),
    /// A blob that may fetch from a registry.
    Remote(Arc<dyn Fetch>),
    /// Any other source, read with plain calls that never wait on the
    /// network (bytes in memory for tests and fuzzing).
    Other(Source),
}

impl Container {
    /// The container as a plain byte source.
    pub fn source(&self) -> Source {
        match self {
            Container::Local(file) => file.clone(),
            Container::Remote(blob) => blob.clone(),
            Container::Other(source) => source.clone(),
        }
    }

    fn size(&self) -> u64 {
        match self {
            Container::Local(file) => file.size(),
            Container::Remote(blob) => blob.size(),
            Container::Other(source) => source.size(),
        }
    }

    /// Where byte `offset` of the container is read from now.
    fn at(&self, offset: u64) -> At<'_> {
        match self {
            Container::Local(file) => At::File {
                file: file.file(),
                offset,
            },
            Container::Remote(blob) => match blob.downloaded() {
                Some(file) => At::File {
                    file: file.file(),
                    offset,
                },
                None => At::Fetch {
                    blob: &**blob,
                    offset,
                },
            },
            Container::Other(source) => At::Read {
                source: &**source,
                offset,
            },
        }
    }
}

impl From<Arc<LocalFile>> for Container {
    fn from(file: Arc<LocalFile>) -> Self {
        Container::Local(file)
    }
}

impl From<Source> for Container {
    fn from(source: Source) -> Self {
        Container::Other(source)
    }
}

impl From<Arc<Bytes>> for Container {
    fn from(bytes: Arc<Bytes>) -> Self {
        Container::Other(bytes)
    }
}

/// `len` bytes at `base` of a container: a whole blob, or a tar payload.
#[derive(Clone)]
pub struct Stored {
    pub container: Container,
    pub base: u64,
    pub len: u64,
}

impl Stored {
    /// All of `container`.
    pub fn whole(container: Container) -> Stored {
        let len = container.size();
        Stored {
            container,
            base: 0,
            len,
        }
    }

    /// The stored bytes as a plain source.
    pub fn source(&self) -> io::Result<Source> {
        let inner = self.container.source();
        if self.base == 0 && self.len == inner.size() {
            return Ok(inner);
        }
        Ok(Arc::new(Window::new(inner, self.base, self.len)?))
    }

    /// Where byte `offset` of the stored range is read from now.
    pub fn at(&self, offset: u64) -> At<'_> {
        self.container.at(self.base + offset)
    }
}

/// The LSMT bytes of a layer blob.
#[derive(Clone)]
pub enum LayerData {
    /// Stored as they are.
    Plain { stored: Stored, source: Source },
    /// ZFile-compressed: `reader` decodes blocks whose bytes are `stored`.
    ZFile {
        reader: Arc<ZFileReader>,
        stored: Stored,
    },
}

impl LayerData {
    /// Plain bytes stored in `stored`.
    pub fn plain(stored: Stored) -> io::Result<LayerData> {
        let source = stored.source()?;
        Ok(LayerData::Plain { stored, source })
    }

    /// The LSMT bytes as a plain source (decompressed for a ZFile).
    pub fn source(&self) -> Source {
        match self {
            LayerData::Plain { source, .. } => source.clone(),
            LayerData::ZFile { reader, .. } => reader.clone(),
        }
    }

    /// Where the `len` LSMT bytes at `position` are read from, and how.
    pub fn access(&self, position: u64, len: u64) -> io::Result<Access<'_>> {
        match self {
            LayerData::Plain { stored, source } => {
                check_bounds(&**source, len as usize, position)?;
                Ok(Access::Plain(stored.at(position)))
            }
            LayerData::ZFile { reader, stored } => {
                let len = usize::try_from(len)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "read too long"))?;
                let (start, stored_len) = reader.stored_span(position, len)?;
                Ok(Access::Compressed {
                    reader,
                    position,
                    stored: stored.at(start),
                    stored_len,
                })
            }
        }
    }
}

impl From<Source> for LayerData {
    /// Plain LSMT bytes of any source.
    fn from(source: Source) -> Self {
        LayerData::Plain {
            stored: Stored::whole(Container::Other(source.clone())),
            source,
        }
    }
}

impl From<Arc<LocalFile>> for LayerData {
    /// A plain LSMT file on local storage.
    fn from(file: Arc<LocalFile>) -> Self {
        LayerData::Plain {
            source: file.clone(),
            stored: Stored::whole(Container::Local(file)),
        }
    }
}

impl From<Arc<Bytes>> for LayerData {
    /// Plain LSMT bytes in memory.
    fn from(bytes: Arc<Bytes>) -> Self {
        LayerData::from(bytes as Source)
    }
}

/// A place bytes are read from, with what reading it may wait on.
#[derive(Clone, Copy)]
pub enum At<'a> {
    /// A file on local storage, at `offset`.
    File { file: &'a File, offset: u64 },
    /// A blob that may fetch from a registry, at `offset`.
    Fetch { blob: &'a dyn Fetch, offset: u64 },
    /// Any other source, at `offset`, read with a plain call.
    Read { source: &'a dyn ReadAt, offset: u64 },
}

impl At<'_> {
    /// Whether reading `len` bytes here may wait on the network.
    pub fn may_fetch(&self, len: u64) -> bool {
        match *self {
            At::Fetch { blob, offset } => !blob.is_present(offset, len),
            At::File { .. } | At::Read { .. } => false,
        }
    }

    /// Fill `buf` from here, synchronously.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        match *self {
            At::File { file, offset } => {
                let started = crate::audit::start();
                let result = file.read_exact_at(buf, offset);
                crate::audit::slow_file_read(started, file, offset, buf.len() as u64, &result);
                result
            }
            At::Fetch { blob, offset } => blob.read_exact_at(buf, offset),
            At::Read { source, offset } => source.read_exact_at(buf, offset),
        }
    }
}

/// How the bytes of one piece of a read are obtained.
#[derive(Clone, Copy)]
pub enum Access<'a> {
    /// Zeros: nothing to read.
    Zero,
    /// The bytes themselves, stored here.
    Plain(At<'a>),
    /// Decompressed `[position, position + len)` of a ZFile, whose stored
    /// blocks are the `stored_len` bytes at `stored`: read them, then check
    /// and decode with [`ZFileReader::decode_range`].
    Compressed {
        reader: &'a ZFileReader,
        position: u64,
        stored: At<'a>,
        stored_len: u64,
    },
}

impl Access<'_> {
    /// Whether obtaining `len` bytes this way may wait on the network.
    pub fn may_fetch(&self, len: u64) -> bool {
        match self {
            Access::Zero => false,
            Access::Plain(at) => at.may_fetch(len),
            Access::Compressed {
                stored, stored_len, ..
            } => stored.may_fetch(*stored_len),
        }
    }

    /// Fill `buf` (the piece's length) synchronously. A ZFile piece is read
    /// through its reader, which re-reads a block whose CRC fails.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Access::Zero => {
                buf.fill(0);
                Ok(())
            }
            Access::Plain(at) => at.read(buf),
            Access::Compressed {
                reader, position, ..
            } => reader.read_exact_at(buf, *position),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::open_layer_blob;
    use crate::remote::download::Switchable;
    use crate::zfile::{compress, Algorithm, Flavor, ZFileOptions};
    use std::io::Write;

    /// A blob that says nothing of it is present until told otherwise.
    struct Unfetched(Bytes);

    impl ReadAt for Unfetched {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.0.read_exact_at(buf, offset)
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn name(&self) -> &str {
            self.0.name()
        }
    }

    impl Fetch for Unfetched {
        fn is_present(&self, _offset: u64, len: u64) -> bool {
            len == 0
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 / 3) as u8).collect()
    }

    fn local(dir: &std::path::Path, name: &str, bytes: &[u8]) -> Arc<LocalFile> {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        Arc::new(LocalFile::open(&path).unwrap())
    }

    fn read(access: &Access<'_>, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        access.read(&mut buf).unwrap();
        buf
    }

    #[test]
    fn a_local_file_is_read_at_its_own_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = pattern(8192);
        let data = LayerData::from(local(dir.path(), "plain", &bytes));
        let access = data.access(4096, 512).unwrap();
        assert!(matches!(
            access,
            Access::Plain(At::File { offset: 4096, .. })
        ));
        assert!(!access.may_fetch(512));
        assert_eq!(read(&access, 512), &bytes[4096..4608]);
        assert!(data.access(8000, 512).is_err(), "past the end");
    }

    #[test]
    fn a_zfile_in_a_local_file_names_its_stored_blocks_there() {
        let dir = tempfile::tempdir().unwrap();
        let plain = pattern(64 << 10);
        let mut zfile = Vec::new();
        let options = ZFileOptions {
            algorithm: Algorithm::Lz4,
            block_size: 4096,
            flavor: Flavor::CommitOutput,
        };
        compress(
            &Bytes::new(plain.clone(), "plain"),
            &mut std::io::Cursor::new(&mut zfile),
            &options,
            &mut |_| {},
        )
        .unwrap();
        let file = local(dir.path(), "z", &zfile);
        let data = open_layer_blob(file).unwrap();
        let LayerData::ZFile { reader, .. } = &data else {
            panic!("not detected as a ZFile");
        };
        let (start, stored_len) = reader.stored_span(10_000, 3000).unwrap();
        let access = data.access(10_000, 3000).unwrap();
        let Access::Compressed {
            stored: At::File { offset, .. },
            stored_len: len,
            position,
            ..
        } = access
        else {
            panic!("a ZFile in a local file is not read from that file");
        };
        assert_eq!((offset, len, position), (start, stored_len, 10_000));
        assert_eq!(read(&access, 3000), &plain[10_000..13_000]);
    }

    #[test]
    fn a_remote_blob_is_read_from_its_download_once_switched() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = pattern(8192);
        let blob: Arc<dyn Fetch> = Arc::new(Unfetched(Bytes::new(bytes.clone(), "blob")));
        let switchable = Arc::new(Switchable::new(blob));
        let data = LayerData::plain(Stored::whole(Container::Remote(switchable.clone()))).unwrap();

        let access = data.access(512, 1024).unwrap();
        assert!(matches!(
            access,
            Access::Plain(At::Fetch { offset: 512, .. })
        ));
        assert!(access.may_fetch(1024));
        assert_eq!(read(&access, 1024), &bytes[512..1536]);

        let path = dir.path().join("downloaded");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        switchable
            .switch_to(LocalFile::open(&path).unwrap())
            .unwrap();
        let access = data.access(512, 1024).unwrap();
        assert!(matches!(
            access,
            Access::Plain(At::File { offset: 512, .. })
        ));
        assert!(!access.may_fetch(1024));
        assert_eq!(read(&access, 1024), &bytes[512..1536]);
        let again = switchable.switch_to(LocalFile::open(&path).unwrap());
        assert!(again.is_err(), "a second switch is refused");
    }
}
