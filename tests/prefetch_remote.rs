//! Trace replay against a real registry: the stored ranges behind a
//! workload are fetched merged, before the workload, which then reads
//! only from the cache.

#[path = "../overlaybd/tests/common/mod.rs"]
mod common;
#[path = "../overlaybd/tests/remote_support/mod.rs"]
mod remote_support;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::ReferenceVectors;
use overlaybd::config::{GlobalConfig, ImageConfig};
use overlaybd::image::{open_config_global, open_config_remote, open_read_only};
use overlaybd::io::{LocalFile, ReadAt};
use overlaybd::remote::auth::Anonymous;
use overlaybd::remote::cache::CacheOptions;
use overlaybd::remote::registry::{Registry as Client, RegistryOptions};
use overlaybd::remote::Remote;
use overlaybd::stack::{PieceSource, Stack};
use overlaybd::trace::{Op, TraceRecord};
use remote_support::{Auth, Proxy, Registry};
use trace_tools::replay::{self, Job, ReplayOptions};

#[test]
fn prefetch_fetches_merged_stored_ranges_and_the_workload_then_hits_the_cache() {
    let v = ReferenceVectors::unpack();
    let files = [
        v.path("layer0.lsmt"),
        v.path("layer1.zstd8k.zfile"),
        v.path("layer2.lz416k.zfile"),
    ];
    let registry = Registry::start(Auth::Anonymous);
    let repo = format!("{}/v2/prefetch/image", registry.base());
    let client = Client::with_credentials(RegistryOptions::default(), Box::new(Anonymous));
    let mut lowers = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    for file in &files {
        let (digest, size) = overlaybd::remote::sha256_file(file).unwrap();
        client.upload_blob(&repo, &digest, file).unwrap();
        lowers.push(serde_json::json!({
            "dir": dir.path().join(digest.replace(':', "_")),
            "digest": digest,
            "size": size,
        }));
    }
    let proxy = Proxy::start(registry.port);
    let config = ImageConfig::from_json(
        &serde_json::json!({
            "repoBlobUrl": format!("{}/v2/prefetch/image/blobs", proxy.base()),
            "lowers": lowers,
        })
        .to_string(),
        "test",
    )
    .unwrap();
    let remote = Remote::with_options(
        &GlobalConfig::default(),
        RegistryOptions::default(),
        CacheOptions {
            dir: dir.path().join("cache"),
            capacity: 1 << 30,
            refill_size: 64 << 10,
        },
    )
    .unwrap();
    let stack = Arc::new(open_config_remote(&config, &remote, false).unwrap());
    let local = Stack::new(
        files.iter().map(|f| open_read_only(f).unwrap()).collect(),
        None,
    )
    .unwrap();

    // The workload: 32 KiB at every 256 KiB of the span, as a start-up
    // would read scattered files; its trace is what the stack planned.
    let workload: Vec<u64> = (0..v.span_bytes() >> 18).map(|i| i << 18).collect();
    let mut records = Vec::new();
    for &offset in &workload {
        let mut plan = Vec::new();
        stack.plan(offset, 32 << 10, &mut plan).unwrap();
        for piece in plan {
            if let PieceSource::Layer { layer, position } = piece.source {
                records.push(TraceRecord {
                    op: Op::Read,
                    layer_index: layer as u32,
                    count: piece.length,
                    offset: position as i64,
                });
            }
        }
    }
    assert!(records.len() >= 32, "{} records", records.len());

    let before = proxy.blob_gets();
    let options = ReplayOptions {
        concurrency: 4,
        warn: trace_tools::warn_to_stderr(),
        log: trace_tools::warn_to_stderr(),
    };
    let report = replay::replay(
        &stack,
        &Job::Records(records.clone()),
        &options,
        &AtomicBool::new(false),
    )
    .unwrap();
    let prefetch_gets = proxy.blob_gets() - before;
    assert_eq!(report.failed_reads, 0, "{report:?}");
    assert!(report.fetched > 0, "{report:?}");
    assert!(
        prefetch_gets < records.len() as u64,
        "{prefetch_gets} GETs for {} records: not merged",
        records.len()
    );

    // The workload now reads only from the cache, and reads right.
    let after = proxy.blob_gets();
    let mut got = vec![0u8; 32 << 10];
    let mut want = vec![0u8; 32 << 10];
    for &offset in &workload {
        stack.read(&mut got, offset).unwrap();
        local.read(&mut want, offset).unwrap();
        assert!(got == want, "bytes at {offset} differ");
    }
    assert_eq!(
        proxy.blob_gets(),
        after,
        "the workload fetched what prefetch should have"
    );
}

/// An image made by `ctr record-trace`: one registry layer (layer0.lsmt,
/// pushed to a real registry, read through a proxy that notes each
/// `Range`) and, last, the acceleration layer, a lower with only `dir`
/// holding `trace`. Returns the image config, the global config, the
/// proxy, the acceleration layer's dir and the layer file.
struct AcceleratedImage {
    _registry: Registry,
    proxy: Proxy,
    config: ImageConfig,
    global: GlobalConfig,
    accel: std::path::PathBuf,
    layer: std::path::PathBuf,
    _vectors: ReferenceVectors,
    _dir: tempfile::TempDir,
}

/// The cache's chunk: what one missing byte costs to fetch.
const CHUNK: u64 = 64 << 10;

fn accelerated_image() -> AcceleratedImage {
    let v = ReferenceVectors::unpack();
    let layer = v.path("layer0.lsmt");
    let registry = Registry::start(Auth::Anonymous);
    let repo = format!("{}/v2/accel/image", registry.base());
    let client = Client::with_credentials(RegistryOptions::default(), Box::new(Anonymous));
    let dir = tempfile::tempdir().unwrap();
    let (digest, size) = overlaybd::remote::sha256_file(&layer).unwrap();
    client.upload_blob(&repo, &digest, &layer).unwrap();
    let accel = dir.path().join("accel");
    std::fs::create_dir_all(&accel).unwrap();
    let proxy = Proxy::start(registry.port);
    let config = ImageConfig::from_json(
        &serde_json::json!({
            "repoBlobUrl": format!("{}/v2/accel/image/blobs", proxy.base()),
            "lowers": [
                {"dir": dir.path().join("layer0"), "digest": digest, "size": size},
                {"dir": accel},
            ],
            "accelerationLayer": true,
        })
        .to_string(),
        "test",
    )
    .unwrap();
    let global: GlobalConfig = serde_json::from_value(serde_json::json!({
        "cacheConfig": {"cacheDir": dir.path().join("cache"), "refillSize": CHUNK},
        "prefetchConfig": {"concurrency": 4},
    }))
    .unwrap();
    AcceleratedImage {
        _registry: registry,
        proxy,
        config,
        global,
        accel,
        layer,
        _vectors: v,
        _dir: dir,
    }
}

/// The chunks of the blob the `Range` headers the proxy saw from the
/// `from`th on asked for.
fn chunks_asked(proxy: &Proxy, from: usize) -> std::collections::BTreeSet<u64> {
    let ranges = proxy.stats.ranges.lock().unwrap();
    let mut chunks = std::collections::BTreeSet::new();
    for range in &ranges[from..] {
        let (first, last) = range
            .strip_prefix("bytes=")
            .and_then(|r| r.split_once('-'))
            .unwrap_or_else(|| panic!("Range {range:?}"));
        let (first, last): (u64, u64) = (first.parse().unwrap(), last.parse().unwrap());
        chunks.extend(first / CHUNK..=last / CHUNK);
    }
    chunks
}

/// The image is served as the daemons open it (`open_config_global`, then
/// the trace session): the acceleration layer is no layer of the stack,
/// and the replay of its trace fetches exactly the chunks behind the
/// traced ranges, which then read from the cache.
#[test]
fn the_acceleration_layer_trace_prefetches_exactly_the_traced_ranges() {
    let image = accelerated_image();
    // Scattered reads of layer 0, far from its header and index (which
    // opening fetches) and from each other (more than the replay's merge
    // gap), and one of a layer the image does not have.
    let traced: Vec<(u64, u64)> = (2..8).map(|k| (k * 4 * CHUNK + 1000, 3000)).collect();
    let mut records: Vec<TraceRecord> = traced
        .iter()
        .map(|&(offset, count)| TraceRecord {
            op: Op::Read,
            layer_index: 0,
            count,
            offset: offset as i64,
        })
        .collect();
    records.push(TraceRecord {
        op: Op::Read,
        layer_index: 7,
        count: 4096,
        offset: 0,
    });
    std::fs::write(
        image.accel.join("trace"),
        overlaybd::trace::encode(&records),
    )
    .unwrap();

    let stack = Arc::new(open_config_global(&image.config, &image.global, false).unwrap());
    assert_eq!(
        stack.lowers().len(),
        1,
        "the acceleration layer is no layer"
    );
    let opened = image.proxy.stats.ranges.lock().unwrap().len();
    assert!(opened > 0, "opening read the layer's header");
    let warnings = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = warnings.clone();
    let session = trace_tools::Session::start_for_image_warning(
        &stack,
        &image.config,
        &image.global,
        Arc::new(move |m| seen.lock().unwrap().push(m.to_string())),
    )
    .unwrap();
    let trace_tools::Session::Replaying(replay) = session else {
        panic!("the acceleration trace is not replayed");
    };
    let report = replay.wait().unwrap();
    assert_eq!(report.failed_reads, 0, "{report:?}");
    assert_eq!(report.reads, traced.len() as u64, "{report:?}");
    assert_eq!(report.skipped_records, 1, "{report:?}");
    assert!(
        warnings
            .lock()
            .unwrap()
            .iter()
            .any(|w| w.contains("layers {7}")),
        "{warnings:?}"
    );

    // The chunks behind each traced range (where the stack stores it in
    // the blob), and nothing else.
    let mut wanted = std::collections::BTreeSet::new();
    for &(offset, len) in &traced {
        let access = stack
            .access(
                PieceSource::Layer {
                    layer: 0,
                    position: offset,
                },
                len,
            )
            .unwrap();
        let overlaybd::storage::Access::Plain(overlaybd::storage::At::Fetch { offset, .. }) =
            access
        else {
            panic!("layer 0 is a registry blob");
        };
        wanted.extend(offset / CHUNK..=(offset + len - 1) / CHUNK);
    }
    assert_eq!(chunks_asked(&image.proxy, opened), wanted);
    assert_eq!(report.fetched, wanted.len() as u64 * CHUNK, "{report:?}");

    // The traced ranges now read from the cache, and read right.
    let gets = image.proxy.blob_gets();
    let local = LocalFile::open(&image.layer).unwrap();
    for &(offset, len) in &traced {
        let mut got = vec![0u8; len as usize];
        let mut want = vec![0u8; len as usize];
        stack.lowers()[0]
            .source()
            .read_exact_at(&mut got, offset)
            .unwrap();
        local.read_exact_at(&mut want, offset).unwrap();
        assert!(got == want, "layer bytes at {offset} differ");
    }
    assert_eq!(
        image.proxy.blob_gets(),
        gets,
        "a traced range was fetched again"
    );
}

/// A missing, empty or corrupt acceleration trace: a message naming the
/// trace and what is wrong with it, no prefetch, and the image is served.
#[test]
fn a_missing_or_corrupt_acceleration_trace_is_named_and_the_image_served() {
    let image = accelerated_image();
    let trace = image.accel.join("trace");
    let mut valid = overlaybd::trace::encode(&[TraceRecord {
        op: Op::Read,
        layer_index: 0,
        count: 4096,
        offset: 1 << 20,
    }]);
    valid.truncate(valid.len() - 3);
    let cases: [(&str, Option<Vec<u8>>, &str); 4] = [
        ("missing", None, "has no trace"),
        ("empty", Some(Vec::new()), "trace is empty"),
        (
            "garbage",
            Some(b"\x01\x02 not a trace".to_vec()),
            "bad trace list",
        ),
        ("truncated", Some(valid), "bad trace file: truncated"),
    ];
    let stack = Arc::new(open_config_global(&image.config, &image.global, false).unwrap());
    let local = LocalFile::open(&image.layer).unwrap();
    for (name, bytes, says) in cases {
        match &bytes {
            None => {
                let _ = std::fs::remove_file(&trace);
            }
            Some(bytes) => std::fs::write(&trace, bytes).unwrap(),
        }
        let warnings = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = warnings.clone();
        let before = image.proxy.blob_gets();
        let outcome = trace_tools::Session::start_for_image_warning(
            &stack,
            &image.config,
            &image.global,
            Arc::new(move |m| seen.lock().unwrap().push(m.to_string())),
        );
        let message = match outcome {
            Ok(trace_tools::Session::Idle) => {
                let warnings = warnings.lock().unwrap();
                assert_eq!(warnings.len(), 1, "{name}: {warnings:?}");
                warnings[0].clone()
            }
            Ok(_) => panic!("{name}: a trace session started"),
            // What the daemons log as "trace not started: ...".
            Err(e) => e.to_string(),
        };
        assert!(message.contains(says), "{name}: {message}");
        assert!(
            message.contains(&*trace.display().to_string()),
            "{name}: {message}"
        );
        assert_eq!(
            image.proxy.blob_gets(),
            before,
            "{name}: something was prefetched"
        );
        // Still served: a read through the image is right.
        let mut got = vec![0u8; 4096];
        let mut want = vec![0u8; 4096];
        stack.lowers()[0]
            .source()
            .read_exact_at(&mut got, 3 << 20)
            .unwrap();
        local.read_exact_at(&mut want, 3 << 20).unwrap();
        assert!(got == want, "{name}: wrong bytes");
    }
}
