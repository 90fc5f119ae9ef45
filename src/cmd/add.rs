//! `obd add`: serve an image as a ublk block device, /dev/ublkbN.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Result;
use ublk_target::Start;

use super::ublk::{launch, queue_args, require_ublk, Global, LoadedConfig, Mode, QueueArgs};

/// Serve an image config as a new ublk block device (/dev/ublkbN).
///
/// A lower is read from its local file, or, for a registry lower (`dir`,
/// `digest` and `size` with no local copy), fetched on demand from
/// `repoBlobUrl/<digest>` through the global config's blob cache. A
/// `recordTracePath` that names an empty file records the lower-layer reads
/// into it (written, with `<path>.ok`, when the device is deleted); one
/// that names a trace replays it into the cache. A config with an `upper`
/// gets a writable device whose writes go to that layer. The device number
/// is printed once the device accepts I/O, and `success` or
/// `failed:<reason>` is written to the config's resultFile. One daemon
/// serves each device (in the background unless --foreground); it runs
/// until `obd del`. Needs root and the ublk_drv kernel module.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  obd add --config /var/lib/overlaybd/img/config.v1.json\n  obd add --config config.v1.json --queues 2 --depth 128\n  obd add --config config.v1.json --global-config /etc/overlaybd/overlaybd.json\n  obd add --config config.v1.json --foreground    # serve until the device is deleted\n\nSee also: obd list, obd del -n N, obd recover -n N"
)]
pub struct Args {
    /// The image config (config.v1.json).
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    queues: QueueArgs,
    /// Global config (cache, credentials, download, p2p, prefetch) for
    /// registry layers [default: /etc/overlaybd/overlaybd.json if it exists].
    #[arg(long, value_name = "PATH")]
    global_config: Option<PathBuf>,
    /// Serve from this process instead of a background daemon.
    #[arg(long)]
    foreground: bool,
    /// Run as the background daemon that `obd add` starts (internal).
    #[arg(long, hide = true)]
    daemon_child: bool,
}

pub fn run(args: Args) -> Result<()> {
    let (loaded, problem) = LoadedConfig::load(&args.config);
    if let Some(problem) = problem {
        return Err(loaded.fail(format!("cannot load the image config: {problem}")));
    }
    require_ublk(&loaded)?;
    let global = Global::load(&loaded, args.global_config.as_deref())?;
    let mut daemon_args: Vec<OsString> = vec!["add".into(), "--config".into()];
    daemon_args.push(loaded.path.clone().into());
    daemon_args.extend(queue_args(args.queues));
    if let Some(path) = &global.path {
        daemon_args.extend(["--global-config".into(), path.clone().into()]);
    }
    daemon_args.push("--daemon-child".into());
    launch(
        &loaded,
        args.queues,
        Start::Add,
        Mode::of(args.foreground, args.daemon_child),
        &global,
        daemon_args,
    )
}
