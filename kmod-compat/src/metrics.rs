//! Counters of the disks `obd tcmu` serves, in Prometheus' text format
//! (`exporterConfig`: the daemon serves them over HTTP). Counting is a few
//! relaxed atomic adds per command; rendering walks the disks served now.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::scsi::{Command, GOOD};

/// What one disk has done.
#[derive(Default, Debug)]
pub struct DiskStats {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    /// Commands answered with anything but GOOD.
    pub errors: AtomicU64,
    /// Time spent on READ, WRITE, flush and discard commands, summed.
    pub busy_ns: AtomicU64,
}

impl DiskStats {
    /// Count one command (`block_size` turns its blocks into bytes).
    pub fn record(&self, command: Option<Command>, status: u8, block_size: u64, took: Duration) {
        let add = |counter: &AtomicU64, n: u64| {
            counter.fetch_add(n, Ordering::Relaxed);
        };
        if status != GOOD {
            add(&self.errors, 1);
        }
        let timed = match command {
            Some(Command::Read { blocks, .. }) => {
                add(&self.reads, 1);
                if status == GOOD {
                    add(&self.read_bytes, u64::from(blocks) * block_size);
                }
                true
            }
            Some(Command::Write { blocks, .. }) => {
                add(&self.writes, 1);
                if status == GOOD {
                    add(&self.write_bytes, u64::from(blocks) * block_size);
                }
                true
            }
            Some(Command::SyncCache) => {
                add(&self.flushes, 1);
                true
            }
            Some(Command::Unmap { .. } | Command::WriteSame { .. }) => {
                add(&self.discards, 1);
                true
            }
            _ => false,
        };
        if timed {
            add(
                &self.busy_ns,
                u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            );
        }
    }
}

/// The disks being served, each under its image config's path.
#[derive(Default)]
pub struct Metrics {
    disks: Mutex<BTreeMap<String, Arc<DiskStats>>>,
}

impl Metrics {
    fn disks(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<DiskStats>>> {
        self.disks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A disk starts being served.
    pub fn add(&self, config: &str, stats: Arc<DiskStats>) {
        self.disks().insert(config.to_string(), stats);
    }

    /// The disk is gone.
    pub fn remove(&self, config: &str) {
        self.disks().remove(config);
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let disks = self.disks();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP obd_tcmu_devices TCMU devices being served.\n\
             # TYPE obd_tcmu_devices gauge\nobd_tcmu_devices {}",
            disks.len()
        );
        type Field = fn(&DiskStats) -> &AtomicU64;
        let series: [(&str, &str, Field); 7] = [
            ("obd_device_reads_total", "READ commands.", |s| &s.reads),
            ("obd_device_read_bytes_total", "Bytes read.", |s| {
                &s.read_bytes
            }),
            ("obd_device_writes_total", "WRITE commands.", |s| &s.writes),
            ("obd_device_write_bytes_total", "Bytes written.", |s| {
                &s.write_bytes
            }),
            (
                "obd_device_flushes_total",
                "SYNCHRONIZE CACHE commands.",
                |s| &s.flushes,
            ),
            (
                "obd_device_discards_total",
                "UNMAP and WRITE SAME commands.",
                |s| &s.discards,
            ),
            (
                "obd_device_errors_total",
                "Commands answered with an error.",
                |s| &s.errors,
            ),
        ];
        for (name, help, field) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (config, stats) in disks.iter() {
                let value = field(stats).load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{config=\"{}\"}} {value}", escape(config));
            }
        }
        let name = "obd_device_busy_seconds_total";
        let _ = writeln!(
            out,
            "# HELP {name} Time spent on reads, writes, flushes and discards.\n# TYPE {name} counter"
        );
        for (config, stats) in disks.iter() {
            let seconds = stats.busy_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "{name}{{config=\"{}\"}} {seconds}", escape(config));
        }
        out
    }
}

/// A label value: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_per_disk() {
        let metrics = Metrics::default();
        let stats = Arc::new(DiskStats::default());
        let read = Command::Read { lba: 0, blocks: 8 };
        stats.record(Some(read), GOOD, 512, Duration::from_millis(2));
        stats.record(Some(read), 2, 512, Duration::from_millis(1));
        metrics.add("/img/a\"b.json", stats);
        let text = metrics.render();
        assert!(text.contains("obd_tcmu_devices 1\n"), "{text}");
        assert!(text.contains("obd_device_reads_total{config=\"/img/a\\\"b.json\"} 2\n"));
        assert!(text.contains("obd_device_read_bytes_total{config=\"/img/a\\\"b.json\"} 4096\n"));
        assert!(text.contains("obd_device_errors_total{config=\"/img/a\\\"b.json\"} 1\n"));
        assert!(text.contains("obd_device_busy_seconds_total{config=\"/img/a\\\"b.json\"} 0.003\n"));
        metrics.remove("/img/a\"b.json");
        assert!(metrics.render().contains("obd_tcmu_devices 0\n"));
    }
}
