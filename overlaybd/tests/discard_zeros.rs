//! A discarded (or WRITE ZEROES) range reads as zeros, and keeps doing so
//! after the writable layer is reopened, on every kind of writable layer,
//! even where a lower layer holds data under it (LBPRZ promises zeros).

mod common;

use std::path::Path;
use std::sync::Arc;

use common::ReferenceVectors;
use overlaybd::image::open_read_only;
use overlaybd::lsmt::{CreateOptions, WritableLayer};
use overlaybd::stack::Stack;

fn stack(v: &ReferenceVectors, top: WritableLayer) -> Stack {
    let lower = open_read_only(&v.path("layer0.lsmt")).unwrap();
    Stack::new(vec![lower], Some(Arc::new(top))).unwrap()
}

fn paths(dir: &Path, sparse: bool) -> (std::path::PathBuf, Option<std::path::PathBuf>) {
    let index = (!sparse).then(|| dir.join("upper.index"));
    (dir.join("upper.data"), index)
}

#[test]
fn zeroed_ranges_stay_zero_across_reopen_on_every_writable_kind() {
    let v = ReferenceVectors::unpack();
    let lower = open_read_only(&v.path("layer0.lsmt")).unwrap();
    let size = lower.virtual_size();
    // A 64 KiB range the lower layer fills with data (not zeros).
    let lower_only = Stack::new(vec![lower], None).unwrap();
    let mut block = vec![0u8; 64 << 10];
    let offset = (0..v.span_bytes() >> 16)
        .map(|i| i << 16)
        .find(|&at| {
            lower_only.read(&mut block, at).unwrap();
            block.iter().filter(|&&b| b != 0).count() > 60_000
        })
        .expect("the lower layer has a 64 KiB range of data");
    for sparse in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (data, index) = paths(dir.path(), sparse);
        let options = CreateOptions {
            virtual_size: size,
            parent_uuid: None,
            sparse,
        };
        let top = WritableLayer::create(&data, index.as_deref(), &options).unwrap();
        let image = stack(&v, top);
        image.write(&[0x11; 8192], offset + 8192).unwrap();
        image.discard(offset, 64 << 10).unwrap();
        let mut got = vec![0xffu8; 64 << 10];
        image.read(&mut got, offset).unwrap();
        assert!(got.iter().all(|&b| b == 0), "sparse={sparse}: not zero");
        image.flush().unwrap();
        drop(image);

        let reopened = WritableLayer::open(&data, index.as_deref(), true).unwrap();
        let image = stack(&v, reopened);
        got.fill(0xff);
        image.read(&mut got, offset).unwrap();
        let nonzero = got.iter().filter(|&&b| b != 0).count();
        assert_eq!(
            nonzero, 0,
            "sparse={sparse}: {nonzero} bytes of the lower layer show through after reopening"
        );
    }
}
