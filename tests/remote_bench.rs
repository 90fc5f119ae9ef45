//! Lazy loading vs full download, through a throttled link (ignored by
//! default; `bash scripts/bench-remote.sh` runs it in release mode).
//!
//! A 256 MiB incompressible image is pushed to a local docker-registry and
//! read through the test proxy at 20 ms latency and 100 Mbit/s: first a
//! lazy read of ~3 % of it (random 1 MiB reads through the blob cache, a
//! fresh cache), then a full download of the blob. Prints times, bytes
//! fetched and the ratio.

#[path = "../overlaybd/tests/common/mod.rs"]
mod common;
#[path = "../overlaybd/tests/remote_support/mod.rs"]
mod remote_support;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use overlaybd::config::{GlobalConfig, ImageConfig};
use overlaybd::remote::auth::Anonymous;
use overlaybd::remote::cache::{BlobCache, CacheOptions};
use overlaybd::remote::registry::{Registry as Client, RegistryBlob, RegistryOptions};
use overlaybd::remote::Remote;
use remote_support::{Auth, Proxy, Registry};

const IMAGE_MIB: u64 = 256;
const READ_MIB: u64 = 8;
const LATENCY: Duration = Duration::from_millis(20);
const RATE: u64 = 100_000_000 / 8;

#[test]
#[ignore = "benchmark: bash scripts/bench-remote.sh"]
fn lazy_read_vs_full_download() {
    let dir = tempfile::tempdir().unwrap();
    // An incompressible raw disk, imported as a plain LSMT layer.
    let raw = dir.path().join("disk.raw");
    let mut data = vec![0u8; (IMAGE_MIB << 20) as usize];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for word in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&raw, &data).unwrap();
    drop(data);
    let layer = dir.path().join("layer.lsmt");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_obd"))
        .args(["import", raw.to_str().unwrap(), layer.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (digest, size) = overlaybd::remote::sha256_file(&layer).unwrap();

    let registry = Registry::start(Auth::Anonymous);
    let repo = format!("{}/v2/bench/image", registry.base());
    let client = Client::with_credentials(RegistryOptions::default(), Box::new(Anonymous));
    client.upload_blob(&repo, &digest, &layer).unwrap();
    let proxy = Proxy::start(registry.port);
    {
        let mut plan = proxy.plan();
        plan.latency = LATENCY;
        plan.rate = RATE;
    }
    let base = proxy.base();

    // Lazy: open the image, then read READ_MIB scattered MiBs.
    let config = ImageConfig::from_json(
        &serde_json::json!({
            "repoBlobUrl": format!("{base}/v2/bench/image/blobs"),
            "lowers": [{"dir": dir.path().join("layer-dir"), "digest": digest, "size": size}],
        })
        .to_string(),
        "bench",
    )
    .unwrap();
    let cache_options = CacheOptions {
        dir: dir.path().join("cache"),
        capacity: 1 << 30,
        refill_size: 256 << 10,
    };
    let remote = Remote::with_options(
        &GlobalConfig::default(),
        RegistryOptions::default(),
        cache_options.clone(),
    )
    .unwrap();
    let started = Instant::now();
    let stack = overlaybd::image::open_config_remote(&config, &remote, false).unwrap();
    let opened = started.elapsed();
    let open_bytes = proxy.body_bytes();
    let mut buf = vec![0u8; 1 << 20];
    let step = IMAGE_MIB / READ_MIB;
    for i in 0..READ_MIB {
        let mib = (i * step + (i * 7) % step) % IMAGE_MIB;
        stack.read(&mut buf, mib << 20).unwrap();
    }
    let lazy = started.elapsed();
    let lazy_bytes = proxy.body_bytes();
    drop(stack);

    // Full: the whole blob, as the background download fetches it.
    let before = proxy.body_bytes();
    let origin = Arc::new(RegistryBlob::new(
        Arc::new(Client::with_credentials(
            RegistryOptions::default(),
            Box::new(Anonymous),
        )),
        &format!("{base}/v2/bench/image/blobs/{digest}"),
        size,
        None,
    ));
    let cache = BlobCache::open(CacheOptions {
        dir: dir.path().join("cache-full"),
        ..cache_options
    })
    .unwrap();
    let blob = cache.blob(&digest, origin).unwrap();
    let started = Instant::now();
    overlaybd::remote::download::download_blob(
        &blob,
        &digest,
        &dir.path().join("full"),
        4 << 20,
        0,
        &AtomicBool::new(false),
    )
    .unwrap();
    let full = started.elapsed();
    let full_bytes = proxy.body_bytes() - before;

    println!(
        "link: {} ms latency, {} Mbit/s; image {IMAGE_MIB} MiB (blob {size} bytes)",
        LATENCY.as_millis(),
        RATE * 8 / 1_000_000
    );
    println!(
        "lazy: open {opened:.2?} ({open_bytes} bytes), open + {READ_MIB} random MiB reads {lazy:.2?}, {lazy_bytes} bytes fetched ({:.1} % of the blob)",
        lazy_bytes as f64 * 100.0 / size as f64
    );
    println!("full download: {full:.2?}, {full_bytes} bytes fetched");
    println!(
        "full / lazy time: {:.1}x; bytes: {:.1}x",
        full.as_secs_f64() / lazy.as_secs_f64(),
        full_bytes as f64 / lazy_bytes.max(1) as f64
    );
}
