//! A sparse writable layer is known after a reopen only by its file's
//! allocated extents, which come in whole file system blocks. A write or
//! discard of part of a block must leave the rest of that block reading
//! what the layers below hold, after the layer is reopened too.

mod common;

use std::sync::Arc;

use common::ReferenceVectors;
use overlaybd::image::open_read_only;
use overlaybd::lsmt::{CreateOptions, WritableLayer};
use overlaybd::stack::{Stack, SPARSE_UNIT};

#[test]
fn part_of_a_block_written_or_discarded_keeps_the_rest_of_it_after_reopen() {
    let v = ReferenceVectors::unpack();
    let lower_path = v.path("layer0.lsmt");
    let lower = open_read_only(&lower_path).unwrap();
    let size = lower.virtual_size();
    let lower_only = Stack::new(vec![lower], None).unwrap();
    // Two 4 KiB blocks the lower layer fills with data (no zero sector).
    let unit = SPARSE_UNIT as usize;
    let mut block = vec![0u8; unit];
    let full: Vec<u64> = (0..v.span_bytes() / SPARSE_UNIT)
        .map(|i| i * SPARSE_UNIT)
        .filter(|&at| {
            lower_only.read(&mut block, at).unwrap();
            block.chunks(512).all(|s| s.iter().any(|&b| b != 0))
        })
        .take(3)
        .collect();
    assert_eq!(full.len(), 3, "the lower layer has three full 4 KiB blocks");
    let (written_at, discarded_at, spanning_at) = (full[0], full[1], full[2]);
    let lower_bytes = |at: u64, len: usize| {
        let mut b = vec![0u8; len];
        lower_only.read(&mut b, at).unwrap();
        b
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("upper.sparse");
    let top = WritableLayer::create(
        &data,
        None,
        &CreateOptions {
            virtual_size: size,
            parent_uuid: None,
            sparse: true,
        },
    )
    .unwrap();
    let stack = Stack::new(
        vec![open_read_only(&lower_path).unwrap()],
        Some(Arc::new(top)),
    )
    .unwrap();
    // 1 KiB written in the middle of one block; 512 bytes discarded in
    // another; 1 KiB written across the end of a block into the next.
    stack.write(&[0xab; 1024], written_at + 1024).unwrap();
    stack.discard(discarded_at + 512, 512).unwrap();
    stack.write(&[0xcd; 1024], spanning_at + 3584).unwrap();
    stack.flush().unwrap();
    let mut want_written = lower_bytes(written_at, unit);
    want_written[1024..2048].fill(0xab);
    let mut want_discarded = lower_bytes(discarded_at, unit);
    want_discarded[512..1024].fill(0);
    let mut want_spanning = lower_bytes(spanning_at, 2 * unit);
    want_spanning[3584..4608].fill(0xcd);
    let check = |stack: &Stack, when: &str| {
        let mut got = vec![0u8; unit];
        stack.read(&mut got, written_at).unwrap();
        assert!(got == want_written, "{when}: the written block");
        stack.read(&mut got, discarded_at).unwrap();
        assert!(got == want_discarded, "{when}: the discarded block");
        let mut got = vec![0u8; 2 * unit];
        stack.read(&mut got, spanning_at).unwrap();
        assert!(
            got == want_spanning,
            "{when}: the two blocks written across"
        );
    };
    check(&stack, "live");
    drop(stack);
    let reopened = Stack::new(
        vec![open_read_only(&lower_path).unwrap()],
        Some(Arc::new(WritableLayer::open(&data, None, true).unwrap())),
    )
    .unwrap();
    check(&reopened, "reopened");
}
