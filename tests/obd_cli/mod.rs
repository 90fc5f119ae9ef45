//! Running the `obd` binary from the end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// The run dir (snapshot sockets) of the obd serve on `socket`: beside it.
pub fn run_dir(socket: &Path) -> PathBuf {
    socket.parent().unwrap().join("run")
}

/// `obd serve --vhost-user-blk SOCKET --config CONFIG --queues 2 EXTRA...`
/// in the background (its run dir beside the socket); returns once it
/// printed the socket path.
pub fn start_serve(socket: &Path, config: &Path, extra: &[&str]) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_obd"))
        .env("OBD_RUN_DIR", run_dir(socket))
        .args([
            "serve",
            "--vhost-user-blk",
            s(socket),
            "--config",
            s(config),
        ])
        .args(["--queues", "2"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim_end(), s(socket), "obd serve's first line");
    child
}

/// Stop an `obd serve` with SIGTERM; it must exit cleanly within 20 s.
/// Returns its stderr.
pub fn stop_serve(mut child: Child) -> String {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "obd serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(status.success(), "exit {status:?} after SIGTERM:\n{log}");
    log
}
