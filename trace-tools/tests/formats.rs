//! Round trips of every trace kind, merging in convert, and clear errors
//! for damaged files.

use std::path::PathBuf;
use std::sync::Arc;

use overlaybd::trace::{self, Op, PrefetchPath, TraceFile, TraceRecord};
use trace_tools::convert::{text_list, TraceBuilder};
use trace_tools::events::{
    BlockEvent, Event, EventFile, EventWriter, Header, InodeName, PageEvent, VERSION,
};

fn header() -> Header {
    Header {
        obd_events: VERSION,
        device: "/dev/loop7".into(),
        major: 7,
        minor: 7,
        size: 64 << 20,
        page_size: 4096,
        start_unix_ns: 1_763_790_000_000_000_000,
        disk_offset: 0,
    }
}

fn sample_events() -> Vec<Event> {
    vec![
        Event::Page(PageEvent {
            t: 10,
            pid: 42,
            comm: "cat".into(),
            ino: 12,
            index: 0,
            pages: 4,
        }),
        Event::Block(BlockEvent {
            t: 20,
            pid: 42,
            comm: "cat \"quoted\" \u{1F600}".into(),
            offset: 1 << 20,
            length: 16384,
            rwbs: "RA".into(),
        }),
        Event::Block(BlockEvent {
            t: 30,
            pid: 7,
            comm: "kworker/u8:1".into(),
            offset: 4096,
            length: 4096,
            rwbs: "WS".into(),
        }),
        Event::Inode(InodeName {
            ino: 12,
            path: "/etc/hostname".into(),
        }),
    ]
}

#[test]
fn event_files_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.events");
    let mut writer = EventWriter::create(&path, &header()).unwrap();
    for e in sample_events() {
        writer.write(&e).unwrap();
    }
    assert!(
        !path.exists(),
        "written under a temporary name until finished"
    );
    writer.finish().unwrap();
    let read = EventFile::read(&path).unwrap();
    assert_eq!(read.header, header());
    assert_eq!(read.events, sample_events());
    assert_eq!(read.blocks().filter(|b| b.is_read()).count(), 1);
    assert_eq!(read.inode_names()[&12], PathBuf::from("/etc/hostname"));
    assert!(EventFile::sniff(&std::fs::read(&path).unwrap()));
}

#[test]
fn damaged_event_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.events");
    let mut writer = EventWriter::create(&path, &header()).unwrap();
    for e in sample_events() {
        writer.write(&e).unwrap();
    }
    writer.finish().unwrap();
    let good = std::fs::read(&path).unwrap();
    let name = path.display().to_string();
    let check = |bytes: &[u8], want: &str| {
        std::fs::write(&path, bytes).unwrap();
        let err = EventFile::read(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{name}: bad event file")), "{err}");
        assert!(err.contains(want), "{err}");
    };
    // Cut in the middle of the third line.
    let cut = good
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .nth(1)
        .unwrap()
        .0
        + 20;
    check(&good[..cut], "line 3");
    check(b"", "empty");
    check(b"not json\n", "line 1: not an obd event file header");
    let mut future = good.clone();
    future.splice(14..15, *b"9");
    check(&future, "format version 9");
    let mut long = good.clone();
    long.extend(vec![b' '; 100_000]);
    check(&long, "longer than");
    let mut unknown = good.clone();
    unknown.extend_from_slice(b"{\"type\":\"teleport\",\"t\":1}\n");
    check(&unknown, "line 6");
}

#[test]
fn binary_traces_and_text_lists_round_trip() {
    let records = vec![
        TraceRecord {
            op: Op::Read,
            layer_index: 3,
            count: 1 << 20,
            offset: 4096,
        },
        TraceRecord {
            op: Op::Read,
            layer_index: 0,
            count: 512,
            offset: 0,
        },
    ];
    let bytes = trace::encode(&records);
    assert_eq!(
        TraceFile::detect(&bytes, "t").unwrap(),
        TraceFile::Binary(records)
    );
    let warn = trace_tools::warn_to_stderr();
    let files: Vec<PathBuf> = vec!["/usr/bin/app".into(), "/etc/app.conf".into()];
    let list = text_list(&files, &warn);
    assert_eq!(list, b"/usr/bin/app\n/etc/app.conf\n");
    let TraceFile::TextList(paths) = TraceFile::detect(&list, "l").unwrap() else {
        panic!("a text list");
    };
    assert_eq!(
        paths,
        files
            .iter()
            .map(|p| PrefetchPath {
                path: p.clone(),
                whole_dir: false
            })
            .collect::<Vec<_>>()
    );
}

#[test]
fn text_lists_stay_within_64_kib_and_skip_unlistable_names() {
    let warnings = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&warnings);
    let warn: trace_tools::Warn = Arc::new(move |m: &str| sink.lock().unwrap().push(m.to_owned()));
    let mut files: Vec<PathBuf> = (0..5000)
        .map(|i| format!("/some/rather/long/directory/name/file{i:05}").into())
        .collect();
    files.insert(1, "/bad\nname".into());
    let list = text_list(&files, &warn);
    assert!(list.len() <= trace::MAX_TEXT_LIST_SIZE);
    assert!(list.starts_with(b"/some/rather/long/directory/name/file00000\n/some"));
    assert!(TraceFile::detect(&list, "l").is_ok());
    assert!(warnings.lock().unwrap()[0].contains("left out"));
}

fn rec(layer_index: u32, offset: i64, count: u64) -> TraceRecord {
    TraceRecord {
        op: Op::Read,
        layer_index,
        count,
        offset,
    }
}

#[test]
fn converted_ranges_keep_first_access_order_without_repeats() {
    let mut b = TraceBuilder::new();
    b.add(0, 8192, 4096); // A
    b.add(1, 0, 4096); // other layer
    b.add(0, 12288, 4096); // continues A: merged into it
    b.add(0, 8192, 8192); // all seen: nothing
    b.add(0, 4096, 16384); // 4096..8192 new; 16384..20480 new, continues A
    b.add(1, 2048, 4096); // overlaps the layer-1 record: 4096..6144 new, continues it
    b.add(0, 0, 0); // empty: nothing
    assert_eq!(
        b.finish(),
        vec![rec(0, 8192, 12288), rec(1, 0, 6144), rec(0, 4096, 4096),]
    );
}

#[test]
fn converted_ranges_cover_exactly_what_was_read() {
    // Property: the union of the records equals the union of the reads,
    // with no byte twice.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..50 {
        let mut b = TraceBuilder::new();
        let mut want = std::collections::BTreeSet::new();
        for _ in 0..40 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let layer = (x % 3) as u32;
            let offset = (x >> 8) % 256;
            let len = (x >> 20) % 32;
            b.add(layer, offset * 512, len * 512);
            for s in offset..offset + len {
                want.insert((layer, s));
            }
        }
        let mut got = std::collections::BTreeSet::new();
        for r in b.finish() {
            assert!(r.count > 0);
            for s in r.offset as u64 / 512..(r.offset as u64 + r.count) / 512 {
                assert!(got.insert((r.layer_index, s)), "sector {s} twice");
            }
        }
        assert_eq!(got, want);
    }
}
