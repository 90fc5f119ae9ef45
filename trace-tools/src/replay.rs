//! Replaying a trace as prefetch: read what the image will need, through
//! its layers, so a remote layer's cache is warm before the reads come.
//!
//! Binary records name (layer, offset, count) in a layer file; a text list
//! names paths, resolved through the image's ext4 to device ranges and
//! mapped through the whole stack. Either way the reads become the stored
//! byte ranges behind them (a ZFile layer's compressed blocks, which are
//! cached as they are, never decoded here), merged where one continues the
//! one before it, and fetched by `concurrency` worker threads in the order
//! the workload read them. Local layers are read once, into the page
//! cache. A failed range is a warning, not the end of the replay: prefetch
//! is an optimisation.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use overlaybd::io::ReadAt;
use overlaybd::stack::{PieceSource, PlanPiece, Stack};
use overlaybd::storage::{Access, At, Fetch};
use overlaybd::trace::{PrefetchPath, TraceRecord};
use overlaybd::{Error, Result};

use crate::ext4::{Ext4, FileKind};
use crate::{StackSource, Warn};

/// Largest single prefetch read.
pub const MAX_READ: u64 = 1 << 20;

/// How to replay.
#[derive(Clone)]
pub struct ReplayOptions {
    /// Worker threads (`prefetchConfig.concurrency`); at least 1 is used.
    pub concurrency: usize,
    pub warn: Warn,
    /// Where the report of a background replay goes when it ends.
    pub log: Warn,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Stored ranges warmed (after merging), and their bytes as stored
    /// (compressed, for a ZFile layer).
    pub reads: u64,
    pub bytes: u64,
    /// Bytes fetched from the network (the rest was cached already).
    pub fetched: u64,
    /// Records skipped because their layer is not in the image.
    pub skipped_records: u64,
    /// Layer indexes the trace names that the image does not have.
    pub missing_layers: BTreeSet<u32>,
    /// Paths of a text list that could not be resolved.
    pub missing_paths: Vec<PathBuf>,
    /// Reads that failed (each also reported as a warning).
    pub failed_reads: u64,
    /// Stopped before the end.
    pub cancelled: bool,
}

/// One read of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// `len` bytes at `offset` of lower layer `layer`'s file.
    Layer { layer: usize, offset: u64, len: u64 },
    /// `len` bytes at `offset` of the image's virtual disk (512-aligned).
    Device { offset: u64, len: u64 },
}

/// The reads that replay `records` on `stack`: records of missing layers
/// are skipped (one warning naming them), each range is clipped to its
/// layer file and cut into ≤ [`MAX_READ`] pieces.
pub fn plan_records(
    stack: &Stack,
    records: &[TraceRecord],
    report: &mut ReplayReport,
    warn: &Warn,
) -> Vec<Read> {
    let lowers = stack.lowers();
    let mut reads = Vec::new();
    for record in records {
        let Some(layer) = lowers.get(record.layer_index as usize) else {
            report.skipped_records += 1;
            report.missing_layers.insert(record.layer_index);
            continue;
        };
        let size = layer.source().size();
        let start = record.offset.max(0) as u64;
        let end = start.saturating_add(record.count).min(size);
        split(start, end, |offset, len| {
            reads.push(Read::Layer {
                layer: record.layer_index as usize,
                offset,
                len,
            })
        });
    }
    if report.skipped_records > 0 {
        warn(&format!(
            "trace replay: skipped {} records of layers {:?}, which this image ({} layers) does not have",
            report.skipped_records,
            report.missing_layers,
            lowers.len()
        ));
    }
    reads
}

/// The reads that prefetch the files of a text list, found in the ext4 on
/// `stack`. A missing path is a warning; an image without a readable ext4
/// is an error.
pub fn plan_paths(
    stack: &Arc<Stack>,
    paths: &[PrefetchPath],
    report: &mut ReplayReport,
    warn: &Warn,
) -> Result<Vec<Read>> {
    let fs = Ext4::open_disk(Arc::new(StackSource::new(Arc::clone(stack), "image")))?;
    let mut reads = Vec::new();
    for entry in paths {
        let inode = match fs.lookup(&entry.path) {
            Ok(inode) => inode,
            Err(e) => {
                warn(&format!("trace replay: {}: {e}", entry.path.display()));
                report.missing_paths.push(entry.path.clone());
                continue;
            }
        };
        let files = match (inode.kind, entry.whole_dir) {
            (FileKind::Directory, true) => fs.walk(&inode, &entry.path)?,
            (FileKind::Directory, false) => {
                warn(&format!(
                    "trace replay: {} is a directory; end it with / or * to prefetch its files",
                    entry.path.display()
                ));
                continue;
            }
            _ => vec![(entry.path.clone(), inode)],
        };
        for (_, inode) in files {
            for (offset, len) in fs.data_ranges(&inode)? {
                let end = (offset + len).min(stack.virtual_size());
                split(offset, end, |offset, len| {
                    reads.push(Read::Device { offset, len })
                });
            }
        }
    }
    Ok(reads)
}

/// Call `push` for each ≤ [`MAX_READ`] piece of `[start, end)`.
fn split(start: u64, end: u64, mut push: impl FnMut(u64, u64)) {
    let mut at = start;
    while at < end {
        let len = (end - at).min(MAX_READ);
        push(at, len);
        at += len;
    }
}

/// Stored bytes to bring close: `len` bytes from `at`.
struct Warm<'a> {
    at: At<'a>,
    len: u64,
}

impl Warm<'_> {
    /// Where the bytes live (a blob, a file, a source), and the offset.
    fn place(&self) -> (*const (), u64) {
        match self.at {
            At::Fetch { blob, offset } => (blob as *const dyn Fetch as *const (), offset),
            At::File { file, offset } => (file as *const std::fs::File as *const (), offset),
            At::Read { source, offset } => (source as *const dyn ReadAt as *const (), offset),
        }
    }

    /// Fetch the bytes into the blob cache, or read them once (into the
    /// page cache) when they are local. Returns the bytes fetched from
    /// the network.
    fn run(&self, buf: &mut Vec<u8>) -> std::io::Result<u64> {
        match self.at {
            At::Fetch { blob, offset } => blob.warm(offset, self.len),
            At::File { .. } | At::Read { .. } => {
                buf.resize(self.len as usize, 0);
                self.at.read(buf)?;
                Ok(0)
            }
        }
    }
}

/// Largest range warmed with one call (merged ranges are cut at this).
const MAX_WARM: u64 = 8 << 20;
/// Ranges of one place closer than this are merged into one.
const MERGE_GAP: u64 = 64 << 10;

/// The stored ranges behind `reads`, in the order the reads come: a ZFile
/// layer's compressed blocks (as stored, not decoded), a plain layer's
/// bytes; a range that continues or overlaps the one before it in the same
/// place is merged into it.
fn warm_plan<'a>(stack: &'a Stack, reads: &[Read], warn: &Warn) -> Vec<Warm<'a>> {
    let mut plan: Vec<Warm<'a>> = Vec::new();
    let mut pieces = Vec::new();
    for read in reads {
        pieces.clear();
        match *read {
            Read::Layer { layer, offset, len } => pieces.push(PlanPiece {
                length: len,
                source: PieceSource::Layer {
                    layer,
                    position: offset,
                },
            }),
            Read::Device { offset, len } => {
                if let Err(e) = stack.plan(offset, len, &mut pieces) {
                    warn(&format!("trace replay: {read:?}: {e}"));
                    continue;
                }
            }
        }
        for piece in &pieces {
            let access = match stack.access(piece.source, piece.length) {
                Ok(access) => access,
                Err(e) => {
                    warn(&format!("trace replay: {read:?}: {e}"));
                    continue;
                }
            };
            let warm = match access {
                Access::Zero => continue,
                Access::Plain(at) => Warm {
                    at,
                    len: piece.length,
                },
                Access::Compressed {
                    stored, stored_len, ..
                } => Warm {
                    at: stored,
                    len: stored_len,
                },
            };
            push_warm(&mut plan, warm);
        }
    }
    plan
}

fn push_warm<'a>(plan: &mut Vec<Warm<'a>>, warm: Warm<'a>) {
    if let Some(last) = plan.last_mut() {
        let (place, offset) = warm.place();
        let (last_place, last_offset) = last.place();
        let end = offset + warm.len;
        let last_end = last_offset + last.len;
        if place == last_place && offset >= last_offset && offset <= last_end + MERGE_GAP {
            let merged = end.max(last_end) - last_offset;
            if merged <= MAX_WARM {
                last.len = merged;
                return;
            }
        }
    }
    plan.push(warm);
}

/// Execute `reads` with `concurrency` workers, in order, until done or
/// `stop` is set; adds to `report`. Remote bytes are fetched into the
/// blob cache (merged ranges, compressed blocks as stored); local layers
/// have nothing to fetch.
pub fn run(
    stack: &Stack,
    reads: &[Read],
    options: &ReplayOptions,
    stop: &AtomicBool,
    report: &mut ReplayReport,
) {
    let plan = warm_plan(stack, reads, &options.warn);
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let fetched = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let workers = options.concurrency.clamp(1, 256).min(plan.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut buf = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let Some(warm) = plan.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    match warm.run(&mut buf) {
                        Ok(n) => {
                            done.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(warm.len, Ordering::Relaxed);
                            fetched.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let (_, offset) = warm.place();
                            (options.warn)(&format!(
                                "trace replay: {} bytes at {offset}: {e}",
                                warm.len
                            ));
                        }
                    }
                }
            });
        }
    });
    report.reads += done.into_inner();
    report.bytes += bytes.into_inner();
    report.fetched += fetched.into_inner();
    report.failed_reads += failed.into_inner();
    report.cancelled |= stop.load(Ordering::Relaxed) && next.into_inner() < plan.len();
}

/// What to replay.
#[derive(Debug, Clone)]
pub enum Job {
    Records(Vec<TraceRecord>),
    Paths(Vec<PrefetchPath>),
}

/// A replay running in the background; dropping it stops it (reads in
/// flight finish) and waits.
pub struct ReplayHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<ReplayReport>>>,
    last: Arc<Mutex<Option<ReplayReport>>>,
}

impl ReplayHandle {
    /// Start replaying `job` on `stack` in a background thread.
    pub fn spawn(stack: Arc<Stack>, job: Job, options: ReplayOptions) -> Result<ReplayHandle> {
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(Mutex::new(None));
        let (stop2, last2) = (Arc::clone(&stop), Arc::clone(&last));
        let thread = std::thread::Builder::new()
            .name("obd-prefetch".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let report = replay(&stack, &job, &options, &stop2)?;
                (options.log)(&format!(
                    "trace replay {}: {} ranges, {} stored bytes, {} fetched, in {:.2} s{}",
                    if report.cancelled { "stopped" } else { "done" },
                    report.reads,
                    report.bytes,
                    report.fetched,
                    started.elapsed().as_secs_f64(),
                    if report.failed_reads > 0 {
                        format!(" ({} failed)", report.failed_reads)
                    } else {
                        String::new()
                    }
                ));
                *last2.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
                Ok(report)
            })
            .map_err(|e| Error::io("spawning the prefetch thread", e))?;
        Ok(ReplayHandle {
            stop,
            thread: Some(thread),
            last,
        })
    }

    /// Wait for the replay to end.
    pub fn wait(mut self) -> Result<ReplayReport> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(outcome)) => outcome,
            Some(Err(_)) => Err(Error::Invalid("the prefetch thread panicked".into())),
            None => Ok(self.finished().unwrap_or_default()),
        }
    }

    /// The report, once the replay has ended.
    pub fn finished(&self) -> Option<ReplayReport> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ask the workers to stop after their current read.
    pub fn cancel(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for ReplayHandle {
    fn drop(&mut self) {
        self.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Replay `job` on `stack` in the calling thread.
pub fn replay(
    stack: &Arc<Stack>,
    job: &Job,
    options: &ReplayOptions,
    stop: &AtomicBool,
) -> Result<ReplayReport> {
    let mut report = ReplayReport::default();
    let reads = match job {
        Job::Records(records) => plan_records(stack, records, &mut report, &options.warn),
        Job::Paths(paths) => plan_paths(stack, paths, &mut report, &options.warn)?,
    };
    run(stack, &reads, options, stop, &mut report);
    Ok(report)
}
