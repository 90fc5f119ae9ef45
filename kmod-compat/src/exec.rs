//! Running one SCSI command against an image.
//!
//! The image is a [`Backend`] (the engine's `Stack` in service, a buffer
//! in tests) and the command's data buffer a [`DataBuf`] (the scattered
//! TCMU data area in service), so the whole path from CDB to status and
//! sense is testable without a kernel.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use overlaybd::stack::Stack;

use crate::metrics::DiskStats;
use crate::scsi::{self, Command, DiskInfo, Sense, GOOD};

/// Largest bounce buffer used for one step of a READ or WRITE.
const CHUNK: usize = 1 << 20;

/// The image a disk serves.
pub trait Backend: Send + Sync {
    fn size(&self) -> u64;
    fn writable(&self) -> bool;
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), String>;
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), String>;
    fn discard(&self, offset: u64, length: u64) -> Result<(), String>;
    fn flush(&self) -> Result<(), String>;
    /// Grow to `new_size` bytes while served.
    fn grow(&self, new_size: u64) -> Result<(), String> {
        Err(format!("this image cannot grow to {new_size} bytes"))
    }
}

impl Backend for Stack {
    fn size(&self) -> u64 {
        self.virtual_size()
    }
    fn writable(&self) -> bool {
        self.top().is_some()
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        Stack::read(self, buf, offset).map_err(|e| e.to_string())
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), String> {
        Stack::write(self, buf, offset).map_err(|e| e.to_string())
    }
    fn discard(&self, offset: u64, length: u64) -> Result<(), String> {
        Stack::discard(self, offset, length).map_err(|e| e.to_string())
    }
    fn flush(&self) -> Result<(), String> {
        Stack::flush(self).map_err(|e| e.to_string())
    }
    fn grow(&self, new_size: u64) -> Result<(), String> {
        Stack::grow(self, new_size).map_err(|e| e.to_string())
    }
}

/// Fills a piece of a command's buffer at an offset in its data (see
/// [`DataBuf::fill_in`]).
pub type FillFn<'a> = dyn FnMut(usize, &mut [u8]) -> Result<(), String> + 'a;

/// A command's data buffer, as the initiator sees it: data-out is read
/// from it, data-in written to it.
pub trait DataBuf {
    /// Total bytes.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copy `out.len()` bytes from `offset` (data-out, e.g. WRITE).
    fn copy_out(&self, offset: usize, out: &mut [u8]);
    /// Copy `data` to `offset` (data-in, e.g. READ).
    fn copy_in(&mut self, offset: usize, data: &[u8]);
    /// Data-in without a bounce buffer: call `fill` with the buffer's own
    /// memory for `[0, len)`, piece after piece (each with its offset in
    /// the data), when it is one piece or a few large ones. `None` (the
    /// default) when it is not: the caller copies with `copy_in`.
    fn fill_in(&mut self, len: usize, fill: &mut FillFn<'_>) -> Option<Result<(), String>> {
        let _ = (len, fill);
        None
    }
}

impl DataBuf for Vec<u8> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn copy_out(&self, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self[offset..offset + out.len()]);
    }
    fn copy_in(&mut self, offset: usize, data: &[u8]) {
        self[offset..offset + data.len()].copy_from_slice(data);
    }
    fn fill_in(&mut self, len: usize, fill: &mut FillFn<'_>) -> Option<Result<(), String>> {
        Some(fill(0, &mut self[..len]))
    }
}

/// How a command ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    pub sense: Option<Sense>,
    /// Bytes of data-in transferred.
    pub data_in: usize,
    /// An engine error worth logging.
    pub error: Option<String>,
}

impl Outcome {
    fn good(data_in: usize) -> Outcome {
        Outcome {
            status: GOOD,
            sense: None,
            data_in,
            error: None,
        }
    }
    fn check(sense: Sense) -> Outcome {
        Outcome {
            status: scsi::CHECK_CONDITION,
            sense: Some(sense),
            data_in: 0,
            error: None,
        }
    }
    fn failed(sense: Sense, error: String) -> Outcome {
        Outcome {
            error: Some(error),
            ..Outcome::check(sense)
        }
    }
}

/// One disk: what it reports about itself and the image behind it. With
/// no backend (the image failed to open) the disk still answers INQUIRY,
/// so the kernel can attach and detach it, and fails everything else
/// with NOT READY instead of leaving commands hanging.
pub struct Disk {
    /// As the disk started; `blocks` is the size now.
    pub info: DiskInfo,
    /// Logical blocks now (the image can grow, see [`Disk::grow`]).
    blocks: AtomicU64,
    /// The size changed and the initiator has not been told yet: the next
    /// command gets a unit attention (CAPACITY DATA HAS CHANGED).
    capacity_changed: AtomicBool,
    backend: Option<Arc<dyn Backend>>,
    /// Log every command (OBD_TCMU_TRACE=1).
    pub trace: bool,
    /// What the disk has done (the exporter's counters).
    pub stats: Arc<DiskStats>,
}

impl Disk {
    pub fn new(mut info: DiskInfo, backend: Option<Arc<dyn Backend>>) -> Disk {
        match &backend {
            Some(b) => {
                info.blocks = b.size() / info.block_size as u64;
                info.writable = b.writable();
            }
            None => {
                info.blocks = 0;
                info.writable = false;
            }
        }
        Disk {
            blocks: AtomicU64::new(info.blocks),
            capacity_changed: AtomicBool::new(false),
            info,
            backend,
            trace: false,
            stats: Arc::default(),
        }
    }

    /// Logical blocks now.
    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }

    /// Grow the image to `new_size` bytes while it is served, and tell
    /// the initiator with its next command. `Err` carries the status for
    /// the kernel (a negative errno) and the reason: EINVAL for a size
    /// that is not whole blocks or is smaller, EOPNOTSUPP for an image
    /// that cannot grow (no writable layer, or not open), EIO when
    /// growing failed.
    pub fn grow(&self, new_size: u64) -> Result<(), (i32, String)> {
        let bs = u64::from(self.info.block_size);
        let blocks = self.blocks();
        if !new_size.is_multiple_of(bs) {
            return Err((
                -libc::EINVAL,
                format!("{new_size} bytes is not a whole number of {bs}-byte blocks"),
            ));
        }
        if new_size / bs < blocks {
            return Err((
                -libc::EINVAL,
                format!(
                    "the disk cannot shrink from {} bytes (data would be lost)",
                    blocks * bs
                ),
            ));
        }
        if new_size / bs == blocks {
            return Ok(());
        }
        let Some(backend) = self.backend.as_ref().filter(|b| b.writable()) else {
            return Err((
                -libc::EOPNOTSUPP,
                "a read-only image cannot grow (it has no writable upper)".into(),
            ));
        };
        backend.grow(new_size).map_err(|e| (-libc::EIO, e))?;
        self.blocks.store(new_size / bs, Ordering::Release);
        self.capacity_changed.store(true, Ordering::Release);
        Ok(())
    }

    /// Run the command in `cdb` with its data buffer. Any number of
    /// threads may run commands on one disk at once.
    pub fn execute(&self, cdb: &[u8], data: &mut dyn DataBuf) -> Outcome {
        let started = std::time::Instant::now();
        let outcome = self.run(cdb, data);
        self.stats.record(
            scsi::parse(cdb).ok(),
            outcome.status,
            self.info.block_size as u64,
            started.elapsed(),
        );
        outcome
    }

    fn run(&self, cdb: &[u8], data: &mut dyn DataBuf) -> Outcome {
        let command = match scsi::parse(cdb) {
            Ok(c) => c,
            Err(sense) => return Outcome::check(sense),
        };
        match command {
            Command::Inquiry { evpd, page, alloc } => {
                let reply = if evpd {
                    match scsi::inquiry_vpd(page, &self.info) {
                        Some(r) => r,
                        None => return Outcome::check(Sense::INVALID_FIELD_IN_CDB),
                    }
                } else {
                    scsi::inquiry_standard()
                };
                return respond(data, &reply, alloc);
            }
            Command::ReportLuns { alloc } => return respond(data, &scsi::report_luns(), alloc),
            Command::RequestSense { alloc } => {
                return respond(data, &scsi::request_sense_none(), alloc)
            }
            _ => {}
        }
        let Some(backend) = self.backend.clone() else {
            return Outcome::check(Sense::NOT_READY_MANUAL);
        };
        if self.capacity_changed.load(Ordering::Relaxed)
            && self.capacity_changed.swap(false, Ordering::AcqRel)
        {
            return Outcome::check(Sense::CAPACITY_DATA_HAS_CHANGED);
        }
        let bs = self.info.block_size as u64;
        let disk_blocks = self.blocks();
        let info_now = || DiskInfo {
            blocks: disk_blocks,
            ..self.info.clone()
        };
        match command {
            Command::TestUnitReady | Command::StartStop => Outcome::good(0),
            Command::ReadCapacity10 => respond(data, &scsi::read_capacity10(&info_now()), 8),
            Command::ReadCapacity16 { alloc } => {
                respond(data, &scsi::read_capacity16(&info_now()), alloc)
            }
            Command::ModeSense {
                ten,
                pc,
                page,
                subpage,
                alloc,
                ..
            } => match scsi::mode_sense(ten, pc, page, subpage, &info_now()) {
                Ok(reply) => respond(data, &reply, alloc),
                Err(sense) => Outcome::check(sense),
            },
            Command::Read { lba, blocks } => {
                if let Err(s) = scsi::check_range(lba, blocks as u64, disk_blocks) {
                    return Outcome::check(s);
                }
                let total = (blocks as u64 * bs).min(data.len() as u64) as usize;
                // Straight into the command's buffer when it allows.
                let direct = data.fill_in(total, &mut |at, buf| {
                    backend.read(buf, lba * bs + at as u64)
                });
                match direct {
                    Some(Ok(())) => return Outcome::good(total),
                    Some(Err(e)) => return Outcome::failed(Sense::UNRECOVERED_READ_ERROR, e),
                    None => {}
                }
                with_scratch(|scratch| {
                    let mut done = 0usize;
                    while done < total {
                        let n = (total - done).min(CHUNK);
                        let buf = sized(scratch, n);
                        if let Err(e) = backend.read(buf, lba * bs + done as u64) {
                            return Outcome::failed(Sense::UNRECOVERED_READ_ERROR, e);
                        }
                        data.copy_in(done, buf);
                        done += n;
                    }
                    Outcome::good(total)
                })
            }
            Command::Write { lba, blocks, fua } => {
                if !self.info.writable {
                    return Outcome::check(Sense::WRITE_PROTECTED);
                }
                if let Err(s) = scsi::check_range(lba, blocks as u64, disk_blocks) {
                    return Outcome::check(s);
                }
                let total = blocks as u64 * bs;
                if total > data.len() as u64 {
                    return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
                }
                let total = total as usize;
                with_scratch(|scratch| {
                    let mut done = 0usize;
                    while done < total {
                        let n = (total - done).min(CHUNK);
                        let buf = sized(scratch, n);
                        data.copy_out(done, buf);
                        if let Err(e) = backend.write(buf, lba * bs + done as u64) {
                            return Outcome::failed(Sense::WRITE_ERROR, e);
                        }
                        done += n;
                    }
                    // FUA: the write is acknowledged only once it is
                    // durable, like a write followed by SYNCHRONIZE CACHE.
                    if fua {
                        if let Err(e) = backend.flush() {
                            return Outcome::failed(Sense::WRITE_ERROR, e);
                        }
                    }
                    Outcome::good(0)
                })
            }
            Command::SyncCache => match backend.flush() {
                Ok(()) => Outcome::good(0),
                Err(e) => Outcome::failed(Sense::WRITE_ERROR, e),
            },
            Command::Unmap { param_len } => {
                if !self.info.writable {
                    return Outcome::check(Sense::WRITE_PROTECTED);
                }
                let len = (param_len as usize).min(data.len());
                let mut list = vec![0u8; len];
                data.copy_out(0, &mut list);
                let ranges = match scsi::parse_unmap(&list, self.info.max_unmap_descriptors) {
                    Ok(r) => r,
                    Err(s) => return Outcome::check(s),
                };
                for r in &ranges {
                    if let Err(s) = scsi::check_range(r.lba, r.blocks as u64, disk_blocks) {
                        return Outcome::check(s);
                    }
                }
                for r in ranges.iter().filter(|r| r.blocks > 0) {
                    if let Err(e) = backend.discard(r.lba * bs, r.blocks as u64 * bs) {
                        return Outcome::failed(Sense::WRITE_ERROR, e);
                    }
                }
                Outcome::good(0)
            }
            Command::WriteSame { lba, blocks, unmap } => {
                if !self.info.writable {
                    return Outcome::check(Sense::WRITE_PROTECTED);
                }
                let blocks = if blocks == 0 {
                    disk_blocks.saturating_sub(lba)
                } else {
                    blocks as u64
                };
                if let Err(s) = scsi::check_range(lba, blocks, disk_blocks) {
                    return Outcome::check(s);
                }
                if data.len() < bs as usize {
                    return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
                }
                let mut pattern = vec![0u8; bs as usize];
                data.copy_out(0, &mut pattern);
                let result = if unmap || pattern.iter().all(|&b| b == 0) {
                    // Discarded ranges read back as zeros (LBPRZ).
                    backend.discard(lba * bs, blocks * bs)
                } else {
                    write_same(&*backend, &pattern, lba * bs, blocks * bs)
                };
                match result {
                    Ok(()) => Outcome::good(0),
                    Err(e) => Outcome::failed(Sense::WRITE_ERROR, e),
                }
            }
            Command::Inquiry { .. } | Command::ReportLuns { .. } | Command::RequestSense { .. } => {
                Outcome::check(Sense::INVALID_OPCODE)
            }
        }
    }
}

thread_local! {
    /// Each worker's bounce buffer for READ and WRITE, kept between
    /// commands (up to CHUNK bytes).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// The first `n` bytes of `buf`, grown with zeros if needed.
fn sized(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

/// Write `pattern` (one block) over `length` bytes from `offset`.
fn write_same(
    backend: &dyn Backend,
    pattern: &[u8],
    offset: u64,
    length: u64,
) -> Result<(), String> {
    let per = (CHUNK / pattern.len()).max(1);
    let chunk: Vec<u8> = pattern
        .iter()
        .copied()
        .cycle()
        .take(per * pattern.len())
        .collect();
    let mut done = 0u64;
    while done < length {
        let n = (length - done).min(chunk.len() as u64) as usize;
        backend.write(&chunk[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Copy a reply into the data buffer, cut to the allocation length and the
/// buffer's size.
fn respond(data: &mut dyn DataBuf, reply: &[u8], alloc: u32) -> Outcome {
    let n = reply.len().min(alloc as usize).min(data.len());
    data.copy_in(0, &reply[..n]);
    Outcome::good(n)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An in-memory disk; `fail_reads` makes every read an error.
    pub struct MemBackend {
        pub bytes: Mutex<Vec<u8>>,
        pub writable: bool,
        pub fail_reads: bool,
        pub flushes: Mutex<u32>,
        /// The length of every read asked for.
        pub reads: Mutex<Vec<usize>>,
    }

    impl MemBackend {
        pub fn new(size: usize, writable: bool) -> MemBackend {
            let bytes = (0..size).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
            MemBackend {
                bytes: Mutex::new(bytes),
                writable,
                fail_reads: false,
                flushes: Mutex::new(0),
                reads: Mutex::new(Vec::new()),
            }
        }
    }

    impl Backend for MemBackend {
        fn size(&self) -> u64 {
            self.bytes.lock().unwrap().len() as u64
        }
        fn writable(&self) -> bool {
            self.writable
        }
        fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
            self.reads.lock().unwrap().push(buf.len());
            if self.fail_reads {
                return Err("layer.lsmt: bad CRC".into());
            }
            let o = offset as usize;
            buf.copy_from_slice(&self.bytes.lock().unwrap()[o..o + buf.len()]);
            Ok(())
        }
        fn write(&self, buf: &[u8], offset: u64) -> Result<(), String> {
            let o = offset as usize;
            self.bytes.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn discard(&self, offset: u64, length: u64) -> Result<(), String> {
            let o = offset as usize;
            self.bytes.lock().unwrap()[o..o + length as usize].fill(0);
            Ok(())
        }
        fn flush(&self) -> Result<(), String> {
            *self.flushes.lock().unwrap() += 1;
            Ok(())
        }
    }

    pub fn info() -> DiskInfo {
        DiskInfo {
            block_size: 512,
            blocks: 0,
            writable: false,
            serial: "test".into(),
            id: [1; 12],
            max_transfer_blocks: 2048,
            max_unmap_blocks: 1 << 22,
            max_unmap_descriptors: 64,
        }
    }

    fn disk(backend: Arc<MemBackend>) -> Disk {
        Disk::new(info(), Some(backend))
    }

    fn read10(lba: u32, blocks: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = 0x28;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    #[test]
    fn read_returns_the_image_bytes() {
        let mem = Arc::new(MemBackend::new(1 << 20, false));
        let d = disk(mem.clone());
        let mut buf = vec![0u8; 4096];
        let out = d.execute(&read10(3, 8), &mut buf);
        assert_eq!(out, Outcome::good(4096));
        assert_eq!(
            &buf[..],
            &mem.bytes.lock().unwrap()[3 * 512..3 * 512 + 4096]
        );
        let out = d.execute(&read10(2047, 2), &mut buf);
        assert_eq!(out.sense, Some(Sense::LBA_OUT_OF_RANGE));
    }

    #[test]
    fn read_errors_are_medium_errors() {
        let mut mem = MemBackend::new(1 << 20, false);
        mem.fail_reads = true;
        let d = disk(Arc::new(mem));
        let mut buf = vec![0u8; 512];
        let out = d.execute(&read10(0, 1), &mut buf);
        assert_eq!(out.status, scsi::CHECK_CONDITION);
        assert_eq!(out.sense, Some(Sense::UNRECOVERED_READ_ERROR));
        assert!(out.error.unwrap().contains("bad CRC"));
    }

    #[test]
    fn writes_need_a_writable_layer() {
        let d = disk(Arc::new(MemBackend::new(1 << 20, false)));
        let mut c = read10(0, 1);
        c[0] = 0x2a;
        let mut buf = vec![9u8; 512];
        assert_eq!(d.execute(&c, &mut buf).sense, Some(Sense::WRITE_PROTECTED));

        let mem = Arc::new(MemBackend::new(1 << 20, true));
        let d = disk(mem.clone());
        assert_eq!(d.execute(&c, &mut buf), Outcome::good(0));
        assert_eq!(&mem.bytes.lock().unwrap()[..512], &[9u8; 512][..]);
        assert_eq!(
            d.execute(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &mut Vec::new()),
            Outcome::good(0)
        );
        assert_eq!(*mem.flushes.lock().unwrap(), 1);
    }

    #[test]
    fn a_fua_write_is_flushed_before_it_completes() {
        let mem = Arc::new(MemBackend::new(1 << 20, true));
        let d = disk(mem.clone());
        let mut buf = vec![7u8; 512];
        let mut c = read10(3, 1);
        c[0] = 0x2a;
        assert_eq!(d.execute(&c, &mut buf), Outcome::good(0));
        assert_eq!(*mem.flushes.lock().unwrap(), 0, "a plain write is cached");
        c[1] = 0x08; // FUA
        assert_eq!(d.execute(&c, &mut buf), Outcome::good(0));
        assert_eq!(*mem.flushes.lock().unwrap(), 1, "a FUA write is flushed");
        assert_eq!(
            &mem.bytes.lock().unwrap()[3 * 512..4 * 512],
            &[7u8; 512][..]
        );
    }

    #[test]
    fn unmap_and_write_same_zero() {
        let mem = Arc::new(MemBackend::new(1 << 20, true));
        let d = disk(mem.clone());
        let mut list = vec![0u8; 8];
        list[2..4].copy_from_slice(&16u16.to_be_bytes());
        list.extend_from_slice(&4u64.to_be_bytes());
        list.extend_from_slice(&2u32.to_be_bytes());
        list.extend_from_slice(&[0; 4]);
        let out = d.execute(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &mut list);
        assert_eq!(out, Outcome::good(0));
        assert!(mem.bytes.lock().unwrap()[4 * 512..6 * 512]
            .iter()
            .all(|&b| b == 0));
        assert_ne!(mem.bytes.lock().unwrap()[6 * 512 + 1], 0);

        let mut pattern = vec![0xabu8; 512];
        let out = d.execute(&[0x41, 0, 0, 0, 0, 10, 0, 0, 3, 0], &mut pattern);
        assert_eq!(out, Outcome::good(0));
        assert!(mem.bytes.lock().unwrap()[10 * 512..13 * 512]
            .iter()
            .all(|&b| b == 0xab));
        let out = d.execute(&[0x41, 0x08, 0, 0, 0, 10, 0, 0, 3, 0], &mut pattern);
        assert_eq!(out, Outcome::good(0));
        assert!(mem.bytes.lock().unwrap()[10 * 512..13 * 512]
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn unknown_commands_and_missing_images() {
        let d = disk(Arc::new(MemBackend::new(1 << 20, false)));
        let out = d.execute(
            &[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &mut vec![0u8; 64],
        );
        assert_eq!(out.sense, Some(Sense::INVALID_OPCODE));

        let broken = Disk::new(info(), None);
        let mut buf = vec![0u8; 96];
        assert_eq!(
            broken.execute(&[0x12, 0, 0, 0, 96, 0], &mut buf),
            Outcome::good(36)
        );
        let out = broken.execute(&[0, 0, 0, 0, 0, 0], &mut buf);
        assert_eq!(out.sense, Some(Sense::NOT_READY_MANUAL));
    }

    #[test]
    fn replies_are_cut_to_the_allocation_length() {
        let d = disk(Arc::new(MemBackend::new(1 << 20, true)));
        let mut buf = vec![0u8; 255];
        assert_eq!(d.execute(&[0x12, 0, 0, 0, 5, 0], &mut buf).data_in, 5);
        assert_eq!(d.execute(&[0x12, 1, 0xb0, 0, 255, 0], &mut buf).data_in, 64);
        let out = d.execute(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &mut buf);
        assert_eq!(out.data_in, 8);
        assert_eq!(&buf[..8], &[0, 0, 0x07, 0xff, 0, 0, 2, 0]);
        let mut rc16 = [0u8; 16];
        rc16[0] = 0x9e;
        rc16[1] = 0x10;
        rc16[13] = 32;
        d.execute(&rc16, &mut buf);
        assert_eq!(buf[14], 0xc0);
        assert_eq!(
            d.execute(&[0x12, 1, 0x99, 0, 255, 0], &mut buf).sense,
            Some(Sense::INVALID_FIELD_IN_CDB)
        );
    }
}
