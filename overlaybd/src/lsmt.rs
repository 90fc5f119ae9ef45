//! LSMT layer files: the header/trailer block, read-only (committed and
//! sealed) layers, writable layers (append-only data + index, or sparse) and
//! `commit`, which turns a writable layer into a file the reference tools
//! accept byte for byte.
//!
//! Everything read from a file is checked before use: sizes, counts and
//! offsets come from untrusted bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use crate::error::{Error, IoContext, Result};
use crate::index::{
    Entry, Extent, IntervalMap, Piece, ENTRY_SIZE, MAX_ENTRY_SECTORS, PADDING_OFFSET, SECTOR,
};
use crate::io::{ReadAt, Source};

/// Size of the header and trailer blocks.
pub const HEADER_SIZE: u64 = 4096;
/// Size of the meaningful struct at the start of the block.
pub const HEADER_STRUCT_SIZE: u32 = 390;
pub const MAGIC0: [u8; 8] = *b"LSMT\0\x01\x02\0";
pub const MAGIC1: [u8; 16] = [
    0x65, 0x7E, 0x63, 0xD2, 0x94, 0x44, 0x08, 0x4C, 0xA2, 0xD2, 0xC8, 0xEC, 0x4F, 0xCF, 0xAE, 0x8A,
];
pub const FLAG_HEADER: u32 = 1;
pub const FLAG_DATA: u32 = 2;
pub const FLAG_SEALED: u32 = 4;
pub const FLAG_SPARSE: u32 = 0x10;
/// The "no uuid" value.
pub const NIL_UUID: &str = "00000000-0000-0000-0000-000000000000";
/// A committed layer's index may hold at most this many entries.
pub const MAX_COMMITTED_ENTRIES: u64 = 1_000_000;
/// A writable layer's index file may hold at most this many entries.
pub const MAX_WRITABLE_ENTRIES: u64 = 128_000_000;
/// Writes are recorded in entries of at most this many sectors (4 MiB, the
/// reference's largest write); discards in entries of at most
/// [`MAX_ENTRY_SECTORS`].
pub const MAX_WRITE_SECTORS: u64 = 8192;
/// `commit` copies data in pieces of this many bytes, one entry each.
const COMMIT_PIECE: u64 = 32 * 1024;
/// Committed indexes are padded to a multiple of this many entries.
const INDEX_PADDING_GROUP: u64 = 256;
const UUID_LEN: usize = 37;
const USER_TAG_LEN: usize = 256;

/// The 390-byte header/trailer struct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub flags: u32,
    pub index_offset: u64,
    pub index_size: u64,
    pub virtual_size: u64,
    pub uuid: String,
    pub parent_uuid: String,
    pub version: u8,
    pub sub_version: u8,
    pub user_tag: String,
}

impl Header {
    pub fn new(flags: u32, virtual_size: u64, uuid: &str, parent_uuid: &str) -> Header {
        Header {
            flags,
            index_offset: 0,
            index_size: 0,
            virtual_size,
            uuid: uuid.to_string(),
            parent_uuid: parent_uuid.to_string(),
            version: 1,
            sub_version: 1,
            user_tag: String::new(),
        }
    }

    /// Parse the struct at the start of `block`. Only the magic numbers are
    /// required; flags are tested one bit at a time by the callers because
    /// old files carry garbage in unused bits.
    pub fn parse(block: &[u8], context: &str) -> Result<Header> {
        if block.len() < HEADER_STRUCT_SIZE as usize {
            return Err(Error::corrupt(context, "LSMT header is truncated"));
        }
        if block[0..8] != MAGIC0 || block[8..24] != MAGIC1 {
            return Err(Error::corrupt(context, "not an LSMT layer (bad magic)"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(block[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().expect("8"));
        Ok(Header {
            flags: u32_at(28),
            index_offset: u64_at(32),
            index_size: u64_at(40),
            virtual_size: u64_at(48),
            uuid: c_string(&block[56..56 + UUID_LEN]),
            parent_uuid: c_string(&block[93..93 + UUID_LEN]),
            version: block[132],
            sub_version: block[133],
            user_tag: c_string(&block[134..134 + USER_TAG_LEN]),
        })
    }

    /// The 4096-byte block: the struct, then zeros.
    pub fn encode(&self) -> Vec<u8> {
        let mut block = vec![0u8; HEADER_SIZE as usize];
        block[0..8].copy_from_slice(&MAGIC0);
        block[8..24].copy_from_slice(&MAGIC1);
        block[24..28].copy_from_slice(&HEADER_STRUCT_SIZE.to_le_bytes());
        block[28..32].copy_from_slice(&self.flags.to_le_bytes());
        block[32..40].copy_from_slice(&self.index_offset.to_le_bytes());
        block[40..48].copy_from_slice(&self.index_size.to_le_bytes());
        block[48..56].copy_from_slice(&self.virtual_size.to_le_bytes());
        put_c_string(&mut block[56..56 + UUID_LEN], &self.uuid);
        put_c_string(&mut block[93..93 + UUID_LEN], &self.parent_uuid);
        block[132] = self.version;
        block[133] = self.sub_version;
        put_c_string(&mut block[134..134 + USER_TAG_LEN], &self.user_tag);
        block
    }

    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Copy `text` into `field`, always leaving a terminating NUL.
fn put_c_string(field: &mut [u8], text: &str) {
    let n = text.len().min(field.len() - 1);
    field[..n].copy_from_slice(&text.as_bytes()[..n]);
}

/// Check a UUID (36 hex digits with dashes at 8-4-4-4-12) and upper-case it.
pub fn normalize_uuid(text: &str) -> Result<String> {
    let ok = text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if !ok {
        return Err(Error::Invalid(format!(
            "'{text}' is not a UUID (expected 8-4-4-4-12 hex digits)"
        )));
    }
    Ok(text.to_ascii_uppercase())
}

/// A fresh random (version 4) UUID, upper-case.
pub fn random_uuid() -> String {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut bytes))
        .expect("/dev/urandom is readable");
    bytes[6] = (bytes[6] & 0x0F) | 0x40;
    bytes[8] = (bytes[8] & 0x3F) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn read_header_at(source: &dyn ReadAt, offset: u64) -> Result<Header> {
    let mut block = vec![0u8; HEADER_STRUCT_SIZE as usize];
    source
        .read_exact_at(&mut block, offset)
        .context(|| source.name().to_string())?;
    Header::parse(&block, source.name())
}

/// A read-only layer: a committed layer (`commit` output) or a sealed one.
/// Its bytes come from any [`Source`]: a file, a ZFile, a tar payload.
pub struct ReadOnlyLayer {
    pub header: Header,
    pub trailer: Header,
    /// Index entries with padding removed, sorted and non-overlapping.
    pub entries: Vec<Entry>,
    source: Source,
}

impl ReadOnlyLayer {
    pub fn open(source: Source) -> Result<ReadOnlyLayer> {
        let name = source.name().to_string();
        let size = source.size();
        if size < 2 * HEADER_SIZE {
            return Err(Error::corrupt(
                &name,
                format!("{size} bytes is too small for an LSMT layer"),
            ));
        }
        let header = read_header_at(source.as_ref(), 0)?;
        if !header.has(FLAG_HEADER) || !header.has(FLAG_DATA) {
            return Err(Error::corrupt(
                &name,
                "first block is not an LSMT data-file header",
            ));
        }
        let trailer_offset = size - HEADER_SIZE;
        let trailer = read_header_at(source.as_ref(), trailer_offset).map_err(|_| {
            Error::corrupt(
                &name,
                "no LSMT trailer at the end: not a committed or sealed layer (a writable data file needs its index file)",
            )
        })?;
        if trailer.has(FLAG_HEADER) || !trailer.has(FLAG_DATA) || !trailer.has(FLAG_SEALED) {
            return Err(Error::corrupt(
                &name,
                "the last block is not a sealed data-file trailer",
            ));
        }
        let entries = read_index(source.as_ref(), &trailer, trailer_offset)?;
        Ok(ReadOnlyLayer {
            header,
            trailer,
            entries,
            source,
        })
    }

    pub fn virtual_size(&self) -> u64 {
        self.trailer.virtual_size
    }

    /// The bytes of the layer file (after tar unwrapping and decompression).
    pub fn source(&self) -> &Source {
        &self.source
    }
}

fn read_index(source: &dyn ReadAt, trailer: &Header, trailer_offset: u64) -> Result<Vec<Entry>> {
    let name = source.name();
    let count = trailer.index_size;
    if count > MAX_COMMITTED_ENTRIES {
        return Err(Error::corrupt(
            name,
            format!("index_size {count} exceeds the limit of {MAX_COMMITTED_ENTRIES} entries"),
        ));
    }
    let index_bytes = count * ENTRY_SIZE as u64;
    let data_end = trailer.index_offset;
    if !data_end.is_multiple_of(SECTOR) {
        return Err(Error::corrupt(
            name,
            format!("index_offset {data_end} is not a multiple of 512 bytes"),
        ));
    }
    if data_end < HEADER_SIZE
        || data_end
            .checked_add(index_bytes)
            .is_none_or(|end| end > trailer_offset)
    {
        return Err(Error::corrupt(
            name,
            format!(
                "index ({count} entries at offset {data_end}) does not fit between the header and the trailer at {trailer_offset}"
            ),
        ));
    }
    let mut raw = vec![0u8; index_bytes as usize];
    source
        .read_exact_at(&mut raw, data_end)
        .context(|| name.to_string())?;
    let data_end_sector = data_end / SECTOR;
    let mut entries = Vec::with_capacity(count as usize);
    let mut previous_end = 0u64;
    for (i, chunk) in raw.chunks_exact(ENTRY_SIZE).enumerate() {
        let entry = Entry::decode(chunk.try_into().expect("16 bytes"));
        if entry.is_padding() || entry.length == 0 {
            continue;
        }
        if entry.offset < previous_end {
            return Err(Error::corrupt(
                name,
                format!(
                    "index entry {i} (sector {}) is out of order or overlaps the previous one",
                    entry.offset
                ),
            ));
        }
        if !entry.zeroed
            && (entry.moffset < HEADER_SIZE / SECTOR
                || entry.moffset + entry.length > data_end_sector)
        {
            return Err(Error::corrupt(
                name,
                format!(
                    "index entry {i} points at sectors {}..{}, outside the data area 8..{data_end_sector}",
                    entry.moffset,
                    entry.moffset + entry.length
                ),
            ));
        }
        previous_end = entry.end();
        entries.push(entry);
    }
    Ok(entries)
}

/// Options for creating a writable layer.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub virtual_size: u64,
    pub parent_uuid: Option<String>,
    pub sparse: bool,
}

/// Options for `commit`.
#[derive(Clone, Debug, Default)]
pub struct CommitOptions {
    /// UUID of the new layer; all zeros when absent.
    pub uuid: Option<String>,
    /// Parent UUID; the source header's when absent.
    pub parent_uuid: Option<String>,
    /// Commit message, stored as `user_tag` (at most 255 bytes).
    pub message: String,
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
    pub header: Header,
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
        if options.virtual_size == 0 || !options.virtual_size.is_multiple_of(SECTOR) {
            return Err(Error::Invalid(format!(
                "virtual size {} is not a positive multiple of 512 bytes",
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
        // A torn last entry (crash during append) is ignored; appends continue after the last whole one.
        let count = ((index_size - HEADER_SIZE) / ENTRY_SIZE as u64).min(MAX_WRITABLE_ENTRIES);
        let data_end = data_size.div_ceil(SECTOR) * SECTOR;
        let data_end_sector = data_end / SECTOR;
        let mut map = IntervalMap::new();
        let mut raw = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < count {
            let n = (count - done).min((raw.len() / ENTRY_SIZE) as u64);
            let bytes = &mut raw[..n as usize * ENTRY_SIZE];
            index
                .read_exact_at(bytes, HEADER_SIZE + done * ENTRY_SIZE as u64)
                .context(|| index_name.clone())?;
            for (i, chunk) in bytes.chunks_exact(ENTRY_SIZE).enumerate() {
                let entry = Entry::decode(chunk.try_into().expect("16 bytes"));
                if entry.is_padding() || entry.length == 0 {
                    continue;
                }
                if entry.end() > PADDING_OFFSET {
                    return Err(Error::corrupt(
                        &index_name,
                        format!(
                            "entry {} covers sectors {}..{}, past the last sector an index entry can address",
                            done + i as u64,
                            entry.offset,
                            entry.end()
                        ),
                    ));
                }
                if !entry.zeroed && entry.moffset < HEADER_SIZE / SECTOR {
                    return Err(Error::corrupt(
                        &index_name,
                        format!(
                            "entry {} points at sectors {}..{}, inside the data file's header",
                            done + i as u64,
                            entry.moffset,
                            entry.moffset + entry.length
                        ),
                    ));
                }
                if !entry.zeroed && entry.moffset + entry.length > data_end_sector {
                    return Err(Error::corrupt(
                        &index_name,
                        format!(
                            "entry {} points at sectors {}..{}, past the end of the data file ({data_end_sector} sectors)",
                            done + i as u64,
                            entry.moffset,
                            entry.moffset + entry.length
                        ),
                    ));
                }
                map.insert(entry.offset, entry.extent(0));
            }
            done += n;
        }
        Ok(WritableLayer::assemble(
            header,
            data,
            Some(index),
            name,
            map,
            data_end,
            HEADER_SIZE + count * ENTRY_SIZE as u64,
        ))
    }

    pub fn is_sparse(&self) -> bool {
        self.index.is_none()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn virtual_size(&self) -> u64 {
        self.header.virtual_size
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        if !offset.is_multiple_of(SECTOR) || !length.is_multiple_of(SECTOR) {
            return Err(Error::Invalid(format!(
                "{}: I/O at {offset}+{length} is not 512-byte aligned",
                self.name
            )));
        }
        if offset
            .checked_add(length)
            .is_none_or(|end| end > self.header.virtual_size)
        {
            return Err(Error::Invalid(format!(
                "{}: I/O at {offset}+{length} passes the virtual size {}",
                self.name, self.header.virtual_size
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
    /// out, so after reopening the range reads through to lower layers.
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
            ..self.header.clone()
        };
        out.write_all(&trailer.encode())
            .context(|| "sealed output".to_string())
    }
}

/// Entries for one extent, split so none exceeds the on-disk length limit.
fn push_split(entries: &mut Vec<Entry>, offset: u64, length: u64, moffset: u64, zeroed: bool) {
    let mut done = 0;
    while done < length {
        let n = (length - done).min(MAX_ENTRY_SECTORS);
        entries.push(Entry {
            offset: offset + done,
            length: n,
            moffset: moffset + done,
            zeroed,
        });
        done += n;
    }
}

/// Append `entry` to `entries`, merging it into the last one when both the
/// logical and the stored ranges continue it, the kinds match and the
/// combined length stays strictly below the on-disk limit.
fn push_merged(entries: &mut Vec<Entry>, entry: Entry) {
    if let Some(last) = entries.last_mut() {
        if last.end() == entry.offset
            && last.moffset + last.length == entry.moffset
            && last.zeroed == entry.zeroed
            && last.length + entry.length < MAX_ENTRY_SECTORS
        {
            last.length += entry.length;
            return;
        }
    }
    entries.push(entry);
}

/// Write a committed (read-only) layer holding the extents of `map`, whose
/// data is read with `read(buf, byte position)`, in the reference's exact
/// layout: header, data copied in 32 KiB pieces in index order, the merged
/// index padded to a multiple of 256 entries, trailer.
pub fn commit(
    map: &IntervalMap,
    read: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
    source_name: &str,
    source_header: &Header,
    out: &mut dyn Write,
    options: &CommitOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let uuid = match &options.uuid {
        Some(u) => normalize_uuid(u)?,
        None => NIL_UUID.to_string(),
    };
    let parent_uuid = match &options.parent_uuid {
        Some(p) => normalize_uuid(p)?,
        None if source_header.parent_uuid.is_empty() => NIL_UUID.to_string(),
        None => source_header.parent_uuid.clone(),
    };
    if options.message.len() >= USER_TAG_LEN {
        return Err(Error::Invalid(format!(
            "commit message is {} bytes; at most {} fit",
            options.message.len(),
            USER_TAG_LEN - 1
        )));
    }
    let mut header = Header::new(
        FLAG_HEADER | FLAG_DATA | FLAG_SEALED,
        source_header.virtual_size,
        &uuid,
        &parent_uuid,
    );
    header.user_tag = options.message.clone();
    let out_name = "commit output";
    out.write_all(&header.encode())
        .context(|| out_name.to_string())?;

    let mut position = HEADER_SIZE / SECTOR;
    let mut entries: Vec<Entry> = Vec::new();
    let mut buf = vec![0u8; COMMIT_PIECE as usize];
    let piece_sectors = COMMIT_PIECE / SECTOR;
    for (offset, extent) in map.iter() {
        if extent.zeroed {
            push_merged(
                &mut entries,
                Entry {
                    offset,
                    length: extent.length,
                    moffset: position,
                    zeroed: true,
                },
            );
            continue;
        }
        let mut done = 0;
        while done < extent.length {
            let n = (extent.length - done).min(piece_sectors);
            let chunk = &mut buf[..(n * SECTOR) as usize];
            read(chunk, (extent.moffset + done) * SECTOR).context(|| source_name.to_string())?;
            out.write_all(chunk).context(|| out_name.to_string())?;
            push_merged(
                &mut entries,
                Entry {
                    offset: offset + done,
                    length: n,
                    moffset: position,
                    zeroed: false,
                },
            );
            position += n;
            done += n;
            progress(n * SECTOR);
        }
    }
    let index_offset = position * SECTOR;
    let padded = (entries.len() as u64).div_ceil(INDEX_PADDING_GROUP) * INDEX_PADDING_GROUP;
    let mut index = Vec::with_capacity(padded as usize * ENTRY_SIZE);
    for e in &entries {
        index.extend_from_slice(&e.encode());
    }
    while index.len() < padded as usize * ENTRY_SIZE {
        index.extend_from_slice(&Entry::PADDING.encode());
    }
    out.write_all(&index).context(|| out_name.to_string())?;
    let trailer = Header {
        flags: FLAG_DATA | FLAG_SEALED,
        index_offset,
        index_size: padded,
        ..header
    };
    out.write_all(&trailer.encode())
        .context(|| out_name.to_string())?;
    out.flush().context(|| out_name.to_string())
}

/// The allocated extents of a sparse layer file, as a map of logical sectors.
fn sparse_extents(file: &File, size: u64) -> io::Result<IntervalMap> {
    let fd = file.as_raw_fd();
    let mut map = IntervalMap::new();
    let mut position = HEADER_SIZE as i64;
    let size = size as i64;
    while position < size {
        // SAFETY: lseek on a valid, owned file descriptor.
        let data = unsafe { libc::lseek(fd, position, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let start = (data as u64).max(HEADER_SIZE);
        let end = (hole as u64).min(size as u64);
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
    // SAFETY: fallocate on a valid, owned file descriptor.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            length as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Read through a [`ReadOnlyLayer`]'s own index (no stack): helper for tools.
pub fn entries_to_map(entries: &[Entry], layer: u8) -> IntervalMap {
    let mut map = IntervalMap::new();
    for e in entries {
        map.insert(e.offset, e.extent(layer));
    }
    map
}
