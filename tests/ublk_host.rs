//! `obd add` on a machine without ublk (like the CI host): one plain
//! sentence naming `modprobe ublk_drv`, a non-zero exit, `failed:<reason>`
//! in the resultFile, and nothing left behind. `OBD_UBLK_CONTROL` points the
//! probe at a path that does not exist, so this holds on any host.

use std::path::Path;
use std::process::{Command, Output};

fn obd(args: &[&str], run_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_obd"))
        .args(args)
        .env("OBD_UBLK_CONTROL", run_dir.join("no-ublk-control"))
        .env("OBD_RUN_DIR", run_dir)
        .output()
        .expect("run obd")
}

fn layer(dir: &Path) -> String {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let status = Command::new("tar")
        .arg("xzf")
        .arg(fixtures.join("overlaybd-ref-v1.tgz"))
        .arg("-C")
        .arg(dir)
        .arg("./layer0.lsmt")
        .status()
        .expect("run tar");
    assert!(status.success());
    dir.join("layer0.lsmt").display().to_string()
}

#[test]
fn add_without_ublk_fails_plainly_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let config = dir.path().join("config.v1.json");
    let result = dir.path().join("result");
    std::fs::write(
        &config,
        format!(
            r#"{{"lowers": [{{"file": "{}"}}], "resultFile": "{}"}}"#,
            layer(dir.path()),
            result.display()
        ),
    )
    .unwrap();
    let out = obd(&["add", "--config", config.to_str().unwrap()], &run_dir);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "printed a device: {:?}", out.stdout);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one sentence: {stderr}");
    assert!(stderr.contains("no ublk driver"), "{stderr}");
    assert!(stderr.contains("modprobe ublk_drv"), "{stderr}");
    let written = std::fs::read_to_string(&result).unwrap();
    assert!(written.starts_with("failed:"), "{written}");
    assert!(written.contains("modprobe ublk_drv"), "{written}");
    // No record, no daemon log: nothing was started.
    assert!(
        !run_dir.exists() || std::fs::read_dir(&run_dir).unwrap().next().is_none(),
        "left files in {}",
        run_dir.display()
    );
    let list = obd(&["list"], &run_dir);
    assert!(list.status.success());
    assert!(list.stdout.is_empty());
}

#[test]
fn bad_configs_report_failed_in_the_result_file() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let result = dir.path().join("result");
    let cases = [
        (
            "missing layer",
            format!(
                r#"{{"lowers": [{{"file": "{}/nope.lsmt"}}], "resultFile": "{}"}}"#,
                dir.path().display(),
                result.display()
            ),
        ),
        (
            "unparseable",
            format!(
                r#"{{"lowers": [ oops, "resultFile": "{}"}}"#,
                result.display()
            ),
        ),
    ];
    for (what, text) in cases {
        let config = dir.path().join("config.v1.json");
        std::fs::write(&config, text).unwrap();
        let _ = std::fs::remove_file(&result);
        let out = obd(&["add", "--config", config.to_str().unwrap()], &run_dir);
        assert!(!out.status.success(), "{what}");
        let written = std::fs::read_to_string(&result).unwrap_or_default();
        assert!(written.starts_with("failed:"), "{what}: {written}");
    }
}

#[test]
fn snapshot_of_a_device_obd_does_not_serve_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = obd(&["snapshot", "-n", "7"], &dir.path().join("run"));
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("/dev/ublkb7 is not a device obd serves"),
        "{stderr}"
    );
}

#[test]
fn resize_argument_errors_are_plain() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = obd(&["resize", "-n", "7", "2G"], &run);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("/dev/ublkb7 is not a device obd serves"),
        "{stderr}"
    );
    for (size, says) in [
        ("100", "not a positive multiple of 512"),
        ("2X", "unknown unit"),
        ("big", "is not a size"),
        ("0", "not a positive multiple of 512"),
    ] {
        let out = obd(&["resize", "-n", "0", size], &run);
        assert!(!out.status.success(), "{size}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(says), "{size}: {stderr}");
    }
    let out = obd(&["resize", "-n", "0"], &run);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("<SIZE>"), "{stderr}");
    let out = obd(&["resize", "-n", "-3", "1G"], &run);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("not a ublk device number"), "{stderr}");
}
