//! `obd export`: the merged view of a stack of layers as a raw disk image.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use overlaybd::config::{GlobalConfig, GLOBAL_CONFIG_PATH};
use overlaybd::image::{open_stack, LayerSpec};
use overlaybd::stack::{PieceSource, Stack};

use super::Output;
use crate::progress;

/// Write the merged view of a stack of layers to a raw image file.
///
/// Layers are listed bottom → top. Each is a read-only layer of any kind
/// (committed, sealed, ZFile, tar-wrapped), a sparse writable layer, or a
/// writable layer given as DATA:INDEX (top only). Ranges no layer maps are
/// left as holes, so the output is sparse.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  obd export --output disk.raw base.lsmt app.zfile upper.data:upper.index\n  obd export --output disk.raw --config config.v1.json\n  obd export --output disk.raw --config config.v1.json --global-config overlaybd.json\n  obd export --output first-mib.raw --length 1048576 layer.lsmt"
)]
pub struct Args {
    /// Raw image to write (must not exist).
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Start of the exported range in bytes (multiple of 512).
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// Length in bytes (multiple of 512; default: to the end of the image).
    #[arg(long)]
    length: Option<u64>,
    /// An image config (config.v1.json) instead of a list of layers.
    #[arg(long, conflicts_with = "layers")]
    config: Option<PathBuf>,
    /// Global config (cache, credentials, download, p2p) for registry
    /// layers [default: /etc/overlaybd/overlaybd.json if it exists].
    #[arg(long, value_name = "PATH", requires = "config")]
    global_config: Option<PathBuf>,
    /// Layers, bottom → top.
    #[arg(value_name = "LAYER", required_unless_present = "config")]
    layers: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let stack = match &args.config {
        Some(config) => {
            let config = overlaybd::config::ImageConfig::load(config)?;
            let global = load_global_config(args.global_config.as_deref())?;
            overlaybd::image::open_config_global(&config, &global, false)?
        }
        None => {
            let specs: Vec<LayerSpec> = args.layers.iter().map(|l| LayerSpec::parse(l)).collect();
            open_stack(&specs, false)?
        }
    };
    let size = stack.virtual_size();
    let length = args.length.unwrap_or(size.saturating_sub(args.offset));
    if !args.offset.is_multiple_of(512) || !length.is_multiple_of(512) {
        bail!("--offset and --length must be multiples of 512 bytes");
    }
    if args.offset.checked_add(length).is_none_or(|end| end > size) {
        bail!(
            "range {}+{length} passes the end of the image ({size} bytes)",
            args.offset
        );
    }
    let output = Output::create(&args.output)?;
    export_range(&stack, output.file(), args.offset, length)?;
    output.finish()
}

/// The global config at `path`, else /etc/overlaybd/overlaybd.json if it
/// exists, else the defaults.
pub fn load_global_config(path: Option<&Path>) -> Result<GlobalConfig> {
    match path {
        Some(path) => Ok(GlobalConfig::load(path)?),
        None if Path::new(GLOBAL_CONFIG_PATH).exists() => {
            Ok(GlobalConfig::load(GLOBAL_CONFIG_PATH)?)
        }
        None => Ok(GlobalConfig::default()),
    }
}

/// Copy `[offset, offset + length)` of the stack into `file` at position 0,
/// leaving zero ranges as holes.
pub fn export_range(stack: &Stack, file: &std::fs::File, offset: u64, length: u64) -> Result<()> {
    const CHUNK: u64 = 4 << 20;
    let bar = progress::bytes(length, "export");
    let mut plan = Vec::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut done = 0u64;
    while done < length {
        let n = (length - done).min(CHUNK);
        plan.clear();
        stack.plan(offset + done, n, &mut plan)?;
        let mut position = done;
        for piece in &plan {
            if piece.source != PieceSource::Zero {
                let chunk = &mut buf[..piece.length as usize];
                stack.read_piece(chunk, piece.source)?;
                file.write_all_at(chunk, position)
                    .context("writing the raw image")?;
            }
            position += piece.length;
        }
        done += n;
        bar.inc(n);
    }
    file.set_len(length).context("writing the raw image")?;
    bar.finish_and_clear();
    Ok(())
}
