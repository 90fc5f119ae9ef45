//! `obd zfile`: compress, decompress or verify a ZFile.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use overlaybd::io::{LocalFile, ReadAt};
use overlaybd::zfile::{self, Flavor};

use super::{CompressArgs, Output};
use crate::progress;

/// Compress a file into a ZFile, or back (like overlaybd-zfile).
///
/// ZFile stores a file as independently compressed blocks with a CRC each
/// and a jump table, so any block can be read without the others. Any file
/// can be compressed; overlaybd compresses committed layers.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  obd zfile layer.lsmt layer.zfile --algorithm zstd --bs 16\n  obd zfile -x layer.zfile layer.lsmt\n  obd zfile --verify layer.zfile"
)]
pub struct Args {
    /// Decompress IN (a ZFile) into OUT.
    #[arg(short = 'x', long, conflicts_with = "verify")]
    extract: bool,
    /// Check every block's CRC and that IN decompresses; writes nothing.
    #[arg(long)]
    verify: bool,
    #[command(flatten)]
    compress: CompressArgs,
    /// Input file.
    input: PathBuf,
    /// Output file (must not exist; not used with --verify).
    output: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let input = LocalFile::open(&args.input)?;
    if args.verify {
        if args.output.is_some() {
            bail!("--verify reads IN only; drop OUT");
        }
        let report = zfile::verify(Arc::new(input))?;
        println!(
            "{}: ok, {} blocks of {} KiB, {}, {} bytes decompressed{}",
            args.input.display(),
            report.blocks,
            report.block_size / 1024,
            report.algorithm,
            report.original_size,
            if report.crc_checked {
                ", all CRCs match"
            } else {
                " (no CRCs stored)"
            }
        );
        return Ok(());
    }
    let Some(out) = args.output else {
        bail!("OUT is missing: obd zfile IN OUT (or obd zfile --verify IN)");
    };
    let mut output = Output::create(&out)?;
    let bar = progress::bytes(
        input.size(),
        if args.extract {
            "decompress"
        } else {
            "compress"
        },
    );
    if args.extract {
        let mut writer = output.writer();
        zfile::decompress(Arc::new(input), &mut writer, &mut |n| bar.inc(n))?;
        std::io::Write::flush(&mut writer).context("writing the output")?;
    } else {
        let options = args.compress.options(Flavor::ToolOutput)?;
        let oversized = zfile::compress(&input, output.file_mut(), &options, &mut |n| bar.inc(n))?;
        bar.finish_and_clear();
        super::warn_if_reference_cannot_read(oversized, &out);
    }
    bar.finish_and_clear();
    output.finish()
}
