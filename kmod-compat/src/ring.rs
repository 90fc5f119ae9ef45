//! The target_core_user ring, from `<linux/target_core_user.h>`.
//!
//! The uio mapping starts with the mailbox (`struct tcmu_mailbox`), then
//! the command ring at `cmdr_off`, `cmdr_size` bytes long, then the data
//! area. The kernel queues `struct tcmu_cmd_entry`s at `cmd_head`; we
//! complete them in order from `cmd_tail`, writing the status and sense
//! over the entry's request half and moving `cmd_tail` past it. Every
//! offset and length read from the ring is checked against the mapping
//! before use, so a confused kernel or a stale mapping gives an error, not
//! a wild access.

use crate::exec::{DataBuf, Disk};
use crate::scsi;

/// `struct tcmu_mailbox` field offsets (packed; `cmd_tail` is 64-aligned).
const MB_VERSION: usize = 0;
const MB_CMDR_OFF: usize = 4;
const MB_CMDR_SIZE: usize = 8;
const MB_CMD_HEAD: usize = 12;
pub const MB_CMD_TAIL: usize = 64;

/// `enum tcmu_opcode`.
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

fn u32_at(mem: &dyn SharedMem, offset: usize) -> Option<u32> {
    let mut b = [0u8; 4];
    mem.read(offset, &mut b).then(|| u32::from_le_bytes(b))
}

fn u64_at(mem: &dyn SharedMem, offset: usize) -> Option<u64> {
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
struct IovBuf<'a> {
    mem: &'a dyn SharedMem,
    iovs: Vec<(usize, usize)>,
    total: usize,
}

impl IovBuf<'_> {
    /// Visit the (mapping offset, buffer range) pieces covering
    /// `[offset, offset + len)` of the data.
    fn walk(&self, offset: usize, len: usize, mut f: impl FnMut(usize, std::ops::Range<usize>)) {
        let mut pos = 0usize;
        let end = offset + len;
        for &(base, n) in &self.iovs {
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

impl DataBuf for IovBuf<'_> {
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

/// Complete every command between `cmd_tail` and `cmd_head`. Returns how
/// many entries were consumed (the caller then kicks the kernel), or an
/// error when the ring makes no sense.
pub fn process(
    mem: &dyn SharedMem,
    mb: &Mailbox,
    disk: &mut Disk,
    log: &dyn Fn(&str),
) -> Result<usize, String> {
    let head = mem.load_acquire(MB_CMD_HEAD).ok_or("cmd_head unreadable")? as usize;
    let mut tail = mem.load_acquire(MB_CMD_TAIL).ok_or("cmd_tail unreadable")? as usize;
    if head >= mb.cmdr_size || tail >= mb.cmdr_size {
        return Err(format!(
            "ring head {head} or tail {tail} is outside the {}-byte ring",
            mb.cmdr_size
        ));
    }
    let mut done = 0usize;
    while tail != head {
        let entry = mb.cmdr_off + tail;
        let len_op = u32_at(mem, entry).ok_or("entry header unreadable")?;
        let len = (len_op & !OP_MASK) as usize;
        if len < ENT_HDR_LEN || len > mb.cmdr_size - tail {
            return Err(format!("ring entry at {tail} has length {len}"));
        }
        if len_op & OP_MASK == OP_CMD {
            complete_cmd(mem, entry, len, disk, log)?;
        } else if len_op & OP_MASK != OP_PAD {
            // TMR notifications and future opcodes: nothing to do; an
            // aborted command is still completed in order when reached.
        }
        tail = (tail + len) % mb.cmdr_size;
        if !mem.store_release(MB_CMD_TAIL, tail as u32) {
            return Err("cmd_tail unwritable".into());
        }
        done += 1;
    }
    Ok(done)
}

/// Run one CMD entry and write its response in place.
fn complete_cmd(
    mem: &dyn SharedMem,
    entry: usize,
    len: usize,
    disk: &mut Disk,
    log: &dyn Fn(&str),
) -> Result<(), String> {
    let bad = |what: &str| format!("ring entry at {entry}: {what}");
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
    let mut data = IovBuf { mem, iovs, total };
    let outcome = disk.execute(&cdb[..cdb_len], &mut data);
    if disk.trace {
        log(&format!(
            "cdb {:02x?} iovecs {} bytes -> status {:#x} sense {:?}",
            &cdb[..cdb_len],
            data.total,
            outcome.status,
            outcome.sense
        ));
    }
    if let Some(e) = &outcome.error {
        log(&format!("SCSI command {:#04x} failed: {e}", cdb[0]));
    }
    // The response overlays the request: write it only now.
    let mut rsp = [0u8; 8 + SENSE_BUFFER];
    rsp[0] = outcome.status;
    if let Some(sense) = outcome.sense {
        rsp[8..8 + scsi::SENSE_LEN].copy_from_slice(&sense.fixed());
    }
    if RSP_SENSE + SENSE_BUFFER > len || !mem.write(entry + RSP_STATUS, &rsp) {
        return Err(bad("no room for the response"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::tests::{info, MemBackend};
    use std::cell::RefCell;
    use std::sync::Arc;

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

    #[test]
    fn completes_commands_across_a_pad_and_scattered_iovecs() {
        let mem = ring();
        let backend = Arc::new(MemBackend::new(1 << 20, false));
        let mut disk = Disk::new(info(), Some(backend.clone()));
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
        let mb = Mailbox::read(&mem).unwrap();
        let n = process(&mem, &mb, &mut disk, &|_| {}).unwrap();
        assert_eq!(n, 2);
        assert_eq!(mem.load_acquire(MB_CMD_TAIL), Some(len as u32));
        let v = mem.0.borrow();
        assert_eq!(v[CMDR_OFF + RSP_STATUS], 0);
        let image = backend.bytes.lock().unwrap();
        assert_eq!(&v[DATA + 4096..DATA + 4608], &image[512..1024]);
        assert_eq!(&v[DATA..DATA + 512], &image[1024..1536]);
    }

    #[test]
    fn unknown_commands_get_sense() {
        let mem = ring();
        let mut disk = Disk::new(info(), Some(Arc::new(MemBackend::new(1 << 20, false))));
        let len = queue_cmd(
            &mem,
            0,
            &[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[(DATA as u64, 64)],
        );
        mem.store_release(MB_CMD_HEAD, len as u32);
        let mb = Mailbox::read(&mem).unwrap();
        assert_eq!(process(&mem, &mb, &mut disk, &|_| {}).unwrap(), 1);
        let v = mem.0.borrow();
        assert_eq!(v[CMDR_OFF + RSP_STATUS], scsi::CHECK_CONDITION);
        let sense = &v[CMDR_OFF + RSP_SENSE..CMDR_OFF + RSP_SENSE + 18];
        assert_eq!((sense[0], sense[2], sense[12]), (0x70, 0x05, 0x20));
    }

    #[test]
    fn bad_rings_are_errors_not_wild_accesses() {
        let mem = ring();
        let mut disk = Disk::new(info(), None);
        let mb = Mailbox::read(&mem).unwrap();
        // An iovec pointing past the mapping.
        let len = queue_cmd(
            &mem,
            0,
            &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            &[(1 << 40, 512)],
        );
        mem.store_release(MB_CMD_HEAD, len as u32);
        assert!(process(&mem, &mb, &mut disk, &|_| {}).is_err());
        // A zero-length entry.
        mem.write(CMDR_OFF, &(OP_CMD).to_le_bytes());
        assert!(process(&mem, &mb, &mut disk, &|_| {}).is_err());
        // A head outside the ring.
        mem.store_release(MB_CMD_HEAD, CMDR_SIZE as u32 + 8);
        assert!(process(&mem, &mb, &mut disk, &|_| {}).is_err());
        // Mailboxes that do not fit.
        let small = VecMem(RefCell::new(vec![0u8; 1]));
        assert!(Mailbox::read(&small).is_err());
        mem.write(MB_CMDR_SIZE, &(1u32 << 30).to_le_bytes());
        assert!(Mailbox::read(&mem).is_err());
        mem.write(0, &1u16.to_le_bytes());
        assert!(Mailbox::read(&mem).is_err());
    }
}
