//! `obd import`: a raw disk image into a committed layer.

use std::path::PathBuf;

use anyhow::{Context, Result};
use overlaybd::index::{Extent, IntervalMap, SECTOR};
use overlaybd::io::{LocalFile, ReadAt};
use overlaybd::lsmt::{self, CommitOptions, Header};

use super::{LayerFormat, Output};
use crate::progress;

/// Turn a raw disk image (e.g. from `mkfs.ext4 -d DIR`) into a committed
/// layer. All-zero sectors are left unmapped, so they cost nothing.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  truncate -s 256M disk.raw && mkfs.ext4 -d rootfs/ disk.raw\n  obd import disk.raw base.lsmt\n  obd import disk.raw base.zfile -z --algorithm zstd -t"
)]
pub struct Args {
    /// Raw image to read (its size must be a multiple of 512).
    raw: PathBuf,
    /// Layer file to write (must not exist).
    out: PathBuf,
    /// Commit message stored in the layer.
    #[arg(short = 'm', long, default_value = "")]
    message: String,
    /// UUID of the new layer (default: all zeros).
    #[arg(long)]
    uuid: Option<String>,
    #[command(flatten)]
    format: LayerFormat,
}

pub fn run(args: Args) -> Result<()> {
    let raw = LocalFile::open(&args.raw)?;
    let size = raw.size();
    if size == 0 || !size.is_multiple_of(SECTOR) {
        anyhow::bail!(
            "{}: {size} bytes is not a positive multiple of 512",
            args.raw.display()
        );
    }
    let map = nonzero_extents(&raw)?;
    let header = Header::new(0, size, lsmt::NIL_UUID, lsmt::NIL_UUID);
    let total = map.iter().map(|(_, e)| e.length * SECTOR).sum();
    let bar = progress::bytes(total, "import");
    let mut plain = Output::create(&args.out)?;
    {
        let mut writer = plain.writer();
        let options = CommitOptions {
            uuid: args.uuid.clone(),
            parent_uuid: None,
            message: args.message.clone(),
        };
        lsmt::commit(
            &map,
            &|buf, position| raw.read_exact_at(buf, position),
            raw.name(),
            &header,
            &mut writer,
            &options,
            &mut |n| bar.inc(n),
        )?;
        std::io::Write::flush(&mut writer).context("writing the layer")?;
    }
    bar.finish_and_clear();
    args.format.finish(plain, &args.out)
}

/// Runs of non-zero sectors of `raw`, mapped to their own position in it.
fn nonzero_extents(raw: &LocalFile) -> Result<IntervalMap> {
    const CHUNK: usize = 4 << 20;
    let size = raw.size();
    let bar = progress::bytes(size, "scan");
    let mut map = IntervalMap::new();
    let mut buf = vec![0u8; CHUNK];
    let mut run_start: Option<u64> = None;
    let mut position = 0u64;
    while position < size {
        let n = (size - position).min(CHUNK as u64) as usize;
        raw.read_exact_at(&mut buf[..n], position)
            .with_context(|| raw.name().to_string())?;
        for (i, sector) in buf[..n].chunks_exact(SECTOR as usize).enumerate() {
            let here = position / SECTOR + i as u64;
            let zero = sector.iter().all(|&b| b == 0);
            match (zero, run_start) {
                (false, None) => run_start = Some(here),
                (true, Some(start)) => {
                    insert_run(&mut map, start, here);
                    run_start = None;
                }
                _ => {}
            }
        }
        position += n as u64;
        bar.inc(n as u64);
    }
    if let Some(start) = run_start {
        insert_run(&mut map, start, size / SECTOR);
    }
    bar.finish_and_clear();
    Ok(map)
}

fn insert_run(map: &mut IntervalMap, start: u64, end: u64) {
    map.insert(
        start,
        Extent {
            length: end - start,
            moffset: start,
            zeroed: false,
            layer: 0,
        },
    );
}
