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
use overlaybd::image::{open_config_remote, open_read_only};
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
