//! Registry blobs against the real `docker-registry`: anonymous, Basic and
//! token auth serving the reference stacks; faults injected by a proxy;
//! the blob cache (eviction, restart, single flight); background download.

mod common;
mod remote_support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{sha256_hex, ReferenceVectors};
use overlaybd::config::{GlobalConfig, ImageConfig};
use overlaybd::image::open_config_remote;
use overlaybd::io::ReadAt;
use overlaybd::remote::auth::{Anonymous, CredentialSource};
use overlaybd::remote::cache::CacheOptions;
use overlaybd::remote::registry::{Registry as Client, RegistryOptions};
use overlaybd::remote::{errno_of, Remote};
use overlaybd::stack::{PieceSource, Plan, Stack};
use remote_support::{Auth, Fault, Proxy, Registry, UploadFault, PASSWORD, USER};

const REPO: &str = "obd/ref";

/// The layer files pushed: plain LSMT, zstd ZFile, lz4 ZFile.
fn layer_files(v: &ReferenceVectors) -> Vec<PathBuf> {
    ["layer0.lsmt", "layer1.zstd8k.zfile", "layer2.lz416k.zfile"]
        .iter()
        .map(|n| v.path(n))
        .collect()
}

fn credentials_for(port: u16) -> overlaybd::credentials::Credentials {
    overlaybd::credentials::Credentials::from_json(
        &format!(
            r#"{{"auths":{{"127.0.0.1:{port}":{{"username":"{USER}","password":"{PASSWORD}"}}}}}}"#
        ),
        "test",
    )
    .unwrap()
}

/// Push the reference layers; (digest, size) per layer.
fn push(registry: &Registry, v: &ReferenceVectors) -> Vec<(String, u64)> {
    let credentials: Box<dyn CredentialSource> = Box::new(credentials_for(registry.port));
    let client = Client::with_credentials(RegistryOptions::default(), credentials);
    let repo_url = format!("{}/v2/{REPO}", registry.base());
    layer_files(v)
        .iter()
        .map(|path| {
            let bytes = std::fs::read(path).unwrap();
            let digest = format!("sha256:{}", sha256_hex(&bytes));
            if !client.blob_exists(&repo_url, &digest).unwrap() {
                client.upload_blob(&repo_url, &digest, path).unwrap();
            }
            assert!(client.blob_exists(&repo_url, &digest).unwrap());
            (digest, bytes.len() as u64)
        })
        .collect()
}

/// An image config for layers `0..=top`, read from `base` (a registry or
/// a proxy); each lower's `dir` is under `work`.
fn image(base: &str, layers: &[(String, u64)], top: usize, work: &Path) -> ImageConfig {
    let lowers: Vec<serde_json::Value> = layers[..=top]
        .iter()
        .map(|(digest, size)| {
            serde_json::json!({
                "dir": work.join(digest.replace(':', "_")),
                "digest": digest,
                "size": size,
            })
        })
        .collect();
    let json = serde_json::json!({
        "repoBlobUrl": format!("{base}/v2/{REPO}/blobs"),
        "lowers": lowers,
    });
    ImageConfig::from_json(&json.to_string(), "test config").unwrap()
}

fn fast_options() -> RegistryOptions {
    RegistryOptions {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(1),
        tries: 6,
        backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        deadline: Duration::from_secs(15),
        ..RegistryOptions::default()
    }
}

fn global_with(credentials: Option<&Path>) -> GlobalConfig {
    let mut global = GlobalConfig::default();
    global.credential_config.path = credentials.map(|p| p.display().to_string());
    global
}

fn make_remote(global: &GlobalConfig, cache: &Path, capacity: u64, refill: u64) -> Remote {
    Remote::with_options(
        global,
        fast_options(),
        CacheOptions {
            dir: cache.to_path_buf(),
            capacity,
            refill_size: refill,
        },
    )
    .unwrap()
}

/// A remote with the default global config and a 1 GiB cache in `cache`.
fn plain_remote(cache: &Path, refill: u64) -> Remote {
    make_remote(&GlobalConfig::default(), cache, 1 << 30, refill)
}

/// A remote with credentials for `port` (a credential file in `dir`) and a
/// 1 GiB cache in `dir`/cache.
fn remote_with_credentials(dir: &Path, port: u16, refill: u64) -> Remote {
    let creds = remote_support::write_credential_file(dir, port);
    make_remote(
        &global_with(Some(&creds)),
        &dir.join("cache"),
        1 << 30,
        refill,
    )
}

/// Every stack of the reference vectors through `remote`, from `base`.
fn serve_all_stacks(v: &ReferenceVectors, remote: &Remote, base: &str, layers: &[(String, u64)]) {
    let work = tempfile::tempdir().unwrap();
    for n in 0..layers.len() {
        let config = image(base, layers, n, work.path());
        let stack = open_config_remote(&config, remote, false).unwrap();
        assert_eq!(stack.virtual_size(), 1 << 30);
        v.assert_stack_matches(&stack, n);
    }
}

#[test]
fn anonymous_registry_serves_reference_stacks_lazily() {
    let (v, registry, layers) = pushed(Auth::Anonymous);
    let cache = tempfile::tempdir().unwrap();
    let remote = plain_remote(cache.path(), 64 << 10);
    // Opening the image fetches headers and indexes only.
    let work = tempfile::tempdir().unwrap();
    let config = image(&registry.base(), &layers, 2, work.path());
    let stack = open_config_remote(&config, &remote, false).unwrap();
    let total: u64 = layers.iter().map(|(_, s)| s).sum();
    let fetched = remote.cache().unwrap().fetched();
    assert!(
        fetched * 4 < total,
        "opening fetched {fetched} of {total} bytes: not lazy"
    );
    // The first MiB needs a little more, still not everything. Until it
    // is read, some of its pieces may wait on the registry (front ends run
    // those off their queue threads); after, none does.
    let first_mib_is_local = |stack: &Stack| {
        let mut plan = Plan::default();
        stack.plan(0, 1 << 20, &mut plan).unwrap();
        assert!(plan.iter().any(|p| p.source != PieceSource::Zero));
        plan.iter().all(|p| {
            let access = stack.access(p.source, p.length).unwrap();
            !access.may_fetch(p.length)
        })
    };
    assert!(!first_mib_is_local(&stack));
    let mut buf = vec![0u8; 1 << 20];
    stack.read(&mut buf, 0).unwrap();
    assert_eq!(sha256_hex(&buf), v.stack_sha256_per_mib(2)[0]);
    assert!(first_mib_is_local(&stack));
    assert!(remote.cache().unwrap().fetched() < total);
    drop(stack);
    serve_all_stacks(&v, &remote, &registry.base(), &layers);
}

/// With credentials, `registry` serves every reference stack; without them,
/// opening the image fails. Returns that error and how long it took.
fn serves_with_credentials_refuses_without(auth: Auth) -> (overlaybd::Error, Duration) {
    let (v, registry, layers) = pushed(auth);
    let dir = tempfile::tempdir().unwrap();
    let with_credentials = remote_with_credentials(dir.path(), registry.port, 256 << 10);
    serve_all_stacks(&v, &with_credentials, &registry.base(), &layers);

    let without_credentials = make_remote(
        &global_with(None),
        &dir.path().join("c2"),
        1 << 30,
        256 << 10,
    );
    let started = Instant::now();
    let config = image(&registry.base(), &layers, 0, dir.path());
    let err = open_config_remote(&config, &without_credentials, false)
        .err()
        .expect("must fail");
    (err, started.elapsed())
}

#[test]
fn basic_auth_registry_serves_reference_stacks() {
    // Without credentials: EPERM, at once, naming the URL and no secret.
    let (err, elapsed) = serves_with_credentials_refuses_without(Auth::Basic);
    assert_eq!(err.errno(), libc::EPERM, "{err}");
    assert!(
        err.to_string().contains("/v2/obd/ref/blobs/sha256:"),
        "{err}"
    );
    assert!(elapsed < Duration::from_secs(5));
}

#[test]
fn token_auth_registry_serves_reference_stacks() {
    let (err, _) = serves_with_credentials_refuses_without(Auth::Token);
    assert_eq!(err.errno(), libc::EPERM, "{err}");
    assert!(!err.to_string().contains(PASSWORD));
}

#[test]
fn missing_blob_is_enoent() {
    let registry = Registry::start(Auth::Anonymous);
    let client = Arc::new(Client::with_credentials(
        fast_options(),
        Box::new(Anonymous),
    ));
    let url = format!(
        "{}/v2/{REPO}/blobs/sha256:{}",
        registry.base(),
        "0".repeat(64)
    );
    let blob = overlaybd::remote::registry::RegistryBlob::new(client, &url, 100, None);
    let err = blob.read_exact_at(&mut [0u8; 10], 0).unwrap_err();
    assert_eq!(errno_of(&err), libc::ENOENT, "{err}");
}

/// The value of one of a proxy's counters.
fn count(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A registry with `auth` holding the reference layers: the vectors, the
/// registry, and (digest, size) per layer.
fn pushed(auth: Auth) -> (ReferenceVectors, Registry, Vec<(String, u64)>) {
    let v = ReferenceVectors::unpack();
    let registry = Registry::start(auth);
    let layers = push(&registry, &v);
    (v, registry, layers)
}

/// [`pushed`], and a proxy in front of the registry.
fn proxied(auth: Auth) -> (ReferenceVectors, Registry, Vec<(String, u64)>, Proxy) {
    let (v, registry, layers) = pushed(auth);
    let proxy = Proxy::start(registry.port);
    (v, registry, layers, proxy)
}

/// An upload whose request or answer is lost is not sent again into the
/// same session (the registry dropped it, or took the blob already): the
/// blob is looked for, and sent in a new session when it is not there.
#[test]
fn uploads_survive_a_lost_request_and_a_lost_answer() {
    let v = ReferenceVectors::unpack();
    let registry = Registry::start(Auth::Anonymous);
    let proxy = Proxy::start(registry.port);
    proxy
        .plan()
        .upload_faults
        .extend([UploadFault::LostAnswer, UploadFault::LostRequest]);
    let client = Client::with_credentials(fast_options(), Box::new(Anonymous));
    let repo_url = format!("{}/v2/{REPO}", proxy.base());
    for path in layer_files(&v).iter().take(2) {
        let bytes = std::fs::read(path).unwrap();
        let digest = format!("sha256:{}", sha256_hex(&bytes));
        client.upload_blob(&repo_url, &digest, path).unwrap();
        let mut back = vec![0u8; bytes.len()];
        client
            .read_range(
                &format!("{repo_url}/blobs/{digest}"),
                bytes.len() as u64,
                0,
                &mut back,
            )
            .unwrap();
        assert!(back == bytes, "{digest} reads back different bytes");
    }
    assert_eq!(count(&proxy.stats.faults), 2);
}

/// The upload progress hook hears every byte of each session, in order:
/// a session whose request is lost (the proxy read the whole body, then
/// reset the connection) is counted to the end, and the new session the
/// client opens counts again from the start to the blob's size.
#[test]
fn upload_progress_counts_each_session_to_the_blob_size() {
    let v = ReferenceVectors::unpack();
    let registry = Registry::start(Auth::Anonymous);
    let proxy = Proxy::start(registry.port);
    proxy
        .plan()
        .upload_faults
        .push_back(UploadFault::LostRequest);
    // The default timeouts: a PUT that timed out on a loaded machine would
    // be one more session.
    let client = Client::with_credentials(RegistryOptions::default(), Box::new(Anonymous));
    let repo_url = format!("{}/v2/{REPO}", proxy.base());
    let path = &layer_files(&v)[0];
    let bytes = std::fs::read(path).unwrap();
    let len = bytes.len() as u64;
    assert!(len > 2 << 20, "the layer should take several pieces");
    let digest = format!("sha256:{}", sha256_hex(&bytes));
    for faulted in [true, false] {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let hook = {
            let seen = seen.clone();
            Arc::new(move |sent: u64| seen.lock().unwrap().push(sent))
        };
        let repo = if faulted {
            repo_url.clone()
        } else {
            format!("{}/v2/obd/again", registry.base())
        };
        client
            .upload_blob_with_progress(&repo, &digest, path, hook)
            .unwrap();
        assert!(client.blob_exists(&repo, &digest).unwrap());
        let seen = seen.lock().unwrap().clone();
        // Split into sessions where the count goes back.
        let mut sessions: Vec<Vec<u64>> = vec![Vec::new()];
        for (i, &sent) in seen.iter().enumerate() {
            if i > 0 && sent <= seen[i - 1] {
                sessions.push(Vec::new());
            }
            sessions.last_mut().unwrap().push(sent);
        }
        assert_eq!(sessions.len(), if faulted { 2 } else { 1 }, "{seen:?}");
        for session in &sessions {
            assert_eq!(*session.last().unwrap(), len, "{seen:?}");
            assert!(
                session.len() >= 2,
                "one report for the whole blob: {seen:?}"
            );
        }
    }
    assert_eq!(count(&proxy.stats.faults), 1);
}

/// A cross-repository mount: the blob appears in the second repository
/// without a byte sent (no upload `PUT` through the proxy) and reads back
/// right; from a repository that lacks it, the registry opens an upload
/// session instead (202), `mount_blob` says so and the upload that follows
/// works.
#[test]
fn a_blob_is_mounted_from_another_repository_not_sent_again() {
    let v = ReferenceVectors::unpack();
    let registry = Registry::start(Auth::Anonymous);
    let proxy = Proxy::start(registry.port);
    let client = Client::with_credentials(RegistryOptions::default(), Box::new(Anonymous));
    let repo = |name: &str| format!("{}/v2/{name}", proxy.base());
    let path = &layer_files(&v)[1];
    let bytes = std::fs::read(path).unwrap();
    let digest = format!("sha256:{}", sha256_hex(&bytes));
    client
        .upload_blob(&repo("obd/first"), &digest, path)
        .unwrap();
    assert_eq!(count(&proxy.stats.upload_puts), 1);

    assert!(client
        .mount_blob(&repo("obd/second"), &digest, "obd/first")
        .unwrap());
    assert_eq!(count(&proxy.stats.upload_puts), 1, "mounted, not sent");
    let mut back = vec![0u8; bytes.len()];
    client
        .read_range(
            &format!("{}/blobs/{digest}", repo("obd/second")),
            bytes.len() as u64,
            0,
            &mut back,
        )
        .unwrap();
    assert!(back == bytes, "the mounted blob reads back different bytes");

    assert!(!client
        .mount_blob(&repo("obd/third"), &digest, "obd/nothing-here")
        .unwrap());
    assert!(!client.blob_exists(&repo("obd/third"), &digest).unwrap());
    assert_eq!(count(&proxy.stats.upload_puts), 1);
    client
        .upload_blob(&repo("obd/third"), &digest, path)
        .unwrap();
    assert_eq!(count(&proxy.stats.upload_puts), 2);
    assert!(client.blob_exists(&repo("obd/third"), &digest).unwrap());
}

#[test]
fn injected_faults_are_retried_and_never_give_wrong_bytes() {
    let (v, _registry, layers, proxy) = proxied(Auth::Anonymous);
    {
        let mut plan = proxy.plan();
        plan.queue.extend([
            Fault::Status(503),
            Fault::Reset,
            Fault::Truncate,
            Fault::Stall(Duration::from_secs(3)),
            Fault::Status(500),
            Fault::Status(429),
        ]);
        plan.every = Some((3, Fault::Truncate));
    }
    let cache = tempfile::tempdir().unwrap();
    let remote = plain_remote(cache.path(), 64 << 10);
    serve_all_stacks(&v, &remote, &proxy.base(), &layers);
    assert!(count(&proxy.stats.faults) >= 6);
}

#[test]
fn persistent_failures_fail_clearly_in_bounded_time() {
    let (_v, _registry, layers, proxy) = proxied(Auth::Anonymous);
    let cases = [
        (Fault::Status(503), libc::EIO, "HTTP 503"),
        (Fault::Status(429), libc::EBUSY, "429"),
        (
            Fault::Stall(Duration::from_secs(30)),
            libc::ETIMEDOUT,
            "timed out",
        ),
        (Fault::Truncate, libc::EIO, "body"),
        (Fault::Status(403), libc::EPERM, "403"),
    ];
    for (fault, errno, text) in cases {
        proxy.plan().always = Some(fault);
        let cache = tempfile::tempdir().unwrap();
        let remote = plain_remote(cache.path(), 64 << 10);
        let work = tempfile::tempdir().unwrap();
        let config = image(&proxy.base(), &layers, 0, work.path());
        let started = Instant::now();
        let err = open_config_remote(&config, &remote, false)
            .err()
            .expect("must fail");
        let took = started.elapsed();
        assert_eq!(err.errno(), errno, "{fault:?}: {err}");
        assert!(err.to_string().contains(text), "{fault:?}: {err}");
        assert!(took < Duration::from_secs(20), "{fault:?} took {took:?}");
    }
}

#[test]
fn throttled_link_with_latency_reads_correctly() {
    let (v, _registry, layers, proxy) = proxied(Auth::Anonymous);
    {
        let mut plan = proxy.plan();
        plan.latency = Duration::from_millis(20);
        plan.rate = 20 << 20;
    }
    let cache = tempfile::tempdir().unwrap();
    let remote = plain_remote(cache.path(), 256 << 10);
    serve_all_stacks(&v, &remote, &proxy.base(), &layers[..1]);
}

#[test]
fn token_auth_through_faulty_proxy() {
    let (v, registry, layers, proxy) = proxied(Auth::Token);
    proxy.plan().every = Some((4, Fault::Status(502)));
    let dir = tempfile::tempdir().unwrap();
    let remote = remote_with_credentials(dir.path(), proxy.port, 256 << 10);
    serve_all_stacks(&v, &remote, &proxy.base(), &layers);
    // One probe per repository, then tokens are reused: few non-blob requests.
    let total = count(&proxy.stats.requests);
    assert!(total >= proxy.blob_gets());
    drop(registry);
}

#[test]
fn eviction_keeps_usage_under_capacity() {
    let (v, registry, layers) = pushed(Auth::Anonymous);
    let cache_dir = tempfile::tempdir().unwrap();
    let capacity = 3 << 20;
    let remote = make_remote(
        &GlobalConfig::default(),
        cache_dir.path(),
        capacity,
        64 << 10,
    );
    let work = tempfile::tempdir().unwrap();
    let cache = remote.cache().unwrap();
    for n in 0..layers.len() {
        let config = image(&registry.base(), &layers, n, work.path());
        let stack = open_config_remote(&config, &remote, false).unwrap();
        let expected = v.stack_sha256_per_mib(n);
        let mut buf = vec![0u8; 1 << 20];
        for (mib, want) in expected.iter().enumerate() {
            stack.read(&mut buf, (mib as u64) << 20).unwrap();
            assert_eq!(&sha256_hex(&buf), want, "stack 0..={n}, MiB {mib}");
            assert!(cache.used() <= capacity, "{} > {capacity}", cache.used());
        }
    }
    assert!(
        cache.evictions() > 0,
        "the test should have needed eviction"
    );
    // What the directory holds agrees with the accounting.
    let on_disk: u64 = std::fs::read_dir(cache_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "data"))
        .map(|p| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).unwrap().blocks() * 512
        })
        .sum();
    assert!(on_disk <= capacity + (1 << 20), "{on_disk} bytes on disk");
}

#[test]
fn restart_reuses_cached_chunks() {
    let (v, _registry, layers, proxy) = proxied(Auth::Anonymous);
    let cache = tempfile::tempdir().unwrap();
    {
        let remote = plain_remote(cache.path(), 128 << 10);
        serve_all_stacks(&v, &remote, &proxy.base(), &layers);
    }
    let before = proxy.blob_gets();
    assert!(before > 0);
    // Files are private to the daemon.
    for entry in std::fs::read_dir(cache.path()).unwrap() {
        use std::os::unix::fs::PermissionsExt;
        let mode = entry.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let remote = plain_remote(cache.path(), 128 << 10);
    serve_all_stacks(&v, &remote, &proxy.base(), &layers);
    assert_eq!(proxy.blob_gets(), before, "a restart fetched again");

    // A damaged cached chunk is noticed (CRC) and fetched again.
    drop(remote);
    let data = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "data"))
        .unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&[0x5a; 4096], 0).unwrap();
    let remote = plain_remote(cache.path(), 128 << 10);
    serve_all_stacks(&v, &remote, &proxy.base(), &layers);
    assert!(proxy.blob_gets() > before);
}

#[test]
fn concurrent_readers_of_one_chunk_fetch_it_once() {
    let (_v, _registry, layers, proxy) = proxied(Auth::Anonymous);
    let cache_dir = tempfile::tempdir().unwrap();
    let remote = plain_remote(cache_dir.path(), 1 << 20);
    let work = tempfile::tempdir().unwrap();
    let config = image(&proxy.base(), &layers, 0, work.path());
    let (digest, size) = &layers[0];
    let blob = remote.open_blob(&config, digest, *size).unwrap();
    // Warm up (probe) on another chunk, then slow the link down.
    blob.read_exact_at(&mut [0u8; 16], 0).unwrap();
    proxy.plan().latency = Duration::from_millis(300);
    let before = proxy.blob_gets();
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let blob = blob.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                blob.read_exact_at(&mut buf, (3 << 20) + i * 8192).unwrap();
                buf
            })
        })
        .collect();
    let results: Vec<Vec<u8>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    assert_eq!(proxy.blob_gets() - before, 1, "one chunk, one fetch");
    let local = std::fs::read(ReferenceVectors::unpack().path("layer0.lsmt")).unwrap();
    for (i, got) in results.iter().enumerate() {
        let at = (3 << 20) + i * 8192;
        assert_eq!(got[..], local[at..at + 4096]);
    }
}

#[test]
fn background_download_installs_the_layer_and_switches_reads() {
    let (v, mut registry, layers) = pushed(Auth::Anonymous);
    let mut global = GlobalConfig::default();
    global.download.enable = true;
    global.download.delay = 0;
    global.download.delay_extra = 0;
    global.download.max_mbps = 50;
    let cache = tempfile::tempdir().unwrap();
    let remote = make_remote(&global, cache.path(), 1 << 30, 256 << 10);
    let work = tempfile::tempdir().unwrap();
    let config = image(&registry.base(), &layers, 2, work.path());
    let stack = open_config_remote(&config, &remote, false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while remote.download_status().1 < 3 {
        assert!(Instant::now() < deadline, "downloads did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    for (digest, _) in &layers {
        let path = work
            .path()
            .join(digest.replace(':', "_"))
            .join("overlaybd.commit");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(format!("sha256:{}", sha256_hex(&bytes)), *digest);
    }
    // With the registry gone, every byte still reads (from the files).
    registry.stop();
    v.assert_stack_matches(&stack, 2);
}

#[test]
fn p2p_peer_failure_falls_back_to_the_registry() {
    let (v, registry, layers) = pushed(Auth::Anonymous);
    let mut global = GlobalConfig::default();
    global.p2p_config.enable = true;
    global.p2p_config.address = Some(format!("http://127.0.0.1:{}", remote_support::free_port()));
    let cache = tempfile::tempdir().unwrap();
    let remote = make_remote(&global, cache.path(), 1 << 30, 256 << 10);
    serve_all_stacks(&v, &remote, &registry.base(), &layers[..1]);
}

#[test]
fn a_failing_p2p_peer_is_skipped_for_a_while() {
    let (v, registry, layers) = pushed(Auth::Anonymous);
    // A peer that answers every blob GET with 503.
    let peer = Proxy::start(registry.port);
    peer.plan().always = Some(Fault::Status(503));
    let mut global = GlobalConfig::default();
    global.p2p_config.enable = true;
    global.p2p_config.address = Some(peer.base());
    let cache = tempfile::tempdir().unwrap();
    let remote = make_remote(&global, cache.path(), 1 << 30, 64 << 10);
    serve_all_stacks(&v, &remote, &registry.base(), &layers[..1]);
    // Opening the image reads both ends of the blob at once: both may ask
    // the peer before its first failure is known; nothing after that does.
    assert!(
        peer.blob_gets() <= 2,
        "after its first failure the peer is skipped, not asked on every miss: {} asks",
        peer.blob_gets()
    );
}

#[test]
fn redirects_to_storage_are_cached_and_followed_without_credentials() {
    let (v, _registry, layers, proxy) = proxied(Auth::Basic);
    proxy.plan().redirect = true;
    let dir = tempfile::tempdir().unwrap();
    let remote = remote_with_credentials(dir.path(), proxy.port, 64 << 10);
    serve_all_stacks(&v, &remote, &proxy.base(), &layers);
    let redirects = count(&proxy.stats.redirects);
    let storage = count(&proxy.stats.storage_gets);
    // At most two redirects per blob (opening the image reads both ends of
    // every blob at once, before either redirect is known), then the
    // cached location serves every read.
    assert!(
        redirects <= layers.len() as u64 * 2,
        "{redirects} redirects"
    );
    // Most storage reads went there straight, without asking the registry
    // (how many reads a stack takes varies with read-ahead timing).
    assert!(
        storage >= redirects * 2,
        "{storage} storage reads, {redirects} redirects"
    );
    assert_eq!(
        count(&proxy.stats.storage_with_auth),
        0,
        "credentials were sent to blob storage"
    );
}

/// A ZFile block whose bytes were corrupted on the way is caught by its
/// CRC, dropped from the cache and fetched again: every export is right,
/// although a third of the blob GETs deliver a flipped byte. (A plain layer
/// has no check below the whole-blob digest, so only ZFile layers are
/// served here.)
#[test]
fn flipped_bytes_in_zfile_blocks_are_fetched_again_not_cached() {
    let (v, _registry, layers, proxy) = proxied(Auth::Anonymous);
    proxy.plan().mix = Some((2, vec![Fault::FlipByte, Fault::Reset, Fault::FlipByte]));
    let cache = tempfile::tempdir().unwrap();
    // Small chunks, so that there are many GETs to corrupt.
    let remote = plain_remote(cache.path(), 4 << 10);
    let work = tempfile::tempdir().unwrap();
    let files = layer_files(&v);
    for n in 1..layers.len() {
        let zfile_only = vec![layers[n].clone()];
        let config = image(&proxy.base(), &zfile_only, 0, work.path());
        let remote_stack = open_config_remote(&config, &remote, false).unwrap();
        let local = overlaybd::image::open_read_only(&files[n]).unwrap();
        let local_stack = Stack::new(vec![local], None).unwrap();
        let mut got = vec![0u8; 64 << 10];
        let mut want = vec![0u8; 64 << 10];
        for piece in 0..v.span_bytes() >> 16 {
            remote_stack.read(&mut got, piece << 16).unwrap();
            local_stack.read(&mut want, piece << 16).unwrap();
            assert!(got == want, "layer {n}, 64 KiB piece {piece} differs");
        }
    }
    let faults = count(&proxy.stats.faults);
    assert!(faults >= 5, "the test needs faults: {faults}");
}
