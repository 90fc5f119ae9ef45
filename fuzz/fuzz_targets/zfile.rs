//! A ZFile: open it, then read ranges (partial blocks, whole blocks, block
//! boundaries, the end) and check they agree with one whole read.
//!
//! Each input runs twice: as it is, and with its checksums recomputed
//! (`reseal_zfile`), so mutations of fields and compressed data reach the
//! decoder instead of stopping at a CRC mismatch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlaybd::zfile::ZFileReader;
use overlaybd_fuzz::{exercise_source, reseal_zfile, source, Knobs};

fn run(data: &[u8]) {
    let Ok(reader) = ZFileReader::open(source(data, "fuzz.zfile")) else {
        return;
    };
    let info = reader.info().clone();
    assert_eq!(info.compressed_size, data.len() as u64);
    exercise_source(&reader, u64::from(info.block_size), &mut Knobs::new(data));
}

fuzz_target!(|data: &[u8]| {
    run(data);
    let mut resealed = data.to_vec();
    if reseal_zfile(&mut resealed) && resealed != data {
        run(&resealed);
    }
});
