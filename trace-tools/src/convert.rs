//! Raw device events → a prefetch plan for an image.
//!
//! Device byte ranges go through the image's [`Stack::plan`] to (layer,
//! offset) ranges — the overlaybd trace format. Ranges are kept in order of
//! first access (what replay should fetch first), with what was already
//! fetched cut out and a range that continues the previous one of its layer
//! merged into it (sequential reads become one record). Page-cache events
//! name inodes, which the image's ext4 turns into paths (a text list) and,
//! when the recording has no block events, into device ranges through the
//! files' extents.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use overlaybd::index::SECTOR;
use overlaybd::stack::{PieceSource, Stack};
use overlaybd::trace::{Op, TraceRecord, MAX_TEXT_LIST_SIZE};
use overlaybd::Result;

use crate::events::EventFile;
use crate::ext4::Ext4;
use crate::{StackSource, Warn};

/// Builds trace records from reads in access order; see the module docs.
#[derive(Default)]
pub struct TraceBuilder {
    /// Per layer: covered ranges, start → end, disjoint and not adjacent.
    covered: HashMap<u32, BTreeMap<u64, u64>>,
    records: Vec<TraceRecord>,
    /// (layer, end offset) → the record ending there.
    ends: HashMap<(u32, u64), usize>,
}

impl TraceBuilder {
    pub fn new() -> TraceBuilder {
        TraceBuilder::default()
    }

    /// `len` bytes at `offset` of layer `layer` were read.
    pub fn add(&mut self, layer: u32, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(i64::MAX as u64);
        if offset >= end {
            return;
        }
        let map = self.covered.entry(layer).or_default();
        let fresh = uncovered(map, offset, end);
        insert(map, offset, end);
        for (s, e) in fresh {
            if let Some(i) = self.ends.remove(&(layer, s)) {
                self.records[i].count += e - s;
                self.ends.insert((layer, e), i);
            } else {
                self.ends.insert((layer, e), self.records.len());
                self.records.push(TraceRecord {
                    op: Op::Read,
                    layer_index: layer,
                    count: e - s,
                    offset: s as i64,
                });
            }
        }
    }

    pub fn finish(self) -> Vec<TraceRecord> {
        self.records
    }
}

/// Parts of `[start, end)` not in `map`.
fn uncovered(map: &BTreeMap<u64, u64>, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = start;
    let from = map.range(..=start).next_back().map_or(start, |(&a, _)| a);
    for (&a, &b) in map.range(from..) {
        if a >= end {
            break;
        }
        if b <= at {
            continue;
        }
        if a > at {
            out.push((at, a));
        }
        at = b;
        if at >= end {
            break;
        }
    }
    if at < end {
        out.push((at, end));
    }
    out
}

/// Add `[start, end)` to `map`, merging what it touches.
fn insert(map: &mut BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    let from = map.range(..=start).next_back().map_or(start, |(&a, _)| a);
    let touched: Vec<(u64, u64)> = map
        .range(from..=end)
        .filter(|&(_, &b)| b >= start)
        .map(|(&a, &b)| (a, b))
        .collect();
    for (a, b) in touched {
        map.remove(&a);
        start = start.min(a);
        end = end.max(b);
    }
    map.insert(start, end);
}

/// What a conversion produced.
#[derive(Debug, Clone, Default)]
pub struct Conversion {
    /// Lower-layer records, ordered by first access.
    pub records: Vec<TraceRecord>,
    /// Files read, by first access (page-cache events).
    pub files: Vec<PathBuf>,
    /// Device bytes read (block read events, or page events without them).
    pub device_bytes: u64,
    /// Of those, bytes the image serves as zeros or from its writable top.
    pub unmapped_bytes: u64,
    /// Page events whose inode has no path in the image.
    pub unknown_inodes: usize,
}

/// Map device reads (in access order) through `stack` into `builder`;
/// returns the bytes that are not in a lower layer.
pub fn map_device_read(
    stack: &Stack,
    builder: &mut TraceBuilder,
    offset: u64,
    len: u64,
    plan: &mut Vec<overlaybd::stack::PlanPiece>,
) -> Result<u64> {
    let size = stack.virtual_size();
    let start = (offset / SECTOR * SECTOR).min(size);
    let end = offset
        .saturating_add(len)
        .div_ceil(SECTOR)
        .saturating_mul(SECTOR)
        .min(size);
    if start >= end {
        return Ok(len);
    }
    plan.clear();
    stack.plan(start, end - start, plan)?;
    let lowers = stack.lowers().len();
    let mut unmapped = 0;
    for piece in plan.iter() {
        match piece.source {
            PieceSource::Layer { layer, position } if layer < lowers => {
                builder.add(layer as u32, position, piece.length)
            }
            _ => unmapped += piece.length,
        }
    }
    Ok(unmapped)
}

/// Turn `events` recorded on a device holding `stack`'s image into a
/// prefetch plan. Writes and other non-read requests are ignored.
pub fn convert(stack: &Arc<Stack>, events: &EventFile, warn: &Warn) -> Result<Conversion> {
    let mut out = Conversion::default();
    let mut builder = TraceBuilder::new();
    let mut plan = Vec::new();
    let mut reads: Vec<_> = events.blocks().filter(|b| b.is_read()).collect();
    reads.sort_by_key(|b| b.t);
    // A recorded partition of an image holding the whole disk: shift.
    let base = if events.header.size == stack.virtual_size() {
        0
    } else {
        events.header.disk_offset
    };
    for read in &reads {
        out.device_bytes += read.length;
        out.unmapped_bytes += map_device_read(
            stack,
            &mut builder,
            read.offset.saturating_add(base),
            read.length,
            &mut plan,
        )?;
    }
    let mut pages: Vec<_> = events.pages().collect();
    pages.sort_by_key(|p| p.t);
    if !pages.is_empty() {
        let fs = match Ext4::open_disk(Arc::new(StackSource::new(Arc::clone(stack), "image"))) {
            Ok(fs) => Some(fs),
            Err(e) => {
                warn(&format!("page events not mapped to files: {e}"));
                None
            }
        };
        let paths = match &fs {
            Some(fs) => fs.inode_paths()?,
            None => HashMap::new(),
        };
        let recorded = events.inode_names();
        let mut seen = HashSet::new();
        let mut unknown = HashSet::new();
        for page in &pages {
            let path = u32::try_from(page.ino)
                .ok()
                .and_then(|ino| paths.get(&ino))
                .or_else(|| recorded.get(&page.ino));
            match path {
                Some(path) => {
                    if seen.insert(page.ino) {
                        out.files.push(path.clone());
                    }
                }
                None => {
                    unknown.insert(page.ino);
                }
            }
            if reads.is_empty() {
                if let Some(fs) = &fs {
                    let len = page.pages.saturating_mul(events.header.page_size);
                    let at = page.index.saturating_mul(events.header.page_size);
                    for (offset, len) in file_to_device(fs, page.ino, at, len)? {
                        out.device_bytes += len;
                        out.unmapped_bytes +=
                            map_device_read(stack, &mut builder, offset, len, &mut plan)?;
                    }
                }
            }
        }
        out.unknown_inodes = unknown.len();
    }
    out.records = builder.finish();
    Ok(out)
}

/// Device ranges holding bytes `[at, at + len)` of inode `ino`'s data.
fn file_to_device(fs: &Ext4, ino: u64, at: u64, len: u64) -> Result<Vec<(u64, u64)>> {
    let Ok(ino) = u32::try_from(ino) else {
        return Ok(Vec::new());
    };
    let Ok(inode) = fs.inode(ino) else {
        return Ok(Vec::new());
    };
    let bs = fs.block_size();
    let end = at.saturating_add(len).min(inode.size.div_ceil(bs) * bs);
    let mut out = Vec::new();
    for e in fs.extents(&inode)? {
        let (fs_start, fs_end) = (e.logical * bs, (e.logical + e.len) * bs);
        let (s, t) = (at.max(fs_start), end.min(fs_end));
        if s < t {
            out.push((fs.base() + e.physical * bs + (s - fs_start), t - s));
        }
    }
    Ok(out)
}

/// A text trace list of `files` (at most 64 KiB; later files are dropped
/// with a warning, as are names with a newline).
pub fn text_list(files: &[PathBuf], warn: &Warn) -> Vec<u8> {
    let mut out = Vec::new();
    let mut dropped = 0;
    for path in files {
        let bytes = path.as_os_str().as_bytes();
        if bytes.contains(&b'\n') || bytes.first() != Some(&b'/') {
            dropped += 1;
            continue;
        }
        if out.len() + bytes.len() + 1 > MAX_TEXT_LIST_SIZE {
            dropped += 1;
            continue;
        }
        out.extend_from_slice(bytes);
        out.push(b'\n');
    }
    if dropped > 0 {
        warn(&format!(
            "{dropped} paths left out of the list (64 KiB limit, or a newline in the name)"
        ));
    }
    out
}
