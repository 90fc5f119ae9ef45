//! Damaged layers (cut short, bytes flipped) applied to a small ext4 in
//! memory: each must apply or fail with an error, never panic, and every
//! layer that applies must leave a file system e2fsck finds clean. The
//! same check as the `oci_layer` fuzz target, over a fixed set of inputs.

use std::io::Read;
use std::sync::Arc;

use ext4_apply::{fs::MIN_FS_SIZE, pax, Ext4, MemoryDevice};
use tar::{EntryType, Header};

fn base() -> Arc<Vec<u8>> {
    let disk = Arc::new(MemoryDevice::zeros(MIN_FS_SIZE));
    Ext4::mkfs(disk.clone(), MIN_FS_SIZE)
        .unwrap()
        .close()
        .unwrap();
    Arc::new(disk.image())
}

fn layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>,
               kind: EntryType,
               path: &str,
               link: Option<&str>,
               data: &[u8]| {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        match link {
            Some(target) => b.append_link(&mut h, path, target).unwrap(),
            None => b.append_data(&mut h, path, data).unwrap(),
        }
    };
    add(&mut b, EntryType::Directory, "etc", None, b"");
    add(
        &mut b,
        EntryType::Regular,
        "etc/passwd",
        None,
        b"root:x:0:0::/root:/bin/sh\n",
    );
    add(
        &mut b,
        EntryType::Link,
        "etc/passwd-",
        Some("etc/passwd"),
        b"",
    );
    add(&mut b, EntryType::Symlink, "etc/link", Some("passwd"), b"");
    add(
        &mut b,
        EntryType::Regular,
        &format!("deep/{}", "x".repeat(180)),
        None,
        &[7u8; 9000],
    );
    add(&mut b, EntryType::Fifo, "run/fifo", None, b"");
    let mut data = pax::encode(b"SCHILY.xattr.user.a", b"1\n2");
    data.extend(pax::encode(b"uid", b"123456"));
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::XHeader);
    h.set_path("PaxHeaders/x").unwrap();
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data.as_slice()).unwrap();
    add(&mut b, EntryType::Regular, "etc/.wh.gone", None, b"");
    add(&mut b, EntryType::Regular, "etc/.wh..wh..opq", None, b"");
    add(
        &mut b,
        EntryType::Regular,
        "etc/shadow",
        None,
        b"root:*:1::::::\n",
    );
    b.into_inner().unwrap()
}

/// Apply `input`; on success, the file system must be clean.
fn check(base: &Arc<Vec<u8>>, input: &[u8], fsck_dir: Option<&std::path::Path>) -> bool {
    let disk = Arc::new(MemoryDevice::over(base.clone()));
    let mut fs = Ext4::open(disk.clone()).unwrap();
    let applied = ext4_apply::apply(&mut fs, input);
    match applied {
        Ok(_) => {
            fs.close().expect("a layer that applied must close");
            if let Some(dir) = fsck_dir {
                let raw = dir.join("fs.raw");
                std::fs::write(&raw, disk.image()).unwrap();
                let out = std::process::Command::new("e2fsck")
                    .arg("-fn")
                    .arg(&raw)
                    .output()
                    .expect("run e2fsck");
                assert!(
                    out.status.success(),
                    "e2fsck after a damaged layer applied:\n{}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            true
        }
        Err(e) => {
            if std::env::var_os("SHOW_ERRORS").is_some() {
                eprintln!("{e}");
            }
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

#[test]
fn the_undamaged_layer_applies_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    assert!(check(&base(), &layer(), Some(dir.path())));
}

#[test]
fn damaged_layers_fail_or_apply_cleanly() {
    let base = base();
    let dir = tempfile::tempdir().unwrap();
    let whole = layer();
    let mut applied = 0;
    // Cut short anywhere: always an error (the end-of-archive blocks go).
    for cut in (0..whole.len() - 1024).step_by(173) {
        assert!(!check(&base, &whole[..cut], None), "cut at {cut} applied");
    }
    // Bytes flipped in the headers and data.
    for at in (0..whole.len() - 1024).step_by(61) {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut input = whole.clone();
            input[at] ^= flip;
            let fsck = (applied < 25).then_some(dir.path());
            if check(&base, &input, fsck) {
                applied += 1;
            }
        }
    }
    assert!(applied > 0, "some flips (in file data) still apply");
}

#[test]
fn a_layer_bigger_than_the_disk_is_an_error() {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(24 << 20);
    b.append_data(&mut h, "big", std::io::repeat(1).take(24 << 20))
        .unwrap();
    let disk = Arc::new(MemoryDevice::over(base()));
    let mut fs = Ext4::open(disk).unwrap();
    let err = ext4_apply::apply(&mut fs, b.into_inner().unwrap().as_slice()).unwrap_err();
    assert!(err.to_string().contains("allocate"), "{err}");
}

#[test]
fn a_disk_without_ext4_is_an_error() {
    let disk = Arc::new(MemoryDevice::zeros(MIN_FS_SIZE));
    let err = Ext4::open(disk).err().expect("no file system");
    assert!(err.to_string().contains("--mkfs"), "{err}");
}
