//! A writable layer after a crash: the index may name writes whose data
//! never reached the disk. The layer opens at its last consistent state —
//! every write a completed flush covered is there, the lost ones are not —
//! and, opened for writing, goes on from that state.

use std::fs::OpenOptions;
use std::path::Path;

use overlaybd::lsmt::{CreateOptions, WritableLayer};
use overlaybd::stack::Stack;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn create(dir: &Path) -> WritableLayer {
    let options = CreateOptions {
        virtual_size: 4 * MIB,
        parent_uuid: None,
        sparse: false,
    };
    WritableLayer::create(&dir.join("w.data"), Some(&dir.join("w.index")), &options).unwrap()
}

fn open(dir: &Path, writable: bool) -> WritableLayer {
    WritableLayer::open(&dir.join("w.data"), Some(&dir.join("w.index")), writable).unwrap()
}

fn read(layer: WritableLayer, offset: u64, len: usize) -> Vec<u8> {
    let stack = Stack::new(Vec::new(), Some(Arc::new(layer))).unwrap();
    let mut buf = vec![0u8; len];
    stack.read(&mut buf, offset).unwrap();
    buf
}

/// A power cut: the data file keeps only its first `len` bytes.
fn lose_data_after(path: &Path, len: u64) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(len).unwrap();
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[test]
fn writes_lost_in_a_crash_are_dropped_and_flushed_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (data_path, index_path) = (dir.path().join("w.data"), dir.path().join("w.index"));
    let layer = create(dir.path());
    layer.write(&[0xaa; 4096], 0).unwrap();
    layer.flush().unwrap();
    let flushed_data = file_len(&data_path);
    let flushed_index = file_len(&index_path);
    // Two more writes reach the index but (as after a power cut) not the
    // data file.
    layer.write(&[0xbb; 4096], 8192).unwrap();
    layer.write(&[0xcc; 512], 0).unwrap();
    drop(layer);
    let index_with_lost = file_len(&index_path);
    assert_eq!(index_with_lost, flushed_index + 32);
    lose_data_after(&data_path, flushed_data);

    // Read-only: the flushed write is there, the lost ones are not, and
    // nothing is changed on disk.
    let mut expected = vec![0xaa; 4096];
    expected.resize(12288, 0);
    assert_eq!(read(open(dir.path(), false), 0, 12288), expected);
    assert_eq!(file_len(&index_path), index_with_lost);

    // Writable: the lost entries leave the index, so a new write that
    // follows them survives the next open.
    let layer = open(dir.path(), true);
    assert_eq!(file_len(&index_path), flushed_index);
    layer.write(&[0xdd; 4096], 16384).unwrap();
    layer.flush().unwrap();
    drop(layer);
    let after = read(open(dir.path(), false), 0, 20480);
    assert_eq!(&after[..4096], &[0xaa; 4096][..]);
    assert!(after[4096..16384].iter().all(|&b| b == 0));
    assert_eq!(&after[16384..], &[0xdd; 4096][..]);
}

#[test]
fn a_discard_after_a_lost_write_is_dropped_with_it() {
    // Replay stops at the first lost entry: what follows it (here a
    // discard, which needs no data) is not applied either, so the layer
    // is in a state it really was in.
    let dir = tempfile::tempdir().unwrap();
    let data_path = dir.path().join("w.data");
    let layer = create(dir.path());
    layer.write(&[0x11; 8192], 0).unwrap();
    layer.flush().unwrap();
    let flushed_data = file_len(&data_path);
    layer.write(&[0x22; 4096], 65536).unwrap();
    layer.discard(0, 4096).unwrap();
    drop(layer);
    lose_data_after(&data_path, flushed_data);
    assert_eq!(read(open(dir.path(), false), 0, 8192), vec![0x11; 8192]);
}
