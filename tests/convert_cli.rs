//! `obd convert` against a real registry: a small OCI image (three layers,
//! with a whiteout, an opaque directory, a hard link and a symlink) is made
//! here and pushed, converted, and read back: the manifest carries the
//! overlaybd annotations, the layers stacked give the ext4 tree the OCI
//! rules give, a second run uploads nothing, and an OCI layout directory
//! converts to the same layers; so does the image with Docker media types,
//! and a registry with token auth works for reading and pushing.

#[path = "../overlaybd/tests/remote_support/mod.rs"]
mod remote_support;

mod obd_cli;
use obd_cli::{assert_apply_v1_tree, assert_fsck_clean, obd, obd_err, obd_ok, s};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use overlaybd::remote::registry::{Registry as Client, RegistryOptions};
use overlaybd::remote::sha256_file;
use remote_support::{Auth, Registry, PASSWORD, USER};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A tar built entry by entry.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn entry(
        &mut self,
        kind: EntryType,
        path: &str,
        mode: u32,
        link: &str,
        data: &[u8],
    ) -> &mut Self {
        let mut h = Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(EntryType::Directory, path, 0o755, "", b"")
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.entry(EntryType::Regular, path, 0o644, "", data)
    }

    fn finish(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
        builder.into_inner().unwrap()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The test image: (media type, blob, uncompressed tar) per layer.
fn image_layers() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let base = Tar::new()
        .dir("etc")
        .file("etc/os-release", b"NAME=base\n")
        .dir("usr")
        .dir("usr/bin")
        .entry(
            EntryType::Regular,
            "usr/bin/tool",
            0o755,
            "",
            b"#!/bin/sh\necho tool\n",
        )
        .entry(EntryType::Symlink, "usr/bin/link", 0o777, "tool", b"")
        .file("gone.txt", b"to be whited out\n")
        .dir("keep")
        .file("keep/a", b"a\n")
        .file("keep/b", b"b\n")
        .finish();
    let upper = Tar::new()
        .file(".wh.gone.txt", b"")
        .dir("keep")
        .file("keep/.wh..wh..opq", b"")
        .file("keep/c", b"c\n")
        .file("etc/os-release", b"NAME=upper\n")
        .entry(EntryType::Link, "usr/bin/tool2", 0o755, "usr/bin/tool", b"")
        .finish();
    let data = Tar::new()
        .dir("data")
        .file("data/big.bin", &pseudo_random(3 << 20))
        .finish();
    vec![
        (
            "application/vnd.oci.image.layer.v1.tar+gzip",
            gzip(&base),
            base,
        ),
        (
            "application/vnd.oci.image.layer.v1.tar+gzip",
            gzip(&upper),
            upper,
        ),
        ("application/vnd.oci.image.layer.v1.tar", data.clone(), data),
    ]
}

/// The image's config and manifest, and every blob by digest.
struct Image {
    manifest: Vec<u8>,
    /// The same image with Docker schema 2 media types.
    docker_manifest: Vec<u8>,
    blobs: Vec<(String, Vec<u8>)>,
}

fn make_image() -> Image {
    let layers: Vec<(&str, Vec<u8>, String)> = image_layers()
        .into_iter()
        .map(|(media_type, blob, tar)| (media_type, blob, sha256(&tar)))
        .collect();
    image_of(layers)
}

/// An image of `layers`: (media type, blob, diff_id) each.
fn image_of(layers: Vec<(&str, Vec<u8>, String)>) -> Image {
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/usr/bin/tool"]},
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|(_, _, diff_id)| diff_id).collect::<Vec<_>>(),
        },
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(&config),
            "size": config.len(),
        },
        "layers": layers.iter().map(|(media_type, blob, _)| json!({
            "mediaType": media_type,
            "digest": sha256(blob),
            "size": blob.len(),
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let mut docker: Value = serde_json::from_slice(&manifest).unwrap();
    docker["mediaType"] = json!("application/vnd.docker.distribution.manifest.v2+json");
    docker["config"]["mediaType"] = json!("application/vnd.docker.container.image.v1+json");
    for layer in docker["layers"].as_array_mut().unwrap() {
        let gzip = layer["mediaType"].as_str().unwrap().ends_with("+gzip");
        layer["mediaType"] = json!(if gzip {
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        } else {
            "application/vnd.docker.image.rootfs.diff.tar"
        });
    }
    let docker_manifest = serde_json::to_vec(&docker).unwrap();
    let mut blobs = vec![(sha256(&config), config)];
    blobs.extend(layers.into_iter().map(|(_, blob, _)| (sha256(&blob), blob)));
    Image {
        manifest,
        docker_manifest,
        blobs,
    }
}

fn client() -> Client {
    let global = overlaybd::config::GlobalConfig::default();
    Client::new(RegistryOptions::from_global(&global), &global).unwrap()
}

/// A client with the credentials of the global config at `path`.
fn client_from(path: &Path) -> Client {
    let text = std::fs::read_to_string(path).unwrap();
    let global: overlaybd::config::GlobalConfig = serde_json::from_str(&text).unwrap();
    Client::new(RegistryOptions::from_global(&global), &global).unwrap()
}

/// A global config whose credential file has the test user for `port`.
fn global_with_credentials(dir: &Path, port: u16) -> PathBuf {
    let creds = dir.join("cred.json");
    let auths =
        json!({"auths": {format!("127.0.0.1:{port}"): {"username": USER, "password": PASSWORD}}});
    std::fs::write(&creds, auths.to_string()).unwrap();
    let global = dir.join("overlaybd.json");
    let text = json!({"credentialConfig": {"mode": "file", "path": creds}});
    std::fs::write(&global, text.to_string()).unwrap();
    global
}

/// Push `image` as `repo:tag`, plus an index `repo:multi` whose
/// linux/amd64 entry is the image, and `repo:arm` with only arm64.
fn push_image(registry: &Registry, image: &Image, dir: &Path, client: &Client) {
    let repo = format!("{}/v2/src/app", registry.base());
    for (digest, bytes) in &image.blobs {
        let path = dir.join(digest.replace(':', "_"));
        std::fs::write(&path, bytes).unwrap();
        client.upload_blob(&repo, digest, &path).unwrap();
    }
    let oci_manifest = "application/vnd.oci.image.manifest.v1+json";
    client
        .put_manifest(&repo, "v1", oci_manifest, &image.manifest)
        .unwrap();
    let docker_type = "application/vnd.docker.distribution.manifest.v2+json";
    client
        .put_manifest(&repo, "docker", docker_type, &image.docker_manifest)
        .unwrap();
    let index = |platforms: &[&str]| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": platforms.iter().map(|arch| json!({
                "mediaType": oci_manifest,
                "digest": sha256(&image.manifest),
                "size": image.manifest.len(),
                "platform": {"os": "linux", "architecture": arch},
            })).collect::<Vec<_>>(),
        }))
        .unwrap()
    };
    let index_type = "application/vnd.oci.image.index.v1+json";
    client
        .put_manifest(&repo, "multi", index_type, &index(&["arm64", "amd64"]))
        .unwrap();
    client
        .put_manifest(&repo, "arm", index_type, &index(&["arm64"]))
        .unwrap();
}

/// The same image as an OCI layout directory, tagged v1.
fn write_layout(image: &Image, dir: &Path) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let mut blobs = image.blobs.clone();
    blobs.push((sha256(&image.manifest), image.manifest.clone()));
    for (digest, bytes) in &blobs {
        let hex_part = digest.strip_prefix("sha256:").unwrap();
        std::fs::write(dir.join("blobs/sha256").join(hex_part), bytes).unwrap();
    }
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(&image.manifest),
            "size": image.manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "v1"},
        }],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
}

fn debugfs(raw: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request, s(raw)])
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn cat(raw: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}"), s(raw)])
        .output()
        .expect("run debugfs");
    out.stdout
}

fn exists(raw: &Path, path: &str) -> bool {
    !debugfs(raw, &format!("stat {path}")).contains("File not found")
}

fn inode(raw: &Path, path: &str) -> u64 {
    let text = debugfs(raw, &format!("stat {path}"));
    let at = text.find("Inode: ").expect(&text) + "Inode: ".len();
    text[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The merged tree of `layers` (files) as an ext4 image, checked against
/// what applying the OCI layers by the OCI rules gives.
fn check_tree(layers: &[PathBuf], dir: &Path) {
    let raw = dir.join("disk.raw");
    // Every prefix of the stack is a clean file system.
    for n in 1..=layers.len() {
        let _ = std::fs::remove_file(&raw);
        let mut args = vec!["export", "--output", s(&raw)];
        args.extend(layers[..n].iter().map(|p| s(p)));
        obd_ok(&args);
        assert_fsck_clean(&raw);
    }
    check_raw(&raw);
}

/// The same, read lazily from the registry through an image config that
/// names the converted layers as blobs.
fn check_tree_remote(repo: &str, manifest: &Value, global: &Path, dir: &Path) {
    let lowers: Vec<Value> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().unwrap();
            json!({
                "digest": digest,
                "size": l["size"],
                "dir": dir.join("layers").join(digest.replace(':', "_")),
            })
        })
        .collect();
    let config = dir.join("config.v1.json");
    let text = json!({"repoBlobUrl": format!("{repo}/blobs"), "lowers": lowers});
    std::fs::write(&config, text.to_string()).unwrap();
    let raw = dir.join("remote.raw");
    let _ = std::fs::remove_file(&raw);
    obd_ok(&[
        "export",
        "--output",
        s(&raw),
        "--config",
        s(&config),
        "--global-config",
        s(global),
    ]);
    check_raw(&raw);
}

fn check_raw(raw: &Path) {
    let raw = raw.to_path_buf();
    assert_fsck_clean(&raw);
    assert_eq!(cat(&raw, "/etc/os-release"), b"NAME=upper\n");
    assert_eq!(cat(&raw, "/usr/bin/tool"), b"#!/bin/sh\necho tool\n");
    assert_eq!(inode(&raw, "/usr/bin/tool"), inode(&raw, "/usr/bin/tool2"));
    assert!(debugfs(&raw, "stat /usr/bin/link").contains("Fast link dest: \"tool\""));
    assert!(!exists(&raw, "/gone.txt"), "the whiteout removed gone.txt");
    assert!(
        !exists(&raw, "/keep/a") && !exists(&raw, "/keep/b"),
        "opaque dir"
    );
    assert_eq!(cat(&raw, "/keep/c"), b"c\n");
    assert_eq!(cat(&raw, "/data/big.bin"), pseudo_random(3 << 20));
    let stat = debugfs(&raw, "stat /usr/bin/tool");
    assert!(
        stat.contains("User:  1000") && stat.contains("Mode:  0755"),
        "{stat}"
    );
}

/// The layers a registry manifest names, downloaded to `dir`.
fn fetch_layers(repo: &str, manifest: &Value, dir: &Path) -> Vec<PathBuf> {
    let client = client();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let digest = layer["digest"].as_str().unwrap();
            let size = layer["size"].as_u64().unwrap();
            let mut buf = vec![0u8; size as usize];
            client
                .read_range(&format!("{repo}/blobs/{digest}"), size, 0, &mut buf)
                .unwrap();
            assert_eq!(sha256(&buf), digest);
            let path = dir.join(format!("fetched{i}.blob"));
            std::fs::write(&path, buf).unwrap();
            path
        })
        .collect()
}

fn convert(global: &Path, from: &str, to: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "convert",
        "--global-config",
        s(global),
        "--from",
        from,
        "--to",
        to,
    ];
    args.extend(extra);
    let out = obd_ok(&args);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn registry_to_registry_then_layout() {
    let registry = Registry::start(Auth::Anonymous);
    let dir = tempfile::tempdir().unwrap();
    let global = dir.path().join("global.json");
    std::fs::write(&global, "{}").unwrap();
    let image = make_image();
    push_image(&registry, &image, dir.path(), &client());
    let host = format!("127.0.0.1:{}", registry.port);

    let started = std::time::Instant::now();
    let (stdout, stderr) = convert(
        &global,
        &format!("{host}/src/app:multi"),
        &format!("{host}/obd/app:v1"),
        &[],
    );
    eprintln!("convert took {:?}\n{stderr}", started.elapsed());
    assert!(stdout.contains("sha256:"), "{stdout}");
    assert_eq!(stderr.matches(", pushed").count(), 3, "{stderr}");

    // The manifest: Docker media types and the overlaybd annotations.
    let repo = format!("{}/v2/obd/app", registry.base());
    let (media_type, bytes) = client().get_manifest(&repo, "v1").unwrap().unwrap();
    assert_eq!(
        media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let manifest: Value = serde_json::from_slice(&bytes).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    for layer in layers {
        assert_eq!(
            layer["mediaType"],
            "application/vnd.docker.image.rootfs.diff.tar"
        );
        let a = &layer["annotations"];
        assert_eq!(
            a["containerd.io/snapshot/overlaybd/blob-digest"],
            layer["digest"]
        );
        assert_eq!(
            a["containerd.io/snapshot/overlaybd/blob-size"],
            layer["size"].as_u64().unwrap().to_string()
        );
        assert_eq!(a["containerd.io/snapshot/overlaybd/version"], "0.1.0");
    }
    // The config: the source's, its diff_ids the overlaybd layers.
    let config_desc = &manifest["config"];
    let size = config_desc["size"].as_u64().unwrap();
    let mut config = vec![0u8; size as usize];
    client()
        .read_range(
            &format!("{repo}/blobs/{}", config_desc["digest"].as_str().unwrap()),
            size,
            0,
            &mut config,
        )
        .unwrap();
    let config: Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(config["config"]["Cmd"][0], "/usr/bin/tool");
    let diff_ids: Vec<&Value> = layers.iter().map(|l| &l["digest"]).collect();
    assert_eq!(
        config["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        diff_ids
    );

    // The tree, from the layers fetched back.
    let fetched = fetch_layers(&repo, &manifest, dir.path());
    check_tree(&fetched, dir.path());
    check_tree_remote(&repo, &manifest, &global, dir.path());

    // Again: the same layers, none uploaded again.
    let (_, stderr) = convert(
        &global,
        &format!("{host}/src/app:v1"),
        &format!("{host}/obd/app:v1"),
        &[],
    );
    assert_eq!(stderr.matches(", already there").count(), 3, "{stderr}");
    assert!(!stderr.contains(", pushed"), "{stderr}");
    // Into another repository, mounting from the first: no layer sent.
    let (_, stderr) = convert(
        &global,
        &format!("{host}/src/app:v1"),
        &format!("{host}/obd/copy:v1"),
        &["--mount-from", "obd/none", "--mount-from", "obd/app"],
    );
    assert_eq!(
        stderr.matches(", mounted from obd/app").count(),
        3,
        "{stderr}"
    );
    assert!(!stderr.contains(", pushed"), "{stderr}");
    let copy = format!("{}/v2/obd/copy", registry.base());
    let (_, copied) = client().get_manifest(&copy, "v1").unwrap().unwrap();
    assert_eq!(copied, bytes, "the same manifest");
    // The image with Docker media types gives the same layers.
    let (_, stderr) = convert(
        &global,
        &format!("{host}/src/app:docker"),
        &format!("{host}/obd/app:docker"),
        &[],
    );
    assert_eq!(stderr.matches(", already there").count(), 3, "{stderr}");

    // An OCI layout in, an OCI layout out: the same layer blobs.
    let layout = dir.path().join("layout");
    write_layout(&image, &layout);
    let out = dir.path().join("out");
    let to = format!("oci:{}:v1", s(&out));
    convert(&global, &format!("oci:{}:v1", s(&layout)), &to, &["--oci"]);
    let index: Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "v1"
    );
    let blob = |digest: &str| out.join("blobs/sha256").join(&digest[7..]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(blob(entry["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let local: Vec<PathBuf> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert_eq!(l["mediaType"], "application/vnd.oci.image.layer.v1.tar");
            blob(l["digest"].as_str().unwrap())
        })
        .collect();
    for (a, b) in local.iter().zip(&fetched) {
        assert_eq!(sha256_file(a).unwrap(), sha256_file(b).unwrap());
    }

    // Into the source layout itself, under a new tag: both tags kept.
    let to = format!("oci:{}:v1-obd", s(&layout));
    convert(&global, &format!("oci:{}:v1", s(&layout)), &to, &[]);
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let tags: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(tags, ["v1", "v1-obd"]);
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let registry = Registry::start(Auth::Anonymous);
    let dir = tempfile::tempdir().unwrap();
    let global = dir.path().join("global.json");
    std::fs::write(&global, "{}").unwrap();
    let image = make_image();
    push_image(&registry, &image, dir.path(), &client());
    let host = format!("127.0.0.1:{}", registry.port);
    let run = |from: &str, to: &str| {
        obd_err(&[
            "convert",
            "--global-config",
            s(&global),
            "--from",
            from,
            "--to",
            to,
        ])
    };
    let to = format!("{host}/obd/app:v1");

    let err = run(&format!("{host}/src/app:nope"), &to);
    assert!(err.contains("no manifest \"nope\""), "{err}");
    let err = run(&format!("{host}/src/app"), &to);
    assert!(err.contains("has no tag"), "{err}");
    let err = run(&format!("{host}/src/app:arm"), &to);
    assert!(
        err.contains("no linux/amd64 image (it has: linux/arm64)"),
        "{err}"
    );
    let err = run(
        &format!("{host}/src/app:v1"),
        &format!("{host}/obd/app@sha256:00"),
    );
    assert!(err.contains("not a digest"), "{err}");
    let err = run(&format!("oci:{}:v1", s(dir.path())), &to);
    assert!(err.contains("not an OCI image layout"), "{err}");
    // A layer type obd cannot apply.
    let src = format!("{}/v2/src/app", registry.base());
    let mut odd: Value = serde_json::from_slice(&image.manifest).unwrap();
    odd["layers"][0]["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar+bzip2");
    let odd = serde_json::to_vec(&odd).unwrap();
    let oci_manifest = "application/vnd.oci.image.manifest.v1+json";
    client()
        .put_manifest(&src, "odd", oci_manifest, &odd)
        .unwrap();
    let err = run(&format!("{host}/src/app:odd"), &to);
    assert!(
        err.contains(
            "media type \"application/vnd.oci.image.layer.v1.tar+bzip2\", which obd cannot apply"
        ),
        "{err}"
    );
    // Nothing was tagged.
    let repo = format!("{}/v2/obd/app", registry.base());
    assert!(client().get_manifest(&repo, "v1").unwrap().is_none());
    // An overlaybd image is not converted again.
    obd_ok(&[
        "convert",
        "--global-config",
        s(&global),
        "--from",
        &format!("{host}/src/app:v1"),
        "--to",
        &to,
    ]);
    let err = run(&to, &format!("{host}/obd/app:v2"));
    assert!(err.contains("an overlaybd image already"), "{err}");
    let err = obd_err(&[
        "convert",
        "--from",
        &format!("{host}/src/app:v1"),
        "--to",
        &format!("oci:{}:v1", s(&dir.path().join("out"))),
        "--mount-from",
        "obd/app",
    ]);
    assert!(err.contains("--mount-from needs a registry --to"), "{err}");
    let err = obd_err(&[
        "convert",
        "--global-config",
        s(&global),
        "--from",
        &format!("{host}/src/app:v1"),
        "--to",
        &format!("{host}/obd/app:v3"),
        "--mount-from",
        "http://127.0.0.1/v2/obd/app",
    ]);
    assert!(err.contains("is not a repository name"), "{err}");
    let status = obd(&["convert", "--from", "x"]).status;
    assert!(!status.success());
}

#[test]
fn a_registry_with_token_auth() {
    let registry = Registry::start(Auth::Token);
    let dir = tempfile::tempdir().unwrap();
    let global = global_with_credentials(dir.path(), registry.port);
    let image = make_image();
    push_image(&registry, &image, dir.path(), &client_from(&global));
    let host = format!("127.0.0.1:{}", registry.port);
    // By digest this time.
    let (_, stderr) = convert(
        &global,
        &format!("{host}/src/app@{}", sha256(&image.manifest)),
        &format!("{host}/obd/app:v1"),
        &["--oci"],
    );
    assert_eq!(stderr.matches(", pushed").count(), 3, "{stderr}");
    let repo = format!("{}/v2/obd/app", registry.base());
    let (media_type, _) = client_from(&global)
        .get_manifest(&repo, "v1")
        .unwrap()
        .unwrap();
    assert_eq!(media_type, "application/vnd.oci.image.manifest.v1+json");
    // Without credentials: refused, and said so.
    let anonymous = dir.path().join("anonymous.json");
    std::fs::write(&anonymous, "{}").unwrap();
    let err = obd_err(&[
        "convert",
        "--global-config",
        s(&anonymous),
        "--from",
        &format!("{host}/src/app:v1"),
        "--to",
        &format!("{host}/obd/app:v2"),
    ]);
    assert!(err.contains("access denied"), "{err}");
}

/// The apply-v1 vectors (three gzip'd layers of every tar entry kind and
/// whiteout case; `../shared/vectors/apply-v1` beside the repository, if
/// this checkout has it) through `obd convert`, OCI layout to OCI layout:
/// every layer prefix passes `e2fsck -fn`, the whole stack read without a
/// kernel (`obd export`, then debugfs in checktree.py) has the tree of
/// expected-tree.json, which the vectors' own model computed from the tars
/// by the OCI rules, and each layer carries the reference's UUIDs (from
/// the chain IDs).
#[test]
fn the_apply_v1_vectors_convert_to_the_expected_tree() {
    let v = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors/apply-v1");
    if !v.join("expected-tree.json").is_file() {
        eprintln!("SKIPPED: ../shared/vectors/apply-v1 is not beside this checkout");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let expected: Value =
        serde_json::from_slice(&std::fs::read(v.join("manifest.json")).unwrap()).unwrap();
    let layers = (0..3)
        .map(|n| {
            let blob = std::fs::read(v.join(format!("layer{n}.tar.gz"))).unwrap();
            let diff_id = expected[format!("layer{n}")]["diff_id"].as_str().unwrap();
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                blob,
                diff_id.to_string(),
            )
        })
        .collect();
    let layout = dir.path().join("layout");
    write_layout(&image_of(layers), &layout);
    let out = dir.path().join("out");
    let global = dir.path().join("global.json");
    std::fs::write(&global, "{}").unwrap();
    convert(
        &global,
        &format!("oci:{}:v1", s(&layout)),
        &format!("oci:{}:v1", s(&out)),
        &["--oci"],
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    let blob = |digest: &str| out.join("blobs/sha256").join(&digest[7..]);
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let converted: Vec<PathBuf> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| blob(l["digest"].as_str().unwrap()))
        .collect();
    assert_eq!(converted.len(), 3);
    for (n, layer) in converted.iter().enumerate() {
        let info = obd_ok(&["info", s(layer), "--json"]).stdout;
        let text = String::from_utf8_lossy(&info).to_lowercase();
        for key in ["uuid", "parent_uuid"] {
            let want = expected[format!("layer{n}")][key]
                .as_str()
                .unwrap()
                .to_lowercase();
            assert!(
                text.contains(&want),
                "layer {n}: {key} {want} not in {text}"
            );
        }
    }
    let raw = dir.path().join("stack.raw");
    for n in 1..=converted.len() {
        let _ = std::fs::remove_file(&raw);
        let mut args = vec!["export", "--output", s(&raw)];
        args.extend(converted[..n].iter().map(|p| s(p)));
        obd_ok(&args);
        assert_fsck_clean(&raw);
    }
    assert_apply_v1_tree(&v, &raw);
}
