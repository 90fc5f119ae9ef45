//! A registry layer blob: unwrap it as the daemon does (tar, then ZFile,
//! then raw), open the LSMT inside and read through a stack.
//!
//! Like the `zfile` target, a blob whose ZFile (bare or tar payload) had its
//! checksums broken by a mutation runs a second time with them recomputed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlaybd::detect::detect_layer_blob;
use overlaybd::io::Bytes;
use overlaybd::lsmt::ReadOnlyLayer;
use overlaybd_fuzz::{exercise_layer, exercise_source, reseal_zfile, source, Knobs};

fn run(data: &[u8]) {
    let Ok((plain, kind)) = detect_layer_blob(source(data, "fuzz.blob")) else {
        return;
    };
    let _ = kind.to_string();
    let mut knobs = Knobs::new(data);
    if let Some(tar) = kind.tar() {
        assert!(tar
            .offset
            .checked_add(tar.size)
            .is_some_and(|end| end <= data.len() as u64));
    }
    if let Some(z) = kind.zfile() {
        let decompressed = plain.source();
        assert_eq!(decompressed.size(), z.original_size);
        exercise_source(decompressed.as_ref(), u64::from(z.block_size), &mut knobs);
    }
    let Ok(layer) = ReadOnlyLayer::open(plain) else {
        return;
    };
    exercise_layer(layer, &mut knobs);
}

fuzz_target!(|data: &[u8]| {
    run(data);
    let mut resealed = data.to_vec();
    let (start, end) = match overlaybd::tar::detect(&Bytes::new(data.to_vec(), "t")) {
        Ok(Some(p)) => (p.offset as usize, (p.offset + p.size) as usize),
        Ok(None) => (0, data.len()),
        Err(_) => return,
    };
    if reseal_zfile(&mut resealed[start..end]) && resealed != data {
        run(&resealed);
    }
});
