//! Running the `obd` binary from the end-to-end tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Run `obd ARGS...`.
pub fn obd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_obd"))
        .args(args)
        .output()
        .expect("run obd")
}

/// Run `obd ARGS...`; it must succeed.
pub fn obd_ok(args: &[&str]) -> Output {
    let out = obd(args);
    assert!(
        out.status.success(),
        "obd {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run `obd ARGS...`; it must succeed. Returns its stdout.
pub fn obd_stdout(args: &[&str]) -> String {
    String::from_utf8_lossy(&obd_ok(args).stdout).into_owned()
}

/// Run `obd ARGS...`; it must fail. Returns its stderr.
pub fn obd_err(args: &[&str]) -> String {
    let out = obd(args);
    assert!(!out.status.success(), "obd {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `e2fsck -fn RAW` must find nothing to fix.
pub fn assert_fsck_clean(raw: &Path) {
    let out = Command::new("e2fsck")
        .args(["-fn", s(raw)])
        .output()
        .expect("run e2fsck (e2fsprogs)");
    assert!(
        out.status.success(),
        "e2fsck -fn {} exited {:?}:\n{}{}",
        raw.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The ext4 image RAW holds exactly the tree of the apply-v1 vectors in
/// `vectors` (their `checktree.py` against `expected-tree.json`).
pub fn assert_apply_v1_tree(vectors: &Path, raw: &Path) {
    let check = Command::new("python3")
        .arg(vectors.join("checktree.py"))
        .arg(vectors.join("expected-tree.json"))
        .arg(raw)
        .output()
        .expect("run python3 checktree.py");
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "checktree.py:\n{report}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(report.contains("116/116 entries match"), "{report}");
}
