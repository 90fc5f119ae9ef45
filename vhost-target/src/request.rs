//! One virtio-blk request: a descriptor chain in guest memory, checked and
//! carried out against the stack.
//!
//! Framing follows the spec's rule that a device must not rely on how the
//! driver splits a request into descriptors: the device-readable bytes of
//! the chain are one stream (the 16-byte header, then the data of OUT,
//! DISCARD and WRITE_ZEROES), the device-writable bytes another (the data
//! of IN and GET_ID, then the one status byte, last).
//!
//! IN reads straight into guest memory: each data segment that is a whole
//! number of sectors and lies in one memory region is handed to
//! [`Stack::read`] as a slice of guest memory, with segments that are
//! adjacent in this process's mapping read as one. OUT writes from guest
//! memory the same way. A request whose segments are not whole sectors goes
//! through a bounce buffer of at most [`BOUNCE_CHUNK`] bytes, kept with the
//! queue, so no request allocates once the queue's buffers have grown.
//!
//! Every problem with a request — a short header, data that is not whole
//! sectors, a range past the end, an address outside guest memory, an
//! engine error — completes it with VIRTIO_BLK_S_IOERR; an unknown type or
//! flag gets VIRTIO_BLK_S_UNSUPP. Nothing the guest sends can panic this
//! code. A chain with no writable byte for the status cannot be answered at
//! all: it is completed with length 0.

use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicU64, Ordering};

use overlaybd::stack::Stack;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::config::{Geometry, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR};

/// Guest memory as the vhost-user back end maps it (no dirty-page log).
pub type Memory = GuestMemoryMmap<()>;

/// Bytes of the request header: type, reserved (ioprio), sector.
pub const HEADER_LEN: usize = 16;

/// Bytes of one DISCARD / WRITE_ZEROES range: sector, sectors, flags.
const RANGE_LEN: usize = 16;

/// Largest piece of a request that goes through the bounce buffer at once.
pub const BOUNCE_CHUNK: usize = 256 << 10;

/// How a request ended: the status byte written for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    fn byte(self) -> u8 {
        (match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// The device a request runs against.
pub struct Device<'a> {
    pub stack: &'a Stack,
    pub geometry: Geometry,
    pub id: [u8; ID_BYTES],
    pub stats: &'a Stats,
}

/// Requests seen, by kind (for the log at the end of a connection, and for
/// tests that want to know the guest really flushed or discarded).
#[derive(Debug, Default)]
pub struct Stats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub other: AtomicU64,
    pub errors: AtomicU64,
}

impl Stats {
    fn count(&self, kind: u32, status: Status) {
        let counter = match kind {
            VIRTIO_BLK_T_IN => &self.reads,
            VIRTIO_BLK_T_OUT => &self.writes,
            VIRTIO_BLK_T_FLUSH => &self.flushes,
            VIRTIO_BLK_T_DISCARD => &self.discards,
            VIRTIO_BLK_T_WRITE_ZEROES => &self.write_zeroes,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if status != Status::Ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One line: `reads N, writes N, ...`.
    pub fn summary(&self) -> String {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "reads {}, writes {}, flushes {}, discards {}, write-zeroes {}, other {}, failed {}",
            n(&self.reads),
            n(&self.writes),
            n(&self.flushes),
            n(&self.discards),
            n(&self.write_zeroes),
            n(&self.other),
            n(&self.errors)
        )
    }
}

/// A run of guest memory: address and length.
type Segment = (GuestAddress, usize);

/// Buffers one queue reuses for every request (they grow to the largest
/// request seen, then stay).
#[derive(Default)]
pub struct Scratch {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    data: Vec<Segment>,
    bounce: Vec<u8>,
}

/// What carrying out a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The status written; `None` when the chain had nowhere to put it.
    pub status: Option<Status>,
    /// Bytes written into guest memory (the used length), status included.
    pub used: u32,
}

/// Carry out the request in `chain`: check it, run it against the stack,
/// write its data (IN, GET_ID) and its status into guest memory.
pub fn execute<M>(device: &Device<'_>, mut chain: DescriptorChain<M>, s: &mut Scratch) -> Outcome
where
    M: Deref<Target = Memory>,
{
    s.readable.clear();
    s.writable.clear();
    s.data.clear();
    let mut out_of_order = false;
    for desc in chain.by_ref() {
        let segment = (desc.addr(), desc.len() as usize);
        if desc.is_write_only() {
            s.writable.push(segment);
        } else {
            out_of_order |= !s.writable.is_empty();
            s.readable.push(segment);
        }
    }
    let mem = chain.memory();
    let readable: usize = s.readable.iter().map(|seg| seg.1).sum();
    let writable: usize = s.writable.iter().map(|seg| seg.1).sum();
    let Some(status_at) = stream_address(&s.writable, writable.wrapping_sub(1)) else {
        return Outcome {
            status: None,
            used: 0,
        };
    };
    // The data area of IN and GET_ID: the writable bytes before the status.
    let in_len = writable - 1;
    let (status, data_written) = if out_of_order {
        (Status::IoErr, 0)
    } else {
        run(device, mem, s, readable, in_len)
    };
    let status = match mem.write_obj(status.byte(), status_at) {
        Ok(()) => Some(status),
        Err(_) => None,
    };
    Outcome {
        status,
        used: if status.is_some() {
            u32::try_from(data_written + 1).unwrap_or(u32::MAX)
        } else {
            0
        },
    }
}

/// Decode the header and carry out the request. Returns the status and
/// the data bytes written into guest memory.
fn run(
    device: &Device<'_>,
    mem: &Memory,
    s: &mut Scratch,
    readable: usize,
    in_len: usize,
) -> (Status, usize) {
    let mut header = [0u8; HEADER_LEN];
    if readable < HEADER_LEN || !gather(mem, &s.readable, 0, &mut header) {
        device.stats.errors.fetch_add(1, Ordering::Relaxed);
        return (Status::IoErr, 0);
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let (status, written) = run_kind(device, mem, s, kind, &header, readable, in_len);
    device.stats.count(kind, status);
    (status, written)
}

/// Carry out a request of type `kind` whose header is `header`.
fn run_kind(
    device: &Device<'_>,
    mem: &Memory,
    s: &mut Scratch,
    kind: u32,
    header: &[u8; HEADER_LEN],
    readable: usize,
    in_len: usize,
) -> (Status, usize) {
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let out_len = readable - HEADER_LEN;
    let g = &device.geometry;
    match kind {
        VIRTIO_BLK_T_IN => {
            let Some(offset) = check_range(g, sector, in_len as u64) else {
                return (Status::IoErr, 0);
            };
            sub_range(&s.writable, 0, in_len, &mut s.data);
            match read(device.stack, mem, &s.data, offset, &mut s.bounce) {
                true => (Status::Ok, in_len),
                false => (Status::IoErr, 0),
            }
        }
        VIRTIO_BLK_T_OUT => {
            if g.read_only {
                return (Status::IoErr, 0);
            }
            let Some(offset) = check_range(g, sector, out_len as u64) else {
                return (Status::IoErr, 0);
            };
            sub_range(&s.readable, HEADER_LEN, out_len, &mut s.data);
            (
                status_of(write(device.stack, mem, &s.data, offset, &mut s.bounce)),
                0,
            )
        }
        VIRTIO_BLK_T_FLUSH => (status_of(device.stack.flush().is_ok()), 0),
        VIRTIO_BLK_T_GET_ID => {
            let n = in_len.min(ID_BYTES);
            match scatter(mem, &s.writable, 0, &device.id[..n]) {
                true => (Status::Ok, n),
                false => (Status::IoErr, 0),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if g.read_only {
                return (Status::Unsupp, 0);
            }
            (discard(device, mem, s, kind, out_len), 0)
        }
        _ => (Status::Unsupp, 0),
    }
}

fn status_of(ok: bool) -> Status {
    if ok {
        Status::Ok
    } else {
        Status::IoErr
    }
}

/// The byte offset of `len` bytes at `sector`, when they are whole
/// sectors, whole logical blocks where it matters, and inside the image.
fn check_range(g: &Geometry, sector: u64, len: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR)?;
    let end = offset.checked_add(len)?;
    let ok = len.is_multiple_of(SECTOR) && end <= g.size;
    ok.then_some(offset)
}

/// DISCARD or WRITE_ZEROES: each 16-byte range of the data zeroes that
/// range of the writable layer (both read as zeros afterwards).
fn discard(device: &Device<'_>, mem: &Memory, s: &Scratch, kind: u32, len: usize) -> Status {
    if len == 0 || !len.is_multiple_of(RANGE_LEN) || len / RANGE_LEN > MAX_DISCARD_SEGMENTS as usize
    {
        return Status::IoErr;
    }
    let g = &device.geometry;
    let block_sectors = u64::from(g.block_size) / SECTOR;
    // Check every range before zeroing any.
    let mut ranges = [(0u64, 0u64); MAX_DISCARD_SEGMENTS as usize];
    for (i, range) in ranges.iter_mut().take(len / RANGE_LEN).enumerate() {
        let mut raw = [0u8; RANGE_LEN];
        if !gather(mem, &s.readable, HEADER_LEN + i * RANGE_LEN, &mut raw) {
            return Status::IoErr;
        }
        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
        // Discard takes no flags; write-zeroes only "may unmap".
        let allowed = match kind {
            VIRTIO_BLK_T_WRITE_ZEROES => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            _ => 0,
        };
        if flags & !allowed != 0 {
            return Status::Unsupp;
        }
        if sectors > MAX_DISCARD_SECTORS
            || !sector.is_multiple_of(block_sectors)
            || !u64::from(sectors).is_multiple_of(block_sectors)
        {
            return Status::IoErr;
        }
        let Some(offset) = check_range(g, sector, u64::from(sectors) * SECTOR) else {
            return Status::IoErr;
        };
        *range = (offset, u64::from(sectors) * SECTOR);
    }
    for &(offset, length) in ranges.iter().take(len / RANGE_LEN) {
        if length != 0 && device.stack.discard(offset, length).is_err() {
            return Status::IoErr;
        }
    }
    Status::Ok
}

/// Which way a request's data goes.
#[derive(Clone, Copy)]
enum Direction {
    /// Stack → guest memory (IN).
    ToGuest,
    /// Guest memory → stack (OUT).
    FromGuest,
}

/// Read `offset..` of the stack into the guest memory of `segments`.
fn read(
    stack: &Stack,
    mem: &Memory,
    segments: &[Segment],
    offset: u64,
    bounce: &mut Vec<u8>,
) -> bool {
    transfer(stack, mem, segments, offset, bounce, Direction::ToGuest)
}

/// Write the guest memory of `segments` to the stack at `offset..`.
fn write(
    stack: &Stack,
    mem: &Memory,
    segments: &[Segment],
    offset: u64,
    bounce: &mut Vec<u8>,
) -> bool {
    transfer(stack, mem, segments, offset, bounce, Direction::FromGuest)
}

/// Move the data of `segments` (guest memory) and `offset..` of the stack
/// the way `direction` says: segments that are whole sectors and adjacent
/// in this process's memory go as one run straight to or from guest memory;
/// the rest through the bounce buffer.
fn transfer(
    stack: &Stack,
    mem: &Memory,
    segments: &[Segment],
    offset: u64,
    bounce: &mut Vec<u8>,
    direction: Direction,
) -> bool {
    let run_io = |ptr: *mut u8, n: usize, at: &mut u64| match direction {
        Direction::ToGuest => read_run(stack, ptr, n, at),
        Direction::FromGuest => write_run(stack, ptr, n, at),
    };
    let bounce_io = |segments: &[Segment], at: u64, bounce: &mut Vec<u8>| match direction {
        Direction::ToGuest => bounce_read(stack, mem, segments, at, bounce),
        Direction::FromGuest => bounce_write(stack, mem, segments, at, bounce),
    };
    if !whole_sectors(segments) {
        return bounce_io(segments, offset, bounce);
    }
    let mut at = offset;
    let mut run: Option<(*mut u8, usize)> = None;
    for &(addr, len) in segments {
        if len == 0 {
            continue;
        }
        let Some(ptr) = host_pointer(mem, addr, len) else {
            // Not one contiguous mapping: this segment via the bounce
            // buffer (it still starts on a sector).
            if let Some((p, n)) = run.take() {
                if !run_io(p, n, &mut at) {
                    return false;
                }
            }
            if !bounce_io(&[(addr, len)], at, bounce) {
                return false;
            }
            at += len as u64;
            continue;
        };
        run = match run {
            Some((p, n)) if p.wrapping_add(n) == ptr => Some((p, n + len)),
            Some((p, n)) => {
                if !run_io(p, n, &mut at) {
                    return false;
                }
                Some((ptr, len))
            }
            None => Some((ptr, len)),
        };
    }
    match run {
        Some((p, n)) => run_io(p, n, &mut at),
        None => true,
    }
}

/// Read `n` bytes at `*at` straight into guest memory at `ptr`.
fn read_run(stack: &Stack, ptr: *mut u8, n: usize, at: &mut u64) -> bool {
    // SAFETY: `ptr..ptr + n` lies inside one mapping of guest memory (checked
    // by `host_pointer` for each segment, and runs only join segments that
    // are adjacent in this process's address space), which stays mapped
    // while `mem` is borrowed. The guest may touch the same bytes meanwhile;
    // the stack only stores into the slice and never reads it back, so what
    // the guest sees is at worst its own race, as with any DMA.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, n) };
    let ok = stack.read(buf, *at).is_ok();
    *at += n as u64;
    ok
}

/// Write `n` bytes of guest memory at `ptr` to the stack at `*at`.
fn write_run(stack: &Stack, ptr: *mut u8, n: usize, at: &mut u64) -> bool {
    // SAFETY: as in `read_run`; here the stack only reads the slice. If the
    // guest changes the bytes while they are written, it gets some mix of
    // old and new, as with any DMA.
    let buf = unsafe { std::slice::from_raw_parts(ptr.cast_const(), n) };
    let ok = stack.write(buf, *at).is_ok();
    *at += n as u64;
    ok
}

fn whole_sectors(segments: &[Segment]) -> bool {
    segments
        .iter()
        .all(|&(_, len)| (len as u64).is_multiple_of(SECTOR))
}

/// This process's address of `len` bytes of guest memory at `addr`, when
/// they lie in one region.
fn host_pointer(mem: &Memory, addr: GuestAddress, len: usize) -> Option<*mut u8> {
    let slice = mem.get_slice(addr, len).ok()?;
    let ptr = slice.ptr_guard_mut().as_ptr();
    Some(ptr)
}

/// Read through the bounce buffer, a chunk at a time, scattering each
/// chunk over `segments`.
fn bounce_read(
    stack: &Stack,
    mem: &Memory,
    segments: &[Segment],
    offset: u64,
    bounce: &mut Vec<u8>,
) -> bool {
    let total: usize = segments.iter().map(|seg| seg.1).sum();
    let mut done = 0;
    while done < total {
        let n = (total - done).min(BOUNCE_CHUNK);
        grow(bounce, n);
        let chunk = &mut bounce[..n];
        if stack.read(chunk, offset + done as u64).is_err() || !scatter(mem, segments, done, chunk)
        {
            return false;
        }
        done += n;
    }
    true
}

/// Write through the bounce buffer, a chunk at a time, gathering each
/// chunk from `segments`.
fn bounce_write(
    stack: &Stack,
    mem: &Memory,
    segments: &[Segment],
    offset: u64,
    bounce: &mut Vec<u8>,
) -> bool {
    let total: usize = segments.iter().map(|seg| seg.1).sum();
    let mut done = 0;
    while done < total {
        let n = (total - done).min(BOUNCE_CHUNK);
        grow(bounce, n);
        let chunk = &mut bounce[..n];
        if !gather(mem, segments, done, chunk) || stack.write(chunk, offset + done as u64).is_err()
        {
            return false;
        }
        done += n;
    }
    true
}

fn grow(buf: &mut Vec<u8>, n: usize) {
    if buf.len() < n {
        buf.resize(n, 0);
    }
}

/// Call `f` with each piece of the stream bytes `pos..pos + len` laid over
/// `segments`: its guest address and its range within `0..len`. False when
/// the stream is shorter, an address overflows, or `f` fails.
fn for_each_piece(
    segments: &[Segment],
    pos: usize,
    len: usize,
    mut f: impl FnMut(GuestAddress, Range<usize>) -> bool,
) -> bool {
    let mut skip = pos;
    let mut done = 0;
    for &(addr, seg_len) in segments {
        if done == len {
            break;
        }
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(len - done);
        let Some(at) = addr.0.checked_add(skip as u64) else {
            return false;
        };
        if !f(GuestAddress(at), done..done + n) {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == len
}

/// Copy stream bytes `pos..pos + buf.len()` of `segments` into `buf`.
fn gather(mem: &Memory, segments: &[Segment], pos: usize, buf: &mut [u8]) -> bool {
    for_each_piece(segments, pos, buf.len(), |addr, range| {
        mem.read_slice(&mut buf[range], addr).is_ok()
    })
}

/// Copy `buf` into stream bytes `pos..pos + buf.len()` of `segments`.
fn scatter(mem: &Memory, segments: &[Segment], pos: usize, buf: &[u8]) -> bool {
    for_each_piece(segments, pos, buf.len(), |addr, range| {
        mem.write_slice(&buf[range], addr).is_ok()
    })
}

/// The segments covering stream bytes `pos..pos + len`, into `out`.
fn sub_range(segments: &[Segment], pos: usize, len: usize, out: &mut Vec<Segment>) {
    out.clear();
    for_each_piece(segments, pos, len, |addr, range| {
        out.push((addr, range.len()));
        true
    });
}

/// The guest address of stream byte `pos`.
fn stream_address(segments: &[Segment], pos: usize) -> Option<GuestAddress> {
    let mut found = None;
    for_each_piece(segments, pos, 1, |addr, _| {
        found = Some(addr);
        true
    });
    found
}

#[cfg(test)]
mod tests;
