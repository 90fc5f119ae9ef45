//! `obd list`: the ublk devices, their state and image.

use anyhow::Result;
use serde::Serialize;
use ublk_target::device::{kernel_devices, kernel_state, state_name};
use ublk_target::state::DeviceRecord;

/// List ublk devices: number, state, serving daemon and image config.
///
/// STATE is the kernel's: live (served), quiesced (its daemon died: I/O
/// waits for `obd recover`), dead (being removed). Devices obd did not
/// create show no image.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  obd list\n  obd list --json")]
pub struct Args {
    /// One JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    dev_id: u32,
    device: String,
    state: String,
    pid: Option<i32>,
    daemon_alive: bool,
    config: Option<String>,
    writable: Option<bool>,
    size: Option<u64>,
    queues: Option<u16>,
    depth: Option<u16>,
}

pub fn run(args: Args) -> Result<()> {
    let ublk = ublk_target::probe::check().is_ok();
    let mut ids = kernel_devices();
    let records = DeviceRecord::all();
    for r in &records {
        if !ids.contains(&r.dev_id) {
            if ublk {
                // The kernel has no such device any more: a leftover record.
                let _ = DeviceRecord::remove(r.dev_id);
            } else {
                ids.push(r.dev_id);
            }
        }
    }
    ids.sort_unstable();
    let rows: Vec<Row> = ids
        .into_iter()
        .map(|id| {
            let record = records.iter().find(|r| r.dev_id == id);
            Row {
                dev_id: id,
                device: format!("/dev/ublkb{id}"),
                state: kernel_state(id).map_or("unknown", state_name).to_string(),
                pid: record.map(|r| r.pid),
                daemon_alive: record.is_some_and(DeviceRecord::daemon_alive),
                config: record.map(|r| r.config.display().to_string()),
                writable: record.map(|r| r.writable),
                size: record.map(|r| r.size),
                queues: record.map(|r| r.queues),
                depth: record.map(|r| r.depth),
            }
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        return Ok(());
    }
    println!(
        "{:<4} {:<14} {:<9} {:<12} {:<3} IMAGE",
        "ID", "DEVICE", "STATE", "DAEMON", "RW"
    );
    for r in rows {
        let daemon = match (r.pid, r.daemon_alive) {
            (Some(pid), true) => pid.to_string(),
            (Some(_), false) => "dead".to_string(),
            (None, _) => "-".to_string(),
        };
        let rw = match r.writable {
            Some(true) => "rw",
            Some(false) => "ro",
            None => "-",
        };
        println!(
            "{:<4} {:<14} {:<9} {:<12} {:<3} {}",
            r.dev_id,
            r.device,
            r.state,
            daemon,
            rw,
            r.config.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}
