//! `obd snapshot`: a live snapshot of a served ublk device.

use std::path::PathBuf;

use anyhow::{bail, Result};
use ublk_target::state::DeviceRecord;

use super::ublk::check_dev_id;
use crate::snapshot_socket::{self, Answer, Request};

/// Snapshot a running device: its writable layer becomes a read-only
/// layer of the image and writes go on to a fresh one, without detaching
/// the device or losing a write.
///
/// The daemon serving /dev/ublkbN pauses new requests, lets those in
/// flight end, flushes the writable layer, creates the new one (a child
/// of it, same size and kind) and rewrites the image config: the old
/// upper's files are appended to `lowers` (as `{"data", "index"}`, obd's
/// extension) and `upper` names the new files. The old files are not
/// written again; `obd commit DATA INDEX OUT` makes a committed layer of
/// them at any time (then name OUT in `lowers` instead). For a stopped
/// device, use `obd commit` and edit the config yourself.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  obd snapshot -n 0\n      (upper.data + upper.index -> upper-1.data + upper-1.index)\n  obd snapshot -n 0 --data /var/lib/vm/disk.2.data --index /var/lib/vm/disk.2.index\n  obd commit /var/lib/vm/upper.data /var/lib/vm/upper.index /var/lib/vm/layer1.lsmt"
)]
pub struct Args {
    /// Device number N of /dev/ublkbN.
    #[arg(short = 'n', long = "number", allow_negative_numbers = true)]
    number: i64,
    /// The new writable layer's data file (default: the current one's name,
    /// numbered: upper.data -> upper-1.data).
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,
    /// The new writable layer's index file (only with --data, and only when
    /// the current layer has one).
    #[arg(long, value_name = "PATH")]
    index: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let id = check_dev_id(args.number)?;
    let Some(record) = DeviceRecord::load(id) else {
        bail!("/dev/ublkb{id} is not a device obd serves (no record of it: see `obd list`)");
    };
    if !record.writable {
        bail!(
            "/dev/ublkb{id} is read-only (its image {} has no writable layer): nothing to snapshot",
            record.config.display()
        );
    }
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let request = Request {
        data: args.data.map(absolute),
        index: args.index.map(absolute),
    };
    match snapshot_socket::request(id, &request)? {
        Answer::Done {
            frozen,
            upper,
            config,
        } => {
            let files = |f: &snapshot_socket::LayerFiles| match &f.index {
                Some(index) => format!("{} + {}", f.data.display(), index.display()),
                None => f.data.display().to_string(),
            };
            println!(
                "/dev/ublkb{id}: {} is now a read-only layer",
                files(&frozen)
            );
            println!("writes go to {}", files(&upper));
            println!("{} updated", config.display());
            Ok(())
        }
        Answer::Failed(reason) => bail!("/dev/ublkb{id}: snapshot failed: {reason}"),
    }
}
