//! `obd push`: put layer files in a registry and write the image config
//! that reads them from there, lazily.
//!
//! Each layer is uploaded as one blob, in one piece (`POST
//! /v2/<name>/blobs/uploads/`, then `PUT <location>?digest=sha256:…`);
//! a blob the registry already has is not sent again. No manifest is
//! written: overlaybd reads blobs by digest, and the config names them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use overlaybd::config::{ImageConfig, Lower};
use overlaybd::remote::registry::{Registry, RegistryOptions};
use overlaybd::remote::sha256_file;

use super::export::load_global_config;
use super::Output;
use crate::progress;

/// Upload read-only layers to a registry and write a config.v1.json that
/// reads them from it.
///
/// The repository is given as its API URL, http(s)://HOST[:PORT]/v2/NAME.
/// Credentials come from the global config's credentialConfig (a
/// credential file or a credential server), as when reading.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
obd push --repo http://127.0.0.1:5000/v2/team/app -o config.v1.json base.lsmt app.zfile\n  \
obd push --repo https://registry.example.com/v2/team/app --global-config /etc/overlaybd/overlaybd.json \\\n      --layer-dir /var/lib/obd/layers -o config.v1.json layer.tar\n  \
obd export --output disk.raw --config config.v1.json   # reads the pushed image lazily")]
pub struct Args {
    /// Repository URL: http(s)://HOST[:PORT]/v2/NAME.
    #[arg(long)]
    repo: String,
    /// The image config to write (must not exist).
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Each lower's `dir` (where a downloaded copy is looked for and a
    /// background download lands) is DIR/<digest>
    /// [default: layers/ beside the output].
    #[arg(long, value_name = "DIR")]
    layer_dir: Option<PathBuf>,
    /// Global config for credentials [default: /etc/overlaybd/overlaybd.json
    /// if it exists].
    #[arg(long, value_name = "PATH")]
    global_config: Option<PathBuf>,
    /// Read-only layer files, bottom → top (LSMT, ZFile, tar-wrapped).
    #[arg(value_name = "LAYER", required = true)]
    layers: Vec<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let repo = args.repo.trim_end_matches('/');
    if !(repo.starts_with("http://") || repo.starts_with("https://")) || !repo.contains("/v2/") {
        bail!("--repo must look like http(s)://HOST[:PORT]/v2/NAME, not {repo:?}");
    }
    if args.output.exists() {
        bail!(
            "{} already exists; refusing to overwrite it",
            args.output.display()
        );
    }
    let global = load_global_config(args.global_config.as_deref())?;
    // Refuse anything the image could not read, before uploading a byte.
    for layer in &args.layers {
        overlaybd::image::open_read_only(layer)
            .with_context(|| format!("{} is not a read-only layer", layer.display()))?;
    }
    let registry = Registry::new(RegistryOptions::from_global(&global), &global)?;
    let layer_dir = match &args.layer_dir {
        Some(dir) => dir.clone(),
        None => args
            .output
            .parent()
            .unwrap_or(Path::new("."))
            .join("layers"),
    };
    let mut lowers = Vec::new();
    for layer in &args.layers {
        let (digest, size) = sha256_file(layer).with_context(|| layer.display().to_string())?;
        let exists = registry
            .blob_exists(repo, &digest)
            .with_context(|| format!("checking {digest} in {repo}"))?;
        if exists {
            println!("{digest} {size} bytes: already in the registry");
        } else {
            let bar = progress::bytes(size, "push");
            registry
                .upload_blob_with_progress(repo, &digest, layer, progress::upload_hook(&bar))
                .with_context(|| format!("uploading {}", layer.display()))?;
            bar.finish_and_clear();
            println!("{digest} {size} bytes: pushed {}", layer.display());
        }
        lowers.push(Lower::Blob {
            dir: layer_dir.join(digest.replace(':', "_")),
            digest,
            size,
        });
    }
    let config = ImageConfig {
        repo_blob_url: Some(format!("{repo}/blobs")),
        lowers,
        upper: None,
        result_file: None,
        record_trace_path: None,
        acceleration_layer: false,
        download: None,
    };
    let mut output = Output::create(&args.output)?;
    serde_json::to_writer_pretty(output.file_mut(), &config).context("writing the config")?;
    output.finish()
}
