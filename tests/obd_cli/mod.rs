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
