//! `commit` of an append-only writable layer, against a model of the
//! reference's rule built from nothing but a per-sector record of which
//! index entry last wrote or discarded each sector.
//!
//! The rule (spec §1, "Commit"): the layer's extents are copied in index
//! order, data in 32 KiB pieces; neighbouring entries merge when both their
//! logical and their file ranges continue each other, the kinds match and
//! the sum stays below 16383 sectors. A zeroed entry stores nothing, so its
//! end in the file is its own moffset: adjacent zeroed extents merge too.

use std::path::Path;

use overlaybd::lsmt::{CommitOptions, CreateOptions, WritableLayer};
use proptest::prelude::*;

const SECTOR: u64 = 512;
/// The reference records a write in entries of at most 8192 sectors and a
/// discard in entries of at most 16383.
const WRITE_ENTRY_SECTORS: u64 = 8192;
const DISCARD_ENTRY_SECTORS: u64 = 16383;
const COMMIT_PIECE_SECTORS: u64 = 64;
const MERGE_LIMIT: u64 = 16383;

/// (offset, length, moffset, zeroed), as in the committed index.
type RawEntry = (u64, u64, u64, bool);

#[derive(Clone, Debug)]
enum Op {
    Write { sector: u64, sectors: u64 },
    Discard { sector: u64, sectors: u64 },
}

/// What last touched a sector: the writable-index entry and the sector's
/// place inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner {
    entry: usize,
    within: u64,
    zeroed: bool,
}

/// The committed index the reference writes for `ops` on a `sectors`-long
/// device.
fn model_commit(sectors: u64, ops: &[Op]) -> Vec<RawEntry> {
    let mut owner: Vec<Option<Owner>> = vec![None; sectors as usize];
    let mut entry = 0usize;
    for op in ops {
        let (start, len, zeroed, per_entry) = match *op {
            Op::Write { sector, sectors } => (sector, sectors, false, WRITE_ENTRY_SECTORS),
            Op::Discard { sector, sectors } => (sector, sectors, true, DISCARD_ENTRY_SECTORS),
        };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(per_entry);
            for i in 0..n {
                owner[(start + done + i) as usize] = Some(Owner {
                    entry,
                    within: i,
                    zeroed,
                });
            }
            entry += 1;
            done += n;
        }
    }
    // Extents: runs of sectors continuing one entry.
    let mut extents: Vec<(u64, u64, bool)> = Vec::new();
    let mut previous: Option<Owner> = None;
    for (sector, o) in owner.iter().enumerate() {
        let continues = match (previous, o) {
            (Some(p), Some(o)) => p.entry == o.entry && p.within + 1 == o.within,
            _ => false,
        };
        match o {
            Some(o) if continues => extents.last_mut().expect("an open extent").1 += 1,
            Some(o) => extents.push((sector as u64, 1, o.zeroed)),
            None => {}
        }
        previous = *o;
    }
    // Pieces at their output positions, then the merge rule.
    let mut out: Vec<RawEntry> = Vec::new();
    let mut position = 8; // the 4 KiB header
    for (offset, length, zeroed) in extents {
        let piece = if zeroed { length } else { COMMIT_PIECE_SECTORS };
        let mut done = 0;
        while done < length {
            let n = (length - done).min(piece);
            let candidate = (offset + done, n, position, zeroed);
            let stored = if zeroed { 0 } else { n };
            match out.last_mut() {
                Some(last)
                    if last.0 + last.1 == candidate.0
                        && last.2 + if last.3 { 0 } else { last.1 } == candidate.2
                        && last.3 == zeroed
                        && last.1 + n < MERGE_LIMIT =>
                {
                    last.1 += n
                }
                _ => out.push(candidate),
            }
            position += stored;
            done += n;
        }
    }
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The non-padding entries of a committed file, decoded from the bit layout.
fn committed_entries(file: &[u8]) -> Vec<RawEntry> {
    let trailer = file.len() - 4096;
    let index_offset = u64_at(file, trailer + 32) as usize;
    let index_size = u64_at(file, trailer + 40) as usize;
    (0..index_size)
        .map(|i| {
            let w0 = u64_at(file, index_offset + 16 * i);
            let w1 = u64_at(file, index_offset + 16 * i + 8);
            (
                w0 & ((1 << 50) - 1),
                w0 >> 50,
                w1 & ((1 << 55) - 1),
                w1 & (1 << 55) != 0,
            )
        })
        .filter(|&(offset, length, _, _)| !(offset == (1 << 50) - 1 && length == 0))
        .collect()
}

/// Run `ops` on a fresh append-only layer, commit it and return its entries.
fn commit_of_ops(dir: &Path, sectors: u64, ops: &[Op]) -> Vec<RawEntry> {
    let options = CreateOptions {
        virtual_size: sectors * SECTOR,
        parent_uuid: None,
        sparse: false,
    };
    let layer =
        WritableLayer::create(&dir.join("w.data"), Some(&dir.join("w.index")), &options).unwrap();
    for op in ops {
        match *op {
            Op::Write { sector, sectors } => {
                let data = vec![0x5a; (sectors * SECTOR) as usize];
                layer.write(&data, sector * SECTOR).unwrap();
            }
            Op::Discard { sector, sectors } => {
                layer.discard(sector * SECTOR, sectors * SECTOR).unwrap()
            }
        }
    }
    let mut out = Vec::new();
    layer
        .commit(&mut out, &CommitOptions::default(), &mut |_| {})
        .unwrap();
    committed_entries(&out)
}

#[test]
fn adjacent_discards_commit_to_one_zeroed_entry() {
    // The spec's example: a write 0:4096, then discards 8192:4096 and
    // 12288:4096.
    let dir = tempfile::tempdir().unwrap();
    let ops = [
        Op::Write {
            sector: 0,
            sectors: 8,
        },
        Op::Discard {
            sector: 16,
            sectors: 8,
        },
        Op::Discard {
            sector: 24,
            sectors: 8,
        },
    ];
    let expected = vec![(0, 8, 8, false), (16, 16, 16, true)];
    assert_eq!(model_commit(64, &ops), expected);
    assert_eq!(commit_of_ops(dir.path(), 64, &ops), expected);
}

#[test]
fn a_write_inside_a_discard_keeps_both_zeroed_sides_at_their_moffset() {
    // Discard 0..64, then write 16..24: the zeroed pieces 0..16 and 24..64
    // sit around the data, each at the output position where it falls.
    let dir = tempfile::tempdir().unwrap();
    let ops = [
        Op::Discard {
            sector: 0,
            sectors: 64,
        },
        Op::Write {
            sector: 16,
            sectors: 8,
        },
    ];
    let expected = vec![(0, 16, 8, true), (16, 8, 8, false), (24, 40, 16, true)];
    assert_eq!(model_commit(64, &ops), expected);
    assert_eq!(commit_of_ops(dir.path(), 64, &ops), expected);
}

fn op(sectors: u64) -> impl Strategy<Value = Op> {
    let write = (0..sectors, 1u64..=2048).prop_map(move |(sector, len)| Op::Write {
        sector,
        sectors: len.min(sectors - sector),
    });
    // Discards long enough to reach the 16383-sector entry limit.
    let discard = (0..sectors, 1u64..=40_000).prop_map(move |(sector, len)| Op::Discard {
        sector,
        sectors: len.min(sectors - sector),
    });
    // Short discards next to each other are what the zeroed rule is about.
    let short_discard = (0..sectors / 8, 1u64..=4).prop_map(move |(unit, len)| Op::Discard {
        sector: unit * 8,
        sectors: (len * 8).min(sectors - unit * 8),
    });
    prop_oneof![2 => write, 1 => discard, 2 => short_discard]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn commit_matches_the_reference_rule(ops in prop::collection::vec(op(65_536), 1..24)) {
        let dir = tempfile::tempdir().unwrap();
        let sectors = 65_536; // 32 MiB
        prop_assert_eq!(commit_of_ops(dir.path(), sectors, &ops), model_commit(sectors, &ops));
    }
}
