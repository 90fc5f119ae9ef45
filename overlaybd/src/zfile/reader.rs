//! Reading a ZFile: [`ZFileReader`] checks everything the file says about
//! itself when it opens, then serves decompressed bytes, verifying each
//! block's CRC; the sans-I/O half lets a front end fetch the stored bytes
//! itself and only decode here.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::sync::Mutex;

use super::*;
use crate::crc::{raw_crc32c, ZFILE_BLOCK_SEED};
use crate::error::{Error, IoContext, Result};
use crate::io::{check_bounds, ReadAt, Source};

/// The most recently decompressed partial block.
struct CachedBlock {
    index: u64,
    data: Vec<u8>,
}

/// Random-access reader over the decompressed contents of a ZFile.
pub struct ZFileReader {
    src: Source,
    info: ZFileInfo,
    /// `offsets[i]` = file offset of block i; `offsets[blocks]` = end of the
    /// last block. Built once, so locating a block is O(1).
    offsets: Vec<u64>,
    cache: Mutex<Option<CachedBlock>>,
}

fn corrupt(src: &dyn ReadAt, problem: impl Into<String>) -> Error {
    Error::corrupt(src.name(), problem)
}

fn read_ht(src: &dyn ReadAt, offset: u64) -> Result<[u8; HT_SPACE]> {
    let mut b = [0u8; HT_SPACE];
    src.read_exact_at(&mut b, offset)
        .context(|| src.name().to_string())?;
    Ok(b)
}

/// The checked trailer (or header) fields that describe the blocks.
pub(super) struct Layout {
    pub(super) algorithm: Algorithm,
    pub(super) block_size: u32,
    pub(super) verify: bool,
    pub(super) data_start: u64,
    pub(super) index_offset: u64,
    pub(super) blocks: u64,
    pub(super) original_size: u64,
}

fn check_layout(src: &dyn ReadAt, ht: &HeaderTrailer, index_limit: u64) -> Result<Layout> {
    let algorithm = Algorithm::from_code(ht.algo)
        .ok_or_else(|| corrupt(src, format!("unknown compression algorithm {}", ht.algo)))?;
    let bs = ht.block_size;
    if !bs.is_power_of_two() || !(MIN_READ_BLOCK..=MAX_READ_BLOCK).contains(&bs) {
        return Err(corrupt(
            src,
            format!("block size {bs} is not a power of two between 512 and 65536"),
        ));
    }
    if ht.use_dict != 0 {
        return Err(corrupt(
            src,
            "uses a compression dictionary, which is not supported",
        ));
    }
    if ht.index_size > MAX_BLOCKS {
        return Err(corrupt(
            src,
            format!(
                "jump table of {} blocks exceeds the limit of {MAX_BLOCKS}",
                ht.index_size
            ),
        ));
    }
    let index_bytes = ht.index_size * CRC_LEN; // ≤ 4e9, no overflow
    let data_start = HT_SPACE_U64 + u64::from(ht.dict_size);
    let index_end = ht.index_offset.checked_add(index_bytes);
    if ht.index_offset < data_start || index_end.is_none_or(|end| end > index_limit) {
        return Err(corrupt(
            src,
            format!(
                "jump table at {}+{index_bytes} lies outside the data area {data_start}..{index_limit}",
                ht.index_offset
            ),
        ));
    }
    let expected_blocks = ht.original_file_size.div_ceil(u64::from(bs));
    if expected_blocks != ht.index_size {
        return Err(corrupt(
            src,
            format!(
                "jump table has {} blocks but {} bytes in {bs}-byte blocks need {expected_blocks}",
                ht.index_size, ht.original_file_size
            ),
        ));
    }
    Ok(Layout {
        algorithm,
        block_size: bs,
        verify: ht.verify != 0,
        data_start,
        index_offset: ht.index_offset,
        blocks: ht.index_size,
        original_size: ht.original_file_size,
    })
}

/// Turn the stored block lengths into absolute offsets, applying the
/// reference's validity rules.
pub(super) fn build_offsets(src: &dyn ReadAt, table: &[u8], layout: &Layout) -> Result<Vec<u64>> {
    let min_len = if layout.verify { CRC_LEN } else { 0 };
    let group = u64::from(MAX_READ_BLOCK / layout.block_size);
    let mut offsets = Vec::with_capacity(table.len() / 4 + 1);
    let mut pos = layout.data_start;
    let mut in_group = 0u64;
    for (i, entry) in table.chunks_exact(4).enumerate() {
        let i = i as u64;
        let len = u64::from(u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]));
        if len <= min_len {
            return Err(corrupt(
                src,
                format!("jump table entry {i}: block length {len} is too small"),
            ));
        }
        if i.is_multiple_of(group) {
            in_group = 0;
        }
        if !(i + 1).is_multiple_of(group) && in_group + len >= GROUP_SUM_LIMIT {
            return Err(corrupt(
                src,
                format!(
                    "jump table entry {i}: blocks {}..={i} add up to {} bytes, over the {GROUP_SUM_LIMIT}-byte group limit",
                    i - i % group,
                    in_group + len
                ),
            ));
        }
        in_group += len;
        offsets.push(pos);
        pos += len; // ≤ 512 + 2^32 + 1e9 * 2^32: fits in u64
    }
    if pos > layout.index_offset {
        return Err(corrupt(
            src,
            format!(
                "blocks end at {pos}, past the jump table at {}",
                layout.index_offset
            ),
        ));
    }
    offsets.push(pos);
    Ok(offsets)
}

impl ZFileReader {
    /// Open and check a ZFile. Fails with [`Error::Corrupt`] naming the
    /// problem when anything in the header, trailer or jump table is off.
    ///
    /// When the header, trailer or jump table fail their checks, the file is
    /// read again from its origin (the bytes may be a bad copy in a cache),
    /// up to [`BLOCK_REREADS`] times.
    pub fn open(src: Source) -> Result<ZFileReader> {
        let mut attempt = 0;
        loop {
            match Self::open_once(src.clone()) {
                Err(Error::Corrupt { .. }) if attempt < BLOCK_REREADS => {
                    attempt += 1;
                    src.drop_cached(0, src.size());
                }
                result => return result,
            }
        }
    }

    fn open_once(src: Source) -> Result<ZFileReader> {
        let s = &*src;
        let size = s.size();
        if size < HT_SPACE_U64 {
            return Err(corrupt(s, format!("{size} bytes is too small for a ZFile")));
        }
        let header_bytes = read_ht(s, 0)?;
        let header = HeaderTrailer::parse(&header_bytes).map_err(|p| corrupt(s, p))?;
        if !header.is_header() {
            return Err(corrupt(s, "ZFile header lacks the header flag"));
        }
        if header.has_digest() {
            let computed = compute_digest(&header_bytes);
            if computed != header.digest {
                return Err(corrupt(
                    s,
                    format!(
                        "ZFile header digest mismatch: stored {:08x}, computed {computed:08x}",
                        header.digest
                    ),
                ));
            }
        }
        let (index_ht, index_limit) = if header.is_header_overwrite() {
            (header.clone(), size)
        } else {
            let trailer = Self::read_trailer(s)?;
            (trailer, size - HT_SPACE_U64)
        };
        let layout = check_layout(s, &index_ht, index_limit)?;
        let table_len = layout.blocks * CRC_LEN;
        let table_len = usize::try_from(table_len)
            .map_err(|_| corrupt(s, "jump table does not fit in memory"))?;
        let mut table = vec![0u8; table_len];
        s.read_exact_at(&mut table, layout.index_offset)
            .context(|| s.name().to_string())?;
        if index_ht.has_digest() {
            let crc = raw_crc32c(0, &table);
            if crc != index_ht.index_crc {
                return Err(corrupt(
                    s,
                    format!(
                        "jump table CRC mismatch: stored {:08x}, computed {crc:08x}",
                        index_ht.index_crc
                    ),
                ));
            }
        }
        let offsets = build_offsets(s, &table, &layout)?;
        let info = ZFileInfo {
            algorithm: layout.algorithm,
            block_size: layout.block_size,
            blocks: layout.blocks,
            original_size: layout.original_size,
            compressed_size: size,
            verify: layout.verify,
            header_flags: header.flags,
            index_in_header: header.is_header_overwrite(),
            digest_checked: header.has_digest(),
        };
        Ok(ZFileReader {
            src,
            info,
            offsets,
            cache: Mutex::new(None),
        })
    }

    fn read_trailer(s: &dyn ReadAt) -> Result<HeaderTrailer> {
        let size = s.size();
        if size < 2 * HT_SPACE_U64 {
            return Err(corrupt(
                s,
                format!("{size} bytes is too small for a ZFile header and trailer"),
            ));
        }
        let bytes = read_ht(s, size - HT_SPACE_U64)?;
        let trailer = HeaderTrailer::parse(&bytes)
            .map_err(|_| corrupt(s, "no ZFile trailer magic in the last 512 bytes"))?;
        if trailer.is_header() || !trailer.is_data_file() || !trailer.is_sealed() {
            return Err(corrupt(
                s,
                format!(
                    "ZFile trailer flags {:#x} lack trailer, data or sealed marks",
                    trailer.flags
                ),
            ));
        }
        if trailer.has_digest() {
            let computed = compute_digest(&bytes);
            if computed != trailer.digest {
                return Err(corrupt(
                    s,
                    format!(
                        "ZFile trailer digest mismatch: stored {:08x}, computed {computed:08x}",
                        trailer.digest
                    ),
                ));
            }
        }
        Ok(trailer)
    }

    pub fn info(&self) -> &ZFileInfo {
        &self.info
    }

    /// The compressed file this reader decodes.
    pub fn source(&self) -> &Source {
        &self.src
    }

    /// File offset and stored length (CRC included) of block `index`.
    pub(super) fn block_span(&self, index: u64) -> (u64, u64) {
        let i = index as usize;
        (self.offsets[i], self.offsets[i + 1] - self.offsets[i])
    }

    /// Decompressed length of block `index`.
    fn block_len(&self, index: u64) -> usize {
        let bs = u64::from(self.info.block_size);
        (self.info.original_size - index * bs).min(bs) as usize
    }

    fn invalid(&self, index: u64, problem: impl fmt::Display) -> io::Error {
        let (off, len) = self.block_span(index);
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: ZFile block {index} (stored at {off}+{len}): {problem}",
                self.src.name()
            ),
        )
    }

    /// Check the CRC of one stored block and decompress it into `out`
    /// (exactly the block's length). The stored bytes are read again from the
    /// source when the CRC or the decompression fails, up to
    /// [`BLOCK_REREADS`] times; then the read fails with `InvalidData`.
    fn decode_block(&self, index: u64, first: &[u8], out: &mut [u8]) -> io::Result<()> {
        let mut reread = Vec::new();
        let mut attempt = 0;
        loop {
            let stored = if attempt == 0 { first } else { &reread[..] };
            let problem = match self.check_and_decompress(stored, out) {
                Ok(()) => return Ok(()),
                Err(problem) => problem,
            };
            if attempt == BLOCK_REREADS {
                return Err(self.invalid(
                    index,
                    format_args!("{problem} (after {BLOCK_REREADS} re-reads)"),
                ));
            }
            attempt += 1;
            let (off, len) = self.block_span(index);
            // The bytes may have come from a cache: fetch them afresh.
            self.src.drop_cached(off, len);
            reread.resize(len as usize, 0);
            self.src.read_exact_at(&mut reread, off)?;
        }
    }

    fn check_and_decompress(
        &self,
        stored: &[u8],
        out: &mut [u8],
    ) -> std::result::Result<(), String> {
        let data = if self.info.verify {
            let split = stored.len() - CRC_LEN as usize;
            let (data, crc) = stored.split_at(split);
            let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
            let got = raw_crc32c(ZFILE_BLOCK_SEED, data);
            if got != want {
                return Err(format!(
                    "CRC mismatch: stored {want:08x}, computed {got:08x}"
                ));
            }
            data
        } else {
            stored
        };
        let n = decompress_block(self.info.algorithm, data, out)?;
        if n != out.len() {
            return Err(format!("decompressed to {n} bytes, expected {}", out.len()));
        }
        Ok(())
    }

    /// Copy `[begin, begin + dst.len())` of block `index` from the cache;
    /// false when the cache holds another block.
    fn copy_cached(&self, index: u64, begin: usize, dst: &mut [u8]) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.as_ref() {
            Some(c) if c.index == index => {
                dst.copy_from_slice(&c.data[begin..begin + dst.len()]);
                true
            }
            _ => false,
        }
    }

    /// Decode block `index` whole, copy `[begin, begin + dst.len())` of it
    /// into `dst` and keep the block in the cache for the next partial read.
    fn decode_partial(
        &self,
        index: u64,
        stored: &[u8],
        begin: usize,
        dst: &mut [u8],
    ) -> io::Result<()> {
        // The cache's buffer is reused: a partial read neither allocates
        // nor zeroes a block (64 KiB at most) once the cache holds one.
        let taken = self.cache.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut data = taken.map(|c| c.data).unwrap_or_default();
        data.resize(self.block_len(index), 0);
        self.decode_block(index, stored, &mut data)?;
        dst.copy_from_slice(&data[begin..begin + dst.len()]);
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(CachedBlock { index, data });
        Ok(())
    }

    /// Read the stored bytes of blocks `first..end` into `batch` in one
    /// request, as many blocks up to `last` as fit in [`MAX_BATCH_READ`] (at
    /// least one). Returns the file offset of `batch[0]` and `end`.
    fn read_batch(&self, first: u64, last: u64, batch: &mut Vec<u8>) -> io::Result<(u64, u64)> {
        let start = self.offsets[first as usize];
        let mut end = first + 1;
        while end <= last && self.offsets[end as usize + 1] - start <= MAX_BATCH_READ {
            end += 1;
        }
        let len = self.offsets[end as usize] - start;
        batch.resize(len as usize, 0);
        self.src.read_exact_at(batch, start)?;
        Ok((start, end))
    }

    /// Fill `buf` from decompressed offset `offset` (bounds already checked).
    /// Whole blocks are decoded straight into `buf`; a partial block goes
    /// through the one-block cache, which may spare the source read.
    fn read_range(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        STORED_BATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut batch) => self.read_range_with(buf, offset, &mut batch),
            // A reader nested in another's read on this thread (not done
            // today): a buffer of its own.
            Err(_) => self.read_range_with(buf, offset, &mut Vec::new()),
        })
    }

    fn read_range_with(&self, buf: &mut [u8], offset: u64, batch: &mut Vec<u8>) -> io::Result<()> {
        let bs = u64::from(self.info.block_size);
        let last = (offset + buf.len() as u64 - 1) / bs;
        let (mut batch_start, mut batch_end) = (0u64, 0u64);
        let mut done = 0usize;
        for b in offset / bs..=last {
            let begin = (offset + done as u64 - b * bs) as usize;
            let block_len = self.block_len(b);
            let take = (block_len - begin).min(buf.len() - done);
            let dst = &mut buf[done..done + take];
            done += take;
            let partial = take != block_len;
            if partial && self.copy_cached(b, begin, dst) {
                continue;
            }
            if b >= batch_end {
                (batch_start, batch_end) = self.read_batch(b, last, batch)?;
            }
            let (off, len) = self.block_span(b);
            let rel = (off - batch_start) as usize;
            let stored = &batch[rel..rel + len as usize];
            if partial {
                self.decode_partial(b, stored, begin, dst)?;
            } else {
                self.decode_block(b, stored, dst)?;
            }
        }
        Ok(())
    }
}

/// Sans-I/O decoding, for front ends that fetch the stored bytes with their
/// own I/O engine: [`ZFileReader::stored_span`] says which bytes of
/// [`ZFileReader::source`] a decompressed range needs, and
/// [`ZFileReader::decode_range`] checks and decodes them. Every block's CRC
/// is checked (when the file has CRCs); a bad block is an `InvalidData`
/// error, never data. There are no re-reads here: the caller owns the I/O.
impl ZFileReader {
    /// The stored bytes `(offset in source, length)` that hold decompressed
    /// `[offset, offset + len)`. `len` must be at least 1 and the range must
    /// lie inside the file.
    pub fn stored_span(&self, offset: u64, len: usize) -> io::Result<(u64, u64)> {
        check_bounds(self, len, offset)?;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty ZFile range",
            ));
        }
        let bs = u64::from(self.info.block_size);
        let first = (offset / bs) as usize;
        let last = ((offset + len as u64 - 1) / bs) as usize;
        let start = self.offsets[first];
        Ok((start, self.offsets[last + 1] - start))
    }

    /// Fill `buf` with decompressed `[offset, offset + buf.len())` from
    /// `stored`, the bytes [`ZFileReader::stored_span`] named for that range.
    pub fn decode_range(&self, stored: &[u8], offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (start, len) = self.stored_span(offset, buf.len())?;
        if stored.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: {} stored bytes given for a span of {len}",
                    self.src.name(),
                    stored.len()
                ),
            ));
        }
        let bs = u64::from(self.info.block_size);
        let last = (offset + buf.len() as u64 - 1) / bs;
        let mut done = 0usize;
        for b in offset / bs..=last {
            let begin = (offset + done as u64 - b * bs) as usize;
            let block_len = self.block_len(b);
            let take = (block_len - begin).min(buf.len() - done);
            let (off, slen) = self.block_span(b);
            let rel = (off - start) as usize;
            let block = &stored[rel..rel + slen as usize];
            let dst = &mut buf[done..done + take];
            if take == block_len {
                self.check_and_decompress(block, dst)
                    .map_err(|p| self.invalid(b, p))?;
            } else {
                PARTIAL_BLOCK.with(|cell| {
                    let mut scratch = cell.borrow_mut();
                    scratch.resize(block_len, 0);
                    self.check_and_decompress(block, &mut scratch)
                        .map_err(|p| self.invalid(b, p))?;
                    dst.copy_from_slice(&scratch[begin..begin + take]);
                    Ok::<(), io::Error>(())
                })?;
            }
            done += take;
        }
        Ok(())
    }
}

impl ReadAt for ZFileReader {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self, buf.len(), offset)?;
        self.read_range(buf, offset)
    }
    fn size(&self) -> u64 {
        self.info.original_size
    }
    fn name(&self) -> &str {
        self.src.name()
    }
}

thread_local! {
    /// The stored bytes `read_range` reads before decoding them, kept per
    /// thread so a read does not allocate them each time.
    static STORED_BATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Where `decode_range` decodes a block it needs only part of; kept per
    /// thread so a request does not allocate (and zero) a block each time.
    static PARTIAL_BLOCK: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static ZSTD_DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Decompress one LZ4 block with liblz4's `LZ4_decompress_safe`, which the
/// writer's library already links, so one LZ4 library serves both ways
/// (and `obd zfile -x` of 1 GiB of lz4/64K took 0.45-0.51 s of CPU against
/// 0.52-0.67 s with lz4_flex's safe decoder). It is the call made for
/// hostile input: it never reads or writes outside the two buffers,
/// whatever `data` holds.
fn lz4_decompress_safe(data: &[u8], out: &mut [u8]) -> std::result::Result<usize, String> {
    use std::os::raw::{c_char, c_int};
    let src_len = c_int::try_from(data.len()).map_err(|_| "lz4 block too large".to_string())?;
    let dst_len = c_int::try_from(out.len()).map_err(|_| "lz4 block too large".to_string())?;
    // SAFETY: `data` is valid for `src_len` bytes of reading and `out` for
    // `dst_len` bytes of writing; LZ4_decompress_safe touches nothing
    // beyond them and reports malformed input as a negative length.
    let n = unsafe {
        lz4_sys::LZ4_decompress_safe(
            data.as_ptr().cast::<c_char>(),
            out.as_mut_ptr().cast::<c_char>(),
            src_len,
            dst_len,
        )
    };
    usize::try_from(n).map_err(|_| format!("lz4 decompression failed (liblz4 error {n})"))
}

/// Decompress one block's compressed bytes into `out`; returns the length
/// produced (an error when it would exceed `out`).
fn decompress_block(
    algorithm: Algorithm,
    data: &[u8],
    out: &mut [u8],
) -> std::result::Result<usize, String> {
    match algorithm {
        Algorithm::Lz4 => lz4_decompress_safe(data, out),
        Algorithm::Zstd => ZSTD_DCTX.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(
                    zstd::bulk::Decompressor::new().map_err(|e| format!("zstd context: {e}"))?,
                );
            }
            let dctx = slot.as_mut().ok_or("zstd context missing")?;
            dctx.decompress_to_buffer(data, out)
                .map_err(|e| format!("zstd decompression failed: {e}"))
        }),
    }
}
