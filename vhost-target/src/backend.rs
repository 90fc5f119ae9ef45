//! The vhost-user back end: the `VhostUserBackend` the rust-vmm daemon
//! drives, and [`serve`], which serves one VMM connection after another on
//! one socket.
//!
//! Each queue has its own worker thread (the daemon's epoll handler for it)
//! and its own [`Scratch`] buffers; a kick runs every available request of
//! that queue to completion, in order, signalling the guest as requests
//! complete (or as EVENT_IDX asks).
//!
//! The stack is a [`LiveStack`], so a live snapshot (`obd snapshot`) can
//! replace it between two requests: each request enters it ([`enter`])
//! and holds that stack until it completes.

use std::io;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use overlaybd::live::{Entry, LiveStack};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{Geometry, ID_BYTES};
use crate::request::{execute, Device, Scratch, Stats};

/// Entries in one virtqueue at most; the VMM picks the size (qemu's
/// `queue-size`, 128 by default) up to this.
pub const MAX_QUEUE_SIZE: usize = 1024;

type Atomic = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Vring = VringRwLock<Atomic>;

/// How the device is served.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Request queues offered (the VMM may use fewer): one thread each.
    pub queues: u16,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// The GET_ID answer (see [`crate::device_id`]).
    pub id: [u8; ID_BYTES],
}

/// The virtio-blk device of one VMM connection.
pub struct BlockBackend {
    live: Arc<LiveStack>,
    geometry: Geometry,
    id: [u8; ID_BYTES],
    mem: Atomic,
    event_idx: AtomicBool,
    /// One set of buffers per queue (each used only by its queue's thread).
    scratch: Vec<Mutex<Scratch>>,
    /// Requests completed on each queue.
    per_queue: Vec<AtomicU64>,
    stats: Arc<Stats>,
}

impl BlockBackend {
    pub fn new(live: Arc<LiveStack>, geometry: Geometry, id: [u8; ID_BYTES], mem: Atomic) -> Self {
        let scratch = (0..geometry.queues)
            .map(|_| Mutex::new(Scratch::default()))
            .collect();
        BlockBackend {
            live,
            geometry,
            id,
            mem,
            event_idx: AtomicBool::new(false),
            scratch,
            per_queue: (0..geometry.queues).map(|_| AtomicU64::new(0)).collect(),
            stats: Arc::new(Stats::default()),
        }
    }

    /// What this connection did so far.
    pub fn report(&self) -> Report {
        Report {
            per_queue: self
                .per_queue
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect(),
            stats: self.stats.clone(),
        }
    }

    /// Run every available request of `vring` (queue `queue`).
    fn process_queue(&self, queue: usize, vring: &Vring) -> io::Result<()> {
        let mut scratch = self
            .scratch
            .get(queue)
            .ok_or_else(|| io::Error::other(format!("no queue {queue}")))?
            .lock()
            .map_err(|_| io::Error::other("a queue thread panicked"))?;
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            loop {
                let mem = self.mem.memory();
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let entry = enter(&self.live);
                let device = Device {
                    stack: entry.stack(),
                    geometry: self.geometry,
                    id: self.id,
                    stats: &self.stats,
                };
                let outcome = execute(&device, chain, &mut scratch);
                drop(entry);
                if let Some(n) = self.per_queue.get(queue) {
                    n.fetch_add(1, Ordering::Relaxed);
                }
                vring
                    .add_used(head, outcome.used)
                    .map_err(io::Error::other)?;
                if vring.needs_notification().map_err(io::Error::other)? {
                    vring.signal_used_queue()?;
                }
            }
            // With EVENT_IDX, requests that arrived while notifications
            // were off are picked up here.
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.geometry.queues)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.geometry.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.geometry.config_bytes(offset, size)
    }

    fn update_memory(&self, _mem: Atomic) -> io::Result<()> {
        // `self.mem` is the same atomic the daemon updates.
        Ok(())
    }

    /// One thread per queue.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.geometry.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Each thread has exactly one queue: event 0 is its kick, and the
        // thread index is the queue index.
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(thread_id, vring),
            None => Ok(()),
        }
    }
}

/// Enter `live` for one request, waiting while a snapshot replaces the
/// stack. A queue thread runs its requests one at a time, so it holds none
/// in flight while it waits here: the replacement is never waiting for it.
pub fn enter(live: &LiveStack) -> Entry<'_> {
    loop {
        if let Some(entry) = live.try_enter() {
            return entry;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// What one VMM connection did: requests per queue, and by kind.
#[derive(Debug)]
pub struct Report {
    pub per_queue: Vec<u64>,
    pub stats: Arc<Stats>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; requests per queue:", self.stats.summary())?;
        for n in &self.per_queue {
            write!(f, " {n}")?;
        }
        Ok(())
    }
}

/// How one VMM connection ended.
#[derive(Debug)]
pub enum Served {
    /// The VMM disconnected.
    Disconnected,
    /// The connection failed (a protocol error); the next one is served.
    Failed(String),
}

/// Serve `live` on `listener`: one VMM connection at a time, one after
/// another, until `keep_going` says stop or accepting fails. `after` is
/// called after each connection, with how it ended and what it did (the
/// stack is flushed first, whatever the guest did).
pub fn serve(
    live: Arc<LiveStack>,
    options: Options,
    listener: UnixListener,
    mut after: impl FnMut(&Served, &Report),
    keep_going: impl Fn() -> bool,
) -> Result<(), String> {
    let stack = live.current();
    let geometry = Geometry {
        size: stack.virtual_size(),
        block_size: options.block_size,
        queues: options.queues,
        read_only: stack.top().is_none(),
    };
    drop(stack);
    geometry.check()?;
    let mut listener = Listener::from(listener);
    while keep_going() {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlockBackend::new(
            live.clone(),
            geometry,
            options.id,
            mem.clone(),
        ));
        let mut daemon = VhostUserDaemon::new("obd-vhost-user-blk".into(), backend.clone(), mem)
            .map_err(|e| format!("cannot start the vhost-user daemon: {e}"))?;
        daemon
            .start(&mut listener)
            .map_err(|e| format!("cannot accept a VMM connection: {e}"))?;
        let ended = match daemon.wait() {
            // A VMM that exits (the VM powered off) just closes the socket.
            Ok(())
            | Err(Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => Served::Disconnected,
            Err(e) => Served::Failed(e.to_string()),
        };
        // Stops the queue threads (their exit events) and waits for them.
        drop(daemon);
        if let Err(e) = live.current().flush() {
            return Err(format!("cannot flush the writable layer: {e}"));
        }
        after(&ended, &backend.report());
    }
    Ok(())
}
