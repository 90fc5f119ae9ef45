//! The one call a daemon makes when it opens an image with a
//! `recordTracePath`: look at the file and record, replay, or do nothing.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn open(stack: Arc<overlaybd::stack::Stack>, config: &overlaybd::config::ImageConfig,
//! #         global: &overlaybd::config::GlobalConfig) -> overlaybd::Result<()> {
//! let session = trace_tools::Session::start_for_image(&stack, config, global)?;
//! // ... serve the device; dropping `session` on close finishes a recording
//! // (writes the trace, removes .lock, creates .ok) or stops a replay.
//! # drop(session); Ok(()) }
//! ```

use std::path::Path;
use std::sync::Arc;

use overlaybd::config::{GlobalConfig, ImageConfig};
use overlaybd::stack::Stack;
use overlaybd::trace::TraceFile;
use overlaybd::{Error, Result};

use crate::recorder::{Recorder, LOCK_POLL};
use crate::replay::{Job, ReplayHandle, ReplayOptions};
use crate::Warn;

/// Trace files larger than this are refused rather than read into memory
/// (about 44 million records).
pub const MAX_TRACE_FILE: u64 = 1 << 30;

/// What an open image does with its trace file. Keep it as long as the
/// device is open; drop it on close.
pub enum Session {
    /// No trace file configured (or it does not exist).
    Idle,
    Recording(Recorder),
    Replaying(ReplayHandle),
}

impl Session {
    /// Decide from `config.record_trace_path` (or the acceleration
    /// layer's trace, which is only replayed) with
    /// `global.prefetch_config.concurrency` replay workers; warnings go to
    /// stderr.
    pub fn start_for_image(
        stack: &Arc<Stack>,
        config: &ImageConfig,
        global: &GlobalConfig,
    ) -> Result<Session> {
        Self::start_for_image_warning(stack, config, global, crate::warn_to_stderr())
    }

    /// [`Session::start_for_image`], with warnings to `warn`.
    pub fn start_for_image_warning(
        stack: &Arc<Stack>,
        config: &ImageConfig,
        global: &GlobalConfig,
        warn: Warn,
    ) -> Result<Session> {
        let concurrency = global.prefetch_config.concurrency as usize;
        // An image with an acceleration layer replays the trace in it; it
        // is never recorded into, so a missing or empty one is no trace
        // (said once, as the image is served without prefetch).
        if let Some(trace) = config.acceleration_trace() {
            return match std::fs::metadata(&trace) {
                Ok(meta) if meta.len() > 0 => Session::start(stack, &trace, concurrency, warn),
                Ok(_) => {
                    warn(&format!(
                        "{}: the acceleration layer's trace is empty; nothing to prefetch",
                        trace.display()
                    ));
                    Ok(Session::Idle)
                }
                Err(e) => {
                    warn(&format!(
                        "{}: the acceleration layer has no trace ({e}); nothing to prefetch",
                        trace.display()
                    ));
                    Ok(Session::Idle)
                }
            };
        }
        match &config.record_trace_path {
            None => Ok(Session::Idle),
            Some(path) => Session::start(stack, path, concurrency, warn),
        }
    }

    /// Record into `trace` if it is empty, replay it (in the background)
    /// otherwise. A missing file is a warning and no trace.
    pub fn start(
        stack: &Arc<Stack>,
        trace: &Path,
        concurrency: usize,
        warn: Warn,
    ) -> Result<Session> {
        let name = trace.display().to_string();
        let size = match std::fs::metadata(trace) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                warn(&format!("{name}: trace file does not exist; not recording"));
                return Ok(Session::Idle);
            }
            Err(e) => return Err(Error::io(name, e)),
        };
        if size > MAX_TRACE_FILE {
            return Err(Error::Invalid(format!(
                "{name}: trace file is {size} bytes, more than the {MAX_TRACE_FILE} accepted"
            )));
        }
        let bytes = std::fs::read(trace).map_err(|e| Error::io(&name, e))?;
        let job = match TraceFile::detect(&bytes, &name)? {
            TraceFile::Empty => {
                return Recorder::start(stack, trace, LOCK_POLL, warn).map(Session::Recording)
            }
            TraceFile::Binary(records) => Job::Records(records),
            TraceFile::TextList(paths) => Job::Paths(paths),
        };
        let options = ReplayOptions {
            concurrency,
            warn,
            log: Arc::new(|message| eprintln!("obd: {message}")),
        };
        ReplayHandle::spawn(Arc::clone(stack), job, options).map(Session::Replaying)
    }
}
