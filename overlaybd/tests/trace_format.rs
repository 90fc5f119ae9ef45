//! The trace file: binary records and the text path list.

use std::path::{Path, PathBuf};

use overlaybd::crc::raw_crc32c;
use overlaybd::trace::{
    decode, encode, lock_path, ok_path, Op, PrefetchPath, TraceFile, TraceRecord, HEADER_SIZE,
    MAGIC, MAX_TEXT_LIST_SIZE, RECORD_SIZE,
};
use proptest::prelude::*;

fn read(layer_index: u32, count: u64, offset: i64) -> TraceRecord {
    TraceRecord {
        op: Op::Read,
        layer_index,
        count,
        offset,
    }
}

fn sample() -> Vec<TraceRecord> {
    vec![
        read(0, 4096, 0),
        read(2, 1 << 20, 123_456_789),
        TraceRecord {
            op: Op::Write,
            layer_index: 1,
            count: 512,
            offset: 8192,
        },
    ]
}

fn err_text(bytes: &[u8]) -> String {
    match decode(bytes, "/var/lib/trace/app.trace") {
        Ok(records) => panic!("expected an error, got {records:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("/var/lib/trace/app.trace: bad trace file: "),
                "{msg}"
            );
            msg
        }
    }
}

/// Rewrite the header checksum after editing records.
fn fix_checksum(bytes: &mut [u8]) {
    let crc = raw_crc32c(0, &bytes[HEADER_SIZE..]);
    bytes[16..20].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn round_trips() {
    for records in [
        vec![],
        sample(),
        vec![read(u32::MAX, 0, i64::MAX), read(7, i64::MAX as u64, 0)],
    ] {
        let bytes = encode(&records);
        assert_eq!(bytes.len(), HEADER_SIZE + RECORD_SIZE * records.len());
        assert_eq!(decode(&bytes, "t").unwrap(), records);
    }
}

#[test]
fn byte_layout_matches_the_reference_structs() {
    let record = read(0x0102_0304, 0x1122_3344_5566_7788, 0x0203_0405_0607_0809);
    let bytes = encode(&[record]);
    let mut expected_record = vec![b'R', 0, 0, 0];
    expected_record.extend(0x0102_0304u32.to_le_bytes());
    expected_record.extend(0x1122_3344_5566_7788u64.to_le_bytes());
    expected_record.extend(record.offset.to_le_bytes());
    assert_eq!(&bytes[HEADER_SIZE..], &expected_record[..]);

    let mut expected_header = vec![];
    expected_header.extend(0xC2EF_1820u32.to_le_bytes());
    expected_header.extend([0; 4]);
    expected_header.extend(24u64.to_le_bytes());
    expected_header.extend(raw_crc32c(0, &expected_record).to_le_bytes());
    expected_header.extend([0; 4]);
    assert_eq!(&bytes[..HEADER_SIZE], &expected_header[..]);
    assert_eq!(MAGIC, 0xC2EF_1820);

    assert_eq!(encode(&[]), {
        let mut empty = 0xC2EF_1820u32.to_le_bytes().to_vec();
        empty.resize(24, 0);
        empty
    });
}

#[test]
fn checksum_is_chained_record_by_record() {
    let bytes = encode(&sample());
    let chained = bytes[HEADER_SIZE..].chunks(RECORD_SIZE).fold(0, raw_crc32c);
    assert_eq!(
        u32::from_le_bytes(bytes[16..20].try_into().unwrap()),
        chained
    );
}

#[test]
fn non_zero_padding_is_read_when_the_checksum_covers_it() {
    let mut bytes = encode(&sample());
    bytes[4..8].copy_from_slice(&[0xAA; 4]); // header padding: not checksummed
    bytes[20..24].copy_from_slice(&[0xBB; 4]);
    bytes[HEADER_SIZE + 1..HEADER_SIZE + 4].copy_from_slice(&[1, 2, 3]); // record padding
    fix_checksum(&mut bytes);
    assert_eq!(decode(&bytes, "t").unwrap(), sample());
}

#[test]
fn truncated_header() {
    let bytes = encode(&sample());
    for len in [0, 1, 4, 23] {
        let msg = err_text(&bytes[..len]);
        assert!(
            msg.contains(&format!("{len} bytes is shorter than the 24-byte header")),
            "{msg}"
        );
    }
}

#[test]
fn bad_magic() {
    let mut bytes = encode(&sample());
    bytes[0] ^= 1;
    let msg = err_text(&bytes);
    assert!(
        msg.contains("magic is 0xC2EF1821, expected 0xC2EF1820"),
        "{msg}"
    );
}

#[test]
fn data_size_not_a_record_multiple() {
    let mut bytes = encode(&sample());
    bytes[8..16].copy_from_slice(&50u64.to_le_bytes());
    let msg = err_text(&bytes);
    assert!(
        msg.contains("data_size 50 is not a multiple of the 24-byte record"),
        "{msg}"
    );
}

#[test]
fn truncated_records_and_huge_data_size() {
    let bytes = encode(&sample());
    let msg = err_text(&bytes[..bytes.len() - 1]);
    assert!(
        msg.contains("truncated: the header announces 72 bytes of records, the file has 71"),
        "{msg}"
    );
    let msg = err_text(&bytes[..HEADER_SIZE + RECORD_SIZE]);
    assert!(msg.contains("announces 72 bytes"), "{msg}");

    let mut huge = bytes.clone();
    huge[8..16].copy_from_slice(&(u64::MAX - 15).to_le_bytes()); // a multiple of 24
    assert!(err_text(&huge).contains("truncated"));
}

#[test]
fn trailing_bytes() {
    let mut bytes = encode(&sample());
    bytes.extend([0; 5]);
    let msg = err_text(&bytes);
    assert!(
        msg.contains("5 unexpected bytes after the 72 bytes of records"),
        "{msg}"
    );
    let mut bytes = encode(&sample());
    bytes.extend(encode(&sample())[HEADER_SIZE..].iter());
    assert!(err_text(&bytes).contains("72 unexpected bytes"));
}

#[test]
fn wrong_checksum() {
    let mut bytes = encode(&sample());
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let msg = err_text(&bytes);
    assert!(msg.contains("checksum mismatch: header has 0x"), "{msg}");
}

#[test]
fn invalid_op_byte() {
    let mut bytes = encode(&sample());
    bytes[HEADER_SIZE + RECORD_SIZE] = b'X';
    fix_checksum(&mut bytes);
    let msg = err_text(&bytes);
    assert!(
        msg.contains("record 1: op byte 0x58 is neither 'R' nor 'W'"),
        "{msg}"
    );
}

#[test]
fn record_ranges_must_be_valid_file_ranges() {
    let msg = err_text(&encode(&[read(0, 1, 0), read(0, 10, -1)]));
    assert!(
        msg.contains("record 1: 10 bytes at offset -1 is not a valid file range"),
        "{msg}"
    );
    let msg = err_text(&encode(&[read(0, i64::MAX as u64, 1)]));
    assert!(msg.contains("record 0:"), "{msg}");
    let msg = err_text(&encode(&[read(0, u64::MAX, 0)]));
    assert!(msg.contains("not a valid file range"), "{msg}");
}

#[test]
fn detect_picks_the_mode() {
    assert_eq!(TraceFile::detect(b"", "t").unwrap(), TraceFile::Empty);
    assert_eq!(
        TraceFile::detect(&encode(&sample()), "t").unwrap(),
        TraceFile::Binary(sample())
    );
    assert_eq!(
        TraceFile::detect(&encode(&[]), "t").unwrap(),
        TraceFile::Binary(vec![])
    );
    // With the magic, a broken file is a broken binary trace, not a text list.
    let msg = TraceFile::detect(&MAGIC.to_le_bytes(), "t")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("shorter than the 24-byte header"), "{msg}");
}

#[test]
fn text_lists() {
    let list = b"/usr/bin/redis-server\n/etc/redis/\r\n\n   \n/usr/lib/*\n/\n/*\n/var//\n/opt/a b";
    let TraceFile::TextList(paths) = TraceFile::detect(list, "t").unwrap() else {
        panic!("not a text list");
    };
    let expected: Vec<PrefetchPath> = [
        ("/usr/bin/redis-server", false),
        ("/etc/redis", true),
        ("/usr/lib", true),
        ("/", true),
        ("/", true),
        ("/var", true),
        ("/opt/a b", false),
    ]
    .into_iter()
    .map(|(path, whole_dir)| PrefetchPath {
        path: PathBuf::from(path),
        whole_dir,
    })
    .collect();
    assert_eq!(paths, expected);

    // Non-UTF-8 bytes are fine in a path.
    let TraceFile::TextList(paths) = TraceFile::detect(b"/data/\xff\xfe", "t").unwrap() else {
        panic!("not a text list");
    };
    use std::os::unix::ffi::OsStrExt;
    assert_eq!(paths[0].path.as_os_str().as_bytes(), b"/data/\xff\xfe");
}

#[test]
fn text_list_errors() {
    let detect_err = |bytes: &[u8]| {
        TraceFile::detect(bytes, "/trace/list")
            .unwrap_err()
            .to_string()
    };

    let msg = detect_err(b"/usr/bin/sh\nusr/lib/\n");
    assert_eq!(
        msg,
        "/trace/list: bad trace list: line 2: \"usr/lib/\" is not an absolute path"
    );
    let msg = detect_err(b" /usr/bin/sh");
    assert!(
        msg.contains("line 1: \" /usr/bin/sh\" is not an absolute path"),
        "{msg}"
    );
    let msg = detect_err(b"/a\n/b\0c\n");
    assert!(msg.contains("line 2:") && msg.contains("NUL byte"), "{msg}");
    let msg = detect_err(b"\n \r\n\t\n");
    assert!(msg.contains("holds no paths"), "{msg}");

    let mut big = Vec::new();
    while big.len() < MAX_TEXT_LIST_SIZE {
        big.extend_from_slice(b"/some/file/path/of/some/length\n");
    }
    big.truncate(MAX_TEXT_LIST_SIZE);
    big[MAX_TEXT_LIST_SIZE - 1] = b'\n';
    assert!(matches!(
        TraceFile::detect(&big, "t"),
        Ok(TraceFile::TextList(_))
    ));
    big.push(b'x');
    let msg = detect_err(&big);
    assert!(msg.contains("65537 bytes is more than the 64 KiB"), "{msg}");
}

#[test]
fn lock_and_ok_paths() {
    let trace = Path::new("/var/lib/trace/app.trace");
    assert_eq!(lock_path(trace), Path::new("/var/lib/trace/app.trace.lock"));
    assert_eq!(ok_path(trace), Path::new("/var/lib/trace/app.trace.ok"));
}

fn any_record() -> impl Strategy<Value = TraceRecord> {
    (any::<bool>(), any::<u32>(), 0..=i64::MAX).prop_flat_map(|(write, layer_index, offset)| {
        (0..=(i64::MAX - offset) as u64).prop_map(move |count| TraceRecord {
            op: if write { Op::Write } else { Op::Read },
            layer_index,
            count,
            offset,
        })
    })
}

proptest! {
    #[test]
    fn valid_records_round_trip(records in prop::collection::vec(any_record(), 0..40)) {
        let bytes = encode(&records);
        prop_assert_eq!(decode(&bytes, "t").unwrap(), records.clone());
        prop_assert_eq!(TraceFile::detect(&bytes, "t").unwrap(), TraceFile::Binary(records));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode(&bytes, "t");
        let _ = TraceFile::detect(&bytes, "t");
        let mut with_magic = MAGIC.to_le_bytes().to_vec();
        with_magic.extend(&bytes);
        let _ = TraceFile::detect(&with_magic, "t");
    }

    /// Any changed byte outside the header padding is caught.
    #[test]
    fn corruption_is_detected(
        records in prop::collection::vec(any_record(), 1..10),
        at in any::<prop::sample::Index>(),
        flip in 1..=255u8,
    ) {
        let mut bytes = encode(&records);
        let at = at.index(bytes.len());
        bytes[at] ^= flip;
        let header_padding = (4..8).contains(&at) || (20..24).contains(&at);
        match decode(&bytes, "t") {
            Ok(decoded) => {
                prop_assert!(header_padding, "flip at {} went unnoticed", at);
                prop_assert_eq!(decoded, records);
            }
            Err(_) => prop_assert!(!header_padding),
        }
    }
}
