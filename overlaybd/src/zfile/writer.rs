//! Writing and checking whole ZFiles: [`compress`] writes what the
//! reference `overlaybd-zfile` / `overlaybd-commit -z` write, [`decompress`]
//! and [`verify`] read one back whole.

use std::io::{self, Seek, SeekFrom, Write};

use super::*;
use crate::crc::{raw_crc32c, ZFILE_BLOCK_SEED};
use crate::error::{Error, IoContext, Result};
use crate::io::{ReadAt, Source};

/// Which reference tool's output [`compress`] reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `overlaybd-zfile`: header flags 0x13, index fields only in the trailer.
    ToolOutput,
    /// `overlaybd-commit -z`: the header is rewritten at the end with flags
    /// 0x1B and the trailer's index fields.
    CommitOutput,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZFileOptions {
    pub algorithm: Algorithm,
    /// 4, 8, 16, 32 or 64 KiB.
    pub block_size: u32,
    pub flavor: Flavor,
}

impl Default for ZFileOptions {
    /// lz4, 4 KiB blocks, as `overlaybd-zfile` writes by default.
    fn default() -> Self {
        ZFileOptions {
            algorithm: Algorithm::Lz4,
            block_size: 4096,
            flavor: Flavor::ToolOutput,
        }
    }
}

/// Compresses blocks with the reference's settings.
struct BlockCompressor {
    algorithm: Algorithm,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
}

impl BlockCompressor {
    fn new(algorithm: Algorithm) -> io::Result<Self> {
        let zstd = match algorithm {
            Algorithm::Lz4 => None,
            Algorithm::Zstd => Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
        };
        Ok(BlockCompressor {
            algorithm,
            zstd,
            scratch: Vec::new(),
        })
    }

    /// Compress `block`, append it and its CRC to `out`, return the stored length.
    fn compress_into(&mut self, block: &[u8], out: &mut Vec<u8>) -> io::Result<u32> {
        let n = match (self.algorithm, self.zstd.as_mut()) {
            (Algorithm::Zstd, Some(z)) => {
                self.scratch
                    .resize(zstd::zstd_safe::compress_bound(block.len()), 0);
                z.compress_to_buffer(block, &mut self.scratch[..])?
            }
            _ => lz4_compress_default(block, &mut self.scratch)?,
        };
        let data = &self.scratch[..n];
        out.extend_from_slice(data);
        out.extend_from_slice(&raw_crc32c(ZFILE_BLOCK_SEED, data).to_le_bytes());
        u32::try_from(n + CRC_LEN as usize)
            .map_err(|_| io::Error::other("compressed block larger than 4 GiB"))
    }
}

/// Compress `src` into `scratch` with liblz4's `LZ4_compress_default`, the
/// call the reference makes, so that the output is byte-identical (lz4_flex
/// finds different matches). Returns the compressed length.
fn lz4_compress_default(src: &[u8], scratch: &mut Vec<u8>) -> io::Result<usize> {
    use std::os::raw::{c_char, c_int};
    let src_len =
        c_int::try_from(src.len()).map_err(|_| io::Error::other("lz4 input block too large"))?;
    // SAFETY: LZ4_compressBound is a pure function of its argument.
    let bound = unsafe { lz4_sys::LZ4_compressBound(src_len) };
    let bound_len = usize::try_from(bound)
        .ok()
        .filter(|&b| b > 0)
        .ok_or_else(|| io::Error::other("lz4 input block too large"))?;
    scratch.resize(bound_len, 0);
    // SAFETY: `src` is valid for `src_len` bytes of reading and `scratch`
    // for `bound` bytes of writing; liblz4 touches nothing beyond them.
    let n = unsafe {
        lz4_sys::LZ4_compress_default(
            src.as_ptr().cast::<c_char>(),
            scratch.as_mut_ptr().cast::<c_char>(),
            src_len,
            bound,
        )
    };
    usize::try_from(n)
        .ok()
        .filter(|&n| n > 0 && n <= bound_len)
        .ok_or_else(|| io::Error::other(format!("lz4 compression failed ({n})")))
}

/// Input bytes read (and compressed) per round.
pub(super) const COMPRESS_CHUNK: usize = 1 << 20;

/// The largest stored block (compressed bytes and CRC) the reference
/// overlaybd reads: its block reader has a 64 KiB buffer and refuses a
/// block that does not fit (EIO). A 64 KiB block of data that does not
/// compress is stored in more than that, by its own writer too.
pub const REFERENCE_MAX_STORED_BLOCK: u32 = 64 << 10;

/// Compress all of `input` into `out` as a ZFile (verify = 1, per-block
/// CRC). `out` is written from its current position; [`Flavor::CommitOutput`]
/// seeks back there to rewrite the header. `progress` is called with the
/// number of input bytes each step consumed. Returns how many blocks are
/// stored in more than [`REFERENCE_MAX_STORED_BLOCK`] bytes (only 64 KiB
/// blocks can be): obd reads them, the reference does not.
pub fn compress(
    input: &dyn ReadAt,
    out: &mut (impl Write + Seek),
    opts: &ZFileOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    if !WRITER_BLOCK_SIZES.contains(&opts.block_size) {
        return Err(Error::Invalid(format!(
            "ZFile block size {} is not one of 4, 8, 16, 32 or 64 KiB",
            opts.block_size
        )));
    }
    const OUT: &str = "ZFile output";
    let base = out.stream_position().context(|| OUT.into())?;
    let mut ht = HeaderTrailer {
        flags: flag::HEADER | flag::DATA,
        block_size: opts.block_size,
        algo: opts.algorithm.code(),
        verify: 1,
        ..HeaderTrailer::default()
    };
    out.write_all(&ht.to_bytes_with_digest())
        .context(|| OUT.into())?;

    let total = input.size();
    let bs = opts.block_size as usize;
    let mut compressor = BlockCompressor::new(opts.algorithm).context(|| OUT.into())?;
    let mut raw = vec![0u8; COMPRESS_CHUNK.max(bs)];
    let mut packed = Vec::with_capacity(COMPRESS_CHUNK + COMPRESS_CHUNK / 8);
    let mut lengths: Vec<u32> = Vec::new();
    let mut data_end = HT_SPACE_U64;
    let mut pos = 0u64;
    while pos < total {
        let n = (total - pos).min(raw.len() as u64) as usize;
        let chunk = &mut raw[..n];
        input
            .read_exact_at(chunk, pos)
            .context(|| input.name().to_string())?;
        packed.clear();
        for block in chunk.chunks(bs) {
            let len = compressor
                .compress_into(block, &mut packed)
                .context(|| OUT.into())?;
            lengths.push(len);
        }
        out.write_all(&packed).context(|| OUT.into())?;
        data_end += packed.len() as u64;
        pos += n as u64;
        progress(n as u64);
    }

    let table: Vec<u8> = lengths.iter().flat_map(|l| l.to_le_bytes()).collect();
    out.write_all(&table).context(|| OUT.into())?;
    ht.index_crc = raw_crc32c(0, &table);
    ht.index_offset = data_end;
    ht.index_size = lengths.len() as u64;
    ht.original_file_size = total;
    // Trailer: the header's flags with HEADER cleared and SEALED set.
    ht.flags = (ht.flags & !flag::HEADER) | flag::SEALED | flag::DATA;
    out.write_all(&ht.to_bytes_with_digest())
        .context(|| OUT.into())?;
    if opts.flavor == Flavor::CommitOutput {
        ht.flags = (ht.flags | flag::HEADER | flag::HEADER_OVERWRITE) & !flag::SEALED;
        let header = ht.to_bytes_with_digest();
        let end = out.stream_position().context(|| OUT.into())?;
        out.seek(SeekFrom::Start(base)).context(|| OUT.into())?;
        out.write_all(&header).context(|| OUT.into())?;
        out.seek(SeekFrom::Start(end)).context(|| OUT.into())?;
    }
    out.flush().context(|| OUT.into())?;
    let oversized = lengths
        .iter()
        .filter(|&&l| l > REFERENCE_MAX_STORED_BLOCK)
        .count();
    Ok(oversized as u64)
}

/// Decompress the ZFile `src` into `out`, checking every block. Returns the
/// number of bytes written; `progress` gets the bytes each step wrote.
pub fn decompress(src: Source, out: &mut dyn Write, progress: &mut dyn FnMut(u64)) -> Result<u64> {
    let reader = ZFileReader::open(src)?;
    copy_out(&reader, out, progress)
}

fn copy_out(
    reader: &ZFileReader,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    const OUT: &str = "decompressed output";
    let total = reader.size();
    let chunk = (COMPRESS_CHUNK as u64).max(u64::from(reader.info().block_size));
    let mut buf = vec![0u8; chunk as usize];
    let mut pos = 0u64;
    while pos < total {
        let n = (total - pos).min(chunk) as usize;
        reader
            .read_exact_at(&mut buf[..n], pos)
            .map_err(|e| Error::io(reader.name().to_string(), e))?;
        out.write_all(&buf[..n]).context(|| OUT.into())?;
        pos += n as u64;
        progress(n as u64);
    }
    out.flush().context(|| OUT.into())?;
    Ok(total)
}

/// Result of [`verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub blocks: u64,
    pub original_size: u64,
    pub algorithm: Algorithm,
    pub block_size: u32,
    /// Blocks carried CRCs (verify = 1) and all matched.
    pub crc_checked: bool,
}

/// Open `src` and read (CRC-check and decompress) every block.
pub fn verify(src: Source) -> Result<VerifyReport> {
    let reader = ZFileReader::open(src)?;
    copy_out(&reader, &mut io::sink(), &mut |_| {})?;
    let info = reader.info();
    Ok(VerifyReport {
        blocks: info.blocks,
        original_size: info.original_size,
        algorithm: info.algorithm,
        block_size: info.block_size,
        crc_checked: info.verify,
    })
}
