//! The trace file named by `recordTracePath`: which lower-layer ranges a
//! container read while starting, recorded once and replayed as prefetch on
//! later starts.
//!
//! The file's content picks the mode ([`TraceFile::detect`]): empty → record;
//! the binary format below → replay those records; anything else → a text
//! list of absolute paths whose files are prefetched.
//!
//! Binary layout (the reference's C++ structs, little-endian, x86-64
//! alignment): a 24-byte header `u32 magic, 4 pad, u64 data_size, u32
//! checksum, 4 pad`, then `data_size / 24` records of `u8 op, 3 pad, u32
//! layer_index, u64 count, i64 offset`. The checksum is the raw CRC32C,
//! chained from 0, of every record's 24 stored bytes, padding included.
//! We write zero padding and ignore whatever padding we read (only the
//! checksum covers it).
//!
//! Everything here is a pure function over bytes: recording, the
//! `.lock`/`.ok` handshake and replay are the daemon's business.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::crc::raw_crc32c;
use crate::error::{Error, Result};

pub const MAGIC: u32 = 0xC2EF_1820;
pub const HEADER_SIZE: usize = 24;
pub const RECORD_SIZE: usize = 24;
/// Largest text list the reference accepts.
pub const MAX_TEXT_LIST_SIZE: usize = 64 * 1024;

/// What a recorded access did. Only reads are recorded in practice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
}

impl Op {
    /// The byte stored in a record: `R` or `W`.
    pub fn to_byte(self) -> u8 {
        match self {
            Op::Read => b'R',
            Op::Write => b'W',
        }
    }

    pub fn from_byte(byte: u8) -> Option<Op> {
        match byte {
            b'R' => Some(Op::Read),
            b'W' => Some(Op::Write),
            _ => None,
        }
    }
}

/// One access: `count` bytes at `offset` of lower layer `layer_index`
/// (0 = bottom). The offset is in the decompressed, tar-unwrapped layer file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRecord {
    pub op: Op,
    pub layer_index: u32,
    pub count: u64,
    pub offset: i64,
}

/// Serialize records into the binary trace format.
pub fn encode(records: &[TraceRecord]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_SIZE];
    out.reserve(records.len() * RECORD_SIZE);
    for record in records {
        out.push(record.op.to_byte());
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&record.layer_index.to_le_bytes());
        out.extend_from_slice(&record.count.to_le_bytes());
        out.extend_from_slice(&record.offset.to_le_bytes());
    }
    // Chaining the CRC record by record equals one pass over them all.
    let checksum = raw_crc32c(0, &out[HEADER_SIZE..]);
    let data_size = (records.len() * RECORD_SIZE) as u64;
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&data_size.to_le_bytes());
    out[16..20].copy_from_slice(&checksum.to_le_bytes());
    out
}

/// Parse and check a binary trace; `context` names it in errors.
///
/// Checked: magic, `data_size` a multiple of 24 and equal to the bytes after
/// the header, checksum, each op byte, and that each record is a valid file
/// range (offset ≥ 0, offset + count ≤ `i64::MAX`). A zero count is allowed
/// (it reads nothing). Layer indexes are not bounded here: replay skips
/// records for layers the image does not have.
pub fn decode(bytes: &[u8], context: &str) -> Result<Vec<TraceRecord>> {
    let corrupt = |problem: String| Error::corrupt(context, format!("bad trace file: {problem}"));
    let Some(header) = bytes.first_chunk::<HEADER_SIZE>() else {
        return Err(corrupt(format!(
            "{} bytes is shorter than the {HEADER_SIZE}-byte header",
            bytes.len()
        )));
    };
    let magic = u32::from_le_bytes(field(header, 0));
    if magic != MAGIC {
        return Err(corrupt(format!(
            "magic is {magic:#010X}, expected {MAGIC:#010X}"
        )));
    }
    let data_size = u64::from_le_bytes(field(header, 8));
    if !data_size.is_multiple_of(RECORD_SIZE as u64) {
        return Err(corrupt(format!(
            "data_size {data_size} is not a multiple of the {RECORD_SIZE}-byte record"
        )));
    }
    let body = &bytes[HEADER_SIZE..];
    let present = body.len() as u64;
    if present < data_size {
        return Err(corrupt(format!(
            "truncated: the header announces {data_size} bytes of records, the file has {present}"
        )));
    }
    if present > data_size {
        return Err(corrupt(format!(
            "{} unexpected bytes after the {data_size} bytes of records",
            present - data_size
        )));
    }
    let stored = u32::from_le_bytes(field(header, 16));
    let computed = raw_crc32c(0, body);
    if stored != computed {
        return Err(corrupt(format!(
            "checksum mismatch: header has {stored:#010X}, records give {computed:#010X}"
        )));
    }
    let (records, _) = body.as_chunks::<RECORD_SIZE>();
    records
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let op = Op::from_byte(raw[0]).ok_or_else(|| {
                corrupt(format!(
                    "record {i}: op byte {:#04X} is neither 'R' nor 'W'",
                    raw[0]
                ))
            })?;
            let record = TraceRecord {
                op,
                layer_index: u32::from_le_bytes(field(raw, 4)),
                count: u64::from_le_bytes(field(raw, 8)),
                offset: i64::from_le_bytes(field(raw, 16)),
            };
            let fits = u64::try_from(record.offset)
                .is_ok_and(|offset| record.count <= i64::MAX as u64 - offset);
            if !fits {
                return Err(corrupt(format!(
                    "record {i}: {} bytes at offset {} is not a valid file range",
                    record.count, record.offset
                )));
            }
            Ok(record)
        })
        .collect()
}

/// `N` bytes at `at` of a header or record.
fn field<const N: usize>(raw: &[u8; 24], at: usize) -> [u8; N] {
    std::array::from_fn(|i| raw[at + i])
}

/// What a trace file asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceFile {
    /// Empty file: record this run's reads into it.
    Empty,
    /// Binary trace: replay these records.
    Binary(Vec<TraceRecord>),
    /// Text list: prefetch these files and directories.
    TextList(Vec<PrefetchPath>),
}

/// One line of a text list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchPath {
    /// Absolute, without the trailing `/` or `*` (except the root, `/`).
    pub path: PathBuf,
    /// The line ended in `/` or `*`: everything under `path`.
    pub whole_dir: bool,
}

impl TraceFile {
    /// Decide the mode from the file's content and parse it; `context` names
    /// the file in errors.
    ///
    /// A text list is at most 64 KiB of absolute paths, one per line; a
    /// trailing `\r` is dropped and blank lines are skipped. A relative path,
    /// a NUL byte, or a list with no paths is an error.
    pub fn detect(bytes: &[u8], context: &str) -> Result<TraceFile> {
        if bytes.is_empty() {
            return Ok(TraceFile::Empty);
        }
        if bytes.starts_with(&MAGIC.to_le_bytes()) {
            return decode(bytes, context).map(TraceFile::Binary);
        }
        parse_text_list(bytes, context).map(TraceFile::TextList)
    }
}

fn parse_text_list(bytes: &[u8], context: &str) -> Result<Vec<PrefetchPath>> {
    let corrupt = |problem: String| Error::corrupt(context, format!("bad trace list: {problem}"));
    if bytes.len() > MAX_TEXT_LIST_SIZE {
        return Err(corrupt(format!(
            "{} bytes is more than the {} KiB a path list may hold \
             (and it does not start with the binary trace magic)",
            bytes.len(),
            MAX_TEXT_LIST_SIZE / 1024
        )));
    }
    let mut paths = Vec::new();
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let shown = String::from_utf8_lossy(line);
        if line.contains(&0) {
            return Err(corrupt(format!(
                "line {}: {shown:?} contains a NUL byte",
                n + 1
            )));
        }
        if line[0] != b'/' {
            return Err(corrupt(format!(
                "line {}: {shown:?} is not an absolute path",
                n + 1
            )));
        }
        let (mut body, whole_dir) = match line {
            [rest @ .., b'/' | b'*'] => (rest, true),
            _ => (line, false),
        };
        while let [rest @ .., b'/'] = body {
            body = rest;
        }
        let path = if body.is_empty() {
            PathBuf::from("/")
        } else {
            PathBuf::from(OsStr::from_bytes(body))
        };
        paths.push(PrefetchPath { path, whole_dir });
    }
    if paths.is_empty() {
        return Err(corrupt("it holds no paths".to_string()));
    }
    Ok(paths)
}

/// `<trace>.lock`: exists while recording; deleting it stops the recording.
pub fn lock_path(trace: &Path) -> PathBuf {
    with_suffix(trace, ".lock")
}

/// `<trace>.ok`: created once the records are written.
pub fn ok_path(trace: &Path) -> PathBuf {
    with_suffix(trace, ".ok")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}
