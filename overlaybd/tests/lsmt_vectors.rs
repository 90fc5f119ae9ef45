//! The reference tools' LSMT files: our `commit` reproduces theirs byte for
//! byte, and our stack reads their layers with the recorded sha256 per MiB.

mod common;

use std::sync::Arc;

use common::ReferenceVectors;
use overlaybd::io::LocalFile;
use overlaybd::lsmt::{CommitOptions, ReadOnlyLayer, WritableLayer};
use overlaybd::stack::Stack;

fn open_committed(v: &ReferenceVectors, n: usize) -> ReadOnlyLayer {
    let path = v.path(&v.layer_str(n, "lsmt").unwrap());
    ReadOnlyLayer::open(Arc::new(LocalFile::open(&path).unwrap())).unwrap()
}

/// Vector layer `n` before its commit: its writable data and index files.
fn open_writable(v: &ReferenceVectors, n: usize) -> WritableLayer {
    WritableLayer::open(
        &v.path(&v.layer_str(n, "writable_data").unwrap()),
        Some(&v.path(&v.layer_str(n, "writable_index").unwrap())),
        false,
    )
    .unwrap()
}

#[test]
fn commit_is_byte_identical_to_the_reference() {
    let v = ReferenceVectors::unpack();
    for n in 0..v.layers().len() {
        let layer = open_writable(&v, n);
        let options = CommitOptions {
            uuid: v.layer_str(n, "uuid"),
            parent_uuid: v.layer_str(n, "parent_uuid"),
            message: format!("layer {n}"),
        };
        let mut out = Vec::new();
        layer.commit(&mut out, &options, &mut |_| {}).unwrap();
        let reference = std::fs::read(v.path(&v.layer_str(n, "lsmt").unwrap())).unwrap();
        assert_eq!(out.len(), reference.len(), "layer {n} size");
        assert!(
            out == reference,
            "layer {n} differs from the reference commit"
        );
    }
}

#[test]
fn committed_stacks_read_with_the_recorded_hashes() {
    let v = ReferenceVectors::unpack();
    for n in 0..v.layers().len() {
        let lowers = (0..=n).map(|i| open_committed(&v, i)).collect();
        let stack = Stack::new(lowers, None).unwrap();
        assert_eq!(stack.virtual_size(), 1 << 30);
        v.assert_stack_matches(&stack, n);
    }
}

#[test]
fn writable_top_over_committed_lowers_reads_the_same() {
    let v = ReferenceVectors::unpack();
    for n in 0..v.layers().len() {
        let lowers = (0..n).map(|i| open_committed(&v, i)).collect();
        let top = open_writable(&v, n);
        let stack = Stack::new(lowers, Some(Arc::new(top))).unwrap();
        v.assert_stack_matches(&stack, n);
    }
}

#[test]
fn sealed_layer_opens_as_read_only_and_reads_the_same() {
    let v = ReferenceVectors::unpack();
    let layer =
        WritableLayer::open(&v.path("layer0.data"), Some(&v.path("layer0.index")), false).unwrap();
    let mut sealed = Vec::new();
    layer.seal(&mut sealed, &mut |_| {}).unwrap();
    let sealed_path = v.dir.path().join("layer0.sealed");
    std::fs::write(&sealed_path, &sealed).unwrap();
    let ro = ReadOnlyLayer::open(Arc::new(LocalFile::open(&sealed_path).unwrap())).unwrap();
    assert_eq!(
        ro.header.flags & 7,
        3,
        "a sealed layer keeps its data-file header"
    );
    let stack = Stack::new(vec![ro], None).unwrap();
    v.assert_stack_matches(&stack, 0);
}
