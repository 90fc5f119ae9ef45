//! `obd del`: remove ublk devices.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ublk_target::device::{delete, kernel_devices, kernel_state};
use ublk_target::state::DeviceRecord;

use super::ublk::check_dev_id;

/// Remove ublk devices and stop their daemons.
///
/// The device goes away at once (unmount its filesystem first); then this
/// waits for the daemon to exit, so the writable layer's files are closed
/// and complete when it returns (ready for `obd commit`).
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  obd del -n 0\n  obd del --all")]
pub struct Args {
    /// Device number N of /dev/ublkbN.
    #[arg(
        short = 'n',
        long = "number",
        allow_negative_numbers = true,
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    number: Option<i64>,
    /// Every ublk device on this machine.
    #[arg(long)]
    all: bool,
}

pub fn run(args: Args) -> Result<()> {
    let ids = match args.number {
        Some(n) => vec![check_dev_id(n)?],
        None => {
            let mut ids = kernel_devices();
            ids.extend(DeviceRecord::all().iter().map(|r| r.dev_id));
            ids.sort_unstable();
            ids.dedup();
            ids
        }
    };
    let mut failed = 0;
    for id in ids {
        if let Err(e) = delete_one(id) {
            eprintln!("obd: {e:#}");
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} device(s) could not be removed");
    }
    Ok(())
}

fn delete_one(id: u32) -> Result<()> {
    let record = DeviceRecord::load(id);
    if kernel_state(id).is_some() {
        delete(id).map_err(anyhow::Error::msg)?;
    } else if record.is_none() {
        bail!("there is no ublk device {id}");
    }
    if let Some(record) = record {
        // Up to 30 s, counted in sleeps as well as by the clock: a VM's
        // clock can jump (qemu TCG on a busy host), which must not cut the
        // wait short.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut waits = 0;
        while record.daemon_alive() && (waits < 1500 || Instant::now() < deadline) {
            std::thread::sleep(Duration::from_millis(20));
            waits += 1;
        }
        if record.daemon_alive() {
            bail!(
                "device {id} is gone but its daemon (process {}) has not exited",
                record.pid
            );
        }
        DeviceRecord::remove(id)?;
    }
    Ok(())
}
