//! The TCMU backstore: SCSI commands from initiators and the command ring
//! the kernel fills.
//!
//! Each input is used twice:
//! - as a CDB (its first 16 bytes) with the rest as the data buffer, run
//!   against a 256 KiB in-memory disk (writable or not, by the input). Every
//!   outcome must be GOOD, or CHECK CONDITION with sense data, with no more
//!   data-in than the buffer holds; the disk must never be asked for bytes
//!   outside it (it panics if it is).
//! - as the whole uio mapping, with a valid mailbox header written over its
//!   start (in `ring::VecMem`, which refuses accesses outside it): `Ring::new`,
//!   `take`, then every request run and answered. A ring that makes no sense
//!   must be an error, never a panic or a hang, and every request taken must
//!   be answered.
#![no_main]

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use kmod_compat::exec::{Backend, DataBuf, Disk};
use kmod_compat::ring::{Mailbox, Ring, VecMem};
use kmod_compat::scsi::{DiskInfo, CHECK_CONDITION, GOOD};
use libfuzzer_sys::fuzz_target;

const DISK_BYTES: usize = 256 << 10;

/// A disk in memory that treats any access outside it as a bug.
struct MemDisk {
    bytes: Mutex<Vec<u8>>,
    writable: bool,
}

impl MemDisk {
    fn range(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        let start = usize::try_from(offset).expect("offset fits");
        let end = start.checked_add(len).expect("range end overflows");
        assert!(end <= DISK_BYTES, "disk asked for {start}..{end}");
        start..end
    }
}

impl Backend for MemDisk {
    fn size(&self) -> u64 {
        DISK_BYTES as u64
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        let r = self.range(offset, buf.len());
        buf.copy_from_slice(&self.bytes.lock().unwrap()[r]);
        Ok(())
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), String> {
        assert!(self.writable, "write to a read-only disk");
        let r = self.range(offset, buf.len());
        self.bytes.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn discard(&self, offset: u64, length: u64) -> Result<(), String> {
        assert!(self.writable, "discard on a read-only disk");
        let len = usize::try_from(length).expect("length fits");
        let r = self.range(offset, len);
        self.bytes.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn flush(&self) -> Result<(), String> {
        Ok(())
    }
}

fn disk(writable: bool) -> Disk {
    let backend = MemDisk {
        bytes: Mutex::new(vec![0x5a; DISK_BYTES]),
        writable,
    };
    let info = DiskInfo {
        block_size: 512,
        blocks: 0,
        writable: false,
        serial: "fuzz".into(),
        id: [7; 12],
        max_transfer_blocks: 2048,
        max_unmap_blocks: 1 << 22,
        max_unmap_descriptors: 64,
    };
    Disk::new(info, Some(Arc::new(backend)))
}

fn scsi(data: &[u8], writable: bool) {
    let (cdb, rest) = data.split_at(data.len().min(16));
    let mut buf = rest[..rest.len().min(64 << 10)].to_vec();
    let len = buf.len();
    let outcome = disk(writable).execute(cdb, &mut buf as &mut dyn DataBuf);
    assert!(
        outcome.data_in <= len,
        "{} bytes of data-in for a {len}-byte buffer",
        outcome.data_in
    );
    match outcome.status {
        GOOD => assert!(outcome.sense.is_none()),
        CHECK_CONDITION => assert!(outcome.sense.is_some(), "CHECK CONDITION without sense"),
        other => panic!("status {other:#x}"),
    }
}

/// Mailbox fields (`struct tcmu_mailbox`).
const CMDR_OFF: usize = 128;

fn ring(data: &[u8], writable: bool) {
    let mut mem = data[..data.len().min(64 << 10)].to_vec();
    if mem.len() < CMDR_OFF + 64 {
        mem.resize(CMDR_OFF + 64, 0);
    }
    // A ring of the input's choosing in size (at least one header), after
    // a valid version 2 mailbox; head and tail stay as the input has them.
    let room = mem.len() - CMDR_OFF;
    let size = (u16::from_le_bytes([mem[2], mem[3]]) as usize).clamp(8, room);
    mem[0..2].copy_from_slice(&2u16.to_le_bytes());
    mem[4..8].copy_from_slice(&(CMDR_OFF as u32).to_le_bytes());
    mem[8..12].copy_from_slice(&(size as u32).to_le_bytes());
    let mapping = VecMem(RefCell::new(mem));
    let mailbox = Mailbox::read(&mapping).expect("a valid mailbox reads");
    let Ok(ring) = Ring::new(&mapping, mailbox) else {
        return;
    };
    let disk = disk(writable);
    let Ok((requests, _)) = ring.take() else {
        return;
    };
    for request in &requests {
        let outcome = ring.execute(request, &disk, &|_| {});
        if ring.finish(request, &outcome).is_err() {
            return;
        }
    }
    assert_eq!(ring.outstanding(), 0, "every request taken was answered");
}

fuzz_target!(|data: &[u8]| {
    let writable = data.last().is_some_and(|b| b & 1 == 1);
    scsi(data, writable);
    ring(data, writable);
});
