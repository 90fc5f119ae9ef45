//! Daemon-side tracing through the Stack: recording against the plan, the
//! .lock/.ok handshake, replay of binary traces and text lists.

#[path = "../../overlaybd/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fixtures, ReferenceVectors};
use overlaybd::detect::open_layer_blob;
use overlaybd::io::{LocalFile, ReadAt, Source};
use overlaybd::lsmt::{CreateOptions, ReadOnlyLayer, WritableLayer};
use overlaybd::stack::{PieceSource, Stack};
use overlaybd::trace::{self, Op, PrefetchPath, TraceRecord};
use trace_tools::recorder::Recorder;
use trace_tools::replay::{self, Job, ReplayOptions};
use trace_tools::{Session, Warn};

/// A layer file that counts the bytes read from it (a stand-in for a
/// remote layer whose cache fills).
struct Counting {
    inner: LocalFile,
    bytes: Arc<AtomicU64>,
}

impl ReadAt for Counting {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_exact_at(buf, offset)
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
}

fn counted_layer(path: &Path) -> (ReadOnlyLayer, Arc<AtomicU64>) {
    let bytes = Arc::new(AtomicU64::new(0));
    let file = Counting {
        inner: LocalFile::open(path).unwrap(),
        bytes: Arc::clone(&bytes),
    };
    let layer = ReadOnlyLayer::open(open_layer_blob(Arc::new(file) as Source).unwrap()).unwrap();
    (layer, bytes)
}

fn vector_stack(v: &ReferenceVectors, zfile: bool) -> Stack {
    let key = if zfile { "zfile_commit" } else { "lsmt" };
    let lowers = (0..v.layers().len())
        .map(|n| {
            let path = v.path(&v.layer_str(n, key).unwrap());
            ReadOnlyLayer::open(open_layer_blob(Arc::new(LocalFile::open(&path).unwrap())).unwrap())
                .unwrap()
        })
        .collect();
    Stack::new(lowers, None).unwrap()
}

/// Warnings collected for inspection.
fn collecting() -> (Warn, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let warn: Warn = Arc::new(move |m: &str| sink.lock().unwrap().push(m.to_string()));
    (warn, seen)
}

/// Ranges that cross layers, holes and extent edges.
fn ranges(span: u64) -> Vec<(u64, u64)> {
    let mut out = vec![
        (0, 4096),
        (512, 512),
        (span - 65536, 65536),
        (3 << 20, 1 << 20),
    ];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..60 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = (x % (span / 512)) * 512;
        let len = ((x >> 40) % 512 + 1) * 512;
        out.push((offset, len.min(span - offset)));
    }
    out
}

/// The lower-layer records `ranges` should produce, from the plan itself.
fn expected_records(stack: &Stack, ranges: &[(u64, u64)]) -> Vec<TraceRecord> {
    let mut plan = Vec::new();
    let mut out = Vec::new();
    for &(offset, len) in ranges {
        plan.clear();
        stack.plan(offset, len, &mut plan).unwrap();
        for piece in &plan {
            if let PieceSource::Layer { layer, position } = piece.source {
                if layer < stack.lowers().len() {
                    out.push(TraceRecord {
                        op: Op::Read,
                        layer_index: layer as u32,
                        count: piece.length,
                        offset: position as i64,
                    });
                }
            }
        }
    }
    out
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn recorder_records_lower_reads_exactly_as_planned() {
    let v = ReferenceVectors::unpack();
    let span = v.span_bytes();
    let reads = ranges(span);
    let reference = vector_stack(&v, false);
    let want = expected_records(&reference, &reads);
    assert!(want.len() > 50);
    assert!((0..3).all(|l| want.iter().any(|r| r.layer_index == l)));

    let stack = vector_stack(&v, true);
    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join("app.trace");
    std::fs::write(&trace_path, b"").unwrap();
    let (warn, _) = collecting();
    let recorder = Recorder::start(&stack, &trace_path, Duration::from_secs(60), warn).unwrap();
    assert!(trace::lock_path(&trace_path).exists());
    let mut buf = vec![0u8; 1 << 20];
    for &(offset, len) in &reads {
        stack.read(&mut buf[..len as usize], offset).unwrap();
    }
    assert_eq!(recorder.records(), want);
    assert_eq!(recorder.finish().unwrap(), want.len());
    // The file is a valid trace (the format the reference reads) holding them.
    let bytes = std::fs::read(&trace_path).unwrap();
    assert_eq!(trace::decode(&bytes, "app.trace").unwrap(), want);
    assert_eq!(bytes, trace::encode(&want));
    assert!(!trace::lock_path(&trace_path).exists());
    assert!(trace::ok_path(&trace_path).exists());
    // Finished: later reads are not recorded, finishing again is a no-op.
    stack.read(&mut buf[..4096], 0).unwrap();
    assert_eq!(recorder.finish().unwrap(), want.len());
    drop(recorder);
    assert_eq!(
        trace::decode(&std::fs::read(&trace_path).unwrap(), "t").unwrap(),
        want
    );
}

#[test]
fn recorder_leaves_out_the_writable_top() {
    let v = ReferenceVectors::unpack();
    let dir = tempfile::tempdir().unwrap();
    let lowers = (0..3)
        .map(|n| {
            let path = v.path(&v.layer_str(n, "lsmt").unwrap());
            ReadOnlyLayer::open(Arc::new(LocalFile::open(&path).unwrap())).unwrap()
        })
        .collect();
    let top = WritableLayer::create(
        &dir.path().join("top.data"),
        Some(&dir.path().join("top.index")),
        &CreateOptions {
            virtual_size: v.span_bytes(),
            parent_uuid: None,
            sparse: false,
        },
    )
    .unwrap();
    let stack = Stack::new(lowers, Some(Arc::new(top))).unwrap();
    stack.write(&[7u8; 8192], 1 << 20).unwrap();
    let trace_path = dir.path().join("t.trace");
    std::fs::write(&trace_path, b"").unwrap();
    let (warn, _) = collecting();
    let recorder = Recorder::start(&stack, &trace_path, Duration::from_secs(60), warn).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    stack.read(&mut buf, (1 << 20) - 16384).unwrap();
    let records = recorder.records();
    let want = expected_records(&stack, &[((1 << 20) - 16384, 64 << 10)]);
    assert_eq!(records, want);
    let covered: u64 = records.iter().map(|r| r.count).sum();
    assert!(
        covered <= (64 << 10) - 8192,
        "the top's 8 KiB is not recorded"
    );
    // A second observer is refused.
    let (warn, _) = collecting();
    let err = Recorder::start(
        &stack,
        &dir.path().join("other"),
        Duration::from_secs(1),
        warn,
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("already has a read observer"),
        "{err}"
    );
}

#[test]
fn deleting_the_lock_stops_recording_and_writes_the_trace() {
    let v = ReferenceVectors::unpack();
    let stack = Arc::new(vector_stack(&v, false));
    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join("app.trace");
    std::fs::write(&trace_path, b"").unwrap();
    // The daemon path: a session with the reference's 1-second poll.
    let session = Session::start(&stack, &trace_path, 4, trace_tools::warn_to_stderr()).unwrap();
    let Session::Recording(recorder) = &session else {
        panic!("an empty trace file must start a recording");
    };
    let lock = trace::lock_path(&trace_path);
    let ok = trace::ok_path(&trace_path);
    assert!(lock.exists() && !ok.exists());
    let mut buf = vec![0u8; 1 << 20];
    stack.read(&mut buf, 0).unwrap();
    stack.read(&mut buf[..8192], 5 << 20).unwrap();
    std::fs::remove_file(&lock).unwrap();
    let removed = Instant::now();
    wait_for(".ok after deleting the lock", || ok.exists());
    assert!(removed.elapsed() < Duration::from_secs(3));
    assert!(!recorder.is_recording());
    // Planned after recording stopped, so not recorded itself.
    let want = expected_records(&stack, &[(0, 1 << 20), (5 << 20, 8192)]);
    assert_eq!(
        trace::decode(&std::fs::read(&trace_path).unwrap(), "app.trace").unwrap(),
        want
    );
    stack.read(&mut buf, 2 << 20).unwrap();
    drop(session); // closing does not rewrite it
    assert_eq!(
        trace::decode(&std::fs::read(&trace_path).unwrap(), "app.trace").unwrap(),
        want
    );
    assert!(!lock.exists());
}

#[test]
fn closing_the_image_finishes_the_recording() {
    let v = ReferenceVectors::unpack();
    let stack = Arc::new(vector_stack(&v, false));
    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join("app.trace");
    std::fs::write(&trace_path, b"").unwrap();
    std::fs::write(trace::ok_path(&trace_path), b"").unwrap(); // stale
    let session = Session::start(&stack, &trace_path, 4, trace_tools::warn_to_stderr()).unwrap();
    assert!(
        !trace::ok_path(&trace_path).exists(),
        "a stale .ok is removed"
    );
    let mut buf = vec![0u8; 65536];
    stack.read(&mut buf, 7 << 20).unwrap();
    drop(session);
    let records = trace::decode(&std::fs::read(&trace_path).unwrap(), "t").unwrap();
    assert_eq!(records, expected_records(&stack, &[(7 << 20, 65536)]));
    assert!(trace::ok_path(&trace_path).exists());
    assert!(!trace::lock_path(&trace_path).exists());
}

#[test]
fn replay_reads_the_stored_bytes_of_every_record_and_skips_missing_layers() {
    let v = ReferenceVectors::unpack();
    let mut counters = Vec::new();
    let lowers = (0..3)
        .map(|n| {
            let (layer, bytes) = counted_layer(&v.path(&v.layer_str(n, "zfile_commit").unwrap()));
            counters.push(bytes);
            layer
        })
        .collect();
    let stack = Arc::new(Stack::new(lowers, None).unwrap());
    let record = |layer_index, count, offset| TraceRecord {
        op: Op::Read,
        layer_index,
        count,
        offset,
    };
    let records = vec![
        record(0, 3 << 20, 0), // split into 1 MiB reads
        record(7, 4096, 0),    // a layer the image does not have
        record(1, 4096, 4096),
        record(2, 1 << 30, 0), // clipped to the layer file
        record(200, 512, 512),
        record(2, 4096, 1i64 << 40), // past the end: nothing
    ];
    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join("replay.trace");
    std::fs::write(&trace_path, trace::encode(&records)).unwrap();
    for c in &counters {
        c.store(0, Ordering::Relaxed);
    }
    let (warn, warnings) = collecting();
    let session = Session::start(&stack, &trace_path, 3, warn).unwrap();
    let Session::Replaying(handle) = session else {
        panic!("a binary trace must start a replay");
    };
    let report = handle.wait().unwrap();
    // Stored bytes: the compressed blocks behind the records, at most the
    // blobs themselves.
    let blobs: u64 = (0..3)
        .map(|n| {
            let path = v.path(&v.layer_str(n, "zfile_commit").unwrap());
            std::fs::metadata(path).unwrap().len()
        })
        .sum();
    assert!(report.bytes > 0 && report.bytes <= blobs, "{report:?}");
    assert_eq!(report.skipped_records, 2);
    assert_eq!(
        report.missing_layers.iter().copied().collect::<Vec<_>>(),
        [7, 200]
    );
    assert_eq!(report.failed_reads, 0);
    assert!(
        report.reads >= 3,
        "one range per layer at least: {report:?}"
    );
    let warnings = warnings.lock().unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("skipped 2 records of layers {7, 200}"),
        "{}",
        warnings[0]
    );
    // Every layer file was read (the compressed blobs, through ZFile).
    for (n, c) in counters.iter().enumerate() {
        assert!(c.load(Ordering::Relaxed) > 0, "layer {n} not read");
    }
}

#[test]
fn replay_of_a_text_list_prefetches_the_files_from_the_image_ext4() {
    let dir = fixtures().join("real-dev-image");
    let (l0, c0) = counted_layer(&dir.join("dev-layer0.blob"));
    let (l1, c1) = counted_layer(&dir.join("dev-layer1.blob"));
    let stack = Arc::new(Stack::new(vec![l0, l1], None).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let list = tmp.path().join("list.txt");
    std::fs::write(&list, b"/data/blob.bin\n/docs/*\n/etc/\n/nonexistent\n").unwrap();
    c0.store(0, Ordering::Relaxed);
    c1.store(0, Ordering::Relaxed);
    let (warn, warnings) = collecting();
    let Session::Replaying(handle) = Session::start(&stack, &list, 4, warn).unwrap() else {
        panic!("a text list must start a replay");
    };
    let report = handle.wait().unwrap();
    assert_eq!(report.missing_paths, [PathBuf::from("/nonexistent")]);
    assert_eq!(report.failed_reads, 0);
    // blob.bin (2 MiB) plus 199 docs plus etc's files.
    assert!(report.bytes >= (2 << 20) + 199 * 100, "{report:?}");
    assert!(
        c1.load(Ordering::Relaxed) >= 1 << 20,
        "blob.bin is in layer 1"
    );
    assert!(c0.load(Ordering::Relaxed) > 0, "docs are in layer 0");
    assert!(warnings.lock().unwrap()[0].contains("/nonexistent"));

    // The same through replay::replay with a plain job.
    let job = Job::Paths(vec![PrefetchPath {
        path: "/etc/os-release".into(),
        whole_dir: false,
    }]);
    let options = ReplayOptions {
        concurrency: 2,
        warn: trace_tools::warn_to_stderr(),
        log: trace_tools::warn_to_stderr(),
    };
    let report = replay::replay(&stack, &job, &options, &Default::default()).unwrap();
    assert!(report.bytes > 0 && report.bytes <= 4096, "{report:?}");
}

#[test]
fn corrupt_or_truncated_trace_files_are_clear_errors() {
    let v = ReferenceVectors::unpack();
    let stack = Arc::new(vector_stack(&v, false));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.trace");
    let good = trace::encode(&[TraceRecord {
        op: Op::Read,
        layer_index: 0,
        count: 4096,
        offset: 0,
    }]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..30].to_vec(), "truncated"),
        (good[..10].to_vec(), "shorter than the 24-byte header"),
        (
            {
                let mut b = good.clone();
                b[30] ^= 1;
                b
            },
            "checksum mismatch",
        ),
        (b"relative/path\n".to_vec(), "not an absolute path"),
    ];
    for (bytes, want) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let err = Session::start(&stack, &path, 2, trace_tools::warn_to_stderr())
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(err.contains(want), "{err}");
    }
    // No file: not an error, just no trace.
    let (warn, warnings) = collecting();
    let missing = dir.path().join("missing.trace");
    assert!(matches!(
        Session::start(&stack, &missing, 2, warn).unwrap(),
        Session::Idle
    ));
    assert!(warnings.lock().unwrap()[0].contains("does not exist"));
}
