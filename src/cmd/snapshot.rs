//! `obd snapshot`: a live snapshot of a served device (ublk, or
//! vhost-user-blk through `obd serve`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use ublk_target::state::DeviceRecord;

use super::ublk::check_dev_id;
use crate::snapshot_socket::{self, Answer, Ask, Request};

/// Snapshot a running device: its writable layer becomes a read-only
/// layer of the image and writes go on to a fresh one, without detaching
/// the device or losing a write.
///
/// Name the device by its number (-n N: /dev/ublkbN, from obd add) or, for
/// a VM disk served by `obd serve --vhost-user-blk SOCKET`, by that same
/// SOCKET (--vhost-user-blk SOCKET); the VM keeps running.
///
/// The daemon serving the device pauses new requests, lets those in
/// flight end, flushes the writable layer, creates the new one (a child
/// of it, same size and kind) and rewrites the image config: the old
/// upper's files are appended to `lowers` (as `{"data", "index"}`, obd's
/// extension) and `upper` names the new files. The old files are not
/// written again; `obd commit DATA INDEX OUT` makes a committed layer of
/// them at any time (then name OUT in `lowers` instead). For a stopped
/// device, use `obd commit` and edit the config yourself.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  obd snapshot -n 0\n      (upper.data + upper.index -> upper-1.data + upper-1.index)\n  obd snapshot -n 0 --data /var/lib/vm/disk.2.data --index /var/lib/vm/disk.2.index\n  obd snapshot --vhost-user-blk /run/obd/vm1.sock\n      (the VM disk of `obd serve --vhost-user-blk /run/obd/vm1.sock --config ...`)\n  obd commit /var/lib/vm/upper.data /var/lib/vm/upper.index /var/lib/vm/layer1.lsmt",
    group(clap::ArgGroup::new("device").required(true).args(["number", "vhost_user_blk"]))
)]
pub struct Args {
    /// Device number N of /dev/ublkbN.
    #[arg(short = 'n', long = "number", allow_negative_numbers = true)]
    number: Option<i64>,
    /// The vhost-user socket `obd serve --vhost-user-blk SOCKET` serves the
    /// VM disk on.
    #[arg(long = "vhost-user-blk", value_name = "SOCKET")]
    vhost_user_blk: Option<PathBuf>,
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
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let request = Ask::Snapshot(Request {
        data: args.data.map(absolute),
        index: args.index.map(absolute),
    });
    match (args.number, args.vhost_user_blk) {
        (Some(number), _) => ublk(number, &request),
        (None, Some(socket)) => vhost(&socket, &request),
        (None, None) => bail!("name the device: -n N or --vhost-user-blk SOCKET"),
    }
}

fn ublk(number: i64, request: &Ask) -> Result<()> {
    let id = check_dev_id(number)?;
    let Some(record) = DeviceRecord::load(id) else {
        bail!("/dev/ublkb{id} is not a device obd serves (no record of it: see `obd list`)");
    };
    if !record.writable {
        bail!(
            "/dev/ublkb{id} is read-only (its image {} has no writable layer): nothing to snapshot",
            record.config.display()
        );
    }
    let device = format!("/dev/ublkb{id}");
    let answer = snapshot_socket::request(
        &snapshot_socket::socket_path(id),
        &device,
        "obd add",
        request,
    )?;
    report(&device, answer)
}

fn vhost(socket: &Path, request: &Ask) -> Result<()> {
    let device = format!("the vhost-user-blk disk on {}", socket.display());
    if !socket.exists() {
        bail!(
            "{}: no such socket (give the SOCKET of `obd serve --vhost-user-blk SOCKET`)",
            socket.display()
        );
    }
    let answer = snapshot_socket::request(
        &snapshot_socket::vhost_socket_path(socket),
        &device,
        "obd serve --vhost-user-blk",
        request,
    )?;
    report(&device, answer)
}

fn report(device: &str, answer: Answer) -> Result<()> {
    match answer {
        Answer::Done {
            frozen,
            upper,
            config,
        } => {
            let files = |f: &snapshot_socket::LayerFiles| match &f.index {
                Some(index) => format!("{} + {}", f.data.display(), index.display()),
                None => f.data.display().to_string(),
            };
            println!("{device}: {} is now a read-only layer", files(&frozen));
            println!("writes go to {}", files(&upper));
            println!("{} updated", config.display());
            Ok(())
        }
        Answer::Failed(reason) => bail!("{device}: snapshot failed: {reason}"),
        Answer::Resized { .. } => bail!("{device}: the daemon answered another request"),
    }
}
