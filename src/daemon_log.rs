//! The daemons' log (`logConfig` of the global config): when `logPath` is
//! set, everything the process writes to stderr goes, line by line, with a
//! timestamp, into that file, which is rotated at `logSizeMB` keeping
//! `logRotateNum` old files (`PATH.1` newest … `PATH.N` oldest), as the
//! reference's overlaybd-tcmu does. `logLevel` (0 debug, 1 info, 2 warning,
//! 3 error) drops lines below it; a line is a warning when it says
//! "warning", an error when it says "error", "failed" or "cannot", else info.
//!
//! The audit log (`enableAudit`, `auditPath`) is a second file, rotated
//! the same way at the reference's fixed 10 MiB and 3 old files, written by
//! [`overlaybd::audit`].
//!
//! Redirecting stderr (not a logging framework) keeps every message of
//! every crate, including a panic's, in the one log, with no call site to
//! change.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use overlaybd::config::{GlobalConfig, LogConfig};

/// Send stderr to the log file `config` names, if it names one; a thread
/// writes it. Returns whether it did.
pub fn start(config: &LogConfig) -> Result<bool> {
    let Some(path) = config.log_path.clone() else {
        return Ok(false);
    };
    let mut log = RotatingLog::open(
        path.clone(),
        config.log_size_mb.max(1) << 20,
        config.log_rotate_num,
    )
    .with_context(|| format!("logConfig.logPath {}", path.display()))?;
    let (read_end, write_end) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("a pipe for the log")?;
    rustix::stdio::dup2_stderr(&write_end).context("redirecting stderr to the log")?;
    drop(write_end);
    let min_level = config.log_level;
    std::thread::Builder::new()
        .name("obd-log".into())
        .spawn(move || {
            for line in BufReader::new(File::from(read_end)).lines() {
                let Ok(line) = line else { break };
                let level = level_of(&line);
                if level >= min_level {
                    // Nowhere left to report a failing log write.
                    let _ = log.write_line(&format!(
                        "{} {} {line}",
                        timestamp(),
                        LEVELS[level as usize]
                    ));
                }
            }
        })
        .context("starting the log thread")?;
    Ok(true)
}

/// What every daemon that loads a global config says at start, once its
/// log is set up: each key it reads but does not act on.
pub fn name_ignored_keys(who: &str, global: &GlobalConfig) {
    for key in global.ignored_keys() {
        eprintln!("{who}: warning: not implemented, ignored: {key}");
    }
}

/// The audit file's size limit and old files kept (fixed, as the
/// reference's).
const AUDIT_SIZE: u64 = 10 << 20;
const AUDIT_FILES: u32 = 3;

/// Open the audit log (`enableAudit`, `auditPath`) and send
/// [`overlaybd::audit`]'s events to it. An empty `auditPath` is a warning
/// and no audit, as in the reference; a path that cannot be opened fails
/// the start, as a bad `logPath` does.
pub fn start_audit(who: &str, global: &GlobalConfig) -> Result<()> {
    if !global.enable_audit {
        return Ok(());
    }
    let Some(path) = global.audit_path.clone() else {
        eprintln!("{who}: warning: enableAudit is set but auditPath is empty: no audit log");
        return Ok(());
    };
    let mut log = RotatingLog::open(path.clone(), AUDIT_SIZE, AUDIT_FILES)
        .with_context(|| format!("auditPath {}", path.display()))?;
    overlaybd::audit::install(Box::new(move |line| {
        // Nowhere to report a failing audit write but the log, per event.
        let _ = log.write_line(line);
    }));
    eprintln!("{who}: audit log {} (enableAudit)", path.display());
    Ok(())
}

const LEVELS: [&str; 4] = ["DEBUG", "INFO", "WARN", "ERROR"];

/// 1 info, 2 warning, 3 error, from the words of the line.
fn level_of(line: &str) -> u32 {
    let lower = line.to_ascii_lowercase();
    if lower.contains("error") || lower.contains("failed") || lower.contains("cannot") {
        3
    } else if lower.contains("warning") {
        2
    } else {
        1
    }
}

/// Seconds since the epoch with milliseconds (no time zone to get wrong).
fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", now.as_secs(), now.subsec_millis())
}

/// A log file that is renamed to `PATH.1` (and older ones along) when it
/// would pass `limit` bytes.
pub struct RotatingLog {
    path: PathBuf,
    limit: u64,
    keep: u32,
    file: File,
    size: u64,
}

impl RotatingLog {
    pub fn open(path: PathBuf, limit: u64, keep: u32) -> std::io::Result<RotatingLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = append(&path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path,
            limit,
            keep,
            file,
            size,
        })
    }

    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.limit {
            self.rotate()?;
        }
        // One write per line: processes appending to one file (daemons
        // sharing an auditPath) never split each other's lines.
        self.file.write_all(format!("{line}\n").as_bytes())?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let numbered = |n: u32| -> PathBuf {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{n}"));
            name.into()
        };
        if self.keep == 0 {
            self.file.set_len(0)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for n in (1..self.keep).rev() {
                let _ = std::fs::rename(numbered(n), numbered(n + 1));
            }
            std::fs::rename(&self.path, numbered(1))?;
            self.file = append(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }
}

fn append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_the_limit_and_keeps_n_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("obd.log");
        let mut log = RotatingLog::open(path.clone(), 1000, 2).unwrap();
        for i in 0..100 {
            log.write_line(&format!("line {i:04} {}", "x".repeat(40)))
                .unwrap();
        }
        let sizes: Vec<u64> = ["obd.log", "obd.log.1", "obd.log.2"]
            .iter()
            .map(|n| std::fs::metadata(dir.path().join(n)).unwrap().len())
            .collect();
        assert!(sizes.iter().all(|&s| s > 0 && s <= 1000), "{sizes:?}");
        assert!(!dir.path().join("obd.log.3").exists());
        let newest = std::fs::read_to_string(&path).unwrap();
        assert!(newest.ends_with(&format!("line 0099 {}\n", "x".repeat(40))));
        let older = std::fs::read_to_string(dir.path().join("obd.log.1")).unwrap();
        let first_new: u32 = newest[5..9].parse().unwrap();
        let last_old: u32 = older.lines().last().unwrap()[5..9].parse().unwrap();
        assert_eq!(last_old + 1, first_new, "no line lost at a rotation");
    }

    #[test]
    fn levels_from_the_words() {
        assert_eq!(level_of("obd tcmu: sdb: serving 1024 bytes"), 1);
        assert_eq!(level_of("obd: warning: trace not started"), 2);
        assert_eq!(level_of("obd: cannot record device 3"), 3);
    }
}
