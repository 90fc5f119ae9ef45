//! Engine benchmark: 4 KiB random reads and 1 MiB sequential reads through
//! a 3-layer stack (plain LSMT and ZFile), against `pread` of the flattened
//! raw image, all measured in the same run. Files live in the page cache,
//! so this measures the engine's own cost (lookup, copy, decompression,
//! CRC). Run: `cargo bench -p overlaybd --bench engine [-- SIZE_MIB]`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use overlaybd::io::LocalFile;
use overlaybd::lsmt::{CommitOptions, CreateOptions, ReadOnlyLayer, WritableLayer};
use overlaybd::stack::Stack;
use overlaybd::zfile::{self, Algorithm, Flavor, ZFileOptions};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Somewhat compressible bytes, like file-system content.
fn fill(buf: &mut [u8], rng: &mut Rng) {
    let words = [
        &b"overlaybd "[..],
        b"block ",
        b"layer ",
        b"\0\0\0\0\0\0\0\0",
        b"ext4 ",
        b"0123456789",
    ];
    let mut i = 0;
    while i < buf.len() {
        let w = words[(rng.next() % words.len() as u64) as usize];
        let n = w.len().min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[..n]);
        if rng.next().is_multiple_of(8) && i < buf.len() {
            buf[i] = rng.next() as u8;
        }
        i += n;
    }
}

fn make_layer(
    dir: &Path,
    n: usize,
    size: u64,
    rng: &mut Rng,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = dir.join(format!("l{n}.data"));
    let index = dir.join(format!("l{n}.index"));
    let layer = WritableLayer::create(
        &data,
        Some(&index),
        &CreateOptions {
            virtual_size: size,
            parent_uuid: None,
            sparse: false,
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 256 << 10];
    let mut written = 0;
    while written < size * 2 / 5 {
        let len = ((rng.next() % 64 + 1) * 4096).min(buf.len() as u64);
        let offset = (rng.next() % ((size - len) / 4096)) * 4096;
        fill(&mut buf[..len as usize], rng);
        layer.write(&buf[..len as usize], offset).unwrap();
        written += len;
    }
    let plain = dir.join(format!("l{n}.lsmt"));
    let mut out = std::io::BufWriter::new(File::create(&plain).unwrap());
    layer
        .commit(&mut out, &CommitOptions::default(), &mut |_| {})
        .unwrap();
    drop(out);
    let zipped = dir.join(format!("l{n}.zfile"));
    let input = LocalFile::open(&plain).unwrap();
    let options = ZFileOptions {
        algorithm: Algorithm::Lz4,
        block_size: 4096,
        flavor: Flavor::CommitOutput,
    };
    zfile::compress(
        &input,
        &mut File::create(&zipped).unwrap(),
        &options,
        &mut |_| {},
    )
    .unwrap();
    (plain, zipped)
}

fn open(paths: &[std::path::PathBuf]) -> Stack {
    let layers = paths
        .iter()
        .map(|p| overlaybd::image::open_read_only(p).unwrap())
        .collect::<Vec<ReadOnlyLayer>>();
    Stack::new(layers, None).unwrap()
}

/// Seconds taken by `reads` calls of `read(buf, offset)`.
fn time(mut read: impl FnMut(&mut [u8], u64), offsets: &[u64], len: usize) -> f64 {
    let mut buf = vec![0u8; len];
    let start = Instant::now();
    for &o in offsets {
        read(&mut buf, o);
    }
    start.elapsed().as_secs_f64()
}

fn main() {
    let size_mib: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(256);
    let size = size_mib << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    eprintln!("building 3 layers over {size_mib} MiB...");
    let (plain, zipped): (Vec<_>, Vec<_>) = (0..3)
        .map(|n| make_layer(dir.path(), n, size, &mut rng))
        .unzip();
    let plain_stack = open(&plain);
    let zfile_stack = open(&zipped);
    let raw_path = dir.path().join("flat.raw");
    let raw = File::create(&raw_path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for mib in 0..size_mib {
        plain_stack.read(&mut buf, mib << 20).unwrap();
        raw.write_all_at(&buf, mib << 20).unwrap();
    }
    let raw = File::open(&raw_path).unwrap();

    let random: Vec<u64> = (0..50_000)
        .map(|_| (rng.next() % (size / 4096)) * 4096)
        .collect();
    let sequential: Vec<u64> = (0..size_mib).map(|m| m << 20).collect();
    println!("engine benchmark: 3-layer stack, {size_mib} MiB virtual, files in page cache");
    println!(
        "{:<14} {:>12} {:>12} {:>12}",
        "workload", "raw pread", "obd plain", "obd zfile"
    );
    for (name, offsets, len) in [
        ("4k random", &random, 4096usize),
        ("1m sequential", &sequential, 1 << 20),
    ] {
        // Warm up once, then measure.
        for _ in 0..2 {
            let t_raw = time(|b, o| raw.read_exact_at(b, o).unwrap(), offsets, len);
            let t_plain = time(|b, o| plain_stack.read(b, o).unwrap(), offsets, len);
            let t_zfile = time(|b, o| zfile_stack.read(b, o).unwrap(), offsets, len);
            let mbps = |t: f64| (offsets.len() * len) as f64 / t / 1e6;
            println!(
                "{name:<14} {:>9.0} MB/s {:>9.0} MB/s {:>9.0} MB/s   plain/raw {:.2}  zfile/raw {:.2}",
                mbps(t_raw),
                mbps(t_plain),
                mbps(t_zfile),
                t_raw / t_plain,
                t_raw / t_zfile
            );
        }
    }
}
