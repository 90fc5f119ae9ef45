//! `obd serve --vhost-user-blk` on the host, without a VMM: socket
//! handling, errors, the resultFile, connections that come and go, a clean
//! stop on SIGTERM, and `obd snapshot --vhost-user-blk` of a served disk.
//! (tests/vm/vhost/boot.sh boots a real VM, and snapshots it as it writes.)

mod obd_cli;
use obd_cli::{obd_err, obd_ok, obd_stdout, run_dir, s, start_serve, stop_serve};

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A 4 MiB read-only image (one imported layer) and its config, whose
/// resultFile is `result` beside it.
fn image(dir: &Path) -> PathBuf {
    let raw = dir.join("disk.raw");
    std::fs::write(&raw, vec![0x5a; 4 << 20]).unwrap();
    obd_ok(&["import", s(&raw), s(&dir.join("base.lsmt"))]);
    let config = dir.join("config.v1.json");
    std::fs::write(
        &config,
        r#"{"lowers": [{"file": "base.lsmt"}], "resultFile": "result"}"#,
    )
    .unwrap();
    config
}

fn result(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("result")).unwrap_or_default()
}

#[test]
fn serves_connection_after_connection_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let config = image(dir.path());
    let socket = dir.path().join("vm.sock");
    // A stale socket (nobody listening) is replaced.
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let child = start_serve(&socket, &config, &[]);
    assert_eq!(result(dir.path()), "success");
    // A VMM that connects and goes away; then another.
    for _ in 0..2 {
        let conn = UnixStream::connect(&socket).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        drop(conn);
    }
    // Still serving: a third connection is accepted.
    let conn = UnixStream::connect(&socket).unwrap();
    drop(conn);
    std::thread::sleep(Duration::from_millis(300));
    let log = stop_serve(child);
    assert!(log.contains("read-only, 2 queues"), "{log}");
    assert!(
        log.matches("the VMM disconnected").count() >= 2,
        "two connections seen:\n{log}"
    );
    assert!(log.contains("requests per queue: 0 0"), "{log}");
    assert!(!socket.exists(), "the socket is removed on exit");
}

#[test]
fn refuses_a_path_that_is_not_a_socket_or_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let config = image(dir.path());
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let err = obd_err(&[
        "serve",
        "--vhost-user-blk",
        s(&file),
        "--config",
        s(&config),
    ]);
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert!(
        result(dir.path()).starts_with("failed:"),
        "{}",
        result(dir.path())
    );

    // A socket someone is serving on is left alone.
    let socket = dir.path().join("busy.sock");
    let _busy = UnixListener::bind(&socket).unwrap();
    let err = obd_err(&[
        "serve",
        "--vhost-user-blk",
        s(&socket),
        "--config",
        s(&config),
    ]);
    assert!(err.contains("in use"), "{err}");
    assert!(socket.exists());
}

#[test]
fn config_and_image_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    // A config that does not parse still gets its resultFile written.
    let config = dir.path().join("config.v1.json");
    std::fs::write(&config, r#"{"lowers": 5, "resultFile": "result"}"#).unwrap();
    let err = obd_err(&[
        "serve",
        "--vhost-user-blk",
        s(&socket),
        "--config",
        s(&config),
    ]);
    assert!(err.contains("cannot load the image config"), "{err}");
    assert!(result(dir.path()).starts_with("failed:"));
    // A lower that does not exist.
    std::fs::write(
        &config,
        r#"{"lowers": [{"file": "missing.lsmt"}], "resultFile": "result"}"#,
    )
    .unwrap();
    let err = obd_err(&[
        "serve",
        "--vhost-user-blk",
        s(&socket),
        "--config",
        s(&config),
    ]);
    assert!(err.contains("cannot open the image"), "{err}");
    assert!(err.contains("missing.lsmt"), "{err}");
    assert!(!socket.exists(), "no socket for an image that did not open");
    // Bad options.
    let config = image(dir.path());
    let err = obd_err(&[
        "serve",
        "--vhost-user-blk",
        s(&socket),
        "--config",
        s(&config),
        "--queues",
        "0",
    ]);
    assert!(err.contains("--queues"), "{err}");
    let err = obd_err(&[
        "serve",
        "--vhost-user-blk",
        s(&socket),
        "--config",
        s(&config),
        "--block-size",
        "1024",
    ]);
    assert!(err.contains("512 or 4096"), "{err}");
}

#[test]
fn help_shows_a_vmm_command_line() {
    let help = obd_stdout(&["serve", "--help"]);
    for want in [
        "--vhost-user-blk",
        "vhost-user-blk-pci,chardev=c,num-queues=2",
        "memory-backend-memfd,id=mem,size=1G,share=on",
        "-numa node,memdev=mem",
        "cloud-hypervisor",
    ] {
        assert!(help.contains(want), "--help lacks {want}:\n{help}");
    }
}

/// Keys of the global config obd does not act on are named once at start.
#[test]
fn names_the_global_keys_it_ignores_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = image(dir.path());
    let global = dir.path().join("overlaybd.json");
    std::fs::write(
        &global,
        r#"{"ioEngine": 2, "cacheConfig": {"cacheType": "ocf", "cacheDir": "cache"}}"#,
    )
    .unwrap();
    let socket = dir.path().join("vm.sock");
    let child = start_serve(&socket, &config, &["--global-config", s(&global)]);
    let log = stop_serve(child);
    let ignored: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not implemented, ignored"))
        .collect();
    assert_eq!(ignored.len(), 2, "{log}");
    assert!(
        ignored[0].contains("cacheConfig.cacheType \"ocf\""),
        "{log}"
    );
    assert!(ignored[1].contains("ioEngine 2"), "{log}");

    // Without such keys, nothing is named.
    std::fs::write(&global, r#"{"cacheConfig": {"cacheDir": "cache"}}"#).unwrap();
    let child = start_serve(&socket, &config, &["--global-config", s(&global)]);
    let log = stop_serve(child);
    assert!(!log.contains("ignored"), "{log}");
}

/// `obd snapshot --vhost-user-blk SOCKET`, with the serving daemon's run dir.
fn snapshot(socket: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_obd"))
        .env("OBD_RUN_DIR", run_dir(socket))
        .args(["snapshot", "--vhost-user-blk", s(socket)])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn snapshot_of_a_served_disk_rewrites_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = image(dir.path());
    obd_ok(&[
        "create",
        s(&dir.path().join("upper.data")),
        s(&dir.path().join("upper.index")),
        "1",
    ]);
    std::fs::write(
        &config,
        r#"{"lowers": [{"file": "base.lsmt"}],
            "upper": {"data": "upper.data", "index": "upper.index"},
            "resultFile": "result"}"#,
    )
    .unwrap();
    let socket = dir.path().join("vm.sock");
    let child = start_serve(&socket, &config, &[]);
    // No VMM has to be connected; named through a roundabout path.
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let out = snapshot(&dir.path().join("sub/../vm.sock"), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("upper-1.data"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert_eq!(json["lowers"].as_array().unwrap().len(), 2, "{json}");
    assert!(json["lowers"][1]["data"]
        .as_str()
        .unwrap()
        .ends_with("/upper.data"));
    assert!(json["upper"]["index"]
        .as_str()
        .unwrap()
        .ends_with("/upper-1.index"));
    assert!(dir.path().join("upper-1.data").exists());
    // A second one goes on numbering; --data and --index name the files.
    let out = snapshot(
        &socket,
        &[
            "--data",
            s(&dir.path().join("two.data")),
            "--index",
            s(&dir.path().join("two.index")),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert_eq!(json["lowers"].as_array().unwrap().len(), 3, "{json}");
    assert!(json["upper"]["data"]
        .as_str()
        .unwrap()
        .ends_with("/two.data"));
    // The snapshotted config opens, with the old upper as a lower.
    obd_ok(&[
        "export",
        "--config",
        s(&config),
        "--length",
        "4096",
        "-o",
        s(&dir.path().join("out")),
    ]);
    let log = stop_serve(child);
    assert!(log.contains("obd: snapshot: "), "{log}");
    assert!(
        std::fs::read_dir(run_dir(&socket).join("vhost"))
            .unwrap()
            .next()
            .is_none(),
        "the snapshot socket is removed on exit"
    );
}

#[test]
fn snapshot_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = image(dir.path());
    let socket = dir.path().join("vm.sock");
    // Nothing served there.
    let out = snapshot(&socket, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no such socket"), "{stderr}");
    // A read-only disk has nothing to snapshot.
    let child = start_serve(&socket, &config, &[]);
    let out = snapshot(&socket, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no writable layer"), "{stderr}");
    // Both ways of naming the device, or neither: usage errors.
    let stderr = obd_err(&["snapshot", "-n", "0", "--vhost-user-blk", s(&socket)]);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    let stderr = obd_err(&["snapshot"]);
    assert!(stderr.contains("--vhost-user-blk <SOCKET>"), "{stderr}");
    stop_serve(child);
}
