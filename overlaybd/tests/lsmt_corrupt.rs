//! Damaged and hostile LSMT files: every broken committed or writable layer
//! must be refused with an error (never a panic) that names the file and the
//! problem; a torn last index entry and old files with garbage in unused
//! header bits must still open; misaligned and out-of-range I/O are clear
//! errors that change nothing.

mod common;
mod proptest_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{sha256_hex, ReferenceVectors};
use overlaybd::io::{Bytes, LocalFile};
use overlaybd::lsmt::{CommitOptions, CreateOptions, ReadOnlyLayer, WritableLayer};
use overlaybd::stack::Stack;
use proptest::prelude::*;
use proptest_support::config;

const HT: usize = 4096;
const MIB: u64 = 1 << 20;
/// Offsets inside the 390-byte header struct.
const FLAGS: usize = 28;
const INDEX_OFFSET: usize = 32;
const INDEX_SIZE: usize = 40;
const VIRTUAL_SIZE: usize = 48;

// ---------------------------------------------------------------------------
// Byte helpers

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn map_u32(b: &mut [u8], at: usize, f: impl FnOnce(u32) -> u32) {
    let v = f(u32_at(b, at));
    put_u32(b, at, v);
}

fn trailer(b: &[u8]) -> usize {
    b.len() - HT
}

/// Byte position of committed-index entry `i`.
fn entry_pos(b: &[u8], i: usize) -> usize {
    u64_at(b, trailer(b) + INDEX_OFFSET) as usize + 16 * i
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ent {
    offset: u64,
    length: u64,
    moffset: u64,
    zeroed: bool,
}

fn get_ent(b: &[u8], pos: usize) -> Ent {
    let w0 = u64_at(b, pos);
    let w1 = u64_at(b, pos + 8);
    Ent {
        offset: w0 & ((1 << 50) - 1),
        length: w0 >> 50,
        moffset: w1 & ((1 << 55) - 1),
        zeroed: w1 & (1 << 55) != 0,
    }
}

fn put_ent(b: &mut [u8], pos: usize, e: Ent) {
    assert!(e.length < 1 << 14 && e.offset < 1 << 50 && e.moffset < 1 << 55);
    put_u64(b, pos, e.offset | (e.length << 50));
    put_u64(b, pos + 8, e.moffset | if e.zeroed { 1 << 55 } else { 0 });
}

/// Non-padding entries of a committed file, with their entry numbers.
fn committed_entries(b: &[u8]) -> Vec<(usize, Ent)> {
    let n = u64_at(b, trailer(b) + INDEX_SIZE) as usize;
    (0..n)
        .map(|i| (i, get_ent(b, entry_pos(b, i))))
        .filter(|(_, e)| !(e.offset == (1 << 50) - 1 && e.length == 0))
        .collect()
}

fn edit(base: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = base.to_vec();
    f(&mut b);
    b
}

/// A deterministic byte stream (splitmix64).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut state = seed;
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------
// Layers to damage

/// A small writable layer (1 MiB) with four extents, one of them zeroed:
/// committed entries {0,16,8}, {32,8,zeroed}, {128,32,24}, {1024,128,56}.
fn small_writable(dir: &Path, name: &str) -> (PathBuf, PathBuf, WritableLayer) {
    let data = dir.join(format!("{name}.data"));
    let index = dir.join(format!("{name}.index"));
    let layer = WritableLayer::create(
        &data,
        Some(&index),
        &CreateOptions {
            virtual_size: MIB,
            parent_uuid: None,
            sparse: false,
        },
    )
    .unwrap();
    layer.write(&noise(1, 8192), 0).unwrap();
    layer.discard(16 * 1024, 4096).unwrap();
    layer.write(&noise(2, 16 * 1024), 64 * 1024).unwrap();
    layer.write(&noise(3, 64 * 1024), 512 * 1024).unwrap();
    layer.flush().unwrap();
    (data, index, layer)
}

fn small_committed(dir: &Path) -> Vec<u8> {
    let (_, _, layer) = small_writable(dir, "small-source");
    let mut out = Vec::new();
    layer
        .commit(&mut out, &CommitOptions::default(), &mut |_| {})
        .unwrap();
    out
}

fn open_ro(path: &Path) -> overlaybd::Result<ReadOnlyLayer> {
    ReadOnlyLayer::open(Arc::new(LocalFile::open(path).unwrap()))
}

/// Reads the whole device of a one-layer stack.
fn read_all(stack: &Stack) -> Vec<u8> {
    let mut buf = vec![0u8; stack.virtual_size() as usize];
    stack.read(&mut buf, 0).unwrap();
    buf
}

/// `err` names `file` and, apart from that name, mentions every needle.
fn assert_names(err: &str, file: &str, needles: &[&str], what: &str) {
    assert!(
        err.contains(file),
        "{what}: error '{err}' does not name {file}"
    );
    assert_mentions(&err.replace(file, "<file>"), needles, what);
}

fn assert_mentions(err: &str, needles: &[&str], what: &str) {
    let lower = err.to_lowercase();
    for n in needles {
        assert!(
            lower.contains(&n.to_lowercase()),
            "{what}: error '{err}' does not mention '{n}'"
        );
    }
}

// ---------------------------------------------------------------------------
// Committed layers

/// Damaged copies of a committed layer file, each with the words its error
/// must contain.
fn committed_damage(base: &[u8]) -> Vec<(String, Vec<u8>, Vec<&'static str>)> {
    let size = base.len();
    let t = trailer(base);
    let index_offset = u64_at(base, t + INDEX_OFFSET);
    let index_size = u64_at(base, t + INDEX_SIZE);
    let data_end_sector = index_offset / 512;
    let entries = committed_entries(base);
    let (first_data, first) = *entries.iter().find(|(_, e)| !e.zeroed).unwrap();
    let (second_i, _) = entries[1];
    let (long_i, long) = *entries.iter().find(|(_, e)| e.length > 1).unwrap();
    let next_after_long = entries.iter().find(|(i, _)| *i > long_i).unwrap().0;
    let mut cases: Vec<(String, Vec<u8>, Vec<&'static str>)> = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>, needles: &[&'static str]| {
        cases.push((name.to_string(), bytes, needles.to_vec()));
    };

    for len in [0, 1, 511, 4095, 4096, 8191] {
        add(
            &format!("truncated-to-{len}"),
            base[..len].to_vec(),
            &["too small"],
        );
    }
    for len in [8192, size - HT, size - 512, size - 1] {
        add(
            &format!("truncated-to-{len}"),
            base[..len].to_vec(),
            &["trailer"],
        );
    }
    add(
        "one-data-sector-cut-out",
        [&base[..HT], &base[HT + 512..]].concat(),
        &["index", "does not fit"],
    );
    add(
        "header-bad-magic0",
        edit(base, |b| b[0] ^= 0x20),
        &["bad magic"],
    );
    add(
        "header-bad-magic1",
        edit(base, |b| b[20] ^= 0x01),
        &["bad magic"],
    );
    add(
        "header-not-a-data-file",
        edit(base, |b| map_u32(b, FLAGS, |f| f & !2)),
        &["header"],
    );
    add(
        "header-is-a-trailer",
        edit(base, |b| map_u32(b, FLAGS, |f| f & !1)),
        &["header"],
    );
    add(
        "trailer-bad-magic0",
        edit(base, |b| b[t + 3] ^= 0xFF),
        &["trailer"],
    );
    add(
        "trailer-bad-magic1",
        edit(base, |b| b[t + 23] ^= 0x80),
        &["trailer"],
    );
    add(
        "trailer-not-sealed",
        edit(base, |b| map_u32(b, t + FLAGS, |f| f & !4)),
        &["sealed"],
    );
    add(
        "trailer-is-a-header",
        edit(base, |b| map_u32(b, t + FLAGS, |f| f | 1)),
        &["trailer"],
    );
    add(
        "trailer-not-a-data-file",
        edit(base, |b| map_u32(b, t + FLAGS, |f| f & !2)),
        &["trailer"],
    );
    for (name, n) in [
        ("index-size-1000001", 1_000_001u64),
        ("index-size-2^60", 1 << 60),
        ("index-size-overflows-x16", u64::MAX / 16 + 1),
        ("index-size-u64-max", u64::MAX),
    ] {
        add(
            name,
            edit(base, |b| put_u64(b, t + INDEX_SIZE, n)),
            &["index_size", "1000000"],
        );
    }
    add(
        "index-runs-into-trailer",
        edit(base, |b| put_u64(b, t + INDEX_SIZE, index_size + 1)),
        &["index", "does not fit"],
    );
    add(
        "index-size-1000000-past-trailer",
        edit(base, |b| put_u64(b, t + INDEX_SIZE, 1_000_000)),
        &["index", "does not fit"],
    );
    add(
        "index-offset-past-trailer",
        edit(base, |b| put_u64(b, t + INDEX_OFFSET, t as u64)),
        &["index", "does not fit"],
    );
    add(
        "index-offset-one-sector-late",
        edit(base, |b| put_u64(b, t + INDEX_OFFSET, index_offset + 512)),
        &["index", "does not fit"],
    );
    add(
        "index-offset-in-header",
        edit(base, |b| put_u64(b, t + INDEX_OFFSET, 0)),
        &["index", "does not fit"],
    );
    for (name, off) in [
        ("index-offset-u64-max-aligned", u64::MAX - 511),
        ("index-offset-2^63", 1 << 63),
    ] {
        add(
            name,
            edit(base, |b| {
                put_u64(b, t + INDEX_OFFSET, off);
                put_u64(b, t + INDEX_SIZE, 1_000_000);
            }),
            &["index", "does not fit"],
        );
    }
    for (name, off) in [
        ("index-offset-misaligned-8", index_offset + 8),
        ("index-offset-misaligned-minus-16", index_offset - 16),
        ("index-offset-4097", 4097),
    ] {
        add(
            name,
            edit(base, |b| put_u64(b, t + INDEX_OFFSET, off)),
            &["index_offset", "512"],
        );
    }
    add(
        "entries-swapped",
        edit(base, |b| {
            let (p0, p1) = (entry_pos(b, entries[0].0), entry_pos(b, second_i));
            let (e0, e1) = (get_ent(b, p0), get_ent(b, p1));
            put_ent(b, p0, e1);
            put_ent(b, p1, e0);
        }),
        &["out of order"],
    );
    add(
        "entry-overlaps-previous",
        edit(base, |b| {
            let p = entry_pos(b, next_after_long);
            let mut e = get_ent(b, p);
            e.offset = long.offset + long.length - 1;
            put_ent(b, p, e);
        }),
        &["overlaps"],
    );
    add(
        "entry-starts-at-previous-start",
        edit(base, |b| {
            let p = entry_pos(b, next_after_long);
            let mut e = get_ent(b, p);
            e.offset = long.offset;
            e.length = 1;
            put_ent(b, p, e);
        }),
        &["overlaps"],
    );
    let data_entry = |moffset: u64, length: u64| {
        edit(base, |b| {
            let p = entry_pos(b, first_data);
            put_ent(
                b,
                p,
                Ent {
                    moffset,
                    length,
                    ..first
                },
            );
        })
    };
    add(
        "moffset-0",
        data_entry(0, first.length),
        &["outside the data area"],
    );
    add(
        "moffset-7",
        data_entry(7, first.length),
        &["outside the data area"],
    );
    add(
        "entry-end-one-past-index",
        data_entry(data_end_sector - first.length + 1, first.length),
        &["outside the data area"],
    );
    add(
        "entry-at-index-offset",
        data_entry(data_end_sector, 1),
        &["outside the data area"],
    );
    add(
        "moffset-2^55-1-length-16383",
        data_entry((1 << 55) - 1, 16383),
        &["outside the data area"],
    );
    add(
        "length-16383-past-index",
        data_entry(8.max(data_end_sector.saturating_sub(16382)), 16383),
        &["outside the data area"],
    );
    cases
}

fn check_committed_damage(dir: &Path, base_name: &str, base: &[u8]) {
    // The undamaged file opens (so each case fails for its own reason).
    let good = dir.join(format!("{base_name}-undamaged.lsmt"));
    std::fs::write(&good, base).unwrap();
    open_ro(&good).unwrap();
    let cases = committed_damage(base);
    assert!(cases.len() > 40);
    for (name, bytes, needles) in cases {
        let path = dir.join(format!("{base_name}-{name}.lsmt"));
        std::fs::write(&path, &bytes).unwrap();
        let what = format!("{base_name} {name}");
        let err = match open_ro(&path) {
            Ok(_) => panic!("{what}: a damaged layer opened"),
            Err(e) => e.to_string(),
        };
        assert_names(&err, &path.display().to_string(), &needles, &what);
        // The same bytes from memory: same verdict, named after the source.
        let name_in_memory = format!("memory:{base_name}-{name}");
        let err = match ReadOnlyLayer::open(Arc::new(Bytes::new(bytes, name_in_memory.clone()))) {
            Ok(_) => panic!("{what}: a damaged layer opened from memory"),
            Err(e) => e.to_string(),
        };
        assert_names(&err, &name_in_memory, &needles, &what);
    }
}

#[test]
fn damaged_small_committed_layer_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let base = small_committed(dir.path());
    let entries: Vec<Ent> = committed_entries(&base).into_iter().map(|e| e.1).collect();
    assert_eq!(entries.len(), 4);
    assert!(entries[1].zeroed);
    check_committed_damage(dir.path(), "small", &base);
}

#[test]
fn damaged_reference_layer0_is_refused_with_a_clear_error() {
    let v = ReferenceVectors::unpack();
    let base = std::fs::read(v.path("layer0.lsmt")).unwrap();
    check_committed_damage(v.dir.path(), "layer0", &base);
}

#[test]
fn writable_files_are_not_committed_layers() {
    let v = ReferenceVectors::unpack();
    for (name, needle) in [("layer0.data", "trailer"), ("layer0.index", "too small")] {
        let path = v.path(name);
        let err = open_ro(&path).err().expect("refused").to_string();
        assert_names(&err, &path.display().to_string(), &[needle], name);
    }
}

#[test]
fn huge_virtual_size_and_far_entries_do_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base = small_committed(dir.path());
    let t = trailer(&base);
    // Virtual size u64::MAX (not even sector-aligned), and a zeroed entry at
    // the very end of the 50-bit offset space: valid as far as the format
    // goes, so they open; reads near the end must not overflow.
    let bytes = edit(&base, |b| {
        put_u64(b, t + VIRTUAL_SIZE, u64::MAX);
        let last = committed_entries(b).last().unwrap().0;
        let pos = entry_pos(b, last + 1);
        put_ent(
            b,
            pos,
            Ent {
                offset: (1 << 50) - 16384,
                length: 16383,
                moffset: (1 << 55) - 1,
                zeroed: true,
            },
        );
    });
    let layer = ReadOnlyLayer::open(Arc::new(Bytes::new(bytes, "huge"))).unwrap();
    let stack = Stack::new(vec![layer], None).unwrap();
    assert_eq!(stack.virtual_size(), u64::MAX);
    let mut buf = vec![1u8; 4096];
    for at in [0, ((1u64 << 50) - 16384) * 512, (u64::MAX - 511) - 4096] {
        stack.read(&mut buf, at).unwrap();
    }
    let err = stack
        .read(&mut buf, u64::MAX - 511)
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["passes the end"], "read past u64::MAX");
}

// ---------------------------------------------------------------------------
// Garbage in unused header bits and padding (old files)

/// Set flag bits 5..31 and fill bytes 390..4096 of the block at `at`.
fn dirty_block(b: &mut [u8], at: usize, seed: u64) {
    let flags = u32_at(b, at + FLAGS) | 0xFFFF_FFE0;
    put_u32(b, at + FLAGS, flags);
    b[at + 390..at + HT].copy_from_slice(&noise(seed, HT - 390));
}

/// Random `tag` bytes (bits 56..63 of word1) in every entry of `b[from..to]`.
fn dirty_tags(b: &mut [u8], from: usize, to: usize, seed: u64) {
    let tags = noise(seed, (to - from) / 16);
    for (i, tag) in tags.into_iter().enumerate() {
        b[from + 16 * i + 15] = tag;
    }
}

fn assert_reference_hashes(v: &ReferenceVectors, stack: &Stack, what: &str) {
    let expected = v.stack_sha256_per_mib(0);
    let mut buf = vec![0u8; MIB as usize];
    for (mib, want) in expected.iter().enumerate() {
        stack.read(&mut buf, mib as u64 * MIB).unwrap();
        assert_eq!(&sha256_hex(&buf), want, "{what}, MiB {mib}");
    }
}

#[test]
fn committed_layer_with_garbage_in_unused_bits_reads_the_same() {
    let v = ReferenceVectors::unpack();
    let base = std::fs::read(v.path("layer0.lsmt")).unwrap();
    let t = trailer(&base);
    let dirty = edit(&base, |b| {
        dirty_block(b, 0, 11);
        dirty_block(b, t, 12);
        let from = u64_at(b, t + INDEX_OFFSET) as usize;
        dirty_tags(b, from, t, 13);
    });
    assert_ne!(dirty, base);
    let path = v.dir.path().join("layer0-dirty.lsmt");
    std::fs::write(&path, &dirty).unwrap();
    let clean = open_ro(&v.path("layer0.lsmt")).unwrap();
    let layer = open_ro(&path).unwrap();
    assert_eq!(layer.entries, clean.entries);
    assert_eq!(layer.trailer.virtual_size, 1 << 30);
    let stack = Stack::new(vec![layer], None).unwrap();
    assert_reference_hashes(&v, &stack, "dirty layer0.lsmt");
}

#[test]
fn writable_layer_with_garbage_in_unused_bits_reads_and_commits_the_same() {
    let v = ReferenceVectors::unpack();
    let data = edit(&std::fs::read(v.path("layer0.data")).unwrap(), |b| {
        dirty_block(b, 0, 21)
    });
    let index = edit(&std::fs::read(v.path("layer0.index")).unwrap(), |b| {
        dirty_block(b, 0, 22);
        let end = b.len();
        dirty_tags(b, HT, end, 23);
    });
    let data_path = v.dir.path().join("dirty.data");
    let index_path = v.dir.path().join("dirty.index");
    std::fs::write(&data_path, &data).unwrap();
    std::fs::write(&index_path, &index).unwrap();
    let layer = WritableLayer::open(&data_path, Some(&index_path), false).unwrap();
    assert!(!layer.is_sparse());
    let options = CommitOptions {
        uuid: v.layer_str(0, "uuid"),
        parent_uuid: v.layer_str(0, "parent_uuid"),
        message: "layer 0".into(),
    };
    let mut out = Vec::new();
    layer.commit(&mut out, &options, &mut |_| {}).unwrap();
    let reference = std::fs::read(v.path("layer0.lsmt")).unwrap();
    assert!(out == reference, "commit of the dirty files differs");
    let stack = Stack::new(Vec::new(), Some(Arc::new(layer))).unwrap();
    assert_reference_hashes(&v, &stack, "dirty layer0.data/index");
}

// ---------------------------------------------------------------------------
// Writable layers

/// Write `data` and `index` to files named after `case`, open them, and
/// check the error names `blame` (data or index) and mentions `needles`.
fn expect_writable_err(
    dir: &Path,
    case: &str,
    data: &[u8],
    index: &[u8],
    blame_index: bool,
    needles: &[&str],
) {
    let data_path = dir.join(format!("{case}.data"));
    let index_path = dir.join(format!("{case}.index"));
    std::fs::write(&data_path, data).unwrap();
    std::fs::write(&index_path, index).unwrap();
    let err = match WritableLayer::open(&data_path, Some(&index_path), true) {
        Ok(_) => panic!("{case}: a damaged writable layer opened"),
        Err(e) => e.to_string(),
    };
    let blamed = if blame_index { &index_path } else { &data_path };
    assert_names(&err, &blamed.display().to_string(), needles, case);
}

fn writable_damage(dir: &Path, base_name: &str, data: &[u8], index: &[u8]) {
    let with_entry = |e: Ent| {
        let mut b = index.to_vec();
        b.extend_from_slice(&[0; 16]);
        let at = b.len() - 16;
        put_ent(&mut b, at, e);
        b
    };
    let case = |name: &str| format!("{base_name}-{name}");
    // The undamaged pair opens.
    let (d, i) = (dir.join(case("ok.data")), dir.join(case("ok.index")));
    std::fs::write(&d, data).unwrap();
    std::fs::write(&i, index).unwrap();
    WritableLayer::open(&d, Some(&i), false).unwrap();

    // Index file.
    let bad_magic = edit(index, |b| b[2] ^= 0x40);
    expect_writable_err(
        dir,
        &case("index-bad-magic"),
        data,
        &bad_magic,
        true,
        &["bad magic"],
    );
    for len in [0, 100, 390, 4095] {
        expect_writable_err(
            dir,
            &case(&format!("index-len-{len}")),
            data,
            &index[..len],
            true,
            &["too short"],
        );
    }
    for (name, flags) in [
        ("index-flags-data", 3u32),
        ("index-flags-trailer", 0),
        ("index-flags-committed", 7),
    ] {
        expect_writable_err(
            dir,
            &case(name),
            data,
            &edit(index, |b| put_u32(b, FLAGS, flags)),
            true,
            &["index file"],
        );
    }
    // An entry pointing into the data file's header. (One pointing past
    // its end is a write lost in a crash: writable_recovery.rs.)
    let in_header = Ent {
        offset: 0,
        length: 8,
        moffset: 4,
        zeroed: false,
    };
    expect_writable_err(
        dir,
        &case("entry-in-data-file-header"),
        data,
        &with_entry(in_header),
        true,
        &["header"],
    );
    // Data file.
    expect_writable_err(
        dir,
        &case("data-bad-magic"),
        &edit(data, |b| b[9] ^= 0x01),
        index,
        false,
        &["bad magic"],
    );
    for len in [0, 390, 4095] {
        expect_writable_err(
            dir,
            &case(&format!("data-len-{len}")),
            &data[..len],
            index,
            false,
            &["too short"],
        );
    }
    for (name, flags) in [
        ("data-flags-index", 1u32),
        ("data-flags-trailer", 6),
        ("data-flags-zero", 0),
    ] {
        expect_writable_err(
            dir,
            &case(name),
            &edit(data, |b| put_u32(b, FLAGS, flags)),
            index,
            false,
            &["header flags"],
        );
    }
    // A plain data file claiming to be sparse has the wrong size for it.
    expect_writable_err(
        dir,
        &case("data-flags-sparse"),
        &edit(data, |b| put_u32(b, FLAGS, 0x13)),
        index,
        false,
        &["sparse", "expected"],
    );
}

#[test]
fn damaged_writable_layers_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (data, index, layer) = small_writable(dir.path(), "small");
    drop(layer);
    let data = std::fs::read(data).unwrap();
    let index = std::fs::read(index).unwrap();
    writable_damage(dir.path(), "small", &data, &index);

    let v = ReferenceVectors::unpack();
    let data = std::fs::read(v.path("layer0.data")).unwrap();
    let index = std::fs::read(v.path("layer0.index")).unwrap();
    writable_damage(v.dir.path(), "layer0", &data, &index);
}

#[test]
fn sparse_file_of_the_wrong_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.data");
    let layer = WritableLayer::create(
        &path,
        None,
        &CreateOptions {
            virtual_size: MIB,
            parent_uuid: None,
            sparse: true,
        },
    )
    .unwrap();
    layer.write(&noise(1, 4096), 8192).unwrap();
    drop(layer);
    for size in [HT as u64, MIB, MIB + HT as u64 + 512, 2 * MIB] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(size)
            .unwrap();
        let err = WritableLayer::open(&path, None, true)
            .err()
            .expect("refused")
            .to_string();
        assert_names(
            &err,
            &path.display().to_string(),
            &["sparse", "expected"],
            &format!("sparse file of {size} bytes"),
        );
    }
    // A plain writable layer without its index file.
    let plain = dir.path().join("plain.data");
    let (data, _, layer) = small_writable(dir.path(), "plain");
    drop(layer);
    let err = WritableLayer::open(&data, None, true)
        .err()
        .expect("refused")
        .to_string();
    assert_names(
        &err,
        &plain.display().to_string(),
        &["index file"],
        "no index",
    );
}

/// A crash while appending leaves a partial entry at the end of the index
/// file: it is ignored, and the next append overwrites it.
fn check_torn(dir: &Path, name: &str, data: &[u8], index: &[u8], check: impl Fn(&Stack)) {
    assert_eq!((index.len() - HT) % 16, 0);
    let whole = (index.len() - HT) / 16;
    for torn in [1usize, 8, 15] {
        let data_path = dir.join(format!("{name}-torn{torn}.data"));
        let index_path = dir.join(format!("{name}-torn{torn}.index"));
        std::fs::write(&data_path, data).unwrap();
        let mut bytes = index.to_vec();
        bytes.extend_from_slice(&noise(torn as u64, torn));
        std::fs::write(&index_path, &bytes).unwrap();

        let layer = Arc::new(WritableLayer::open(&data_path, Some(&index_path), true).unwrap());
        let stack = Stack::new(Vec::new(), Some(layer.clone())).unwrap();
        check(&stack);
        // Append one write; the torn bytes are overwritten, not kept.
        let fresh = noise(100 + torn as u64, 4096);
        stack.write(&fresh, 3 * 4096).unwrap();
        stack.flush().unwrap();
        drop(stack);
        drop(layer);
        let len = std::fs::metadata(&index_path).unwrap().len() as usize;
        assert_eq!(len, HT + 16 * (whole + 1), "{name}: torn {torn}");
        let after = std::fs::read(&index_path).unwrap();
        assert_eq!(&after[..index.len()], index);
        let e = get_ent(&after, HT + 16 * whole);
        assert_eq!((e.offset, e.length, e.zeroed), (24, 8, false));

        let layer = WritableLayer::open(&data_path, Some(&index_path), false).unwrap();
        let stack = Stack::new(Vec::new(), Some(Arc::new(layer))).unwrap();
        let mut buf = vec![0u8; 4096];
        stack.read(&mut buf, 3 * 4096).unwrap();
        assert_eq!(buf, fresh, "{name}: torn {torn}: the new write reads back");
    }
}

#[test]
fn torn_last_index_entry_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (data_path, index_path, layer) = small_writable(dir.path(), "small");
    let stack = Stack::new(Vec::new(), Some(Arc::new(layer))).unwrap();
    let expected = read_all(&stack);
    drop(stack);
    let data = std::fs::read(&data_path).unwrap();
    let index = std::fs::read(&index_path).unwrap();
    check_torn(dir.path(), "small", &data, &index, |stack| {
        assert!(
            read_all(stack) == expected,
            "torn small layer reads the same"
        );
    });

    let v = ReferenceVectors::unpack();
    let data = std::fs::read(v.path("layer0.data")).unwrap();
    let index = std::fs::read(v.path("layer0.index")).unwrap();
    check_torn(v.dir.path(), "layer0", &data, &index, |stack| {
        assert_reference_hashes(&v, stack, "torn layer0");
    });
}

// ---------------------------------------------------------------------------
// Misaligned and out-of-range I/O

#[test]
fn misaligned_and_out_of_range_io_is_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for sparse in [false, true] {
        let data_path = dir.path().join(format!("io-{sparse}.data"));
        let index_path = dir.path().join(format!("io-{sparse}.index"));
        let layer = Arc::new(
            WritableLayer::create(
                &data_path,
                (!sparse).then_some(index_path.as_path()),
                &CreateOptions {
                    virtual_size: MIB,
                    parent_uuid: None,
                    sparse,
                },
            )
            .unwrap(),
        );
        layer.write(&noise(5, 8192), 4096).unwrap();
        let stack = Stack::new(Vec::new(), Some(layer.clone())).unwrap();
        let before = read_all(&stack);
        let sizes = || {
            (
                std::fs::metadata(&data_path).unwrap().len(),
                std::fs::metadata(&index_path).map(|m| m.len()).ok(),
            )
        };
        let sizes_before = sizes();
        let name = data_path.display().to_string();
        let buf = vec![7u8; 1024];
        let misaligned: [(u64, usize); 4] = [(1, 512), (256, 512), (0, 100), (512, 513)];
        for (off, len) in misaligned {
            let what = format!("sparse {sparse}: {off}+{len}");
            let e = layer.write(&buf[..len], off).unwrap_err().to_string();
            assert_names(&e, &name, &["aligned"], &what);
            let e = layer.discard(off, len as u64).unwrap_err().to_string();
            assert_names(&e, &name, &["aligned"], &what);
            let e = stack.write(&buf[..len], off).unwrap_err().to_string();
            assert_mentions(&e, &["aligned"], &what);
            let e = stack.discard(off, len as u64).unwrap_err().to_string();
            assert_mentions(&e, &["aligned"], &what);
            let mut out = vec![0u8; len];
            let e = stack.read(&mut out, off).unwrap_err().to_string();
            assert_mentions(&e, &["aligned"], &what);
            let e = stack
                .plan(off, len as u64, &mut Vec::new())
                .unwrap_err()
                .to_string();
            assert_mentions(&e, &["aligned"], &what);
        }
        let out_of_range: [(u64, usize); 4] = [
            (MIB, 512),
            (MIB - 512, 1024),
            (1 << 40, 512),
            (u64::MAX - 511, 1024),
        ];
        for (off, len) in out_of_range {
            let what = format!("sparse {sparse}: {off}+{len}");
            let e = layer.write(&buf[..len], off).unwrap_err().to_string();
            assert_names(&e, &name, &["passes the virtual size"], &what);
            let e = layer.discard(off, len as u64).unwrap_err().to_string();
            assert_names(&e, &name, &["passes the virtual size"], &what);
            let e = stack.write(&buf[..len], off).unwrap_err().to_string();
            assert_mentions(&e, &["passes the end"], &what);
            let e = stack.discard(off, len as u64).unwrap_err().to_string();
            assert_mentions(&e, &["passes the end"], &what);
            let mut out = vec![0u8; len];
            let e = stack.read(&mut out, off).unwrap_err().to_string();
            assert_mentions(&e, &["passes the end"], &what);
        }
        // Nothing was written, appended or punched.
        assert_eq!(sizes(), sizes_before, "sparse {sparse}");
        assert!(read_all(&stack) == before, "sparse {sparse}");
        drop(stack);
        drop(layer);
        let index = (!sparse).then_some(index_path.as_path());
        let reopened = WritableLayer::open(&data_path, index, false).unwrap();
        let stack = Stack::new(Vec::new(), Some(Arc::new(reopened))).unwrap();
        assert!(read_all(&stack) == before, "sparse {sparse}, reopened");
    }
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // (0 is allowed: the size of the layers below, taken when stacked.)
    for (vsize, sparse) in [
        (513u64, false),
        (1000, false),
        (1000, true),
        (MIB + 1, true),
    ] {
        let data = dir.path().join(format!("v{vsize}-{sparse}.data"));
        let index = dir.path().join(format!("v{vsize}-{sparse}.index"));
        let e = WritableLayer::create(
            &data,
            (!sparse).then_some(index.as_path()),
            &CreateOptions {
                virtual_size: vsize,
                parent_uuid: None,
                sparse,
            },
        )
        .err()
        .expect("refused")
        .to_string();
        assert_mentions(&e, &["virtual size", &vsize.to_string()], "create");
    }
    // A read-only stack refuses writes.
    let base = small_committed(dir.path());
    let layer = ReadOnlyLayer::open(Arc::new(Bytes::new(base.clone(), "ro"))).unwrap();
    let stack = Stack::new(vec![layer], None).unwrap();
    let e = stack.write(&[0u8; 512], 0).unwrap_err().to_string();
    assert_mentions(&e, &["read-only"], "write to a read-only stack");
    // At most 255 layers.
    let lowers: Vec<_> = (0..256)
        .map(|i| ReadOnlyLayer::open(Arc::new(Bytes::new(base.clone(), format!("l{i}")))).unwrap())
        .collect();
    let e = Stack::new(lowers, None).err().expect("refused").to_string();
    assert_mentions(&e, &["256", "255"], "256 layers");
    // A commit message must fit user_tag.
    let (_, _, layer) = small_writable(dir.path(), "msg");
    let options = CommitOptions {
        message: "m".repeat(256),
        ..CommitOptions::default()
    };
    let e = layer
        .commit(&mut Vec::new(), &options, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert_mentions(&e, &["commit message", "256"], "long message");
}

// ---------------------------------------------------------------------------
// Random damage never panics

fn small_base() -> &'static [u8] {
    static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        small_committed(dir.path())
    })
}

fn small_writable_files() -> &'static (Vec<u8>, Vec<u8>) {
    static FILES: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (data, index, layer) = small_writable(dir.path(), "w");
        drop(layer);
        (std::fs::read(data).unwrap(), std::fs::read(index).unwrap())
    })
}

/// Positions worth damaging: the header/trailer structs and the index.
fn committed_target() -> impl Strategy<Value = (usize, u8)> {
    let b = small_base();
    let t = trailer(b);
    let index = u64_at(b, t + INDEX_OFFSET) as usize;
    (
        prop_oneof![0..64usize, index..index + 64, t..t + 64],
        any::<u8>(),
    )
}

proptest! {
    #![proptest_config(config(256))]

    /// XOR random bytes into a committed layer's header, index and trailer:
    /// open either refuses with an error naming the source, or the layer
    /// reads (and every read stays inside the file).
    #[test]
    fn random_damage_to_a_committed_layer_never_panics(
        damage in prop::collection::vec(committed_target(), 1..6)
    ) {
        let mut bytes = small_base().to_vec();
        for &(at, x) in &damage {
            bytes[at] ^= x;
        }
        match ReadOnlyLayer::open(Arc::new(Bytes::new(bytes, "fuzzed.lsmt"))) {
            Err(e) => prop_assert!(e.to_string().contains("fuzzed.lsmt"), "{}", e),
            Ok(layer) => {
                if let Ok(stack) = Stack::new(vec![layer], None) {
                    let size = stack.virtual_size().min(2 * MIB) & !511;
                    let mut buf = vec![0u8; size as usize];
                    // Ok or Err, but no panic.
                    let _ = stack.read(&mut buf, 0);
                }
            }
        }
    }

    /// The same for a writable layer's index file (header and entries).
    #[test]
    fn random_damage_to_a_writable_index_never_panics(
        damage in prop::collection::vec(
            (prop_oneof![0..64usize, HT..HT + 4 * 16], any::<u8>()),
            1..6,
        )
    ) {
        let (data, index) = small_writable_files();
        let mut index = index.clone();
        for &(at, x) in &damage {
            index[at] ^= x;
        }
        let dir = tempfile::tempdir().unwrap();
        let data_path = dir.path().join("fuzzed.data");
        let index_path = dir.path().join("fuzzed.index");
        std::fs::write(&data_path, data).unwrap();
        std::fs::write(&index_path, &index).unwrap();
        match WritableLayer::open(&data_path, Some(&index_path), false) {
            Err(e) => prop_assert!(e.to_string().contains("fuzzed."), "{}", e),
            Ok(layer) => {
                let mut out = Vec::new();
                let _ = layer.commit(&mut out, &CommitOptions::default(), &mut |_| {});
                if let Ok(stack) = Stack::new(Vec::new(), Some(Arc::new(layer))) {
                    let size = stack.virtual_size().min(2 * MIB) & !511;
                    let mut buf = vec![0u8; size as usize];
                    let _ = stack.read(&mut buf, 0);
                }
            }
        }
    }
}

#[test]
fn writable_entry_at_the_end_of_the_offset_space_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (data_path, index_path, layer) = small_writable(dir.path(), "far");
    drop(layer);
    // A damaged entry whose extent runs past the largest sector number an
    // entry can hold (2^50 - 1): open may refuse it, but nothing may panic
    // and a commit must never write an entry that does not encode.
    // The second (zeroed) entry splits the first, leaving a data tail at
    // sector 2^50, which a committed entry cannot address.
    let mut index = std::fs::read(&index_path).unwrap();
    for (offset, length, zeroed) in [((1 << 50) - 2, 100, false), ((1 << 50) - 1, 1, true)] {
        index.extend_from_slice(&[0; 16]);
        let at = index.len() - 16;
        put_ent(
            &mut index,
            at,
            Ent {
                offset,
                length,
                moffset: 8,
                zeroed,
            },
        );
    }
    std::fs::write(&index_path, &index).unwrap();
    match WritableLayer::open(&data_path, Some(&index_path), false) {
        Err(e) => assert_names(
            &e.to_string(),
            &index_path.display().to_string(),
            &["entry", "sectors"],
            "entry past sector 2^50",
        ),
        Ok(layer) => {
            let mut out = Vec::new();
            if layer
                .commit(&mut out, &CommitOptions::default(), &mut |_| {})
                .is_ok()
            {
                let committed = ReadOnlyLayer::open(Arc::new(Bytes::new(out, "far.lsmt"))).unwrap();
                assert!(committed.entries.iter().all(|e| e.offset < (1 << 50) - 1));
            }
            let stack = Stack::new(Vec::new(), Some(Arc::new(layer))).unwrap();
            read_all(&stack);
        }
    }
}
