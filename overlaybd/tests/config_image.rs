//! The per-device image config (`config.v1.json`).

mod config_samples;

use std::fs;
use std::path::{Path, PathBuf};

use overlaybd::config::{DownloadConfig, DownloadOverride, ImageConfig, Lower, UpperConfig};
use overlaybd::Error;

use config_samples::SNAPSHOTTER_CONFIG;

fn err_text(result: Result<ImageConfig, Error>) -> String {
    match result {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn snapshotter_config_parses() {
    let c = ImageConfig::from_json(SNAPSHOTTER_CONFIG, "config.v1.json").unwrap();
    assert_eq!(
        c.repo_blob_url.as_deref(),
        Some("https://registry.example.com/v2/library/redis/blobs")
    );
    assert_eq!(
        c.lowers,
        vec![
            Lower::Blob {
                dir: PathBuf::from("/var/lib/overlaybd/snapshots/11/block"),
                digest: format!("sha256:{}", "1".repeat(64)),
                size: 4737695,
            },
            Lower::File {
                file: PathBuf::from("/opt/overlaybd/baselayers/ext4_64")
            },
        ]
    );
    assert_eq!(
        c.upper,
        Some(UpperConfig {
            index: Some("/var/lib/overlaybd/snapshots/12/block/writable_index".into()),
            data: "/var/lib/overlaybd/snapshots/12/block/writable_data".into(),
            target: None,
            vsize: None,
        })
    );
    assert_eq!(
        c.result_file.as_deref(),
        Some(Path::new(
            "/var/lib/overlaybd/snapshots/12/block/init-debug.log"
        ))
    );
    assert_eq!(
        c.record_trace_path.as_deref(),
        Some(Path::new("/var/lib/trace/redis.trace"))
    );
    assert!(c.acceleration_layer);
    assert_eq!(c.download, None);
}

#[test]
fn read_only_device_written_with_empty_values() {
    // What the snapshotter writes for a read-only device: empty upper, empty strings.
    let text = r#"{"repoBlobUrl": "", "lowers": [{"file": "/l0"}], "upper": {},
                   "resultFile": "", "recordTracePath": ""}"#;
    let c = ImageConfig::from_json(text, "c").unwrap();
    assert_eq!(c.repo_blob_url, None);
    assert_eq!(c.upper, None);
    assert_eq!(c.result_file, None);
    assert_eq!(c.record_trace_path, None);
    assert!(!c.acceleration_layer);

    let c = ImageConfig::from_json(r#"{"lowers": [{"file": "/l0"}], "upper": null}"#, "c").unwrap();
    assert_eq!(c.upper, None);
}

#[test]
fn upper_only_with_null_lowers() {
    let text =
        r#"{"lowers": null, "upper": {"index": "/i", "data": "/d", "target": "/t", "vsize": 64}}"#;
    let c = ImageConfig::from_json(text, "c").unwrap();
    assert!(c.lowers.is_empty());
    let upper = c.upper.unwrap();
    assert_eq!(upper.target.as_deref(), Some(Path::new("/t")));
    assert_eq!(upper.vsize, Some(64));
}

#[test]
fn lower_with_neither_file_nor_blob_is_a_clear_error() {
    let text = "{\n  \"lowers\": [\n    {\"file\": \"/a\"},\n    {}\n  ]\n}";
    let msg = err_text(ImageConfig::from_json(text, "/run/dev1/config.v1.json"));
    assert!(msg.starts_with("/run/dev1/config.v1.json: "), "{msg}");
    assert!(
        msg.contains(": line 6, column 1: lowers[1]: a lower layer"),
        "{msg}"
    );
    assert!(
        msg.contains(
            "needs either `file`, `dir` alone (a layer file in it), or `dir`, `digest` and `size`"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("missing `dir`, `digest`, a non-zero `size`"),
        "{msg}"
    );
}

#[test]
fn partial_blob_lower_names_what_is_missing() {
    let text = r#"{"lowers": [{"dir": "/d", "digest": "sha256:ab"}]}"#;
    let msg = err_text(ImageConfig::from_json(text, "c"));
    assert!(msg.contains("missing a non-zero `size`"), "{msg}");
    assert!(!msg.contains("missing `dir`"), "{msg}");

    let text = r#"{"lowers": [{"dir": "/d", "digest": "sha256:ab", "size": 0}]}"#;
    assert!(err_text(ImageConfig::from_json(text, "c")).contains("non-zero `size`"));
}

#[test]
fn file_wins_over_dir() {
    let text = r#"{"lowers": [{"file": "/f", "dir": "/d", "digest": "sha256:ab", "size": 3}]}"#;
    let c = ImageConfig::from_json(text, "c").unwrap();
    assert_eq!(c.lowers, vec![Lower::File { file: "/f".into() }]);
}

#[test]
fn upper_needs_data() {
    let text = r#"{"upper": {"index": "/i"}}"#;
    let msg = err_text(ImageConfig::from_json(text, "c"));
    assert!(msg.contains("`upper` needs `data`"), "{msg}");
    let text = r#"{"lowers": [{"file": "/f"}], "upper": {"target": "/t"}}"#;
    assert!(err_text(ImageConfig::from_json(text, "c")).contains("`upper` needs `data`"));
}

#[test]
fn an_upper_with_only_data_is_a_sparse_writable_layer() {
    let text = r#"{"lowers": [{"file": "/f"}], "upper": {"data": "/sparse"}}"#;
    let upper = ImageConfig::from_json(text, "c").unwrap().upper.unwrap();
    assert_eq!(upper.index, None);
    assert_eq!(upper.data, Path::new("/sparse"));
}

#[test]
fn a_config_without_layers_is_an_error() {
    let msg = err_text(ImageConfig::from_json("{}", "empty.json"));
    assert!(msg.starts_with("empty.json: "), "{msg}");
    assert!(msg.contains("no layers"), "{msg}");
}

#[test]
fn unknown_keys_are_ignored() {
    let text = r#"{"lowers": [{"file": "/f", "someFutureLowerKey": "/g"}], "upper": {"index": "/i", "data": "/d", "gzipIndex": ""},
                   "someFutureKey": {"nested": [1, 2]}}"#;
    let c = ImageConfig::from_json(text, "c").unwrap();
    assert_eq!(c.lowers.len(), 1);
}

#[test]
fn malformed_json_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.v1.json");
    fs::write(&path, "{\n  \"lowers\": [\n    {\"file\": \"/a\"},\n  ]\n}").unwrap();
    let msg = err_text(ImageConfig::load(&path));
    assert!(msg.starts_with(&format!("{}: ", path.display())), "{msg}");
    assert!(
        msg.contains("not a valid image config: line 4, column 3: "),
        "{msg}"
    );
    assert!(
        !msg.ends_with("column 3"),
        "location is not repeated: {msg}"
    );
}

#[test]
fn wrong_types_name_file_and_position() {
    let text =
        "{\n  \"lowers\": [{\"dir\": \"/d\", \"digest\": \"sha256:ab\", \"size\": \"10\"}]\n}";
    let msg = err_text(ImageConfig::from_json(text, "/x/config.v1.json"));
    assert!(
        msg.starts_with("/x/config.v1.json: not a valid image config: line 2"),
        "{msg}"
    );
    assert!(
        msg.contains("invalid type: string \"10\", expected u64"),
        "{msg}"
    );

    let msg = err_text(ImageConfig::from_json(r#"{"lowers": {"file": "/f"}}"#, "c"));
    assert!(msg.contains("expected a sequence"), "{msg}");
    let msg = err_text(ImageConfig::from_json(
        r#"{"lowers": [{"file": "/f"}], "accelerationLayer": "yes"}"#,
        "c",
    ));
    assert!(msg.contains("expected a boolean"), "{msg}");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.json");
    let err = ImageConfig::load(&path).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.json"), "{err}");
}

#[test]
fn load_resolves_relative_paths_against_the_config_directory() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let text = r#"{
      "lowers": [{"file": "layers/l0.lsmt"}, {"file": "/abs/l1"},
                 {"dir": "blobs/2", "digest": "sha256:cd", "size": 7}],
      "upper": {"index": "rw/index", "data": "/abs/data", "target": "rw/target"},
      "resultFile": "result", "recordTracePath": "trace/t"
    }"#;
    let path = base.join("config.v1.json");
    fs::write(&path, text).unwrap();
    let c = ImageConfig::load(&path).unwrap();
    assert_eq!(
        c.lowers,
        vec![
            Lower::File {
                file: base.join("layers/l0.lsmt")
            },
            Lower::File {
                file: "/abs/l1".into()
            },
            Lower::Blob {
                dir: base.join("blobs/2"),
                digest: "sha256:cd".into(),
                size: 7
            },
        ]
    );
    let upper = c.upper.as_ref().unwrap();
    assert_eq!(upper.index, Some(base.join("rw/index")));
    assert_eq!(upper.data, PathBuf::from("/abs/data"));
    assert_eq!(upper.target, Some(base.join("rw/target")));
    assert_eq!(c.result_file, Some(base.join("result")));
    assert_eq!(c.record_trace_path, Some(base.join("trace/t")));

    // from_json has no directory to resolve against: paths stay as written.
    let c = ImageConfig::from_json(text, "c").unwrap();
    assert_eq!(
        c.lowers[0],
        Lower::File {
            file: "layers/l0.lsmt".into()
        }
    );
}

#[test]
fn round_trip_through_json() {
    let mut c = ImageConfig::from_json(SNAPSHOTTER_CONFIG, "c").unwrap();
    c.upper.as_mut().unwrap().target = Some("/t".into());
    c.upper.as_mut().unwrap().vsize = Some(1 << 30);
    c.download = Some(DownloadOverride {
        enable: Some(true),
        max_mbps: Some(5),
        ..Default::default()
    });
    let text = serde_json::to_string_pretty(&c).unwrap();
    assert!(text.contains("\"maxMBps\": 5"), "{text}");
    assert_eq!(ImageConfig::from_json(&text, "again").unwrap(), c);

    let minimal = ImageConfig::from_json(r#"{"lowers": [{"file": "/f"}]}"#, "c").unwrap();
    let text = serde_json::to_string(&minimal).unwrap();
    assert_eq!(text, r#"{"lowers":[{"file":"/f"}]}"#);
    assert_eq!(ImageConfig::from_json(&text, "again").unwrap(), minimal);
}

#[test]
fn download_override_replaces_only_the_keys_it_sets() {
    let global = DownloadConfig {
        enable: false,
        delay: 600,
        ..DownloadConfig::default()
    };
    let text = r#"{"lowers": [{"file": "/f"}], "download": {"enable": true, "maxMBps": 20}}"#;
    let c = ImageConfig::from_json(text, "c").unwrap();
    let d = c.effective_download(&global);
    assert!(d.enable);
    assert_eq!(d.max_mbps, 20);
    assert_eq!(d.delay, 600);
    assert_eq!(d.delay_extra, 30);
    assert_eq!(d.block_size, 262_144);

    let c = ImageConfig::from_json(r#"{"lowers": [{"file": "/f"}]}"#, "c").unwrap();
    assert_eq!(c.effective_download(&global), global);

    let text = r#"{"lowers": [{"file": "/f"}], "download": {"blockSize": 0}}"#;
    assert!(err_text(ImageConfig::from_json(text, "c")).contains("expected a non-zero number"));
}

#[test]
fn blob_url_and_local_candidates() {
    let c = ImageConfig::from_json(SNAPSHOTTER_CONFIG, "c").unwrap();
    assert_eq!(
        c.blob_url("sha256:ab").unwrap(),
        "https://registry.example.com/v2/library/redis/blobs/sha256:ab"
    );
    let c = ImageConfig::from_json(
        r#"{"lowers": [{"file": "/f"}], "repoBlobUrl": "https://h/v2/r/blobs/"}"#,
        "c",
    )
    .unwrap();
    assert_eq!(
        c.blob_url("sha256:ab").unwrap(),
        "https://h/v2/r/blobs/sha256:ab"
    );
    let c = ImageConfig::from_json(r#"{"lowers": [{"file": "/f"}]}"#, "c").unwrap();
    let err = c.blob_url("sha256:ab").unwrap_err().to_string();
    assert!(
        err.contains("sha256:ab") && err.contains("no repoBlobUrl"),
        "{err}"
    );

    let blob = Lower::Blob {
        dir: "/d".into(),
        digest: "sha256:ab".into(),
        size: 1,
    };
    assert_eq!(
        blob.local_candidates(),
        vec![
            PathBuf::from("/d/overlaybd.commit"),
            PathBuf::from("/d/.commit"),
            PathBuf::from("/d/overlaybd.sealed"),
        ]
    );
    let file = Lower::File { file: "/f".into() };
    assert_eq!(file.local_candidates(), vec![PathBuf::from("/f")]);
}

#[test]
fn write_result_writes_success_or_reason() {
    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("init-debug.log");
    let text = format!(
        r#"{{"lowers": [{{"file": "/f"}}], "resultFile": "{}"}}"#,
        result.display()
    );
    let c = ImageConfig::from_json(&text, "c").unwrap();

    c.write_result(Ok(())).unwrap();
    assert_eq!(fs::read_to_string(&result).unwrap(), "success");
    c.write_result(Err("layer 2: bad magic".to_string()))
        .unwrap();
    assert_eq!(
        fs::read_to_string(&result).unwrap(),
        "failed:layer 2: bad magic"
    );
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec!["init-debug.log"],
        "no temporary file is left behind"
    );

    // No resultFile: nothing to do.
    let c = ImageConfig::from_json(r#"{"lowers": [{"file": "/f"}]}"#, "c").unwrap();
    c.write_result(Ok(())).unwrap();

    // An unwritable place is an error naming it.
    let text = r#"{"lowers": [{"file": "/f"}], "resultFile": "/nonexistent-dir-obd/r"}"#;
    let c = ImageConfig::from_json(text, "c").unwrap();
    let err = c.write_result(Ok(())).unwrap_err().to_string();
    assert!(err.contains("/nonexistent-dir-obd/"), "{err}");
}

#[test]
fn an_acceleration_lower_with_only_dir_serves_the_layer_in_it() {
    // A lower with only `dir` (as the snapshotter writes for a layer it
    // holds locally) is the layer file in that dir.
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/real-dev-image");
    let accel = dir.path().join("accel");
    fs::create_dir(&accel).unwrap();
    fs::copy(
        fixtures.join("dev-layer1.blob"),
        accel.join("overlaybd.commit"),
    )
    .unwrap();
    let text = format!(
        r#"{{"lowers": [{{"file": "{}"}}, {{"dir": "{}"}}]}}"#,
        fixtures.join("dev-layer0.blob").display(),
        accel.display()
    );
    let config = ImageConfig::from_json(&text, "c").unwrap();
    assert_eq!(config.lowers[1], Lower::Dir { dir: accel.clone() });
    let stack = overlaybd::image::open_config(&config, false).unwrap();
    assert_eq!(stack.lowers().len(), 2);
    let mut block = vec![0u8; 4096];
    stack.read(&mut block, 1024).unwrap();
    assert_eq!(&block[56..58], &[0x53, 0xef], "ext4 superblock magic");

    fs::remove_file(accel.join("overlaybd.commit")).unwrap();
    let err = overlaybd::image::open_config(&config, false).err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains(&accel.display().to_string()) && msg.contains("no layer file"),
        "{msg}"
    );
}

#[test]
fn an_acceleration_layer_is_a_trace_not_a_layer() {
    // `ctr record-trace` adds a layer holding only `trace`; once the
    // snapshotter sets accelerationLayer, the last lower is that dir: it
    // leaves the stack and its trace is the one to replay.
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/real-dev-image");
    let accel = dir.path().join("accel");
    fs::create_dir(&accel).unwrap();
    fs::write(accel.join("trace"), b"/etc/os-release\n").unwrap();
    let text = format!(
        r#"{{"lowers": [{{"file": "{}"}}, {{"dir": "{}"}}], "accelerationLayer": true}}"#,
        fixtures.join("dev-layer0.blob").display(),
        accel.display()
    );
    let config = ImageConfig::from_json(&text, "c").unwrap();
    assert_eq!(config.image_lowers(), &config.lowers[..1]);
    assert_eq!(config.acceleration_trace(), Some(accel.join("trace")));
    let stack = overlaybd::image::open_config(&config, false).unwrap();
    assert_eq!(stack.lowers().len(), 1);

    // Without the flag the dir is a layer, and has none.
    let plain = ImageConfig::from_json(&text.replace("true", "false"), "c").unwrap();
    assert_eq!(plain.image_lowers().len(), 2);
    assert_eq!(plain.acceleration_trace(), None);
    assert!(overlaybd::image::open_config(&plain, false).is_err());

    // Nothing to record into: the image is refused at open, as by the
    // reference.
    let both = ImageConfig::from_json(
        &text.replace("true}", r#"true, "recordTracePath": "/t/trace"}"#),
        "c",
    )
    .unwrap();
    let err = overlaybd::image::open_config(&both, false).err().unwrap();
    assert!(err.to_string().contains("acceleration layer"), "{err}");
}

#[test]
fn turbo_oci_lowers_are_refused_not_ignored() {
    let text = r#"{"lowers": [{"dir": "/d", "digest": "sha256:ab", "size": 9,
        "gzipIndex": "/d/gzip.meta", "targetDigest": "sha256:cd"}]}"#;
    let msg = err_text(ImageConfig::from_json(text, "c"));
    assert!(
        msg.contains("lowers[0]: a TurboOCI lower (gzipIndex, targetDigest)"),
        "{msg}"
    );
}
