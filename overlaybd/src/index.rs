//! LSMT index entries and the in-memory interval map built from them.
//!
//! On disk an entry is two little-endian u64 words; in memory a layer (or a
//! whole stack of layers) is an [`IntervalMap`] keyed by logical sector, in
//! which a later insert hides whatever it overlaps. The same map serves the
//! merged lower stack, the writable layer's replayed index and the input of
//! `commit`, so there is one overlap rule in the whole engine.

use std::collections::BTreeMap;

/// Bytes per sector; index offsets and lengths count sectors.
pub const SECTOR: u64 = 512;
/// Size of one on-disk index entry.
pub const ENTRY_SIZE: usize = 16;
/// Largest `length` an entry can hold (14 bits).
pub const MAX_ENTRY_SECTORS: u64 = (1 << 14) - 1;
/// `offset` value of a padding entry (with length 0).
pub const PADDING_OFFSET: u64 = (1 << 50) - 1;
const OFFSET_MASK: u64 = (1 << 50) - 1;
const MOFFSET_MASK: u64 = (1 << 55) - 1;
const ZEROED_BIT: u64 = 1 << 55;

/// One on-disk index entry: `length` sectors at logical sector `offset`
/// stored at sector `moffset` of the layer file, or zeros when `zeroed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub length: u64,
    pub moffset: u64,
    pub zeroed: bool,
}

impl Entry {
    /// Decode 16 bytes. The `tag` byte is meaningless on disk and ignored.
    pub fn decode(bytes: &[u8; ENTRY_SIZE]) -> Entry {
        let (w0, w1) = bytes.split_at(8);
        let word0 = u64::from_le_bytes(w0.try_into().expect("8 bytes"));
        let word1 = u64::from_le_bytes(w1.try_into().expect("8 bytes"));
        Entry {
            offset: word0 & OFFSET_MASK,
            length: word0 >> 50,
            moffset: word1 & MOFFSET_MASK,
            zeroed: word1 & ZEROED_BIT != 0,
        }
    }

    /// Encode to 16 bytes (tag 0). Fields must fit their bit widths.
    pub fn encode(&self) -> [u8; ENTRY_SIZE] {
        debug_assert!(self.offset <= OFFSET_MASK && self.length <= MAX_ENTRY_SECTORS);
        debug_assert!(self.moffset <= MOFFSET_MASK);
        let word0 = (self.offset & OFFSET_MASK) | (self.length << 50);
        let word1 = (self.moffset & MOFFSET_MASK) | if self.zeroed { ZEROED_BIT } else { 0 };
        let mut out = [0u8; ENTRY_SIZE];
        out[..8].copy_from_slice(&word0.to_le_bytes());
        out[8..].copy_from_slice(&word1.to_le_bytes());
        out
    }

    pub const PADDING: Entry = Entry {
        offset: PADDING_OFFSET,
        length: 0,
        moffset: 0,
        zeroed: false,
    };

    pub fn is_padding(&self) -> bool {
        self.offset == PADDING_OFFSET && self.length == 0
    }

    /// First sector past the entry.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// First sector of the layer file past the entry's data. A zeroed entry
    /// occupies no space in the file, so its end there is its own `moffset`
    /// (the reference's `mend()`): two adjacent zeroed entries with the same
    /// `moffset` continue each other.
    pub fn mend(&self) -> u64 {
        mend(self.moffset, self.length, self.zeroed)
    }

    /// The entry as an in-memory extent of layer `layer`.
    pub fn extent(&self, layer: u8) -> Extent {
        Extent {
            length: self.length,
            moffset: self.moffset,
            zeroed: self.zeroed,
            layer,
        }
    }
}

/// Where a mapped extent's bytes are: which layer, at which sector of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub moffset: u64,
    pub zeroed: bool,
    pub layer: u8,
}

/// A piece of a lookup: `length` sectors at logical sector `offset`, either
/// mapped by an extent (with `moffset` already advanced to `offset`) or a hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub length: u64,
    pub mapping: Option<Extent>,
}

/// Non-overlapping extents keyed by logical start sector; inserts overwrite.
#[derive(Clone, Debug, Default)]
pub struct IntervalMap {
    extents: BTreeMap<u64, Extent>,
}

impl IntervalMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.extents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Map `[offset, offset + extent.length)` to `extent`, hiding (and
    /// trimming) whatever was there.
    pub fn insert(&mut self, offset: u64, extent: Extent) {
        if extent.length == 0 {
            return;
        }
        let end = offset + extent.length;
        // An extent starting before `offset` may reach into (or past) the new one.
        if let Some((&start, &before)) = self.extents.range(..offset).next_back() {
            let before_end = start + before.length;
            if before_end > offset {
                self.extents.insert(
                    start,
                    Extent {
                        length: offset - start,
                        ..before
                    },
                );
                if before_end > end {
                    self.extents
                        .insert(end, advanced(before, end - start, before_end - end));
                }
            }
        }
        // Extents starting inside the new one are removed; a tail is kept.
        let inside: Vec<(u64, Extent)> = self
            .extents
            .range(offset..end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (start, old) in inside {
            self.extents.remove(&start);
            let old_end = start + old.length;
            if old_end > end {
                self.extents
                    .insert(end, advanced(old, end - start, old_end - end));
            }
        }
        self.extents.insert(offset, extent);
    }

    /// The pieces covering `[offset, offset + length)`, holes included, in order.
    pub fn lookup(&self, offset: u64, length: u64, out: &mut Vec<Piece>) {
        let end = offset + length;
        let mut cursor = offset;
        let first = self
            .extents
            .range(..=offset)
            .next_back()
            .filter(|(s, e)| *s + e.length > offset)
            .map(|(s, _)| *s)
            .unwrap_or(offset);
        for (&start, &extent) in self.extents.range(first..end) {
            if start > cursor {
                out.push(Piece {
                    offset: cursor,
                    length: start - cursor,
                    mapping: None,
                });
                cursor = start;
            }
            let piece_end = (start + extent.length).min(end);
            out.push(Piece {
                offset: cursor,
                length: piece_end - cursor,
                mapping: Some(advanced(extent, cursor - start, piece_end - cursor)),
            });
            cursor = piece_end;
        }
        if cursor < end {
            out.push(Piece {
                offset: cursor,
                length: end - cursor,
                mapping: None,
            });
        }
    }

    /// All extents in logical order, as (offset, extent).
    pub fn iter(&self) -> impl Iterator<Item = (u64, Extent)> + '_ {
        self.extents.iter().map(|(&s, &e)| (s, e))
    }
}

/// The file end of `length` sectors stored at `moffset`: zeroed sectors
/// occupy no file space.
pub fn mend(moffset: u64, length: u64, zeroed: bool) -> u64 {
    if zeroed {
        moffset
    } else {
        moffset + length
    }
}

/// `extent` advanced by `skip` sectors and cut to `length`. A zeroed
/// extent's `moffset` does not move: it stores nothing to skip over.
fn advanced(extent: Extent, skip: u64, length: u64) -> Extent {
    Extent {
        length,
        moffset: mend(extent.moffset, skip, extent.zeroed),
        ..extent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(length: u64, moffset: u64, layer: u8) -> Extent {
        Extent {
            length,
            moffset,
            zeroed: false,
            layer,
        }
    }

    #[test]
    fn entry_round_trip_and_bit_layout() {
        let e = Entry {
            offset: PADDING_OFFSET - 1,
            length: MAX_ENTRY_SECTORS,
            moffset: (1 << 55) - 1,
            zeroed: true,
        };
        assert_eq!(Entry::decode(&e.encode()), e);
        let padding = Entry::PADDING.encode();
        assert_eq!(hex_of(&padding), "ffffffffffff03000000000000000000");
        assert!(Entry::decode(&padding).is_padding());
    }

    #[test]
    fn tag_byte_is_ignored() {
        let mut bytes = Entry {
            offset: 5,
            length: 3,
            moffset: 9,
            zeroed: false,
        }
        .encode();
        bytes[15] = 0xAB;
        assert_eq!(Entry::decode(&bytes).moffset, 9);
        assert!(!Entry::decode(&bytes).zeroed);
    }

    #[test]
    fn insert_splits_and_hides() {
        let mut map = IntervalMap::new();
        map.insert(0, ext(100, 1000, 0));
        map.insert(10, ext(5, 50, 1));
        map.insert(90, ext(20, 70, 2));
        let mut pieces = Vec::new();
        map.lookup(0, 120, &mut pieces);
        let got: Vec<_> = pieces
            .iter()
            .map(|p| (p.offset, p.length, p.mapping.map(|m| (m.moffset, m.layer))))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 10, Some((1000, 0))),
                (10, 5, Some((50, 1))),
                (15, 75, Some((1015, 0))),
                (90, 20, Some((70, 2))),
                (110, 10, None),
            ]
        );
    }

    #[test]
    fn lookup_inside_one_extent_advances_moffset() {
        let mut map = IntervalMap::new();
        map.insert(100, ext(50, 8, 0));
        let mut pieces = Vec::new();
        map.lookup(120, 10, &mut pieces);
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].mapping.unwrap().moffset, 28);
        pieces.clear();
        map.lookup(0, 10, &mut pieces);
        assert_eq!(
            pieces,
            vec![Piece {
                offset: 0,
                length: 10,
                mapping: None
            }]
        );
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
