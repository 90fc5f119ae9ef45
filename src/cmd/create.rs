//! `obd create`: a new, empty writable layer.

use std::path::PathBuf;

use anyhow::{bail, Result};
use overlaybd::lsmt::{CreateOptions, WritableLayer};

/// Create an empty writable layer (like overlaybd-create).
///
/// A normal writable layer is two files, DATA (appended data) and INDEX (one
/// entry per write). With -s the layer is one sparse DATA file holding the
/// whole virtual disk; no INDEX is made.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  obd create upper.data upper.index 64\n  obd create -s upper.sparse 64\n  obd create upper.data upper.index 64 -u 00000001-0000-4000-8000-000000000001"
)]
pub struct Args {
    /// Make a sparse writable layer (one file, no index).
    #[arg(short = 's', long)]
    sparse: bool,
    /// UUID of the parent layer, stored in the header.
    #[arg(short = 'u', long = "parent-uuid", value_name = "PARENT_UUID")]
    parent_uuid: Option<String>,
    /// DATA [INDEX] VSIZE_GB: files to create and the virtual size in GiB
    /// (0: the size of the layers it is stacked on, set when first served).
    #[arg(value_name = "DATA [INDEX] VSIZE_GB", num_args = 2..=3, required = true)]
    args: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let (data, index, size) = match (args.sparse, args.args.as_slice()) {
        (true, [data, size]) => (PathBuf::from(data), None, size),
        (true, [data, _index, size]) => {
            eprintln!("obd: a sparse layer has no index file; INDEX is not created");
            (PathBuf::from(data), None, size)
        }
        (false, [data, index, size]) => (PathBuf::from(data), Some(PathBuf::from(index)), size),
        (false, _) => {
            bail!("usage: obd create DATA INDEX VSIZE_GB (or obd create -s DATA VSIZE_GB)")
        }
        _ => unreachable!("clap allows 2 or 3 arguments"),
    };
    // 0: the size of the layers it is stacked on, taken when it is first
    // served (the snapshotter creates a container's writable layer so).
    let gib: u64 = size
        .parse()
        .ok()
        .ok_or_else(|| anyhow::anyhow!("VSIZE_GB must be a whole number of GiB, not '{size}'"))?;
    let virtual_size = gib
        .checked_mul(1 << 30)
        .ok_or_else(|| anyhow::anyhow!("{gib} GiB is too large"))?;
    let layer = WritableLayer::create(
        &data,
        index.as_deref(),
        &CreateOptions {
            virtual_size,
            parent_uuid: args.parent_uuid,
            sparse: args.sparse,
        },
    )?;
    layer.flush()?;
    Ok(())
}
