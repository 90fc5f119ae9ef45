//! `obd trace record` with eBPF on real block devices: loop devices over
//! files, an ext4 mounted from one. These need root, loop devices and BPF;
//! where one is missing the test fails saying which (they never skip).
//! Loop devices and mounts are released by guards, even on panic.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use trace_tools::events::{Event, EventFile};

fn obd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_obd")
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run it: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop device over a file, detached on drop.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(file)
            .output()
            .expect("losetup (util-linux) is needed for the loop-device tests");
        assert!(
            out.status.success(),
            "losetup failed — these tests need root and loop devices: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        LoopDevice { path }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A read-only mount, unmounted on drop.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn read_only(dev: &Path, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        run(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "ro"])
                .arg(dev)
                .arg(dir),
            "mount -o ro (needs root and ext4)",
        );
        Mount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// `obd trace record` running in the background; stopped with SIGINT.
struct Recording {
    child: Child,
    output: PathBuf,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Recording {
    /// Start recording `dev` and wait until the probes are attached.
    fn start(dev: &Path, files: bool, output: &Path) -> Recording {
        let mut cmd = Command::new(obd_bin());
        cmd.args(["trace", "record", "--duration", "120", "--device"])
            .arg(dev)
            .arg("-o")
            .arg(output)
            .stderr(Stdio::piped());
        if files {
            cmd.arg("--files");
        }
        let mut child = cmd.spawn().expect("run obd trace record");
        let mut reader = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!("obd trace record exited ({status}) before recording (BPF needed): {seen}");
            }
            seen.push_str(&line);
            if line.starts_with("recording ") {
                break;
            }
        }
        let stderr = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = reader.read_to_string(&mut rest);
            seen + &rest
        });
        Recording {
            child,
            output: output.to_path_buf(),
            stderr: Some(stderr),
        }
    }

    fn stop(mut self) -> EventFile {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
        let status = self.child.wait().unwrap();
        let stderr = self.stderr.take().unwrap().join().unwrap();
        assert!(status.success(), "obd trace record: {status}: {stderr}");
        EventFile::read(&self.output).unwrap()
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run `f` on a thread named `name` (its comm, as the kernel reports it).
fn on_thread<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

#[test]
fn ebpf_records_exactly_the_direct_reads_made_on_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    let data = pattern(32 << 20);
    std::fs::write(&backing, &data).unwrap();
    let dev = LoopDevice::attach(&backing);
    let events_path = dir.path().join("reads.events");
    let recording = Recording::start(&dev.path, false, &events_path);

    let ranges: Vec<(u64, u64)> = vec![
        (0, 4096),
        (1 << 20, 65536),
        ((5 << 20) + 8192, 12288),
        (31 << 20, 131072),
        ((7 << 20) + 512, 1024),
    ];
    let device = dev.path.clone();
    let wanted = ranges.clone();
    let read_back = on_thread("obd-direct-rd", move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&device)
            .expect("open the loop device with O_DIRECT");
        // O_DIRECT wants an aligned buffer: carve one out of a larger Vec.
        let mut raw = vec![0u8; (256 << 10) + 4096];
        let skip = raw.as_ptr().align_offset(4096);
        let mut out = Vec::new();
        for (offset, len) in wanted {
            let buf = &mut raw[skip..skip + len as usize];
            file.read_exact_at(buf, offset).expect("O_DIRECT read");
            out.push(buf.to_vec());
        }
        out
    });
    for ((offset, len), got) in ranges.iter().zip(&read_back) {
        assert_eq!(got[..], data[*offset as usize..(*offset + *len) as usize]);
    }
    let events = recording.stop();
    assert_eq!(events.header.size, 32 << 20);
    let me = std::process::id();
    let mine: Vec<_> = events.blocks().filter(|b| b.pid == me).collect();
    let got: Vec<(u64, u64)> = mine.iter().map(|b| (b.offset, b.length)).collect();
    assert_eq!(got, ranges, "all events of this process: {mine:#?}");
    for b in &mine {
        assert_eq!(b.comm, "obd-direct-rd");
        assert!(b.rwbs.starts_with('R'), "{b:?}");
    }
    assert!(mine.windows(2).all(|w| w[0].t <= w[1].t));
}

#[test]
fn ebpf_file_records_name_the_files_read_from_a_mounted_ext4() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    let files = [
        ("etc/hostname", b"obd-trace-test\n".to_vec()),
        ("app/bin/tool", pattern(200 << 10)),
        ("app/lib/libx.so", pattern(1 << 20)),
        ("app/unread.dat", pattern(500 << 10)),
    ];
    for (rel, data) in &files {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    let image = dir.path().join("fs.img");
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&root)
            .arg(&image)
            .arg("64M"),
        "mkfs.ext4 -d (e2fsprogs)",
    );
    let dev = LoopDevice::attach(&image);
    let mount = Mount::read_only(&dev.path, &dir.path().join("mnt"));
    std::fs::write("/proc/sys/vm/drop_caches", b"3").expect("drop caches (needs root)");
    let events_path = dir.path().join("files.events");
    let recording = Recording::start(&dev.path, true, &events_path);
    let read_order = ["etc/hostname", "app/lib/libx.so", "app/bin/tool"];
    let mnt = mount.dir.clone();
    on_thread("obd-file-read", move || {
        for rel in read_order {
            let mut data = Vec::new();
            File::open(mnt.join(rel))
                .unwrap()
                .read_to_end(&mut data)
                .unwrap();
        }
    });
    let events = recording.stop();
    drop(mount);

    let names = events.inode_names();
    let me = std::process::id();
    let mut first_seen = Vec::new();
    let mut page_bytes = std::collections::HashMap::<PathBuf, u64>::new();
    for e in &events.events {
        if let Event::Page(p) = e {
            if p.pid != me {
                continue;
            }
            assert_eq!(p.comm, "obd-file-read");
            let path = names
                .get(&p.ino)
                .unwrap_or_else(|| panic!("inode {} has no name", p.ino))
                .clone();
            *page_bytes.entry(path.clone()).or_default() += p.pages * events.header.page_size;
            if !first_seen.contains(&path) {
                first_seen.push(path);
            }
        }
    }
    let want: Vec<PathBuf> = read_order
        .iter()
        .map(|r| PathBuf::from("/").join(r))
        .collect();
    assert_eq!(first_seen, want, "files read, in order");
    assert!(page_bytes[Path::new("/app/lib/libx.so")] >= 1 << 20);
    assert!(page_bytes[Path::new("/app/bin/tool")] >= 200 << 10);
    assert!(events.blocks().any(|b| b.pid == me && b.is_read()));

    // Through an image: the raw filesystem imported as one layer, the
    // events converted to a layer trace and a file list, both replayable.
    let layer = dir.path().join("fs.lsmt");
    run(
        Command::new(obd_bin())
            .arg("import")
            .arg(&image)
            .arg(&layer),
        "obd import",
    );
    let trace = dir.path().join("app.trace");
    let list = dir.path().join("app.list");
    run(
        Command::new(obd_bin())
            .args(["trace", "convert"])
            .arg(&layer)
            .arg("-i")
            .arg(&events_path)
            .arg("-o")
            .arg(&trace)
            .arg("--list")
            .arg(&list),
        "obd trace convert",
    );
    let listed = std::fs::read_to_string(&list).unwrap();
    let listed: Vec<&str> = listed.lines().collect();
    assert_eq!(
        listed,
        ["/etc/hostname", "/app/lib/libx.so", "/app/bin/tool"],
        "the list holds what was read, in order"
    );
    let records = overlaybd::trace::decode(&std::fs::read(&trace).unwrap(), "app.trace").unwrap();
    let bytes: u64 = records.iter().map(|r| r.count).sum();
    assert!(records.iter().all(|r| r.layer_index == 0));
    assert!(
        bytes >= (1 << 20) + (200 << 10),
        "{bytes} bytes in the trace"
    );
    let stack = Arc::new(
        overlaybd::image::open_stack(&[overlaybd::image::LayerSpec::File(layer.clone())], false)
            .unwrap(),
    );
    for file in [&trace, &list] {
        let trace_tools::Session::Replaying(handle) =
            trace_tools::Session::start(&stack, file, 4, trace_tools::warn_to_stderr()).unwrap()
        else {
            panic!("{} must replay", file.display());
        };
        let report = handle.wait().unwrap();
        assert_eq!(report.failed_reads, 0);
        assert!(report.missing_paths.is_empty());
        assert!(report.bytes >= (1 << 20) + (200 << 10), "{report:?}");
    }
    let shown = run(
        Command::new(obd_bin())
            .args(["trace", "show"])
            .arg(&events_path),
        "obd trace show",
    );
    assert!(shown.contains("obd-file-read"), "{shown}");
    assert!(shown.contains("/app/lib/libx.so"), "{shown}");
}

#[test]
fn recording_without_bpf_permission_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    std::fs::write(&backing, vec![0u8; 1 << 20]).unwrap();
    let dev = LoopDevice::attach(&backing);
    // As nobody, with no capabilities.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(obd_bin())
        .args(["trace", "record", "--duration", "1", "--device"])
        .arg(&dev.path)
        .args(["-o", "/tmp/obd-never-written.events"])
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("eBPF is not permitted here") && stderr.contains("run as root"),
        "{stderr}"
    );
    assert!(!Path::new("/tmp/obd-never-written.events").exists());
}
