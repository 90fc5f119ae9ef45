//! The host start-up benchmark of the fetch engine (issue 11); ignored by
//! default, `bash scripts/bench-fetch.sh` makes its data and runs it.
//!
//! Real start-up traces (device reads recorded with eBPF on a loop device,
//! see the script) are replayed in-process through the image's stack,
//! opened from a real docker-registry through the test proxy as one shared
//! throttled link. For each latency × bandwidth, round and workload:
//!
//! - `cold`: lazy, a fresh blob cache, no prefetch;
//! - `prefetch`: the same, with the converted layer trace replayed
//!   (`ReplayHandle::spawn`, prefetchConfig's default concurrency) from t0,
//!   while the workload replays;
//! - `full`: the whole blob in one GET through the link, written to a local
//!   file, then the workload read from that file. The download does not
//!   depend on the workload: it is made once per link and round, and each
//!   workload's `full` time is that download plus its own local replay.
//!
//! Dependency order: a workload's reads are replayed in the order they were
//! issued, in waves. A read starts a new wave when it was issued more than
//! `OBD_BENCH_WAVE_US` (20) µs after the read before it; reads of one wave
//! run at once, and a wave starts when the one before it is done. The
//! recorded gaps (CPU time) are not slept: the time is the fetch engine's.
//! Every read's bytes (a CRC32C of them) are checked against the local
//! layer's; a difference fails the test.
//!
//! Environment: OBD_BENCH_DATA (layer.lsmt, W.events, W.trace),
//! OBD_BENCH_WORKLOADS (python,small,gcc,seq), OBD_BENCH_LATENCIES_MS
//! (5,20,50), OBD_BENCH_MBITS (100,1000), OBD_BENCH_ROUNDS (3),
//! OBD_BENCH_WAVE_US (20), OBD_BENCH_REPORT (a markdown file to write);
//! OBD_BENCH_FLIP_EVERY=N flips a byte of every N-th blob GET (to see the
//! check fail).

#[path = "../overlaybd/tests/remote_support/mod.rs"]
mod remote_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use overlaybd::config::{GlobalConfig, ImageConfig};
use overlaybd::image::{open_config_remote, open_read_only};
use overlaybd::io::ReadAt;
use overlaybd::remote::auth::Anonymous;
use overlaybd::remote::cache::CacheOptions;
use overlaybd::remote::registry::{Registry as Client, RegistryBlob, RegistryOptions};
use overlaybd::remote::Remote;
use overlaybd::stack::Stack;
use overlaybd::trace::TraceRecord;
use remote_support::{Auth, Proxy, Registry};
use trace_tools::events::EventFile;
use trace_tools::replay::{Job, ReplayHandle, ReplayOptions};

/// Most reads of one wave in flight at once.
const WAVE_THREADS: usize = 32;
/// The blob cache's chunk (cacheConfig.refillSize's default).
const REFILL: u64 = 256 << 10;

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
        .unwrap_or(default)
}

/// One recorded workload: its reads in waves, the CRC each read must give,
/// and its layer trace.
struct Workload {
    name: String,
    waves: Vec<Vec<(u64, u64)>>,
    reads: usize,
    bytes: u64,
    expected: Vec<u32>,
    records: Vec<TraceRecord>,
    /// First to last recorded issue, on the loop device.
    recorded: Duration,
}

impl Workload {
    fn load(data: &Path, name: &str, local: &Stack, wave_gap_ns: u64) -> Workload {
        let events = EventFile::read(&data.join(format!("{name}.events"))).unwrap();
        let mut reads: Vec<(u64, u64, u64)> = events
            .blocks()
            .filter(|b| b.is_read() && b.length > 0)
            .map(|b| (b.t, b.offset, b.length))
            .collect();
        reads.sort_by_key(|r| r.0);
        let size = local.virtual_size();
        let mut waves: Vec<Vec<(u64, u64)>> = Vec::new();
        let mut last_t = None;
        for &(t, offset, length) in &reads {
            if offset >= size {
                continue;
            }
            let length = length.min(size - offset);
            match last_t {
                Some(prev) if t - prev <= wave_gap_ns => {
                    waves.last_mut().unwrap().push((offset, length))
                }
                _ => waves.push(vec![(offset, length)]),
            }
            last_t = Some(t);
        }
        let flat: Vec<(u64, u64)> = waves.iter().flatten().copied().collect();
        let expected = flat
            .iter()
            .map(|&(offset, length)| {
                let mut buf = vec![0u8; length as usize];
                local.read(&mut buf, offset).unwrap();
                overlaybd::crc::raw_crc32c(0, &buf)
            })
            .collect();
        let trace = std::fs::read(data.join(format!("{name}.trace"))).unwrap();
        let records = overlaybd::trace::decode(&trace, name).unwrap();
        let recorded = match (reads.first(), reads.last()) {
            (Some(a), Some(b)) => Duration::from_nanos(b.0 - a.0),
            _ => Duration::ZERO,
        };
        Workload {
            name: name.to_string(),
            reads: flat.len(),
            bytes: flat.iter().map(|r| r.1).sum(),
            waves,
            expected,
            records,
            recorded,
        }
    }

    /// Replay the waves on `stack`; the CRC of each read, in order.
    fn replay(&self, stack: &Stack) -> Vec<u32> {
        let mut crcs = Vec::with_capacity(self.reads);
        let mut buf = Vec::new();
        for wave in &self.waves {
            if wave.len() == 1 {
                let (offset, length) = wave[0];
                buf.resize(length as usize, 0);
                stack
                    .read(&mut buf, offset)
                    .unwrap_or_else(|e| panic!("{}: read at {offset}: {e}", self.name));
                crcs.push(overlaybd::crc::raw_crc32c(0, &buf));
                continue;
            }
            let results: Vec<AtomicU32> = wave.iter().map(|_| AtomicU32::new(0)).collect();
            let next = AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for _ in 0..wave.len().min(WAVE_THREADS) {
                    scope.spawn(|| {
                        let mut buf = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(&(offset, length)) = wave.get(i) else {
                                break;
                            };
                            buf.resize(length as usize, 0);
                            stack
                                .read(&mut buf, offset)
                                .unwrap_or_else(|e| panic!("{}: read at {offset}: {e}", self.name));
                            results[i]
                                .store(overlaybd::crc::raw_crc32c(0, &buf), Ordering::Relaxed);
                        }
                    });
                }
            });
            crcs.extend(results.iter().map(|r| r.load(Ordering::Relaxed)));
        }
        crcs
    }

    fn check(&self, crcs: &[u32], mode: &str) {
        assert_eq!(crcs.len(), self.expected.len());
        let flat: Vec<(u64, u64)> = self.waves.iter().flatten().copied().collect();
        let wrong: Vec<_> = (0..crcs.len())
            .filter(|&i| crcs[i] != self.expected[i])
            .map(|i| flat[i])
            .collect();
        assert!(
            wrong.is_empty(),
            "{} ({mode}): {} of {} reads returned wrong bytes, first (offset, length) {:?}",
            self.name,
            wrong.len(),
            crcs.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
}

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    secs: f64,
    bytes: u64,
    gets: u64,
}

struct Bench {
    _registry: Registry,
    proxy: Proxy,
    digest: String,
    size: u64,
    work: tempfile::TempDir,
    runs: u64,
}

impl Bench {
    fn counters(&self) -> (u64, u64) {
        (self.proxy.body_bytes(), self.proxy.blob_gets())
    }

    fn since(&self, secs: f64, before: (u64, u64)) -> Run {
        let (bytes, gets) = self.counters();
        Run {
            secs,
            bytes: bytes - before.0,
            gets: gets - before.1,
        }
    }

    fn fresh_dir(&mut self, what: &str) -> PathBuf {
        self.runs += 1;
        let dir = self.work.path().join(format!("{what}-{}", self.runs));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn options() -> RegistryOptions {
        RegistryOptions {
            deadline: Duration::from_secs(900),
            read_timeout: Duration::from_secs(60),
            ..RegistryOptions::default()
        }
    }

    /// Lazy, from a fresh cache; with the layer trace replayed alongside
    /// when `prefetch`.
    fn lazy(&mut self, workload: &Workload, prefetch: bool) -> Run {
        let dir = self.fresh_dir(if prefetch { "prefetch" } else { "cold" });
        let config = ImageConfig::from_json(
            &serde_json::json!({
                "repoBlobUrl": format!("{}/v2/bench/startup/blobs", self.proxy.base()),
                "lowers": [{"dir": dir.join("layer"), "digest": self.digest, "size": self.size}],
            })
            .to_string(),
            "bench",
        )
        .unwrap();
        let remote = Remote::with_options(
            &GlobalConfig::default(),
            Self::options(),
            CacheOptions {
                dir: dir.join("cache"),
                capacity: 8 << 30,
                refill_size: REFILL,
            },
        )
        .unwrap();
        let before = self.counters();
        let started = Instant::now();
        let stack = Arc::new(open_config_remote(&config, &remote, false).unwrap());
        let open = self.since(started.elapsed().as_secs_f64(), before);
        let prefetch_end = Arc::new(Mutex::new(None));
        let handle = prefetch.then(|| {
            let end = prefetch_end.clone();
            let log: trace_tools::Warn = Arc::new(move |_: &str| {
                *end.lock().unwrap() = Some(started.elapsed());
            });
            ReplayHandle::spawn(
                stack.clone(),
                Job::Records(workload.records.clone()),
                ReplayOptions {
                    concurrency: overlaybd::config::PrefetchConfig::default().concurrency as usize,
                    warn: trace_tools::warn_to_stderr(),
                    log,
                },
            )
            .unwrap()
        });
        let crcs = workload.replay(&stack);
        let run = self.since(started.elapsed().as_secs_f64(), before);
        workload.check(&crcs, if prefetch { "prefetch" } else { "cold" });
        eprintln!(
            "    open: {:.3} s, {} GETs, {} bytes",
            open.secs, open.gets, open.bytes
        );
        if let Some(handle) = handle {
            let report = handle.wait().unwrap();
            assert_eq!(report.failed_reads, 0, "{report:?}");
            let end = prefetch_end.lock().unwrap().unwrap_or_default();
            eprintln!(
                "    prefetch ended at {:.3} s: {} ranges, {:.1} MiB stored bytes",
                end.as_secs_f64(),
                report.reads,
                mib(report.bytes as f64)
            );
        }
        drop(stack);
        drop(remote);
        let _ = std::fs::remove_dir_all(&dir);
        run
    }

    /// The whole blob in one GET through the link, into a local file.
    fn download(&mut self) -> (Run, PathBuf) {
        let dir = self.fresh_dir("full");
        let client = Arc::new(Client::with_credentials(
            Self::options(),
            Box::new(Anonymous),
        ));
        let url = format!(
            "{}/v2/bench/startup/blobs/{}",
            self.proxy.base(),
            self.digest
        );
        let blob = RegistryBlob::new(client, &url, self.size, None);
        let before = self.counters();
        let started = Instant::now();
        let mut buf = vec![0u8; self.size as usize];
        blob.read_exact_at(&mut buf, 0).unwrap();
        let got = started.elapsed();
        let file = dir.join("overlaybd.commit");
        std::fs::write(&file, &buf).unwrap();
        let run = self.since(started.elapsed().as_secs_f64(), before);
        eprintln!(
            "    download: GET {:.3} s, writing the file {:.3} s",
            got.as_secs_f64(),
            run.secs - got.as_secs_f64()
        );
        (run, file)
    }

    /// The workload from the downloaded file.
    fn local(&self, workload: &Workload, file: &Path) -> f64 {
        let started = Instant::now();
        let stack = Stack::new(vec![open_read_only(file).unwrap()], None).unwrap();
        let crcs = workload.replay(&stack);
        let secs = started.elapsed().as_secs_f64();
        workload.check(&crcs, "full");
        secs
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mib(bytes: f64) -> f64 {
    bytes / (1u64 << 20) as f64
}

#[test]
#[ignore = "benchmark: bash scripts/bench-fetch.sh"]
fn startup_fetch_bench() {
    let data = PathBuf::from(
        std::env::var("OBD_BENCH_DATA").expect("OBD_BENCH_DATA: the bench-fetch.sh data dir"),
    );
    let workload_names = env_list("OBD_BENCH_WORKLOADS", "python,small,gcc,seq");
    let latencies: Vec<u64> = env_list("OBD_BENCH_LATENCIES_MS", "5,20,50")
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    let mbits: Vec<u64> = env_list("OBD_BENCH_MBITS", "100,1000")
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    let rounds = env_num("OBD_BENCH_ROUNDS", 3).max(1);
    let wave_us = env_num("OBD_BENCH_WAVE_US", 20);

    let layer = data.join("layer.lsmt");
    let local = Stack::new(vec![open_read_only(&layer).unwrap()], None).unwrap();
    let workloads: Vec<Workload> = workload_names
        .iter()
        .map(|name| Workload::load(&data, name, &local, wave_us * 1000))
        .collect();
    let (digest, size) = overlaybd::remote::sha256_file(&layer).unwrap();
    let mut head = format!(
        "blob {:.1} MiB (image {:.1} MiB); waves: a gap > {wave_us} µs between issues; refillSize {} KiB; prefetch concurrency {}\n",
        mib(size as f64),
        mib(local.virtual_size() as f64),
        REFILL >> 10,
        overlaybd::config::PrefetchConfig::default().concurrency
    );
    for w in &workloads {
        head.push_str(&format!(
            "- {}: {} reads in {} waves, {:.1} MiB ({:.1} % of the image, {:.1} % of the blob), {:.3} s first to last issue on the loop device; trace: {} records\n",
            w.name,
            w.reads,
            w.waves.len(),
            mib(w.bytes as f64),
            w.bytes as f64 * 100.0 / local.virtual_size() as f64,
            w.bytes as f64 * 100.0 / size as f64,
            w.recorded.as_secs_f64(),
            w.records.len()
        ));
    }
    eprint!("{head}");

    let registry = Registry::start(Auth::Anonymous);
    let repo = format!("{}/v2/bench/startup", registry.base());
    Client::with_credentials(RegistryOptions::default(), Box::new(Anonymous))
        .upload_blob(&repo, &digest, &layer)
        .unwrap();
    let proxy = Proxy::start(registry.port);
    let mut bench = Bench {
        _registry: registry,
        proxy,
        digest,
        size,
        work: tempfile::tempdir().unwrap(),
        runs: 0,
    };

    // (latency, mbit, workload, mode) -> runs
    let mut results: BTreeMap<(u64, u64, usize, usize), Vec<Run>> = BTreeMap::new();
    // (latency, mbit) -> bytes per second of each round's full download.
    let mut download_rates: BTreeMap<(u64, u64), Vec<f64>> = BTreeMap::new();
    const MODES: [&str; 3] = ["cold", "prefetch", "full"];
    let started = Instant::now();
    for &mbit in &mbits {
        for &latency in &latencies {
            {
                let mut plan = bench.proxy.plan();
                plan.latency = Duration::from_millis(latency);
                plan.rate = mbit * 1_000_000 / 8;
                plan.shared_link = true;
                // A self-check of the check: flip a byte of every n-th GET.
                if let Some(n) = std::env::var("OBD_BENCH_FLIP_EVERY")
                    .ok()
                    .and_then(|v| v.parse().ok())
                {
                    plan.every = Some((n, remote_support::Fault::FlipByte));
                }
            }
            for round in 0..rounds as usize {
                // The cases in a rotated order: the download, then each
                // workload's cold, prefetch and local replay.
                let mut cases: Vec<(usize, usize)> = vec![(usize::MAX, 2)];
                for w in 0..workloads.len() {
                    for m in 0..2 {
                        cases.push((w, m));
                    }
                }
                let n = cases.len();
                cases.rotate_left(round * 3 % n);
                // Full: the download of this round, then the local replays.
                let mut download: Option<(Run, PathBuf)> = None;
                for (w, m) in cases {
                    if w == usize::MAX {
                        let (run, file) = bench.download();
                        eprintln!(
                            "{latency} ms {mbit} Mbit/s round {round}: download {:.3} s, {:.1} MiB, {} GETs",
                            run.secs,
                            mib(run.bytes as f64),
                            run.gets
                        );
                        for (k, workload) in workloads.iter().enumerate() {
                            let secs = bench.local(workload, &file);
                            results.entry((latency, mbit, k, 2)).or_default().push(Run {
                                secs: run.secs + secs,
                                ..run
                            });
                        }
                        download_rates
                            .entry((latency, mbit))
                            .or_default()
                            .push(run.bytes as f64 / run.secs);
                        download = Some((run, file));
                        continue;
                    }
                    let run = bench.lazy(&workloads[w], m == 1);
                    eprintln!(
                        "{latency} ms {mbit} Mbit/s round {round}: {} {}: {:.3} s, {:.1} MiB, {} GETs",
                        workloads[w].name,
                        MODES[m],
                        run.secs,
                        mib(run.bytes as f64),
                        run.gets
                    );
                    results.entry((latency, mbit, w, m)).or_default().push(run);
                }
                if let Some((_, file)) = download {
                    let _ = std::fs::remove_dir_all(file.parent().unwrap());
                }
            }
        }
    }
    let total = started.elapsed();

    // The table.
    let mut out = String::new();
    out.push_str(&head);
    out.push_str(&format!(
        "{rounds} round(s), {:.0} s in all. time = open + workload (full: download + open + workload); floor = bytes / bandwidth + one latency; host floor = bytes / the rate the full download reached on the same link (median of its rounds: what this host pushed through the proxy and registry) + one latency\n\n",
        total.as_secs_f64()
    ));
    out.push_str("| latency | Mbit/s | workload | mode | time s (median) | each round s | MiB fetched | GETs | floor s | time/floor | host floor s | time/host floor |\n");
    out.push_str("|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|\n");
    let mut medians: BTreeMap<(u64, u64, usize, usize), f64> = BTreeMap::new();
    for (&(latency, mbit, w, m), runs) in &results {
        let secs = median(runs.iter().map(|r| r.secs).collect());
        let bytes = median(runs.iter().map(|r| r.bytes as f64).collect());
        let gets = median(runs.iter().map(|r| r.gets as f64).collect());
        let floor = bytes * 8.0 / (mbit as f64 * 1e6) + latency as f64 / 1000.0;
        let rate = median(download_rates[&(latency, mbit)].clone());
        let host_floor = bytes / rate + latency as f64 / 1000.0;
        medians.insert((latency, mbit, w, m), secs);
        out.push_str(&format!(
            "| {latency} | {mbit} | {} | {} | {secs:.3} | {} | {:.1} | {gets:.0} | {floor:.3} | {:.2} | {host_floor:.3} | {:.2} |\n",
            workloads[w].name,
            MODES[m],
            runs.iter()
                .map(|r| format!("{:.3}", r.secs))
                .collect::<Vec<_>>()
                .join(" "),
            mib(bytes),
            secs / floor,
            secs / host_floor
        ));
    }
    out.push_str("\n| latency | Mbit/s | workload | cold/prefetch | full/prefetch | full/cold |\n|---:|---:|---|---:|---:|---:|\n");
    for &mbit in &mbits {
        for &latency in &latencies {
            for (w, workload) in workloads.iter().enumerate() {
                let get = |m| medians[&(latency, mbit, w, m)];
                out.push_str(&format!(
                    "| {latency} | {mbit} | {} | {:.2} | {:.2} | {:.2} |\n",
                    workload.name,
                    get(0) / get(1),
                    get(2) / get(1),
                    get(2) / get(0)
                ));
            }
        }
    }
    println!("{out}");
    if let Ok(path) = std::env::var("OBD_BENCH_REPORT") {
        std::fs::write(&path, &out).unwrap();
    }
}
