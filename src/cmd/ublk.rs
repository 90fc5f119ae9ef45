//! What `obd add` and `obd recover` share: opening the image, starting the
//! daemon that serves it (in the background unless asked not to), and
//! telling the caller — and the config's `resultFile` — how that went.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use overlaybd::config::{GlobalConfig, ImageConfig, GLOBAL_CONFIG_PATH};
use overlaybd::live::LiveStack;
use overlaybd::stack::Stack;
use trace_tools::Session;
use ublk_target::state::DeviceRecord;
use ublk_target::{Options, Start};

/// The global config an image is served with: registry lowers are read
/// through its cache with its credentials, and its prefetch settings drive
/// trace replay.
#[derive(Clone, Debug)]
pub struct Global {
    /// Where it came from (none: the defaults).
    pub path: Option<PathBuf>,
    pub config: GlobalConfig,
}

impl Global {
    /// `path`, else /etc/overlaybd/overlaybd.json if it exists, else the
    /// defaults (as `obd export --global-config`). A config that cannot be
    /// read fails the start, and says so in the resultFile.
    pub fn load(loaded: &LoadedConfig, path: Option<&Path>) -> Result<Global> {
        let path = match path {
            Some(path) => Some(std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())),
            None => Some(PathBuf::from(GLOBAL_CONFIG_PATH)).filter(|p| p.exists()),
        };
        let config = match &path {
            Some(p) => GlobalConfig::load(p).map_err(|e| {
                loaded.fail(format!(
                    "cannot load the global config {}: {e}",
                    p.display()
                ))
            })?,
            None => GlobalConfig::default(),
        };
        Ok(Global { path, config })
    }
}

/// Queue options shared by `add` and `recover`.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct QueueArgs {
    /// Hardware queues (one serving thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 64)]
    pub depth: u16,
}

/// The command-line form of `queues`, for the daemon's arguments.
pub fn queue_args(queues: QueueArgs) -> [std::ffi::OsString; 4] {
    [
        "--queues".into(),
        queues.queues.to_string().into(),
        "--depth".into(),
        queues.depth.to_string().into(),
    ]
}

impl Mode {
    /// The mode the `--foreground` and hidden `--daemon-child` flags ask for.
    pub fn of(foreground: bool, daemon_child: bool) -> Mode {
        if daemon_child {
            Mode::DaemonChild
        } else if foreground {
            Mode::Foreground
        } else {
            Mode::Background
        }
    }
}

/// An image config as far as it could be read. A config that does not
/// parse may still name its `resultFile`, which must hear about the failure.
pub struct LoadedConfig {
    pub path: PathBuf,
    pub config: Option<ImageConfig>,
    result_file: Option<PathBuf>,
}

impl LoadedConfig {
    pub fn load(path: &Path) -> (LoadedConfig, Option<String>) {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        match ImageConfig::load(&abs) {
            Ok(config) => (
                LoadedConfig {
                    path: abs,
                    result_file: config.result_file.clone(),
                    config: Some(config),
                },
                None,
            ),
            Err(e) => (
                LoadedConfig {
                    result_file: salvage_result_file(&abs),
                    path: abs,
                    config: None,
                },
                Some(e.to_string()),
            ),
        }
    }

    /// Write `success` or `failed:<reason>` to the resultFile, if any. A
    /// failure to write it is reported but does not change the outcome.
    pub fn report(&self, outcome: std::result::Result<(), &str>) {
        let Some(path) = &self.result_file else {
            return;
        };
        let text = match outcome {
            Ok(()) => "success".to_string(),
            Err(reason) => format!("failed:{reason}"),
        };
        let written = match &self.config {
            Some(config) => config
                .write_result(outcome.map_err(str::to_string))
                .map_err(|e| e.to_string()),
            None => std::fs::write(path, text).map_err(|e| e.to_string()),
        };
        if let Err(e) = written {
            eprintln!("obd: cannot write the result to {}: {e}", path.display());
        }
    }

    /// Fail with `reason`: record it in the resultFile and return it as the error.
    pub fn fail(&self, reason: impl Into<String>) -> anyhow::Error {
        let reason = reason.into();
        self.report(Err(&reason));
        anyhow!(reason)
    }
}

/// `resultFile` from a config that does not parse as a whole, when the text
/// still holds a plain `"resultFile": "<path>"` pair.
fn salvage_result_file(config: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(config).ok()?;
    let at = text.find("\"resultFile\"")? + "\"resultFile\"".len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let value = &rest[..rest.find('"')?];
    if value.is_empty() || value.contains('\\') {
        return None;
    }
    let path = PathBuf::from(value);
    Some(if path.is_relative() {
        config.parent().unwrap_or(Path::new("/")).join(path)
    } else {
        path
    })
}

/// Open the image of a loaded config for serving (writable when it has an
/// upper). Registry lowers (`dir` + `digest` + `size` with no local copy)
/// are read lazily through `global`'s blob cache.
pub fn open_image(loaded: &LoadedConfig, global: &Global) -> Result<Arc<Stack>> {
    let config = loaded
        .config
        .as_ref()
        .ok_or_else(|| anyhow!("the config was not loaded"))?;
    let writable = config.upper.is_some();
    overlaybd::image::open_config_global(config, &global.config, writable)
        .map(Arc::new)
        .map_err(|e| loaded.fail(format!("cannot open the image: {e}")))
}

/// Where `obd add` / `obd recover` serve from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// In this process, until the device is deleted.
    Foreground,
    /// In a background daemon: a fresh `obd` process started with
    /// `daemon_args`, which opens the image itself. This process opens
    /// nothing and never forks: it only waits to hear that the device is
    /// live (or why it is not).
    Background,
    /// As that daemon (the hidden `--daemon-child` flag): detach, open the
    /// image, serve, and tell the starting process how it went on stdout.
    DaemonChild,
}

/// Serve the loaded image as a ublk device (`start` says new or
/// recovered), the way `mode` says.
pub fn launch(
    loaded: &LoadedConfig,
    queues: QueueArgs,
    start: Start,
    mode: Mode,
    global: &Global,
    daemon_args: Vec<std::ffi::OsString>,
) -> Result<()> {
    let options = Options {
        queues: queues.queues,
        depth: queues.depth,
    };
    options.check().map_err(|e| loaded.fail(e))?;
    match mode {
        Mode::Background => start_daemon(loaded, daemon_args),
        Mode::Foreground => {
            crate::daemon_log::name_ignored_keys("obd", &global.config);
            crate::daemon_log::start_audit("obd", &global.config)
                .map_err(|e| loaded.fail(format!("{e:#}")))?;
            let stack = open_checked(loaded, global)?;
            let (record, trace) = serving_parts(loaded, &stack, options, global);
            serve_foreground(loaded, stack, options, start, record, trace)
        }
        Mode::DaemonChild => {
            // The starting process reads our stdout until the first line.
            let ready = rustix::io::dup(std::io::stdout())
                .map(File::from)
                .map_err(|e| anyhow!("cannot keep the starting process's pipe: {e}"))?;
            // Fails only if this process already leads a session, which a
            // fresh child does not.
            let _ = rustix::process::setsid();
            redirect_stdio(&log_path());
            let _ = std::env::set_current_dir("/");
            crate::daemon_log::name_ignored_keys("obd", &global.config);
            let stack = match crate::daemon_log::start_audit("obd", &global.config)
                .map_err(|e| loaded.fail(format!("{e:#}")))
                .and_then(|()| open_checked(loaded, global))
            {
                Ok(stack) => stack,
                Err(e) => {
                    let mut ready = ready;
                    let _ = writeln!(ready, "err {}", e.to_string().replace('\n', " "));
                    eprintln!("obd: {e}");
                    std::process::exit(1);
                }
            };
            let (record, trace) = serving_parts(loaded, &stack, options, global);
            std::process::exit(daemon_main(stack, options, start, record, trace, ready));
        }
    }
}

/// Open the image and check that it can be a block device.
fn open_checked(loaded: &LoadedConfig, global: &Global) -> Result<Arc<Stack>> {
    let stack = open_image(loaded, global)?;
    if stack.virtual_size() % 512 != 0 {
        bail!(loaded.fail("the image size is not a multiple of 512 bytes"));
    }
    Ok(stack)
}

fn serving_parts(
    loaded: &LoadedConfig,
    stack: &Stack,
    options: Options,
    global: &Global,
) -> (DeviceRecord, TraceStart) {
    let record = DeviceRecord {
        dev_id: 0,
        pid: 0,
        config: loaded.path.clone(),
        queues: options.queues,
        depth: options.depth,
        writable: stack.top().is_some(),
        size: stack.virtual_size(),
        global_config: global.path.clone(),
    };
    let trace = TraceStart {
        config: loaded.config.clone(),
        global: global.config.clone(),
    };
    (record, trace)
}

/// Start `obd <daemon_args>` as a fresh background process and wait for
/// its first line: `ok <id>` once the device is live, `err <reason>`.
fn start_daemon(loaded: &LoadedConfig, daemon_args: Vec<std::ffi::OsString>) -> Result<()> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().map_err(|e| {
        loaded.fail(format!(
            "cannot find the obd binary to start the daemon: {e}"
        ))
    })?;
    let mut child = Command::new(exe)
        .args(daemon_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Not in the caller's process group: a Ctrl-C there is not for it.
        .process_group(0)
        .spawn()
        .map_err(|e| loaded.fail(format!("cannot start the daemon: {e}")))?;
    let log = log_path_of(child.id());
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = BufReader::new(stdout).read_line(&mut line);
    }
    let line = line.trim_end();
    if let Some(id) = line.strip_prefix("ok ") {
        println!("/dev/ublkb{id}");
        loaded.report(Ok(()));
        Ok(())
    } else {
        // The daemon has ended (or will): do not leave a zombie behind.
        let _ = child.wait();
        match line.strip_prefix("err ") {
            Some(reason) => Err(loaded.fail(reason)),
            None => Err(loaded.fail(format!(
                "the daemon exited before the device was ready; its log is {}",
                log.display()
            ))),
        }
    }
}

/// What the serving process needs to start the image's trace session
/// (record or replay, from `recordTracePath`).
struct TraceStart {
    config: Option<ImageConfig>,
    global: GlobalConfig,
}

impl TraceStart {
    /// Start the session for `stack`. A trace that cannot be started is a
    /// warning in the daemon's log; the device is served anyway.
    fn start(&self, stack: &Arc<Stack>) -> Session {
        let Some(config) = &self.config else {
            return Session::Idle;
        };
        match Session::start_for_image(stack, config, &self.global) {
            Ok(session) => {
                match &session {
                    Session::Idle => {}
                    Session::Recording(r) => {
                        eprintln!("obd: recording a trace into {}", r.trace_path().display())
                    }
                    Session::Replaying(_) => eprintln!(
                        "obd: replaying the trace {}",
                        config
                            .acceleration_trace()
                            .or_else(|| config.record_trace_path.clone())
                            .unwrap_or_default()
                            .display()
                    ),
                }
                session
            }
            Err(e) => {
                eprintln!("obd: warning: trace not started: {e}");
                Session::Idle
            }
        }
    }
}

/// Start the trace session (record or replay, from `recordTracePath`) of
/// an image served by another front end (`obd serve`).
pub fn start_trace(loaded: &LoadedConfig, global: &Global, stack: &Arc<Stack>) -> Session {
    TraceStart {
        config: loaded.config.clone(),
        global: global.config.clone(),
    }
    .start(stack)
}

/// [`start_trace`] for an image opened from `config` (`obd tcmu`).
pub fn start_trace_for(config: &ImageConfig, global: &GlobalConfig, stack: &Arc<Stack>) -> Session {
    TraceStart {
        config: Some(config.clone()),
        global: global.clone(),
    }
    .start(stack)
}

/// End a trace session when the device is gone: a recording writes its
/// trace and `.ok` file; a replay stops.
pub fn finish_trace(session: Session) {
    if let Session::Recording(recorder) = &session {
        match recorder.finish() {
            Ok(n) => eprintln!(
                "obd: wrote {n} trace records to {}",
                recorder.trace_path().display()
            ),
            Err(e) => eprintln!("obd: warning: trace recording: {e}"),
        }
    }
    drop(session);
}

fn log_path() -> PathBuf {
    log_path_of(std::process::id())
}

/// The log of the daemon with process id `pid`.
fn log_path_of(pid: u32) -> PathBuf {
    ublk_target::state::dir().join(format!("daemon-{pid}.log"))
}

fn serve_foreground(
    loaded: &LoadedConfig,
    stack: Arc<Stack>,
    options: Options,
    start: Start,
    record: DeviceRecord,
    trace: TraceStart,
) -> Result<()> {
    if let Err(e) = ublk_target::device::private_mount_namespace() {
        eprintln!("obd: warning: {e}");
    }
    let session = trace.start(&stack);
    let ready_record = record.clone();
    let result_config = loaded.config.clone();
    let live = Arc::new(LiveStack::new(stack));
    let snapshots = live.clone();
    let served = ublk_target::serve(live, options, start, move |dev_id| {
        let record = DeviceRecord {
            dev_id,
            pid: std::process::id() as i32,
            ..ready_record
        };
        if let Err(e) = record.save() {
            eprintln!("obd: cannot record device {dev_id}: {e}");
        }
        answer_snapshots(dev_id, snapshots, &record);
        println!("/dev/ublkb{dev_id}");
        let _ = std::io::stdout().flush();
        if let Some(config) = result_config {
            if let Err(e) = config.write_result(Ok(())) {
                eprintln!("obd: cannot write the resultFile: {e}");
            }
        }
    });
    finish_trace(session);
    finish_serving(start, served.is_ok());
    served.map_err(|e| loaded.fail(e))
}

/// The background daemon, detached already: serve, say how the start went
/// through `ready`, and clean up once the device is gone. Returns the exit
/// code.
fn daemon_main(
    stack: Arc<Stack>,
    options: Options,
    start: Start,
    record: DeviceRecord,
    trace: TraceStart,
    ready: File,
) -> i32 {
    if let Err(e) = ublk_target::device::private_mount_namespace() {
        eprintln!("obd: warning: {e}");
    }
    let session = trace.start(&stack);
    let ready = std::sync::Mutex::new(Some(ready));
    let ready = Arc::new(ready);
    let notify = ready.clone();
    let live = Arc::new(LiveStack::new(stack));
    let snapshots = live.clone();
    let served = ublk_target::serve(live, options, start, move |dev_id| {
        let record = DeviceRecord {
            dev_id,
            pid: std::process::id() as i32,
            ..record
        };
        if let Err(e) = record.save() {
            eprintln!("obd: cannot record device {dev_id}: {e}");
        }
        answer_snapshots(dev_id, snapshots, &record);
        eprintln!("obd: serving /dev/ublkb{dev_id}");
        if let Some(mut pipe) = notify.lock().ok().and_then(|mut p| p.take()) {
            let _ = writeln!(pipe, "ok {dev_id}");
        }
    });
    if let Err(reason) = &served {
        eprintln!("obd: {reason}");
        if let Some(mut pipe) = ready.lock().ok().and_then(|mut p| p.take()) {
            let _ = writeln!(pipe, "err {}", reason.replace('\n', " "));
        }
    }
    finish_trace(session);
    finish_serving(start, served.is_ok());
    i32::from(served.is_err())
}

/// After serving ends: drop this process's record. A device that failed to
/// start was deleted again; one that was served is gone (deleted) or, if
/// this daemon is failing, waits for `obd recover`, which needs the record.
fn finish_serving(start: Start, served: bool) {
    if !served && matches!(start, Start::Recover(_)) {
        return;
    }
    let me = std::process::id() as i32;
    for record in DeviceRecord::all() {
        if record.pid == me {
            crate::snapshot_socket::remove(&crate::snapshot_socket::socket_path(record.dev_id));
            let _ = DeviceRecord::remove(record.dev_id);
        }
    }
}

/// Answer `obd snapshot` for a writable device (a failure to listen is
/// reported; the device is served anyway).
fn answer_snapshots(dev_id: u32, live: Arc<LiveStack>, record: &DeviceRecord) {
    if !record.writable {
        return;
    }
    let socket = crate::snapshot_socket::socket_path(dev_id);
    let front = crate::snapshot_socket::Front::Ublk(dev_id);
    if let Err(e) = crate::snapshot_socket::listen(socket, live, record.config.clone(), front) {
        eprintln!("obd: /dev/ublkb{dev_id} cannot take snapshots: {e:#}");
    }
}

/// Daemon output goes to `log` (stdin from /dev/null), so no caller's pipe
/// stays open behind it.
fn redirect_stdio(log: &Path) {
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .or_else(|_| std::fs::OpenOptions::new().write(true).open("/dev/null"));
    let null = File::open("/dev/null");
    if let Ok(null) = &null {
        let _ = rustix::stdio::dup2_stdin(null);
    }
    if let Ok(out) = &out {
        let _ = rustix::stdio::dup2_stdout(out);
        let _ = rustix::stdio::dup2_stderr(out);
    }
}

/// Whether ublk can be used here; the reason otherwise.
pub fn require_ublk(loaded: &LoadedConfig) -> Result<()> {
    ublk_target::probe::check().map_err(|reason| loaded.fail(reason))
}

/// Parse a device number given on the command line.
pub fn check_dev_id(id: i64) -> Result<u32> {
    match u32::try_from(id) {
        Ok(id) if id < 1 << 20 => Ok(id),
        _ => bail!("-n {id} is not a ublk device number"),
    }
}
