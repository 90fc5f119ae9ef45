//! Creating (or recovering) one ublk device and running its queues.
//!
//! Devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`:
//! when the serving process dies the kernel keeps `/dev/ublkbN` and holds its
//! I/O, and requests the dead process had taken are re-issued to the next one
//! (`obd recover`), so a mounted filesystem sees a stall, not an error. Re-issue
//! is safe here because every request is idempotent: reads, and writes that
//! append a fresh copy of the data with a newer index entry.

use std::sync::Arc;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError, UblkFlags};
use overlaybd::live::LiveStack;

use crate::exec::{Backend, Scratch};

/// Largest request the kernel sends us (and each tag's buffer size): 1 MiB,
/// as TCMU gets, so a sequential stream costs half the round trips.
pub const IO_BUF_BYTES: u32 = 1 << 20;

/// Queue layout of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Hardware queues, one serving thread each.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queues: 1,
            depth: 64,
        }
    }
}

impl Options {
    /// Why these options cannot work, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=sys::UBLK_MAX_NR_QUEUES as u16).contains(&self.queues) {
            return Err(format!(
                "--queues {} is out of range; use 1 to {}",
                self.queues,
                sys::UBLK_MAX_NR_QUEUES
            ));
        }
        if !(1..=sys::UBLK_MAX_QUEUE_DEPTH as u16).contains(&self.depth) {
            return Err(format!(
                "--depth {} is out of range; use 1 to {}",
                self.depth,
                sys::UBLK_MAX_QUEUE_DEPTH
            ));
        }
        Ok(())
    }
}

/// Whether to create a new device or take over an existing one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Add,
    /// Recover device N after its daemon died.
    Recover(u32),
}

/// Control flags every device gets.
fn ctrl_flags() -> u64 {
    u64::from(sys::UBLK_F_USER_RECOVERY) | u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE)
}

fn ublk_error(what: &str, e: UblkError) -> String {
    match e {
        UblkError::OtherError(errno) | UblkError::UringIOError(errno) => format!(
            "{what}: {}",
            std::io::Error::from_raw_os_error(errno.saturating_abs())
        ),
        other => format!("{what}: {other}"),
    }
}

/// Serve `live`'s stack as a ublk device until the device is deleted
/// (the stack may be replaced meanwhile: see [`LiveStack`]). `on_ready`
/// runs once the device is live, with its id; by then `/dev/ublkbN` accepts
/// I/O. Errors before that point come back as `Err(reason)` and leave no
/// device behind (a failed add is deleted again).
pub fn serve<F>(
    live: Arc<LiveStack>,
    options: Options,
    start: Start,
    on_ready: F,
) -> Result<(), String>
where
    F: FnOnce(u32) + Send + Sync + 'static,
{
    options.check()?;
    let ctrl = match start {
        Start::Add => UblkCtrlBuilder::default()
            .name("obd")
            .id(-1)
            .nr_queues(options.queues)
            .depth(options.depth)
            .io_buf_bytes(IO_BUF_BYTES)
            .ctrl_flags(ctrl_flags())
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|e| ublk_error("cannot create a ublk device", e))?,
        Start::Recover(id) => {
            let id = i32::try_from(id).map_err(|_| format!("device id {id} is out of range"))?;
            let ctrl = UblkCtrl::new(
                Some("obd".to_string()),
                id,
                options.queues.into(),
                options.depth.into(),
                IO_BUF_BYTES,
                ctrl_flags(),
                0,
                UblkFlags::UBLK_DEV_F_RECOVER_DEV,
            )
            .map_err(|e| ublk_error(&format!("cannot open ublk device {id}"), e))?;
            let info = ctrl.dev_info();
            if u32::from(info.state) != sys::UBLK_S_DEV_QUIESCED
                && u32::from(info.state) != sys::UBLK_S_DEV_FAIL_IO
            {
                return Err(format!(
                    "ublk device {id} is {}, not waiting for recovery (only a device whose daemon died can be recovered)",
                    state_name(info.state)
                ));
            }
            ctrl.start_user_recover()
                .map_err(|e| ublk_error(&format!("cannot start recovery of device {id}"), e))?;
            ctrl
        }
    };
    let stack = live.current();
    let writable = stack.top().is_some();
    let size = stack.virtual_size();
    drop(stack);
    let backend =
        Arc::new(Backend::new(live).map_err(|e| format!("cannot start the fetch threads: {e}"))?);
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(size);
        let params = &mut dev.tgt.params;
        if writable {
            params.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE;
            params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
            params.discard = sys::ublk_param_discard {
                discard_alignment: 0,
                discard_granularity: 4096,
                max_discard_sectors: IO_BUF_BYTES >> 9,
                max_write_zeroes_sectors: IO_BUF_BYTES >> 9,
                max_discard_segments: 1,
                ..Default::default()
            };
        } else {
            params.basic.attrs = sys::UBLK_ATTR_READ_ONLY;
        }
        Ok(())
    };
    let queue_fn = move |qid: u16, dev: &UblkDev| run_queue(qid, dev, &backend);
    let ready = move |ctrl: &UblkCtrl| on_ready(ctrl.dev_info().dev_id);
    ctrl.run_target(tgt_init, queue_fn, ready)
        .map_err(|e| ublk_error("cannot start the ublk device", e))?;
    // The queues are down: the device was deleted (nothing left to do), or
    // this daemon is failing and the device should wait for `obd recover`.
    // Either way, do not delete it on the way out.
    ctrl.disown();
    Ok(())
}

/// The kernel's name for a device state.
pub fn state_name(state: u16) -> &'static str {
    match u32::from(state) {
        sys::UBLK_S_DEV_DEAD => "dead",
        sys::UBLK_S_DEV_LIVE => "live",
        sys::UBLK_S_DEV_QUIESCED => "quiesced",
        sys::UBLK_S_DEV_FAIL_IO => "fail-io",
        _ => "unknown",
    }
}

/// One queue's thread: a task per tag on a local executor, driven by the
/// queue's io_uring.
fn run_queue(qid: u16, dev: &UblkDev, backend: &Arc<Backend>) {
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => std::rc::Rc::new(q),
        Err(e) => {
            eprintln!("obd: queue {qid}: {}", ublk_error("cannot set up", e));
            return;
        }
    };
    let exec = std::rc::Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for tag in queue.tags() {
        let q = queue.clone();
        let backend = backend.clone();
        tasks.push(exec.spawn(async move {
            match serve_tag(&q, tag, &backend).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => eprintln!("obd: queue {qid} tag {tag}: {}", ublk_error("failed", e)),
            }
        }));
    }
    let driver = exec.clone();
    smol::block_on(exec.run(async move {
        let run_ops = || while driver.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&queue, Some(20), run_ops, done).await {
            eprintln!("obd: queue {qid}: {}", ublk_error("event loop stopped", e));
        }
    }));
}

/// Fetch, serve and commit requests for one tag until the queue goes down.
async fn serve_tag(q: &UblkQueue<'_>, tag: u16, backend: &Backend) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    let mut scratch = Scratch::default();
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = *q.get_iod(tag);
        let res = backend
            .handle(q, &iod, buf.as_mut_slice(), &mut scratch)
            .await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Put this process in its own mount namespace with `/` private. A ublk
/// daemon must not share mounts with the filesystems on its own devices:
/// otherwise tearing one down can wait on the daemon that is serving it.
pub fn private_mount_namespace() -> Result<(), String> {
    use rustix::mount::{mount_change, MountPropagationFlags};
    use rustix::thread::{unshare_unsafe, UnshareFlags};
    // SAFETY: only the mount namespace is unshared, never the fd table
    // (`UnshareFlags::FILES`, what makes unshare unsafe): every descriptor
    // stays valid in every thread.
    unsafe { unshare_unsafe(UnshareFlags::NEWNS) }
        .map_err(|e| format!("cannot create a mount namespace: {e}"))?;
    mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .map_err(|e| format!("cannot make / private in the new mount namespace: {e}"))?;
    Ok(())
}

/// State of device `id` as the kernel reports it, or `None` when there is
/// no such device (or no ublk at all).
pub fn kernel_state(id: u32) -> Option<u16> {
    if crate::probe::check().is_err() {
        return None;
    }
    let id = i32::try_from(id).ok()?;
    UblkCtrl::new_simple(id).ok().map(|c| c.dev_info().state)
}

/// Ids of every ublk device the kernel has.
pub fn kernel_devices() -> Vec<u32> {
    let mut ids = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/class/ublk-char") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_prefix("ublkc")) {
                if let Ok(id) = id.parse() {
                    ids.push(id);
                }
            }
        }
    }
    ids.sort_unstable();
    ids
}

/// Whether this kernel's ublk driver can change the size of a live device
/// (`UBLK_F_UPDATE_SIZE` among its features: Linux 6.16 and later).
pub fn can_update_size(id: u32) -> Result<bool, String> {
    let nid = i32::try_from(id).map_err(|_| format!("device id {id} is out of range"))?;
    let ctrl =
        UblkCtrl::new_simple(nid).map_err(|e| ublk_error(&format!("no ublk device {id}"), e))?;
    Ok(ctrl
        .get_driver_features()
        .is_some_and(|f| f & u64::from(sys::UBLK_F_UPDATE_SIZE) != 0))
}

/// Tell the kernel that device `id` now has `bytes` (UBLK_U_CMD_UPDATE_SIZE;
/// check [`can_update_size`] first).
pub fn update_size(id: u32, bytes: u64) -> Result<(), String> {
    let nid = i32::try_from(id).map_err(|_| format!("device id {id} is out of range"))?;
    let ctrl =
        UblkCtrl::new_simple(nid).map_err(|e| ublk_error(&format!("no ublk device {id}"), e))?;
    ctrl.update_size(bytes)
        .map_err(|e| ublk_error(&format!("the kernel did not resize /dev/ublkb{id}"), e))?;
    Ok(())
}

/// Delete device `id` (stopping it first if it is live).
pub fn delete(id: u32) -> Result<(), String> {
    let nid = i32::try_from(id).map_err(|_| format!("device id {id} is out of range"))?;
    let ctrl =
        UblkCtrl::new_simple(nid).map_err(|e| ublk_error(&format!("no ublk device {id}"), e))?;
    ctrl.del_dev()
        .map_err(|e| ublk_error(&format!("cannot delete ublk device {id}"), e))?;
    Ok(())
}
