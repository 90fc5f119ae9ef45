//! ZFile, tar and blob detection against files written by the reference tools.

mod common;

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::ReferenceVectors;
use overlaybd::detect::{detect_layer_blob, open_layer_blob, BlobKind};
use overlaybd::io::{Bytes, LocalFile, ReadAt, Source};
use overlaybd::zfile::{self, Algorithm, Flavor, ZFileOptions, ZFileReader};
use sha2::{Digest, Sha256};

const LSMT_MAGIC: &[u8; 8] = b"LSMT\0\x01\x02\0";
/// LSMT header/trailer `user_tag` field: offset and length.
const USER_TAG: (usize, usize) = (134, 256);
const LSMT_HT: usize = 4096;

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures")).join(name)
}

fn open(path: &Path) -> Source {
    Arc::new(LocalFile::open(path).unwrap())
}

fn read_all(src: &dyn ReadAt) -> Vec<u8> {
    let mut v = vec![0u8; src.size() as usize];
    src.read_exact_at(&mut v, 0).unwrap();
    v
}

fn compress_to_vec(input: &dyn ReadAt, opts: &ZFileOptions) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    zfile::compress(input, &mut out, opts, &mut |_| {}).unwrap();
    out.into_inner()
}

/// The reference's `overlaybd-commit -z` writes the layer without the
/// commit message: `user_tag` is empty in its LSMT header and trailer.
fn without_user_tag(mut lsmt: Vec<u8>) -> Vec<u8> {
    let (at, len) = USER_TAG;
    let trailer = lsmt.len() - LSMT_HT;
    for base in [0, trailer] {
        lsmt[base + at..base + at + len].fill(0);
    }
    lsmt
}

struct Case {
    lsmt: String,
    tool: String,
    commit: String,
}

fn cases(v: &ReferenceVectors) -> Vec<Case> {
    (0..v.layers().len())
        .map(|n| Case {
            lsmt: v.layer_str(n, "lsmt").unwrap(),
            tool: v.layer_str(n, "zfile_tool").unwrap(),
            commit: v.layer_str(n, "zfile_commit").unwrap(),
        })
        .collect()
}

#[test]
fn tool_output_vectors_decompress_to_the_layers() {
    let v = ReferenceVectors::unpack();
    for c in cases(&v) {
        let r = ZFileReader::open(open(&v.path(&c.tool))).unwrap();
        let info = r.info();
        assert_eq!(
            (info.algorithm, info.block_size),
            (Algorithm::Lz4, 4096),
            "{}",
            c.tool
        );
        assert!(info.verify && info.digest_checked && !info.index_in_header);
        assert_eq!(info.header_flags, 0x13);
        assert_eq!(
            read_all(&r),
            std::fs::read(v.path(&c.lsmt)).unwrap(),
            "{}",
            c.tool
        );
    }
}

#[test]
fn commit_output_vectors_decompress_to_the_layers() {
    let v = ReferenceVectors::unpack();
    let expected_opts = [
        (Algorithm::Lz4, 4096),
        (Algorithm::Zstd, 8192),
        (Algorithm::Lz4, 16384),
    ];
    for (c, (algorithm, block_size)) in cases(&v).into_iter().zip(expected_opts) {
        let r = ZFileReader::open(open(&v.path(&c.commit))).unwrap();
        let info = r.info();
        assert_eq!(
            (info.algorithm, info.block_size),
            (algorithm, block_size),
            "{}",
            c.commit
        );
        assert!(info.verify && info.digest_checked && info.index_in_header);
        assert_eq!(info.header_flags, 0x1b);
        let lsmt = std::fs::read(v.path(&c.lsmt)).unwrap();
        let plain = read_all(&r);
        assert_ne!(
            plain, lsmt,
            "{}: the commit message is expected to be missing",
            c.commit
        );
        assert_eq!(plain, without_user_tag(lsmt), "{}", c.commit);
    }
}

#[test]
fn compress_is_byte_identical_to_the_reference() {
    let v = ReferenceVectors::unpack();
    for c in cases(&v) {
        // overlaybd-zfile layerN.lsmt
        let input = open(&v.path(&c.lsmt));
        let ours = compress_to_vec(&*input, &ZFileOptions::default());
        assert!(
            ours == std::fs::read(v.path(&c.tool)).unwrap(),
            "{}",
            c.tool
        );

        // overlaybd-commit -z: same layer bytes (user_tag aside) in, same file out.
        let theirs = std::fs::read(v.path(&c.commit)).unwrap();
        let r = ZFileReader::open(Arc::new(Bytes::new(theirs.clone(), c.commit.clone()))).unwrap();
        let opts = ZFileOptions {
            algorithm: r.info().algorithm,
            block_size: r.info().block_size,
            flavor: Flavor::CommitOutput,
        };
        let plain = Bytes::new(read_all(&r), "plain");
        assert!(compress_to_vec(&plain, &opts) == theirs, "{}", c.commit);
    }
}

#[test]
fn vectors_verify_and_read_randomly() {
    let v = ReferenceVectors::unpack();
    for c in cases(&v) {
        for name in [&c.tool, &c.commit] {
            let report = zfile::verify(open(&v.path(name))).unwrap();
            assert!(report.crc_checked);
            assert_eq!(
                report.blocks,
                report.original_size.div_ceil(u64::from(report.block_size))
            );
        }
        let plain = std::fs::read(v.path(&c.lsmt)).unwrap();
        let r = ZFileReader::open(open(&v.path(&c.tool))).unwrap();
        let mut x = 99u64;
        for _ in 0..200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 16) % plain.len() as u64;
            let len = ((x >> 3) % 70_000).min(plain.len() as u64 - off) as usize;
            let mut buf = vec![0u8; len];
            r.read_exact_at(&mut buf, off).unwrap();
            assert!(
                buf == plain[off as usize..off as usize + len],
                "{} at {off}+{len}",
                c.tool
            );
        }
    }
}

/// Hashes what is written to it.
struct HashWriter(Sha256);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn gunzip_fixture(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let file = std::fs::File::open(fixture(name)).unwrap();
    std::io::copy(&mut flate2::read::GzDecoder::new(file), &mut out).unwrap();
    out
}

#[test]
fn legacy_zfile_without_digest_decompresses() {
    let file = gunzip_fixture("legacy-ext4_64.zfile.gz");
    assert_eq!(file.len(), 4_737_695);
    let src: Source = Arc::new(Bytes::new(file, "legacy-ext4_64.zfile"));
    let r = ZFileReader::open(src.clone()).unwrap();
    let info = r.info();
    assert!(!info.digest_checked && info.verify);
    assert_eq!(
        (info.algorithm, info.block_size, info.blocks),
        (Algorithm::Lz4, 4096, 132_309)
    );
    assert_eq!(info.original_size, 541_937_664);

    let mut hash = HashWriter(Sha256::new());
    let n = zfile::decompress(src.clone(), &mut hash, &mut |_| {}).unwrap();
    assert_eq!(n, 541_937_664);
    assert_eq!(
        hex::encode(hash.0.finalize()),
        "799dbd74cbcfbd7f37611057130b20fda0e1e671280df97cc3a05d73620d5ac7"
    );

    let mut head = [0u8; 8];
    open_layer_blob(src)
        .unwrap()
        .source()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert_eq!(&head, LSMT_MAGIC);
}

#[test]
fn real_dev_image_blobs_unwrap_and_decompress() {
    for (name, payload_size) in [("dev-layer0.blob", 667_229), ("dev-layer1.blob", 2_705_456)] {
        let src = open(&fixture(&format!("real-dev-image/{name}")));
        let (plain, kind) = detect_layer_blob(src.clone()).unwrap();
        let plain = plain.source();
        let BlobKind::TarZFile(tar, z) = &kind else {
            panic!("{name}: {kind}");
        };
        assert!(tar.pax, "{name}");
        assert_eq!((tar.offset, tar.size), (1536, payload_size), "{name}");
        assert_eq!(tar.name, "overlaybd.commit");
        assert_eq!((z.algorithm, z.block_size), (Algorithm::Lz4, 4096));
        assert!(z.verify && z.index_in_header, "{name}");
        assert_eq!(z.compressed_size, payload_size);
        assert!(
            kind.to_string().starts_with("tar (pax, payload 1536+"),
            "{kind}"
        );

        let mut head = [0u8; 8];
        plain.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(&head, LSMT_MAGIC, "{name}");
        // Every block checks out.
        let window = Arc::new(tar.window(src).unwrap());
        let report = zfile::verify(window).unwrap();
        assert_eq!(report.original_size, plain.size());
    }
}

#[test]
fn detection_of_each_wrapping() {
    let v = ReferenceVectors::unpack();
    let lsmt = v.path("layer1.lsmt");
    let (_, kind) = detect_layer_blob(open(&lsmt)).unwrap();
    assert_eq!(kind, BlobKind::Raw);
    let (plain, kind) = detect_layer_blob(open(&v.path("layer1.zstd8k.zfile"))).unwrap();
    assert!(matches!(kind, BlobKind::ZFile(_)), "{kind}");
    assert_eq!(plain.source().size(), 2_078_208);

    // A tar around the plain layer.
    let data = std::fs::read(&lsmt).unwrap();
    let mut builder = ::tar::Builder::new(Vec::new());
    let mut header = ::tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_cksum();
    builder
        .append_data(&mut header, "layer.lsmt", &data[..])
        .unwrap();
    let wrapped = builder.into_inner().unwrap();
    let (plain, kind) = detect_layer_blob(Arc::new(Bytes::new(wrapped, "t"))).unwrap();
    let BlobKind::TarRaw(tar) = &kind else {
        panic!("{kind}")
    };
    assert_eq!((tar.offset, tar.pax), (512, false));
    assert!(read_all(&*plain.source()) == data);
}
