//! `obd push` into a real registry, then `obd export --config` of the
//! pushed image: the same bytes as exporting the local layers.

#[path = "../overlaybd/tests/common/mod.rs"]
mod common;
#[path = "../overlaybd/tests/remote_support/mod.rs"]
mod remote_support;

mod obd_cli;
use obd_cli::{obd_err, obd_ok, obd_stdout, s, start_serve, stop_serve};
use std::path::{Path, PathBuf};

use common::ReferenceVectors;
use remote_support::{Auth, Fault, Proxy, Registry, PASSWORD, USER};

fn global_config(dir: &Path, port: u16) -> PathBuf {
    let creds = dir.join("cred.json");
    std::fs::write(
        &creds,
        format!(
            r#"{{"auths":{{"127.0.0.1:{port}":{{"username":"{USER}","password":"{PASSWORD}"}}}}}}"#
        ),
    )
    .unwrap();
    let global = dir.join("overlaybd.json");
    std::fs::write(
        &global,
        serde_json::json!({
            "cacheConfig": {"cacheDir": dir.join("cache"), "cacheSizeGB": 1, "refillSize": 262144},
            "credentialConfig": {"mode": "file", "path": creds},
        })
        .to_string(),
    )
    .unwrap();
    global
}

/// `obd push` of `layers` to the registry's repository team/ref, writing the
/// image config to `config`. Returns its stdout.
fn push(registry: &Registry, global: &Path, config: &Path, layers: &[PathBuf]) -> String {
    let repo = format!("{}/v2/team/ref", registry.base());
    let mut args = vec![
        "push",
        "--repo",
        &repo,
        "--global-config",
        s(global),
        "-o",
        s(config),
    ];
    args.extend(layers.iter().map(|p| s(p)));
    obd_stdout(&args)
}

fn push_then_export(auth: Auth) {
    let v = ReferenceVectors::unpack();
    let registry = Registry::start(auth);
    let dir = tempfile::tempdir().unwrap();
    let global = global_config(dir.path(), registry.port);
    let layers = [
        v.path("layer0.lsmt"),
        v.path("layer1.zstd8k.zfile"),
        v.path("layer2.lz416k.zfile"),
    ];
    let config = dir.path().join("config.v1.json");
    let said = push(&registry, &global, &config, &layers);
    assert_eq!(said.matches("pushed").count(), 3, "{said}");
    // Pushing again uploads nothing.
    let again = dir.path().join("again.json");
    let said = push(&registry, &global, &again, &layers);
    assert_eq!(said.matches("already").count(), 3, "{said}");

    // The span the reference layers write (the rest of the 1 GiB is holes).
    let span = v.span_bytes().to_string();
    let remote_raw = dir.path().join("remote.raw");
    obd_ok(&[
        "export",
        "--length",
        &span,
        "--output",
        s(&remote_raw),
        "--config",
        s(&config),
        "--global-config",
        s(&global),
    ]);
    let local_raw = dir.path().join("local.raw");
    let mut args = vec!["export", "--length", &span, "--output", s(&local_raw)];
    args.extend(layers.iter().map(|p| s(p)));
    obd_ok(&args);
    assert!(
        std::fs::read(&remote_raw).unwrap() == std::fs::read(&local_raw).unwrap(),
        "the remote image exports differently from its local layers"
    );
}

#[test]
fn push_then_export_anonymous() {
    push_then_export(Auth::Anonymous);
}

#[test]
fn push_then_export_with_basic_auth() {
    push_then_export(Auth::Basic);
}

#[test]
fn push_then_export_with_token_auth() {
    push_then_export(Auth::Token);
}

#[test]
fn export_without_credentials_says_access_denied() {
    let v = ReferenceVectors::unpack();
    let registry = Registry::start(Auth::Basic);
    let dir = tempfile::tempdir().unwrap();
    let global = global_config(dir.path(), registry.port);
    let config = dir.path().join("config.v1.json");
    push(&registry, &global, &config, &[v.path("layer0.lsmt")]);
    let empty = dir.path().join("empty.json");
    std::fs::write(
        &empty,
        serde_json::json!({"cacheConfig": {"cacheDir": dir.path().join("cache2")}}).to_string(),
    )
    .unwrap();
    let err = obd_err(&[
        "export",
        "--output",
        s(&dir.path().join("x.raw")),
        "--config",
        s(&config),
        "--global-config",
        s(&empty),
    ]);
    assert!(
        err.contains("access denied") || err.contains("Basic"),
        "{err}"
    );
    assert!(!err.contains(PASSWORD));
}

/// Bytes the data files in `cache` occupy on disk.
fn cache_bytes_on_disk(cache: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(cache) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "data"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Several `obd export` processes read one registry image through one
/// `cacheDir` that is far smaller than the image, behind a proxy that
/// resets, stalls, truncates and refuses blob GETs: every export is right,
/// none hangs, and the directory never holds more than its capacity.
#[test]
fn processes_share_one_small_cache_under_faults() {
    let v = ReferenceVectors::unpack();
    let registry = Registry::start(Auth::Anonymous);
    let proxy = Proxy::start(registry.port);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let capacity: u64 = 3 << 20;
    let global = dir.path().join("overlaybd.json");
    std::fs::write(
        &global,
        serde_json::json!({
            "cacheConfig": {"cacheDir": cache, "cacheSizeMB": capacity >> 20, "refillSize": 65536},
        })
        .to_string(),
    )
    .unwrap();
    let layers = [
        v.path("layer0.lsmt"),
        v.path("layer1.zstd8k.zfile"),
        v.path("layer2.lz416k.zfile"),
    ];
    let pushed = dir.path().join("pushed.json");
    push(&registry, &global, &pushed, &layers);
    // The image as seen through the faulty proxy.
    let text = std::fs::read_to_string(&pushed)
        .unwrap()
        .replace(&registry.base(), &proxy.base());
    let config = dir.path().join("config.v1.json");
    std::fs::write(&config, text).unwrap();
    let span = v.span_bytes().to_string();
    let local_raw = dir.path().join("local.raw");
    let mut args = vec!["export", "--length", &span, "--output", s(&local_raw)];
    args.extend(layers.iter().map(|p| s(p)));
    obd_ok(&args);
    let want = std::fs::read(&local_raw).unwrap();

    proxy.plan().mix = Some((
        3,
        vec![
            Fault::Reset,
            Fault::Truncate,
            Fault::Status(503),
            Fault::Stall(std::time::Duration::from_millis(1500)),
        ],
    ));
    let outputs: Vec<PathBuf> = (0..4)
        .map(|i| dir.path().join(format!("remote{i}.raw")))
        .collect();
    let mut children: Vec<std::process::Child> = outputs
        .iter()
        .map(|out| {
            std::process::Command::new(env!("CARGO_BIN_EXE_obd"))
                .args(["export", "--length", &span, "--output"])
                .arg(out)
                .arg("--config")
                .arg(&config)
                .arg("--global-config")
                .arg(&global)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let started = std::time::Instant::now();
    let mut largest = 0;
    while children.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(300),
            "the exports hang"
        );
        largest = largest.max(cache_bytes_on_disk(&cache));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for (child, out) in children.into_iter().zip(&outputs) {
        let done = child.wait_with_output().unwrap();
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        assert!(
            std::fs::read(out).unwrap() == want,
            "{} differs from the local export",
            out.display()
        );
    }
    let faults = proxy
        .stats
        .faults
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(faults >= 4, "the test needs faults: {faults}");
    // The files' own rounding (a few pages per blob) on top of the bound.
    assert!(
        largest <= capacity + (64 << 10),
        "the cache held {largest} bytes, capacity {capacity}"
    );
    assert!(
        largest >= capacity / 2,
        "the test should have filled the cache: {largest}"
    );
}

/// `obd serve` of a pushed image read through a proxy, with the global
/// config `audit` merged into a fresh cache's; returns its stderr once it
/// opened the image and stopped on SIGTERM.
fn serve_audited(dir: &Path, config: &Path, name: &str, audit: serde_json::Value) -> String {
    let mut global = serde_json::json!({
        "cacheConfig": {"cacheDir": dir.join(format!("cache-{name}")), "cacheSizeGB": 1},
    });
    for (key, value) in audit.as_object().unwrap() {
        global[key] = value.clone();
    }
    let global_path = dir.join(format!("{name}.json"));
    std::fs::write(&global_path, global.to_string()).unwrap();
    let socket = dir.join(format!("{name}.sock"));
    let child = start_serve(&socket, config, &["--global-config", s(&global_path)]);
    stop_serve(child)
}

/// The audit log (`enableAudit`, `auditPath`) of a daemon that reads a
/// registry image lists each range it fetched as a `download` of that
/// blob, the same ranges the registry was asked for; with `enableAudit`
/// false nothing is written, and an empty `auditPath` is a warning.
#[test]
fn the_audit_log_lists_the_registry_ranges_a_daemon_fetched() {
    let v = ReferenceVectors::unpack();
    let registry = Registry::start(Auth::Anonymous);
    let dir = tempfile::tempdir().unwrap();
    let global = global_config(dir.path(), registry.port);
    let layers = [v.path("layer0.lsmt"), v.path("layer1.zstd8k.zfile")];
    let pushed = dir.path().join("pushed.json");
    push(&registry, &global, &pushed, &layers);
    let digests: Vec<String> = layers
        .iter()
        .map(|l| overlaybd::remote::sha256_file(l).unwrap().0)
        .collect();
    // The same image, read through a proxy that notes each Range asked.
    let proxy = Proxy::start(registry.port);
    let config = dir.path().join("config.v1.json");
    let text = std::fs::read_to_string(&pushed)
        .unwrap()
        .replace(&registry.base(), &proxy.base());
    std::fs::write(&config, text).unwrap();

    let audit = dir.path().join("audit/obd.audit");
    let log = serve_audited(
        dir.path(),
        &config,
        "on",
        serde_json::json!({"enableAudit": true, "auditPath": audit}),
    );
    assert!(log.contains("audit log"), "{log}");
    let asked: Vec<(u64, u64)> = proxy
        .stats
        .ranges
        .lock()
        .unwrap()
        .iter()
        .map(|range| {
            let (first, last) = range
                .strip_prefix("bytes=")
                .and_then(|r| r.split_once('-'))
                .unwrap_or_else(|| panic!("Range {range:?}"));
            let first: u64 = first.parse().unwrap();
            (first, last.parse::<u64>().unwrap() - first + 1)
        })
        .collect();
    assert!(!asked.is_empty(), "opening the image fetched nothing");
    let text = std::fs::read_to_string(&audit).unwrap();
    let mut audited = Vec::new();
    let mut offset_zero_of = Vec::new();
    for line in text.lines() {
        let field = |name: &str| -> &str {
            line.split(' ')
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line}"))
        };
        let (secs, micros) = line.split(' ').next().unwrap().split_once('.').unwrap();
        assert!(secs.parse::<u64>().unwrap() > 1_600_000_000 && micros.len() == 6);
        assert_eq!(line.split(' ').nth(1), Some("download"), "{line}");
        assert!(line.ends_with(" result=ok"), "{line}");
        field("latency_us=").parse::<u64>().unwrap();
        let file = field("file=");
        let digest = digests
            .iter()
            .find(|d| file.ends_with(&format!("/blobs/{d}")))
            .unwrap_or_else(|| panic!("{file} is not a layer blob"));
        let offset: u64 = field("offset=").parse().unwrap();
        let size: u64 = field("size=").parse().unwrap();
        if offset == 0 {
            offset_zero_of.push(digest.clone());
        }
        audited.push((offset, size));
    }
    let (mut asked, mut audited) = (asked, audited);
    asked.sort();
    audited.sort();
    assert_eq!(audited, asked, "{text}");
    // Each layer's header was read.
    offset_zero_of.sort();
    offset_zero_of.dedup();
    assert_eq!(offset_zero_of.len(), digests.len(), "{text}");

    // Off: the same reads (a fresh cache) and no audit file.
    let before = proxy.blob_gets();
    let unused = dir.path().join("off/obd.audit");
    let log = serve_audited(
        dir.path(),
        &config,
        "off",
        serde_json::json!({"enableAudit": false, "auditPath": unused}),
    );
    assert!(
        proxy.blob_gets() > before,
        "nothing fetched: nothing to audit"
    );
    assert!(!unused.exists(), "written with enableAudit false:\n{log}");
    assert!(!log.contains("audit"), "{log}");

    // An empty path: a warning, and the image is still served.
    let log = serve_audited(
        dir.path(),
        &config,
        "empty",
        serde_json::json!({"enableAudit": true, "auditPath": ""}),
    );
    assert!(
        log.contains("warning: enableAudit is set but auditPath is empty"),
        "{log}"
    );
}
