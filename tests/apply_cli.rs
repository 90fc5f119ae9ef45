//! `obd apply`: OCI layer tarballs into committed layers, checked by
//! reading the resulting ext4 with e2fsprogs (debugfs, e2fsck), not with
//! obd's own code.

mod obd_cli;
use obd_cli::{assert_apply_v1_tree, assert_fsck_clean, obd, obd_err, obd_ok, s};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use tar::{EntryType, Header};

const MTIME: u64 = 1_700_000_000;

/// `../shared/vectors/apply-v1` beside the repository, if this checkout has it.
fn apply_vectors() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors/apply-v1");
    dir.join("expected-tree.json").is_file().then_some(dir)
}

/// `obd export` of `layers` (bottom → top) into `raw`.
fn export(raw: &Path, layers: &[&Path]) {
    let mut args = vec!["export", "--output", s(raw)];
    args.extend(layers.iter().map(|p| s(p)));
    obd_ok(&args);
}

fn debugfs(raw: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request, s(raw)])
        .output()
        .expect("run debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// What `debugfs stat` says of one inode.
#[derive(Debug)]
struct Stat {
    kind: String,
    mode: String,
    uid: u32,
    gid: u32,
    size: u64,
    links: u32,
    inode: u64,
    text: String,
}

fn field<'a>(text: &'a str, name: &str) -> &'a str {
    let at = text
        .find(name)
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    text[at + name.len()..].split_whitespace().next().unwrap()
}

fn stat(raw: &Path, path: &str) -> Option<Stat> {
    let text = debugfs(raw, &format!("stat \"/{path}\""));
    if text.contains("File not found") {
        return None;
    }
    let kind_start = text.find("Type: ").unwrap() + 6;
    let kind = text[kind_start..]
        .split("  ")
        .next()
        .unwrap()
        .trim()
        .to_string();
    Some(Stat {
        kind,
        mode: field(&text, "Mode:").to_string(),
        uid: field(&text, "User:").parse().unwrap(),
        gid: field(&text, "Group:").parse().unwrap(),
        size: field(&text, "Size:").parse().unwrap(),
        links: field(&text, "Links:").parse().unwrap(),
        inode: field(&text, "Inode:").parse().unwrap(),
        text,
    })
}

fn must_stat(raw: &Path, path: &str) -> Stat {
    stat(raw, path).unwrap_or_else(|| panic!("{path} is missing"))
}

fn cat(raw: &Path, path: &str) -> Vec<u8> {
    Command::new("debugfs")
        .args(["-R", &format!("cat \"/{path}\""), s(raw)])
        .output()
        .expect("run debugfs")
        .stdout
}

fn xattr(raw: &Path, path: &str, name: &str, dir: &Path) -> Option<Vec<u8>> {
    let out = dir.join("xattr.value");
    let _ = std::fs::remove_file(&out);
    debugfs(raw, &format!("ea_get -f {} \"/{path}\" {name}", s(&out)));
    std::fs::read(&out).ok()
}

fn xattr_names(raw: &Path, path: &str) -> Vec<String> {
    debugfs(raw, &format!("ea_list \"/{path}\""))
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

#[test]
fn the_apply_v1_vectors_give_the_expected_tree() {
    let Some(v) = apply_vectors() else {
        eprintln!("SKIPPED: ../shared/vectors/apply-v1 is not beside this checkout");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(v.join("manifest.json")).unwrap()).unwrap();
    let layers: Vec<&serde_json::Value> = (0..)
        .map_while(|n| manifest.get(format!("layer{n}")))
        .collect();
    assert_eq!(layers.len(), 3, "manifest.json names three layers");
    let mut outputs: Vec<PathBuf> = Vec::new();
    for (n, layer) in layers.iter().enumerate() {
        let out = dir.path().join(format!("layer{n}.blob"));
        let tarball = v.join(format!("layer{n}.tar.gz"));
        let uuid = layer["uuid"].as_str().expect("uuid");
        let diff_id = layer["diff_id"].as_str().expect("diff_id");
        let mut args = vec![
            "apply",
            "-z",
            "-t",
            "--uuid",
            uuid,
            "--checksum",
            diff_id,
            s(&tarball),
            s(&out),
        ];
        if n == 0 {
            args.push("--mkfs");
        }
        args.extend(outputs.iter().map(|p| s(p)));
        obd_ok(&args);
        let info: serde_json::Value =
            serde_json::from_slice(&obd_ok(&["info", s(&out), "--json"]).stdout).unwrap();
        let text = info.to_string().to_lowercase();
        for key in ["uuid", "parent_uuid"] {
            let want = layer[key].as_str().expect("uuid").to_lowercase();
            assert!(
                text.contains(&want),
                "layer {n}: {key} {want} not in {text}"
            );
        }
        outputs.push(out);
        let raw = dir.path().join(format!("stack{n}.raw"));
        let stack: Vec<&Path> = outputs.iter().map(|p| p.as_path()).collect();
        export(&raw, &stack);
        assert_fsck_clean(&raw);
    }
    let raw = dir.path().join(format!("stack{}.raw", layers.len() - 1));
    assert_apply_v1_tree(&v, &raw);
}

/// Writes tar entries the way image builders do (GNU headers, pax
/// records, long names), plus raw names the tar crate refuses to write.
struct TarMaker {
    builder: tar::Builder<Vec<u8>>,
}

fn header(kind: EntryType, mode: u32, uid: u64, gid: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(MTIME);
    h.set_size(0);
    h
}

impl TarMaker {
    fn new() -> TarMaker {
        TarMaker {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn dir(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> &mut Self {
        let mut h = header(EntryType::Directory, mode, uid, gid);
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
        self
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.owned_file(path, mode, 0, 0, data)
    }

    fn owned_file(&mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> &mut Self {
        let mut h = header(EntryType::Regular, mode, uid, gid);
        h.set_size(data.len() as u64);
        self.builder.append_data(&mut h, path, data).unwrap();
        self
    }

    fn link(&mut self, kind: EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = header(kind, 0o777, 0, 0);
        self.builder.append_link(&mut h, path, target).unwrap();
        self
    }

    fn device(&mut self, kind: EntryType, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = header(kind, 0o600, 0, 0);
        if kind != EntryType::Fifo {
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
        }
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
        self
    }

    /// A pax header whose records apply to the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (key, value) in records {
            let body = key.len() + value.len() + 3; // ' ', '=', '\n'
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::XHeader);
        h.set_path("PaxHeaders/next").unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        self.builder.append(&h, data.as_slice()).unwrap();
        self
    }

    /// An entry with a name written byte for byte (no checks).
    fn raw_name(&mut self, kind: EntryType, name: &[u8], link: &[u8], data: &[u8]) -> &mut Self {
        let mut h = header(kind, 0o644, 0, 0);
        h.set_size(data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()))
            .into_inner()
            .unwrap()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const CAPABILITY: [u8; 20] = [
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// The first layer: every entry kind.
fn base_layer(big: &[u8], sparse: &[u8]) -> Vec<u8> {
    let mut t = TarMaker::new();
    let long_dir = "l".repeat(150);
    let long_name = format!("{long_dir}/{}", "n".repeat(200));
    let long_target = "t/".repeat(120);
    t.pax(&[("SCHILY.xattr.user.old", b"1")])
        .dir("d", 0o750, 5, 6)
        .dir("d/sub", 0o2775, 0, 0)
        .file("d/f", 0o644, b"hello\n")
        .link(EntryType::Link, "d/h", "d/f")
        .link(EntryType::Symlink, "d/s", "../nowhere")
        .link(EntryType::Symlink, "d/long-link", &long_target)
        .file("d/setuid", 0o4755, b"#!/bin/sh\n")
        .file("d/empty", 0o600, b"")
        .owned_file("d/owned", 0o640, 70000, 70001, b"big ids")
        .pax(&[("uid", b"3000000"), ("gid", b"3000001")])
        .file("d/pax-owned", 0o644, b"pax ids")
        .pax(&[
            ("SCHILY.xattr.user.bin", b"a\nb=c\n\0\xff".as_slice()),
            ("SCHILY.xattr.security.capability", &CAPABILITY),
        ])
        .file("d/caps", 0o755, b"capable")
        .file("d/big", 0o644, big)
        .file("d/sparse", 0o644, sparse)
        .dir("dev", 0o755, 0, 0)
        .device(EntryType::Char, "dev/c", 10, 300)
        .device(EntryType::Block, "dev/b", 8, 1)
        .device(EntryType::Fifo, "dev/p", 0, 0)
        .dir(&long_dir, 0o755, 0, 0)
        .file(&long_name, 0o644, b"long")
        .file("imp/a/b/file", 0o644, b"implicit parents")
        .dir("d2f", 0o755, 0, 0)
        .file("d2f/child", 0o644, b"x")
        .file("f2d", 0o644, b"x")
        .dir("gone", 0o755, 0, 0)
        .file("gone/a", 0o644, b"a")
        .file("gone/sub/b", 0o644, b"b")
        .dir("opq", 0o755, 0, 0)
        .file("opq/old", 0o644, b"old")
        .file("opq/sub/old", 0o644, b"old")
        .dir("keep", 0o755, 0, 0)
        .file("keep/old", 0o644, b"old")
        .dir("usr/bin", 0o755, 0, 0)
        .link(EntryType::Symlink, "bin", "usr/bin")
        .link(EntryType::Symlink, "abs", "/usr")
        .link(EntryType::Symlink, "up", "../../..");
    for i in 0..300 {
        t.file(&format!("many/{i:03}-{}", "m".repeat(40)), 0o644, b"");
    }
    t.finish()
}

/// The second layer: whiteouts, opaque dirs, replacements.
fn upper_layer() -> Vec<u8> {
    let mut t = TarMaker::new();
    t.raw_name(EntryType::Directory, b"./", b"", b"")
        .raw_name(EntryType::Regular, b"./.wh.gone", b"", b"")
        .dir("opq", 0o700, 0, 0)
        .raw_name(EntryType::Regular, b"opq/.wh..wh..opq", b"", b"")
        .file("opq/new", 0o644, b"new")
        .file("keep/new", 0o644, b"new")
        .raw_name(EntryType::Regular, b"keep/.wh..wh..opq", b"", b"")
        .file("d2f", 0o600, b"now a file")
        .dir("f2d", 0o711, 0, 0)
        .file("f2d/inside", 0o644, b"in")
        .raw_name(EntryType::Regular, b".wh.never-was", b"", b"")
        .pax(&[("SCHILY.xattr.user.new", b"2")])
        .dir("d", 0o700, 7, 8)
        .raw_name(EntryType::Regular, b"d/.wh.f", b"", b"")
        .link(EntryType::Link, "d/h2", "d/h")
        .file("late", 0o644, b"stays")
        .raw_name(EntryType::Regular, b".wh.late", b"", b"")
        .file("bin/tool", 0o755, b"tool")
        .file("abs/bin/tool2", 0o755, b"tool2")
        .file("up/top", 0o644, b"top")
        .link(EntryType::Link, "bin/tool-link", "abs/bin/tool");
    // Names added to, and taken from, a hash-indexed directory.
    for i in 0..400 {
        t.file(&format!("many/new-{i:03}-{}", "p".repeat(50)), 0o644, b"n");
    }
    for i in (0..300).step_by(2) {
        let name = format!("many/.wh.{i:03}-{}", "m".repeat(40));
        t.raw_name(EntryType::Regular, name.as_bytes(), b"", b"");
    }
    t.finish()
}

#[test]
fn every_entry_kind_and_whiteout_case() {
    let dir = tempfile::tempdir().unwrap();
    let big = pseudo_random(3 << 20, 7);
    let mut sparse = vec![0u8; 2 << 20];
    sparse[..5000].copy_from_slice(&pseudo_random(5000, 3));
    sparse.extend_from_slice(b"tail");
    let base = dir.path().join("base.tar.gz");
    std::fs::write(&base, gzip(&base_layer(&big, &sparse))).unwrap();
    let upper = dir.path().join("upper.tar.zst");
    std::fs::write(
        &upper,
        zstd::encode_all(upper_layer().as_slice(), 3).unwrap(),
    )
    .unwrap();

    let l0 = dir.path().join("l0.lsmt");
    let l1 = dir.path().join("l1.zfile");
    obd_ok(&["apply", "--mkfs", "--size", "1", s(&base), s(&l0)]);
    obd_ok(&["apply", "-z", s(&upper), s(&l1), s(&l0)]);
    // No clock in the output: the same layers give the same bytes.
    let again = dir.path().join("again.zfile");
    obd_ok(&["apply", "-z", s(&upper), s(&again), s(&l0)]);
    assert!(std::fs::read(&again).unwrap() == std::fs::read(&l1).unwrap());
    let raw0 = dir.path().join("l0.raw");
    let raw = dir.path().join("l1.raw");
    export(&raw0, &[&l0]);
    export(&raw, &[&l0, &l1]);
    assert_fsck_clean(&raw0);
    assert_fsck_clean(&raw);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 1 << 30);

    // Layer 0 alone: every kind, exactly.
    let f = must_stat(&raw0, "d/f");
    assert_eq!(
        (f.kind.as_str(), f.mode.as_str(), f.links),
        ("regular", "0644", 2)
    );
    assert_eq!(cat(&raw0, "d/f"), b"hello\n");
    assert_eq!(must_stat(&raw0, "d/h").inode, f.inode);
    let d = must_stat(&raw0, "d");
    assert_eq!((d.mode.as_str(), d.uid, d.gid), ("0750", 5, 6));
    assert_eq!(xattr(&raw0, "d", "user.old", dir.path()).unwrap(), b"1");
    assert_eq!(must_stat(&raw0, "d/sub").mode, "02775");
    assert_eq!(must_stat(&raw0, "d/setuid").mode, "04755");
    assert_eq!(must_stat(&raw0, "d/empty").size, 0);
    let owned = must_stat(&raw0, "d/owned");
    assert_eq!((owned.uid, owned.gid), (70000, 70001));
    let pax_owned = must_stat(&raw0, "d/pax-owned");
    assert_eq!((pax_owned.uid, pax_owned.gid), (3000000, 3000001));
    assert_eq!(
        xattr(&raw0, "d/caps", "user.bin", dir.path()).unwrap(),
        b"a\nb=c\n\0\xff"
    );
    assert_eq!(
        xattr(&raw0, "d/caps", "security.capability", dir.path()).unwrap(),
        CAPABILITY
    );
    assert_eq!(cat(&raw0, "d/big"), big);
    assert_eq!(cat(&raw0, "d/sparse"), sparse);
    let sparse_stat = must_stat(&raw0, "d/sparse");
    let blocks: u64 = field(&sparse_stat.text, "Blockcount:").parse().unwrap();
    assert!(
        blocks <= 4 * 8,
        "d/sparse holds {blocks} sectors: holes were written"
    );
    let s = must_stat(&raw0, "d/s");
    assert_eq!((s.kind.as_str(), s.mode.as_str()), ("symlink", "0777"));
    assert!(
        s.text.contains("Fast link dest: \"../nowhere\""),
        "{}",
        s.text
    );
    let long = debugfs(&raw0, "stat \"/d/long-link\"");
    assert!(long.contains("Type: symlink"), "{long}");
    assert_eq!(cat(&raw0, "d/long-link"), "t/".repeat(120).as_bytes());
    let c = must_stat(&raw0, "dev/c");
    assert!(
        c.text.contains("Device major/minor number: 10:300"),
        "{}",
        c.text
    );
    assert_eq!(c.kind, "character special");
    let b = must_stat(&raw0, "dev/b");
    assert!(
        b.text.contains("Device major/minor number: 08:01"),
        "{}",
        b.text
    );
    assert_eq!(must_stat(&raw0, "dev/p").kind, "FIFO");
    let long_name = format!("{}/{}", "l".repeat(150), "n".repeat(200));
    assert_eq!(cat(&raw0, &long_name), b"long");
    let imp = must_stat(&raw0, "imp/a");
    assert_eq!((imp.mode.as_str(), imp.uid), ("0755", 0));
    assert_eq!(cat(&raw0, "imp/a/b/file"), b"implicit parents");
    assert_eq!(
        cat(&raw0, "many/299-mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm"),
        b""
    );
    assert!(must_stat(&raw0, "many").size > 4096, "many/ was grown");
    let htree = debugfs(&raw0, "htree /many");
    assert!(
        htree.contains("Root node dump"),
        "many/ is hash-indexed: {htree}"
    );

    // Both layers.
    assert!(stat(&raw, "gone").is_none());
    assert!(stat(&raw, "gone/a").is_none());
    assert_eq!(must_stat(&raw, "opq").mode, "0700");
    assert!(stat(&raw, "opq/old").is_none());
    assert!(stat(&raw, "opq/sub").is_none());
    assert_eq!(cat(&raw, "opq/new"), b"new");
    assert_eq!(
        cat(&raw, "keep/new"),
        b"new",
        "the opaque marker came after it"
    );
    assert!(stat(&raw, "keep/old").is_none());
    let d2f = must_stat(&raw, "d2f");
    assert_eq!((d2f.kind.as_str(), d2f.mode.as_str()), ("regular", "0600"));
    assert_eq!(cat(&raw, "d2f"), b"now a file");
    let f2d = must_stat(&raw, "f2d");
    assert_eq!(
        (f2d.kind.as_str(), f2d.mode.as_str()),
        ("directory", "0711")
    );
    assert_eq!(cat(&raw, "f2d/inside"), b"in");
    let d = must_stat(&raw, "d");
    assert_eq!((d.mode.as_str(), d.uid, d.gid), ("0700", 7, 8));
    assert_eq!(
        xattr_names(&raw, "d"),
        vec!["user.new"],
        "re-declared xattrs replace"
    );
    assert!(stat(&raw, "d/f").is_none());
    let h = must_stat(&raw, "d/h");
    assert_eq!(h.links, 2, "d/h and d/h2 after d/f's whiteout");
    assert_eq!(must_stat(&raw, "d/h2").inode, h.inode);
    assert_eq!(cat(&raw, "d/h2"), b"hello\n");
    assert_eq!(
        cat(&raw, "late"),
        b"stays",
        "a whiteout spares its own layer"
    );
    assert_eq!(cat(&raw, "d/big"), big);
    assert!(must_stat(&raw, "lost+found").kind == "directory");
    // `ls -p` lines: /INODE/MODE/UID/GID/NAME/SIZE/; inode 0 = a free slot.
    let many: Vec<String> = debugfs(&raw, "ls -p /many")
        .lines()
        .map(|l| l.split('/').collect::<Vec<_>>())
        .filter(|f| f.len() > 5 && f[1] != "0" && f[5].len() > 2)
        .map(|f| f[5].to_string())
        .collect();
    let old: Vec<&String> = many.iter().filter(|n| n.ends_with("mmmm")).collect();
    assert_eq!(many.iter().filter(|n| n.starts_with("new-")).count(), 400);
    assert_eq!(old.len(), 150, "{old:?}");
    assert!(
        old.iter().all(|n| n[..3].parse::<u32>().unwrap() % 2 == 1),
        "{old:?}"
    );
    assert!(debugfs(&raw, "htree /many").contains("Root node dump"));
    // Parents that are symlinks are followed inside the image.
    assert_eq!(cat(&raw, "usr/bin/tool"), b"tool");
    assert_eq!(cat(&raw, "usr/bin/tool2"), b"tool2");
    assert_eq!(cat(&raw, "top"), b"top", "../../.. stops at the root");
    assert_eq!(must_stat(&raw, "bin").kind, "symlink");
    let tool = must_stat(&raw, "usr/bin/tool");
    assert_eq!(
        (tool.links, must_stat(&raw, "usr/bin/tool-link").inode),
        (2, tool.inode)
    );
}

/// A layer that must be refused: the error names the problem, nothing is
/// written, nothing panics.
fn assert_refused(tar: &[u8], name: &str, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.tar");
    let mut t = TarMaker::new();
    t.dir("a", 0o755, 0, 0).file("a/f", 0o644, b"f");
    std::fs::write(&base, t.finish()).unwrap();
    let l0 = dir.path().join("l0.lsmt");
    obd_ok(&["apply", "--mkfs", "--size", "1", s(&base), s(&l0)]);
    let layer = dir.path().join(name);
    std::fs::write(&layer, tar).unwrap();
    let out = dir.path().join("out.lsmt");
    let err = obd_err(&["apply", s(&layer), s(&out), s(&l0)]);
    assert!(err.contains(expect), "{name}: {err}");
    assert!(!err.contains("panicked"), "{name}: {err}");
    assert!(!out.exists(), "{name}: output written");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{name}: left {leftovers:?}");
}

#[test]
fn bad_layers_are_refused_with_a_reason() {
    let mut t = TarMaker::new();
    t.file("x", 0o644, &pseudo_random(100_000, 1));
    let whole = t.finish();
    // Cut inside the file's data, and at an entry boundary (no end blocks).
    assert_refused(&whole[..50_000], "cut-in-data.tar", "truncated");
    assert_refused(&whole[..512 + 100_352], "cut-at-end.tar", "truncated");
    assert_refused(&gzip(&whole)[..30_000], "cut.tar.gz", "bad layer");
    assert_refused(b"not a tar at all, just some text", "text.tar", "bad layer");

    let mut t = TarMaker::new();
    t.raw_name(EntryType::Regular, b"a/../../etc/passwd", b"", b"x");
    assert_refused(&t.finish(), "escape.tar", "climbs above the root");

    let mut t = TarMaker::new();
    t.raw_name(EntryType::Link, b"a/l", b"a/missing", b"");
    assert_refused(&t.finish(), "dangling-hardlink.tar", "does not exist");

    let mut t = TarMaker::new();
    t.raw_name(EntryType::Link, b"b", b"a", b"");
    assert_refused(&t.finish(), "hardlink-to-dir.tar", "a directory");

    let mut t = TarMaker::new();
    t.file("a/f/under-a-file", 0o644, b"x");
    assert_refused(&t.finish(), "file-parent.tar", "not a directory");

    let mut t = TarMaker::new();
    t.link(EntryType::Symlink, "loop1", "loop2")
        .link(EntryType::Symlink, "loop2", "loop1")
        .file("loop1/x", 0o644, b"x");
    assert_refused(&t.finish(), "symlink-loop.tar", "too many symlinks");

    let mut t = TarMaker::new();
    t.pax(&[("uid", b"many")]).file("a/g", 0o644, b"x");
    assert_refused(&t.finish(), "bad-pax.tar", "not a number");

    let mut bad_pax = TarMaker::new();
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::XHeader);
    h.set_path("PaxHeaders/x").unwrap();
    h.set_size(11);
    h.set_cksum();
    bad_pax
        .builder
        .append(&h, b"99 path=ab\n".as_slice())
        .unwrap();
    bad_pax.file("a/g", 0o644, b"x");
    assert_refused(&bad_pax.finish(), "malformed-pax.tar", "pax record");
}

#[test]
fn a_whiteout_of_a_missing_name_does_nothing() {
    // The OCI spec and real layers (and the apply-v1 vectors) allow it.
    let dir = tempfile::tempdir().unwrap();
    let mut t = TarMaker::new();
    t.raw_name(EntryType::Regular, b".wh.nothing-here", b"", b"")
        .file("kept", 0o644, b"k");
    let layer = dir.path().join("l.tar");
    std::fs::write(&layer, t.finish()).unwrap();
    let out = dir.path().join("l.lsmt");
    obd_ok(&["apply", "--mkfs", "--size", "1", s(&layer), s(&out)]);
    let raw = dir.path().join("l.raw");
    export(&raw, &[&out]);
    assert_fsck_clean(&raw);
    assert_eq!(cat(&raw, "kept"), b"k");
}

#[test]
fn a_layer_from_standard_input() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = TarMaker::new();
    t.file("piped", 0o644, b"through a pipe");
    let out = dir.path().join("l.lsmt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_obd"))
        .args(["apply", "--mkfs", "--size", "1", "-", s(&out)])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&gzip(&t.finish()))
        .unwrap();
    assert!(child.wait().unwrap().success());
    let raw = dir.path().join("l.raw");
    export(&raw, &[&out]);
    assert_eq!(cat(&raw, "piped"), b"through a pipe");
}

#[test]
fn usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = TarMaker::new();
    t.file("f", 0o644, b"f");
    let layer = dir.path().join("l.tar");
    std::fs::write(&layer, t.finish()).unwrap();
    let out = dir.path().join("out.lsmt");
    assert!(obd_err(&["apply", s(&layer), s(&out)]).contains("--mkfs"));
    std::fs::write(&out, b"x").unwrap();
    assert!(obd_err(&["apply", "--mkfs", s(&layer), s(&out)]).contains("already exists"));
    std::fs::remove_file(&out).unwrap();
    let lower = dir.path().join("not-a-layer");
    std::fs::write(&lower, vec![0u8; 8192]).unwrap();
    let err = obd_err(&["apply", s(&layer), s(&out), s(&lower)]);
    assert!(err.contains("not-a-layer"), "{err}");
    assert!(!out.exists());
    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = obd_err(&["apply", "--mkfs", "--checksum", &wrong, s(&layer), s(&out)]);
    assert!(err.contains("--checksum"), "{err}");
    assert!(!out.exists());
    let help = obd(&["apply", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("Examples:") && help.contains("--mkfs"),
        "{help}"
    );
}
