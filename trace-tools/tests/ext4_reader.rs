//! The read-only ext4 reader against filesystems made by mke2fs and by the
//! reference convertor (the real-dev-image fixture, read through its stack).

#[path = "../../overlaybd/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{fixtures, sha256_hex};
use overlaybd::image::{open_stack, LayerSpec};
use overlaybd::io::{LocalFile, ReadAt, Source};
use trace_tools::ext4::{Ext4, FileKind, Inode};
use trace_tools::StackSource;

/// A byte source over a Vec (for corruption tests).
struct Mem(Vec<u8>);

impl ReadAt for Mem {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset as usize + buf.len();
        if end > self.0.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&self.0[offset as usize..end]);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn name(&self) -> &str {
        "mem.img"
    }
}

/// Deterministic bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A source tree with what the reader must handle: nesting, a big
/// directory (htree), a large file, a sparse file, fast and slow symlinks.
fn make_tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut put = |rel: &str, data: Vec<u8>| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &data).unwrap();
        files.insert(PathBuf::from("/").join(rel), data);
    };
    put("etc/hostname", b"obd-test\n".to_vec());
    put("usr/lib/deep/er/still/file.so", pattern(1, 70_000));
    put("big/blob.bin", pattern(2, 5 << 20));
    put("empty", Vec::new());
    for i in 0..600 {
        put(
            &format!("many/file{i:04}.txt"),
            format!("file {i}\n").into_bytes(),
        );
    }
    // Sparse: data, a 1 MiB hole, data.
    let sparse = root.join("sparse.bin");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&sparse).unwrap();
        f.write_all_at(&pattern(3, 8192), 0).unwrap();
        f.write_all_at(&pattern(4, 4096), (1 << 20) + 8192).unwrap();
    }
    let mut sparse_data = vec![0u8; (1 << 20) + 8192 + 4096];
    sparse_data[..8192].copy_from_slice(&pattern(3, 8192));
    sparse_data[(1 << 20) + 8192..].copy_from_slice(&pattern(4, 4096));
    files.insert(PathBuf::from("/sparse.bin"), sparse_data);
    std::os::unix::fs::symlink("/usr/lib/deep", root.join("lib")).unwrap();
    let long = format!("../usr/lib/deep/{}/../er/still/file.so", "x".repeat(80));
    std::fs::create_dir_all(root.join("usr/lib/deep").join("x".repeat(80))).unwrap();
    std::os::unix::fs::symlink(&long, root.join("etc/slow-link")).unwrap();
    files
}

fn mkfs(kind: &str, root: &Path, image: &Path, extra: &[&str]) {
    mkfs_sized(kind, root, image, extra, "64M")
}

fn mkfs_sized(kind: &str, root: &Path, image: &Path, extra: &[&str], size: &str) {
    let out = Command::new(format!("mkfs.{kind}"))
        .args(["-q", "-F", "-d"])
        .arg(root)
        .args(extra)
        .arg(image)
        .arg(size)
        .output()
        .expect("mkfs.ext4/mkfs.ext2 (e2fsprogs) must be installed");
    assert!(
        out.status.success(),
        "mkfs.{kind}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn open_file(path: &Path) -> Ext4 {
    let source: Source = Arc::new(LocalFile::open(path).unwrap());
    Ext4::open(source).unwrap()
}

/// Read a file through its extents and compare with what was written.
fn check_files(fs: &Ext4, files: &BTreeMap<PathBuf, Vec<u8>>, dev: &dyn ReadAt) {
    for (path, want) in files {
        let inode = fs
            .lookup(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(inode.kind, FileKind::Regular, "{}", path.display());
        assert_eq!(inode.size, want.len() as u64, "{}", path.display());
        assert_eq!(
            &fs.read_file(&inode, 64 << 20).unwrap(),
            want,
            "{}",
            path.display()
        );
        // The device ranges, read raw and laid out by extent, give the same bytes.
        let mut got = vec![0u8; want.len()];
        let bs = fs.block_size();
        for e in fs.extents(&inode).unwrap() {
            for i in 0..e.len {
                let at = ((e.logical + i) * bs) as usize;
                if at >= got.len() {
                    break;
                }
                let n = (got.len() - at).min(bs as usize);
                dev.read_exact_at(&mut got[at..at + n], (e.physical + i) * bs)
                    .unwrap();
            }
        }
        assert_eq!(&got, want, "{} via extents", path.display());
    }
}

fn check_tree(kind: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let files = make_tree(&root);
    let image = dir.path().join("fs.img");
    mkfs(kind, &root, &image, extra);
    let fs = open_file(&image);
    let dev = LocalFile::open(&image).unwrap();
    check_files(&fs, &files, &dev);

    // Symlinks are followed: absolute ones from the filesystem root.
    let via_link = fs.lookup(Path::new("/lib/er/still/file.so")).unwrap();
    let direct = fs
        .lookup(Path::new("/usr/lib/deep/er/still/file.so"))
        .unwrap();
    assert_eq!(via_link.ino, direct.ino);
    let slow = fs.lookup(Path::new("/etc/slow-link")).unwrap();
    assert_eq!(slow.ino, direct.ino);
    assert_eq!(
        fs.lookup(Path::new("/usr/./lib/../lib/deep/er"))
            .unwrap()
            .kind,
        FileKind::Directory
    );
    let missing = fs.lookup(Path::new("/etc/nope")).unwrap_err().to_string();
    assert!(missing.contains("/etc/nope"), "{missing}");

    // Walking a directory finds every regular file below it.
    let many = fs.lookup(Path::new("/many")).unwrap();
    let walked = fs.walk(&many, Path::new("/many")).unwrap();
    assert_eq!(walked.len(), 600);
    assert!(walked
        .iter()
        .any(|(p, _)| p == Path::new("/many/file0599.txt")));
    let all = fs
        .walk(&fs.lookup(Path::new("/")).unwrap(), Path::new("/"))
        .unwrap();
    let names: std::collections::BTreeSet<_> = all.iter().map(|(p, _)| p.clone()).collect();
    for path in files.keys() {
        assert!(names.contains(path), "walk misses {}", path.display());
    }

    // Inode numbers map back to paths.
    let paths = fs.inode_paths().unwrap();
    assert_eq!(
        paths[&direct.ino],
        Path::new("/usr/lib/deep/er/still/file.so")
    );
    assert_eq!(paths[&many.ino], Path::new("/many"));
}

#[test]
fn ext4_made_by_mkfs_reads_back() {
    check_tree("ext4", &[]);
}

#[test]
fn ext4_with_1k_blocks_and_64bit_reads_back() {
    check_tree("ext4", &["-b", "1024", "-O", "64bit,metadata_csum"]);
}

#[test]
fn ext2_block_maps_with_double_indirect_blocks_read_back() {
    // 1 KiB blocks: the 5 MiB file needs double-indirect blocks.
    check_tree("ext2", &["-b", "1024"]);
}

#[test]
fn reference_convertor_image_matches_its_tree_through_the_stack() {
    let dir = fixtures().join("real-dev-image");
    let specs = ["dev-layer0.blob", "dev-layer1.blob"]
        .map(|name| LayerSpec::File(dir.join(name)))
        .to_vec();
    let stack = Arc::new(open_stack(&specs, false).unwrap());
    let fs = Ext4::open(Arc::new(StackSource::new(stack, "real-dev-image"))).unwrap();
    let tree: BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(dir.join("dev-tree.json")).unwrap()).unwrap();
    let root = fs.lookup(Path::new("/")).unwrap();
    let mut seen = 0;
    for (path, want) in &tree {
        let abs = PathBuf::from("/").join(path);
        if let Some(target) = want.strip_prefix("symlink:") {
            // lookup follows the link; read the link itself through its parent.
            let parent = fs.lookup(abs.parent().unwrap()).unwrap();
            let name = abs.file_name().unwrap().as_bytes();
            let entry = fs
                .read_dir(&parent)
                .unwrap()
                .into_iter()
                .find(|e| e.name == name)
                .unwrap();
            let link: Inode = fs.inode(entry.ino).unwrap();
            assert_eq!(link.kind, FileKind::Symlink);
            assert_eq!(fs.read_file(&link, 4096).unwrap(), target.as_bytes());
        } else if want == "dir" {
            assert_eq!(fs.lookup(&abs).unwrap().kind, FileKind::Directory, "{path}");
        } else {
            let inode = fs.lookup(&abs).unwrap();
            let data = fs.read_file(&inode, 64 << 20).unwrap();
            assert_eq!(&sha256_hex(&data), want, "{path}");
            seen += 1;
        }
    }
    assert!(seen > 200, "{seen} files checked");
    let files = fs.walk(&root, Path::new("/")).unwrap();
    assert!(files
        .iter()
        .all(|(p, _)| tree.contains_key(p.strip_prefix("/").unwrap().to_str().unwrap())));
    assert!(
        fs.lookup(Path::new("/docs/doc007.txt")).is_err(),
        "whiteout"
    );
}

#[test]
fn not_ext4_or_damaged_is_an_error_naming_the_source() {
    let err = Ext4::open(Arc::new(Mem(vec![0u8; 1 << 20])))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with("mem.img: ext4: no ext2/3/4 superblock"),
        "{err}"
    );
    let err = Ext4::open(Arc::new(Mem(vec![0u8; 100])))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("too small"), "{err}");

    // Truncated after the superblock.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    make_tree(&root);
    let image = dir.path().join("fs.img");
    mkfs("ext4", &root, &image, &[]);
    let bytes = std::fs::read(&image).unwrap();
    let cut = Arc::new(Mem(bytes[..8192].to_vec()));
    match Ext4::open(cut) {
        Err(e) => assert!(e.to_string().starts_with("mem.img"), "{e}"),
        Ok(fs) => {
            let err = fs.lookup(Path::new("/etc/hostname")).unwrap_err();
            assert!(err.to_string().starts_with("mem.img"), "{err}");
        }
    }
}

#[test]
fn random_damage_to_metadata_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    make_tree(&root);
    let image = dir.path().join("fs.img");
    mkfs_sized("ext4", &root, &image, &["-b", "1024"], "12M");
    let clean = std::fs::read(&image).unwrap();
    // Metadata lives in the first MiBs: damage bytes there.
    let mut x = 0x1234_5678_9ABC_DEF1u64;
    for round in 0..200 {
        let mut bytes = clean.clone();
        for _ in 0..1 + round % 40 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = 1024 + (x as usize % (3 << 20));
            bytes[at] = (x >> 32) as u8;
        }
        let Ok(fs) = Ext4::open(Arc::new(Mem(bytes))) else {
            continue;
        };
        let _ = fs.inode_paths();
        if let Ok(inode) = fs.lookup(Path::new("/big/blob.bin")) {
            let _ = fs.data_ranges(&inode);
            let _ = fs.read_file(&inode, 64 << 20);
        }
        if let Ok(root) = fs.lookup(Path::new("/")) {
            let _ = fs.walk(&root, Path::new("/"));
        }
    }
}

/// A disk image with the filesystem at 1 MiB behind an MBR or a GPT.
fn partitioned(fs: &[u8], gpt: bool) -> Vec<u8> {
    let start = 1u64 << 20;
    let sectors = fs.len() as u64 / 512;
    let mut disk = vec![0u8; (start as usize) + fs.len() + (1 << 20)];
    disk[start as usize..start as usize + fs.len()].copy_from_slice(fs);
    let mbr = &mut disk[446..462];
    mbr[4] = if gpt { 0xEE } else { 0x83 };
    mbr[8..12].copy_from_slice(&(if gpt { 1u32 } else { 2048 }).to_le_bytes());
    mbr[12..16].copy_from_slice(&(sectors as u32).to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xAA;
    if gpt {
        let header = &mut disk[512..1024];
        header[..8].copy_from_slice(b"EFI PART");
        header[72..80].copy_from_slice(&2u64.to_le_bytes());
        header[80..84].copy_from_slice(&128u32.to_le_bytes());
        header[84..88].copy_from_slice(&128u32.to_le_bytes());
        // Entry 0 unused; entry 1 the filesystem.
        let entry = &mut disk[1024 + 128..1024 + 256];
        entry[..16].copy_from_slice(&[0xAF; 16]);
        entry[32..40].copy_from_slice(&2048u64.to_le_bytes());
        entry[40..48].copy_from_slice(&(2048 + sectors - 1).to_le_bytes());
    }
    disk
}

#[test]
fn the_filesystem_is_found_in_an_mbr_or_gpt_partition() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let files = make_tree(&root);
    let image = dir.path().join("fs.img");
    mkfs_sized("ext4", &root, &image, &[], "24M");
    let fs_bytes = std::fs::read(&image).unwrap();
    for gpt in [false, true] {
        let disk = Arc::new(Mem(partitioned(&fs_bytes, gpt)));
        assert!(Ext4::open(disk.clone()).is_err(), "no filesystem at 0");
        let fs = Ext4::open_disk(disk.clone()).unwrap();
        assert_eq!(fs.base(), 1 << 20);
        let want = &files[Path::new("/usr/lib/deep/er/still/file.so")];
        let inode = fs.lookup(Path::new("/lib/er/still/file.so")).unwrap();
        assert_eq!(&fs.read_file(&inode, 1 << 20).unwrap(), want);
        // Ranges are offsets on the disk.
        let mut got = Vec::new();
        for (offset, len) in fs.data_ranges(&inode).unwrap() {
            let mut buf = vec![0u8; len as usize];
            disk.read_exact_at(&mut buf, offset).unwrap();
            got.extend_from_slice(&buf);
        }
        got.truncate(want.len());
        assert_eq!(&got, want, "gpt: {gpt}");
    }
    // Neither a filesystem nor a partition table: the whole-disk error.
    let err = Ext4::open_disk(Arc::new(Mem(vec![0u8; 4 << 20])))
        .err()
        .unwrap();
    assert!(err.to_string().contains("no ext2/3/4 superblock"), "{err}");
}
