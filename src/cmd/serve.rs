//! `obd serve --vhost-user-blk`: serve an image to a VMM over a vhost-user
//! socket, with no kernel module.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, Result};
use overlaybd::live::LiveStack;
use overlaybd::lsmt::NIL_UUID;
use trace_tools::Session;
use vhost_target::{Options, Served};

use super::ublk::{finish_trace, open_image, start_trace, Global, LoadedConfig};

/// Serve an image config to a virtual machine as a vhost-user-blk disk.
///
/// The VMM (qemu, cloud-hypervisor, any vhost-user front end) connects to
/// SOCKET and the guest sees a virtio-blk disk (/dev/vda) backed by the
/// image: its lowers (local files, or registry blobs fetched on demand
/// through the global config's cache, as `obd add` does) and, when the
/// config has an `upper`, its writable layer, which takes the guest's
/// writes, discards and write-zeroes. Without an upper the disk is
/// read-only. FLUSH from the guest makes the upper durable before it
/// completes. No ublk, TCMU or other kernel module is needed on the host.
///
/// Runs in the foreground. A stale socket file at SOCKET is replaced; any
/// other file there is an error, as is a socket another process is still
/// serving on. The socket path is printed, and `success` (or
/// `failed:<reason>`) written to the config's resultFile, once a VMM can
/// connect. One VMM is served at a time, and when it disconnects (the VM
/// powered off) the upper is flushed and the next connection is awaited,
/// so a VM can be rebooted or restarted against the same image. SIGTERM or
/// Ctrl-C flushes the upper and exits 0; `obd commit` can then seal it.
///
/// While the VM runs, `obd snapshot --vhost-user-blk SOCKET` freezes the
/// upper into a read-only layer and goes on with a fresh one (the config is
/// rewritten to match), as for a ublk device.
///
/// The VMM must share the guest's memory with this process: give the VM a
/// memory backend with share=on (memfd or a file), as below.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  # Serve the image on a socket (foreground; Ctrl-C or SIGTERM to stop):
  obd serve --vhost-user-blk /run/obd/vm1.sock --config config.v1.json --queues 2

  # Boot a VM from it (the guest memory must be shared with obd):
  qemu-system-x86_64 -m 1G -smp 2 \\
    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
    -chardev socket,id=c,path=/run/obd/vm1.sock \\
    -device vhost-user-blk-pci,chardev=c,num-queues=2 \\
    -kernel vmlinuz -initrd initrd.img -append 'root=/dev/vda console=ttyS0'

  # cloud-hypervisor:
  cloud-hypervisor --memory size=1G,shared=on --disk vhost_user=true,socket=/run/obd/vm1.sock,num_queues=2 ...

  # While the VM runs: freeze its writes so far, go on with a new upper:
  obd snapshot --vhost-user-blk /run/obd/vm1.sock

  # After the VM is done and obd has stopped, seal its writes into a new layer:
  obd commit upper.data upper.index layer1.lsmt

See also: obd add (a host block device through ublk), obd snapshot, obd commit, obd create")]
pub struct Args {
    /// The Unix socket to listen on for the VMM (vhost-user-blk).
    #[arg(long = "vhost-user-blk", value_name = "SOCKET")]
    socket: PathBuf,
    /// The image config (config.v1.json).
    #[arg(long)]
    config: PathBuf,
    /// Global config (cache, credentials, download, p2p, prefetch) for
    /// registry layers [default: /etc/overlaybd/overlaybd.json if it exists].
    #[arg(long, value_name = "PATH")]
    global_config: Option<PathBuf>,
    /// Request queues offered to the VMM, one serving thread each; the VMM
    /// uses at most this many (qemu: num-queues=N).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Logical block size the guest sees: 512 or 4096 bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = block_size)]
    block_size: u32,
}

fn block_size(text: &str) -> std::result::Result<u32, String> {
    match text {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("use 512 or 4096".into()),
    }
}

/// What the signal thread needs to stop cleanly: the stack to flush, the
/// trace session to finish, the sockets to remove.
#[derive(Default)]
struct Stopping {
    live: OnceLock<Arc<LiveStack>>,
    trace: Mutex<Option<Session>>,
    socket: OnceLock<PathBuf>,
    snapshot_socket: OnceLock<PathBuf>,
}

impl Stopping {
    /// Flush, finish the trace, remove the socket. Returns whether the
    /// flush worked.
    fn finish(&self) -> bool {
        let flushed = match self.live.get().map(|live| live.current().flush()) {
            Some(Err(e)) => {
                eprintln!("obd serve: cannot flush the writable layer: {e}");
                false
            }
            _ => true,
        };
        if let Some(session) = self.trace.lock().ok().and_then(|mut t| t.take()) {
            finish_trace(session);
        }
        if let Some(socket) = self.socket.get() {
            let _ = std::fs::remove_file(socket);
        }
        if let Some(socket) = self.snapshot_socket.get() {
            crate::snapshot_socket::remove(socket);
        }
        flushed
    }
}

pub fn run(args: Args) -> Result<()> {
    let stopping = Arc::new(Stopping::default());
    catch_stop_signals(stopping.clone())?;

    let (loaded, problem) = LoadedConfig::load(&args.config);
    if let Some(problem) = problem {
        return Err(loaded.fail(format!("cannot load the image config: {problem}")));
    }
    let global = Global::load(&loaded, args.global_config.as_deref())?;
    crate::daemon_log::name_ignored_keys("obd serve", &global.config);
    crate::daemon_log::start_audit("obd serve", &global.config)
        .map_err(|e| loaded.fail(format!("{e:#}")))?;
    let stack = open_image(&loaded, &global)?;
    let size = stack.virtual_size();
    if !size.is_multiple_of(u64::from(args.block_size)) {
        return Err(loaded.fail(format!(
            "the image size ({size} bytes) is not a multiple of the {}-byte block size",
            args.block_size
        )));
    }
    let writable = stack.top().is_some();
    let id_key = stack
        .top()
        .map(|top| top.header.uuid.clone())
        .filter(|uuid| !uuid.is_empty() && uuid != NIL_UUID)
        .unwrap_or_else(|| loaded.path.display().to_string());
    let options = Options {
        queues: args.queues,
        block_size: args.block_size,
        id: vhost_target::device_id(&id_key),
    };
    let live = Arc::new(LiveStack::new(stack.clone()));
    let _ = stopping.live.set(live.clone());

    let socket = std::path::absolute(&args.socket).unwrap_or_else(|_| args.socket.clone());
    let listener = listen(&socket).map_err(|e| loaded.fail(e))?;
    let _ = stopping.socket.set(socket.clone());
    // Even a read-only disk answers, so `obd snapshot` can say why not.
    let snapshots = crate::snapshot_socket::vhost_socket_path(&socket);
    let front = crate::snapshot_socket::Front::VhostUserBlk;
    match crate::snapshot_socket::listen(
        snapshots.clone(),
        live.clone(),
        loaded.path.clone(),
        front,
    ) {
        Ok(()) => {
            let _ = stopping.snapshot_socket.set(snapshots);
        }
        Err(e) => eprintln!("obd serve: the disk cannot take snapshots: {e:#}"),
    }
    if let Ok(mut trace) = stopping.trace.lock() {
        *trace = Some(start_trace(&loaded, &global, &stack));
    }

    eprintln!(
        "obd serve: {} ({} bytes, {}, {} queue{}, {}-byte blocks) on vhost-user-blk socket {}",
        loaded.path.display(),
        size,
        if writable { "writable" } else { "read-only" },
        args.queues,
        if args.queues == 1 { "" } else { "s" },
        args.block_size,
        socket.display()
    );
    // The resultFile first: whoever waits for the printed path may read it
    // at once.
    loaded.report(Ok(()));
    println!("{}", socket.display());
    let _ = std::io::stdout().flush();

    drop(stack);
    let served = vhost_target::serve(
        live,
        options,
        listener,
        |ended, report| {
            match ended {
                Served::Disconnected => eprintln!("obd serve: the VMM disconnected"),
                Served::Failed(e) => eprintln!("obd serve: the VMM connection failed: {e}"),
            }
            eprintln!("obd serve: served {report}");
            eprintln!("obd serve: upper flushed; waiting for the next connection");
        },
        || true,
    );
    let flushed = stopping.finish();
    served.map_err(|e| anyhow!(e))?;
    if !flushed {
        return Err(anyhow!("the writable layer could not be flushed"));
    }
    Ok(())
}

/// Bind the listening socket at `path`, replacing a stale socket file.
fn listen(path: &Path) -> std::result::Result<UnixListener, String> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "{} is in use: another process is serving on it",
                    path.display()
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
        }
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot check {}: {e}", path.display())),
    }
    UnixListener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))
}

/// SIGINT and SIGTERM are blocked in every thread (this one and all it
/// starts afterwards) and taken by one thread with sigwait, which flushes
/// the upper, finishes the trace, removes the socket and exits: no work in
/// a signal handler, and no queue thread is interrupted mid-request.
fn catch_stop_signals(stopping: Arc<Stopping>) -> Result<()> {
    crate::stop_signals::on_stop_signals(move |signal| {
        eprintln!("obd serve: signal {signal}: flushing and exiting");
        let code = if stopping.finish() { 0 } else { 1 };
        std::process::exit(code);
    })
}
