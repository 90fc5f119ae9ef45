//! `obd recover`: serve a ublk device again after its daemon died.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Result};
use ublk_target::state::DeviceRecord;
use ublk_target::Start;

use super::ublk::{
    check_dev_id, launch, queue_args, require_ublk, Global, LoadedConfig, Mode, QueueArgs,
};

/// Bring back a device whose daemon died (killed, crashed).
///
/// The kernel keeps /dev/ublkbN and holds its I/O while no daemon serves
/// it; requests the dead daemon had taken are sent again to the new one,
/// so a filesystem mounted on the device sees a pause, not errors. The
/// image config and queue layout come from the device's record (written by
/// `obd add`) unless given here.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  obd recover -n 0\n  obd recover -n 3 --config /var/lib/overlaybd/img/config.v1.json --queues 2 --depth 128"
)]
pub struct Args {
    /// Device number N of /dev/ublkbN.
    #[arg(short = 'n', long = "number", allow_negative_numbers = true)]
    number: i64,
    /// The image config (default: the one the device was added with).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Hardware queues (default: as added).
    #[arg(long)]
    queues: Option<u16>,
    /// Requests in flight per queue (default: as added).
    #[arg(long)]
    depth: Option<u16>,
    /// Global config for registry layers (default: the one the device was
    /// added with, else /etc/overlaybd/overlaybd.json if it exists).
    #[arg(long, value_name = "PATH")]
    global_config: Option<PathBuf>,
    /// Serve from this process instead of a background daemon.
    #[arg(long)]
    foreground: bool,
    /// Run as the background daemon that `obd recover` starts (internal).
    #[arg(long, hide = true)]
    daemon_child: bool,
}

pub fn run(args: Args) -> Result<()> {
    let id = check_dev_id(args.number)?;
    let record = DeviceRecord::load(id);
    if let Some(r) = &record {
        if r.daemon_alive() {
            bail!(
                "device {id} is still served by process {}; nothing to recover",
                r.pid
            );
        }
    }
    let Some(config) = args
        .config
        .clone()
        .or(record.as_ref().map(|r| r.config.clone()))
    else {
        bail!("there is no record of device {id}; name its image config with --config");
    };
    let (loaded, problem) = LoadedConfig::load(&config);
    if let Some(problem) = problem {
        return Err(loaded.fail(format!("cannot load the image config: {problem}")));
    }
    require_ublk(&loaded)?;
    let global_path = args
        .global_config
        .clone()
        .or(record.as_ref().and_then(|r| r.global_config.clone()));
    let global = Global::load(&loaded, global_path.as_deref())?;
    let queues = QueueArgs {
        queues: args
            .queues
            .or(record.as_ref().map(|r| r.queues))
            .unwrap_or(1),
        depth: args
            .depth
            .or(record.as_ref().map(|r| r.depth))
            .unwrap_or(64),
    };
    let mut daemon_args: Vec<OsString> = vec![
        "recover".into(),
        "-n".into(),
        id.to_string().into(),
        "--config".into(),
        loaded.path.clone().into(),
    ];
    daemon_args.extend(queue_args(queues));
    if let Some(path) = &global.path {
        daemon_args.extend(["--global-config".into(), path.clone().into()]);
    }
    daemon_args.push("--daemon-child".into());
    launch(
        &loaded,
        queues,
        Start::Recover(id),
        Mode::of(args.foreground, args.daemon_child),
        &global,
        daemon_args,
    )
}
