//! `obd trace show`: a human summary of any trace kind — an event file
//! (bytes per process, per file, over time), a binary layer trace (bytes
//! per layer) or a text list.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use overlaybd::trace::{TraceFile, TraceRecord};
use overlaybd::Result;

use crate::events::EventFile;

/// Summarize the trace in `bytes`; `name` names it in errors.
pub fn summarize(bytes: &[u8], name: &str) -> Result<String> {
    if EventFile::sniff(bytes) {
        let events = EventFile::parse(bytes, name)?;
        return Ok(events_summary(&events, 10));
    }
    Ok(match TraceFile::detect(bytes, name)? {
        TraceFile::Empty => format!("{name}: empty trace file (a daemon would record into it)\n"),
        TraceFile::Binary(records) => records_summary(&records),
        TraceFile::TextList(paths) => {
            let mut out = format!("text list: {} paths\n", paths.len());
            for p in &paths {
                let _ = writeln!(
                    out,
                    "  {}{}",
                    p.path.display(),
                    if p.whole_dir {
                        " (whole directory)"
                    } else {
                        ""
                    }
                );
            }
            out
        }
    })
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Per layer: records, bytes, lowest and highest offset.
pub fn records_summary(records: &[TraceRecord]) -> String {
    let mut layers: BTreeMap<u32, (u64, u64, i64, i64)> = BTreeMap::new();
    for r in records {
        let e = layers
            .entry(r.layer_index)
            .or_insert((0, 0, i64::MAX, i64::MIN));
        e.0 += 1;
        e.1 += r.count;
        e.2 = e.2.min(r.offset);
        e.3 = e.3.max(r.offset.saturating_add(r.count as i64));
    }
    let total: u64 = records.iter().map(|r| r.count).sum();
    let mut out = format!(
        "layer trace: {} records, {} ({total} bytes)\n",
        records.len(),
        human(total)
    );
    let _ = writeln!(out, "  layer    records        bytes  offsets");
    for (layer, (n, bytes, lo, hi)) in layers {
        let _ = writeln!(out, "  {layer:>5} {n:>10} {:>12}  {lo}..{hi}", human(bytes));
    }
    out
}

/// Totals per process and file, and reads over `buckets` time slices.
pub fn events_summary(events: &EventFile, buckets: usize) -> String {
    let h = &events.header;
    let span = events
        .events
        .iter()
        .filter_map(|e| match e {
            crate::events::Event::Block(b) => Some(b.t),
            crate::events::Event::Page(p) => Some(p.t),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let mut out = format!(
        "events of {} ({}:{}, {}), {:.3} s\n",
        h.device,
        h.major,
        h.minor,
        human(h.size),
        span as f64 / 1e9
    );
    let (mut reads, mut read_bytes, mut writes, mut write_bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut per_proc: HashMap<(u32, String), (u64, u64)> = HashMap::new();
    let mut timeline = vec![0u64; buckets.max(1)];
    let slot = |t: u64| ((t as u128 * timeline.len() as u128) / (span as u128 + 1)) as usize;
    let mut slots = Vec::new();
    for b in events.blocks() {
        if b.is_read() {
            reads += 1;
            read_bytes += b.length;
            per_proc.entry((b.pid, b.comm.clone())).or_default().0 += b.length;
            slots.push((slot(b.t), b.length));
        } else if b.rwbs.contains('W') {
            writes += 1;
            write_bytes += b.length;
        }
    }
    for (s, len) in slots {
        timeline[s.min(buckets.max(1) - 1)] += len;
    }
    let _ = writeln!(
        out,
        "block: {reads} reads, {}; {writes} writes, {}",
        human(read_bytes),
        human(write_bytes)
    );
    let names = events.inode_names();
    let mut per_file: HashMap<u64, u64> = HashMap::new();
    let mut page_events = 0u64;
    for p in events.pages() {
        page_events += 1;
        let bytes = p.pages.saturating_mul(h.page_size);
        *per_file.entry(p.ino).or_default() += bytes;
        per_proc.entry((p.pid, p.comm.clone())).or_default().1 += bytes;
    }
    let _ = writeln!(
        out,
        "page cache: {page_events} misses in {} files",
        per_file.len()
    );
    let mut procs: Vec<_> = per_proc.into_iter().collect();
    procs.sort_by(|a, b| {
        (b.1 .0 + b.1 .1)
            .cmp(&(a.1 .0 + a.1 .1))
            .then(a.0.cmp(&b.0))
    });
    let _ = writeln!(out, "per process (block reads, page-cache misses):");
    for ((pid, comm), (block, page)) in procs.iter().take(20) {
        let _ = writeln!(
            out,
            "  {pid:>8} {comm:<16} {:>12} {:>12}",
            human(*block),
            human(*page)
        );
    }
    if !per_file.is_empty() {
        let mut files: Vec<_> = per_file.into_iter().collect();
        files.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let _ = writeln!(out, "per file (page-cache misses):");
        for (ino, bytes) in files.iter().take(20) {
            let name = names
                .get(ino)
                .map_or_else(|| format!("inode {ino}"), |p| p.display().to_string());
            let _ = writeln!(out, "  {:>12}  {name}", human(*bytes));
        }
    }
    let _ = writeln!(out, "block reads over time:");
    let step = (span as f64 / 1e9) / timeline.len() as f64;
    for (i, bytes) in timeline.iter().enumerate() {
        let _ = writeln!(out, "  {:>8.3} s  {:>12}", i as f64 * step, human(*bytes));
    }
    out
}
