//! `obd trace`: record a block device's reads with eBPF, turn them into an
//! overlaybd prefetch trace for an image, and look at traces.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use overlaybd::image::{open_stack, LayerSpec};
use overlaybd::io::ReadAt;
use overlaybd::stack::Stack;
use trace_tools::events::{
    BlockEvent, Event, EventFile, EventWriter, Header, InodeName, PageEvent,
};

use super::Output;

/// Record, convert and inspect traces.
///
/// Two kinds of trace: obd's raw device event file (`record` writes it:
/// block requests with process and time, page-cache misses per file), and
/// the overlaybd layer trace (`convert` writes it: the reads an image's
/// layers served, what a daemon replays as prefetch through its
/// recordTracePath). `show` and `plot` read both.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
obd trace record --device /dev/ublkb0 --files --duration 30 -o start.events\n  \
obd trace convert --config config.v1.json -i start.events -o app.trace --list app.list\n  \
obd trace show start.events\n  \
obd trace plot start.events -o start.png")]
pub struct Args {
    #[command(subcommand)]
    command: TraceCommand,
}

#[derive(Subcommand)]
enum TraceCommand {
    Record(RecordArgs),
    Convert(ConvertArgs),
    Show(ShowArgs),
    Plot(PlotArgs),
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        TraceCommand::Record(a) => record(a),
        TraceCommand::Convert(a) => convert(a),
        TraceCommand::Show(a) => show(a),
        TraceCommand::Plot(a) => plot(a),
    }
}

/// Record block requests to a device (and page-cache misses of files on
/// it, with --files) into an event file, with eBPF. Needs root.
///
/// Stops after --duration seconds, or on Ctrl-C / SIGTERM. With --files,
/// the inodes seen are named from the ext4 on the device when recording
/// ends.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
obd trace record --device /dev/loop0 -o boot.events\n  \
obd trace record --device /dev/ublkb0 --files --duration 60 -o app.events")]
struct RecordArgs {
    /// Block device to watch: an obd device, a loop device, a disk or a partition.
    #[arg(long, short = 'd')]
    device: PathBuf,
    /// Also record page-cache misses of files on the device.
    #[arg(long)]
    files: bool,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long, value_name = "S")]
    duration: Option<f64>,
    /// Event file to write (must not exist).
    #[arg(short = 'o', long)]
    output: PathBuf,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn catch_stop_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe);
        // no SA_RESTART, so a blocked poll returns early.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// A block device node as a byte source (its size from sysfs: a device
/// node's metadata says 0).
struct BlockDevice {
    file: std::fs::File,
    size: u64,
    name: String,
}

impl ReadAt for BlockDevice {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.file.read_exact_at(buf, offset)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn name(&self) -> &str {
        &self.name
    }
}

fn record(args: RecordArgs) -> Result<()> {
    if args.output.exists() {
        bail!(
            "{} already exists; refusing to overwrite it",
            args.output.display()
        );
    }
    if let Some(d) = args.duration {
        if !(d.is_finite() && d > 0.0) {
            bail!("--duration must be a positive number of seconds");
        }
    }
    let target = obd_ebpf::Target::resolve(&args.device)?;
    catch_stop_signals();
    let mut probes = obd_ebpf::Probes::attach(&target, args.files)?;
    let start_mono = obd_ebpf::monotonic_ns();
    let start_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let page_size = rustix::param::page_size().max(4096) as u64;
    let header = Header {
        obd_events: trace_tools::events::VERSION,
        device: args.device.display().to_string(),
        major: target.major,
        minor: target.minor,
        size: target.size,
        page_size,
        start_unix_ns: start_unix,
        disk_offset: target.start,
    };
    let mut writer = EventWriter::create(&args.output, &header)?;
    eprintln!(
        "recording {} ({}:{}){}; {}",
        args.device.display(),
        target.major,
        target.minor,
        if args.files { " with file pages" } else { "" },
        match args.duration {
            Some(d) => format!("for {d} s"),
            None => "Ctrl-C to stop".into(),
        }
    );
    let deadline = args
        .duration
        .map(|d| Instant::now() + Duration::from_secs_f64(d));
    let mut inodes = std::collections::BTreeSet::new();
    let mut counts = (0u64, 0u64);
    let mut failure = None;
    loop {
        let stopping =
            STOP.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d);
        let mut sink = |event: obd_ebpf::RawEvent| {
            let event = match event {
                obd_ebpf::RawEvent::Block {
                    ts_ns,
                    pid,
                    comm,
                    offset,
                    bytes,
                    rwbs,
                } => {
                    counts.0 += 1;
                    Event::Block(BlockEvent {
                        t: ts_ns.saturating_sub(start_mono),
                        pid,
                        comm,
                        offset,
                        length: bytes,
                        rwbs,
                    })
                }
                obd_ebpf::RawEvent::Page {
                    ts_ns,
                    pid,
                    comm,
                    ino,
                    index,
                    order,
                } => {
                    counts.1 += 1;
                    inodes.insert(ino);
                    Event::Page(PageEvent {
                        t: ts_ns.saturating_sub(start_mono),
                        pid,
                        comm,
                        ino,
                        index,
                        pages: 1u64 << order.min(20),
                    })
                }
            };
            if failure.is_none() {
                if let Err(e) = writer.write(&event) {
                    failure = Some(e);
                }
            }
        };
        probes.poll(Duration::from_millis(100), &mut sink)?;
        if let Some(e) = failure.take() {
            return Err(e.into());
        }
        if stopping {
            break; // one last drain done above
        }
    }
    let lost = probes.lost();
    drop(probes);
    if args.files && !inodes.is_empty() {
        match name_inodes(&args.device, &target, &inodes) {
            Ok(names) => {
                for (ino, path) in names {
                    writer.write(&Event::Inode(InodeName { ino, path }))?;
                }
            }
            Err(e) => eprintln!("warning: files not named: {e:#}"),
        }
    }
    writer.finish()?;
    if lost > 0 {
        eprintln!("warning: the kernel dropped {lost} events (ring buffer full)");
    }
    eprintln!(
        "{}: {} block requests, {} page-cache misses",
        args.output.display(),
        counts.0,
        counts.1
    );
    Ok(())
}

/// Paths of `inodes` in the ext4 on the device.
fn name_inodes(
    device: &Path,
    target: &obd_ebpf::Target,
    inodes: &std::collections::BTreeSet<u64>,
) -> Result<Vec<(u64, PathBuf)>> {
    let file =
        std::fs::File::open(device).with_context(|| format!("opening {}", device.display()))?;
    let dev = BlockDevice {
        file,
        size: target.size,
        name: device.display().to_string(),
    };
    let fs = trace_tools::ext4::Ext4::open_disk(Arc::new(dev))?;
    let paths = fs.inode_paths()?;
    Ok(inodes
        .iter()
        .filter_map(|&ino| {
            let path = paths.get(&u32::try_from(ino).ok()?)?;
            Some((ino, path.clone()))
        })
        .collect())
}

/// Map a device event file through an image into an overlaybd trace.
///
/// Block reads become (layer, offset, count) records through the image's
/// layer stack, ordered by first access, with repeats cut and sequential
/// runs merged. Page-cache misses name files through the image's ext4
/// (--list writes them as a text trace list); without block events they
/// are mapped through the files' extents instead.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
obd trace convert --config config.v1.json -i app.events -o app.trace\n  \
obd trace convert base.zfile app.zfile -i app.events -o app.trace --list app.list")]
struct ConvertArgs {
    /// Event file written by `obd trace record`.
    #[arg(short = 'i', long)]
    input: PathBuf,
    /// Binary overlaybd trace to write (must not exist).
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Also write the files read, as a text trace list.
    #[arg(long, value_name = "LIST")]
    list: Option<PathBuf>,
    /// The image, as an image config (config.v1.json)...
    #[arg(long, conflicts_with = "layers")]
    config: Option<PathBuf>,
    /// ...or as its layers, bottom → top.
    #[arg(value_name = "LAYER", required_unless_present = "config")]
    layers: Vec<String>,
}

fn open_image(config: Option<&Path>, layers: &[String]) -> Result<Stack> {
    Ok(match config {
        Some(config) => {
            let config = overlaybd::config::ImageConfig::load(config)?;
            overlaybd::image::open_config(&config, false)?
        }
        None => {
            let specs: Vec<LayerSpec> = layers.iter().map(|l| LayerSpec::parse(l)).collect();
            open_stack(&specs, false)?
        }
    })
}

fn convert(args: ConvertArgs) -> Result<()> {
    let events = EventFile::read(&args.input)?;
    let stack = Arc::new(open_image(args.config.as_deref(), &args.layers)?);
    if events.header.size != stack.virtual_size() {
        eprintln!(
            "warning: the recorded device is {} bytes, the image {}",
            events.header.size,
            stack.virtual_size()
        );
    }
    let warn = trace_tools::warn_to_stderr();
    let result = trace_tools::convert::convert(&stack, &events, &warn)?;
    let mut out = Output::create(&args.output)?;
    out.file_mut()
        .write_all(&overlaybd::trace::encode(&result.records))
        .with_context(|| format!("writing {}", args.output.display()))?;
    out.finish()?;
    if let Some(list) = &args.list {
        let mut out = Output::create(list)?;
        out.file_mut()
            .write_all(&trace_tools::convert::text_list(&result.files, &warn))
            .with_context(|| format!("writing {}", list.display()))?;
        out.finish()?;
    }
    let bytes: u64 = result.records.iter().map(|r| r.count).sum();
    println!(
        "{}: {} records, {} to prefetch (from {} device reads; {} zero or not in a lower layer); {} files{}",
        args.output.display(),
        result.records.len(),
        trace_tools::summary::human(bytes),
        trace_tools::summary::human(result.device_bytes),
        trace_tools::summary::human(result.unmapped_bytes),
        result.files.len(),
        if result.unknown_inodes > 0 {
            format!(", {} inodes not found in the image", result.unknown_inodes)
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Summarize a trace: an event file (per process, per file, over time), a
/// binary layer trace (per layer) or a text list.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  obd trace show app.events\n  obd trace show app.trace")]
struct ShowArgs {
    file: PathBuf,
}

/// Bigger than any trace we are willing to summarize in memory.
const MAX_INPUT: u64 = 4 << 30;

fn read_input(path: &Path) -> Result<Vec<u8>> {
    let size = std::fs::metadata(path)
        .with_context(|| path.display().to_string())?
        .len();
    if size > MAX_INPUT {
        bail!("{}: {size} bytes is too large to read", path.display());
    }
    std::fs::read(path).with_context(|| path.display().to_string())
}

fn show(args: ShowArgs) -> Result<()> {
    let bytes = read_input(&args.file)?;
    let text = trace_tools::summary::summarize(&bytes, &args.file.display().to_string())?;
    print!("{text}");
    Ok(())
}

/// Draw offset × time of an event file (or offset × access order of a
/// layer trace) as PNG or SVG.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  obd trace plot app.events -o app.png\n  obd trace plot app.trace -o app.svg"
)]
struct PlotArgs {
    file: PathBuf,
    /// Image to write: .png or .svg (must not exist).
    #[arg(short = 'o', long)]
    output: PathBuf,
    #[arg(long, default_value_t = 1200)]
    width: u32,
    #[arg(long, default_value_t = 700)]
    height: u32,
}

fn plot(args: PlotArgs) -> Result<()> {
    if args.output.exists() {
        bail!(
            "{} already exists; refusing to overwrite it",
            args.output.display()
        );
    }
    if !(64..=16384).contains(&args.width) || !(64..=16384).contains(&args.height) {
        bail!("--width and --height must be between 64 and 16384 pixels");
    }
    let bytes = read_input(&args.file)?;
    let warn = trace_tools::warn_to_stderr();
    // Drawn beside the output (same extension) and renamed when complete.
    let name = args
        .output
        .file_name()
        .with_context(|| format!("{}: not a file name", args.output.display()))?;
    let mut partial = std::ffi::OsString::from(".obd-partial-");
    partial.push(name);
    let partial = args.output.with_file_name(partial);
    let drawn = trace_tools::plot::plot(
        &bytes,
        &args.file.display().to_string(),
        &partial,
        (args.width, args.height),
        &warn,
    );
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&partial);
        return Err(e.into());
    }
    std::fs::rename(&partial, &args.output)
        .with_context(|| format!("cannot move the plot into {}", args.output.display()))?;
    println!("{}", args.output.display());
    Ok(())
}
