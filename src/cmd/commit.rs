//! `obd commit`: a writable layer into a read-only layer.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use overlaybd::lsmt::{CommitOptions, WritableLayer};

use super::{LayerFormat, Output};
use crate::progress;

/// Commit a writable layer into a read-only layer (like overlaybd-commit).
///
/// The output is byte-identical to the reference tool's for the same input
/// and options. With -z it is ZFile-compressed; with -t wrapped in a tar
/// (as registries store overlaybd layers); with --seal it is the data file
/// with its index and a trailer appended instead.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  obd commit upper.data upper.index layer.lsmt -m 'my change'\n  obd commit upper.data upper.index layer.zfile -z --algorithm zstd --bs 16 -t\n  obd commit upper.sparse layer.lsmt   (a sparse layer has no INDEX)"
)]
pub struct Args {
    /// DATA [INDEX] OUT: the writable layer's files, and the file to write.
    #[arg(value_name = "DATA [INDEX] OUT", num_args = 2..=3, required = true)]
    files: Vec<PathBuf>,
    /// Commit message (stored in the layer header, at most 255 bytes; not
    /// stored with -z, as overlaybd-commit -z).
    #[arg(short = 'm', long, default_value = "")]
    message: String,
    /// UUID of the new layer (default: all zeros).
    #[arg(long)]
    uuid: Option<String>,
    /// Parent UUID (default: the writable layer's).
    #[arg(short = 'p', long = "parent-uuid")]
    parent_uuid: Option<String>,
    /// Write a sealed layer: the data file plus index and trailer.
    #[arg(long, conflicts_with_all = ["compress", "uuid", "message"])]
    seal: bool,
    #[command(flatten)]
    format: LayerFormat,
}

pub fn run(args: Args) -> Result<()> {
    let (data, index, out) = match args.files.as_slice() {
        [data, out] => (data, None, out),
        [data, index, out] => (data, Some(index), out),
        _ => bail!("usage: obd commit DATA [INDEX] OUT"),
    };
    let layer = WritableLayer::open(data, index.map(|p| p.as_path()), false)?;
    let total = layer
        .snapshot()
        .iter()
        .map(|(_, e)| if e.zeroed { 0 } else { e.length * 512 })
        .sum();
    let bar = progress::bytes(total, "commit");
    let mut plain = Output::create(out)?;
    {
        let mut writer = plain.writer();
        if args.seal {
            layer.seal(&mut writer, &mut |n| bar.inc(n))?;
        } else {
            // overlaybd-commit -z stores no message; do the same so the
            // output stays byte-identical to the reference's.
            if args.format.compress && !args.message.is_empty() {
                eprintln!(
                    "obd: note: with -z the commit message is not stored (as overlaybd-commit -z)"
                );
            }
            let options = CommitOptions {
                uuid: args.uuid.clone(),
                parent_uuid: args.parent_uuid.clone(),
                message: if args.format.compress {
                    String::new()
                } else {
                    args.message.clone()
                },
            };
            layer.commit(&mut writer, &options, &mut |n| bar.inc(n))?;
        }
        std::io::Write::flush(&mut writer).context("writing the committed layer")?;
    }
    bar.finish_and_clear();
    args.format.finish(plain, out)
}
