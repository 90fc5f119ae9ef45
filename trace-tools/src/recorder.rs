//! Recording the lower-layer reads an image serves, daemon side, into the
//! overlaybd trace format — no eBPF needed.
//!
//! The recorder is a read observer on the [`Stack`]: every plan piece that
//! comes from a lower layer becomes a record (layer index, offset and length
//! in the layer file), exactly what replay reads back. It follows the
//! reference's handshake: `<trace>.lock` exists while recording; deleting it
//! (noticed within one poll interval) or closing the image (dropping the
//! [`Recorder`]) writes the records, removes the lock and creates
//! `<trace>.ok`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use overlaybd::stack::{PieceSource, PlanPiece, Stack};
use overlaybd::trace::{self, Op, TraceRecord};
use overlaybd::{Error, Result};

use crate::Warn;

/// Records kept at most (24 bytes each: 96 MiB); later reads are dropped
/// with a warning, the trace stays valid.
pub const MAX_RECORDS: usize = 1 << 22;

/// How often the lock file is checked by default (the reference's second).
pub const LOCK_POLL: Duration = Duration::from_secs(1);

struct Shared {
    trace: PathBuf,
    lowers: usize,
    recording: AtomicBool,
    records: Mutex<Vec<TraceRecord>>,
    dropped: Mutex<u64>,
    /// Set once the trace is written (or failed to be); wakes the watcher.
    finished: Mutex<Option<std::result::Result<usize, String>>>,
    wake: Condvar,
    warn: Warn,
}

/// An active recording; see the module docs. Dropping it finishes it.
pub struct Recorder {
    shared: Arc<Shared>,
    watcher: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Start recording `stack`'s lower-layer reads into `trace` (which the
    /// caller found empty): create the lock file, observe the stack, and
    /// check for the lock's removal every `poll`.
    pub fn start(stack: &Stack, trace: &Path, poll: Duration, warn: Warn) -> Result<Recorder> {
        let lock = trace::lock_path(trace);
        std::fs::File::create(&lock).map_err(|e| Error::io(lock.display().to_string(), e))?;
        // A stale .ok from an earlier run would tell a watcher we are done.
        let _ = std::fs::remove_file(trace::ok_path(trace));
        let shared = Arc::new(Shared {
            trace: trace.to_path_buf(),
            lowers: stack.lowers().len(),
            recording: AtomicBool::new(true),
            records: Mutex::new(Vec::new()),
            dropped: Mutex::new(0),
            finished: Mutex::new(None),
            wake: Condvar::new(),
            warn,
        });
        let observer = Arc::clone(&shared);
        if let Err(e) = stack.set_read_observer(Arc::new(move |pieces| observer.observe(pieces))) {
            let _ = std::fs::remove_file(&lock);
            return Err(e);
        }
        let watched = Arc::clone(&shared);
        let watcher = std::thread::Builder::new()
            .name("obd-trace-lock".into())
            .spawn(move || watched.watch_lock(poll))
            .map_err(|e| Error::io("spawning the trace lock watcher", e))?;
        Ok(Recorder {
            shared,
            watcher: Some(watcher),
        })
    }

    /// Still recording (the lock exists and the image is open)?
    pub fn is_recording(&self) -> bool {
        self.shared.recording.load(Ordering::Relaxed)
    }

    /// Stop now: write the trace, remove the lock, create the `.ok` file.
    /// Returns the number of records written; calling it again returns the
    /// first outcome.
    pub fn finish(&self) -> Result<usize> {
        self.shared.finish()
    }

    /// Records so far (for tests and status).
    pub fn records(&self) -> Vec<TraceRecord> {
        self.shared
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn trace_path(&self) -> &Path {
        &self.shared.trace
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Err(e) = self.shared.finish() {
            (self.shared.warn)(&format!("trace recording: {e}"));
        }
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
    }
}

impl Shared {
    fn observe(&self, pieces: &[PlanPiece]) {
        if !self.recording.load(Ordering::Relaxed) {
            return;
        }
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        for piece in pieces {
            let PieceSource::Layer { layer, position } = piece.source else {
                continue;
            };
            if layer >= self.lowers {
                continue; // the writable top: not part of the image
            }
            if records.len() >= MAX_RECORDS {
                *self.dropped.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                continue;
            }
            records.push(TraceRecord {
                op: Op::Read,
                layer_index: layer as u32,
                count: piece.length,
                offset: position as i64,
            });
        }
    }

    fn watch_lock(&self, poll: Duration) {
        let lock = trace::lock_path(&self.trace);
        let mut finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        while finished.is_none() {
            finished = self
                .wake
                .wait_timeout(finished, poll)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if finished.is_none() && !lock.exists() {
                drop(finished);
                if let Err(e) = self.finish() {
                    (self.warn)(&format!("trace recording: {e}"));
                }
                return;
            }
        }
    }

    fn finish(&self) -> Result<usize> {
        let mut finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(outcome) = finished.as_ref() {
            return outcome.clone().map_err(Error::Invalid);
        }
        self.recording.store(false, Ordering::Relaxed);
        let records = std::mem::take(&mut *self.records.lock().unwrap_or_else(|p| p.into_inner()));
        let dropped = *self.dropped.lock().unwrap_or_else(|p| p.into_inner());
        if dropped > 0 {
            (self.warn)(&format!(
                "{}: kept the first {MAX_RECORDS} reads, dropped {dropped}",
                self.trace.display()
            ));
        }
        let outcome = self.write(&records).map(|()| records.len());
        *finished = Some(outcome.as_ref().map(|n| *n).map_err(|e| e.to_string()));
        self.wake.notify_all();
        outcome
    }

    fn write(&self, records: &[TraceRecord]) -> Result<()> {
        let named = |path: &Path| path.display().to_string();
        let mut tmp = self.trace.as_os_str().to_owned();
        tmp.push(".writing");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, trace::encode(records)).map_err(|e| Error::io(named(&tmp), e))?;
        std::fs::rename(&tmp, &self.trace).map_err(|e| Error::io(named(&self.trace), e))?;
        let lock = trace::lock_path(&self.trace);
        match std::fs::remove_file(&lock) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(named(&lock), e))
            }
            _ => {}
        }
        let ok = trace::ok_path(&self.trace);
        std::fs::File::create(&ok).map_err(|e| Error::io(named(&ok), e))?;
        Ok(())
    }
}
