//! Helpers shared by the fuzz targets: turning bytes into a [`Source`] and
//! driving reads through whatever opened.
//!
//! Every read here may fail (corrupt inputs are expected); what must never
//! happen is a panic, an overflow, or an allocation sized by a header field.

use std::sync::Arc;

use overlaybd::index::{Entry, SECTOR};
use overlaybd::io::{Bytes, ReadAt, Source};
use overlaybd::lsmt::ReadOnlyLayer;
use overlaybd::stack::{PieceSource, Stack};

/// Largest single read a target issues.
pub const MAX_READ: u64 = 256 << 10;
/// Bytes decompressed or copied per input at most, so no input is slow
/// just because it legitimately describes a big device.
pub const READ_BUDGET: u64 = 4 << 20;

/// The fuzz input as a byte source.
pub fn source(data: &[u8], name: &str) -> Source {
    Arc::new(Bytes::new(data.to_vec(), name))
}

/// A small deterministic stream of numbers: the input's last 64 bytes
/// (padding in an LSMT trailer and in a tar's end-of-archive blocks, so the
/// fuzzer can steer reads without breaking the file), then a hash of the
/// whole input.
pub struct Knobs {
    bytes: Vec<u8>,
    pos: usize,
    state: u64,
}

impl Knobs {
    pub fn new(data: &[u8]) -> Knobs {
        let tail = &data[data.len().saturating_sub(64)..];
        // FNV-1a over a prefix and the tail: cheap and input-dependent.
        let mut state = 0xcbf2_9ce4_8422_2325u64;
        for &b in data.iter().take(4096).chain(tail) {
            state = (state ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Knobs {
            bytes: tail.to_vec(),
            pos: 0,
            state,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        if self.pos + 8 <= self.bytes.len() {
            let v = u64::from_le_bytes(self.bytes[self.pos..self.pos + 8].try_into().unwrap());
            self.pos += 8;
            return v;
        }
        // splitmix64
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// Where sector `sector` of the stack comes from according to the layers'
/// own indexes, searched top down: `(layer, byte position)`, or `None` for
/// zeros. The model the stack's merged map must agree with.
fn model_sector(layers: &[Vec<Entry>], sector: u64) -> Option<(usize, u64)> {
    for (i, entries) in layers.iter().enumerate().rev() {
        let at = entries.partition_point(|e| e.end() <= sector);
        if let Some(e) = entries.get(at).filter(|e| e.offset <= sector) {
            return (!e.zeroed).then(|| (i, (e.moffset + sector - e.offset) * SECTOR));
        }
    }
    None
}

/// Plan and read `[offset, offset + length)` of `stack`. A plan that
/// succeeds must cover exactly `length` bytes and, sector by sector, agree
/// with [`model_sector`]; a read may fail (the layer's data can lie past the
/// end of a corrupt file).
fn stack_read(stack: &Stack, layers: &[Vec<Entry>], offset: u64, length: u64, budget: &mut u64) {
    let in_range = offset.is_multiple_of(SECTOR)
        && length.is_multiple_of(SECTOR)
        && offset
            .checked_add(length)
            .is_some_and(|end| end <= stack.virtual_size());
    let mut plan = Vec::new();
    match stack.plan(offset, length, &mut plan) {
        Ok(()) => {
            assert!(in_range, "plan accepted {offset}+{length}");
            let total: u64 = plan.iter().map(|p| p.length).sum();
            assert_eq!(total, length, "plan for {offset}+{length}: {plan:?}");
            let mut sector = offset / SECTOR;
            for piece in &plan {
                assert!(piece.length > 0 && piece.length.is_multiple_of(SECTOR));
                for k in 0..(piece.length / SECTOR).min(MODEL_SECTORS) {
                    let got = match piece.source {
                        PieceSource::Zero => None,
                        PieceSource::Layer { layer, position } => {
                            assert!(layer < stack.lowers().len(), "plan names layer {layer}");
                            Some((layer, position + k * SECTOR))
                        }
                    };
                    let want = model_sector(layers, sector + k);
                    assert_eq!(got, want, "sector {} of plan {plan:?}", sector + k);
                }
                sector += piece.length / SECTOR;
            }
        }
        Err(_) => {
            assert!(!in_range, "plan refused {offset}+{length}");
            return;
        }
    }
    if length > *budget {
        return;
    }
    *budget -= length;
    let mut buf = vec![0u8; length as usize];
    let _ = stack.read(&mut buf, offset);
}

/// Sectors of each plan piece checked against the model.
const MODEL_SECTORS: u64 = 64;

/// Build a stack of `layers` (bottom → top) and read ranges derived from
/// the layers' indexes and from `knobs`: the start of some mapped extents,
/// reads straddling extent ends, the last sector, and a few arbitrary
/// aligned ranges. Every plan is checked against the layers' own indexes.
pub fn exercise_layers(layers: Vec<ReadOnlyLayer>, knobs: &mut Knobs) {
    let indexes: Vec<Vec<Entry>> = layers.iter().map(|l| l.entries.clone()).collect();
    for (i, entries) in indexes.iter().enumerate() {
        let _ = overlaybd::lsmt::entries_to_map(entries, i as u8).len();
    }
    let Ok(stack) = Stack::new(layers, None) else {
        return;
    };
    let size = stack.virtual_size();
    let sectors = size / SECTOR;
    let mut budget = READ_BUDGET;
    let clip = |sector: u64, count: u64| -> Option<(u64, u64)> {
        if sector >= sectors {
            return None;
        }
        let count = count.clamp(1, MAX_READ / SECTOR).min(sectors - sector);
        Some((sector * SECTOR, count * SECTOR))
    };
    let mut ranges = Vec::new();
    for entries in &indexes {
        let picks = [0, 1, entries.len() / 2, entries.len().saturating_sub(1)];
        for &i in &picks {
            if let Some(e) = entries.get(i) {
                ranges.extend(clip(e.offset, e.length));
                // Straddle the end of the extent into whatever follows.
                ranges.extend(clip(e.end().saturating_sub(1), 2 + knobs.below(64)));
            }
        }
    }
    if sectors > 0 {
        ranges.extend(clip(sectors - 1, 1));
    }
    for _ in 0..4 {
        let sector = knobs.below(sectors);
        let count = 1 + knobs.below(MAX_READ / SECTOR);
        ranges.extend(clip(sector, count));
    }
    let read =
        |offset, length, budget: &mut u64| stack_read(&stack, &indexes, offset, length, budget);
    for (offset, length) in ranges {
        read(offset, length, &mut budget);
    }
    // Requests the stack must refuse: unaligned, and past the end.
    read(1, SECTOR, &mut budget);
    read(0, 1, &mut budget);
    read(sectors * SECTOR, SECTOR, &mut budget);
    read(u64::MAX - 511, SECTOR, &mut budget);
}

/// [`exercise_layers`] with one layer.
pub fn exercise_layer(layer: ReadOnlyLayer, knobs: &mut Knobs) {
    exercise_layers(vec![layer], knobs);
}

/// Read ranges of any [`ReadAt`]: a prefix (checked against later reads of
/// the same bytes, so partial-block and cached paths agree with whole
/// reads), block-sized steps around `block`, the end, and past the end.
pub fn exercise_source(src: &dyn ReadAt, block: u64, knobs: &mut Knobs) {
    let size = src.size();
    let prefix_len = size.min(READ_BUDGET / 2) as usize;
    let mut prefix = vec![0u8; prefix_len];
    let prefix_ok = src.read_exact_at(&mut prefix, 0).is_ok();
    let mut budget = READ_BUDGET / 2;
    let mut check = |offset: u64, len: u64| {
        let Some(end) = offset.checked_add(len) else {
            return;
        };
        if end > size || len > budget {
            return;
        }
        budget -= len;
        let mut buf = vec![0u8; len as usize];
        let got = src.read_exact_at(&mut buf, offset);
        if prefix_ok && end <= prefix_len as u64 {
            assert!(
                got.is_ok(),
                "whole read worked, {offset}+{len} failed: {got:?}"
            );
            assert!(
                buf == prefix[offset as usize..end as usize],
                "{offset}+{len} differs from the same bytes of a whole read"
            );
        }
    };
    let block = block.max(1);
    // Partial reads inside one block, twice (the second may hit a cache),
    // then a read straddling two blocks, then the very end.
    check(block / 4, block / 2);
    check(block / 4 + 1, block / 2);
    check(block - 1, 2);
    check(block.saturating_mul(3) / 2, block);
    check(size.saturating_sub(1), 1);
    check(size.saturating_sub(block + 7), block + 7);
    for _ in 0..4 {
        let offset = knobs.below(size.saturating_add(1));
        let len = knobs.below(MAX_READ).min(size - offset);
        check(offset, len);
    }
    // Past the end must be an error, never a panic.
    let mut buf = [0u8; 16];
    assert!(src.read_exact_at(&mut buf, size).is_err());
    assert!(src.read_exact_at(&mut buf, u64::MAX - 4).is_err());
}

/// Recompute every checksum of a ZFile laid out in `file` in place: block
/// CRCs (when `verify` is set), the jump table's `index_crc` and the header
/// and trailer digests (when their DIGEST flag is set). Fields and data keep
/// their mutated values, so the fuzzer gets past the checksums to the code
/// behind them. Returns false (leaving `file` alone) when the bytes do not
/// look enough like a ZFile to find the jump table.
pub fn reseal_zfile(file: &mut [u8]) -> bool {
    use overlaybd::crc::{raw_crc32c, ZFILE_BLOCK_SEED};
    use overlaybd::zfile::{HeaderTrailer, HT_SPACE};

    let len = file.len();
    if len < 2 * HT_SPACE {
        return false;
    }
    let block_at = |file: &[u8], at: usize| -> Option<HeaderTrailer> {
        HeaderTrailer::parse(file[at..at + HT_SPACE].try_into().unwrap()).ok()
    };
    let Some(mut header) = block_at(file, 0) else {
        return false;
    };
    let trailer_at = len - HT_SPACE;
    let mut trailer = block_at(file, trailer_at);
    let index_ht = if header.is_header_overwrite() {
        header.clone()
    } else {
        match &trailer {
            Some(t) => t.clone(),
            None => return false,
        }
    };
    let (Ok(index_offset), Ok(blocks)) = (
        usize::try_from(index_ht.index_offset),
        usize::try_from(index_ht.index_size),
    ) else {
        return false;
    };
    let Some(table_end) = blocks
        .checked_mul(4)
        .and_then(|n| n.checked_add(index_offset))
        .filter(|&end| end <= len)
    else {
        return false;
    };
    let data_start = HT_SPACE + index_ht.dict_size as usize;
    if index_ht.verify != 0 {
        let mut pos = data_start;
        for i in 0..blocks {
            let at = index_offset + 4 * i;
            let stored = u32::from_le_bytes(file[at..at + 4].try_into().unwrap()) as usize;
            let Some(end) = pos.checked_add(stored).filter(|&e| e <= index_offset) else {
                break;
            };
            if stored > 4 {
                let crc = raw_crc32c(ZFILE_BLOCK_SEED, &file[pos..end - 4]);
                file[end - 4..end].copy_from_slice(&crc.to_le_bytes());
            }
            pos = end;
        }
    }
    let index_crc = raw_crc32c(0, &file[index_offset..table_end]);
    let seal = |ht: &mut HeaderTrailer| {
        if ht.has_digest() {
            ht.to_bytes_with_digest()
        } else {
            ht.to_bytes()
        }
    };
    if header.is_header_overwrite() {
        header.index_crc = index_crc;
    } else if let Some(t) = trailer.as_mut() {
        t.index_crc = index_crc;
    }
    let bytes = seal(&mut header);
    file[..HT_SPACE].copy_from_slice(&bytes);
    if let Some(t) = trailer.as_mut() {
        let bytes = seal(t);
        file[trailer_at..].copy_from_slice(&bytes);
    }
    true
}
