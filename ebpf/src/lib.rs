//! eBPF probes that see what the image daemon cannot: which process caused
//! each block request on a device, and which file's pages missed the page
//! cache. The probes are C (`bpf/obd_trace.bpf.c`, compiled by build.rs with
//! clang), loaded and attached with aya; this crate turns their ring-buffer
//! records into [`RawEvent`]s.
//!
//! Any block device can be watched — an obd device, a loop device, a disk or
//! a partition (requests are traced on its disk and rebased to the
//! partition). Filtering by device happens in the kernel. Loading needs root
//! (or CAP_BPF + CAP_PERFMON); without it [`Probes::attach`] fails with
//! [`Error::NotPermitted`] and a plain message.

use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{Array, MapData, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};

static PROBES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/obd_trace.bpf.o"));

const EVENT_SIZE: usize = 64;
const EVENT_BLOCK: u32 = 1;
const EVENT_PAGE: u32 = 2;
const SECTOR: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("eBPF is not permitted here ({0}); run as root (or with CAP_BPF and CAP_PERFMON)")]
    NotPermitted(String),
    #[error("{0}: not a block device")]
    NotBlockDevice(PathBuf),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("eBPF: {0}")]
    Bpf(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// The kernel's dev_t encoding used in tracepoints: MAJOR << 20 | MINOR.
pub fn kernel_dev(major: u32, minor: u32) -> u32 {
    major << 20 | minor
}

/// Which device to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
    /// The whole disk requests are issued to (itself unless a partition).
    pub disk_major: u32,
    pub disk_minor: u32,
    /// Partition start on its disk, in bytes (0 for a whole disk).
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

impl Target {
    /// Look up a block device node (following symlinks) and, through
    /// sysfs, its disk, start and size.
    pub fn resolve(path: &Path) -> Result<Target> {
        let meta = std::fs::metadata(path).map_err(io_error(path.display().to_string()))?;
        if !meta.file_type().is_block_device() {
            return Err(Error::NotBlockDevice(path.to_path_buf()));
        }
        let rdev = meta.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let read_u64 = |file: PathBuf| -> Result<u64> {
            let text =
                std::fs::read_to_string(&file).map_err(io_error(file.display().to_string()))?;
            text.trim().parse().map_err(|_| Error::Io {
                context: file.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a number"),
            })
        };
        let size = read_u64(sys.join("size"))? * SECTOR;
        let (disk_major, disk_minor, start) = if sys.join("partition").exists() {
            let start = read_u64(sys.join("start"))? * SECTOR;
            let disk = sys.join("..").join("dev");
            let text =
                std::fs::read_to_string(&disk).map_err(io_error(disk.display().to_string()))?;
            let (ma, mi) = text
                .trim()
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                .ok_or_else(|| Error::Bpf(format!("{}: cannot parse {text:?}", disk.display())))?;
            (ma, mi, start)
        } else {
            (major, minor, 0)
        };
        Ok(Target {
            path: path.to_path_buf(),
            major,
            minor,
            disk_major,
            disk_minor,
            start,
            size,
        })
    }
}

/// One record from the probes. Times are CLOCK_MONOTONIC nanoseconds (see
/// [`monotonic_ns`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEvent {
    /// A request issued to the device: `bytes` at byte `offset` of the
    /// target (rebased for a partition), `rwbs` as the kernel spells it.
    Block {
        ts_ns: u64,
        pid: u32,
        comm: String,
        offset: u64,
        bytes: u64,
        rwbs: String,
    },
    /// `2^order` pages at page `index` of inode `ino` entered the page cache.
    Page {
        ts_ns: u64,
        pid: u32,
        comm: String,
        ino: u64,
        index: u64,
        order: u32,
    },
}

/// CLOCK_MONOTONIC now, in nanoseconds (bpf_ktime_get_ns's clock).
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Loaded and attached probes; dropping them detaches everything.
pub struct Probes {
    _bpf: Ebpf,
    ring: RingBuf<MapData>,
    lost: Array<MapData, u64>,
    target: Target,
}

fn not_permitted(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
                return true;
            }
        }
        current = e.source();
    }
    false
}

fn bpf_error(what: &str, error: impl std::error::Error + 'static) -> Error {
    let text = format!("{what}: {error}");
    let root = rustix::process::geteuid().is_root();
    if not_permitted(&error) || !root {
        Error::NotPermitted(text)
    } else {
        Error::Bpf(text)
    }
}

/// Mount tracefs where aya looks for tracepoint ids, if it is not there.
fn ensure_tracefs() -> Result<()> {
    let events = Path::new("/sys/kernel/tracing/events");
    if events.is_dir() || Path::new("/sys/kernel/debug/tracing/events").is_dir() {
        return Ok(());
    }
    let mounted = rustix::mount::mount(
        "tracefs",
        "/sys/kernel/tracing",
        "tracefs",
        rustix::mount::MountFlags::empty(),
        None,
    );
    if let Err(e) = mounted {
        let e = std::io::Error::from(e);
        return Err(if not_permitted(&e) {
            Error::NotPermitted(format!("mounting tracefs on /sys/kernel/tracing: {e}"))
        } else {
            Error::Io {
                context: "mounting tracefs on /sys/kernel/tracing".into(),
                source: e,
            }
        });
    }
    Ok(())
}

impl Probes {
    /// Load the probes, filtered to `target`, and attach them: block
    /// requests always, page-cache fills when `files` is set. I/O of this
    /// process is not traced.
    pub fn attach(target: &Target, files: bool) -> Result<Probes> {
        // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
        // Failure is harmless (newer kernels, or a limit already high).
        let unlimited = rustix::process::Rlimit {
            current: None,
            maximum: None,
        };
        let _ = rustix::process::setrlimit(rustix::process::Resource::Memlock, unlimited);
        ensure_tracefs()?;
        let disk = kernel_dev(target.disk_major, target.disk_minor);
        let fs = kernel_dev(target.major, target.minor);
        let me = std::process::id();
        let mut bpf = EbpfLoader::new()
            .override_global("target_disk", &disk, true)
            .override_global("target_fs", &fs, true)
            .override_global("ignore_tgid", &me, true)
            .load(PROBES)
            .map_err(|e| bpf_error("loading the probes", e))?;
        let mut programs = vec![("block_rq_issue", "block", "block_rq_issue")];
        if files {
            programs.push(("page_cache_add", "filemap", "mm_filemap_add_to_page_cache"));
        }
        for (name, category, tracepoint) in programs {
            let program: &mut TracePoint = bpf
                .program_mut(name)
                .ok_or_else(|| Error::Bpf(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(|e| bpf_error(name, e))?;
            program.load().map_err(|e| bpf_error(name, e))?;
            program
                .attach(category, tracepoint)
                .map_err(|e| bpf_error(&format!("attaching {category}:{tracepoint}"), e))?;
        }
        let ring = RingBuf::try_from(
            bpf.take_map("events")
                .ok_or_else(|| Error::Bpf("map events missing".into()))?,
        )
        .map_err(|e| bpf_error("ring buffer", e))?;
        let lost = Array::try_from(
            bpf.take_map("lost")
                .ok_or_else(|| Error::Bpf("map lost missing".into()))?,
        )
        .map_err(|e| bpf_error("lost counter", e))?;
        Ok(Probes {
            _bpf: bpf,
            ring,
            lost,
            target: target.clone(),
        })
    }

    /// Wait up to `timeout` for records, then hand every available one to
    /// `sink`. Returns how many were handled.
    pub fn poll(&mut self, timeout: Duration, sink: &mut dyn FnMut(RawEvent)) -> Result<usize> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let fd = self.ring.as_fd();
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        // Whole milliseconds, as before, and at most i32::MAX of them.
        let ms = timeout.as_millis().min(i32::MAX as u128) as i64;
        let timeout = Timespec {
            tv_sec: ms / 1000,
            tv_nsec: ms % 1000 * 1_000_000,
        };
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(io_error("polling the eBPF ring buffer")(e.into())),
        }
        let mut handled = 0;
        while let Some(item) = self.ring.next() {
            if let Some(event) = parse(&item, &self.target) {
                sink(event);
            }
            handled += 1;
        }
        Ok(handled)
    }

    /// Records the kernel dropped because the ring buffer was full.
    pub fn lost(&self) -> u64 {
        self.lost.get(&0, 0).unwrap_or(0)
    }
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn parse(raw: &[u8], target: &Target) -> Option<RawEvent> {
    let raw: &[u8; EVENT_SIZE] = raw.get(..EVENT_SIZE)?.try_into().ok()?;
    let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().unwrap_or_default());
    let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().unwrap_or_default());
    let (ts_ns, a, b, kind, pid, c) = (
        u64_at(0),
        u64_at(8),
        u64_at(16),
        u32_at(24),
        u32_at(28),
        u32_at(32),
    );
    let comm = c_string(&raw[40..56]);
    match kind {
        EVENT_BLOCK => {
            let on_disk = a.checked_mul(SECTOR)?;
            let offset = on_disk.checked_sub(target.start)?;
            if offset >= target.size {
                return None; // another partition of the same disk
            }
            Some(RawEvent::Block {
                ts_ns,
                pid,
                comm,
                offset,
                bytes: b,
                rwbs: c_string(&raw[56..64]),
            })
        }
        EVENT_PAGE => Some(RawEvent::Page {
            ts_ns,
            pid,
            comm,
            ino: a,
            index: b,
            order: c,
        }),
        _ => None,
    }
}
