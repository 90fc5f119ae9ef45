//! The target_core_user ring, from `<linux/target_core_user.h>`.
//!
//! The uio mapping starts with the mailbox (`struct tcmu_mailbox`), then
//! the command ring at `cmdr_off`, `cmdr_size` bytes long, then the data
//! area. The kernel queues `struct tcmu_cmd_entry`s at `cmd_head`; we
//! take them, run them (several at once, see [`Ring`]) and answer them in
//! order from `cmd_tail`, writing the status and sense over the entry's
//! request half and moving `cmd_tail` past it. Every
//! offset and length read from the ring is checked against the mapping
//! before use, so a confused kernel or a stale mapping gives an error, not
//! a wild access.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Mutex;

use crate::exec::{DataBuf, Disk, Outcome};
use crate::scsi;

/// `struct tcmu_mailbox` field offsets (packed; `cmd_tail` is 64-aligned).
const MB_VERSION: usize = 0;
const MB_CMDR_OFF: usize = 4;
const MB_CMDR_SIZE: usize = 8;
const MB_CMD_HEAD: usize = 12;
pub const MB_CMD_TAIL: usize = 64;

/// `enum tcmu_opcode`.
#[cfg(test)]
const OP_PAD: u32 = 0;
const OP_CMD: u32 = 1;
const OP_MASK: u32 = 0x7;

/// `struct tcmu_cmd_entry` offsets: header, then the request or response.
/// The outer struct is packed but the request struct inside the union is
/// not, so `cdb_off` sits 8-aligned at 24 and the iovecs start at 48.
const ENT_HDR_LEN: usize = 8;
const REQ_IOV_CNT: usize = 8;
const REQ_CDB_OFF: usize = 24;
const REQ_IOV: usize = 48;
const IOVEC_LEN: usize = 16;
const RSP_STATUS: usize = 8;
const RSP_SENSE: usize = 16;
/// TCMU_SENSE_BUFFERSIZE.
const SENSE_BUFFER: usize = 96;

/// Memory shared with the kernel: the uio mapping, or a buffer in tests.
/// Accesses out of range return `false` / `None`.
pub trait SharedMem {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read(&self, offset: usize, out: &mut [u8]) -> bool;
    fn write(&self, offset: usize, data: &[u8]) -> bool;
    /// Load a 4-aligned u32 the kernel updates, with acquire ordering.
    fn load_acquire(&self, offset: usize) -> Option<u32>;
    /// Store a 4-aligned u32 the kernel reads, with release ordering.
    fn store_release(&self, offset: usize, value: u32) -> bool;
}

fn u32_at<M: SharedMem + ?Sized>(mem: &M, offset: usize) -> Option<u32> {
    let mut b = [0u8; 4];
    mem.read(offset, &mut b).then(|| u32::from_le_bytes(b))
}

fn u64_at<M: SharedMem + ?Sized>(mem: &M, offset: usize) -> Option<u64> {
    let mut b = [0u8; 8];
    mem.read(offset, &mut b).then(|| u64::from_le_bytes(b))
}

/// The fixed part of the mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mailbox {
    pub version: u16,
    pub cmdr_off: usize,
    pub cmdr_size: usize,
}

impl Mailbox {
    /// Read and check the mailbox at the start of `mem`.
    pub fn read(mem: &dyn SharedMem) -> Result<Mailbox, String> {
        let mut v = [0u8; 2];
        if !mem.read(MB_VERSION, &mut v) {
            return Err("the mapping is too small for a TCMU mailbox".into());
        }
        let version = u16::from_le_bytes(v);
        let cmdr_off = u32_at(mem, MB_CMDR_OFF).unwrap_or(0) as usize;
        let cmdr_size = u32_at(mem, MB_CMDR_SIZE).unwrap_or(0) as usize;
        if version != 2 {
            return Err(format!(
                "TCMU mailbox version {version}; this daemon speaks version 2"
            ));
        }
        if cmdr_off < MB_CMD_TAIL + 4
            || cmdr_size < ENT_HDR_LEN
            || cmdr_off
                .checked_add(cmdr_size)
                .is_none_or(|end| end > mem.len())
        {
            return Err(format!(
                "TCMU command ring {cmdr_off}+{cmdr_size} does not fit the {}-byte mapping",
                mem.len()
            ));
        }
        Ok(Mailbox {
            version,
            cmdr_off,
            cmdr_size,
        })
    }
}

/// A command's data: the iovecs of a ring entry, as offsets into `mem`.
struct IovBuf<'a, M: SharedMem + ?Sized> {
    mem: &'a M,
    iovs: &'a [(usize, usize)],
    total: usize,
}

impl<M: SharedMem + ?Sized> IovBuf<'_, M> {
    /// Visit the (mapping offset, buffer range) pieces covering
    /// `[offset, offset + len)` of the data.
    fn walk(&self, offset: usize, len: usize, mut f: impl FnMut(usize, std::ops::Range<usize>)) {
        let mut pos = 0usize;
        let end = offset + len;
        for &(base, n) in self.iovs {
            let (a, b) = (pos.max(offset), (pos + n).min(end));
            if a < b {
                f(base + (a - pos), (a - offset)..(b - offset));
            }
            pos += n;
            if pos >= end {
                break;
            }
        }
    }
}

impl<M: SharedMem + ?Sized> DataBuf for IovBuf<'_, M> {
    fn len(&self) -> usize {
        self.total
    }
    fn copy_out(&self, offset: usize, out: &mut [u8]) {
        let len = out.len();
        self.walk(offset, len, |at, r| {
            self.mem.read(at, &mut out[r]);
        });
    }
    fn copy_in(&mut self, offset: usize, data: &[u8]) {
        self.walk(offset, data.len(), |at, r| {
            self.mem.write(at, &data[r]);
        });
    }
}

/// Plain memory standing in for the uio mapping: unit tests and the
/// `tcmu` fuzz target build rings in it.
pub struct VecMem(pub RefCell<Vec<u8>>);

impl SharedMem for VecMem {
    fn len(&self) -> usize {
        self.0.borrow().len()
    }
    fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        let v = self.0.borrow();
        match v.get(offset..offset.saturating_add(out.len())) {
            Some(s) => {
                out.copy_from_slice(s);
                true
            }
            None => false,
        }
    }
    fn write(&self, offset: usize, data: &[u8]) -> bool {
        let mut v = self.0.borrow_mut();
        match v.get_mut(offset..offset.saturating_add(data.len())) {
            Some(s) => {
                s.copy_from_slice(data);
                true
            }
            None => false,
        }
    }
    fn load_acquire(&self, offset: usize) -> Option<u32> {
        u32_at(self, offset)
    }
    fn store_release(&self, offset: usize, value: u32) -> bool {
        self.write(offset, &value.to_le_bytes())
    }
}

/// One command taken off the ring: its CDB and data iovecs, copied out so
/// the entry is not read again, and its place in the ring.
#[derive(Debug)]
pub struct Request {
    /// Position in taking order; answers are written in this order.
    seq: u64,
    cdb: [u8; 16],
    cdb_len: usize,
    iovs: Vec<(usize, usize)>,
    total: usize,
}

impl Request {
    pub fn cdb(&self) -> &[u8] {
        &self.cdb[..self.cdb_len]
    }
}

/// An entry taken off the ring and not yet answered.
struct Slot {
    /// Ring offset and length of the entry.
    pos: usize,
    len: usize,
    /// The response to write over a CMD entry; `None` while it runs.
    /// PAD and other entries are answered with nothing at all.
    response: Option<Option<[u8; 8 + SENSE_BUFFER]>>,
}

struct State {
    /// Ring offset of the next entry to take.
    next: usize,
    /// `seq` of `slots[0]`.
    first_seq: u64,
    slots: VecDeque<Slot>,
}

/// A device's command ring, shared by the thread that takes commands and
/// the workers that run them.
///
/// Commands run concurrently, but their answers are written in ring order:
/// an answer overwrites its own entry and `cmd_tail` only moves past
/// answered entries. So every entry past `cmd_tail` still holds its
/// request, and a daemon started after a crash finds exactly the commands
/// that are owed an answer. The kernel can take answers out of order (it
/// looks commands up by `cmd_id`), but writing them at the tail over other
/// commands' entries would lose those requests across a restart.
pub struct Ring<'m, M: SharedMem + ?Sized> {
    mem: &'m M,
    mb: Mailbox,
    state: Mutex<State>,
}

impl<'m, M: SharedMem + ?Sized> Ring<'m, M> {
    /// Start at the ring's `cmd_tail`: entries past it are owed an answer,
    /// whether they came before or after this daemon started.
    pub fn new(mem: &'m M, mb: Mailbox) -> Result<Ring<'m, M>, String> {
        let tail = mem.load_acquire(MB_CMD_TAIL).ok_or("cmd_tail unreadable")? as usize;
        if tail >= mb.cmdr_size {
            return Err(format!(
                "ring tail {tail} is outside the {}-byte ring",
                mb.cmdr_size
            ));
        }
        Ok(Ring {
            mem,
            mb,
            state: Mutex::new(State {
                next: tail,
                first_seq: 0,
                slots: VecDeque::new(),
            }),
        })
    }

    /// The ring's size in bytes.
    pub fn size(&self) -> usize {
        self.mb.cmdr_size
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A worker that panicked mid-answer leaves consistent state: slots
        // are only pushed, filled and popped whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take every command the kernel queued since the last call. The bool
    /// is true when `cmd_tail` moved (PAD entries need no work) and the
    /// kernel should be told. An error means the ring makes no sense.
    pub fn take(&self) -> Result<(Vec<Request>, bool), String> {
        let mem = self.mem;
        let mut st = self.lock();
        let head = mem.load_acquire(MB_CMD_HEAD).ok_or("cmd_head unreadable")? as usize;
        if head >= self.mb.cmdr_size {
            return Err(format!(
                "ring head {head} is outside the {}-byte ring",
                self.mb.cmdr_size
            ));
        }
        let mut taken = Vec::new();
        // The entries from `next` must end exactly at `head`: one that runs
        // past it (a head off an entry boundary) would otherwise send the
        // walk round the ring for ever.
        let mut left = (head + self.mb.cmdr_size - st.next) % self.mb.cmdr_size;
        while left > 0 {
            let pos = st.next;
            let entry = self.mb.cmdr_off + pos;
            let len_op = u32_at(mem, entry).ok_or("entry header unreadable")?;
            let len = (len_op & !OP_MASK) as usize;
            if len < ENT_HDR_LEN || len > self.mb.cmdr_size - pos {
                return Err(format!("ring entry at {pos} has length {len}"));
            }
            if len > left {
                return Err(format!(
                    "ring entry at {pos} ({len} bytes) runs past cmd_head {head}"
                ));
            }
            left -= len;
            let seq = st.first_seq + st.slots.len() as u64;
            let response = if len_op & OP_MASK == OP_CMD {
                taken.push(read_request(mem, seq, entry, len)?);
                None
            } else {
                // PAD, TMR notifications and future opcodes: nothing to
                // do; an aborted command is still answered when it ends.
                Some(None)
            };
            st.slots.push_back(Slot { pos, len, response });
            st.next = (pos + len) % self.mb.cmdr_size;
        }
        let moved = self.retire(&mut st)?;
        Ok((taken, moved))
    }

    /// Run a request against `disk`.
    pub fn execute(&self, request: &Request, disk: &Disk, log: &dyn Fn(&str)) -> Outcome {
        let mut data = IovBuf {
            mem: self.mem,
            iovs: &request.iovs,
            total: request.total,
        };
        let outcome = disk.execute(request.cdb(), &mut data);
        if disk.trace {
            log(&format!(
                "cdb {:02x?} iovecs {} bytes -> status {:#x} sense {:?}",
                request.cdb(),
                request.total,
                outcome.status,
                outcome.sense
            ));
        }
        if let Some(e) = &outcome.error {
            log(&format!("SCSI command {:#04x} failed: {e}", request.cdb[0]));
        }
        outcome
    }

    /// Record a request's outcome and write every answer that is now due.
    /// True when `cmd_tail` moved and the kernel should be told.
    pub fn finish(&self, request: &Request, outcome: &Outcome) -> Result<bool, String> {
        let mut rsp = [0u8; 8 + SENSE_BUFFER];
        rsp[0] = outcome.status;
        if let Some(sense) = outcome.sense {
            rsp[8..8 + scsi::SENSE_LEN].copy_from_slice(&sense.fixed());
        }
        let mut st = self.lock();
        let index = request
            .seq
            .checked_sub(st.first_seq)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < st.slots.len())
            .ok_or_else(|| format!("request {} is not outstanding", request.seq))?;
        let slot = &mut st.slots[index];
        if slot.response.is_some() {
            return Err(format!("request {} answered twice", request.seq));
        }
        slot.response = Some(Some(rsp));
        self.retire(&mut st)
    }

    /// Commands taken and not yet answered in the ring.
    pub fn outstanding(&self) -> usize {
        self.lock().slots.len()
    }

    /// Write the answers at the front, in order, and move `cmd_tail` past
    /// them. True when it moved.
    fn retire(&self, st: &mut State) -> Result<bool, String> {
        let mut moved = false;
        while let Some(Some(response)) = st.slots.front().map(|s| s.response) {
            let slot = st.slots.pop_front().expect("front exists");
            st.first_seq += 1;
            if let Some(rsp) = response {
                // The response overlays the request: written only now.
                let entry = self.mb.cmdr_off + slot.pos;
                if !self.mem.write(entry + RSP_STATUS, &rsp) {
                    return Err(format!(
                        "ring entry at {}: no room for the response",
                        slot.pos
                    ));
                }
            }
            let tail = (slot.pos + slot.len) % self.mb.cmdr_size;
            if !self.mem.store_release(MB_CMD_TAIL, tail as u32) {
                return Err("cmd_tail unwritable".into());
            }
            moved = true;
        }
        Ok(moved)
    }
}

/// Read and check one CMD entry's request.
fn read_request(
    mem: &(impl SharedMem + ?Sized),
    seq: u64,
    entry: usize,
    len: usize,
) -> Result<Request, String> {
    let bad = |what: &str| format!("ring entry at {entry}: {what}");
    if RSP_SENSE + SENSE_BUFFER > len {
        return Err(bad("no room for the response"));
    }
    let iov_cnt = u32_at(mem, entry + REQ_IOV_CNT).ok_or_else(|| bad("unreadable"))? as usize;
    let cdb_off = u64_at(mem, entry + REQ_CDB_OFF).ok_or_else(|| bad("unreadable"))?;
    if iov_cnt > (len.saturating_sub(REQ_IOV)) / IOVEC_LEN {
        return Err(bad(&format!("{iov_cnt} iovecs do not fit in {len} bytes")));
    }
    let mut iovs = Vec::with_capacity(iov_cnt);
    let mut total = 0usize;
    for i in 0..iov_cnt {
        let at = entry + REQ_IOV + i * IOVEC_LEN;
        let base = u64_at(mem, at).ok_or_else(|| bad("iovec unreadable"))?;
        let n = u64_at(mem, at + 8).ok_or_else(|| bad("iovec unreadable"))?;
        let fits = base
            .checked_add(n)
            .is_some_and(|end| end <= mem.len() as u64);
        if !fits {
            return Err(bad(&format!("iovec {base}+{n} is outside the mapping")));
        }
        iovs.push((base as usize, n as usize));
        total += n as usize;
    }
    // The CDB: its length follows from the opcode; read what fits.
    let mut cdb = [0u8; 16];
    let cdb_at = usize::try_from(cdb_off).map_err(|_| bad("CDB offset too large"))?;
    let mut op = [0u8; 1];
    if !mem.read(cdb_at, &mut op) {
        return Err(bad("CDB outside the mapping"));
    }
    let cdb_len = scsi::cdb_len(op[0]);
    if !mem.read(cdb_at, &mut cdb[..cdb_len]) {
        return Err(bad("CDB outside the mapping"));
    }
    Ok(Request {
        seq,
        cdb,
        cdb_len,
        iovs,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::tests::{info, MemBackend};
    use std::sync::Arc;

    const CMDR_OFF: usize = 128;
    const CMDR_SIZE: usize = 1024;
    const DATA: usize = CMDR_OFF + CMDR_SIZE;

    fn ring() -> VecMem {
        let mem = VecMem(RefCell::new(vec![0u8; DATA + 8192]));
        mem.write(0, &2u16.to_le_bytes());
        mem.write(MB_CMDR_OFF, &(CMDR_OFF as u32).to_le_bytes());
        mem.write(MB_CMDR_SIZE, &(CMDR_SIZE as u32).to_le_bytes());
        mem
    }

    /// Queue a CMD entry at ring offset `at` with `cdb` and iovecs; returns
    /// the entry length.
    fn queue_cmd(mem: &VecMem, at: usize, cdb: &[u8], iovs: &[(u64, u64)]) -> usize {
        let cdb_at = REQ_IOV + iovs.len() * IOVEC_LEN;
        let len = (cdb_at + 16)
            .max(RSP_SENSE + SENSE_BUFFER)
            .next_multiple_of(8);
        let e = CMDR_OFF + at;
        mem.write(e, &(len as u32 | OP_CMD).to_le_bytes());
        mem.write(e + REQ_IOV_CNT, &(iovs.len() as u32).to_le_bytes());
        mem.write(e + REQ_CDB_OFF, &((e + cdb_at) as u64).to_le_bytes());
        for (i, (b, n)) in iovs.iter().enumerate() {
            mem.write(e + REQ_IOV + i * 16, &b.to_le_bytes());
            mem.write(e + REQ_IOV + i * 16 + 8, &n.to_le_bytes());
        }
        mem.write(e + cdb_at, cdb);
        len
    }

    /// Take, run and answer everything queued, one at a time; the number
    /// of commands run.
    fn run_all(mem: &VecMem, disk: &Disk) -> Result<usize, String> {
        let ring = Ring::new(mem, Mailbox::read(mem)?)?;
        let (requests, _) = ring.take()?;
        for r in &requests {
            let outcome = ring.execute(r, disk, &|_| {});
            ring.finish(r, &outcome)?;
        }
        assert_eq!(ring.outstanding(), 0);
        Ok(requests.len())
    }

    #[test]
    fn completes_commands_across_a_pad_and_scattered_iovecs() {
        let mem = ring();
        let backend = Arc::new(MemBackend::new(1 << 20, false));
        let disk = Disk::new(info(), Some(backend.clone()));
        // Start near the end of the ring: a PAD entry fills it, then a
        // READ(10) of 2 blocks into two iovecs in the data area.
        let start = CMDR_SIZE - 64;
        mem.write(CMDR_OFF + start, &(64u32 | OP_PAD).to_le_bytes());
        let read = [0x28, 0, 0, 0, 0, 1, 0, 0, 2, 0];
        let len = queue_cmd(
            &mem,
            0,
            &read,
            &[(DATA as u64 + 4096, 512), (DATA as u64, 512)],
        );
        mem.store_release(MB_CMD_TAIL, start as u32);
        mem.store_release(MB_CMD_HEAD, len as u32);
        assert_eq!(run_all(&mem, &disk).unwrap(), 1);
        assert_eq!(mem.load_acquire(MB_CMD_TAIL), Some(len as u32));
        let v = mem.0.borrow();
        assert_eq!(v[CMDR_OFF + RSP_STATUS], 0);
        let image = backend.bytes.lock().unwrap();
        assert_eq!(&v[DATA + 4096..DATA + 4608], &image[512..1024]);
        assert_eq!(&v[DATA..DATA + 512], &image[1024..1536]);
    }

    #[test]
    fn answers_are_written_in_ring_order_and_survive_a_restart() {
        let mem = ring();
        let backend = Arc::new(MemBackend::new(1 << 20, false));
        let disk = Disk::new(info(), Some(backend.clone()));
        // Three READ(10)s of one block each, blocks 7, 8, 9.
        let mut at = 0;
        let mut entries = Vec::new();
        for (i, lba) in [7u8, 8, 9].into_iter().enumerate() {
            let read = [0x28, 0, 0, 0, 0, lba, 0, 0, 1, 0];
            entries.push(at);
            at += queue_cmd(&mem, at, &read, &[(DATA as u64 + 512 * i as u64, 512)]);
        }
        mem.store_release(MB_CMD_HEAD, at as u32);
        let mb = Mailbox::read(&mem).unwrap();
        let ring = Ring::new(&mem, mb).unwrap();
        let (requests, moved) = ring.take().unwrap();
        assert_eq!((requests.len(), moved), (3, false));
        // The last two finish first: nothing is answered yet, and their
        // entries still hold their requests.
        let before = mem.0.borrow().clone();
        for r in &requests[1..] {
            let outcome = ring.execute(r, &disk, &|_| {});
            assert!(!ring.finish(r, &outcome).unwrap());
        }
        assert_eq!(mem.load_acquire(MB_CMD_TAIL), Some(0));
        assert_eq!(&mem.0.borrow()[..DATA], &before[..DATA]);
        // A daemon started now finds all three owed an answer.
        let again = Ring::new(&mem, mb).unwrap().take().unwrap().0;
        assert_eq!(
            again.iter().map(|r| r.cdb().to_vec()).collect::<Vec<_>>(),
            requests
                .iter()
                .map(|r| r.cdb().to_vec())
                .collect::<Vec<_>>()
        );
        // The first finishes: all three are answered at once.
        let outcome = ring.execute(&requests[0], &disk, &|_| {});
        assert!(ring.finish(&requests[0], &outcome).unwrap());
        assert_eq!(mem.load_acquire(MB_CMD_TAIL), Some(at as u32));
        assert_eq!(ring.outstanding(), 0);
        let v = mem.0.borrow();
        let image = backend.bytes.lock().unwrap();
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(v[CMDR_OFF + e + RSP_STATUS], 0);
            let lba = 7 + i;
            assert_eq!(
                &v[DATA + 512 * i..DATA + 512 * (i + 1)],
                &image[512 * lba..512 * (lba + 1)]
            );
        }
        drop((v, image));
        assert!(
            ring.finish(&requests[1], &outcome).is_err(),
            "answered twice"
        );
    }

    #[test]
    fn unknown_commands_get_sense() {
        let mem = ring();
        let disk = Disk::new(info(), Some(Arc::new(MemBackend::new(1 << 20, false))));
        let len = queue_cmd(
            &mem,
            0,
            &[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[(DATA as u64, 64)],
        );
        mem.store_release(MB_CMD_HEAD, len as u32);
        assert_eq!(run_all(&mem, &disk).unwrap(), 1);
        let v = mem.0.borrow();
        assert_eq!(v[CMDR_OFF + RSP_STATUS], scsi::CHECK_CONDITION);
        let sense = &v[CMDR_OFF + RSP_SENSE..CMDR_OFF + RSP_SENSE + 18];
        assert_eq!((sense[0], sense[2], sense[12]), (0x70, 0x05, 0x20));
    }

    #[test]
    fn bad_rings_are_errors_not_wild_accesses() {
        let mem = ring();
        let disk = Disk::new(info(), None);
        // An iovec pointing past the mapping.
        let len = queue_cmd(
            &mem,
            0,
            &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            &[(1 << 40, 512)],
        );
        mem.store_release(MB_CMD_HEAD, len as u32);
        assert!(run_all(&mem, &disk).is_err());
        // A zero-length entry.
        mem.write(CMDR_OFF, &(OP_CMD).to_le_bytes());
        assert!(run_all(&mem, &disk).is_err());
        // A head off an entry boundary: an error, not a walk round the
        // ring for ever (found by the `tcmu` fuzz target).
        let mem = ring();
        let len = queue_cmd(&mem, 0, &[0x00, 0, 0, 0, 0, 0], &[]);
        mem.store_release(MB_CMD_HEAD, len as u32 - 8);
        let err = run_all(&mem, &disk).unwrap_err();
        assert!(err.contains("runs past cmd_head"), "{err}");
        // A head or a tail outside the ring.
        mem.store_release(MB_CMD_HEAD, CMDR_SIZE as u32 + 8);
        assert!(run_all(&mem, &disk).is_err());
        mem.store_release(MB_CMD_HEAD, 0);
        mem.store_release(MB_CMD_TAIL, CMDR_SIZE as u32);
        assert!(run_all(&mem, &disk).is_err());
        // Mailboxes that do not fit.
        let small = VecMem(RefCell::new(vec![0u8; 1]));
        assert!(Mailbox::read(&small).is_err());
        mem.write(MB_CMDR_SIZE, &(1u32 << 30).to_le_bytes());
        assert!(Mailbox::read(&mem).is_err());
        mem.write(0, &1u16.to_le_bytes());
        assert!(Mailbox::read(&mem).is_err());
    }
}
