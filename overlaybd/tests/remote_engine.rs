//! The async fetch engine against the real `docker-registry` behind the
//! fault-injecting proxy with latency: many range GETs of one blob in
//! flight at once (one read of separate ranges, many reading threads, the
//! cache's separate runs), on-demand reads not queued behind prefetch, and
//! HTTP/2 through TLS ALPN to a registry that offers it.
//!
//! Timings are bounds with room: with a latency `L` per answer, N reads in
//! flight together take about `L`, one after another `N * L`.

mod remote_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use overlaybd::config::GlobalConfig;
use overlaybd::io::ReadAt;
use overlaybd::remote::auth::Anonymous;
use overlaybd::remote::cache::{BlobCache, CacheOptions};
use overlaybd::remote::registry::{Registry as Client, RegistryBlob, RegistryOptions};
use overlaybd::storage::Fetch;
use remote_support::{make_test_pki, Auth, Proxy, Registry, REGISTRY_BIN};

const REPO: &str = "obd/engine";
const LATENCY: Duration = Duration::from_millis(400);
const PIECE: usize = 64 << 10;

fn blob_bytes(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

fn options() -> RegistryOptions {
    RegistryOptions {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(5),
        tries: 2,
        backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
        deadline: Duration::from_secs(20),
        ..RegistryOptions::default()
    }
}

/// Upload `bytes` to `base`'s repository; the blob's URL.
fn upload(client: &Client, base: &str, dir: &Path, bytes: &[u8]) -> String {
    let path = dir.join("blob");
    std::fs::write(&path, bytes).unwrap();
    let (digest, _) = overlaybd::remote::sha256_file(&path).unwrap();
    let repo_url = format!("{base}/v2/{REPO}");
    client.upload_blob(&repo_url, &digest, &path).unwrap();
    format!("{repo_url}/blobs/{digest}")
}

/// A registry holding a 4 MiB blob, a proxy with [`LATENCY`] in front, and
/// a client (with `options`) whose repository is already probed: (the
/// registry, the proxy, the blob's URL through the proxy, its bytes, the
/// client).
fn setup(options: RegistryOptions) -> (Registry, Proxy, String, Vec<u8>, Arc<Client>) {
    let registry = Registry::start(Auth::Anonymous);
    let dir = tempfile::tempdir().unwrap();
    let bytes = blob_bytes(4 << 20);
    let direct = upload(
        &Client::with_credentials(self::options(), Box::new(Anonymous)),
        &registry.base(),
        dir.path(),
        &bytes,
    );
    let proxy = Proxy::start(registry.port);
    proxy.plan().latency = LATENCY;
    let url = direct.replace(&registry.base(), &proxy.base());
    let client = Arc::new(Client::with_credentials(options, Box::new(Anonymous)));
    let mut one = [0u8; 1];
    client
        .read_range(&url, bytes.len() as u64, 0, &mut one)
        .unwrap();
    (registry, proxy, url, bytes, client)
}

fn within(took: Duration, bound: Duration, what: &str) {
    eprintln!("{what}: {took:?} (bound {bound:?}, latency {LATENCY:?})");
    assert!(took < bound, "{what} took {took:?}, more than {bound:?}");
}

#[test]
fn many_range_gets_are_in_flight_at_once() {
    const N: usize = 8;
    let (_registry, proxy, url, bytes, client) = setup(options());
    let size = bytes.len() as u64;
    let blob = Arc::new(RegistryBlob::new(client.clone(), &url, size, None));
    let offsets: Vec<u64> = (0..N as u64).map(|i| i * 400_000 + 1234).collect();

    // One read of N separate ranges: all GETs sent together.
    let gets = proxy.blob_gets();
    let mut bufs = vec![vec![0u8; PIECE]; N];
    let mut parts: Vec<(u64, &mut [u8])> = offsets
        .iter()
        .zip(bufs.iter_mut())
        .map(|(&o, b)| (o, b.as_mut_slice()))
        .collect();
    let started = Instant::now();
    let results = blob.read_many_at(&mut parts);
    within(started.elapsed(), LATENCY * 2, "one read of 8 ranges");
    assert_eq!(proxy.blob_gets() - gets, N as u64);
    for ((result, buf), &o) in results.into_iter().zip(&bufs).zip(&offsets) {
        result.unwrap();
        assert!(buf[..] == bytes[o as usize..o as usize + PIECE]);
    }

    // N threads, one read each, through one client (one pool).
    let started = Instant::now();
    std::thread::scope(|scope| {
        for &o in &offsets {
            let (blob, bytes) = (&blob, &bytes);
            scope.spawn(move || {
                let mut buf = vec![0u8; PIECE];
                blob.read_exact_at(&mut buf, o + 7).unwrap();
                assert!(buf[..] == bytes[o as usize + 7..o as usize + 7 + PIECE]);
            });
        }
    });
    within(started.elapsed(), LATENCY * 2, "8 threads reading at once");

    // The cache: a read whose missing chunks form separate runs (every
    // other chunk is present) fetches the runs together.
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(CacheOptions {
        dir: cache_dir.path().to_path_buf(),
        capacity: 1 << 30,
        refill_size: PIECE as u64,
    })
    .unwrap();
    let origin: overlaybd::io::Source = blob.clone();
    let cached = cache.blob("sha256:engine", origin).unwrap();
    let mut chunk = vec![0u8; PIECE];
    for i in (1..2 * N as u64).step_by(2) {
        cached.read_exact_at(&mut chunk, i * PIECE as u64).unwrap();
    }
    let gets = proxy.blob_gets();
    let mut all = vec![0u8; 2 * N * PIECE];
    let started = Instant::now();
    cached.read_exact_at(&mut all, 0).unwrap();
    within(
        started.elapsed(),
        LATENCY * 2,
        "cache read of 8 separate runs",
    );
    assert_eq!(proxy.blob_gets() - gets, N as u64);
    assert!(all[..] == bytes[..all.len()]);
}

#[test]
fn prefetch_does_not_delay_on_demand_reads() {
    const PREFETCH: usize = 8;
    const PERMITS: usize = 2;
    let (_registry, _proxy, url, bytes, client) = setup(RegistryOptions {
        prefetch_requests: PERMITS,
        ..options()
    });
    let blob = Arc::new(RegistryBlob::new(client, &url, bytes.len() as u64, None));
    let started = Instant::now();
    let (on_demand, prefetch_done) = std::thread::scope(|scope| {
        let warmers: Vec<_> = (0..PREFETCH as u64)
            .map(|i| {
                let blob = &blob;
                scope.spawn(move || {
                    blob.warm(i * PIECE as u64, PIECE as u64).unwrap();
                    started.elapsed()
                })
            })
            .collect();
        // Prefetch saturates its class: PERMITS on the wire, the rest wait.
        std::thread::sleep(LATENCY / 4);
        let asked = Instant::now();
        let mut buf = vec![0u8; PIECE];
        let at = 3 << 20;
        blob.read_exact_at(&mut buf, at).unwrap();
        let on_demand = asked.elapsed();
        assert!(buf[..] == bytes[at as usize..at as usize + PIECE]);
        let last = warmers
            .into_iter()
            .map(|w| w.join().unwrap())
            .max()
            .unwrap();
        (on_demand, last)
    });
    within(
        on_demand,
        LATENCY * 2,
        "on-demand read while prefetch is saturated",
    );
    // The prefetch class is bounded: 8 reads, 2 at a time, ~4 latencies.
    let rounds = (PREFETCH / PERMITS) as u32;
    eprintln!("prefetch of {PREFETCH} reads with {PERMITS} permits: {prefetch_done:?}");
    assert!(
        prefetch_done >= LATENCY * rounds * 9 / 10,
        "prefetch took {prefetch_done:?}: more than {PERMITS} were on the wire"
    );
}

/// docker-registry (a Go server) over TLS offers HTTP/2 through ALPN; the
/// engine takes it, and reads give the right bytes.
#[test]
fn http2_over_tls_to_docker_registry() {
    if !Path::new(REGISTRY_BIN).exists() {
        panic!("{REGISTRY_BIN} is missing (apt-get install docker-registry)");
    }
    let dir = tempfile::tempdir().unwrap();
    make_test_pki(dir.path());
    let storage = dir.path().join("storage");
    std::fs::create_dir_all(&storage).unwrap();
    let port = remote_support::free_port();
    let config = format!(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: obd-test\n  tls:\n    certificate: {}\n    key: {}\n",
        storage.display(),
        dir.path().join("server.crt").display(),
        dir.path().join("server.key").display(),
    );
    let config_path = dir.path().join("config.yml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(REGISTRY_BIN)
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "docker-registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut global = GlobalConfig::default();
    global.cert_config.ca_file = Some(dir.path().join("ca.crt"));
    let client = Arc::new(Client::new(options(), &global).unwrap());
    let base = format!("https://127.0.0.1:{port}");
    let bytes = blob_bytes(1 << 20);
    let url = upload(&client, &base, dir.path(), &bytes);
    let blob = RegistryBlob::new(client.clone(), &url, bytes.len() as u64, None);
    let mut bufs = vec![vec![0u8; PIECE]; 4];
    let mut parts: Vec<(u64, &mut [u8])> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| ((i * 200_000) as u64, b.as_mut_slice()))
        .collect();
    for result in blob.read_many_at(&mut parts) {
        result.unwrap();
    }
    for (i, buf) in bufs.iter().enumerate() {
        assert!(buf[..] == bytes[i * 200_000..i * 200_000 + PIECE]);
    }
    assert!(
        client.http2_responses() >= 4,
        "{} of the blob GETs came over HTTP/2",
        client.http2_responses()
    );
}
