//! `obd add`: serve an image as a ublk block device, /dev/ublkbN.

use std::path::PathBuf;

use anyhow::{bail, Result};
use ublk_target::Start;

use super::ublk::{launch, open_image, require_ublk, LoadedConfig, QueueArgs};

/// Serve an image config as a new ublk block device (/dev/ublkbN).
///
/// The lower layers are read from local files; a config with an `upper`
/// gets a writable device whose writes go to that layer. The device number
/// is printed once the device accepts I/O, and `success` or
/// `failed:<reason>` is written to the config's resultFile. One daemon
/// serves each device (in the background unless --foreground); it runs
/// until `obd del`. Needs root and the ublk_drv kernel module.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  obd add --config /var/lib/overlaybd/img/config.v1.json\n  obd add --config config.v1.json --queues 2 --depth 128\n  obd add --config config.v1.json --foreground    # serve until the device is deleted\n\nSee also: obd list, obd del -n N, obd recover -n N"
)]
pub struct Args {
    /// The image config (config.v1.json).
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    queues: QueueArgs,
    /// Serve from this process instead of a background daemon.
    #[arg(long)]
    foreground: bool,
}

pub fn run(args: Args) -> Result<()> {
    let (loaded, problem) = LoadedConfig::load(&args.config);
    if let Some(problem) = problem {
        return Err(loaded.fail(format!("cannot load the image config: {problem}")));
    }
    require_ublk(&loaded)?;
    let stack = open_image(&loaded)?;
    if stack.virtual_size() % 512 != 0 {
        bail!(loaded.fail("the image size is not a multiple of 512 bytes"));
    }
    launch(&loaded, stack, args.queues, Start::Add, args.foreground)
}
