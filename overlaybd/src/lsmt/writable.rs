//! Writable layers: append-only data + index files, or one sparse file;
//! writes, discards, flush, reopening after a crash, and sealing.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::commit::{commit, CommitOptions};
use super::*;
use crate::error::{Error, IoContext, Result};
use crate::index::{
    mend, Entry, Extent, IntervalMap, Piece, ENTRY_SIZE, MAX_ENTRY_SECTORS, SECTOR,
};

/// Options for creating a writable layer.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub virtual_size: u64,
    pub parent_uuid: Option<String>,
    pub sparse: bool,
}

struct WriteState {
    map: IntervalMap,
    /// End of the data file in bytes (appends go here; non-sparse only).
    data_end: u64,
    /// End of the index file in bytes (non-sparse only).
    index_end: u64,
}

/// A writable layer: an append-only data file plus an index file, or (when
/// sparse) one data file where logical byte X lives at 4096 + X.
pub struct WritableLayer {
    /// The data file's header as it was opened or created; the virtual
    /// size may have grown since ([`WritableLayer::virtual_size`]).
    pub header: Header,
    /// The virtual size now (see [`WritableLayer::grow`]).
    size: AtomicU64,
    data: File,
    index: Option<File>,
    name: String,
    state: Mutex<WriteState>,
}

impl WritableLayer {
    /// The layer over files already laid out: `map` is what they hold;
    /// appends go at `data_end` and `index_end` (both 0 for sparse layers).
    fn assemble(
        header: Header,
        data: File,
        index: Option<File>,
        name: String,
        map: IntervalMap,
        data_end: u64,
        index_end: u64,
    ) -> WritableLayer {
        WritableLayer {
            size: AtomicU64::new(header.virtual_size),
            header,
            data,
            index,
            name,
            state: Mutex::new(WriteState {
                map,
                data_end,
                index_end,
            }),
        }
    }

    /// Create new files (refusing to overwrite existing ones).
    pub fn create(
        data_path: &Path,
        index_path: Option<&Path>,
        options: &CreateOptions,
    ) -> Result<WritableLayer> {
        let name = data_path.display().to_string();
        // 0 is allowed, as by the reference: the size of the layers below,
        // taken when the layer is first stacked (the containerd snapshotter
        // creates a container's writable layer so).
        if !options.virtual_size.is_multiple_of(SECTOR) {
            return Err(Error::Invalid(format!(
                "virtual size {} is not a multiple of 512 bytes",
                options.virtual_size
            )));
        }
        let parent = match &options.parent_uuid {
            Some(p) => normalize_uuid(p)?,
            None => NIL_UUID.to_string(),
        };
        let uuid = random_uuid();
        let create = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .context(|| path.display().to_string())
        };
        if options.sparse {
            if index_path.is_some() {
                return Err(Error::Invalid(
                    "a sparse writable layer has no index file".into(),
                ));
            }
            let data = create(data_path)?;
            let header = Header::new(
                FLAG_HEADER | FLAG_DATA | FLAG_SPARSE,
                options.virtual_size,
                &uuid,
                &parent,
            );
            data.write_all_at(&header.encode(), 0)
                .context(|| name.clone())?;
            data.set_len(HEADER_SIZE + options.virtual_size)
                .context(|| name.clone())?;
            return Ok(WritableLayer::assemble(
                header,
                data,
                None,
                name,
                IntervalMap::new(),
                0,
                0,
            ));
        }
        let index_path = index_path
            .ok_or_else(|| Error::Invalid("a writable layer needs an index file".into()))?;
        let header = Header::new(
            FLAG_HEADER | FLAG_DATA,
            options.virtual_size,
            &uuid,
            &parent,
        );
        let mut index_header = Header::new(FLAG_HEADER, options.virtual_size, &uuid, &parent);
        index_header.index_offset = HEADER_SIZE;
        let data = create(data_path)?;
        let index = create(index_path)?;
        data.write_all_at(&header.encode(), 0)
            .context(|| name.clone())?;
        index
            .write_all_at(&index_header.encode(), 0)
            .context(|| index_path.display().to_string())?;
        Ok(WritableLayer::assemble(
            header,
            data,
            Some(index),
            name,
            IntervalMap::new(),
            HEADER_SIZE,
            HEADER_SIZE,
        ))
    }

    /// Open existing files, replaying the index (or, when sparse, rebuilding
    /// it from the file's allocated extents).
    pub fn open(
        data_path: &Path,
        index_path: Option<&Path>,
        writable: bool,
    ) -> Result<WritableLayer> {
        let name = data_path.display().to_string();
        let open = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(writable)
                .open(path)
                .context(|| path.display().to_string())
        };
        let data = open(data_path)?;
        let mut block = vec![0u8; HEADER_SIZE as usize];
        data.read_exact_at(&mut block, 0)
            .map_err(|_| Error::corrupt(&name, "too short for an LSMT header"))?;
        let header = Header::parse(&block, &name)?;
        if !header.has(FLAG_HEADER) || !header.has(FLAG_DATA) {
            return Err(Error::corrupt(
                &name,
                "not an LSMT writable data file (header flags)",
            ));
        }
        let data_size = data.metadata().context(|| name.clone())?.len();
        if header.has(FLAG_SPARSE) {
            let expected = HEADER_SIZE.checked_add(header.virtual_size);
            if expected != Some(data_size) {
                return Err(Error::corrupt(
                    &name,
                    format!(
                        "sparse layer file is {data_size} bytes, expected 4096 + virtual size {}",
                        header.virtual_size
                    ),
                ));
            }
            let map = sparse_extents(&data, data_size).context(|| name.clone())?;
            return Ok(WritableLayer::assemble(header, data, None, name, map, 0, 0));
        }
        let index_path = index_path.ok_or_else(|| {
            Error::Invalid(format!("{name}: this writable layer needs its index file"))
        })?;
        let index_name = index_path.display().to_string();
        let index = open(index_path)?;
        let index_size = index.metadata().context(|| index_name.clone())?.len();
        if index_size < HEADER_SIZE {
            return Err(Error::corrupt(
                &index_name,
                "too short for an LSMT index header",
            ));
        }
        index
            .read_exact_at(&mut block, 0)
            .context(|| index_name.clone())?;
        let index_header = Header::parse(&block, &index_name)?;
        if !index_header.has(FLAG_HEADER) || index_header.has(FLAG_DATA) {
            return Err(Error::corrupt(
                &index_name,
                "not an LSMT index file (header flags)",
            ));
        }
        // After a crash the index may hold what the data file does not: a
        // torn last entry (ignored), or entries whose data never reached the
        // disk (they point past its end; a FLUSH syncs the data before the
        // index, so no flushed write is among them). Replay stops at the
        // first such entry: the layer opens at the last state it was in.
        let count = ((index_size - HEADER_SIZE) / ENTRY_SIZE as u64).min(MAX_WRITABLE_ENTRIES);
        let data_end = data_size.div_ceil(SECTOR) * SECTOR;
        let data_end_sector = data_end / SECTOR;
        let mut map = IntervalMap::new();
        let mut raw = vec![0u8; 1 << 20];
        let mut done = 0u64;
        let mut kept = count;
        'replay: while done < count {
            let n = (count - done).min((raw.len() / ENTRY_SIZE) as u64);
            let bytes = &mut raw[..n as usize * ENTRY_SIZE];
            index
                .read_exact_at(bytes, HEADER_SIZE + done * ENTRY_SIZE as u64)
                .context(|| index_name.clone())?;
            for (i, chunk) in bytes.chunks_exact(ENTRY_SIZE).enumerate() {
                let number = done + i as u64;
                let entry = Entry::decode(chunk.try_into().expect("16 bytes"));
                if entry.is_padding() || entry.length == 0 {
                    continue;
                }
                if entry.end() > PADDING_OFFSET {
                    return Err(Error::corrupt(
                        &index_name,
                        format!(
                            "entry {number} covers sectors {}..{}, past the last sector an index entry can address",
                            entry.offset,
                            entry.end()
                        ),
                    ));
                }
                if !entry.zeroed && entry.moffset < HEADER_SIZE / SECTOR {
                    return Err(Error::corrupt(
                        &index_name,
                        format!(
                            "entry {number} points at sectors {}..{}, inside the data file's header",
                            entry.moffset,
                            entry.moffset + entry.length
                        ),
                    ));
                }
                if entry.mend() > data_end_sector {
                    kept = number;
                    break 'replay;
                }
                map.insert(entry.offset, entry.extent(0));
            }
            done += n;
        }
        if kept < count {
            eprintln!(
                "obd: {index_name}: entries {kept}..{count} point past the end of the data file \
                 ({data_end_sector} sectors): writes lost in a crash before they were flushed; \
                 the layer opens without them{}",
                if writable {
                    " and they leave the index"
                } else {
                    ""
                }
            );
            if writable {
                // New entries must follow the kept ones, or the next open
                // would stop at the dropped ones again and lose them too.
                index
                    .set_len(HEADER_SIZE + kept * ENTRY_SIZE as u64)
                    .context(|| index_name.clone())?;
            }
        }
        Ok(WritableLayer::assemble(
            header,
            data,
            Some(index),
            name,
            map,
            data_end,
            HEADER_SIZE + kept * ENTRY_SIZE as u64,
        ))
    }

    pub fn is_sparse(&self) -> bool {
        self.index.is_none()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grow the virtual size to `new_size` bytes (a multiple of 512, not
    /// smaller than now; the same size is no change). The new size is
    /// written into the headers and synced before it is served: a sparse
    /// data file is lengthened first, then the index file's header (when
    /// there is one), then the data file's, which is the one `open` reads
    /// (a plain layer that crashes in between opens at its old size). A
    /// sparse layer that crashes between its new length and its new header
    /// is refused by `open`, which names both; truncating the file to 4096
    /// + the header's virtual size recovers it.
    pub fn grow(&self, new_size: u64) -> Result<()> {
        // One grow at a time, and none during an append.
        let _state = self.state.lock().expect("writable layer lock");
        let old = self.virtual_size();
        if new_size == old {
            return Ok(());
        }
        if new_size < old || !new_size.is_multiple_of(SECTOR) {
            return Err(Error::Invalid(format!(
                "{}: the virtual size can grow from {old} bytes to a larger multiple of 512 \
                 bytes, not to {new_size}",
                self.name
            )));
        }
        if self.is_sparse() {
            let len = HEADER_SIZE.checked_add(new_size).ok_or_else(|| {
                Error::Invalid(format!("{}: virtual size {new_size} too large", self.name))
            })?;
            self.data.set_len(len).context(|| self.name.clone())?;
        }
        let write_headers = || -> Result<()> {
            for file in self.index.iter().chain(std::iter::once(&self.data)) {
                let mut block = vec![0u8; HEADER_SIZE as usize];
                file.read_exact_at(&mut block, 0)
                    .context(|| self.name.clone())?;
                let mut header = Header::parse(&block, &self.name)?;
                header.virtual_size = new_size;
                file.write_all_at(&header.encode(), 0)
                    .context(|| self.name.clone())?;
                file.sync_data().context(|| self.name.clone())?;
            }
            Ok(())
        };
        if let Err(e) = write_headers() {
            if self.is_sparse() {
                // Back to the length the header still states.
                let _ = self.data.set_len(HEADER_SIZE + old);
            }
            return Err(e);
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        if !offset.is_multiple_of(SECTOR) || !length.is_multiple_of(SECTOR) {
            return Err(Error::Invalid(format!(
                "{}: I/O at {offset}+{length} is not 512-byte aligned",
                self.name
            )));
        }
        let size = self.virtual_size();
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(Error::Invalid(format!(
                "{}: I/O at {offset}+{length} passes the virtual size {size}",
                self.name
            )));
        }
        Ok(())
    }

    /// Write `buf` at logical byte `offset` (both 512-aligned).
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let max_piece = (MAX_WRITE_SECTORS * SECTOR) as usize;
        for (i, piece) in buf.chunks(max_piece).enumerate() {
            self.write_piece(piece, offset + (i * max_piece) as u64)?;
        }
        Ok(())
    }

    fn write_piece(&self, buf: &[u8], offset: u64) -> Result<()> {
        let sectors = buf.len() as u64 / SECTOR;
        if self.index.is_none() {
            let position = HEADER_SIZE + offset;
            self.data
                .write_all_at(buf, position)
                .context(|| self.name.clone())?;
            let mut state = self.state.lock().expect("writable layer lock");
            state.map.insert(
                offset / SECTOR,
                Extent {
                    length: sectors,
                    moffset: position / SECTOR,
                    zeroed: false,
                    layer: 0,
                },
            );
            return Ok(());
        }
        // Reserve the data space, write outside the lock, then record the
        // entry and make it visible in one step so index order = map order.
        let position = {
            let mut state = self.state.lock().expect("writable layer lock");
            let position = state.data_end;
            state.data_end += buf.len() as u64;
            position
        };
        self.data
            .write_all_at(buf, position)
            .context(|| self.name.clone())?;
        self.append_entry(Entry {
            offset: offset / SECTOR,
            length: sectors,
            moffset: position / SECTOR,
            zeroed: false,
        })
    }

    /// Discard (and zero) `[offset, offset + length)`: reads return zeros
    /// and lower layers are hidden. In a sparse layer the space is punched
    /// out, so after reopening the range reads through to lower layers
    /// (the stack stores zeros where that would show lower data: see
    /// [`WritableLayer::store_zeros`]).
    pub fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.check_range(offset, length)?;
        if self.is_sparse() {
            punch_hole(&self.data, HEADER_SIZE + offset, length).context(|| self.name.clone())?;
        }
        // Like the reference, record the discard in pieces one index entry
        // can hold (16383 sectors): `commit` writes each zeroed extent as
        // one entry.
        let mut sector = offset / SECTOR;
        let end = (offset + length) / SECTOR;
        while sector < end {
            let n = (end - sector).min(MAX_ENTRY_SECTORS);
            if self.is_sparse() {
                let mut state = self.state.lock().expect("writable layer lock");
                state.map.insert(
                    sector,
                    Extent {
                        length: n,
                        moffset: sector + HEADER_SIZE / SECTOR,
                        zeroed: true,
                        layer: 0,
                    },
                );
            } else {
                let moffset = self.state.lock().expect("writable layer lock").data_end / SECTOR;
                self.append_entry(Entry {
                    offset: sector,
                    length: n,
                    moffset,
                    zeroed: true,
                })?;
            }
            sector += n;
        }
        Ok(())
    }

    /// Sparse layers only: write zeros over `[offset, offset + length)`,
    /// so that the range stays allocated and reads as zeros after the
    /// layer is reopened. The in-memory map keeps the range as discarded.
    pub fn store_zeros(&self, offset: u64, length: u64) -> Result<()> {
        self.check_range(offset, length)?;
        if !self.is_sparse() {
            return Ok(());
        }
        let zeros = vec![0u8; length.min(1 << 20) as usize];
        let mut at = offset;
        while at < offset + length {
            let n = (offset + length - at).min(zeros.len() as u64) as usize;
            self.data
                .write_all_at(&zeros[..n], HEADER_SIZE + at)
                .context(|| self.name.clone())?;
            at += n as u64;
        }
        Ok(())
    }

    fn append_entry(&self, entry: Entry) -> Result<()> {
        let index = self.index.as_ref().expect("non-sparse layer has an index");
        let mut state = self.state.lock().expect("writable layer lock");
        index
            .write_all_at(&entry.encode(), state.index_end)
            .context(|| format!("{} (index)", self.name))?;
        state.index_end += ENTRY_SIZE as u64;
        state.map.insert(entry.offset, entry.extent(0));
        Ok(())
    }

    /// Make everything written so far durable: data first, then the index.
    pub fn flush(&self) -> Result<()> {
        self.data.sync_data().context(|| self.name.clone())?;
        if let Some(index) = &self.index {
            index
                .sync_data()
                .context(|| format!("{} (index)", self.name))?;
        }
        Ok(())
    }

    /// The layer's mapping of `[sector, sector + sectors)`, holes included.
    pub fn lookup(&self, sector: u64, sectors: u64, out: &mut Vec<Piece>) {
        self.state
            .lock()
            .expect("writable layer lock")
            .map
            .lookup(sector, sectors, out);
    }

    /// A copy of the current index.
    pub fn snapshot(&self) -> IntervalMap {
        self.state.lock().expect("writable layer lock").map.clone()
    }

    /// The data file: a plan position in this layer is a byte offset in it.
    /// Front ends with their own I/O engine read (and sync) it directly.
    pub fn data_file(&self) -> &File {
        &self.data
    }

    /// The index file (none when sparse). To make writes durable without
    /// [`WritableLayer::flush`], sync the data file first, then this.
    pub fn index_file(&self) -> Option<&File> {
        self.index.as_ref()
    }

    /// Read bytes of the data file.
    pub fn read_data(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        self.data.read_exact_at(buf, position)
    }

    /// Write a committed layer to `out` (see [`commit`]).
    pub fn commit(
        &self,
        out: &mut dyn Write,
        options: &CommitOptions,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let map = self.snapshot();
        let header_template = Header {
            parent_uuid: self.header.parent_uuid.clone(),
            virtual_size: self.virtual_size(),
            ..self.header.clone()
        };
        commit(
            &map,
            &|buf, position| self.read_data(buf, position),
            &self.name,
            &header_template,
            out,
            options,
            progress,
        )
    }

    /// Write a sealed copy of this layer to `out`: the data file as it is,
    /// then the sorted index (padded to 512 bytes) and a trailer. It opens
    /// as a read-only layer.
    pub fn seal(&self, out: &mut dyn Write, progress: &mut dyn FnMut(u64)) -> Result<()> {
        if self.is_sparse() {
            return Err(Error::Invalid(format!(
                "{}: a sparse layer cannot be sealed; commit it instead",
                self.name
            )));
        }
        let map = self.snapshot();
        let data_end = self.state.lock().expect("writable layer lock").data_end;
        let mut buf = vec![0u8; 1 << 20];
        let mut position = 0;
        while position < data_end {
            let n = (data_end - position).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..n];
            let available = self.data.metadata().context(|| self.name.clone())?.len();
            if position + n as u64 > available {
                // The last sector of the data file may be partial; pad with zeros.
                chunk.fill(0);
                let have = available.saturating_sub(position) as usize;
                self.read_data(&mut chunk[..have], position)
                    .context(|| self.name.clone())?;
            } else {
                self.read_data(chunk, position)
                    .context(|| self.name.clone())?;
            }
            out.write_all(chunk)
                .context(|| "sealed output".to_string())?;
            position += n as u64;
            progress(n as u64);
        }
        let mut entries = Vec::new();
        for (offset, extent) in map.iter() {
            push_split(
                &mut entries,
                offset,
                extent.length,
                extent.moffset,
                extent.zeroed,
            );
        }
        let mut index = Vec::with_capacity(entries.len() * ENTRY_SIZE);
        for e in &entries {
            index.extend_from_slice(&e.encode());
        }
        index.resize(index.len().div_ceil(SECTOR as usize) * SECTOR as usize, 0);
        out.write_all(&index)
            .context(|| "sealed output".to_string())?;
        let trailer = Header {
            flags: FLAG_DATA | FLAG_SEALED,
            index_offset: data_end,
            index_size: entries.len() as u64,
            virtual_size: self.virtual_size(),
            ..self.header.clone()
        };
        out.write_all(&trailer.encode())
            .context(|| "sealed output".to_string())
    }
}

/// Entries for one extent, split so none exceeds the on-disk length limit.
pub(crate) fn push_split(
    entries: &mut Vec<Entry>,
    offset: u64,
    length: u64,
    moffset: u64,
    zeroed: bool,
) {
    let mut done = 0;
    while done < length {
        let n = (length - done).min(MAX_ENTRY_SECTORS);
        entries.push(Entry {
            offset: offset + done,
            length: n,
            moffset: mend(moffset, done, zeroed),
            zeroed,
        });
        done += n;
    }
}

/// The allocated extents of a sparse layer file, as a map of logical sectors.
fn sparse_extents(file: &File, size: u64) -> io::Result<IntervalMap> {
    use rustix::fs::{seek, SeekFrom};
    let mut map = IntervalMap::new();
    let mut position = HEADER_SIZE;
    while position < size {
        let data = match seek(file, SeekFrom::Data(position)) {
            Ok(data) => data,
            // No data past `position`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = seek(file, SeekFrom::Hole(data))?;
        let start = data.max(HEADER_SIZE);
        let end = hole.min(size);
        // Extents round outwards to whole sectors.
        let first = (start - HEADER_SIZE) / SECTOR;
        let last = (end - HEADER_SIZE).div_ceil(SECTOR);
        if last > first {
            map.insert(
                first,
                Extent {
                    length: last - first,
                    moffset: first + HEADER_SIZE / SECTOR,
                    zeroed: false,
                    layer: 0,
                },
            );
        }
        position = hole;
    }
    Ok(map)
}

fn punch_hole(file: &File, offset: u64, length: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    Ok(fallocate(file, flags, offset, length)?)
}
