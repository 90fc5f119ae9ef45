//! The audit log (`enableAudit`, `auditPath` of the global config): one line
//! per registry range fetched (`download`), per background download chunk
//! (`bk_download`), per local layer read slower than [`SLOW_LOCAL_READ`]
//! (`file:pread`) and per blob evicted from the cache (`eviction`), the
//! events the reference's overlaybd-tcmu audits. Each line reads
//!
//! ```text
//! 1764462300.123456 download file=http://host/v2/repo/blobs/sha256:… offset=0 size=4096 latency_us=812 result=ok
//! ```
//!
//! (seconds since the epoch with microseconds, then `result=error: …` when
//! the operation failed). `download` names every ranged GET of a registry
//! blob, whoever asked for it, so a `bk_download` chunk also shows as the
//! `download` of the same range.
//!
//! The sink is process-wide, installed once by the daemon that opened the
//! audit file; until then every hook costs one relaxed atomic load, so the
//! hot paths need no audit handle threaded through them.

use std::fmt::Display;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Local layer reads that take at least this long are audited (the
/// reference's threshold).
pub const SLOW_LOCAL_READ: Duration = Duration::from_millis(10);

/// Where audit lines go: called with each line, without its newline.
pub type Sink = Box<dyn FnMut(&str) + Send>;

static ON: AtomicBool = AtomicBool::new(false);
static SINK: Mutex<Option<Sink>> = Mutex::new(None);

/// Send audit lines to `sink` from now on (replacing any earlier sink).
pub fn install(sink: Sink) {
    *SINK.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    ON.store(true, Ordering::Relaxed);
}

/// Whether audit lines are written: the one check on the hot paths.
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// When an audited operation started, if auditing is on (no clock read
/// otherwise).
#[inline]
pub fn start() -> Option<Instant> {
    enabled().then(Instant::now)
}

/// Audit `event` on `len` bytes at `offset` of `file`, started at
/// `started` (from [`start`]; nothing when it is `None`), with its outcome.
pub fn record<T, E: Display>(
    started: Option<Instant>,
    event: &str,
    file: &str,
    offset: u64,
    len: u64,
    result: &Result<T, E>,
) {
    let Some(started) = started else { return };
    write(&line(
        SystemTime::now(),
        event,
        file,
        offset,
        len,
        started.elapsed(),
        result.as_ref().err().map(|e| e as &dyn Display),
    ));
}

/// A read of a local file (`file`, or a raw descriptor) that took at
/// least [`SLOW_LOCAL_READ`] as `file:pread`; the file is named from its
/// descriptor only then.
pub fn slow_file_read<T, E: Display>(
    started: Option<Instant>,
    file: &impl AsRawFd,
    offset: u64,
    len: u64,
    result: &Result<T, E>,
) {
    let Some(at) = started else { return };
    if at.elapsed() < SLOW_LOCAL_READ {
        return;
    }
    let fd = file.as_raw_fd();
    let name = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| format!("fd {fd}"));
    record(started, "file:pread", &name, offset, len, result);
}

fn write(line: &str) {
    let mut sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(sink) = sink.as_mut() {
        sink(line);
    }
}

/// One audit line (see the module doc).
pub fn line(
    now: SystemTime,
    event: &str,
    file: &str,
    offset: u64,
    len: u64,
    latency: Duration,
    error: Option<&dyn Display>,
) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let result = match error {
        None => "ok".to_string(),
        // One line per event, whatever the message holds.
        Some(e) => format!("error: {}", e.to_string().replace('\n', " ")),
    };
    format!(
        "{}.{:06} {event} file={file} offset={offset} size={len} latency_us={} result={result}",
        since.as_secs(),
        since.subsec_micros(),
        latency.as_micros()
    )
}

/// For tests: install (once per process) a sink that keeps every line, and
/// return the lines. Tests running at the same time share it, so each
/// looks for its own file names.
#[cfg(test)]
pub(crate) fn capture() -> &'static Mutex<Vec<String>> {
    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        install(Box::new(|line| {
            LINES
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line.to_string())
        }))
    });
    &LINES
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn a_line_has_time_event_file_range_latency_and_result() {
        let at = UNIX_EPOCH + Duration::new(1_764_462_300, 123_456_789);
        let ok = line(
            at,
            "download",
            "http://r/v2/a/blobs/sha256:ab",
            4096,
            512,
            Duration::from_micros(812),
            None,
        );
        assert_eq!(
            ok,
            "1764462300.123456 download file=http://r/v2/a/blobs/sha256:ab \
             offset=4096 size=512 latency_us=812 result=ok"
        );
        let failed = line(
            at,
            "bk_download",
            "b",
            0,
            1,
            Duration::from_millis(3),
            Some(&"GET b: 503\nretry later"),
        );
        assert!(
            failed.ends_with("latency_us=3000 result=error: GET b: 503 retry later"),
            "{failed}"
        );
    }

    /// Only a read that took the threshold or more is audited, named by
    /// the file's path.
    #[test]
    fn only_slow_local_reads_are_audited_by_path() {
        let lines = capture();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slow-read-test.lsmt");
        std::fs::write(&path, [0u8; 100]).unwrap();
        let file = File::open(&path).unwrap();
        let ok: std::io::Result<()> = Ok(());
        slow_file_read(start(), &file, 0, 100, &ok);
        let long_ago = Instant::now().checked_sub(SLOW_LOCAL_READ).unwrap();
        slow_file_read(Some(long_ago), &file, 4096, 512, &ok);
        let lines = lines.lock().unwrap();
        let ours: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("slow-read-test"))
            .collect();
        assert_eq!(ours.len(), 1, "{ours:?}");
        let wanted = format!(" file:pread file={} offset=4096 size=512 ", path.display());
        assert!(ours[0].contains(&wanted), "{}", ours[0]);
    }

    /// Before a sink is installed nothing is timed or written (this test
    /// process installs none before: each test runs in its own process
    /// under nextest; under `cargo test` another test may have installed
    /// one, so the off case is only checked when none is); after, each
    /// started record is one line.
    #[test]
    fn nothing_until_a_sink_is_installed_then_one_line_per_event() {
        if !enabled() {
            assert!(start().is_none(), "auditing is off by default");
        }
        let lines = capture();
        let ours = || -> Vec<String> {
            let all = lines.lock().unwrap();
            all.iter()
                .filter(|l| l.contains("file=audit-test"))
                .cloned()
                .collect()
        };
        record::<(), String>(None, "download", "audit-test", 0, 1, &Ok(()));
        assert!(ours().is_empty(), "an event not started is not audited");
        let started = start();
        assert!(started.is_some());
        record::<(), String>(started, "download", "audit-test", 8, 16, &Ok(()));
        record::<(), _>(started, "eviction", "audit-test", 0, 99, &Err("disk gone"));
        let got = ours();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].contains(" download file=audit-test offset=8 size=16 "));
        assert!(got[0].ends_with("result=ok"));
        assert!(got[1].contains(" eviction file=audit-test offset=0 size=99 "));
        assert!(got[1].ends_with("result=error: disk gone"));
    }
}
