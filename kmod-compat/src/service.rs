//! The TCMU service: every `overlaybd/<config>` TCMU device on this host,
//! a thread each that takes commands off its ring, and a few workers each
//! that run them.
//!
//! Devices are found two ways. target_core_user announces each device it
//! adds, removes or reconfigures on generic netlink ([`crate::netlink`]);
//! like libtcmu (tcmu-runner, the reference overlaybd-tcmu) the service
//! listens there, turns on kernel command replies, and answers every
//! event: the configfs write that made the event waits for that answer,
//! and its status becomes the write's result. ADDED_DEVICE is answered
//! once the device's ring is mapped and its image is open (or with an
//! error status when it cannot be: `enable` then fails instead of
//! hanging), REMOVED_DEVICE once the device's thread has let go of it,
//! RECONFIG_DEVICE as tcmu-runner's handlers do (dev_config and the write
//! cache never change), except that a larger dev_size is taken when the
//! image has a writable upper to grow. And /sys/class/uio is rescanned on a
//! short timer, which finds devices that existed before this daemon
//! started (after a restart) and serves kernels without TCMU netlink.
//!
//! A device seen for the first time gets a thread that opens its image
//! with the engine, writes `resultFile`, and serves the ring until the
//! device goes: it hands commands to the device's workers
//! (`Options::workers`), which run them at once and answer each as it
//! finishes (see [`Ring`]). A previous daemon's unfinished commands are
//! still in the ring past `cmd_tail` or in the device's ring journal under
//! /run/obd/tcmu, so a restart picks them up (and none twice).
//!
//! Reply support is a global switch of the kernel that stays on after the
//! daemon that set it is gone, and the kernel then waits for ever for an
//! answer to each new device. So, as tcmu-runner does, the service starts
//! by blocking netlink commands and failing the ones a dead daemon left
//! unanswered (module parameters `block_netlink`, `reset_netlink`), and,
//! unlike libtcmu, it turns reply support off again when it stops, so that
//! devices made while no daemon runs are created (and served from the
//! next daemon's scan) instead of hanging.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use overlaybd::config::{GlobalConfig, ImageConfig};
use overlaybd::stack::Stack;

use crate::exec::{Backend, Disk};
use crate::metrics::Metrics;
use crate::netlink::{self, cmd, errno_text, Event, Events, Incoming};
use crate::ring::{Mailbox, Request, Ring};
use crate::scsi::DiskInfo;
use crate::uio::{self, Mapping, TcmuName, UioEntry};

/// The dev_config prefix the snapshotter writes.
pub const SUBTYPE: &str = "overlaybd";

/// Commands run at once per device unless told otherwise: enough to keep
/// a few registry fetches or disk reads in flight.
pub const DEFAULT_WORKERS: usize = 4;

/// target_core_user's module parameters.
pub const MODULE_PARAMETERS: &str = "/sys/module/target_core_user/parameters";

/// Where ring journals are kept: on tmpfs, surviving the daemon (not a
/// reboot, which takes the devices too).
pub const JOURNAL_DIR: &str = "/run/obd/tcmu";

/// Called with each device's image once it is open, and its config; what
/// it returns is kept as long as the device is served and dropped when the
/// device goes (`obd tcmu` records or replays the config's trace with it).
pub type OnOpen = Arc<dyn Fn(&Arc<Stack>, &ImageConfig) -> Box<dyn Send> + Send + Sync>;

/// Service settings.
pub struct Options {
    pub global: GlobalConfig,
    /// /sys/class/uio.
    pub sys_class_uio: PathBuf,
    /// /dev, where uioN nodes are.
    pub dev: PathBuf,
    pub rescan: Duration,
    /// Commands run at once per device.
    pub workers: usize,
    pub on_open: Option<OnOpen>,
    /// Where each served disk's counters are published (the exporter).
    pub metrics: Option<Arc<Metrics>>,
    /// Listen to and answer TCMU's generic netlink (off: rescans only).
    pub netlink: bool,
    /// target_core_user's module parameters (`block_netlink`, ...).
    pub module_parameters: PathBuf,
    /// Where each device's ring journal is kept (see [`crate::ring`]), so
    /// that commands are answered as they finish; `None`: in ring order.
    pub journal_dir: Option<PathBuf>,
}

impl Options {
    pub fn new(global: GlobalConfig) -> Options {
        Options {
            global,
            sys_class_uio: PathBuf::from(uio::SYS_CLASS_UIO),
            dev: PathBuf::from("/dev"),
            rescan: Duration::from_millis(500),
            workers: DEFAULT_WORKERS,
            on_open: None,
            metrics: None,
            netlink: true,
            module_parameters: PathBuf::from(MODULE_PARAMETERS),
            journal_dir: Some(PathBuf::from(JOURNAL_DIR)),
        }
    }
}

fn log(msg: &str) {
    eprintln!("obd tcmu: {msg}");
}

/// A device's uio node and uio name: one device, for as long as it lives.
type Key = (String, String);

/// What the main loop and a device's thread both know of the device.
#[derive(Default)]
struct DeviceState {
    /// Once the thread has tried: the disk served, or the status (a
    /// negative errno) the kernel is told when the device cannot be served.
    opened: Option<Result<Arc<Disk>, i32>>,
    /// The device id of an ADDED_DEVICE the kernel waits on.
    added_pending: Option<u32>,
    /// The device id of a REMOVED_DEVICE the kernel waits on.
    removed_pending: Option<u32>,
    /// The kernel removed the device, or was told it cannot be served:
    /// it is never served again, though its uio node may linger a moment.
    retired: bool,
    /// The thread has ended.
    finished: bool,
}

type SharedState = Arc<Mutex<DeviceState>>;

fn lock(state: &SharedState) -> MutexGuard<'_, DeviceState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

struct Device {
    handle: JoinHandle<()>,
    quit: Arc<AtomicBool>,
    state: SharedState,
}

/// Send `done` for device `device_id` with `status`, and log it (the VM
/// test looks for these lines).
fn answer(events: &Events, label: &str, done: u8, device_id: u32, status: i32) {
    match events.answer(done, device_id, status) {
        Ok(_) => log(&format!(
            "{label}: answered {} (dev id {device_id}): {}",
            cmd::name(done),
            errno_text(status)
        )),
        Err(e) => log(&format!(
            "{label}: cannot send {} (dev id {device_id}): {e}",
            cmd::name(done)
        )),
    }
}

/// Write one of target_core_user's module parameters.
fn set_parameter(dir: &Path, name: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(name), value)
}

/// Serve devices until `stop` is set.
pub fn run(options: Options, stop: &AtomicBool) {
    let mut service = Service {
        global: Arc::new(options.global.clone()),
        devices: HashMap::new(),
        events: None,
        options,
    };
    // As tcmu-runner: hold new netlink commands off (they fail with
    // EAGAIN) and fail those left unanswered by a daemon that is gone, so
    // no configfs write stays hung; let them through again once the
    // devices that exist are being served.
    let params = service.options.module_parameters.clone();
    let mut blocked = false;
    if service.options.netlink {
        blocked = set_parameter(&params, "block_netlink", "1").is_ok();
        if blocked {
            if let Err(e) = set_parameter(&params, "reset_netlink", "1") {
                log(&format!("netlink: resetting unanswered commands: {e}"));
            }
        }
        service.events = service.start_netlink();
    }
    let mut next_scan = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_scan {
            service.scan();
            next_scan = Instant::now() + service.options.rescan;
            if blocked {
                if let Err(e) = set_parameter(&params, "block_netlink", "0") {
                    log(&format!("netlink: cannot unblock netlink commands: {e}"));
                }
                blocked = false;
            }
        }
        let wait = next_scan.saturating_duration_since(Instant::now());
        service.poll_events(wait, false);
    }
    service.shutdown();
}

struct Service {
    options: Options,
    global: Arc<GlobalConfig>,
    devices: HashMap<Key, Device>,
    events: Option<Arc<Events>>,
}

impl Service {
    /// Join TCM-USER's group and turn kernel command replies on; `None`
    /// (and the rescan alone) when this kernel has no TCMU netlink.
    fn start_netlink(&self) -> Option<Arc<Events>> {
        let events = match Events::connect() {
            Ok(e) => e,
            Err(e) => {
                log(&format!(
                    "netlink: {e}; finding devices by rescanning {} only",
                    self.options.sys_class_uio.display()
                ));
                return None;
            }
        };
        match netlink::set_reply_support(true) {
            Ok(true) => log(&format!(
                "netlink: listening to {} (family {}), kernel command reply support on: \
                 device events are answered",
                netlink::FAMILY_NAME,
                events.family()
            )),
            Ok(false) => {
                log("netlink: this kernel takes no command reply support; listening anyway")
            }
            Err(e) => log(&format!(
                "netlink: cannot turn on command reply support: {e}"
            )),
        }
        Some(Arc::new(events))
    }

    /// Take what came on the netlink socket within `wait` (or just wait).
    fn poll_events(&mut self, wait: Duration, stopping: bool) {
        let Some(events) = self.events.clone() else {
            std::thread::sleep(wait);
            return;
        };
        let incoming = match events.receive(wait) {
            Ok(i) => i,
            Err(e) => {
                // ENOBUFS: events were dropped; the rescan still finds
                // the devices.
                log(&format!("netlink: receiving: {e}"));
                std::thread::sleep(wait.min(Duration::from_millis(100)));
                return;
            }
        };
        for item in incoming {
            match item {
                Incoming::Event(event) => self.on_event(&events, event, stopping),
                Incoming::Refused { seq, errno } => log(&format!(
                    "netlink: the kernel refused answer #{seq}: {}{}",
                    errno_text(errno),
                    if errno == -libc::ENODEV {
                        " (it was not waiting: a device made while reply support was off)"
                    } else {
                        ""
                    }
                )),
                Incoming::Garbled(e) => {
                    log(&format!("netlink: a message that does not parse: {e}"))
                }
            }
        }
    }

    /// Start serving every overlaybd device listed that is not served yet;
    /// forget ended threads (a retired device's only once its node is gone).
    fn scan(&mut self) {
        let found = uio::scan(&self.options.sys_class_uio);
        let listed: HashSet<Key> = found
            .iter()
            .map(|(e, _)| (e.node.clone(), e.name.clone()))
            .collect();
        self.devices.retain(|key, device| {
            let state = lock(&device.state);
            !state.finished || (state.retired && listed.contains(key))
        });
        for (entry, name) in found {
            if name.subtype != SUBTYPE {
                continue;
            }
            let key = (entry.node.clone(), entry.name.clone());
            if !self.devices.contains_key(&key) {
                self.spawn(entry, name, DeviceState::default());
            }
        }
    }

    fn spawn(&mut self, entry: UioEntry, name: TcmuName, state: DeviceState) {
        let key = (entry.node.clone(), entry.name.clone());
        let quit = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(state));
        let device = DeviceOptions {
            global: self.global.clone(),
            dev: self.options.dev.clone(),
            sys: self.options.sys_class_uio.clone(),
            workers: self.options.workers,
            on_open: self.options.on_open.clone(),
            metrics: self.options.metrics.clone(),
            events: self.events.clone(),
            journal_dir: self.options.journal_dir.clone(),
        };
        let (quit2, state2) = (quit.clone(), state.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("tcmu-{}", entry.node))
            .spawn(move || device_thread(&entry, &name, &device, &quit2, &state2));
        match spawned {
            Ok(handle) => {
                self.devices.insert(
                    key,
                    Device {
                        handle,
                        quit,
                        state,
                    },
                );
            }
            Err(e) => {
                log(&format!("cannot start a thread for {}: {e}", key.0));
                // Nobody else answers what the kernel waits on.
                if let (Some(events), Some(id)) = (&self.events, lock(&state).added_pending) {
                    answer(events, &key.0, cmd::ADDED_DEVICE_DONE, id, -libc::EAGAIN);
                }
            }
        }
    }

    /// The device served on uio `node`, if any (not one already removed).
    fn live_device(&self, node: &str) -> Option<&Device> {
        self.devices
            .iter()
            .filter(|(key, d)| key.0 == node && !lock(&d.state).retired)
            .map(|(_, d)| d)
            .next()
    }

    fn on_event(&mut self, events: &Events, event: Event, stopping: bool) {
        let what = cmd::name(event.command);
        let (Some(node), Some(uio_name)) = (event.node(), event.device.clone()) else {
            log(&format!(
                "netlink: {what} without a minor or device name: dropped"
            ));
            return;
        };
        // Version 1 kernels neither send a device id nor wait for answers.
        let device_id = match (event.version, event.device_id) {
            (0 | 1, _) => None,
            (_, Some(id)) => Some(id),
            (_, None) => {
                log(&format!(
                    "netlink: {what} for {node} without a device id: dropped"
                ));
                return;
            }
        };
        let label = format!("{node} ({uio_name})");
        log(&format!(
            "{label}: netlink {what}{}",
            device_id
                .map(|id| format!(" (dev id {id})"))
                .unwrap_or_default()
        ));
        let reply = |done: u8, status: i32| {
            if let Some(id) = device_id {
                answer(events, &label, done, id, status);
            }
        };
        match event.command {
            cmd::ADDED_DEVICE => {
                let name = TcmuName::parse(&uio_name).filter(|n| n.subtype == SUBTYPE);
                let Some(name) = name else {
                    // As libtcmu for a device no handler takes.
                    log(&format!("{label}: not an {SUBTYPE}/<config> device"));
                    return reply(cmd::ADDED_DEVICE_DONE, -libc::ENOENT);
                };
                if stopping {
                    log(&format!("{label}: obd tcmu is stopping"));
                    return reply(cmd::ADDED_DEVICE_DONE, -libc::EAGAIN);
                }
                let key = (node.clone(), uio_name.clone());
                if let Some(device) = self.devices.get(&key) {
                    let mut state = lock(&device.state);
                    if !state.retired && !state.finished {
                        // Found by a rescan first: answer once it is open.
                        match &state.opened {
                            None => state.added_pending = device_id,
                            Some(outcome) => {
                                let status = outcome.as_ref().err().copied().unwrap_or(0);
                                state.retired = status != 0;
                                drop(state);
                                reply(cmd::ADDED_DEVICE_DONE, status);
                            }
                        }
                        return;
                    }
                }
                // New (or a new device on a reused node and name).
                let entry = match uio::entry(&self.options.sys_class_uio, &node) {
                    Some((entry, _)) if entry.name == uio_name => entry,
                    _ => UioEntry {
                        node: node.clone(),
                        name: uio_name.clone(),
                        map_size: 0,
                    },
                };
                let state = DeviceState {
                    added_pending: device_id,
                    ..DeviceState::default()
                };
                self.spawn(entry, name, state);
            }
            cmd::REMOVED_DEVICE => {
                let Some(device) = self.live_device(&node) else {
                    // As libtcmu: nothing to let go of.
                    return reply(cmd::REMOVED_DEVICE_DONE, 0);
                };
                device.quit.store(true, Ordering::Relaxed);
                let mut state = lock(&device.state);
                state.retired = true;
                if state.finished {
                    drop(state);
                    reply(cmd::REMOVED_DEVICE_DONE, 0);
                } else {
                    // The thread answers once it has let go of the ring.
                    state.removed_pending = device_id;
                }
            }
            cmd::RECONFIG_DEVICE => {
                let opened = self
                    .live_device(&node)
                    .map(|d| lock(&d.state).opened.clone());
                let status = reconfigure(&label, &event, opened);
                reply(cmd::RECONFIG_DEVICE_DONE, status);
            }
            other => log(&format!("netlink: command {other} ignored")),
        }
    }

    /// Stop: reply support off first (no configfs write waits on this
    /// daemon any more), answer what already came, end every thread.
    fn shutdown(&mut self) {
        if self.events.is_some() {
            match netlink::set_reply_support(false) {
                Ok(_) => log("netlink: kernel command reply support off (no daemon answers now)"),
                Err(e) => log(&format!(
                    "netlink: cannot turn command reply support off: {e}"
                )),
            }
            self.poll_events(Duration::ZERO, true);
        }
        for device in self.devices.values() {
            device.quit.store(true, Ordering::Relaxed);
        }
        for (_, device) in self.devices.drain() {
            let _ = device.handle.join();
        }
    }
}

/// The status for a RECONFIG_DEVICE of a device whose thread reached
/// `opened` (`None`: not served here), as tcmu-runner decides, with one
/// addition: dev_size is taken when it is the size served, or when the
/// image can grow to it (a writable upper; the initiator is told with a
/// unit attention); dev_config and the write cache never change.
fn reconfigure(label: &str, event: &Event, opened: Option<Option<Result<Arc<Disk>, i32>>>) -> i32 {
    let say = |m: String| log(&format!("{label}: {m}"));
    let Some(opened) = opened else {
        say("reconfiguring a device not served here".into());
        return -libc::ENODEV;
    };
    if let Some(config) = &event.dev_config {
        say(format!(
            "dev_config '{config}': a served device's config cannot change (nor in tcmu-runner); \
             remove the device and create it again"
        ));
        return -libc::EOPNOTSUPP;
    }
    if let Some(size) = event.dev_size {
        let disk = match opened {
            Some(Ok(disk)) => disk,
            None => {
                say(format!("dev_size {size}: the image is still being opened"));
                return -libc::EAGAIN;
            }
            Some(Err(_)) => {
                say(format!(
                    "dev_size {size}: the device is not served (its image failed)"
                ));
                return -libc::ENODEV;
            }
        };
        let served = disk.blocks() * u64::from(disk.info.block_size);
        return match disk.grow(size) {
            Ok(()) if size == served => {
                say(format!("dev_size {size}: the size served"));
                0
            }
            Ok(()) => {
                say(format!(
                    "dev_size {size}: grown from {served} bytes (the initiator is told: \
                     capacity data has changed)"
                ));
                0
            }
            Err((status, reason)) => {
                say(format!("dev_size {size}: not taken: {reason}"));
                status
            }
        };
    }
    if let Some(write_cache) = event.write_cache {
        say(format!(
            "emulate_write_cache {write_cache}: not reconfigurable (nor in tcmu-runner); \
             the disk reports a write cache and honours SYNCHRONIZE CACHE"
        ));
        return -libc::EOPNOTSUPP;
    }
    say("a reconfiguration of nothing obd knows".into());
    -libc::EOPNOTSUPP
}

/// A stable 64-bit FNV-1a hash, for serial numbers and identifiers: FNV's
/// offset basis xor `seed` as the starting state. The values must not change
/// (a disk keeps its serial across daemon restarts and upgrades), so not
/// std's `DefaultHasher`, whose algorithm may.
fn fnv64(seed: u64, bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    let mut hasher = fnv::FnvHasher::with_key(OFFSET_BASIS ^ seed);
    hasher.write(bytes);
    hasher.finish()
}

/// What the disk reports about itself, derived from its config path so it
/// stays the same across daemon restarts.
pub fn disk_info(config: &Path) -> DiskInfo {
    let key = config.as_os_str().as_encoded_bytes();
    let (a, b) = (fnv64(0, key), fnv64(1, key));
    let mut id = [0u8; 12];
    id[..8].copy_from_slice(&a.to_be_bytes());
    id[8..].copy_from_slice(&b.to_be_bytes()[..4]);
    DiskInfo {
        block_size: 512,
        blocks: 0,
        writable: false,
        serial: format!("{a:016x}"),
        id,
        max_transfer_blocks: 2048,
        max_unmap_blocks: 1 << 22,
        max_unmap_descriptors: 64,
    }
}

/// What each device's thread gets.
struct DeviceOptions {
    global: Arc<GlobalConfig>,
    dev: PathBuf,
    sys: PathBuf,
    workers: usize,
    on_open: Option<OnOpen>,
    metrics: Option<Arc<Metrics>>,
    /// Where ADDED_DEVICE and REMOVED_DEVICE are answered.
    events: Option<Arc<Events>>,
    journal_dir: Option<PathBuf>,
}

/// A device's thread: serve it, telling the kernel (if it waits) when the
/// device can be served and when it has been let go of.
fn device_thread(
    entry: &UioEntry,
    name: &TcmuName,
    options: &DeviceOptions,
    quit: &AtomicBool,
    state: &SharedState,
) {
    let label = format!("{} ({})", entry.node, entry.name);
    let report = |outcome: Result<Arc<Disk>, i32>| {
        let status = outcome.as_ref().err().copied().unwrap_or(0);
        let pending = {
            let mut s = lock(state);
            s.opened = Some(outcome);
            let pending = s.added_pending.take();
            if pending.is_some() && status != 0 {
                s.retired = true;
            }
            pending
        };
        match (pending, &options.events) {
            (Some(id), Some(events)) => {
                answer(events, &label, cmd::ADDED_DEVICE_DONE, id, status);
                // Refused: the kernel drops the device.
                status == 0
            }
            _ => true,
        }
    };
    serve_device(entry, name, options, quit, &report);
    let removed = {
        let mut s = lock(state);
        s.finished = true;
        // Let go of the image now, not when the main loop forgets the
        // device.
        if matches!(s.opened, Some(Ok(_))) {
            s.opened = Some(Err(-libc::ENODEV));
        }
        // Never opened (it could not even start): no answer was given.
        let added = s.added_pending.take();
        (s.removed_pending.take(), added)
    };
    if let Some(events) = &options.events {
        if let Some(id) = removed.0 {
            answer(events, &label, cmd::REMOVED_DEVICE_DONE, id, 0);
        }
        if let Some(id) = removed.1 {
            answer(events, &label, cmd::ADDED_DEVICE_DONE, id, -libc::EIO);
        }
    }
}

/// The status the kernel is told when a device's image cannot be opened:
/// ENOENT when its config does not exist, EINVAL for anything else (the
/// reason is in the log and the resultFile).
fn open_failure_status(config_path: &Path) -> i32 {
    if config_path.exists() {
        -libc::EINVAL
    } else {
        -libc::ENOENT
    }
}

/// Open the image a device's config names and report the outcome in its
/// resultFile. `Err` carries the reason.
pub fn open_image(
    config_path: &Path,
    global: &GlobalConfig,
) -> Result<(Arc<Stack>, ImageConfig), String> {
    let config = ImageConfig::load(config_path).map_err(|e| e.to_string())?;
    let writable = config.upper.is_some();
    let opened = overlaybd::image::open_config_global(&config, global, writable);
    let outcome = match &opened {
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = config.write_result(outcome) {
        log(&format!(
            "{}: cannot write resultFile: {e}",
            config_path.display()
        ));
    }
    opened
        .map(|stack| (Arc::new(stack), config))
        .map_err(|e| e.to_string())
}

/// Serve one device until it goes or `quit` is set. `report` is told, once,
/// whether the device can be served (its size) or not (the status for the
/// kernel) before any command is taken; when it returns false the device
/// is not served at all (the kernel was told it cannot be).
fn serve_device(
    entry: &UioEntry,
    name: &TcmuName,
    options: &DeviceOptions,
    quit: &AtomicBool,
    report: &dyn Fn(Result<Arc<Disk>, i32>) -> bool,
) {
    let (global, dev, sys, workers) = (
        &*options.global,
        &options.dev,
        &options.sys,
        options.workers,
    );
    let config_path = name.config_path();
    let id = name
        .dev_id
        .as_ref()
        .map(|id| format!(", dev_id {id}"))
        .unwrap_or_default();
    let label = format!(
        "{} ({}, {}{id})",
        entry.node,
        name.device,
        config_path.display()
    );
    let say = |m: &str| log(&format!("{label}: {m}"));
    // The ring first: a device whose ring cannot be mapped cannot be
    // served, whatever its image.
    let map_size = ring_map_size(sys, entry);
    let mapping = match Mapping::open(&dev.join(&entry.node), map_size) {
        Ok(m) => m,
        Err(e) => {
            say(&format!("failed: cannot map /dev/{}: {e}", entry.node));
            report(Err(-e.raw_os_error().unwrap_or(libc::EIO)));
            return;
        }
    };
    let journal = options
        .journal_dir
        .as_deref()
        .and_then(|dir| open_journal(dir, entry, name, &mapping));
    let opened = Mailbox::read(&mapping).and_then(|mb| match &journal {
        Some((file, identity, _)) => Ring::with_journal(&mapping, mb, file, *identity, &|m| {
            say(&format!("journal: {m}"))
        }),
        None => Ring::new(&mapping, mb),
    });
    let ring = match opened {
        Ok(r) => r,
        Err(e) => {
            say(&format!("failed: {e}"));
            report(Err(-libc::EIO));
            return;
        }
    };
    // Kept until the device goes (a trace recording, replay...).
    let mut _on_open_guard = None;
    let (backend, outcome) = match open_image(&config_path, global) {
        Ok((stack, config)) => {
            say(&format!(
                "serving {} bytes{}",
                stack.size(),
                if stack.writable() { ", writable" } else { "" }
            ));
            _on_open_guard = options.on_open.as_ref().map(|f| f(&stack, &config));
            (Some(stack as Arc<dyn Backend>), Ok(()))
        }
        Err(reason) => {
            say(&format!("failed: {reason}"));
            (None, Err(open_failure_status(&config_path)))
        }
    };
    // Without an image the ring is still served, answering NOT READY, so
    // the kernel never waits on a command nobody completes.
    let mut disk = Disk::new(disk_info(&config_path), backend.clone());
    disk.trace = std::env::var_os("OBD_TCMU_TRACE").is_some_and(|v| v == "1");
    let disk = Arc::new(disk);
    if !report(outcome.map(|()| disk.clone())) {
        return;
    }
    let metrics_key = config_path.display().to_string();
    if let Some(metrics) = &options.metrics {
        metrics.add(&metrics_key, disk.stats.clone());
    }
    /// Takes the disk off the exporter when serving ends, however it ends.
    struct Unpublish<'a>(Option<&'a Metrics>, &'a str);
    impl Drop for Unpublish<'_> {
        fn drop(&mut self) {
            if let Some(metrics) = self.0 {
                metrics.remove(self.1);
            }
        }
    }
    let _unpublish = Unpublish(options.metrics.as_deref(), &metrics_key);
    say(&format!(
        "ring of {} bytes in a {}-byte mapping, {workers} workers, answers {}",
        ring.size(),
        entry.map_size,
        if ring.out_of_order() {
            "as commands finish"
        } else {
            "in ring order"
        }
    ));
    let name_file = sys.join(&entry.node).join("name");
    let broken = AtomicBool::new(false);
    let kicks = Kicks::default();
    let (to_workers, requests) = mpsc::channel::<Request>();
    let requests = Mutex::new(requests);
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            let spawned = std::thread::Builder::new()
                .name(format!("tcmu-{}", entry.node))
                .spawn_scoped(scope, || {
                    work(&ring, &disk, &mapping, &kicks, &requests, &broken, &say)
                });
            if let Err(e) = spawned {
                say(&format!("cannot start a worker: {e}"));
                broken.store(true, Ordering::Relaxed);
                break;
            }
        }
        while !quit.load(Ordering::Relaxed) && !broken.load(Ordering::Relaxed) {
            match ring.take() {
                Ok((taken, moved)) => {
                    if moved {
                        if let Err(e) = mapping.kick() {
                            say(&format!("cannot notify the kernel: {e}"));
                            break;
                        }
                    }
                    for request in taken {
                        // Workers leave only once this sender is dropped.
                        let _ = to_workers.send(request);
                    }
                }
                Err(e) => {
                    say(&format!("stopping: {e}"));
                    break;
                }
            }
            match mapping.wait(1000) {
                Ok(true) => {}
                Ok(false) => {
                    // Quiet for a second: check the device still exists.
                    let still = std::fs::read_to_string(&name_file)
                        .is_ok_and(|n| n.trim_end_matches('\n') == entry.name);
                    if !still {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        // Workers finish what they have and leave.
        drop(to_workers);
    });
    // Nothing owed, nothing journalled: the next daemon needs no journal.
    if let Some((_, _, path)) = &journal {
        if ring.settled() {
            let _ = std::fs::remove_file(path);
        }
    }
    if let Some(b) = &backend {
        if let Err(e) = b.flush() {
            say(&format!("flushing the writable layer: {e}"));
        }
    }
    say("device removed");
}

/// Open (or create) the journal of the device on `entry`: a file in `dir`
/// named from the device's uio name, so the next daemon for the device
/// finds it, mapped shared (a daemon that dies leaves what it wrote). Its
/// identity names this device node, so a device made anew under the same
/// name does not take an old journal. `None` (logged once per daemon)
/// when it cannot be had: commands are then answered in ring order.
fn open_journal(
    dir: &Path,
    entry: &UioEntry,
    name: &TcmuName,
    mapping: &Mapping,
) -> Option<(Mapping, u64, PathBuf)> {
    use std::hash::Hasher;
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    static LOGGED: AtomicBool = AtomicBool::new(false);
    let mut h = fnv::FnvHasher::default();
    h.write(entry.name.as_bytes());
    let safe: String = name
        .device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let path = dir.join(format!("{safe}-{:016x}.journal", h.finish()));
    let opened = (|| -> std::io::Result<(Mapping, u64)> {
        let node = mapping.node_identity()?;
        for v in node {
            h.write_u64(v);
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        let size = crate::ring::JOURNAL_SIZE;
        if file.metadata()?.len() != size as u64 {
            // Written out, not just sized: a tmpfs page that cannot be had
            // fails here, not as a SIGBUS in the mapping later.
            file.set_len(0)?;
            file.write_all(&vec![0u8; size])?;
        }
        drop(file);
        Ok((Mapping::open(&path, size)?, h.finish()))
    })();
    match opened {
        Ok((m, identity)) => Some((m, identity, path)),
        Err(e) => {
            if !LOGGED.swap(true, Ordering::Relaxed) {
                log(&format!(
                    "no ring journal ({}: {e}): commands are answered in ring order",
                    path.display()
                ));
            }
            None
        }
    }
}

/// The size of the device's map0. A device found the moment it appears
/// (its ADDED_DEVICE event, or a scan that raced its registration) may not
/// show its map in sysfs yet: seen once in the bench VM as "uio map0 has
/// size 0" on the first device after a daemon start, which failed the
/// snapshotter's `enable` with EIO. So a size of 0 is read again for up
/// to 2 s before the device is given up.
fn ring_map_size(sys_class_uio: &Path, entry: &UioEntry) -> usize {
    let mut size = entry.map_size;
    for _ in 0..20 {
        if size > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        size = match uio::entry(sys_class_uio, &entry.node) {
            Some((now, _)) if now.name == entry.name => now.map_size,
            _ => 0,
        };
    }
    size
}

/// Tells the kernel that answers are ready, once for many. Each kick is a
/// write to the uio node in which target_core_user takes the ring's lock
/// and completes every answer up to `cmd_tail`; with many commands in
/// flight, workers that finish while another worker's kick runs leave it
/// to that worker to kick once more, instead of queueing on the kernel's
/// lock one after another (as libtcmu's `tcmulib_processing_complete` is
/// coalesced by the reference).
#[derive(Default)]
struct Kicks {
    /// Finished answers not yet covered by a kick that began after them.
    pending: AtomicUsize,
}

impl Kicks {
    /// Call after an answer moved `cmd_tail`. Either this thread kicks,
    /// until no answer came in during its last kick, or a thread that is
    /// kicking now will kick again after seeing this one.
    fn kick(&self, mapping: &Mapping) -> std::io::Result<()> {
        self.kick_with(|| mapping.kick())
    }

    fn kick_with(&self, kick: impl Fn() -> std::io::Result<()>) -> std::io::Result<()> {
        let mut seen = self.pending.fetch_add(1, Ordering::AcqRel) + 1;
        if seen != 1 {
            return Ok(());
        }
        loop {
            if let Err(e) = kick() {
                // The device stops on this error; nobody waits on the count.
                self.pending.store(0, Ordering::Release);
                return Err(e);
            }
            match self
                .pending
                .compare_exchange(seen, 0, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(now) => seen = now,
            }
        }
    }
}

/// A device's worker: run requests as they come and answer them; tell
/// the kernel whenever `cmd_tail` moved.
fn work(
    ring: &Ring<'_, Mapping>,
    disk: &Disk,
    mapping: &Mapping,
    kicks: &Kicks,
    requests: &Mutex<mpsc::Receiver<Request>>,
    broken: &AtomicBool,
    say: &(dyn Fn(&str) + Sync),
) {
    loop {
        let next = requests.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(request) = next else { return };
        let outcome = ring.execute(&request, disk, say);
        match ring.finish(&request, &outcome) {
            Ok(true) => {
                if let Err(e) = kicks.kick(mapping) {
                    say(&format!("cannot notify the kernel: {e}"));
                    broken.store(true, Ordering::Relaxed);
                }
            }
            Ok(false) => {}
            Err(e) => {
                say(&format!("stopping: {e}"));
                broken.store(true, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every answer is seen by a kick that began after it was written,
    /// however the workers' kicks interleave, and fewer kicks are made
    /// than answers when they overlap.
    #[test]
    fn every_answer_is_covered_by_a_later_kick() {
        use std::sync::atomic::AtomicU64;
        const THREADS: u64 = 4;
        const ANSWERS: u64 = 2000;
        let kicks = Kicks::default();
        // What the "kernel" has completed: the count of answers written
        // when the last kick began.
        let written = AtomicU64::new(0);
        let completed = AtomicU64::new(0);
        let made = AtomicU64::new(0);
        let kick = || {
            made.fetch_add(1, Ordering::Relaxed);
            let now = written.load(Ordering::Acquire);
            completed.fetch_max(now, Ordering::AcqRel);
            std::thread::yield_now();
            Ok(())
        };
        std::thread::scope(|scope| {
            for _ in 0..THREADS {
                scope.spawn(|| {
                    for _ in 0..ANSWERS {
                        written.fetch_add(1, Ordering::AcqRel);
                        kicks.kick_with(kick).unwrap();
                    }
                });
            }
        });
        assert_eq!(completed.load(Ordering::Acquire), THREADS * ANSWERS);
        assert_eq!(kicks.pending.load(Ordering::Acquire), 0);
        assert!(made.load(Ordering::Relaxed) <= THREADS * ANSWERS);
    }

    /// An answer written while another worker's kick runs is left to
    /// that worker, which kicks once more for it.
    #[test]
    fn an_answer_during_a_kick_gets_one_more_kick() {
        use std::sync::mpsc::channel;
        let kicks = Kicks::default();
        let made = AtomicUsize::new(0);
        let (in_kick, kicking) = channel::<()>();
        let (go_on, wait) = channel::<()>();
        let wait = Mutex::new(wait);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                kicks
                    .kick_with(|| {
                        if made.fetch_add(1, Ordering::AcqRel) == 0 {
                            in_kick.send(()).unwrap();
                            wait.lock().unwrap().recv().unwrap();
                        }
                        Ok(())
                    })
                    .unwrap();
            });
            kicking.recv().unwrap();
            // The second worker's answer: no kick of its own.
            kicks.kick_with(|| panic!("a second kicker")).unwrap();
            go_on.send(()).unwrap();
        });
        assert_eq!(made.load(Ordering::Acquire), 2);
        assert_eq!(kicks.pending.load(Ordering::Acquire), 0);
    }

    /// A failing kick is returned, and the next answer kicks again.
    #[test]
    fn a_failed_kick_is_reported_and_not_left_pending() {
        let kicks = Kicks::default();
        let failing = || Err(std::io::Error::other("gone"));
        assert!(kicks.kick_with(failing).is_err());
        let made = AtomicUsize::new(0);
        kicks
            .kick_with(|| {
                made.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
            .unwrap();
        assert_eq!(made.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn disk_identity_is_stable_per_config() {
        let a = disk_info(Path::new("/a/config.v1.json"));
        assert_eq!(a, disk_info(Path::new("/a/config.v1.json")));
        assert_ne!(a.id, disk_info(Path::new("/b/config.v1.json")).id);
        assert_eq!(a.serial.len(), 16);
    }

    fn reconfig(f: impl FnOnce(&mut Event)) -> Event {
        let mut event = Event {
            command: cmd::RECONFIG_DEVICE,
            version: 2,
            ..Event::default()
        };
        f(&mut event);
        event
    }

    /// A backend that only grows, up to `limit` bytes.
    struct Growable {
        size: std::sync::atomic::AtomicU64,
        writable: bool,
    }

    impl Backend for Growable {
        fn size(&self) -> u64 {
            self.size.load(Ordering::Relaxed)
        }
        fn writable(&self) -> bool {
            self.writable
        }
        fn read(&self, buf: &mut [u8], _: u64) -> Result<(), String> {
            buf.fill(0);
            Ok(())
        }
        fn write(&self, _: &[u8], _: u64) -> Result<(), String> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), String> {
            Ok(())
        }
        fn flush(&self) -> Result<(), String> {
            Ok(())
        }
        fn grow(&self, new_size: u64) -> Result<(), String> {
            if new_size > 1 << 30 {
                return Err("the disk is full".into());
            }
            self.size.store(new_size, Ordering::Relaxed);
            Ok(())
        }
    }

    fn disk(writable: bool) -> Arc<Disk> {
        let backend = Growable {
            size: (64 << 20).into(),
            writable,
        };
        Arc::new(Disk::new(
            disk_info(Path::new("/c.json")),
            Some(Arc::new(backend)),
        ))
    }

    #[test]
    fn reconfiguration_takes_the_size_served_or_a_larger_one_it_can_grow_to() {
        let served = || Some(Some(Ok(disk(true))));
        let size = |bytes: u64| reconfig(|e| e.dev_size = Some(bytes));
        assert_eq!(reconfigure("t", &size(64 << 20), served()), 0);
        let rw = disk(true);
        assert_eq!(
            reconfigure("t", &size(128 << 20), Some(Some(Ok(rw.clone())))),
            0
        );
        assert_eq!(rw.blocks(), (128 << 20) / 512);
        // The next command is told, once.
        let mut buf = vec![0u8; 512];
        let read10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let first = rw.execute(&read10, &mut buf);
        assert_eq!(
            first.sense,
            Some(crate::scsi::Sense::CAPACITY_DATA_HAS_CHANGED)
        );
        assert_eq!(rw.execute(&read10, &mut buf).status, crate::scsi::GOOD);
        assert_eq!(reconfigure("t", &size(32 << 20), served()), -libc::EINVAL);
        assert_eq!(
            reconfigure("t", &size((64 << 20) + 100), served()),
            -libc::EINVAL
        );
        assert_eq!(reconfigure("t", &size(2 << 30), served()), -libc::EIO);
        let read_only = || Some(Some(Ok(disk(false))));
        assert_eq!(reconfigure("t", &size(64 << 20), read_only()), 0);
        assert_eq!(
            reconfigure("t", &size(128 << 20), read_only()),
            -libc::EOPNOTSUPP
        );
        assert_eq!(reconfigure("t", &size(64 << 20), Some(None)), -libc::EAGAIN);
        assert_eq!(
            reconfigure("t", &size(64 << 20), Some(Some(Err(-2)))),
            -libc::ENODEV
        );
        assert_eq!(reconfigure("t", &size(64 << 20), None), -libc::ENODEV);
        let config = reconfig(|e| e.dev_config = Some("overlaybd//x.json".into()));
        assert_eq!(reconfigure("t", &config, served()), -libc::EOPNOTSUPP);
        let cache = reconfig(|e| e.write_cache = Some(0));
        assert_eq!(reconfigure("t", &cache, served()), -libc::EOPNOTSUPP);
        assert_eq!(
            reconfigure("t", &reconfig(|_| {}), served()),
            -libc::EOPNOTSUPP
        );
    }

    #[test]
    fn open_failures_tell_missing_from_bad() {
        assert_eq!(
            open_failure_status(Path::new("/nonexistent/config.v1.json")),
            -libc::ENOENT
        );
        let file = std::env::temp_dir().join(format!("obd-bad-config-{}", std::process::id()));
        std::fs::write(&file, "not json").unwrap();
        assert_eq!(open_failure_status(&file), -libc::EINVAL);
        std::fs::remove_file(&file).unwrap();
    }

    /// A device whose map is not in sysfs yet when it is found gets its
    /// size once it shows, not a failure.
    #[test]
    fn a_map_that_shows_late_is_waited_for() {
        let dir = std::env::temp_dir().join(format!("obd-tcmu-late-{}", std::process::id()));
        let name = "tcm-user/1/late/overlaybd//c.json";
        let uio0 = dir.join("uio0");
        std::fs::create_dir_all(uio0.join("maps/map0")).unwrap();
        std::fs::write(uio0.join("name"), format!("{name}\n")).unwrap();
        let entry = UioEntry {
            node: "uio0".into(),
            name: name.into(),
            map_size: 0,
        };
        let size_file = uio0.join("maps/map0/size");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(250));
            std::fs::write(size_file, "0x40800000\n").unwrap();
        });
        assert_eq!(ring_map_size(&dir, &entry), 0x4080_0000);
        writer.join().unwrap();
        // Never there: given up (0), in bounded time.
        let gone = UioEntry {
            node: "uio1".into(),
            ..entry
        };
        let start = Instant::now();
        assert_eq!(ring_map_size(&dir, &gone), 0);
        assert!(start.elapsed() < Duration::from_secs(10));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_service_stops_when_asked() {
        let dir = std::env::temp_dir().join(format!("obd-tcmu-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let options = Options {
            sys_class_uio: dir.clone(),
            rescan: Duration::from_millis(20),
            netlink: false,
            ..Options::new(GlobalConfig::default())
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let service = std::thread::spawn(move || run(options, &stop2));
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        service.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_config_fails_with_a_reason() {
        let err = match open_image(
            Path::new("/nonexistent/config.v1.json"),
            &GlobalConfig::default(),
        ) {
            Err(e) => e,
            Ok(_) => panic!("opened a missing config"),
        };
        assert!(err.contains("/nonexistent/config.v1.json"), "{err}");
    }
}
