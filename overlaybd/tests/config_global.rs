//! The daemon's global config (`overlaybd.json`).

use std::fs;
use std::path::{Path, PathBuf};

use overlaybd::config::{CredentialMode, GlobalConfig};
use overlaybd::Error;

/// A full config in the shape of the reference's packaged `overlaybd.json`,
/// with keys of other reference versions this crate does not model.
const EXAMPLE: &str = r#"{
    "logConfig": {
        "logLevel": 1,
        "logPath": "/var/log/overlaybd.log",
        "logSizeMB": 20,
        "logRotateNum": 5
    },
    "cacheConfig": {
        "cacheType": "file",
        "cacheDir": "/opt/overlaybd/registry_cache",
        "cacheSizeGB": 4,
        "refillSize": 1048576
    },
    "gzipCacheConfig": {
        "enable": true,
        "cacheDir": "/opt/overlaybd/gzip_cache",
        "cacheSizeGB": 4
    },
    "credentialConfig": {
        "mode": "file",
        "path": "/opt/overlaybd/cred.json"
    },
    "ioEngine": 0,
    "download": {
        "enable": true,
        "delay": 600,
        "delayExtra": 30,
        "maxMBps": 100,
        "tryCnt": 5,
        "blockSize": 262144
    },
    "p2pConfig": {
        "enable": false,
        "address": "localhost:19145/dadip2p"
    },
    "exporterConfig": {
        "enable": false,
        "uriPrefix": "/metrics",
        "port": 9863,
        "updateInterval": 60000
    },
    "prefetchConfig": {"concurrency": 32},
    "certConfig": {"certFile": "/etc/overlaybd/client.crt", "keyFile": "/etc/overlaybd/client.key"},
    "enableAudit": true,
    "auditPath": "/var/log/overlaybd-audit.log",
    "userAgent": "obd/0.1",
    "registryFsVersion": "v2",
    "enableThread": false
}"#;

fn parse(text: &str) -> GlobalConfig {
    GlobalConfig::from_json(text, "overlaybd.json").unwrap()
}

fn err_text(text: &str) -> String {
    match GlobalConfig::from_json(text, "/etc/overlaybd/overlaybd.json") {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn absent_keys_take_the_spec_defaults() {
    let c = parse("{}");
    assert_eq!(c, GlobalConfig::default());
    assert_eq!(c.log_config.log_level, 1);
    assert_eq!(c.log_config.log_path, None);
    assert_eq!(c.log_config.log_size_mb, 10);
    assert_eq!(c.log_config.log_rotate_num, 3);
    assert_eq!(c.cache_config.cache_type, "file");
    assert_eq!(
        c.cache_config.cache_dir,
        Path::new("/opt/overlaybd/registry_cache")
    );
    assert_eq!(c.cache_config.cache_size_gb, 4);
    assert_eq!(c.cache_config.refill_size, 262_144);
    assert_eq!(c.credential_config.mode, None);
    assert_eq!(c.credential_config.path, None);
    assert_eq!(c.credential_config.timeout, 1);
    assert_eq!(c.io_engine, None);
    assert!(!c.download.enable);
    assert_eq!(c.download.delay, 300);
    assert_eq!(c.download.delay_extra, 30);
    assert_eq!(c.download.max_mbps, 100);
    assert_eq!(c.download.try_cnt, 5);
    assert_eq!(c.download.block_size, 262_144);
    assert!(!c.p2p_config.enable);
    assert_eq!(c.p2p_config.address, None);
    assert!(!c.exporter_config.enable);
    assert_eq!(c.exporter_config.uri_prefix, "/metrics");
    assert_eq!(c.exporter_config.port, 9863);
    assert_eq!(c.exporter_config.update_interval, None);
    assert_eq!(c.prefetch_config.concurrency, 16);
    assert_eq!(c.cert_config.cert_file, None);
    assert_eq!(c.cert_config.key_file, None);
    assert!(!c.enable_audit);
    assert_eq!(c.audit_path, None);
    assert_eq!(c.user_agent, None);
}

#[test]
fn a_partial_section_keeps_the_other_defaults() {
    let c = parse(r#"{"cacheConfig": {"cacheDir": "/cache"}, "download": {"enable": true}}"#);
    assert_eq!(c.cache_config.cache_dir, Path::new("/cache"));
    assert_eq!(c.cache_config.cache_size_gb, 4);
    assert_eq!(c.cache_config.refill_size, 262_144);
    assert!(c.download.enable);
    assert_eq!(c.download.delay, 300);
}

#[test]
fn example_config_parses_and_ignores_unknown_keys() {
    let c = parse(EXAMPLE);
    assert_eq!(
        c.log_config.log_path.as_deref(),
        Some(Path::new("/var/log/overlaybd.log"))
    );
    assert_eq!(c.log_config.log_size_mb, 20);
    assert_eq!(c.log_config.log_rotate_num, 5);
    assert_eq!(c.cache_config.refill_size, 1_048_576);
    assert_eq!(
        c.credential_config.path.as_deref(),
        Some("/opt/overlaybd/cred.json")
    );
    assert_eq!(c.io_engine, Some(0));
    assert!(c.download.enable);
    assert_eq!(c.download.delay, 600);
    assert_eq!(
        c.p2p_config.address.as_deref(),
        Some("localhost:19145/dadip2p")
    );
    assert_eq!(c.exporter_config.update_interval, Some(60000));
    assert_eq!(c.prefetch_config.concurrency, 32);
    assert_eq!(
        c.cert_config.cert_file.as_deref(),
        Some(Path::new("/etc/overlaybd/client.crt"))
    );
    assert_eq!(
        c.cert_config.key_file.as_deref(),
        Some(Path::new("/etc/overlaybd/client.key"))
    );
    assert!(c.enable_audit);
    assert_eq!(
        c.audit_path.as_deref(),
        Some(Path::new("/var/log/overlaybd-audit.log"))
    );
    assert_eq!(c.user_agent.as_deref(), Some("obd/0.1"));
}

#[test]
fn http_credential_mode() {
    let c =
        parse(r#"{"credentialConfig": {"mode": "http", "path": "http://127.0.0.1:9000/auth"}}"#);
    assert_eq!(c.credential_config.mode, Some(CredentialMode::Http));
    assert_eq!(
        c.credential_config.path.as_deref(),
        Some("http://127.0.0.1:9000/auth")
    );
}

#[test]
fn every_reference_credential_mode_loads() {
    for (text, mode) in [
        ("file", Some(CredentialMode::File)),
        ("http", Some(CredentialMode::Http)),
        ("https", Some(CredentialMode::Https)),
        ("uds", Some(CredentialMode::Uds)),
        ("", None),
    ] {
        let c = parse(&format!(
            r#"{{"credentialConfig": {{"mode": "{text}", "path": "/run/x"}}}}"#
        ));
        assert_eq!(c.credential_config.mode, mode, "{text}");
    }
    assert_eq!(
        parse(r#"{"credentialConfig": {"mode": null}}"#)
            .credential_config
            .mode,
        None
    );
    // The reference's other keys, in its snake_case.
    let c = parse(
        r#"{"credentialConfig": {"mode": "https", "path": "https://127.0.0.1:9443/auth",
            "timeout": 3, "client_cert_path": "/c.pem", "client_key_path": "/k.pem",
            "server_ca_path": "/ca.pem"}}"#,
    );
    let cred = &c.credential_config;
    assert_eq!(cred.timeout, 3);
    assert_eq!(cred.client_cert_path.as_deref(), Some(Path::new("/c.pem")));
    assert_eq!(cred.client_key_path.as_deref(), Some(Path::new("/k.pem")));
    assert_eq!(cred.server_ca_path.as_deref(), Some(Path::new("/ca.pem")));
}

#[test]
fn an_unknown_credential_mode_names_the_accepted_ones() {
    for bad in ["ftp", "HTTP", "files"] {
        let msg = err_text(&format!(r#"{{"credentialConfig": {{"mode": "{bad}"}}}}"#));
        assert!(
            msg.contains(&format!(
                "credentialConfig.mode {bad:?} is not a credential mode"
            )) && msg.contains("`file`, `http`, `https`, `uds`, or empty"),
            "{msg}"
        );
    }
}

#[test]
fn legacy_keys_fill_absent_new_keys() {
    let c = parse(
        r#"{"registryCacheDir": "/old/cache", "registryCacheSizeGB": 16,
            "credentialFilePath": "/old/cred.json", "logLevel": 0, "logPath": "/old/log"}"#,
    );
    assert_eq!(c.cache_config.cache_dir, Path::new("/old/cache"));
    assert_eq!(c.cache_config.cache_size_gb, 16);
    assert_eq!(c.credential_config.path.as_deref(), Some("/old/cred.json"));
    assert_eq!(c.log_config.log_level, 0);
    assert_eq!(c.log_config.log_path, Some(PathBuf::from("/old/log")));
    // Everything else is still the default.
    assert_eq!(c.cache_config.refill_size, 262_144);
    assert_eq!(c.log_config.log_size_mb, 10);
}

#[test]
fn new_keys_win_over_legacy_keys() {
    let c = parse(
        r#"{"registryCacheDir": "/old/cache", "registryCacheSizeGB": 16,
            "credentialFilePath": "/old/cred.json", "logLevel": 0, "logPath": "/old/log",
            "cacheConfig": {"cacheDir": "/new/cache", "cacheSizeGB": 2},
            "credentialConfig": {"path": "/new/cred.json"},
            "logConfig": {"logLevel": 3, "logPath": "/new/log"}}"#,
    );
    assert_eq!(c.cache_config.cache_dir, Path::new("/new/cache"));
    assert_eq!(c.cache_config.cache_size_gb, 2);
    assert_eq!(c.credential_config.path.as_deref(), Some("/new/cred.json"));
    assert_eq!(c.log_config.log_level, 3);
    assert_eq!(c.log_config.log_path, Some(PathBuf::from("/new/log")));

    // A new key counts when present, even with its default value.
    let c = parse(
        r#"{"registryCacheSizeGB": 16, "cacheConfig": {"cacheSizeGB": 4}, "logLevel": 0, "logConfig": {"logLevel": 1}}"#,
    );
    assert_eq!(c.cache_config.cache_size_gb, 4);
    assert_eq!(c.log_config.log_level, 1);

    // Legacy keys fill only the keys absent from their section.
    let c = parse(r#"{"registryCacheSizeGB": 16, "cacheConfig": {"cacheDir": "/new/cache"}}"#);
    assert_eq!(c.cache_config.cache_dir, Path::new("/new/cache"));
    assert_eq!(c.cache_config.cache_size_gb, 16);
}

#[test]
fn empty_or_zero_legacy_values_are_not_set() {
    let c = parse(
        r#"{"registryCacheDir": "", "registryCacheSizeGB": 0, "credentialFilePath": "", "logPath": ""}"#,
    );
    assert_eq!(c, GlobalConfig::default());
}

#[test]
fn wrong_types_name_file_line_and_column() {
    let msg = err_text("{\n  \"cacheConfig\": {\n    \"cacheSizeGB\": \"4\"\n  }\n}");
    assert!(
        msg.starts_with("/etc/overlaybd/overlaybd.json: not a valid global config: line 3, column"),
        "{msg}"
    );
    assert!(
        msg.contains("invalid type: string \"4\", expected u64"),
        "{msg}"
    );

    let msg = err_text(r#"{"registryCacheSizeGB": "big"}"#);
    assert!(msg.contains("invalid type: string \"big\""), "{msg}");
    let msg = err_text(r#"{"exporterConfig": {"port": 70000}}"#);
    assert!(msg.contains("expected u16"), "{msg}");
    let msg = err_text(r#"{"logConfig": null}"#);
    assert!(msg.contains("invalid type: null"), "{msg}");
    let msg = err_text("[]");
    assert!(
        msg.ends_with("not a valid global config: the top level must be a JSON object"),
        "{msg}"
    );
    let msg = err_text("\"/etc/overlaybd\"");
    assert!(msg.contains("expected struct GlobalConfig"), "{msg}");
}

#[test]
fn zero_sizes_the_engine_divides_by_are_rejected() {
    for text in [
        r#"{"cacheConfig": {"refillSize": 0}}"#,
        r#"{"download": {"blockSize": 0}}"#,
        r#"{"prefetchConfig": {"concurrency": 0}}"#,
    ] {
        let msg = err_text(text);
        assert!(
            msg.contains("invalid value: integer `0`, expected a non-zero number"),
            "{msg}"
        );
    }
}

#[test]
fn malformed_file_is_a_corrupt_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("overlaybd.json");
    fs::write(&path, "{\"logConfig\": {\"logLevel\": 1,}}").unwrap();
    let err = GlobalConfig::load(&path).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "{}: not a valid global config: line 1, column",
            path.display()
        )),
        "{msg}"
    );

    fs::write(&path, "").unwrap();
    let msg = GlobalConfig::load(&path).unwrap_err().to_string();
    assert!(msg.contains("EOF while parsing"), "{msg}");

    let err = GlobalConfig::load(dir.path().join("absent.json")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
}

#[test]
fn load_reads_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("overlaybd.json");
    fs::write(&path, EXAMPLE).unwrap();
    assert_eq!(GlobalConfig::load(&path).unwrap(), parse(EXAMPLE));
}

#[test]
fn round_trip_through_json() {
    for c in [parse(EXAMPLE), GlobalConfig::default()] {
        let text = serde_json::to_string_pretty(&c).unwrap();
        assert_eq!(parse(&text), c, "{text}");
    }
    let text = serde_json::to_string(&parse(EXAMPLE)).unwrap();
    for key in [
        "\"logSizeMB\"",
        "\"cacheSizeGB\"",
        "\"maxMBps\"",
        "\"uriPrefix\"",
        "\"certFile\"",
    ] {
        assert!(text.contains(key), "{key} in {text}");
    }
}

#[test]
fn ignored_keys_are_named_only_when_set() {
    assert!(GlobalConfig::default().ignored_keys().is_empty());
    let keys =
        parse(r#"{"enableAudit": true, "ioEngine": 1, "cacheConfig": {"cacheType": "ocf"}}"#)
            .ignored_keys();
    assert_eq!(keys.len(), 2, "the audit log is written: {keys:?}");
    assert!(keys[0].contains("\"ocf\""));
    assert!(keys[1].starts_with("ioEngine 1"));
}
