//! One small JSON record per served device, `<run dir>/ublk/<id>.json`, so
//! `obd list`, `obd del` and `obd recover` know which process serves which
//! device from which config. The kernel knows the device and its state; only
//! we know the image, so this is all the extra state kept. The run dir is
//! `/run/obd` (tmpfs: records vanish on reboot, as the devices do), or
//! `$OBD_RUN_DIR`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What is recorded about one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub dev_id: u32,
    /// The daemon serving it (replaced by `obd recover`).
    pub pid: i32,
    /// Absolute path of the image config.
    pub config: PathBuf,
    pub queues: u16,
    pub depth: u16,
    pub writable: bool,
    /// Size in bytes.
    pub size: u64,
    /// The global config (cache, credentials, p2p) the image was opened
    /// with, when one was given or found; `obd recover` reuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_config: Option<PathBuf>,
}

/// The directory holding the records.
pub fn dir() -> PathBuf {
    let base = std::env::var_os("OBD_RUN_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/obd"));
    base.join("ublk")
}

fn path_of(dir: &Path, dev_id: u32) -> PathBuf {
    dir.join(format!("{dev_id}.json"))
}

impl DeviceRecord {
    /// Write (or replace, atomically) the record.
    pub fn save(&self) -> io::Result<()> {
        let dir = dir();
        fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{}.json.tmp", self.dev_id));
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        fs::write(&tmp, text)?;
        fs::rename(&tmp, path_of(&dir, self.dev_id))
    }

    /// The record of device `dev_id`, if there is a readable one.
    pub fn load(dev_id: u32) -> Option<DeviceRecord> {
        let text = fs::read_to_string(path_of(&dir(), dev_id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Every readable record, by device id.
    pub fn all() -> Vec<DeviceRecord> {
        let mut out: Vec<DeviceRecord> = match fs::read_dir(dir()) {
            Ok(entries) => entries
                .flatten()
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    !name.starts_with('.') && name.ends_with(".json")
                })
                .filter_map(|e| fs::read_to_string(e.path()).ok())
                .filter_map(|t| serde_json::from_str(&t).ok())
                .collect(),
            Err(_) => Vec::new(),
        };
        out.sort_by_key(|r| r.dev_id);
        out
    }

    /// Remove the record of `dev_id` (no error when there is none).
    pub fn remove(dev_id: u32) -> io::Result<()> {
        match fs::remove_file(path_of(&dir(), dev_id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether the recorded daemon is still running.
    pub fn daemon_alive(&self) -> bool {
        pid_alive(self.pid)
    }
}

/// Whether process `pid` exists (and is not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Some(target) = rustix::process::Pid::from_raw(pid) else {
        return false;
    };
    // Signal 0 only checks that the process exists; EPERM says it does.
    let exists = match rustix::process::test_kill_process(target) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    };
    if !exists {
        return false;
    }
    // A zombie (killed, not yet reaped) no longer serves anything.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z"),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_pid_is_alive_and_nonsense_is_not() {
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(0));
        assert!(!pid_alive(-5));
    }
}
