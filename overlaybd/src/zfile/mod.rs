//! ZFile: the block-compressed container overlaybd uses for layer blobs.
//!
//! A registry layer is usually a ZFile around an LSMT file so that a client
//! can fetch and decompress only the blocks a read touches. Layout:
//! `header (512) · blocks (each + u32 CRC when verify = 1) · jump table ·
//! trailer (512)`; see `overlaybd-format.md` §2.
//!
//! - [`HeaderTrailer`] parses and serializes the shared 96-byte struct, pure
//!   over byte arrays.
//! - [`ZFileReader`] is a [`ReadAt`] over the decompressed bytes: opening it
//!   checks everything the file says about itself (magic, digest, jump table
//!   bounds and CRC), and every read verifies block CRCs, so corrupt data is
//!   reported, never returned.
//! - [`compress`], [`decompress`] and [`verify`] are the whole-file tools,
//!   writing what the reference `overlaybd-zfile` / `overlaybd-commit -z` write.

use std::fmt;

use crate::crc::raw_crc32c;

/// Size of the header and of the trailer; the struct fills the first 96 bytes.
pub const HT_SPACE: usize = 512;
/// Value of the header's `size` field.
pub const HT_STRUCT_SIZE: u32 = 96;
/// First magic, 8 bytes at offset 0.
pub const MAGIC0: [u8; 8] = *b"ZFile\0\x01\0";
/// Second magic, 16 bytes at offset 8.
pub const MAGIC1: [u8; 16] = [
    0x74, 0x75, 0x6A, 0x69, 0x2E, 0x79, 0x79, 0x66, 0x40, 0x41, 0x6C, 0x69, 0x62, 0x61, 0x62, 0x61,
];
/// Largest jump table the reference accepts.
pub const MAX_BLOCKS: u64 = 1_000_000_000;
/// Block sizes the writer accepts (the reference tools' `--bs 4|8|16|32|64`).
pub const WRITER_BLOCK_SIZES: [u32; 5] = [4096, 8192, 16384, 32768, 65536];
/// zstd level the reference compresses with.
pub const ZSTD_LEVEL: i32 = 3;
/// How often a block whose CRC does not match is read again before giving up.
pub const BLOCK_REREADS: usize = 3;

const HT_SPACE_U64: u64 = HT_SPACE as u64;
const CRC_LEN: u64 = 4;
/// The reference keeps in-group block offsets as u16 and rejects a group
/// whose partial sum reaches this value.
const GROUP_SUM_LIMIT: u64 = 65535;
/// Smallest and largest block size the reader accepts (powers of two only).
const MIN_READ_BLOCK: u32 = 512;
const MAX_READ_BLOCK: u32 = 65536;
/// Compressed bytes read from the source in one request.
const MAX_BATCH_READ: u64 = 4 << 20;

/// Single-bit flags of [`HeaderTrailer::flags`]. Test them one at a time:
/// old writers left garbage in the upper bits.
pub mod flag {
    /// 1 = header, 0 = trailer.
    pub const HEADER: u64 = 1 << 0;
    /// 1 = data file (always set by writers).
    pub const DATA: u64 = 1 << 1;
    /// Set in trailers: the file is complete.
    pub const SEALED: u64 = 1 << 2;
    /// The header carries the trailer's index fields (`commit -z`).
    pub const HEADER_OVERWRITE: u64 = 1 << 3;
    /// `digest` (and the jump table's `index_crc`) are valid.
    pub const DIGEST: u64 = 1 << 4;
}

/// Compression algorithm of the blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Raw LZ4 blocks (no frame).
    Lz4,
    /// One zstd frame per block.
    Zstd,
}

impl Algorithm {
    /// The `algo` byte stored in the header.
    pub fn code(self) -> u8 {
        match self {
            Algorithm::Lz4 => 1,
            Algorithm::Zstd => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Algorithm::Lz4),
            2 => Some(Algorithm::Zstd),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Lz4 => "lz4",
            Algorithm::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The 96-byte struct at the start of the header and of the trailer.
/// Reserved fields and padding are not kept: old writers left garbage there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderTrailer {
    pub digest: u32,
    pub flags: u64,
    pub index_offset: u64,
    /// Number of blocks (u32 entries in the jump table).
    pub index_size: u64,
    pub original_file_size: u64,
    pub index_crc: u32,
    pub block_size: u32,
    pub algo: u8,
    pub level: u8,
    pub use_dict: u8,
    pub dict_size: u32,
    pub verify: u8,
}

fn le_u32(b: &[u8; HT_SPACE], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le_u64(b: &[u8; HT_SPACE], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

impl HeaderTrailer {
    /// Whether a 512-byte block starts with both ZFile magics.
    pub fn has_magic(block: &[u8]) -> bool {
        block.len() >= 24 && block[..8] == MAGIC0 && block[8..24] == MAGIC1
    }

    /// Parse the struct; fails only when the magics are missing. Semantic
    /// checks (flags, sizes, digest) are up to the caller.
    pub fn parse(block: &[u8; HT_SPACE]) -> std::result::Result<Self, String> {
        if !Self::has_magic(block) {
            return Err("no ZFile magic".into());
        }
        Ok(HeaderTrailer {
            digest: le_u32(block, 28),
            flags: le_u64(block, 32),
            index_offset: le_u64(block, 40),
            index_size: le_u64(block, 48),
            original_file_size: le_u64(block, 56),
            index_crc: le_u32(block, 64),
            block_size: le_u32(block, 72),
            algo: block[76],
            level: block[77],
            use_dict: block[78],
            dict_size: le_u32(block, 84),
            verify: block[88],
        })
    }

    /// The 512 bytes as written, with `digest` as stored in `self`.
    pub fn to_bytes(&self) -> [u8; HT_SPACE] {
        let mut b = [0u8; HT_SPACE];
        b[..8].copy_from_slice(&MAGIC0);
        b[8..24].copy_from_slice(&MAGIC1);
        b[24..28].copy_from_slice(&HT_STRUCT_SIZE.to_le_bytes());
        b[28..32].copy_from_slice(&self.digest.to_le_bytes());
        b[32..40].copy_from_slice(&self.flags.to_le_bytes());
        b[40..48].copy_from_slice(&self.index_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.index_size.to_le_bytes());
        b[56..64].copy_from_slice(&self.original_file_size.to_le_bytes());
        b[64..68].copy_from_slice(&self.index_crc.to_le_bytes());
        b[72..76].copy_from_slice(&self.block_size.to_le_bytes());
        b[76] = self.algo;
        b[77] = self.level;
        b[78] = self.use_dict;
        b[84..88].copy_from_slice(&self.dict_size.to_le_bytes());
        b[88] = self.verify;
        b
    }

    /// Set the DIGEST flag, compute the digest and return the final bytes.
    pub fn to_bytes_with_digest(&mut self) -> [u8; HT_SPACE] {
        self.flags |= flag::DIGEST;
        self.digest = 0;
        let mut b = self.to_bytes();
        self.digest = compute_digest(&b);
        b[28..32].copy_from_slice(&self.digest.to_le_bytes());
        b
    }

    pub fn has_flag(&self, bit: u64) -> bool {
        self.flags & bit != 0
    }

    pub fn is_header(&self) -> bool {
        self.has_flag(flag::HEADER)
    }

    pub fn is_data_file(&self) -> bool {
        self.has_flag(flag::DATA)
    }

    pub fn is_sealed(&self) -> bool {
        self.has_flag(flag::SEALED)
    }

    pub fn is_header_overwrite(&self) -> bool {
        self.has_flag(flag::HEADER_OVERWRITE)
    }

    pub fn has_digest(&self) -> bool {
        self.has_flag(flag::DIGEST)
    }
}

/// `raw_crc32c(0, block)` with the digest field (bytes 28..32) taken as zero.
pub fn compute_digest(block: &[u8; HT_SPACE]) -> u32 {
    let crc = raw_crc32c(0, &block[..28]);
    let crc = raw_crc32c(crc, &[0u8; 4]);
    raw_crc32c(crc, &block[32..])
}

/// What an opened ZFile says about itself (for `obd info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZFileInfo {
    pub algorithm: Algorithm,
    pub block_size: u32,
    pub blocks: u64,
    pub original_size: u64,
    pub compressed_size: u64,
    /// Blocks carry CRCs and every read checks them.
    pub verify: bool,
    /// Flags of the header (bits as stored, garbage included).
    pub header_flags: u64,
    /// The index fields came from the header (`commit -z` output).
    pub index_in_header: bool,
    /// The header digest was present and checked.
    pub digest_checked: bool,
}

mod reader;
mod writer;

pub use reader::ZFileReader;
pub use writer::{
    compress, decompress, verify, Flavor, VerifyReport, ZFileOptions, REFERENCE_MAX_STORED_BLOCK,
};

#[cfg(test)]
mod tests {
    use super::reader::{build_offsets, Layout};
    use super::writer::COMPRESS_CHUNK;
    use super::*;
    use crate::error::{Error, Result};
    use crate::io::{Bytes, ReadAt};
    use std::io::{self, Cursor, Seek, SeekFrom};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Deterministic, partly compressible test data.
    fn sample(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if (i / 512) % 3 == 0 {
                    (i / 64) as u8
                } else {
                    x as u8
                }
            })
            .collect()
    }

    fn zfile_of(data: &[u8], opts: &ZFileOptions) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        compress(
            &Bytes::new(data.to_vec(), "input"),
            &mut out,
            opts,
            &mut |_| {},
        )
        .unwrap();
        out.into_inner()
    }

    fn open_bytes(file: Vec<u8>) -> Result<ZFileReader> {
        ZFileReader::open(Arc::new(Bytes::new(file, "test.zfile")))
    }

    fn read_all(r: &dyn ReadAt) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; r.size() as usize];
        r.read_exact_at(&mut v, 0)?;
        Ok(v)
    }

    fn opts(algorithm: Algorithm, block_size: u32, flavor: Flavor) -> ZFileOptions {
        ZFileOptions {
            algorithm,
            block_size,
            flavor,
        }
    }

    #[test]
    fn sans_io_decode_matches_read_at() {
        let data = sample(50_000, 7);
        for algorithm in [Algorithm::Lz4, Algorithm::Zstd] {
            let z = zfile_of(&data, &opts(algorithm, 4096, Flavor::CommitOutput));
            let r = open_bytes(z.clone()).unwrap();
            for (off, len) in [
                (0u64, 1usize),
                (0, 4096),
                (100, 9000),
                (4096, 8192),
                (45_000, 5000),
            ] {
                let (start, slen) = r.stored_span(off, len).unwrap();
                let stored = &z[start as usize..(start + slen) as usize];
                let mut got = vec![0u8; len];
                r.decode_range(stored, off, &mut got).unwrap();
                assert_eq!(got, &data[off as usize..off as usize + len], "{off}+{len}");
            }
            assert!(r.stored_span(49_999, 2).is_err());
            assert!(r.stored_span(0, 0).is_err());
        }
    }

    #[test]
    fn sans_io_decode_rejects_a_bad_crc_and_a_wrong_span() {
        let data = sample(20_000, 3);
        let mut z = zfile_of(&data, &opts(Algorithm::Lz4, 4096, Flavor::CommitOutput));
        let r = open_bytes(z.clone()).unwrap();
        let (start, slen) = r.stored_span(5000, 100).unwrap();
        let mut buf = vec![0u8; 100];
        let short = &z[start as usize..(start + slen - 1) as usize];
        assert!(r.decode_range(short, 5000, &mut buf).is_err());
        z[start as usize + 3] ^= 0x40;
        let stored = &z[start as usize..(start + slen) as usize];
        let err = r.decode_range(stored, 5000, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("CRC"), "{err}");
    }

    fn u64_at(f: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(f[at..at + 8].try_into().unwrap())
    }

    /// Recompute index_crc and both digests after a test edited the jump
    /// table, so that only the edit itself is wrong.
    fn reseal(f: &mut [u8]) {
        let t = f.len() - HT_SPACE;
        let io = u64_at(f, t + 40) as usize;
        let n = u64_at(f, t + 48) as usize;
        let crc = raw_crc32c(0, &f[io..io + 4 * n]);
        for at in [0, t] {
            f[at + 64..at + 68].copy_from_slice(&crc.to_le_bytes());
            let block: &mut [u8; HT_SPACE] = (&mut f[at..at + HT_SPACE]).try_into().unwrap();
            let d = compute_digest(block);
            block[28..32].copy_from_slice(&d.to_le_bytes());
        }
    }

    fn assert_corrupt(r: Result<ZFileReader>, needle: &str) {
        match r {
            Err(e @ Error::Corrupt { .. }) => {
                assert!(e.to_string().contains(needle), "{e:?} lacks {needle:?}")
            }
            Err(e) => panic!("expected Corrupt containing {needle:?}, got {e:?}"),
            Ok(_) => panic!("expected Corrupt containing {needle:?}, opened fine"),
        }
    }

    #[test]
    fn header_round_trip() {
        let mut ht = HeaderTrailer {
            flags: flag::HEADER | flag::DATA,
            index_offset: 1234,
            index_size: 5,
            original_file_size: 20000,
            index_crc: 0xdead_beef,
            block_size: 4096,
            algo: 2,
            level: 0,
            use_dict: 0,
            dict_size: 0,
            verify: 1,
            digest: 0,
        };
        let bytes = ht.to_bytes_with_digest();
        assert_eq!(&bytes[..8], b"ZFile\0\x01\0");
        assert_eq!(u32::from_le_bytes(bytes[24..28].try_into().unwrap()), 96);
        assert!(bytes[96..].iter().all(|&b| b == 0));
        let parsed = HeaderTrailer::parse(&bytes).unwrap();
        assert_eq!(parsed, ht);
        assert_eq!(parsed.flags, 0x13);
        assert_eq!(compute_digest(&bytes), parsed.digest);
        assert_eq!(parsed.to_bytes(), bytes);
    }

    #[test]
    fn parse_rejects_bad_magic() {
        let mut bytes = HeaderTrailer::default().to_bytes();
        bytes[3] ^= 0x20;
        assert!(HeaderTrailer::parse(&bytes).is_err());
        let mut bytes = HeaderTrailer::default().to_bytes();
        bytes[23] = 0;
        assert!(HeaderTrailer::parse(&bytes).is_err());
    }

    #[test]
    fn flag_bits_are_tested_singly() {
        type Check = fn(&HeaderTrailer) -> bool;
        let checks: [(u64, Check); 5] = [
            (flag::HEADER, HeaderTrailer::is_header),
            (flag::DATA, HeaderTrailer::is_data_file),
            (flag::SEALED, HeaderTrailer::is_sealed),
            (flag::HEADER_OVERWRITE, HeaderTrailer::is_header_overwrite),
            (flag::DIGEST, HeaderTrailer::has_digest),
        ];
        for (bit, _) in checks {
            for garbage in [0u64, 0xfe7f_a464_0b40, !0x1f] {
                let ht = HeaderTrailer {
                    flags: bit | garbage,
                    ..HeaderTrailer::default()
                };
                for (other, check) in checks {
                    assert_eq!(
                        check(&ht),
                        other == bit,
                        "flags {:#x}, bit {other:#x}",
                        ht.flags
                    );
                }
            }
        }
    }

    #[test]
    fn round_trips_every_algorithm_and_block_size() {
        for algorithm in [Algorithm::Lz4, Algorithm::Zstd] {
            for bs in WRITER_BLOCK_SIZES {
                let b = bs as usize;
                for len in [0, 1, b - 1, b, b + 1, 3 * b + 17] {
                    for flavor in [Flavor::ToolOutput, Flavor::CommitOutput] {
                        let data = sample(len, len as u32 ^ bs);
                        let file = zfile_of(&data, &opts(algorithm, bs, flavor));
                        let r = open_bytes(file).unwrap();
                        let info = r.info();
                        assert_eq!(info.algorithm, algorithm);
                        assert_eq!(info.block_size, bs);
                        assert_eq!(info.blocks, len.div_ceil(b) as u64);
                        assert_eq!(info.index_in_header, flavor == Flavor::CommitOutput);
                        assert_eq!(
                            read_all(&r).unwrap(),
                            data,
                            "{algorithm} {bs} {len} {flavor:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn multi_chunk_input_and_progress() {
        // Larger than one compression round, with a short last block.
        let data = sample(COMPRESS_CHUNK * 2 + 4096 * 3 + 100, 9);
        let mut out = Cursor::new(Vec::new());
        let mut seen = Vec::new();
        let o = opts(Algorithm::Lz4, 4096, Flavor::CommitOutput);
        compress(&Bytes::new(data.clone(), "in"), &mut out, &o, &mut |p| {
            seen.push(p)
        })
        .unwrap();
        assert_eq!(seen.iter().sum::<u64>(), data.len() as u64);
        assert!(seen.len() > 1 && seen.iter().all(|&n| n > 0));
        let file = out.into_inner();

        let mut plain = Vec::new();
        let n = decompress(
            Arc::new(Bytes::new(file.clone(), "z")),
            &mut plain,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(plain, data);

        let report = verify(Arc::new(Bytes::new(file.clone(), "z"))).unwrap();
        assert_eq!(report.original_size, data.len() as u64);
        assert_eq!(report.blocks, data.len().div_ceil(4096) as u64);
        assert!(report.crc_checked);

        // Random ranges, crossing block and batch boundaries.
        let r = open_bytes(file).unwrap();
        let mut x = 12345u64;
        for _ in 0..300 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) % data.len() as u64;
            let max = (data.len() as u64 - off).min(300_000);
            let len = ((x >> 5) % (max + 1)) as usize;
            let mut buf = vec![0u8; len];
            r.read_exact_at(&mut buf, off).unwrap();
            assert_eq!(buf, data[off as usize..off as usize + len]);
        }
        let mut buf = [0u8; 2];
        let err = r
            .read_exact_at(&mut buf, data.len() as u64 - 1)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn writer_output_shape() {
        let data = sample(10_000, 3);
        let tool = zfile_of(&data, &opts(Algorithm::Lz4, 4096, Flavor::ToolOutput));
        let commit = zfile_of(&data, &opts(Algorithm::Lz4, 4096, Flavor::CommitOutput));
        let parse = |b: &[u8]| HeaderTrailer::parse(b.try_into().unwrap()).unwrap();
        let (th, tt) = (parse(&tool[..512]), parse(&tool[tool.len() - 512..]));
        let (ch, ct) = (parse(&commit[..512]), parse(&commit[commit.len() - 512..]));
        assert_eq!(
            (th.flags, tt.flags, ch.flags, ct.flags),
            (0x13, 0x16, 0x1b, 0x16)
        );
        assert_eq!(
            (
                th.index_offset,
                th.index_size,
                th.original_file_size,
                th.index_crc
            ),
            (0, 0, 0, 0)
        );
        assert_eq!(tt.original_file_size, 10_000);
        assert_eq!(tt.index_size, 3);
        assert_eq!(tt, ct);
        assert_eq!(
            (
                ch.index_offset,
                ch.index_size,
                ch.original_file_size,
                ch.index_crc
            ),
            (
                ct.index_offset,
                ct.index_size,
                ct.original_file_size,
                ct.index_crc
            )
        );
        assert_eq!(
            (th.level, th.verify, th.algo, th.block_size),
            (0, 1, 1, 4096)
        );
        // Only the header differs between the flavors.
        assert_eq!(tool[512..], commit[512..]);
    }

    #[test]
    fn writer_appends_at_the_current_position() {
        let data = sample(9000, 4);
        let mut out = Cursor::new(vec![0xAAu8; 1536]);
        out.seek(SeekFrom::End(0)).unwrap();
        let o = opts(Algorithm::Zstd, 8192, Flavor::CommitOutput);
        compress(&Bytes::new(data.clone(), "in"), &mut out, &o, &mut |_| {}).unwrap();
        let file = out.into_inner();
        assert!(file[..1536].iter().all(|&b| b == 0xAA));
        let r = open_bytes(file[1536..].to_vec()).unwrap();
        assert_eq!(read_all(&r).unwrap(), data);
    }

    #[test]
    fn writer_rejects_other_block_sizes() {
        for bs in [0, 512, 2048, 4095, 12288, 131072] {
            let mut out = Cursor::new(Vec::new());
            let o = opts(Algorithm::Lz4, bs, Flavor::ToolOutput);
            let err =
                compress(&Bytes::new(vec![1; 10], "in"), &mut out, &o, &mut |_| {}).unwrap_err();
            assert!(matches!(err, Error::Invalid(_)), "{bs}: {err}");
        }
    }

    fn small_file(flavor: Flavor) -> Vec<u8> {
        zfile_of(
            &sample(4096 * 5 + 300, 7),
            &opts(Algorithm::Lz4, 4096, flavor),
        )
    }

    #[test]
    fn flipped_block_crc_fails_the_read_with_invalid_data() {
        let mut f = small_file(Flavor::ToolOutput);
        let r = open_bytes(f.clone()).unwrap();
        let (off, len) = r.block_span(2);
        f[(off + len - 1) as usize] ^= 0x40; // last CRC byte of block 2
        let r = open_bytes(f).unwrap();
        let mut buf = vec![0u8; 100];
        r.read_exact_at(&mut buf, 0).unwrap(); // block 0 is fine
        let err = r.read_exact_at(&mut buf, 2 * 4096 + 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let msg = err.to_string();
        assert!(
            msg.contains("test.zfile") && msg.contains("block 2") && msg.contains("CRC"),
            "{msg}"
        );
        assert!(read_all(&r).is_err());
    }

    #[test]
    fn flipped_data_byte_never_returns_corrupt_data() {
        let good = small_file(Flavor::CommitOutput);
        let r = open_bytes(good.clone()).unwrap();
        let plain = read_all(&r).unwrap();
        for block in 0..r.info().blocks {
            let (off, len) = r.block_span(block);
            for at in off..off + len {
                let mut f = good.clone();
                f[at as usize] ^= 1;
                let r = open_bytes(f).unwrap();
                match read_all(&r) {
                    Ok(got) => panic!("byte {at} flipped, read succeeded (same: {})", got == plain),
                    Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidData),
                }
            }
        }
    }

    /// Serves corrupted bytes for the first `bad_reads` reads that touch
    /// `at`, and counts all reads.
    struct Flaky {
        inner: Bytes,
        at: u64,
        bad_reads: usize,
        reads: AtomicUsize,
        total: AtomicUsize,
    }

    impl ReadAt for Flaky {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.total.fetch_add(1, Ordering::SeqCst);
            self.inner.read_exact_at(buf, offset)?;
            if (offset..offset + buf.len() as u64).contains(&self.at)
                && self.reads.fetch_add(1, Ordering::SeqCst) < self.bad_reads
            {
                buf[(self.at - offset) as usize] ^= 0xff;
            }
            Ok(())
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn name(&self) -> &str {
            self.inner.name()
        }
    }

    #[test]
    fn partial_reads_of_one_block_read_the_source_once() {
        let f = small_file(Flavor::ToolOutput);
        let plain = read_all(&open_bytes(f.clone()).unwrap()).unwrap();
        let flaky = Arc::new(Flaky {
            inner: Bytes::new(f, "count"),
            at: u64::MAX,
            bad_reads: 0,
            reads: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
        });
        let r = ZFileReader::open(flaky.clone()).unwrap();
        let opened = flaky.total.load(Ordering::SeqCst);
        let mut buf = [0u8; 512];
        for off in [4096 + 512, 4096, 4096 + 3584, 4096 + 1000] {
            r.read_exact_at(&mut buf, off).unwrap();
            assert_eq!(buf[..], plain[off as usize..off as usize + 512]);
        }
        assert_eq!(flaky.total.load(Ordering::SeqCst), opened + 1);
        // A whole-block read does not disturb the cache.
        let mut block = vec![0u8; 4096];
        r.read_exact_at(&mut block, 0).unwrap();
        r.read_exact_at(&mut buf, 4096 + 7).unwrap();
        assert_eq!(flaky.total.load(Ordering::SeqCst), opened + 2);
    }

    #[test]
    fn crc_mismatch_is_read_again_up_to_three_times() {
        let f = small_file(Flavor::ToolOutput);
        let plain = read_all(&open_bytes(f.clone()).unwrap()).unwrap();
        let (off, _) = open_bytes(f.clone()).unwrap().block_span(1);
        for bad_reads in 0..=5 {
            let flaky = Flaky {
                inner: Bytes::new(f.clone(), "flaky"),
                at: off + 3,
                bad_reads,
                reads: AtomicUsize::new(0),
                total: AtomicUsize::new(0),
            };
            let r = ZFileReader::open(Arc::new(flaky)).unwrap();
            let got = read_all(&r);
            if bad_reads <= BLOCK_REREADS {
                assert_eq!(got.unwrap(), plain, "{bad_reads} bad reads");
            } else {
                let e = got.unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                assert!(e.to_string().contains("after 3 re-reads"), "{e}");
            }
        }
    }

    #[test]
    fn corrupt_containers_are_rejected_with_the_problem_named() {
        let good = small_file(Flavor::ToolOutput);
        let t = good.len() - HT_SPACE;
        let io_off = u64_at(&good, t + 40) as usize;

        let mut f = good.clone();
        f[2] = b'x';
        assert_corrupt(open_bytes(f), "magic");

        let mut f = good.clone();
        f[t + 1] = b'x';
        reseal(&mut f);
        assert_corrupt(open_bytes(f), "trailer magic");

        let mut f = good.clone();
        f[200] = 1; // header padding: covered by the digest
        assert_corrupt(open_bytes(f), "header digest mismatch");

        let mut f = good.clone();
        f[t + 300] = 1;
        assert_corrupt(open_bytes(f), "trailer digest mismatch");

        let mut f = good.clone();
        f[io_off] ^= 1; // jump table changed, index_crc not updated
        assert_corrupt(open_bytes(f), "jump table CRC mismatch");

        let mut f = good.clone();
        f[io_off..io_off + 4].copy_from_slice(&4u32.to_le_bytes());
        reseal(&mut f);
        assert_corrupt(open_bytes(f), "entry 0: block length 4 is too small");

        let mut f = good.clone();
        let last = io_off + 4 * 5;
        let len = u32::from_le_bytes(f[last..last + 4].try_into().unwrap());
        f[last..last + 4].copy_from_slice(&(len + 1000).to_le_bytes());
        reseal(&mut f);
        assert_corrupt(open_bytes(f), "past the jump table");

        let mut f = good.clone();
        f[t + 48..t + 56].copy_from_slice(&5u64.to_le_bytes()); // 6 blocks needed
        reseal(&mut f);
        assert_corrupt(open_bytes(f), "need 6");

        let mut f = good.clone();
        f[t + 40..t + 48].copy_from_slice(&u64::MAX.to_le_bytes());
        let block: &mut [u8; HT_SPACE] = (&mut f[t..]).try_into().unwrap();
        let d = compute_digest(block);
        block[28..32].copy_from_slice(&d.to_le_bytes());
        assert_corrupt(open_bytes(f), "outside the data area");

        let mut f = good.clone();
        f[t + 48..t + 56].copy_from_slice(&(MAX_BLOCKS + 1).to_le_bytes());
        let block: &mut [u8; HT_SPACE] = (&mut f[t..]).try_into().unwrap();
        let d = compute_digest(block);
        block[28..32].copy_from_slice(&d.to_le_bytes());
        assert_corrupt(open_bytes(f), "exceeds the limit");

        let mut f = good.clone();
        f[t + 76] = 9;
        reseal(&mut f);
        assert_corrupt(open_bytes(f), "unknown compression algorithm 9");

        let mut f = good.clone();
        f[t + 32] &= !(flag::SEALED as u8);
        reseal(&mut f);
        assert_corrupt(open_bytes(f), "lack trailer, data or sealed");

        let mut f = good.clone();
        f[32] &= !(flag::HEADER as u8);
        reseal(&mut f);
        assert_corrupt(open_bytes(f), "header flag");

        for cut in [0, 100, 511, 700, good.len() - 1] {
            assert!(open_bytes(good[..cut].to_vec()).is_err(), "cut at {cut}");
        }
        assert_corrupt(open_bytes(good[..good.len() - 1].to_vec()), "trailer");
    }

    #[test]
    fn legacy_files_without_digest_skip_the_index_crc() {
        // Clear DIGEST everywhere and put garbage where old writers did.
        let mut f = small_file(Flavor::ToolOutput);
        let t = f.len() - HT_SPACE;
        for at in [0, t] {
            f[at + 32] &= !(flag::DIGEST as u8);
            f[at + 32] |= 0x40;
            f[at + 37] = 0xfe;
            f[at + 28..at + 32].copy_from_slice(&[0xa0, 0x7f, 0, 0]);
            f[at + 64..at + 68].copy_from_slice(&[0x68, 0x0b, 0x64, 0xa4]);
            f[at + 89] = 0xa0;
            f[at + 150] = 0x55;
        }
        let r = open_bytes(f).unwrap();
        assert!(!r.info().digest_checked);
        assert_eq!(read_all(&r).unwrap(), sample(4096 * 5 + 300, 7));
    }

    #[test]
    fn jump_table_group_rule() {
        let layout = |bs| Layout {
            algorithm: Algorithm::Lz4,
            block_size: bs,
            verify: true,
            data_start: 512,
            index_offset: u64::MAX,
            blocks: 0,
            original_size: 0,
        };
        let src = Bytes::new(vec![], "t");
        let table = |lens: &[u32]| {
            lens.iter()
                .flat_map(|l| l.to_le_bytes())
                .collect::<Vec<u8>>()
        };
        // 4 KiB blocks: groups of 16; the first 15 of a group must stay < 65535.
        let ok = table(&[5000; 13]);
        assert_eq!(build_offsets(&src, &ok, &layout(4096)).unwrap().len(), 14);
        let err = build_offsets(&src, &table(&[5000; 14]), &layout(4096)).unwrap_err();
        assert!(err.to_string().contains("entry 13"), "{err}");
        // The last block of a group is not limited.
        let mut lens = vec![4000u32; 15];
        lens.push(60_000);
        lens.push(4000);
        assert!(build_offsets(&src, &table(&lens), &layout(4096)).is_ok());
        // 64 KiB blocks: groups of one, never limited.
        assert!(build_offsets(&src, &table(&[70_000; 3]), &layout(65536)).is_ok());
        // Offsets are cumulative.
        let offs = build_offsets(&src, &table(&[10, 20, 30]), &layout(65536)).unwrap();
        assert_eq!(offs, vec![512, 522, 542, 572]);
    }

    #[test]
    fn no_panic_on_mangled_files() {
        let good = zfile_of(
            &sample(4096 * 3 + 5, 11),
            &opts(Algorithm::Zstd, 4096, Flavor::ToolOutput),
        );
        let t = good.len() - HT_SPACE;
        let io_off = u64_at(&good, t + 40) as usize;
        let positions: Vec<usize> = (0..96).chain(io_off..good.len()).chain(512..600).collect();
        for &at in &positions {
            for val in [0u8, 1, 4, 0x7f, 0x80, 0xff] {
                let mut f = good.clone();
                f[at] = val;
                reseal_if_possible(&mut f);
                if let Ok(r) = open_bytes(f) {
                    let _ = read_all(&r);
                }
            }
        }
        for cut in 0..good.len() {
            assert!(open_bytes(good[..cut].to_vec()).is_err());
        }
    }

    /// `reseal`, unless the edit broke what it needs to find the table.
    fn reseal_if_possible(f: &mut [u8]) {
        let t = f.len() - HT_SPACE;
        let io = u64_at(f, t + 40);
        let n = u64_at(f, t + 48);
        if n < 1000 && io.checked_add(4 * n).is_some_and(|e| e <= t as u64) {
            reseal(f);
        }
    }

    #[test]
    fn reader_is_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ZFileReader>();
        let data = sample(4096 * 40 + 7, 5);
        let r = Arc::new(
            open_bytes(zfile_of(
                &data,
                &opts(Algorithm::Zstd, 8192, Flavor::ToolOutput),
            ))
            .unwrap(),
        );
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (r, data) = (r.clone(), &data);
                s.spawn(move || {
                    for i in 0..200u64 {
                        let off = (i * 997 + t * 131) % (data.len() as u64 - 5000);
                        let mut buf = vec![0u8; 5000];
                        r.read_exact_at(&mut buf, off).unwrap();
                        assert_eq!(buf, data[off as usize..off as usize + 5000]);
                    }
                });
            }
        });
    }
}
