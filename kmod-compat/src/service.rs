//! The TCMU service: every `overlaybd/<config>` TCMU device on this host,
//! a thread each that takes commands off its ring, and a few workers each
//! that run them.
//!
//! Devices are found by rescanning /sys/class/uio on a short timer (uio
//! nodes appear without any event we could wait on short of netlink or
//! udev, and a scan is a handful of small reads). A device seen for the
//! first time — created while we run, or left by a previous daemon — gets
//! a thread that opens its image with the engine, writes `resultFile`,
//! and serves the ring until the uio node goes away: it hands commands to
//! the device's workers (`Options::workers`), which run them at once and
//! answer them in ring order (see [`Ring`]). A previous daemon's
//! unfinished commands are still in the ring past `cmd_tail`, so a restart
//! simply picks them up.
//!
//! Netlink: target_core_user announces devices on a generic-netlink
//! multicast group and waits for a reply only after a daemon has
//! registered for replies (TCMU_CMD_SET_FEATURES) and the device's
//! `nl_reply_supported` attribute is positive. This daemon never does
//! either, so the kernel never waits on it and no netlink code is needed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use overlaybd::config::{GlobalConfig, ImageConfig};
use overlaybd::stack::Stack;

use crate::exec::{Backend, Disk};
use crate::metrics::Metrics;
use crate::ring::{Mailbox, Request, Ring};
use crate::scsi::DiskInfo;
use crate::uio::{self, Mapping, TcmuName, UioEntry};

/// The dev_config prefix the snapshotter writes.
pub const SUBTYPE: &str = "overlaybd";

/// Commands run at once per device unless told otherwise: enough to keep
/// a few registry fetches or disk reads in flight.
pub const DEFAULT_WORKERS: usize = 4;

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
        }
    }
}

fn log(msg: &str) {
    eprintln!("obd tcmu: {msg}");
}

/// Serve devices until `stop` is set (never, for the daemon).
pub fn run(options: Options, stop: &AtomicBool) {
    let global = Arc::new(options.global);
    let mut active: HashMap<(String, String), (JoinHandle<()>, Arc<AtomicBool>)> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        active.retain(|_, (handle, _)| !handle.is_finished());
        for (entry, name) in uio::scan(&options.sys_class_uio) {
            if name.subtype != SUBTYPE {
                continue;
            }
            let key = (entry.node.clone(), entry.name.clone());
            if active.contains_key(&key) {
                continue;
            }
            let quit = Arc::new(AtomicBool::new(false));
            let device = DeviceOptions {
                global: global.clone(),
                dev: options.dev.clone(),
                sys: options.sys_class_uio.clone(),
                workers: options.workers,
                on_open: options.on_open.clone(),
                metrics: options.metrics.clone(),
            };
            let quit2 = quit.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("tcmu-{}", entry.node))
                .spawn(move || serve_device(&entry, &name, &device, &quit2));
            match spawned {
                Ok(handle) => {
                    active.insert(key, (handle, quit));
                }
                Err(e) => log(&format!("cannot start a thread for {}: {e}", key.0)),
            }
        }
        std::thread::sleep(options.rescan);
    }
    for (_, (handle, quit)) in active {
        quit.store(true, Ordering::Relaxed);
        let _ = handle.join();
    }
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

fn serve_device(entry: &UioEntry, name: &TcmuName, options: &DeviceOptions, quit: &AtomicBool) {
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
    // Kept until the device goes (a trace recording, replay...).
    let mut _on_open_guard = None;
    let backend = match open_image(&config_path, global) {
        Ok((stack, config)) => {
            log(&format!(
                "{label}: serving {} bytes{}",
                stack.size(),
                if stack.writable() { ", writable" } else { "" }
            ));
            _on_open_guard = options.on_open.as_ref().map(|f| f(&stack, &config));
            Some(stack as Arc<dyn Backend>)
        }
        Err(reason) => {
            // Still serve the ring, answering NOT READY, so the kernel
            // never waits on a command nobody completes.
            log(&format!("{label}: failed: {reason}"));
            None
        }
    };
    let mut disk = Disk::new(disk_info(&config_path), backend.clone());
    disk.trace = std::env::var_os("OBD_TCMU_TRACE").is_some_and(|v| v == "1");
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
    let mapping = match Mapping::open(&dev.join(&entry.node), entry.map_size) {
        Ok(m) => m,
        Err(e) => {
            log(&format!("{label}: cannot map /dev/{}: {e}", entry.node));
            return;
        }
    };
    let say = |m: &str| log(&format!("{label}: {m}"));
    let ring = match Mailbox::read(&mapping).and_then(|mb| Ring::new(&mapping, mb)) {
        Ok(r) => r,
        Err(e) => {
            say(&e);
            return;
        }
    };
    say(&format!(
        "ring of {} bytes in a {}-byte mapping, {workers} workers",
        ring.size(),
        entry.map_size
    ));
    let name_file = sys.join(&entry.node).join("name");
    let broken = AtomicBool::new(false);
    let (to_workers, requests) = mpsc::channel::<Request>();
    let requests = Mutex::new(requests);
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            let spawned = std::thread::Builder::new()
                .name(format!("tcmu-{}", entry.node))
                .spawn_scoped(scope, || {
                    work(&ring, &disk, &mapping, &requests, &broken, &say)
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
    if let Some(b) = &backend {
        if let Err(e) = b.flush() {
            say(&format!("flushing the writable layer: {e}"));
        }
    }
    say("device removed");
}

/// A device's worker: run requests as they come and answer them; tell
/// the kernel whenever `cmd_tail` moved.
fn work(
    ring: &Ring<'_, Mapping>,
    disk: &Disk,
    mapping: &Mapping,
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
                if let Err(e) = mapping.kick() {
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

    #[test]
    fn disk_identity_is_stable_per_config() {
        let a = disk_info(Path::new("/a/config.v1.json"));
        assert_eq!(a, disk_info(Path::new("/a/config.v1.json")));
        assert_ne!(a.id, disk_info(Path::new("/b/config.v1.json")).id);
        assert_eq!(a.serial.len(), 16);
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
