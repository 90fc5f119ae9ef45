//! Read-only layers: a committed layer (`commit` output) or a sealed one,
//! whose whole index is checked when it opens.

use super::{
    read_header_at, Header, FLAG_DATA, FLAG_HEADER, FLAG_SEALED, HEADER_SIZE, MAX_COMMITTED_ENTRIES,
};
use crate::error::{Error, IoContext, Result};
use crate::index::{Entry, ENTRY_SIZE, SECTOR};
use crate::io::{ReadAt, Source};
use crate::storage::LayerData;
use std::sync::Arc;

/// A read-only layer: a committed layer (`commit` output) or a sealed one.
/// Its bytes are [`LayerData`]: a file, a ZFile, a tar payload, a registry
/// blob.
#[derive(Clone)]
pub struct ReadOnlyLayer {
    pub header: Header,
    pub trailer: Header,
    /// Index entries with padding removed, sorted and non-overlapping.
    pub entries: Vec<Entry>,
    data: LayerData,
    source: Source,
}

impl ReadOnlyLayer {
    pub fn open(data: impl Into<LayerData>) -> Result<ReadOnlyLayer> {
        let data = data.into();
        let source = data.source();
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
            data,
            source,
        })
    }

    /// A writable layer that is written no more, read as a lower: its index
    /// as it stands now, its data file as the bytes (both kinds place data
    /// at the same file positions as a committed layer's index names).
    /// Nothing may write to `layer` afterwards: a live snapshot stops
    /// writing to it before it is frozen.
    pub fn frozen(layer: &super::WritableLayer) -> Result<ReadOnlyLayer> {
        let name = layer.name().to_string();
        let mut entries = Vec::new();
        for (offset, extent) in layer.snapshot().iter() {
            super::writable::push_split(
                &mut entries,
                offset,
                extent.length,
                extent.moffset,
                extent.zeroed,
            );
        }
        let file = layer.data_file().try_clone().context(|| name.clone())?;
        let local = crate::io::LocalFile::from_file(file, name.clone())?;
        let stored =
            crate::storage::Stored::whole(crate::storage::Container::Local(Arc::new(local)));
        let data = LayerData::plain(stored).context(|| name.clone())?;
        let source = data.source();
        Ok(ReadOnlyLayer {
            header: layer.header.clone(),
            trailer: layer.header.clone(),
            entries,
            data,
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

    /// Where the layer file's bytes are stored, and how.
    pub fn data(&self) -> &LayerData {
        &self.data
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
