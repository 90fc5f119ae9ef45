//! `obd convert`: an OCI (or Docker v2) image into an overlaybd image, the
//! job of the accelerated-container-image convertor, without its C++ tools.
//!
//! Each OCI layer is downloaded to a temporary file (so memory stays small
//! whatever the layer size), applied with `obd apply`'s code onto the
//! overlaybd layers made so far (the first one makes the file system), and
//! committed as one overlaybd layer; the OCI layer file is then deleted.
//! Each overlaybd layer is pushed unless the target has it already, so a
//! re-run only sends what is missing (the layers are reproducible: same
//! image, same bytes). The config and the manifest, whose layers carry the
//! annotations the overlaybd snapshotter looks for, come last: the target
//! tag names the new image only once everything it refers to is there.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use overlaybd::config::GlobalConfig;
use overlaybd::remote::registry::{Registry, RegistryOptions};
use overlaybd::remote::sha256_file;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::apply::{apply_layer, Job};
use super::export::load_global_config;
use super::LayerFormat;
use crate::progress;

/// Convert an OCI or Docker image into an overlaybd image.
///
/// REF is either a registry reference, [http://|https://]HOST[:PORT]/REPO:TAG
/// (without a scheme: http for localhost and 127.0.0.1, else https; --from
/// also takes REPO@sha256:DIGEST), or an OCI image layout directory,
/// oci:DIR:TAG (the tag is the org.opencontainers.image.ref.name of an
/// entry in DIR/index.json; --to creates DIR when missing).
///
/// An index picks its linux/amd64 image. Each layer (tar, tar+gzip,
/// tar+zstd) becomes one overlaybd layer, applied onto the ones before
/// (the first with a new ext4 of --size GiB) and committed as `obd commit
/// -z -t` would, like the reference convertor; its UUID comes from the
/// layer's chain ID. Layers the target already has are not uploaded again,
/// so an interrupted conversion can simply be run again. The manifest is
/// written last.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
obd convert --from registry.example.com/library/redis:7 --to registry.example.com/library/redis:7-obd\n  \
obd convert --from http://127.0.0.1:5000/app:v1 --to http://127.0.0.1:5000/app:v1-obd\n  \
obd convert --from oci:./app-layout:v1 --to oci:./app-obd:v1 --oci\n  \
obd convert --from 127.0.0.1:5000/app:v1 --to oci:/tmp/out:v1 --no-compress\n  \
obd convert --from 127.0.0.1:5000/app2:v1 --to 127.0.0.1:5000/app2:v1-obd --mount-from app\n\
Credentials for registries come from the global config's credentialConfig.")]
pub struct Args {
    /// The image to convert.
    #[arg(long, value_name = "REF")]
    from: String,
    /// Where to write the overlaybd image (the tag is written last).
    #[arg(long, value_name = "REF")]
    to: String,
    /// Write OCI media types (manifest, config, layers); default: Docker
    /// schema 2 media types, as the reference convertor.
    #[arg(long)]
    oci: bool,
    /// Virtual disk size in GiB of the image's file system.
    #[arg(long, value_name = "GIB", default_value_t = 64)]
    size: u64,
    /// Store layers as plain LSMT files instead of ZFile (lz4, 4 KiB
    /// blocks) in a tar, the reference convertor's `-z -t`.
    #[arg(long)]
    no_compress: bool,
    /// Where the temporary files go: one OCI layer at a time, and the
    /// overlaybd layers made so far (about the image's size on disk; mind a
    /// tmpfs /tmp) [default: $TMPDIR or /tmp].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// A repository of the --to registry (a name such as library/app) to
    /// mount layers from instead of uploading them, when it has them: the
    /// OCI cross-repository blob mount, e.g. from the repository of an
    /// earlier conversion of an image with the same base layers. A
    /// registry that does not mount a blob gets it uploaded. Repeatable.
    #[arg(long, value_name = "NAME")]
    mount_from: Vec<String>,
    /// Global config for credentials [default: /etc/overlaybd/overlaybd.json
    /// if it exists].
    #[arg(long, value_name = "PATH")]
    global_config: Option<PathBuf>,
}

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// OCI layer media types that `obd apply` reads (tar, gzip, zstd).
const LAYER_TYPES: [&str; 5] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
];

/// The annotations of an overlaybd layer in a manifest, as the reference
/// convertor writes them and the overlaybd snapshotter reads them.
const ANNOTATION_VERSION: &str = "containerd.io/snapshot/overlaybd/version";
const ANNOTATION_DIGEST: &str = "containerd.io/snapshot/overlaybd/blob-digest";
const ANNOTATION_SIZE: &str = "containerd.io/snapshot/overlaybd/blob-size";
/// The overlaybd blob format version the reference writes.
const OVERLAYBD_VERSION: &str = "0.1.0";

/// Configs and manifests are small; refuse anything bigger.
const DOCUMENT_LIMIT: u64 = 16 << 20;

pub fn run(args: Args) -> Result<()> {
    let from = Place::parse(&args.from, "--from")?;
    let to = Place::parse(&args.to, "--to")?;
    if matches!(to.reference, Reference::Digest(_)) {
        bail!("--to {}: give a tag to write, not a digest", args.to);
    }
    let fs_size = args
        .size
        .checked_mul(1 << 30)
        .filter(|&s| s >= ext4_apply::fs::MIN_FS_SIZE)
        .with_context(|| format!("--size {} GiB is not a usable size", args.size))?;
    let global = if from.is_registry() || to.is_registry() {
        load_global_config(args.global_config.as_deref())?
    } else {
        GlobalConfig::default()
    };
    if !args.mount_from.is_empty() && !to.is_registry() {
        bail!("--mount-from needs a registry --to (it names repositories of that registry)");
    }
    if let Some(bad) = args.mount_from.iter().find(|n| !valid_repo_name(n)) {
        bail!("--mount-from {bad:?} is not a repository name like library/app");
    }
    let source = Store::open(&from, &global, false, &[])?;
    let target = Store::open(&to, &global, true, &args.mount_from)?;
    let work = match &args.work_dir {
        Some(dir) => tempfile::Builder::new()
            .prefix(".obd-convert-")
            .tempdir_in(dir),
        None => tempfile::Builder::new().prefix("obd-convert-").tempdir(),
    }
    .context("cannot make a work directory")?;

    // The image: its manifest (through an index if need be) and config.
    let (manifest_type, manifest) = source.manifest(&from.reference)?;
    let (manifest_type, manifest) = pick_amd64(&source, &args.from, manifest_type, manifest)?;
    if manifest_type != OCI_MANIFEST && manifest_type != DOCKER_MANIFEST {
        bail!(
            "{}: unsupported manifest media type {manifest_type:?}",
            args.from
        );
    }
    let config_desc = Descriptor::of(&manifest["config"]).context("the manifest's config")?;
    let config_bytes = source.small_blob(&config_desc, work.path())?;
    let mut config: Value =
        serde_json::from_slice(&config_bytes).context("the image config is not JSON")?;
    let layers = manifest["layers"]
        .as_array()
        .context("the manifest has no layers list")?
        .iter()
        .map(Descriptor::of)
        .collect::<Result<Vec<_>>>()
        .context("the manifest's layers")?;
    if layers.is_empty() {
        bail!("{}: the image has no layers", args.from);
    }
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .context("the image config has no rootfs.diff_ids")?
        .iter()
        .map(|d| d.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .context("the image config's rootfs.diff_ids are not strings")?;
    if diff_ids.len() != layers.len() {
        bail!(
            "the image has {} layers but its config {} diff_ids",
            layers.len(),
            diff_ids.len()
        );
    }
    for layer in &layers {
        if layer.annotations.get(ANNOTATION_DIGEST).is_some() {
            bail!("{}: this is an overlaybd image already", args.from);
        }
        if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
            bail!(
                "{}: layer {} has media type {:?}, which obd cannot apply (it takes {})",
                args.from,
                layer.digest,
                layer.media_type,
                LAYER_TYPES.join(", ")
            );
        }
    }

    let format = LayerFormat::reference(!args.no_compress);
    let mut made: Vec<PathBuf> = Vec::new();
    let mut out_layers = Vec::new();
    let mut chain_id = String::new();
    let mut parent_uuid = None;
    let count = layers.len();
    for (i, (layer, diff_id)) in layers.iter().zip(&diff_ids).enumerate() {
        let step = format!("layer {}/{count}", i + 1);
        chain_id = if i == 0 {
            diff_id.clone()
        } else {
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{chain_id} {diff_id}")))
            )
        };
        let uuid = chain_uuid(&chain_id)?;
        let expect = parse_sha256(diff_id).with_context(|| format!("diff_id {diff_id:?}"))?;

        let blob = source.blob_file(layer, work.path(), &step)?;
        let out = work.path().join(format!("layer{i}.obd"));
        eprintln!("{step}: applying {} ({} bytes)", layer.digest, layer.size);
        apply_layer(&Job {
            layer: blob.path(),
            out: &out,
            lowers: &made,
            mkfs_size: (i == 0).then_some(fs_size),
            uuid: Some(uuid.clone()),
            parent_uuid: parent_uuid.clone(),
            expect: Some(expect),
            format: &format,
        })
        .with_context(|| format!("{step} ({})", layer.digest))?;
        drop(blob);
        parent_uuid = Some(uuid);

        let (digest, size) = sha256_file(&out).with_context(|| out.display().to_string())?;
        let put = target.put_blob(&digest, &out, &step)?;
        eprintln!(
            "{step}: {} → {digest} ({size} bytes), {}",
            layer.digest,
            match put {
                Put::There => "already there".to_string(),
                Put::Mounted(from) => format!("mounted from {from}"),
                Put::Sent => "pushed".to_string(),
            }
        );
        out_layers.push(json!({
            "mediaType": if args.oci { OCI_LAYER } else { DOCKER_LAYER },
            "digest": digest,
            "size": size,
            "annotations": {
                ANNOTATION_VERSION: OVERLAYBD_VERSION,
                ANNOTATION_DIGEST: digest,
                ANNOTATION_SIZE: size.to_string(),
            },
        }));
        made.push(out);
    }

    // The config: the source's, with the overlaybd layers as its diff_ids.
    config["rootfs"]["diff_ids"] = out_layers.iter().map(|l| l["digest"].clone()).collect();
    let config_bytes = serde_json::to_vec(&config)?;
    let config_digest = format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes)));
    let config_path = work.path().join("config.json");
    std::fs::write(&config_path, &config_bytes)?;
    target.put_blob(&config_digest, &config_path, "config")?;

    // The manifest: the source's, with the new config and layers.
    let mut manifest = manifest;
    let media_type = if args.oci {
        OCI_MANIFEST
    } else {
        DOCKER_MANIFEST
    };
    manifest["mediaType"] = json!(media_type);
    manifest["config"] = json!({
        "mediaType": if args.oci { OCI_CONFIG } else { DOCKER_CONFIG },
        "digest": config_digest,
        "size": config_bytes.len(),
    });
    manifest["layers"] = Value::Array(out_layers);
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let tag = match &to.reference {
        Reference::Tag(tag) => tag.as_str(),
        Reference::Digest(_) => unreachable!("refused above"),
    };
    target.put_manifest(tag, media_type, &manifest_bytes)?;
    println!(
        "{} sha256:{}",
        args.to,
        hex::encode(Sha256::digest(&manifest_bytes))
    );
    Ok(())
}

/// A layer's UUID from its chain ID, as the reference convertor makes it:
/// the first 32 hex digits, grouped 8-4-4-4-12.
fn chain_uuid(chain_id: &str) -> Result<String> {
    let hex_part = chain_id
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64)
        .with_context(|| format!("{chain_id:?} is not a sha256 digest"))?;
    let h = &hex_part[..32];
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

fn parse_sha256(digest: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    let hex_part = digest
        .strip_prefix("sha256:")
        .context("not a sha256 digest")?;
    hex::decode_to_slice(hex_part, &mut out)
        .ok()
        .context("not a sha256 digest")?;
    Ok(out)
}

/// The image for linux/amd64 when `manifest` is an index, else itself.
fn pick_amd64(
    source: &Store,
    name: &str,
    media_type: String,
    manifest: Value,
) -> Result<(String, Value)> {
    if media_type != OCI_INDEX && media_type != DOCKER_LIST {
        return Ok((media_type, manifest));
    }
    let entries = manifest["manifests"]
        .as_array()
        .context("the index has no manifests list")?;
    let platform = |e: &Value| {
        format!(
            "{}/{}",
            e["platform"]["os"].as_str().unwrap_or("?"),
            e["platform"]["architecture"].as_str().unwrap_or("?")
        )
    };
    let Some(entry) = entries.iter().find(|e| platform(e) == "linux/amd64") else {
        let have: Vec<String> = entries.iter().map(platform).collect();
        bail!(
            "{name}: the index has no linux/amd64 image (it has: {})",
            have.join(", ")
        );
    };
    let digest = entry["digest"]
        .as_str()
        .context("the index's linux/amd64 entry has no digest")?;
    let (media_type, manifest) = source.manifest(&Reference::Digest(digest.to_string()))?;
    if media_type == OCI_INDEX || media_type == DOCKER_LIST {
        bail!("{name}: the linux/amd64 entry of the index is an index itself");
    }
    Ok((media_type, manifest))
}

/// A content descriptor (the fields obd uses).
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
    annotations: serde_json::Map<String, Value>,
}

impl Descriptor {
    fn of(value: &Value) -> Result<Descriptor> {
        let digest = value["digest"].as_str().context("no digest")?.to_string();
        parse_sha256(&digest).with_context(|| format!("digest {digest:?}"))?;
        Ok(Descriptor {
            media_type: value["mediaType"].as_str().unwrap_or("").to_string(),
            digest,
            size: value["size"].as_u64().context("no size")?,
            annotations: value["annotations"]
                .as_object()
                .cloned()
                .unwrap_or_default(),
        })
    }
}

/// What a REF names inside its place.
enum Reference {
    Tag(String),
    Digest(String),
}

impl Reference {
    fn text(&self) -> &str {
        match self {
            Reference::Tag(t) | Reference::Digest(t) => t,
        }
    }
}

/// Where an image is: a registry repository or an OCI layout directory.
enum Location {
    /// `http(s)://HOST/v2/NAME`.
    Registry(String),
    Layout(PathBuf),
}

/// A parsed REF.
struct Place {
    location: Location,
    reference: Reference,
}

impl Place {
    fn parse(text: &str, option: &str) -> Result<Place> {
        if let Some(rest) = text.strip_prefix("oci:") {
            let (dir, tag) = rest
                .rsplit_once(':')
                .filter(|(dir, tag)| !dir.is_empty() && !tag.is_empty() && !tag.contains('/'))
                .with_context(|| format!("{option} {text:?}: an OCI layout is oci:DIR:TAG"))?;
            return Ok(Place {
                location: Location::Layout(PathBuf::from(dir)),
                reference: Reference::Tag(tag.to_string()),
            });
        }
        let usage =
            || format!("{option} {text:?}: give [http(s)://]HOST[:PORT]/REPO:TAG or oci:DIR:TAG");
        let (scheme, rest) = match text.split_once("://") {
            Some((scheme @ ("http" | "https"), rest)) => (Some(scheme), rest),
            Some(_) => bail!(usage()),
            None => (None, text),
        };
        let (host, path) = rest.split_once('/').with_context(usage)?;
        if host.is_empty() || path.is_empty() {
            bail!(usage());
        }
        let (repo, reference) = if let Some((repo, digest)) = path.split_once('@') {
            (repo, Reference::Digest(digest.to_string()))
        } else {
            let last = path.rfind('/').map_or(0, |i| i + 1);
            match path[last..].rsplit_once(':') {
                Some((_, tag)) if !tag.is_empty() => (
                    &path[..path.len() - tag.len() - 1],
                    Reference::Tag(tag.to_string()),
                ),
                _ => bail!("{option} {text:?} has no tag: give HOST/REPO:TAG (obd does not assume :latest)"),
            }
        };
        if repo.is_empty() {
            bail!(usage());
        }
        let scheme = scheme.unwrap_or_else(|| {
            let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
            if name == "localhost" || name.starts_with("127.") || name == "[::1]" {
                "http"
            } else {
                "https"
            }
        });
        Ok(Place {
            location: Location::Registry(format!("{scheme}://{host}/v2/{repo}")),
            reference,
        })
    }

    fn is_registry(&self) -> bool {
        matches!(self.location, Location::Registry(_))
    }
}

/// An opened place to read an image from or write one to.
enum Store {
    Registry {
        client: Box<Registry>,
        repo: String,
        /// Repositories of the same registry to mount blobs from.
        mount_from: Vec<String>,
    },
    Layout(PathBuf),
}

/// What [`Store::put_blob`] did with a blob.
enum Put {
    /// The target had it already.
    There,
    /// The registry mounted it from this repository.
    Mounted(String),
    /// It was uploaded (or copied into the layout).
    Sent,
}

/// A registry repository name: lowercase path components of [a-z0-9._-]
/// (the distribution spec's grammar, loosely), no scheme or /v2/.
fn valid_repo_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('/').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        })
}

/// A layer blob as a file: a temporary download, or a layout's own file.
enum BlobFile {
    Temp(tempfile::TempPath),
    Kept(PathBuf),
}

impl BlobFile {
    fn path(&self) -> &Path {
        match self {
            BlobFile::Temp(p) => p,
            BlobFile::Kept(p) => p,
        }
    }
}

impl Store {
    fn open(
        place: &Place,
        global: &GlobalConfig,
        write: bool,
        mount_from: &[String],
    ) -> Result<Store> {
        Ok(match &place.location {
            Location::Registry(repo) => Store::Registry {
                client: Box::new(Registry::new(RegistryOptions::from_global(global), global)?),
                repo: repo.clone(),
                mount_from: mount_from.to_vec(),
            },
            Location::Layout(dir) => {
                if write {
                    std::fs::create_dir_all(dir.join("blobs/sha256"))
                        .with_context(|| format!("creating {}", dir.display()))?;
                    let marker = dir.join("oci-layout");
                    if !marker.exists() {
                        std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
                    }
                } else if !dir.join("index.json").is_file() {
                    bail!(
                        "{} is not an OCI image layout (no index.json)",
                        dir.display()
                    );
                }
                Store::Layout(dir.clone())
            }
        })
    }

    fn blob_path(dir: &Path, digest: &str) -> PathBuf {
        let hex_part = digest.strip_prefix("sha256:").unwrap_or(digest);
        dir.join("blobs/sha256").join(hex_part)
    }

    /// The manifest (or index) named by `reference`, and its media type.
    fn manifest(&self, reference: &Reference) -> Result<(String, Value)> {
        let (header_type, bytes) = match self {
            Store::Registry { client, repo, .. } => client
                .get_manifest(repo, reference.text())
                .with_context(|| format!("reading the manifest {} of {repo}", reference.text()))?
                .with_context(|| {
                    format!(
                        "{repo} has no manifest {:?} (no such tag or digest)",
                        reference.text()
                    )
                })?,
            Store::Layout(dir) => {
                let digest = match reference {
                    Reference::Digest(d) => d.clone(),
                    Reference::Tag(tag) => {
                        let index = read_json(&dir.join("index.json"))?;
                        index["manifests"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|m| {
                                m["annotations"]["org.opencontainers.image.ref.name"].as_str()
                                    == Some(tag)
                            })
                            .and_then(|m| m["digest"].as_str().map(str::to_string))
                            .with_context(|| {
                                format!("{} has no image tagged {tag:?}", dir.display())
                            })?
                    }
                };
                let path = Store::blob_path(dir, &digest);
                let bytes = read_limited(&path)?;
                (String::new(), bytes)
            }
        };
        let value: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("the manifest {} is not JSON", reference.text()))?;
        // The document's own mediaType wins; a registry's Content-Type
        // stands in when it has none.
        let media_type = value["mediaType"]
            .as_str()
            .map(str::to_string)
            .unwrap_or(header_type);
        let media_type = if media_type.is_empty() && value.get("manifests").is_some() {
            OCI_INDEX.to_string()
        } else if media_type.is_empty() && value.get("layers").is_some() {
            OCI_MANIFEST.to_string()
        } else {
            media_type
        };
        Ok((media_type, value))
    }

    /// A small blob (a config) in memory, its digest checked.
    fn small_blob(&self, desc: &Descriptor, work: &Path) -> Result<Vec<u8>> {
        if desc.size > DOCUMENT_LIMIT {
            bail!(
                "{} is {} bytes: too big for a config",
                desc.digest,
                desc.size
            );
        }
        let file = self.blob_file(desc, work, "config")?;
        read_limited(file.path())
    }

    /// The blob `desc` as a file, its size and digest checked.
    fn blob_file(&self, desc: &Descriptor, work: &Path, label: &str) -> Result<BlobFile> {
        match self {
            Store::Layout(dir) => {
                let path = Store::blob_path(dir, &desc.digest);
                let (digest, size) =
                    sha256_file(&path).with_context(|| format!("reading {}", path.display()))?;
                if digest != desc.digest || size != desc.size {
                    bail!(
                        "{} has {digest} ({size} bytes), not {} ({} bytes)",
                        path.display(),
                        desc.digest,
                        desc.size
                    );
                }
                Ok(BlobFile::Kept(path))
            }
            Store::Registry { client, repo, .. } => {
                let url = format!("{repo}/blobs/{}", desc.digest);
                let mut temp = tempfile::NamedTempFile::new_in(work)?;
                let bar = progress::bytes(desc.size, &format!("{label} pull"));
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; 4 << 20];
                let mut offset = 0;
                {
                    let mut writer = std::io::BufWriter::new(temp.as_file_mut());
                    while offset < desc.size {
                        let n = (desc.size - offset).min(buf.len() as u64) as usize;
                        client
                            .read_range(&url, desc.size, offset, &mut buf[..n])
                            .with_context(|| format!("downloading {}", desc.digest))?;
                        hasher.update(&buf[..n]);
                        writer.write_all(&buf[..n])?;
                        offset += n as u64;
                        bar.inc(n as u64);
                    }
                    writer.flush()?;
                }
                bar.finish_and_clear();
                let got = format!("sha256:{}", hex::encode(hasher.finalize()));
                if got != desc.digest {
                    bail!("downloaded {} but its content is {got}", desc.digest);
                }
                Ok(BlobFile::Temp(temp.into_temp_path()))
            }
        }
    }

    /// Store the file `path` as blob `digest` unless it is there already:
    /// mounted from one of the registry's `mount_from` repositories if one
    /// has it, else sent.
    fn put_blob(&self, digest: &str, path: &Path, label: &str) -> Result<Put> {
        match self {
            Store::Registry {
                client,
                repo,
                mount_from,
            } => {
                if client
                    .blob_exists(repo, digest)
                    .with_context(|| format!("checking {digest} in {repo}"))?
                {
                    return Ok(Put::There);
                }
                for from in mount_from {
                    if client
                        .mount_blob(repo, digest, from)
                        .with_context(|| format!("{label}: mounting {digest} from {from}"))?
                    {
                        return Ok(Put::Mounted(from.clone()));
                    }
                }
                let size = std::fs::metadata(path)?.len();
                let bar = progress::bytes(size, &format!("{label} push"));
                client
                    .upload_blob_with_progress(repo, digest, path, progress::upload_hook(&bar))
                    .with_context(|| format!("{label}: uploading {digest} to {repo}"))?;
                bar.finish_and_clear();
                Ok(Put::Sent)
            }
            Store::Layout(dir) => {
                let dest = Store::blob_path(dir, digest);
                if dest.exists() {
                    return Ok(Put::There);
                }
                // Copied under a temporary name, then renamed: a blob file
                // is either whole or absent.
                let mut temp = tempfile::NamedTempFile::new_in(dest.parent().unwrap_or(dir))?;
                std::io::copy(&mut File::open(path)?, temp.as_file_mut())?;
                temp.as_file().sync_all()?;
                temp.persist(&dest)?;
                Ok(Put::Sent)
            }
        }
    }

    /// Write `manifest` and point `tag` at it.
    fn put_manifest(&self, tag: &str, media_type: &str, manifest: &[u8]) -> Result<()> {
        match self {
            Store::Registry { client, repo, .. } => client
                .put_manifest(repo, tag, media_type, manifest)
                .with_context(|| format!("writing the manifest {tag} to {repo}")),
            Store::Layout(dir) => {
                let digest = format!("sha256:{}", hex::encode(Sha256::digest(manifest)));
                let temp = tempfile::NamedTempFile::new_in(dir)?;
                std::fs::write(temp.path(), manifest)?;
                self.put_blob(&digest, temp.path(), "manifest")?;
                let index_path = dir.join("index.json");
                let mut index = if index_path.exists() {
                    read_json(&index_path)?
                } else {
                    json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
                };
                let entries = index["manifests"]
                    .as_array_mut()
                    .context("index.json has no manifests list")?;
                entries.retain(|m| {
                    m["annotations"]["org.opencontainers.image.ref.name"].as_str() != Some(tag)
                });
                entries.push(json!({
                    "mediaType": media_type,
                    "digest": digest,
                    "size": manifest.len(),
                    "annotations": {"org.opencontainers.image.ref.name": tag},
                }));
                let mut out = tempfile::NamedTempFile::new_in(dir)?;
                serde_json::to_writer(out.as_file_mut(), &index)?;
                out.as_file().sync_all()?;
                out.persist(&index_path)?;
                Ok(())
            }
        }
    }
}

/// A small file read whole (at most [`DOCUMENT_LIMIT`] bytes).
fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)
        .with_context(|| format!("reading {}", path.display()))?
        .take(DOCUMENT_LIMIT + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > DOCUMENT_LIMIT {
        bail!("{} is too big for a manifest or config", path.display());
    }
    Ok(bytes)
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_slice(&read_limited(path)?)
        .with_context(|| format!("{} is not JSON", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(text: &str) -> (String, String) {
        let place = Place::parse(text, "--from").unwrap();
        match place.location {
            Location::Registry(repo) => (repo, place.reference.text().to_string()),
            Location::Layout(_) => panic!("not a registry"),
        }
    }

    #[test]
    fn references() {
        assert_eq!(
            registry("127.0.0.1:5000/team/app:v1"),
            ("http://127.0.0.1:5000/v2/team/app".into(), "v1".into())
        );
        assert_eq!(
            registry("registry.example.com/app:1.0"),
            ("https://registry.example.com/v2/app".into(), "1.0".into())
        );
        assert_eq!(
            registry("http://r:5000/app@sha256:ab"),
            ("http://r:5000/v2/app".into(), "sha256:ab".into())
        );
        let err = Place::parse("127.0.0.1:5000/app", "--from").err().unwrap();
        assert!(err.to_string().contains("no tag"), "{err}");
        assert!(Place::parse("ftp://h/app:1", "--from").is_err());
        let layout = Place::parse("oci:/tmp/x:y:v1", "--to").unwrap();
        assert!(matches!(layout.location, Location::Layout(ref d) if d == Path::new("/tmp/x:y")));
        assert!(Place::parse("oci:/tmp/x", "--to").is_err());
    }

    #[test]
    fn uuids_from_chain_ids() {
        let chain = format!("sha256:{}", "0123456789abcdef".repeat(4));
        assert_eq!(
            chain_uuid(&chain).unwrap(),
            "01234567-89ab-cdef-0123-456789abcdef"
        );
    }
}
