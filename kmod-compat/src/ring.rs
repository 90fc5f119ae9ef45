//! The target_core_user ring, from `<linux/target_core_user.h>`.
//!
//! The uio mapping starts with the mailbox (`struct tcmu_mailbox`), then
//! the command ring at `cmdr_off`, `cmdr_size` bytes long, then the data
//! area. The kernel queues `struct tcmu_cmd_entry`s at `cmd_head`; we
//! take them, run them (several at once, see [`Ring`]) and answer them at
//! `cmd_tail`. Every offset and length read from the ring is checked
//! against the mapping before use, so a confused kernel or a stale mapping
//! gives an error, not a wild access.
//!
//! # Answers as commands finish
//!
//! The kernel reads answers from its last cleaned entry up to `cmd_tail`,
//! skipping PAD (and TMR) entries and finding each command by the `cmd_id`
//! in the entry's header, not by the entry's place: when the mailbox has
//! `TCMU_MAILBOX_FLAG_CAP_OOOC`, a command that finishes is answered at
//! once in the first CMD entry at `cmd_tail`, whoever's that entry was
//! (its header gets the finished command's `cmd_id`, its response half the
//! status and sense), and `cmd_tail` moves past it. A command is answered
//! in its own entry when that entry is the one at the tail.
//!
//! That alone would break restarts: a daemon that starts on a ring takes
//! the entries past `cmd_tail` as the commands it owes. Answering X in
//! Y's entry while Y still runs loses Y's request (the entry is now
//! behind the tail, the kernel reuses it), and X's own entry, still past
//! the tail, would be run and answered a second time ("cmd_id not found,
//! ring is broken"). So each device has a small journal ([`Journal`], a
//! file under /run the next daemon for the same device finds) with two
//! kinds of records:
//!
//! - displaced: the request (CDB, iovecs, cmd_id) of a running command
//!   whose entry was overwritten by another's answer; owed, dropped once
//!   it is answered;
//! - answered ahead: the (cmd_id, place) of an answered command whose own
//!   entry is still past the tail; not owed, dropped once the tail moves
//!   past that entry.
//!
//! A daemon starting on a ring takes the displaced requests first, then
//! the entries past `cmd_tail` except those answered ahead.
//!
//! The journal holds two copies ("halves") of the record set, each with a
//! sequence number, a checksum and a commit mark. An answer that changes
//! the records (one not written in the command's own entry) is, in order:
//!
//! 1. the new record set is written to the half not in use, with the tail
//!    before and after the answer and the entry's bytes the answer will
//!    overwrite (header through sense);
//! 2. the answer is written into the entry at the tail;
//! 3. `cmd_tail` is stored (the commit: the kernel may now take it);
//! 4. the half's commit mark is set.
//!
//! A restarted daemon takes the newest valid half. Marked, or `cmd_tail`
//! equal to its "after" tail: the answer was given (crash between 3 and
//! 4), its records hold. Unmarked and `cmd_tail` equal to its "before"
//! tail (crash between 1 and 3): the answer was not given, the older half
//! holds, and the entry's saved bytes are written back over whatever part
//! of the answer reached it, so the entry holds its request again. A torn
//! half (crash during 1) fails its checksum and the older one holds, the
//! ring unchanged. The tail never moves between 1 and 4, so "before" and
//! "after" (which differ: the entry has a length) tell the cases apart.
//! The new daemon settles that choice before it answers anything (once the
//! tail moves again they would tell nothing): it marks the half whose
//! answer was given, or writes the entry back and then clears the half
//! whose answer was not; a crash before that leaves the next daemon the
//! same choice.
//! An answer in the command's own entry changes no records and is written
//! as before this journal existed: a crash between writing it and storing
//! `cmd_tail` leaves an entry that no longer holds its request (that
//! window was always there). A journal that fails its checks (another
//! device's, a torn file, records that do not match the ring) is ignored
//! and started afresh; without a journal, or on a kernel without OOOC,
//! answers are written in ring order, each in its own entry.

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::hash::Hasher;
use std::sync::atomic::{fence, Ordering};
use std::sync::Mutex;

use crate::exec::{DataBuf, Disk, FillFn, Outcome};
use crate::scsi;

/// `struct tcmu_mailbox` field offsets (packed; `cmd_tail` is 64-aligned).
const MB_VERSION: usize = 0;
const MB_FLAGS: usize = 2;
const MB_CMDR_OFF: usize = 4;
const MB_CMDR_SIZE: usize = 8;
const MB_CMD_HEAD: usize = 12;
pub const MB_CMD_TAIL: usize = 64;
/// TCMU_MAILBOX_FLAG_CAP_OOOC: the kernel takes out-of-order answers.
pub const FLAG_CAP_OOOC: u16 = 1;

/// `enum tcmu_opcode`.
#[cfg(test)]
const OP_PAD: u32 = 0;
const OP_CMD: u32 = 1;
const OP_MASK: u32 = 0x7;

/// `struct tcmu_cmd_entry` offsets: header, then the request or response.
/// The outer struct is packed but the request struct inside the union is
/// not, so `cdb_off` sits 8-aligned at 24 and the iovecs start at 48.
const ENT_HDR_LEN: usize = 8;
const ENT_CMD_ID: usize = 4;
const REQ_IOV_CNT: usize = 8;
const REQ_CDB_OFF: usize = 24;
const REQ_IOV: usize = 48;
const IOVEC_LEN: usize = 16;
const RSP_STATUS: usize = 8;
const RSP_SENSE: usize = 16;
/// TCMU_SENSE_BUFFERSIZE.
const SENSE_BUFFER: usize = 96;
/// The bytes of an entry an answer writes: header's cmd_id through sense.
const RSP_END: usize = RSP_SENSE + SENSE_BUFFER;

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
    /// Call `f` with `[offset, offset + len)` as a slice to fill (data-in
    /// without a copy); `None` when out of range. Only for a range of the
    /// data area that belongs to a command being run, which neither the
    /// kernel nor another command touches until it is answered.
    fn fill(
        &self,
        offset: usize,
        len: usize,
        f: &mut dyn FnMut(&mut [u8]) -> Result<(), String>,
    ) -> Option<Result<(), String>>;
}

fn u32_at<M: SharedMem + ?Sized>(mem: &M, offset: usize) -> Option<u32> {
    let mut b = [0u8; 4];
    mem.read(offset, &mut b).then(|| u32::from_le_bytes(b))
}

fn u64_at<M: SharedMem + ?Sized>(mem: &M, offset: usize) -> Option<u64> {
    let mut b = [0u8; 8];
    mem.read(offset, &mut b).then(|| u64::from_le_bytes(b))
}

fn u16_at<M: SharedMem + ?Sized>(mem: &M, offset: usize) -> Option<u16> {
    let mut b = [0u8; 2];
    mem.read(offset, &mut b).then(|| u16::from_le_bytes(b))
}

/// The fixed part of the mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mailbox {
    pub version: u16,
    /// TCMU_MAILBOX_FLAG_*.
    pub flags: u16,
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
        let flags = u16_at(mem, MB_FLAGS).unwrap_or(0);
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
            flags,
            cmdr_off,
            cmdr_size,
        })
    }
}

/// Pieces of a command's data at least this large are read into straight
/// (fewer, larger backend reads beat a copy); smaller ones are bounced.
const DIRECT_PIECE: usize = 64 << 10;

/// A command's data: the iovecs of a ring entry, as offsets into `mem`.
struct IovBuf<'a, M: SharedMem + ?Sized> {
    mem: &'a M,
    iovs: &'a [(usize, usize)],
    total: usize,
    /// Where the data area starts: only memory past it is filled in place.
    data_start: usize,
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
    fn fill_in(&mut self, len: usize, fill: &mut FillFn<'_>) -> Option<Result<(), String>> {
        let mut pieces = Vec::new();
        self.walk(0, len.min(self.total), |at, r| pieces.push((at, r)));
        let direct = pieces.iter().all(|(at, r)| {
            *at >= self.data_start && (pieces.len() == 1 || r.len() >= DIRECT_PIECE)
        });
        if !direct {
            return None;
        }
        for (at, r) in pieces {
            let done = r.start;
            match self.mem.fill(at, r.len(), &mut |buf| fill(done, buf)) {
                Some(Ok(())) => {}
                Some(Err(e)) => return Some(Err(e)),
                // Out of range (checked when taken, so never): bounce.
                None => return None,
            }
        }
        Some(Ok(()))
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
    fn fill(
        &self,
        offset: usize,
        len: usize,
        f: &mut dyn FnMut(&mut [u8]) -> Result<(), String>,
    ) -> Option<Result<(), String>> {
        let mut v = self.0.borrow_mut();
        let s = v.get_mut(offset..offset.checked_add(len)?)?;
        Some(f(s))
    }
}

/// One command taken off the ring: its `cmd_id`, CDB and data iovecs,
/// copied out so the entry is not read again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    cmd_id: u16,
    cdb: [u8; 16],
    cdb_len: usize,
    iovs: Vec<(usize, usize)>,
    total: usize,
}

impl Request {
    pub fn cdb(&self) -> &[u8] {
        &self.cdb[..self.cdb_len]
    }
    /// The kernel's id for the command (`tcmu_cmd_entry_hdr.cmd_id`).
    pub fn cmd_id(&self) -> u16 {
        self.cmd_id
    }
}

/// An entry taken off the ring whose answer has not been written there.
struct Slot {
    /// Ring offset and length of the entry.
    pos: usize,
    len: usize,
    /// For a CMD entry, the cmd_id it was queued with and whether that
    /// command was already answered (in another entry). PAD and other
    /// entries need no answer.
    cmd: Option<(u16, bool)>,
}

/// The journal's records (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Records {
    /// Answered ahead: (cmd_id, ring offset of its own entry).
    ahead: Vec<(u16, usize)>,
    /// Displaced: running commands whose entries were overwritten.
    displaced: Vec<Request>,
}

impl Records {
    fn is_empty(&self) -> bool {
        self.ahead.is_empty() && self.displaced.is_empty()
    }
}

struct State {
    /// Ring offset of the next entry to take.
    next: usize,
    /// `cmd_tail` as last stored.
    tail: usize,
    /// Entries from `tail` to `next`.
    slots: VecDeque<Slot>,
    /// cmd_ids taken and not answered yet.
    outstanding: HashSet<u16>,
    /// Finished commands waiting for an entry to answer in, in the order
    /// they finished: the cmd_id and the response half.
    ready: Vec<(u16, [u8; 8 + SENSE_BUFFER])>,
    /// What the journal holds now.
    records: Records,
    /// Requests a previous daemon owed (displaced), for the first `take`.
    restored: Vec<Request>,
    /// The journal: the last sequence number written and the half that
    /// holds the records in effect.
    seq: u64,
    active: usize,
}

/// A device's command ring, shared by the thread that takes commands and
/// the workers that run them.
///
/// Commands run concurrently and, with a journal on a kernel that takes
/// out-of-order answers, are answered as they finish at `cmd_tail` (see
/// the module doc for how a restart still finds every command owed, and
/// none twice). Without one, answers are written in ring order: each in
/// its own entry, `cmd_tail` moving only past answered entries, so every
/// entry past `cmd_tail` still holds its request.
pub struct Ring<'m, M: SharedMem + ?Sized> {
    mem: &'m M,
    mb: Mailbox,
    /// The journal and this ring's identity in it.
    journal: Option<(&'m M, u64)>,
    state: Mutex<State>,
    /// Tests stop an answer after this many of its steps (a crash).
    #[cfg(test)]
    crash_after: std::sync::atomic::AtomicU8,
}

/// Journal layout: two halves, each a header then the encoded records.
pub const JOURNAL_SIZE: usize = 128 << 10;
const HALF: usize = JOURNAL_SIZE / 2;
const J_MAGIC: &[u8; 8] = b"OBDTCMJ1";
const H_MAGIC: usize = 0;
const H_SUM: usize = 8;
const H_LEN: usize = 16;
const H_COMMIT: usize = 20;
const H_BODY: usize = 24;
const NO_POS: u32 = u32::MAX;

/// One half of the journal, decoded.
#[derive(Debug)]
struct Snapshot {
    seq: u64,
    identity: u64,
    tail_before: u32,
    tail_after: u32,
    /// The entry the answer went into and its bytes before.
    pending: Option<(usize, [u8; RSP_END])>,
    records: Records,
    committed: bool,
}

fn checksum(len: u32, body: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(&len.to_le_bytes());
    h.write(body);
    h.finish()
}

impl Snapshot {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.identity.to_le_bytes());
        b.extend_from_slice(&self.tail_before.to_le_bytes());
        b.extend_from_slice(&self.tail_after.to_le_bytes());
        let (pos, bytes) = match &self.pending {
            Some((pos, bytes)) => (*pos as u32, *bytes),
            None => (NO_POS, [0u8; RSP_END]),
        };
        b.extend_from_slice(&pos.to_le_bytes());
        b.extend_from_slice(&bytes);
        let r = &self.records;
        b.extend_from_slice(&(r.ahead.len() as u32).to_le_bytes());
        b.extend_from_slice(&(r.displaced.len() as u32).to_le_bytes());
        for &(id, pos) in &r.ahead {
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&(pos as u32).to_le_bytes());
        }
        for d in &r.displaced {
            b.extend_from_slice(&d.cmd_id.to_le_bytes());
            b.push(d.cdb_len as u8);
            b.extend_from_slice(&d.cdb);
            b.extend_from_slice(&(d.iovs.len() as u32).to_le_bytes());
            for &(base, n) in &d.iovs {
                b.extend_from_slice(&(base as u64).to_le_bytes());
                b.extend_from_slice(&(n as u64).to_le_bytes());
            }
        }
        b
    }

    fn decode(body: &[u8], committed_mark: u32) -> Option<Snapshot> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = body.get(at..at.checked_add(n)?)?;
            at += n;
            Some(s)
        };
        let u16_ = |s: &[u8]| u16::from_le_bytes([s[0], s[1]]);
        let u32_ = |s: &[u8]| u32::from_le_bytes(s[..4].try_into().unwrap());
        let u64_ = |s: &[u8]| u64::from_le_bytes(s[..8].try_into().unwrap());
        let seq = u64_(take(8)?);
        let identity = u64_(take(8)?);
        let tail_before = u32_(take(4)?);
        let tail_after = u32_(take(4)?);
        let pos = u32_(take(4)?);
        let bytes: [u8; RSP_END] = take(RSP_END)?.try_into().ok()?;
        let pending = (pos != NO_POS).then_some((pos as usize, bytes));
        let n_ahead = u32_(take(4)?) as usize;
        let n_displaced = u32_(take(4)?) as usize;
        let mut records = Records::default();
        for _ in 0..n_ahead {
            let id = u16_(take(2)?);
            let pos = u32_(take(4)?) as usize;
            records.ahead.push((id, pos));
        }
        for _ in 0..n_displaced {
            let cmd_id = u16_(take(2)?);
            let cdb_len = take(1)?[0] as usize;
            let cdb: [u8; 16] = take(16)?.try_into().ok()?;
            let n = u32_(take(4)?) as usize;
            if cdb_len == 0 || cdb_len > 16 || n > body.len() / 16 {
                return None;
            }
            let mut iovs = Vec::with_capacity(n);
            let mut total = 0usize;
            for _ in 0..n {
                let base = usize::try_from(u64_(take(8)?)).ok()?;
                let len = usize::try_from(u64_(take(8)?)).ok()?;
                total = total.checked_add(len)?;
                iovs.push((base, len));
            }
            records.displaced.push(Request {
                cmd_id,
                cdb,
                cdb_len,
                iovs,
                total,
            });
        }
        if at != body.len() {
            return None;
        }
        Some(Snapshot {
            seq,
            identity,
            tail_before,
            tail_after,
            pending,
            records,
            committed: committed_mark == seq as u32,
        })
    }

    /// Half `half` of `jm`: `Err(true)` when it holds something that is
    /// not a valid snapshot (torn or foreign), `Err(false)` when empty.
    fn load<J: SharedMem + ?Sized>(jm: &J, half: usize) -> Result<Snapshot, bool> {
        let base = half * HALF;
        let mut magic = [0u8; 8];
        if !jm.read(base + H_MAGIC, &mut magic) {
            return Err(false);
        }
        if &magic != J_MAGIC {
            return Err(magic != [0u8; 8]);
        }
        let sum = u64_at(jm, base + H_SUM).ok_or(true)?;
        let len = u32_at(jm, base + H_LEN).ok_or(true)?;
        if len as usize > HALF - H_BODY {
            return Err(true);
        }
        let mut body = vec![0u8; len as usize];
        if !jm.read(base + H_BODY, &mut body) || checksum(len, &body) != sum {
            return Err(true);
        }
        let mark = jm.load_acquire(base + H_COMMIT).ok_or(true)?;
        Snapshot::decode(&body, mark).ok_or(true)
    }

    /// Write into half `half` of `jm`, unmarked. False when it does not
    /// fit (or the memory refuses).
    fn store<J: SharedMem + ?Sized>(&self, jm: &J, half: usize) -> bool {
        let body = self.encode();
        if H_BODY + body.len() > HALF || jm.len() < JOURNAL_SIZE {
            return false;
        }
        let base = half * HALF;
        let len = body.len() as u32;
        // The mark is a sequence number: the one left in this half (two
        // writes ago) never equals the new one.
        let ok = jm.write(base + H_BODY, &body)
            && jm.write(base + H_LEN, &len.to_le_bytes())
            && jm.write(base + H_SUM, &checksum(len, &body).to_le_bytes())
            && jm.write(base + H_MAGIC, J_MAGIC);
        // The half is complete before anything it protects is touched.
        fence(Ordering::SeqCst);
        ok
    }

    /// Mark the snapshot in `half` given.
    fn mark<J: SharedMem + ?Sized>(jm: &J, half: usize, seq: u64) -> bool {
        jm.store_release(half * HALF + H_COMMIT, seq as u32)
    }
}

/// What a journal says about a ring, checked against it.
struct Restored {
    records: Records,
    /// The half holding them, and the last sequence number used.
    active: usize,
    seq: u64,
    /// An entry to write back (an answer that was not committed).
    repair: Option<(usize, [u8; RSP_END])>,
    /// How the newest half is settled for good, before the tail can move
    /// again (after which its "before" and "after" tell nothing): the
    /// half to mark (its answer was given) or to clear (it was not).
    settle: Option<(usize, bool)>,
}

impl<'m, M: SharedMem + ?Sized> Ring<'m, M> {
    /// Start at the ring's `cmd_tail`: entries past it are owed an answer,
    /// whether they came before or after this daemon started. Answers are
    /// written in ring order (there is no journal).
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
            journal: None,
            state: Mutex::new(State {
                next: tail,
                tail,
                slots: VecDeque::new(),
                outstanding: HashSet::new(),
                ready: Vec::new(),
                records: Records::default(),
                restored: Vec::new(),
                seq: 0,
                active: 0,
            }),
            #[cfg(test)]
            crash_after: std::sync::atomic::AtomicU8::new(u8::MAX),
        })
    }

    /// As [`Ring::new`], answering commands as they finish with `journal`
    /// (at least [`JOURNAL_SIZE`] bytes; `identity` tells this ring's
    /// journal from another's). A previous daemon's journal is taken up:
    /// its displaced requests are the first `take`'s. `note` is told when
    /// the journal cannot be used or was ignored; answers are then in
    /// ring order or the journal starts afresh.
    pub fn with_journal(
        mem: &'m M,
        mb: Mailbox,
        journal: &'m M,
        identity: u64,
        note: &dyn Fn(&str),
    ) -> Result<Ring<'m, M>, String> {
        let mut ring = Ring::new(mem, mb)?;
        if mb.flags & FLAG_CAP_OOOC == 0 {
            note("this kernel takes answers in ring order only (no OOOC): no journal");
            return Ok(ring);
        }
        if journal.len() < JOURNAL_SIZE {
            note("the journal is too small: answers in ring order");
            return Ok(ring);
        }
        let identity = {
            let mut h = fnv::FnvHasher::default();
            h.write_u64(identity);
            h.write_u64(mb.cmdr_off as u64);
            h.write_u64(mb.cmdr_size as u64);
            h.finish()
        };
        let tail = ring.lock().tail;
        let restored = match ring.restore(journal, identity, tail) {
            Ok(Some(r)) => Some(r),
            Ok(None) => None,
            Err(e) => {
                note(&format!("journal ignored, started afresh: {e}"));
                None
            }
        };
        let st = ring.state.get_mut().unwrap_or_else(|e| e.into_inner());
        match restored {
            Some(r) => {
                if !r.records.is_empty() || r.repair.is_some() {
                    note(&format!(
                        "taken up from the last daemon: {} displaced requests owed, {} \
                         commands answered ahead{}",
                        r.records.displaced.len(),
                        r.records.ahead.len(),
                        match r.repair {
                            Some(_) => ", an unfinished answer undone",
                            None => "",
                        }
                    ));
                }
                if let Some((pos, bytes)) = r.repair {
                    if !mem.write(mb.cmdr_off + pos, &bytes) {
                        return Err("cannot repair a ring entry".into());
                    }
                    fence(Ordering::SeqCst);
                }
                // Settled before any answer moves the tail: a crash before
                // this leaves the same choice to the next daemon.
                let settled = match r.settle {
                    Some((half, true)) => Snapshot::mark(journal, half, r.seq),
                    Some((half, false)) => journal.write(half * HALF + H_MAGIC, &[0u8; 8]),
                    None => true,
                };
                if !settled {
                    return Err("the journal is unwritable".into());
                }
                for d in &r.records.displaced {
                    st.outstanding.insert(d.cmd_id);
                }
                st.restored = r.records.displaced.clone();
                st.records = r.records;
                st.active = r.active;
                st.seq = r.seq;
            }
            None => {
                // Start afresh: clear both halves, then an empty, marked
                // snapshot in half 0 for the first answer to fall back to.
                let fresh = Snapshot {
                    seq: 1,
                    identity,
                    tail_before: tail as u32,
                    tail_after: tail as u32,
                    pending: None,
                    records: Records::default(),
                    committed: true,
                };
                let ok = journal.write(H_MAGIC, &[0u8; 8])
                    && journal.write(HALF + H_MAGIC, &[0u8; 8])
                    && fresh.store(journal, 0)
                    && Snapshot::mark(journal, 0, 1);
                if !ok {
                    note("the journal cannot be written: answers in ring order");
                    return Ok(ring);
                }
                st.active = 0;
                st.seq = 1;
            }
        }
        ring.journal = Some((journal, identity));
        Ok(ring)
    }

    /// Read the journal against the ring: `Ok(None)` when it is empty,
    /// `Err` when it cannot be trusted.
    fn restore(&self, jm: &M, identity: u64, tail: usize) -> Result<Option<Restored>, String> {
        let mut halves = Vec::new();
        let mut foreign = false;
        for half in 0..2 {
            match Snapshot::load(jm, half) {
                Ok(s) if s.identity == identity => halves.push((half, s)),
                Ok(_) => foreign = true,
                Err(true) => foreign = true,
                Err(false) => {}
            }
        }
        halves.sort_by_key(|(_, s)| std::cmp::Reverse(s.seq));
        let Some((top_half, top)) = halves.first() else {
            return match foreign {
                true => Err("it is another ring's, or torn".into()),
                false => Ok(None),
            };
        };
        let seq = top.seq;
        let (active, records, repair, settle) = if top.committed {
            (*top_half, top.records.clone(), None, None)
        } else if tail == top.tail_after as usize {
            (
                *top_half,
                top.records.clone(),
                None,
                Some((*top_half, true)),
            )
        } else if tail == top.tail_before as usize {
            // The last answer was not given: the older half holds, and the
            // entry it went into gets its bytes back.
            let Some((prev_half, prev)) = halves.get(1) else {
                return Err("an unfinished answer with no earlier copy".into());
            };
            let settle = Some((*top_half, false));
            (*prev_half, prev.records.clone(), top.pending, settle)
        } else {
            return Err(format!(
                "cmd_tail {tail} is neither {} nor {}",
                top.tail_before, top.tail_after
            ));
        };
        self.check(&records, repair.as_ref(), tail)?;
        Ok(Some(Restored {
            records,
            active,
            seq,
            repair,
            settle,
        }))
    }

    /// Check journal records against the entries from `tail` to
    /// `cmd_head`, reading the entry `repair` names from its saved bytes.
    fn check(
        &self,
        records: &Records,
        repair: Option<&(usize, [u8; RSP_END])>,
        tail: usize,
    ) -> Result<(), String> {
        let head = self
            .mem
            .load_acquire(MB_CMD_HEAD)
            .ok_or("cmd_head unreadable")? as usize;
        if head >= self.mb.cmdr_size {
            return Err(format!("ring head {head} is outside the ring"));
        }
        let mut left = (head + self.mb.cmdr_size - tail) % self.mb.cmdr_size;
        let mut pos = tail;
        let mut cmds = Vec::new();
        while left > 0 {
            let entry = self.mb.cmdr_off + pos;
            let len_op = u32_at(self.mem, entry).ok_or("entry header unreadable")?;
            let len = (len_op & !OP_MASK) as usize;
            if len < ENT_HDR_LEN || len > self.mb.cmdr_size - pos || len > left {
                return Err(format!("ring entry at {pos} has length {len}"));
            }
            if len_op & OP_MASK == OP_CMD {
                let id = match repair {
                    Some((at, bytes)) if *at == pos => u16::from_le_bytes([bytes[4], bytes[5]]),
                    _ => u16_at(self.mem, entry + ENT_CMD_ID).ok_or("entry unreadable")?,
                };
                cmds.push((id, pos));
            }
            left -= len;
            pos = (pos + len) % self.mb.cmdr_size;
        }
        if let Some((at, _)) = repair {
            if !cmds.iter().any(|&(_, p)| p == *at) {
                return Err(format!("no entry at {at} to write back"));
            }
        }
        if records.ahead.len() != records.displaced.len() {
            return Err(format!(
                "{} answered ahead but {} displaced",
                records.ahead.len(),
                records.displaced.len()
            ));
        }
        let mut owed = HashSet::new();
        for a in &records.ahead {
            if !cmds.contains(a) {
                return Err(format!("no entry {} at {} past the tail", a.0, a.1));
            }
        }
        for c in cmds.iter().filter(|c| !records.ahead.contains(c)) {
            if !owed.insert(c.0) {
                return Err(format!("cmd_id {} owed twice", c.0));
            }
        }
        for d in &records.displaced {
            if !owed.insert(d.cmd_id) {
                return Err(format!("cmd_id {} owed twice", d.cmd_id));
            }
            let fits = d
                .iovs
                .iter()
                .all(|&(b, n)| b.checked_add(n).is_some_and(|e| e <= self.mem.len()));
            if !fits {
                return Err(format!("cmd_id {}: iovecs outside the mapping", d.cmd_id));
            }
        }
        Ok(())
    }

    /// The ring's size in bytes.
    pub fn size(&self) -> usize {
        self.mb.cmdr_size
    }

    /// Whether answers are written as commands finish (a journal is used).
    pub fn out_of_order(&self) -> bool {
        self.journal.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A worker that panicked mid-answer leaves consistent state: the
        // ring and journal are changed only after the checks that fail.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take every command the kernel queued since the last call (after a
    /// restart, first the requests the journal holds). The bool is true
    /// when `cmd_tail` moved (PAD entries need no work) and the kernel
    /// should be told. An error means the ring makes no sense.
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
        let mut taken = std::mem::take(&mut st.restored);
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
            let cmd = if len_op & OP_MASK == OP_CMD {
                let id = u16_at(mem, entry + ENT_CMD_ID).ok_or("entry header unreadable")?;
                if st.records.ahead.contains(&(id, pos)) {
                    // Answered by the daemon before us.
                    Some((id, true))
                } else {
                    if st.outstanding.contains(&id) {
                        return Err(format!("ring entry at {pos}: cmd_id {id} is already owed"));
                    }
                    taken.push(read_request(mem, id, entry, len)?);
                    st.outstanding.insert(id);
                    Some((id, false))
                }
            } else {
                // PAD, TMR notifications and future opcodes: nothing to
                // do; an aborted command is still answered when it ends.
                None
            };
            st.slots.push_back(Slot { pos, len, cmd });
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
            data_start: self.mb.cmdr_off + self.mb.cmdr_size,
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
        let id = request.cmd_id;
        let mut st = self.lock();
        if !st.outstanding.contains(&id) || st.ready.iter().any(|r| r.0 == id) {
            return Err(format!("cmd_id {id} is not outstanding (answered twice?)"));
        }
        st.ready.push((id, rsp));
        self.retire(&mut st)
    }

    /// Commands taken and not yet answered in the ring.
    pub fn outstanding(&self) -> usize {
        self.lock().outstanding.len()
    }

    /// Nothing is owed and the journal holds nothing: a journal file can
    /// go.
    pub fn settled(&self) -> bool {
        let st = self.lock();
        st.outstanding.is_empty() && st.records.is_empty()
    }

    /// Store `cmd_tail`.
    fn store_tail(&self, st: &mut State, tail: usize) -> Result<(), String> {
        if !self.mem.store_release(MB_CMD_TAIL, tail as u32) {
            return Err("cmd_tail unwritable".into());
        }
        st.tail = tail;
        Ok(())
    }

    #[cfg(test)]
    fn crash_point(&self, step: u8) -> Result<(), String> {
        if self.crash_after.load(Ordering::Relaxed) == step {
            return Err(format!("crashed after step {step}"));
        }
        Ok(())
    }
    #[cfg(not(test))]
    fn crash_point(&self, _step: u8) -> Result<(), String> {
        Ok(())
    }

    /// Write the answers that can be written at the tail and move
    /// `cmd_tail` past them. True when it moved.
    fn retire(&self, st: &mut State) -> Result<bool, String> {
        let mut moved = false;
        loop {
            while st.slots.front().is_some_and(|s| s.cmd.is_none()) {
                let slot = st.slots.pop_front().expect("front exists");
                self.store_tail(st, (slot.pos + slot.len) % self.mb.cmdr_size)?;
                moved = true;
            }
            let Some(front) = st.slots.front() else { break };
            let (pos, len) = (front.pos, front.len);
            let (y, y_answered) = front.cmd.expect("a CMD entry");
            if st.ready.is_empty() {
                break;
            }
            let own = if y_answered {
                None
            } else {
                st.ready.iter().position(|r| r.0 == y)
            };
            let entry = self.mb.cmdr_off + pos;
            let after = (pos + len) % self.mb.cmdr_size;
            let index = match (own, self.journal) {
                (Some(i), _) => {
                    // Its own entry: nothing to journal.
                    if !self.mem.write(entry + RSP_STATUS, &st.ready[i].1) {
                        return Err(format!("ring entry at {pos}: no room for the response"));
                    }
                    self.store_tail(st, after)?;
                    i
                }
                (None, None) => {
                    if y_answered {
                        return Err(format!("ring entry at {pos}: answered ahead, no journal"));
                    }
                    // In ring order: wait for the entry's own command.
                    break;
                }
                (None, Some((jm, identity))) => {
                    let (x, rsp) = st.ready[0];
                    let mut records = st.records.clone();
                    if y_answered {
                        records.ahead.retain(|&a| a != (y, pos));
                    } else {
                        records
                            .displaced
                            .push(read_request(self.mem, y, entry, len)?);
                    }
                    let x_own = st.slots.iter().position(|s| s.cmd == Some((x, false)));
                    match x_own {
                        Some(i) => records.ahead.push((x, st.slots[i].pos)),
                        None => {
                            let before = records.displaced.len();
                            records.displaced.retain(|d| d.cmd_id != x);
                            if records.displaced.len() == before {
                                return Err(format!("cmd_id {x} has no entry"));
                            }
                        }
                    }
                    let mut saved = [0u8; RSP_END];
                    if !self.mem.read(entry, &mut saved) {
                        return Err(format!("ring entry at {pos} unreadable"));
                    }
                    let snapshot = Snapshot {
                        seq: st.seq + 1,
                        identity,
                        tail_before: st.tail as u32,
                        tail_after: after as u32,
                        pending: Some((pos, saved)),
                        records,
                        committed: false,
                    };
                    let half = 1 - st.active;
                    if !snapshot.store(jm, half) {
                        // Too many records to journal: this one waits for
                        // the entry's own command.
                        break;
                    }
                    self.crash_point(1)?;
                    let ok = self.mem.write(entry + ENT_CMD_ID, &x.to_le_bytes())
                        && self.mem.write(entry + RSP_STATUS, &rsp);
                    if !ok {
                        return Err(format!("ring entry at {pos}: no room for the response"));
                    }
                    self.crash_point(2)?;
                    self.store_tail(st, after)?;
                    self.crash_point(3)?;
                    if !Snapshot::mark(jm, half, snapshot.seq) {
                        return Err("the journal is unwritable".into());
                    }
                    st.seq = snapshot.seq;
                    st.active = half;
                    st.records = snapshot.records;
                    if let Some(i) = x_own {
                        st.slots[i].cmd = Some((x, true));
                    }
                    0
                }
            };
            let (x, _) = st.ready.remove(index);
            st.outstanding.remove(&x);
            st.slots.pop_front();
            moved = true;
        }
        Ok(moved)
    }
}

/// Read and check one CMD entry's request.
fn read_request(
    mem: &(impl SharedMem + ?Sized),
    cmd_id: u16,
    entry: usize,
    len: usize,
) -> Result<Request, String> {
    let bad = |what: &str| format!("ring entry at {entry}: {what}");
    if RSP_END > len {
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
        cmd_id,
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
        let mem = VecMem(RefCell::new(vec![0u8; DATA + (256 << 10)]));
        mem.write(0, &2u16.to_le_bytes());
        mem.write(MB_FLAGS, &FLAG_CAP_OOOC.to_le_bytes());
        mem.write(MB_CMDR_OFF, &(CMDR_OFF as u32).to_le_bytes());
        mem.write(MB_CMDR_SIZE, &(CMDR_SIZE as u32).to_le_bytes());
        mem
    }

    fn journal() -> VecMem {
        VecMem(RefCell::new(vec![0u8; JOURNAL_SIZE]))
    }

    /// Queue a CMD entry at ring offset `at` with `cdb` and iovecs; returns
    /// the entry length.
    fn queue_cmd(mem: &VecMem, at: usize, cdb: &[u8], iovs: &[(u64, u64)]) -> usize {
        queue_cmd_id(mem, at, 0, cdb, iovs)
    }

    fn queue_cmd_id(mem: &VecMem, at: usize, id: u16, cdb: &[u8], iovs: &[(u64, u64)]) -> usize {
        let cdb_at = REQ_IOV + iovs.len() * IOVEC_LEN;
        let len = (cdb_at + 16).max(RSP_END).next_multiple_of(8);
        let e = CMDR_OFF + at;
        mem.write(e, &(len as u32 | OP_CMD).to_le_bytes());
        mem.write(e + ENT_CMD_ID, &id.to_le_bytes());
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

    /// What the kernel reads between ring offsets `from` and `to`, as it
    /// does (PADs skipped): the cmd_id and status of each CMD entry.
    fn kernel_reads(mem: &VecMem, from: usize, to: usize) -> Vec<(u16, u8)> {
        let mut seen = Vec::new();
        let mut pos = from;
        while pos != to {
            let e = CMDR_OFF + pos;
            let len_op = u32_at(mem, e).unwrap();
            if len_op & OP_MASK == OP_CMD {
                let mut s = [0u8; 1];
                mem.read(e + RSP_STATUS, &mut s);
                seen.push((u16_at(mem, e + ENT_CMD_ID).unwrap(), s[0]));
            }
            pos = (pos + (len_op & !OP_MASK) as usize) % CMDR_SIZE;
        }
        seen
    }

    /// Queue READ(10)s of one block each, block `7 + i` into data block
    /// `i`, with cmd_ids `11 + i`, from ring offset `at`; their entries.
    fn queue_reads(mem: &VecMem, mut at: usize, n: usize) -> Vec<usize> {
        let mut entries = Vec::new();
        for i in 0..n {
            let read = [0x28, 0, 0, 0, 0, 7 + i as u8, 0, 0, 1, 0];
            entries.push(at);
            let iov = [(DATA as u64 + 512 * i as u64, 512)];
            at = (at + queue_cmd_id(mem, at, 11 + i as u16, &read, &iov)) % CMDR_SIZE;
        }
        mem.store_release(MB_CMD_HEAD, at as u32);
        entries
    }

    fn open<'a>(mem: &'a VecMem, j: &'a VecMem) -> Ring<'a, VecMem> {
        let mb = Mailbox::read(mem).unwrap();
        let note = |m: &str| assert!(m.starts_with("taken up"), "unexpected note: {m}");
        Ring::with_journal(mem, mb, j, 42, &note).unwrap()
    }

    fn ids(requests: &[Request]) -> Vec<u16> {
        let mut v: Vec<u16> = requests.iter().map(|r| r.cmd_id()).collect();
        v.sort();
        v
    }

    fn answer(ring: &Ring<'_, VecMem>, r: &Request, disk: &Disk) -> bool {
        let outcome = ring.execute(r, disk, &|_| {});
        ring.finish(r, &outcome).unwrap()
    }

    fn check_data(mem: &VecMem, backend: &MemBackend, n: usize) {
        let v = mem.0.borrow();
        let image = backend.bytes.lock().unwrap();
        for i in 0..n {
            let lba = 7 + i;
            assert_eq!(
                &v[DATA + 512 * i..DATA + 512 * (i + 1)],
                &image[512 * lba..512 * (lba + 1)],
                "data of read {i}"
            );
        }
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
    fn answers_are_written_as_commands_finish_and_survive_a_restart() {
        let mem = ring();
        let j = journal();
        let backend = Arc::new(MemBackend::new(1 << 20, false));
        let disk = Disk::new(info(), Some(backend.clone()));
        let entries = queue_reads(&mem, 0, 3);
        let end = mem.load_acquire(MB_CMD_HEAD).unwrap() as usize;
        let ring = open(&mem, &j);
        assert!(ring.out_of_order());
        let (requests, moved) = ring.take().unwrap();
        assert_eq!((ids(&requests), moved), (vec![11, 12, 13], false));
        // The last finishes first: answered at once, in the first entry.
        assert!(answer(&ring, &requests[2], &disk));
        assert_eq!(mem.load_acquire(MB_CMD_TAIL), Some(entries[1] as u32));
        assert_eq!(kernel_reads(&mem, 0, entries[1]), vec![(13, 0)]);
        // Then the second, in the second entry (its own).
        assert!(answer(&ring, &requests[1], &disk));
        assert_eq!(mem.load_acquire(MB_CMD_TAIL), Some(entries[2] as u32));
        assert_eq!(kernel_reads(&mem, 0, entries[2]), vec![(13, 0), (12, 0)]);
        assert_eq!(ring.outstanding(), 1);
        // A daemon started now owes the first only: from the journal, as
        // its entry was overwritten; the third's entry, still past the
        // tail, was answered.
        let again = open(&mem, &j);
        let (owed, _) = again.take().unwrap();
        assert_eq!(owed, vec![requests[0].clone()]);
        drop(again);
        // The first finishes: answered in the last entry.
        assert!(answer(&ring, &requests[0], &disk));
        assert_eq!(mem.load_acquire(MB_CMD_TAIL), Some(end as u32));
        assert_eq!(kernel_reads(&mem, 0, end), vec![(13, 0), (12, 0), (11, 0)]);
        assert_eq!(ring.outstanding(), 0);
        assert!(ring.settled());
        check_data(&mem, &backend, 3);
        let outcome = ring.execute(&requests[1], &disk, &|_| {});
        assert!(
            ring.finish(&requests[1], &outcome).is_err(),
            "answered twice"
        );
        // A daemon started now owes nothing.
        assert!(open(&mem, &j).take().unwrap().0.is_empty());
    }

    #[test]
    fn without_ooo_or_a_journal_answers_are_in_ring_order() {
        for flags in [0u16, FLAG_CAP_OOOC] {
            let mem = ring();
            mem.write(MB_FLAGS, &flags.to_le_bytes());
            let j = journal();
            let disk = Disk::new(info(), Some(Arc::new(MemBackend::new(1 << 20, false))));
            let entries = queue_reads(&mem, 0, 2);
            let mb = Mailbox::read(&mem).unwrap();
            let noted = RefCell::new(0);
            let ring = if flags == 0 {
                Ring::with_journal(&mem, mb, &j, 1, &|_| *noted.borrow_mut() += 1).unwrap()
            } else {
                Ring::new(&mem, mb).unwrap()
            };
            assert!(!ring.out_of_order());
            assert_eq!(*noted.borrow(), usize::from(flags == 0));
            let (requests, _) = ring.take().unwrap();
            let before = mem.0.borrow()[..DATA].to_vec();
            assert!(!answer(&ring, &requests[1], &disk));
            assert_eq!(&mem.0.borrow()[..DATA], &before[..], "nothing written");
            assert!(answer(&ring, &requests[0], &disk));
            let end = mem.load_acquire(MB_CMD_HEAD).unwrap() as usize;
            assert_eq!(mem.load_acquire(MB_CMD_TAIL), Some(end as u32));
            assert_eq!(kernel_reads(&mem, 0, end), vec![(11, 0), (12, 0)]);
            assert_eq!(entries.len(), 2);
        }
    }

    /// Four reads; the third finishes (answered in the first entry), then
    /// the fourth, stopped after `step` steps of its answer (in the second
    /// entry). What does a daemon started then owe?
    fn crash_in_second_answer(step: u8) -> (Vec<u16>, Vec<u16>) {
        let mem = ring();
        let j = journal();
        let backend = Arc::new(MemBackend::new(1 << 20, false));
        let disk = Disk::new(info(), Some(backend.clone()));
        let entries = queue_reads(&mem, 0, 4);
        let end = mem.load_acquire(MB_CMD_HEAD).unwrap() as usize;
        let pristine = mem.0.borrow()[CMDR_OFF + entries[1]..CMDR_OFF + entries[2]].to_vec();
        let ring = open(&mem, &j);
        let (requests, _) = ring.take().unwrap();
        assert!(answer(&ring, &requests[2], &disk));
        ring.crash_after.store(step, Ordering::Relaxed);
        let outcome = ring.execute(&requests[3], &disk, &|_| {});
        let crashed = ring.finish(&requests[3], &outcome);
        assert_eq!(crashed.is_err(), step <= 3, "{crashed:?}");
        drop(ring);
        // The next daemon.
        let ring = open(&mem, &j);
        let (owed, _) = ring.take().unwrap();
        let tail = mem.load_acquire(MB_CMD_TAIL).unwrap() as usize;
        if tail == entries[1] {
            // Not given: the second entry holds its request again.
            assert_eq!(
                &mem.0.borrow()[CMDR_OFF + entries[1]..CMDR_OFF + entries[2]],
                &pristine[..]
            );
        }
        for r in &owed {
            let at = (r.cmd_id() - 11) as usize;
            assert_eq!(r, &requests[at], "the request as queued");
            answer(&ring, r, &disk);
        }
        assert_eq!(ring.outstanding(), 0);
        assert!(ring.settled());
        assert_eq!(mem.load_acquire(MB_CMD_TAIL), Some(end as u32));
        // The kernel saw each command answered once.
        let mut seen: Vec<u16> = kernel_reads(&mem, 0, end).iter().map(|s| s.0).collect();
        seen.sort();
        check_data(&mem, &backend, 4);
        (ids(&owed), seen)
    }

    #[test]
    fn a_crash_at_any_step_of_an_answer_leaves_each_command_owed_once() {
        let all = vec![11, 12, 13, 14];
        // Stopped after the journal, after the entry: not given.
        for step in [1, 2] {
            assert_eq!(
                crash_in_second_answer(step),
                (vec![11, 12, 14], all.clone()),
                "step {step}"
            );
        }
        // After cmd_tail (the journal unmarked), or not at all: given.
        for step in [3, u8::MAX] {
            assert_eq!(
                crash_in_second_answer(step),
                (vec![11, 12], all.clone()),
                "step {step}"
            );
        }
    }

    /// Many daemons in a row on one ring, each finishing some of what it
    /// owes in a random order and most crashing at a random step of an
    /// answer: in the end the kernel has read every command's answer
    /// once, with its data.
    #[test]
    fn crashes_anywhere_in_random_orders_answer_each_command_once() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..300 {
            let mem = ring();
            let j = journal();
            let backend = Arc::new(MemBackend::new(1 << 20, false));
            let disk = Disk::new(info(), Some(backend.clone()));
            // Six reads, from a random place (a PAD where they wrap).
            let n = 6;
            let start = rand(CMDR_SIZE / 8) * 8;
            mem.store_release(MB_CMD_TAIL, start as u32);
            mem.store_release(MB_CMD_HEAD, start as u32);
            let mut at = start;
            for i in 0..n {
                if at + 112 > CMDR_SIZE {
                    let pad = CMDR_SIZE - at;
                    mem.write(CMDR_OFF + at, &(pad as u32 | OP_PAD).to_le_bytes());
                    at = 0;
                }
                let read = [0x28, 0, 0, 0, 0, 7 + i as u8, 0, 0, 1, 0];
                let iov = [(DATA as u64 + 512 * i as u64, 512)];
                at = (at + queue_cmd_id(&mem, at, 11 + i as u16, &read, &iov)) % CMDR_SIZE;
            }
            mem.store_release(MB_CMD_HEAD, at as u32);
            let end = at;
            let mut generations = 0;
            loop {
                generations += 1;
                let ring = open(&mem, &j);
                let (mut owed, _) = ring.take().unwrap();
                let last = generations > 8;
                // Finish some (all, the last time) in a random order; maybe
                // crash in one of the answers.
                let count = if last {
                    owed.len()
                } else {
                    rand(owed.len() + 1)
                };
                let crash = if last {
                    u8::MAX
                } else {
                    [1, 2, 3, u8::MAX][rand(4)]
                };
                let mut crashed = false;
                for k in 0..count {
                    let r = owed.remove(rand(owed.len()));
                    if k + 1 == count {
                        ring.crash_after.store(crash, Ordering::Relaxed);
                    }
                    let outcome = ring.execute(&r, &disk, &|_| {});
                    if ring.finish(&r, &outcome).is_err() {
                        crashed = true;
                        break;
                    }
                }
                if last {
                    assert_eq!(ring.outstanding(), 0);
                    assert!(ring.settled());
                    break;
                }
                let _ = crashed;
            }
            assert_eq!(mem.load_acquire(MB_CMD_TAIL), Some(end as u32));
            let mut seen: Vec<u16> = kernel_reads(&mem, start, end).iter().map(|s| s.0).collect();
            seen.sort();
            assert_eq!(
                seen,
                (11..11 + n as u16).collect::<Vec<_>>(),
                "start {start}"
            );
            check_data(&mem, &backend, n);
        }
    }

    #[test]
    fn a_torn_journal_half_falls_back_to_the_other() {
        let mem = ring();
        let j = journal();
        let disk = Disk::new(info(), Some(Arc::new(MemBackend::new(1 << 20, false))));
        queue_reads(&mem, 0, 3);
        let ring = open(&mem, &j);
        let (requests, _) = ring.take().unwrap();
        ring.crash_after.store(1, Ordering::Relaxed);
        let outcome = ring.execute(&requests[2], &disk, &|_| {});
        assert!(ring.finish(&requests[2], &outcome).is_err());
        drop(ring);
        // The half being written is torn: the earlier one holds.
        j.0.borrow_mut()[HALF + H_BODY + 3] ^= 0x40;
        let ring = Ring::with_journal(&mem, Mailbox::read(&mem).unwrap(), &j, 42, &|_| {}).unwrap();
        let (owed, _) = ring.take().unwrap();
        assert_eq!(ids(&owed), vec![11, 12, 13]);
    }

    #[test]
    fn answers_skip_pad_entries_and_wrap() {
        let mem = ring();
        let j = journal();
        let backend = Arc::new(MemBackend::new(1 << 20, false));
        let disk = Disk::new(info(), Some(backend.clone()));
        // Two reads at the end of the ring, a PAD, then two at its start.
        let start = CMDR_SIZE - 2 * 112 - 48;
        mem.store_release(MB_CMD_TAIL, start as u32);
        let read = |i: u8| [0x28, 0, 0, 0, 0, 7 + i, 0, 0, 1, 0];
        let iov = |i: u64| [(DATA as u64 + 512 * i, 512)];
        let mut at = start;
        let mut entries = Vec::new();
        for i in 0..2u8 {
            entries.push(at);
            at += queue_cmd_id(&mem, at, 11 + i as u16, &read(i), &iov(i as u64));
        }
        mem.write(
            CMDR_OFF + at,
            &((CMDR_SIZE - at) as u32 | OP_PAD).to_le_bytes(),
        );
        at = 0;
        for i in 2..4u8 {
            entries.push(at);
            at += queue_cmd_id(&mem, at, 11 + i as u16, &read(i), &iov(i as u64));
        }
        mem.store_release(MB_CMD_HEAD, at as u32);
        let ring = open(&mem, &j);
        let (requests, _) = ring.take().unwrap();
        assert_eq!(ids(&requests), vec![11, 12, 13, 14]);
        // The last two finish: they go in the two entries before the PAD.
        assert!(answer(&ring, &requests[3], &disk));
        assert!(answer(&ring, &requests[2], &disk));
        // The tail moved past the PAD too.
        assert_eq!(mem.load_acquire(MB_CMD_TAIL), Some(entries[2] as u32));
        assert_eq!(kernel_reads(&mem, start, 0), vec![(14, 0), (13, 0)]);
        // A restart owes the first two, both from the journal.
        let again = open(&mem, &j);
        assert_eq!(ids(&again.take().unwrap().0), vec![11, 12]);
        drop(again);
        assert!(answer(&ring, &requests[0], &disk));
        assert!(answer(&ring, &requests[1], &disk));
        assert_eq!(mem.load_acquire(MB_CMD_TAIL), Some(at as u32));
        assert_eq!(
            kernel_reads(&mem, start, at),
            vec![(14, 0), (13, 0), (11, 0), (12, 0)]
        );
        check_data(&mem, &backend, 4);
        assert!(ring.settled());
    }

    #[test]
    fn a_foreign_torn_or_mismatched_journal_is_ignored() {
        let disk = Disk::new(info(), Some(Arc::new(MemBackend::new(1 << 20, false))));
        // A journal with records: two answered ahead, one still owed.
        let mem = ring();
        let j = journal();
        queue_reads(&mem, 0, 3);
        let first = open(&mem, &j);
        let (requests, _) = first.take().unwrap();
        answer(&first, &requests[2], &disk);
        drop(first);
        let mb = Mailbox::read(&mem).unwrap();
        let notes = RefCell::new(Vec::new());
        let note = |m: &str| notes.borrow_mut().push(m.to_string());
        // Another ring's: ignored, every entry past the tail is owed.
        let other = Ring::with_journal(&mem, mb, &j, 7, &note).unwrap();
        assert_eq!(ids(&other.take().unwrap().0), vec![12, 13]);
        assert_eq!(notes.borrow().len(), 1, "{notes:?}");
        assert!(notes.borrow()[0].contains("another ring"), "{notes:?}");
        drop(other);
        // ... and was started afresh for that ring.
        let j2 = journal();
        let mem2 = ring();
        queue_reads(&mem2, 0, 3);
        let r = open(&mem2, &j2);
        let (requests, _) = r.take().unwrap();
        answer(&r, &requests[2], &disk);
        drop(r);
        // Records that do not match the ring (a ring made anew under the
        // same name): ignored.
        let fresh = ring();
        queue_reads(&fresh, 0, 1);
        let mb = Mailbox::read(&fresh).unwrap();
        let r = Ring::with_journal(&fresh, mb, &j2, 42, &note).unwrap();
        assert_eq!(ids(&r.take().unwrap().0), vec![11]);
        assert_eq!(notes.borrow().len(), 2, "{notes:?}");
        drop(r);
        // Garbage: ignored.
        let junk = journal();
        for (i, b) in junk.0.borrow_mut().iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        junk.write(0, J_MAGIC);
        let r = Ring::with_journal(&mem2, mb, &junk, 42, &note).unwrap();
        assert_eq!(ids(&r.take().unwrap().0), vec![12, 13]);
        assert_eq!(notes.borrow().len(), 3, "{notes:?}");
        // A journal too small for the layout: in ring order.
        let tiny = VecMem(RefCell::new(vec![0u8; 64]));
        let r = Ring::with_journal(&mem2, mb, &tiny, 42, &note).unwrap();
        assert!(!r.out_of_order());
    }

    #[test]
    fn reads_go_straight_into_large_iovecs_and_bounce_for_small_ones() {
        let k64 = 64u64 << 10;
        let d = DATA as u64;
        // (iovecs, read sizes the backend sees)
        type Case<'a> = (&'a [(u64, u64)], &'a [usize]);
        let cases: [Case; 4] = [
            (&[(d, 2 * k64)], &[128 << 10]),
            (&[(d + 2 * k64, k64), (d, k64)], &[64 << 10, 64 << 10]),
            (&[(d, k64), (d + 2 * k64 + 512, 512)], &[(64 << 10) + 512]),
            // Not in the data area: never filled in place.
            (&[(CMDR_OFF as u64 + 512, 512)], &[512]),
        ];
        for (iovs, want) in cases {
            let mem = ring();
            let backend = Arc::new(MemBackend::new(1 << 20, false));
            let disk = Disk::new(info(), Some(backend.clone()));
            let blocks: u64 = iovs.iter().map(|i| i.1).sum::<u64>() / 512;
            let read = [0x28, 0, 0, 0, 0, 3, 0, (blocks >> 8) as u8, blocks as u8, 0];
            let len = queue_cmd(&mem, 0, &read, iovs);
            mem.store_release(MB_CMD_HEAD, len as u32);
            assert_eq!(run_all(&mem, &disk).unwrap(), 1);
            assert_eq!(mem.0.borrow()[CMDR_OFF + RSP_STATUS], 0);
            assert_eq!(&backend.reads.lock().unwrap()[..], want, "{iovs:?}");
            let v = mem.0.borrow();
            let image = backend.bytes.lock().unwrap();
            let mut at = 3 * 512;
            for &(base, n) in iovs {
                let (base, n) = (base as usize, n as usize);
                assert_eq!(&v[base..base + n], &image[at..at + n], "{iovs:?}");
                at += n;
            }
        }
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
        // Two commands owed under one cmd_id.
        let mem = ring();
        let a = queue_cmd(&mem, 0, &[0x00, 0, 0, 0, 0, 0], &[]);
        let b = queue_cmd(&mem, a, &[0x00, 0, 0, 0, 0, 0], &[]);
        mem.store_release(MB_CMD_HEAD, (a + b) as u32);
        let err = run_all(&mem, &disk).unwrap_err();
        assert!(err.contains("already owed"), "{err}");
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

    #[test]
    fn snapshots_round_trip() {
        let s = Snapshot {
            seq: 9,
            identity: 3,
            tail_before: 5,
            tail_after: 200,
            pending: Some((5, [7u8; RSP_END])),
            records: Records {
                ahead: vec![(4, 100)],
                displaced: vec![Request {
                    cmd_id: 2,
                    cdb: [0x28; 16],
                    cdb_len: 10,
                    iovs: vec![(4096, 512), (8192, 1024)],
                    total: 1536,
                }],
            },
            committed: false,
        };
        let j = journal();
        assert!(s.store(&j, 1));
        let back = Snapshot::load(&j, 1).unwrap();
        assert_eq!(
            (back.seq, back.records.clone(), back.committed),
            (9, s.records.clone(), false)
        );
        assert_eq!(back.pending, s.pending);
        assert!(Snapshot::mark(&j, 1, 9));
        assert!(Snapshot::load(&j, 1).unwrap().committed);
        assert!(matches!(Snapshot::load(&j, 0), Err(false)));
        j.0.borrow_mut()[HALF + H_BODY] ^= 1;
        assert!(matches!(Snapshot::load(&j, 1), Err(true)));
    }
}
