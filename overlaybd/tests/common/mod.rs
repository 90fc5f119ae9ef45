//! Shared by the integration tests: the reference vectors, unpacked.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};

/// `tests/fixtures` of the workspace, from either crate's tests.
pub fn fixtures() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let here = manifest.join("tests/fixtures");
    if here.is_dir() {
        here
    } else {
        manifest.join("../tests/fixtures")
    }
}

/// The reference tools' three-layer vector set, unpacked into a temp dir.
pub struct ReferenceVectors {
    pub dir: tempfile::TempDir,
    pub manifest: serde_json::Value,
}

impl ReferenceVectors {
    pub fn unpack() -> ReferenceVectors {
        let dir = tempfile::tempdir().expect("temp dir");
        let archive = File::open(fixtures().join("overlaybd-ref-v1.tgz")).expect("fixture archive");
        ::tar::Archive::new(flate2::read::GzDecoder::new(archive))
            .unpack(dir.path())
            .expect("unpack vectors");
        let manifest_path = find(dir.path(), "manifest.json");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
        ReferenceVectors { dir, manifest }
    }

    /// Path of a file named in the manifest.
    pub fn path(&self, name: &str) -> PathBuf {
        find(self.dir.path(), name)
    }

    pub fn layers(&self) -> &Vec<serde_json::Value> {
        self.manifest["layers"].as_array().expect("layers")
    }

    pub fn layer_str(&self, n: usize, key: &str) -> Option<String> {
        self.layers()[n][key].as_str().map(str::to_string)
    }

    pub fn stack_sha256_per_mib(&self, n: usize) -> Vec<String> {
        self.layers()[n]["stack_sha256_per_mib"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    pub fn span_bytes(&self) -> u64 {
        self.manifest["span_bytes"].as_u64().unwrap()
    }

    /// `stack` reads as the reference stack 0..=n: the manifest's sha256 of
    /// every MiB of the span.
    pub fn assert_stack_matches(&self, stack: &overlaybd::stack::Stack, n: usize) {
        let expected = self.stack_sha256_per_mib(n);
        assert_eq!(expected.len() as u64, self.span_bytes() >> 20);
        let mut buf = vec![0u8; 1 << 20];
        for (mib, want) in expected.iter().enumerate() {
            stack.read(&mut buf, (mib as u64) << 20).unwrap();
            assert_eq!(&sha256_hex(&buf), want, "stack 0..={n}, MiB {mib}");
        }
    }
}

fn find(root: &Path, name: &str) -> PathBuf {
    let direct = root.join(name);
    if direct.exists() {
        return direct;
    }
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let inner = path.join(name);
            if inner.exists() {
                return inner;
            }
        }
    }
    panic!("{name} not found under {}", root.display());
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
