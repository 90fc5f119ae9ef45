//! Writes the generated part of the seed corpus (run by `fuzz/seed.sh`,
//! which also copies the fixture files): small LSMT layers made with the
//! engine's own writer, a small LSMT cut out of a reference layer, ZFiles of
//! every algorithm and flavor, tar-wrapped blobs, trace files and JSON
//! configs.
//!
//! Usage: `seed REF_VECTORS_DIR CORPUS_DIR` (the unpacked
//! `tests/fixtures/overlaybd-ref-v1.tgz` and `fuzz/corpus`).

#[path = "../../overlaybd/tests/config_samples/mod.rs"]
mod config_samples;

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use overlaybd::index::Entry;
use overlaybd::io::{Bytes, LocalFile, ReadAt};
use overlaybd::lsmt::{self, CommitOptions, CreateOptions, ReadOnlyLayer, WritableLayer};
use overlaybd::trace::{encode, Op, TraceRecord};
use overlaybd::zfile::{compress, Algorithm, Flavor, ZFileOptions};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| match (i / 512) % 3 {
            0 => seed,
            1 => (i as u8).wrapping_mul(seed | 1),
            _ => (i / 7) as u8 ^ seed,
        })
        .collect()
}

struct Out {
    root: PathBuf,
}

impl Out {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), bytes).unwrap();
    }
}

/// A writable layer with a few writes and a discard, then committed or sealed.
fn small_layers(tmp: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, sparse) in [("plain", false), ("sparse", true)] {
        let data = tmp.join(format!("{name}.data"));
        let index = tmp.join(format!("{name}.index"));
        let layer = WritableLayer::create(
            &data,
            (!sparse).then_some(index.as_path()),
            &CreateOptions {
                virtual_size: 1 << 20,
                parent_uuid: None,
                sparse,
            },
        )
        .unwrap();
        layer.write(&pattern(4096, 1), 0).unwrap();
        layer.write(&pattern(1024, 2), 8192).unwrap();
        layer.write(&pattern(512, 3), (1 << 20) - 512).unwrap();
        layer.write(&pattern(2048, 4), 2048).unwrap();
        layer.discard(65536, 16384).unwrap();
        let mut committed = Vec::new();
        layer
            .commit(
                &mut committed,
                &CommitOptions {
                    uuid: Some("12345678-1234-4234-8234-123456789ABC".into()),
                    parent_uuid: None,
                    message: "fuzz seed".into(),
                },
                &mut |_| {},
            )
            .unwrap();
        out.push((format!("gen-{name}-committed.lsmt"), committed));
        if !sparse {
            let mut sealed = Vec::new();
            layer.seal(&mut sealed, &mut |_| {}).unwrap();
            out.push((format!("gen-{name}-sealed.lsmt"), sealed));
        }
    }
    out
}

/// The first few extents of a reference layer, committed anew: real data
/// and a real header, small enough for the fuzzer.
fn cut_reference(path: &Path, extents: usize) -> Vec<u8> {
    let src = Arc::new(LocalFile::open(path).unwrap());
    let layer = ReadOnlyLayer::open(src.clone()).unwrap();
    let mut kept: Vec<Entry> = layer.entries.iter().take(extents).copied().collect();
    for e in &mut kept {
        e.length = e.length.min(8);
    }
    let map = lsmt::entries_to_map(&kept, 0);
    let mut out = Vec::new();
    lsmt::commit(
        &map,
        &|buf, position| src.read_exact_at(buf, position),
        "reference",
        &layer.header,
        &mut out,
        &CommitOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    out
}

fn zfile_of(data: &[u8], algorithm: Algorithm, block_size: u32, flavor: Flavor) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    compress(
        &Bytes::new(data.to_vec(), "seed"),
        &mut out,
        &ZFileOptions {
            algorithm,
            block_size,
            flavor,
        },
        &mut |_| {},
    )
    .unwrap();
    out.into_inner()
}

fn tar_of(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    overlaybd::tar::wrap(&Bytes::new(payload.to_vec(), "seed"), &mut out).unwrap();
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, vectors, corpus] = &args[..] else {
        panic!("usage: seed REF_VECTORS_DIR CORPUS_DIR");
    };
    let out = Out {
        root: PathBuf::from(corpus),
    };
    let tmp = std::env::temp_dir().join(format!("obd-fuzz-seed-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();

    // LSMT layers.
    let mut layers = small_layers(&tmp);
    for (n, extents) in [(2, 6), (1, 3)] {
        let path = Path::new(vectors).join(format!("layer{n}.lsmt"));
        layers.push((
            format!("ref-layer{n}-cut{extents}.lsmt"),
            cut_reference(&path, extents),
        ));
    }
    for (name, bytes) in &layers {
        out.put("lsmt_layer", name, bytes);
        out.put("layer_blob", name, bytes);
    }

    // ZFiles of several shapes, and of the small layers.
    let raw = pattern(40_000, 9);
    for algorithm in [Algorithm::Lz4, Algorithm::Zstd] {
        for flavor in [Flavor::ToolOutput, Flavor::CommitOutput] {
            for bs in [4096, 65536] {
                let tag = format!("{algorithm}-{}k-{flavor:?}", bs / 1024);
                out.put(
                    "zfile",
                    &format!("gen-{tag}.zfile"),
                    &zfile_of(&raw, algorithm, bs, flavor),
                );
            }
            out.put(
                "zfile",
                &format!("gen-{algorithm}-{flavor:?}-empty.zfile"),
                &zfile_of(&[], algorithm, 4096, flavor),
            );
        }
    }
    let (name, lsmt) = &layers[0];
    let z = zfile_of(lsmt, Algorithm::Lz4, 4096, Flavor::CommitOutput);
    let zz = zfile_of(lsmt, Algorithm::Zstd, 8192, Flavor::ToolOutput);
    out.put("zfile", &format!("{name}.zfile"), &z);
    out.put("layer_blob", &format!("{name}.zfile"), &z);
    out.put("layer_blob", &format!("{name}.zstd.zfile"), &zz);
    out.put("layer_blob", &format!("{name}.tar"), &tar_of(lsmt));
    out.put("layer_blob", &format!("{name}.zfile.tar"), &tar_of(&z));

    // Traces.
    let rec = |op, layer_index, count, offset| TraceRecord {
        op,
        layer_index,
        count,
        offset,
    };
    out.put("trace", "empty", &[]);
    out.put("trace", "binary-0", &encode(&[]));
    out.put("trace", "binary-1", &encode(&[rec(Op::Read, 0, 4096, 0)]));
    out.put(
        "trace",
        "binary-5",
        &encode(&[
            rec(Op::Read, 0, 65536, 1 << 20),
            rec(Op::Read, 1, 512, 4096),
            rec(Op::Write, 2, 0, 0),
            rec(Op::Read, 255, 1 << 30, i64::MAX - (1 << 30)),
            rec(Op::Read, 0, 4096, 12288),
        ]),
    );
    out.put(
        "trace",
        "text-list",
        b"/usr/bin/redis-server\n/etc/redis/\n/var/lib/*\r\n\n/\n",
    );
    out.put("trace", "text-list-over-limit", &b"/a\n".repeat(21846));

    // JSON.
    out.put(
        "config",
        "image-snapshotter.json",
        snapshotter_config_with_every_key().as_bytes(),
    );
    for (name, text) in JSON {
        out.put("config", name, text.as_bytes());
    }
    fs::remove_dir_all(&tmp).unwrap();
}

/// The containerd snapshotter's config for a writable container, with the
/// optional keys it leaves out set as well (upper target and vsize, download).
fn snapshotter_config_with_every_key() -> String {
    let mut config: serde_json::Value =
        serde_json::from_str(config_samples::SNAPSHOTTER_CONFIG).unwrap();
    config["upper"]["target"] = "/t".into();
    config["upper"]["vsize"] = (1u64 << 30).into();
    config["download"] = serde_json::json!({
        "enable": true, "delay": 1, "delayExtra": 2, "maxMBps": 5, "tryCnt": 3, "blockSize": 4096
    });
    serde_json::to_string_pretty(&config).unwrap()
}

const JSON: [(&str, &str); 6] = [
    (
        "image-readonly.json",
        r#"{"lowers": [{"file": "/f"}], "upper": {}, "resultFile": "", "lowers2": null}"#,
    ),
    (
        "global-full.json",
        r#"{
    "logConfig": {"logLevel": 1, "logPath": "/var/log/overlaybd.log", "logSizeMB": 20, "logRotateNum": 5},
    "cacheConfig": {"cacheType": "file", "cacheDir": "/opt/overlaybd/registry_cache", "cacheSizeGB": 4, "refillSize": 1048576},
    "gzipCacheConfig": {"enable": true, "cacheDir": "/opt/overlaybd/gzip_cache", "cacheSizeGB": 4},
    "credentialConfig": {"mode": "file", "path": "/opt/overlaybd/cred.json"},
    "ioEngine": 0,
    "download": {"enable": true, "delay": 600, "delayExtra": 30, "maxMBps": 100, "tryCnt": 5, "blockSize": 262144},
    "p2pConfig": {"enable": false, "address": "localhost:19145/dadip2p"},
    "exporterConfig": {"enable": false, "uriPrefix": "/metrics", "port": 9863, "updateInterval": 60000},
    "prefetchConfig": {"concurrency": 32},
    "certConfig": {"certFile": "/etc/overlaybd/client.crt", "keyFile": "/etc/overlaybd/client.key"},
    "enableAudit": true,
    "auditPath": "/var/log/overlaybd-audit.log",
    "userAgent": "obd/0.1",
    "registryFsVersion": "v2"
}"#,
    ),
    (
        "global-legacy.json",
        r#"{"registryCacheDir": "/old/cache", "registryCacheSizeGB": 16, "credentialFilePath": "/old/cred.json", "logLevel": 0, "logPath": "/old/log", "credentialConfig": {"mode": "http", "path": "http://127.0.0.1:9000/auth"}}"#,
    ),
    (
        "credentials.json",
        r#"{"auths": {"registry.example.com/team": {"username": "u", "password": "p"},
           "registry.example.com": {"auth": "dTpw"}, "empty": {}, "h": {"username": "a", "auth": "YTpi"}}}"#,
    ),
    (
        "credentials-http.json",
        r#"{"traceId": "t-1", "success": true, "data": {"auths": {"registry.example.com": {"auth": "dTpw"}}}}"#,
    ),
    ("credentials-null.json", r#"{"auths": null}"#),
];
