//! Online growth of an image with a writable layer (a TCMU device's new
//! `dev_size`): the writable layer's virtual size grows in its files, the
//! stack serves the new end, and a commit or a reopen keeps the new size.
//! Images without a writable layer, shrinking and unaligned sizes are
//! refused.

use std::path::Path;
use std::sync::Arc;

use overlaybd::io::Bytes;
use overlaybd::lsmt::{CommitOptions, CreateOptions, ReadOnlyLayer, WritableLayer};
use overlaybd::stack::Stack;

const MIB: u64 = 1 << 20;

fn create(dir: &Path, sparse: bool) -> WritableLayer {
    let options = CreateOptions {
        virtual_size: MIB,
        parent_uuid: None,
        sparse,
    };
    let index = dir.join("w.index");
    WritableLayer::create(
        &dir.join("w.data"),
        (!sparse).then_some(index.as_path()),
        &options,
    )
    .unwrap()
}

fn reopen(dir: &Path, sparse: bool) -> WritableLayer {
    let index = dir.join("w.index");
    WritableLayer::open(
        &dir.join("w.data"),
        (!sparse).then_some(index.as_path()),
        true,
    )
    .unwrap()
}

#[test]
fn a_writable_layer_grows_in_its_files() {
    for sparse in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let layer = create(dir.path(), sparse);
        layer.write(&[0xaa; 4096], 0).unwrap();
        // Past the end: refused until the layer grows.
        assert!(layer.write(&[0xbb; 4096], MIB).is_err());
        layer.grow(MIB).unwrap(); // the same size: no change
        assert!(layer.grow(MIB / 2).is_err(), "shrinking");
        assert!(layer.grow(2 * MIB + 100).is_err(), "unaligned");
        assert_eq!(layer.virtual_size(), MIB);
        layer.grow(2 * MIB).unwrap();
        assert_eq!(layer.virtual_size(), 2 * MIB);
        layer.write(&[0xbb; 4096], MIB).unwrap();
        layer.flush().unwrap();
        drop(layer);

        let layer = reopen(dir.path(), sparse);
        assert_eq!(layer.virtual_size(), 2 * MIB, "sparse {sparse}");
        let stack = Stack::new(Vec::new(), Some(Arc::new(layer))).unwrap();
        let mut buf = vec![0u8; 8192];
        stack.read(&mut buf, MIB - 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..].iter().all(|&b| b == 0xbb));
        stack.read(&mut buf[..4096], 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xaa));

        // A commit carries the new size.
        let mut committed = Vec::new();
        stack
            .top()
            .unwrap()
            .commit(&mut committed, &CommitOptions::default(), &mut |_| {})
            .unwrap();
        let lower = ReadOnlyLayer::open(Arc::new(Bytes::new(committed, "committed"))).unwrap();
        assert_eq!(lower.virtual_size(), 2 * MIB, "sparse {sparse}");
    }
}

#[test]
fn a_stack_grows_only_with_a_writable_layer() {
    let dir = tempfile::tempdir().unwrap();
    let layer = create(dir.path(), true);
    layer.write(&[0x11; 512], 0).unwrap();
    let mut committed = Vec::new();
    layer
        .commit(&mut committed, &CommitOptions::default(), &mut |_| {})
        .unwrap();
    let lower = || ReadOnlyLayer::open(Arc::new(Bytes::new(committed.clone(), "lower"))).unwrap();

    let read_only = Stack::new(vec![lower()], None).unwrap();
    let err = read_only.grow(2 * MIB).unwrap_err().to_string();
    assert!(err.contains("no writable layer"), "{err}");
    assert_eq!(read_only.virtual_size(), MIB);

    let upper_dir = tempfile::tempdir().unwrap();
    let upper = create(upper_dir.path(), false);
    let stack = Stack::new(vec![lower()], Some(Arc::new(upper))).unwrap();
    assert!(stack.grow(MIB / 2).is_err(), "shrinking");
    stack.grow(3 * MIB).unwrap();
    assert_eq!(stack.virtual_size(), 3 * MIB);
    assert_eq!(stack.top().unwrap().virtual_size(), 3 * MIB);
    // The lower's data, zeros past its end, writes at the new end.
    let mut buf = vec![0u8; 512];
    stack.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
    stack.read(&mut buf, 2 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    stack.write(&[0x22; 512], 3 * MIB - 512).unwrap();
    stack.read(&mut buf, 3 * MIB - 512).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));
    assert!(stack.read(&mut buf, 3 * MIB).is_err());
}

#[test]
fn a_writable_layer_of_size_zero_takes_the_lowers_size() {
    // The containerd snapshotter creates a container's writable layer with
    // `overlaybd-create DATA INDEX 0`: it is as large as the image below.
    let base = tempfile::tempdir().unwrap();
    let layer = create(base.path(), false);
    layer.write(&[0x11; 512], 0).unwrap();
    let mut committed = Vec::new();
    layer
        .commit(&mut committed, &CommitOptions::default(), &mut |_| {})
        .unwrap();
    let lower = || ReadOnlyLayer::open(Arc::new(Bytes::new(committed.clone(), "lower"))).unwrap();
    let image_size = MIB;
    for sparse in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("w.index");
        let options = CreateOptions {
            virtual_size: 0,
            parent_uuid: None,
            sparse,
        };
        let data = dir.path().join("w.data");
        let layer =
            WritableLayer::create(&data, (!sparse).then_some(index.as_path()), &options).unwrap();
        assert_eq!(layer.virtual_size(), 0);
        let stack = Stack::new(vec![lower()], Some(Arc::new(layer))).unwrap();
        assert_eq!(stack.virtual_size(), image_size, "sparse {sparse}");
        stack.write(&[0xcc; 4096], image_size - 4096).unwrap();
        drop(stack);
        assert_eq!(
            reopen(dir.path(), sparse).virtual_size(),
            image_size,
            "kept in its headers"
        );
    }
}

#[test]
fn a_live_stack_grows_what_it_serves_and_a_snapshot_keeps_the_size() {
    // `obd resize`: the daemon grows its LiveStack; a snapshot taken after
    // makes its new upper at the grown size.
    use overlaybd::live::{snapshot_stack, LiveStack, NewUpper};
    let dir = tempfile::tempdir().unwrap();
    let upper = create(dir.path(), false);
    let live = LiveStack::new(Arc::new(
        Stack::new(Vec::new(), Some(Arc::new(upper))).unwrap(),
    ));
    live.grow(2 * MIB).unwrap();
    assert_eq!(live.current().virtual_size(), 2 * MIB);
    assert!(live.grow(MIB).is_err(), "shrinking");
    let data = dir.path().join("next.data");
    live.replace(std::time::Duration::from_secs(1), |stack| {
        let next = NewUpper {
            data: &data,
            index: None,
        };
        Ok((snapshot_stack(stack, &next)?, ()))
    })
    .unwrap();
    let stack = live.current();
    assert_eq!(stack.virtual_size(), 2 * MIB);
    assert_eq!(stack.top().unwrap().virtual_size(), 2 * MIB);
    stack.write(&[0x33; 512], 2 * MIB - 512).unwrap();
}
