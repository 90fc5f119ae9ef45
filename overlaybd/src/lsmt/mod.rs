//! LSMT layer files: the header/trailer block, read-only (committed and
//! sealed) layers, writable layers (append-only data + index, or sparse) and
//! `commit`, which turns a writable layer into a file the reference tools
//! accept byte for byte.
//!
//! Everything read from a file is checked before use: sizes, counts and
//! offsets come from untrusted bytes.

use crate::error::{Error, IoContext, Result};
use crate::index::{Entry, IntervalMap, PADDING_OFFSET};
use crate::io::ReadAt;

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
    uuid::Uuid::new_v4()
        .hyphenated()
        .encode_upper(&mut uuid::Uuid::encode_buffer())
        .to_owned()
}

fn read_header_at(source: &dyn ReadAt, offset: u64) -> Result<Header> {
    let mut block = vec![0u8; HEADER_STRUCT_SIZE as usize];
    source
        .read_exact_at(&mut block, offset)
        .context(|| source.name().to_string())?;
    Header::parse(&block, source.name())
}

mod commit;
mod read_only;
mod writable;

pub use commit::{commit, CommitOptions};
pub use read_only::ReadOnlyLayer;
pub use writable::{CreateOptions, WritableLayer};

/// Read through a [`ReadOnlyLayer`]'s own index (no stack): helper for tools.
pub fn entries_to_map(entries: &[Entry], layer: u8) -> IntervalMap {
    let mut map = IntervalMap::new();
    for e in entries {
        map.insert(e.offset, e.extent(layer));
    }
    map
}
