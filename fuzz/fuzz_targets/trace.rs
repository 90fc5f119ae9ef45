//! Trace files: the binary format and the text path list.
//!
//! What the format guarantees (overlaybd/src/trace.rs): header padding
//! (bytes 4..8 and 20..24) is ignored and not checksummed; record padding
//! (bytes 1..4 of each record) is checksummed but ignored; `encode` writes
//! zero padding. So `encode(decode(x)) == x` exactly when all those padding
//! bytes of `x` are zero, and `decode(encode(r)) == r` for every decoded `r`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlaybd::trace::{
    decode, encode, Op, TraceFile, TraceRecord, HEADER_SIZE, MAGIC, RECORD_SIZE,
};

fuzz_target!(|data: &[u8]| {
    let decoded = decode(data, "fuzz.trace");
    if let Ok(records) = &decoded {
        let again = encode(records);
        let padding_zero = data[4..8].iter().chain(&data[20..24]).all(|&b| b == 0)
            && data[HEADER_SIZE..]
                .chunks_exact(RECORD_SIZE)
                .all(|r| r[1..4].iter().all(|&b| b == 0));
        if padding_zero {
            assert_eq!(again, data, "encode(decode(x)) != x");
        } else {
            assert_eq!(again.len(), data.len());
        }
        assert_eq!(
            &decode(&again, "again").expect("re-encoded trace decodes"),
            records
        );
    }
    match TraceFile::detect(data, "fuzz.trace") {
        Ok(TraceFile::Empty) => assert!(data.is_empty()),
        Ok(TraceFile::Binary(records)) => {
            assert!(data.starts_with(&MAGIC.to_le_bytes()));
            assert_eq!(Some(&records), decoded.as_ref().ok());
        }
        Ok(TraceFile::TextList(paths)) => {
            assert!(!paths.is_empty());
            for p in &paths {
                assert!(p.path.is_absolute(), "{p:?}");
            }
        }
        Err(_) => {}
    }

    // Records built from the input bytes: every valid record survives
    // encode → decode unchanged.
    let records: Vec<TraceRecord> = data
        .chunks_exact(21)
        .take(64)
        .map(|c| TraceRecord {
            op: if c[0] & 1 == 0 { Op::Read } else { Op::Write },
            layer_index: u32::from_le_bytes(c[1..5].try_into().unwrap()),
            count: u64::from_le_bytes(c[5..13].try_into().unwrap()) >> (c[0] >> 2),
            offset: i64::from_le_bytes(c[13..21].try_into().unwrap()) >> (c[0] >> 2),
        })
        .collect();
    let valid = records
        .iter()
        .all(|r| u64::try_from(r.offset).is_ok_and(|o| r.count <= i64::MAX as u64 - o));
    let round = decode(&encode(&records), "built");
    if valid {
        assert_eq!(round.expect("valid records decode"), records);
    } else {
        assert!(round.is_err(), "an invalid record was accepted");
    }
});
