//! End-to-end tests of the `obd` program on the reference tools' files.

#[path = "../overlaybd/tests/common/mod.rs"]
mod common;

mod obd_cli;
use obd_cli::{obd_err, obd_ok, obd_stdout, s};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixtures, sha256_hex, ReferenceVectors};

fn assert_raw_matches(v: &ReferenceVectors, raw: &Path, n: usize) {
    let data = std::fs::read(raw).unwrap();
    for (mib, want) in v.stack_sha256_per_mib(n).iter().enumerate() {
        let chunk = &data[mib << 20..(mib + 1) << 20];
        assert_eq!(
            &sha256_hex(chunk),
            want,
            "stack 0..={n} MiB {mib} of {}",
            raw.display()
        );
    }
}

/// `obd export --length 16M INPUTS...` into `raw`, which must then hold the
/// reference stack 0..=n.
fn assert_export_matches(v: &ReferenceVectors, n: usize, raw: &Path, inputs: &[&str]) {
    let mut args = vec!["export", "--output", s(raw), "--length", "16777216"];
    args.extend_from_slice(inputs);
    obd_ok(&args);
    assert_raw_matches(v, raw, n);
}

/// `obd info --json SPEC`, parsed.
fn info_json(spec: &str) -> serde_json::Value {
    serde_json::from_slice(&obd_ok(&["info", spec, "--json"]).stdout).unwrap()
}

/// `obd commit` of vector layer `n` with the manifest's uuid, parent and
/// message, plus `extra` options.
fn run_reference_commit(v: &ReferenceVectors, n: usize, out: &Path, extra: &[&str]) {
    let data = v.path(&v.layer_str(n, "writable_data").unwrap());
    let index = v.path(&v.layer_str(n, "writable_index").unwrap());
    let message = format!("layer {n}");
    let uuid = v.layer_str(n, "uuid").unwrap();
    let parent = v.layer_str(n, "parent_uuid");
    let mut args = vec![
        "commit",
        s(&data),
        s(&index),
        s(out),
        "-m",
        &message,
        "--uuid",
        &uuid,
    ];
    if let Some(parent) = &parent {
        args.extend(["-p", parent]);
    }
    args.extend_from_slice(extra);
    obd_ok(&args);
}

#[test]
fn commit_matches_the_reference_byte_for_byte() {
    let v = ReferenceVectors::unpack();
    for n in 0..v.layers().len() {
        let out = v.dir.path().join(format!("ours{n}.lsmt"));
        run_reference_commit(&v, n, &out, &[]);
        let ours = std::fs::read(&out).unwrap();
        let theirs = std::fs::read(v.path(&v.layer_str(n, "lsmt").unwrap())).unwrap();
        assert!(
            ours == theirs,
            "layer {n}: commit output differs from the reference"
        );
    }
}

#[test]
fn compressed_commit_and_zfile_match_the_reference_byte_for_byte() {
    let v = ReferenceVectors::unpack();
    for n in 0..v.layers().len() {
        // e.g. layer1.zstd8k.zfile: overlaybd-commit -z --algorithm zstd --bs 8
        let name = v.layer_str(n, "zfile_commit").unwrap();
        let spec = name
            .trim_start_matches(&format!("layer{n}."))
            .trim_end_matches("k.zfile");
        let algorithm = if spec.starts_with("lz4") {
            "lz4"
        } else {
            "zstd"
        };
        let bs = &spec[algorithm.len()..];
        let out = v.dir.path().join(format!("ours{n}.zfile"));
        run_reference_commit(&v, n, &out, &["-z", "--algorithm", algorithm, "--bs", bs]);
        let theirs = std::fs::read(v.path(&name)).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == theirs,
            "{name}: commit -z output differs"
        );

        let tool = v.dir.path().join(format!("tool{n}.zfile"));
        obd_ok(&[
            "zfile",
            s(&v.path(&v.layer_str(n, "lsmt").unwrap())),
            s(&tool),
        ]);
        let theirs = std::fs::read(v.path(&v.layer_str(n, "zfile_tool").unwrap())).unwrap();
        assert!(
            std::fs::read(&tool).unwrap() == theirs,
            "layer {n}: zfile output differs"
        );
    }
}

#[test]
fn export_of_every_prefix_plain_and_compressed_matches() {
    let v = ReferenceVectors::unpack();
    for kind in ["lsmt", "zfile_commit", "zfile_tool"] {
        for n in 0..v.layers().len() {
            let layers: Vec<PathBuf> = (0..=n)
                .map(|i| v.path(&v.layer_str(i, kind).unwrap()))
                .collect();
            let inputs: Vec<&str> = layers.iter().map(|p| s(p)).collect();
            let raw = v.dir.path().join(format!("{kind}-{n}.raw"));
            assert_export_matches(&v, n, &raw, &inputs);
        }
    }
}

#[test]
fn export_with_a_writable_top_and_a_config() {
    let v = ReferenceVectors::unpack();
    // Layers 0..1 committed, layer 2 still writable: same view as all committed.
    let top = format!(
        "{}:{}",
        s(&v.path("layer2.data")),
        s(&v.path("layer2.index"))
    );
    assert_export_matches(
        &v,
        2,
        &v.dir.path().join("mixed.raw"),
        &[
            s(&v.path("layer0.lz44k.zfile")),
            s(&v.path("layer1.zstd8k.zfile")),
            &top,
        ],
    );

    let config = v.dir.path().join("config.v1.json");
    let json = serde_json::json!({
        "lowers": [
            {"file": v.path("layer0.lsmt")},
            {"file": v.path("layer1.lsmt.zfile")},
        ],
        "upper": {"data": v.path("layer2.data"), "index": v.path("layer2.index")},
    });
    std::fs::write(&config, json.to_string()).unwrap();
    assert_export_matches(
        &v,
        2,
        &v.dir.path().join("config.raw"),
        &["--config", s(&config)],
    );
}

#[test]
fn zfile_round_trip_and_verify() {
    let v = ReferenceVectors::unpack();
    let input = v.path("layer1.lsmt");
    for (algorithm, bs) in [("lz4", "4"), ("zstd", "64"), ("lz4", "16")] {
        let z = v.dir.path().join(format!("l1-{algorithm}-{bs}.zfile"));
        obd_ok(&[
            "zfile",
            s(&input),
            s(&z),
            "--algorithm",
            algorithm,
            "--bs",
            bs,
        ]);
        assert!(obd_stdout(&["zfile", "--verify", s(&z)]).contains("ok"));
        let back = v.dir.path().join(format!("l1-{algorithm}-{bs}.back"));
        obd_ok(&["zfile", "-x", s(&z), s(&back)]);
        assert!(std::fs::read(&back).unwrap() == std::fs::read(&input).unwrap());
    }
    // The reference's own ZFiles verify too.
    obd_ok(&["zfile", "--verify", s(&v.path("layer1.zstd8k.zfile"))]);
}

/// 64 KiB blocks of data that does not compress are stored in more than
/// 64 KiB, which the reference overlaybd cannot read: obd says so when it
/// writes them (and reads them back itself); 32 KiB blocks are fine.
#[test]
fn zfile_warns_of_blocks_the_reference_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..256 << 10)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let raw = dir.path().join("noise.raw");
    std::fs::write(&raw, &noise).unwrap();
    for (bs, warned) in [("64", true), ("32", false)] {
        let z = dir.path().join(format!("noise-{bs}.zfile"));
        let out = obd_ok(&["zfile", "--algorithm", "zstd", "--bs", bs, s(&raw), s(&z)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.contains("4 block(s) did not compress"),
            warned,
            "--bs {bs}: {stderr}"
        );
        let back = dir.path().join(format!("noise-{bs}.back"));
        obd_ok(&["zfile", "-x", s(&z), s(&back)]);
        assert!(std::fs::read(&back).unwrap() == noise);
    }
}

#[test]
fn zfile_verify_reports_a_flipped_crc() {
    let v = ReferenceVectors::unpack();
    let z = v.path("layer0.lsmt.zfile");
    let mut bytes = std::fs::read(&z).unwrap();
    bytes[600] ^= 0x40; // inside the first compressed block
    let bad = v.dir.path().join("bad.zfile");
    std::fs::write(&bad, &bytes).unwrap();
    let err = obd_err(&["zfile", "--verify", s(&bad)]);
    assert!(err.contains("bad.zfile"), "error names the file: {err}");
    assert!(
        err.to_lowercase().contains("crc"),
        "error names the problem: {err}"
    );
}

#[test]
fn commit_compressed_and_tar_wrapped_reads_back() {
    let v = ReferenceVectors::unpack();
    let out = v.dir.path().join("l0.tar.zfile");
    obd_ok(&[
        "commit",
        s(&v.path("layer0.data")),
        s(&v.path("layer0.index")),
        s(&out),
        "-z",
        "--algorithm",
        "zstd",
        "--bs",
        "32",
        "-t",
    ]);
    let info = info_json(s(&out));
    let wrapping = info["wrapping"].as_str().unwrap();
    assert!(
        wrapping.contains("tar") && wrapping.contains("zfile"),
        "{wrapping}"
    );
    assert_export_matches(&v, 0, &v.dir.path().join("l0.raw"), &[s(&out)]);
}

#[test]
fn the_reference_convertor_image_exports_to_ext4() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("dev.raw");
    let blobs = fixtures().join("real-dev-image");
    obd_ok(&[
        "export",
        "--output",
        s(&raw),
        "--length",
        "67108864",
        s(&blobs.join("dev-layer0.blob")),
        s(&blobs.join("dev-layer1.blob")),
    ]);
    let data = std::fs::read(&raw).unwrap();
    assert_eq!(&data[0x438..0x43A], &[0x53, 0xEF], "ext4 superblock magic");
}

#[test]
fn legacy_zfile_reads_with_the_recorded_hash() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let gz = std::fs::File::open(fixtures().join("legacy-ext4_64.zfile.gz")).unwrap();
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut bytes)
        .unwrap();
    assert_eq!(bytes.len(), 4_737_695);
    let z = dir.path().join("legacy.zfile");
    std::fs::write(&z, &bytes).unwrap();
    let raw = dir.path().join("legacy.raw");
    obd_ok(&["export", "--output", s(&raw), "--length", "67108864", s(&z)]);
    assert_eq!(
        sha256_hex(&std::fs::read(&raw).unwrap()),
        "a7405d1545c7bdb63e3d5233a1ce3e34a2564eb8269bfb125202168fb1bdc596"
    );
    let info = info_json(s(&z));
    assert_eq!(
        info["header"]["uuid"],
        "C02FB491-B4D4-4904-8684-A014D032AF78"
    );
    assert_eq!(info["index"]["entries"], 8323);
    assert_eq!(info["trailer"]["virtual_size"], 64u64 << 30);
}

#[test]
fn import_of_a_real_ext4_image_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    for i in 0..50 {
        std::fs::write(
            tree.join(format!("sub/file{i}.txt")),
            format!("file {i}\n").repeat(i + 1),
        )
        .unwrap();
    }
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(tree.join("sub/deeper/big.bin"), &big).unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d", s(&tree), s(&raw)])
        .status()
        .expect("mkfs.ext4 (package e2fsprogs) is installed by scripts/test.sh");
    assert!(mkfs.success());
    for extra in [
        &[][..],
        &["-z", "--algorithm", "zstd"][..],
        &["-z", "-t"][..],
    ] {
        let layer = dir.path().join(format!("layer{}.obd", extra.len()));
        let mut args = vec!["import", s(&raw), s(&layer)];
        args.extend_from_slice(extra);
        obd_ok(&args);
        let back = dir.path().join(format!("back{}.raw", extra.len()));
        obd_ok(&["export", "--output", s(&back), s(&layer)]);
        assert!(
            std::fs::read(&back).unwrap() == std::fs::read(&raw).unwrap(),
            "import {extra:?} then export differs from the raw image"
        );
    }
}

#[test]
fn create_then_info_and_commit_an_empty_layer() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("up.data");
    let index = dir.path().join("up.index");
    obd_ok(&[
        "create",
        s(&data),
        s(&index),
        "2",
        "-u",
        "00000001-0000-4000-8000-00000000000a",
    ]);
    let spec = format!("{}:{}", s(&data), s(&index));
    let info = info_json(&spec);
    assert_eq!(info["header"]["virtual_size"], 2u64 << 30);
    assert_eq!(
        info["header"]["parent_uuid"],
        "00000001-0000-4000-8000-00000000000A"
    );
    let out = dir.path().join("empty.lsmt");
    obd_ok(&["commit", s(&data), s(&index), s(&out)]);
    let info = info_json(s(&out));
    assert_eq!(info["index"]["mapped_bytes"], 0);

    let sparse = dir.path().join("up.sparse");
    obd_ok(&["create", "-s", s(&sparse), "1"]);
    assert_eq!(std::fs::metadata(&sparse).unwrap().len(), 4096 + (1 << 30));
}

#[test]
fn bad_input_gives_clear_errors_and_loses_nothing() {
    let v = ReferenceVectors::unpack();
    // Missing input.
    let err = obd_err(&[
        "export",
        "--output",
        "/tmp/never-written.raw",
        "/nonexistent/layer.lsmt",
    ]);
    assert!(err.contains("/nonexistent/layer.lsmt"), "{err}");
    assert!(!Path::new("/tmp/never-written.raw").exists());
    // Existing output is never overwritten.
    let existing = v.path("layer1.lsmt");
    let before = std::fs::read(&existing).unwrap();
    let err = obd_err(&[
        "commit",
        s(&v.path("layer0.data")),
        s(&v.path("layer0.index")),
        s(&existing),
    ]);
    assert!(err.contains("already exists"), "{err}");
    assert!(std::fs::read(&existing).unwrap() == before);
    // Garbage is not a layer.
    let junk = v.dir.path().join("junk.bin");
    std::fs::write(&junk, vec![0x5Au8; 10000]).unwrap();
    let err = obd_err(&["info", s(&junk)]);
    assert!(err.contains("junk.bin"), "{err}");
    // A writable data file without its index says how to name it.
    let err = obd_err(&[
        "export",
        "--output",
        s(&v.dir.path().join("x.raw")),
        s(&v.path("layer0.data")),
    ]);
    assert!(err.contains("DATA:INDEX"), "{err}");
    // Bad options.
    let err = obd_err(&[
        "zfile",
        s(&v.path("layer0.lsmt")),
        s(&v.dir.path().join("z")),
        "--bs",
        "5",
    ]);
    assert!(err.contains("--bs"), "{err}");
    let err = obd_err(&[
        "create",
        s(&v.dir.path().join("d")),
        s(&v.dir.path().join("i")),
        "zero",
    ]);
    assert!(err.contains("VSIZE_GB"), "{err}");
    let err = obd_err(&[
        "export",
        "--output",
        s(&v.dir.path().join("y.raw")),
        "--offset",
        "100",
        s(&v.path("layer0.lsmt")),
    ]);
    assert!(err.contains("512"), "{err}");
}

/// Linked under the reference tools' names (as the containerd snapshotter
/// runs them from /opt/overlaybd/bin), obd acts as those tools, with their
/// arguments; a commit made that way is the same file as `obd commit`'s.
#[test]
fn runs_as_the_reference_tools_under_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["overlaybd-create", "overlaybd-commit", "overlaybd-zfile"] {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_obd"), bin.join(tool)).unwrap();
    }
    let run = |tool: &str, args: &[&Path]| {
        let out = Command::new(bin.join(tool)).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (data, index) = (
        dir.path().join("writable_data"),
        dir.path().join("writable_index"),
    );
    run("overlaybd-create", &[&data, &index, Path::new("64")]);
    let header = std::fs::read(&data).unwrap();
    assert_eq!(&header[..8], b"LSMT\0\x01\x02\0", "an LSMT data file");
    let committed = dir.path().join("overlaybd.commit");
    run("overlaybd-commit", &[&data, &index, &committed]);
    let by_obd = dir.path().join("by-obd.commit");
    obd_ok(&["commit", s(&data), s(&index), s(&by_obd)]);
    assert_eq!(
        std::fs::read(&committed).unwrap(),
        std::fs::read(&by_obd).unwrap()
    );
    let zfile = dir.path().join("layer.zfile");
    run("overlaybd-zfile", &[&committed, &zfile]);
    obd_ok(&["info", s(&zfile)]);
}

/// `obd info LAYER | head -1`: obd ends quietly when its reader goes away.
#[test]
fn info_into_a_closed_pipe_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let v = ReferenceVectors::unpack();
    let mut child = Command::new(env!("CARGO_BIN_EXE_obd"))
        .args(["info", s(&v.path("layer0.lsmt"))])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("path:"), "{first}");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
