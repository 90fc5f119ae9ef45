//! `commit`: the extents of a writable layer written as a read-only layer,
//! byte for byte as the reference `overlaybd-commit` writes it.

use std::io::{self, Write};

use super::*;
use crate::error::{Error, IoContext, Result};
use crate::index::{Entry, IntervalMap, ENTRY_SIZE, MAX_ENTRY_SECTORS, SECTOR};

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

/// Append `entry` to `entries`, merging it into the last one when both the
/// logical and the stored ranges continue it, the kinds match and the
/// combined length stays strictly below the on-disk limit. Zeroed entries
/// store nothing, so adjacent ones at the same `moffset` merge.
fn push_merged(entries: &mut Vec<Entry>, entry: Entry) {
    if let Some(last) = entries.last_mut() {
        if last.end() == entry.offset
            && last.mend() == entry.moffset
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
