//! `tar::wrap` reproduces the reference convertor's tar wrapper byte for byte.

mod common;

use std::sync::Arc;

use overlaybd::io::{Bytes, LocalFile, ReadAt};

#[test]
fn wrapping_the_payload_again_gives_the_reference_blob() {
    for name in ["dev-layer0.blob", "dev-layer1.blob"] {
        let path = common::fixtures().join("real-dev-image").join(name);
        let blob = LocalFile::open(&path).unwrap();
        let payload = overlaybd::tar::detect(&blob)
            .unwrap()
            .expect("a tar wrapper");
        let window = payload.window(Arc::new(blob)).unwrap();
        let mut out = Vec::new();
        overlaybd::tar::wrap(&window, &mut out).unwrap();
        let reference = std::fs::read(&path).unwrap();
        let first_difference = out.iter().zip(&reference).position(|(a, b)| a != b);
        assert_eq!(first_difference, None, "{name}: wrapper differs");
        assert_eq!(out.len(), reference.len(), "{name}: length");
    }
}

#[test]
fn wrapped_payload_of_any_size_unwraps_to_itself() {
    for size in [0usize, 1, 511, 512, 513, 100_000] {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
        let mut out = Vec::new();
        overlaybd::tar::wrap(&Bytes::new(data.clone(), "payload"), &mut out).unwrap();
        assert_eq!(out.len() % 512, 0);
        let wrapped = Arc::new(Bytes::new(out, "wrapped"));
        let payload = overlaybd::tar::detect(wrapped.as_ref())
            .unwrap()
            .expect("tar");
        let window = payload.window(wrapped).unwrap();
        let mut back = vec![0u8; window.size() as usize];
        window.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, data, "size {size}");
    }
}
