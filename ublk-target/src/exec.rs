//! Carrying out one ublk request against the image stack, on the queue's
//! io_uring.
//!
//! READ: the stack's plan says which bytes are zeros and which come from
//! which layer file at which position, and `Stack::access` says, as types,
//! where each piece's bytes are stored and whether they must be decoded.
//! Every piece stored in a local file becomes one read SQE on the queue's
//! own ring, all submitted before the first is awaited:
//! - a plain local layer (a file, or a window of one such as a tar payload)
//!   is read at `base + position` straight into the request buffer;
//! - a ZFile layer over a local file has its compressed span read into a
//!   scratch buffer, then each block is CRC-checked and decompressed
//!   straight into the request buffer (a bad block is EIO, never data) on
//!   the queue thread, when the request has less than 32 KiB of blocks to
//!   decode; a request with more (a 4 KiB read of a 32 KiB-block layer, a
//!   sequential read) is read whole on the offload pool instead, through
//!   `Stack::read` as one job, so the queue thread serves other tags
//!   meanwhile and the requests in flight decode on all CPUs;
//! - the writable layer's data file is read at `position`;
//! - a registry layer (through the blob cache) is read from the cache on the
//!   queue thread when every byte it needs is cached (`Fetch::read_cached`,
//!   which never fetches: a chunk evicted since the plan sends the piece to
//!   the pool), and otherwise on the device's offload pool (`offload`), so
//!   a fetch never stalls the queue's other requests; cached ZFile blocks
//!   are decoded on the queue thread, in parallel parts on all CPUs when
//!   the request is large (`decode_all`).
//!
//! WRITE, DISCARD and WRITE_ZEROES go through the writable layer, whose
//! `pwrite`s (data, then the 16-byte index entry) run synchronously on the
//! queue thread. They only reach the page cache, so they are short, but they
//! are not SQEs. FLUSH is two fdatasync SQEs: the data file, then (after it
//! completed) the index file, so an index entry never reaches stable storage
//! before its data.
//!
//! Every failure completes the request with a negative errno (EIO for
//! corrupt data); nothing here panics on what the kernel sends.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types};
use libublk::io::UblkQueue;
use libublk::sys;
use overlaybd::live::{Entry, LiveStack};
use overlaybd::stack::{PieceSource, Plan, Stack};
use overlaybd::storage::{Access, At};
use overlaybd::zfile::ZFileReader;

use crate::offload::{Pool, POOL_THREADS};

/// Reads at least this long go straight to io_uring's worker threads
/// (IOSQE_ASYNC) instead of being tried inline: a page-cache read is a
/// memory copy, and done inline every copy of the queue runs on the queue
/// thread, one after another; as workers they run on other CPUs at once.
const ASYNC_READ_BYTES: usize = 64 << 10;

/// How a queue task reaches the bytes of one plan piece.
enum Fetch<'a> {
    /// Read `len` bytes at `offset` of `fd` straight into the request buffer.
    Direct { fd: RawFd, offset: u64 },
    /// Read the stored span at `offset` of `fd` into a scratch buffer, then
    /// decode decompressed `position..` from it.
    ZFile {
        fd: RawFd,
        offset: u64,
        stored_len: usize,
        reader: &'a ZFileReader,
        position: u64,
    },
    /// A registry blob whose bytes are all cached: read them from the
    /// cache on the queue thread, or, if some were evicted meanwhile, on
    /// the offload pool (never a fetch here). With `zfile`, the stored span
    /// goes to a scratch buffer and is decoded with the local ZFile pieces.
    Cached {
        blob: &'a dyn overlaybd::storage::Fetch,
        offset: u64,
        /// The reader, the decompressed position and the stored length.
        zfile: Option<(&'a ZFileReader, u64, usize)>,
    },
    /// No local file underneath, nothing to wait for (in memory): a
    /// synchronous read on the queue thread.
    Sync(Access<'a>),
    /// May wait on a registry: read on the offload pool.
    Offload,
}

/// One non-zero plan piece on its way into the request buffer.
struct Job<'a, 'b> {
    chunk: &'b mut [u8],
    fetch: Fetch<'a>,
    source: PieceSource,
    /// For a ZFile piece: which scratch buffer receives its stored bytes.
    stored: usize,
}

impl Job<'_, '_> {
    /// The file, offset and memory the read SQE for this job uses; `None`
    /// when it is read synchronously.
    fn target<'s>(&'s mut self, stored: &'s mut [Vec<u8>]) -> Option<(RawFd, u64, &'s mut [u8])> {
        match self.fetch {
            Fetch::Direct { fd, offset } => Some((fd, offset, &mut *self.chunk)),
            Fetch::ZFile { fd, offset, .. } => {
                Some((fd, offset, stored.get_mut(self.stored)?.as_mut_slice()))
            }
            Fetch::Cached { .. } | Fetch::Sync(_) | Fetch::Offload => None,
        }
    }
}

/// Per-task reusable memory, so steady-state requests do not allocate.
#[derive(Default)]
pub struct Scratch {
    plan: Plan,
    stored: Vec<Vec<u8>>,
}

/// What every queue of one device serves.
pub struct Backend {
    /// The stack, replaceable while the device runs (`obd snapshot`).
    live: Arc<LiveStack>,
    /// Threads for reads that may wait on a registry, or decode a lot
    /// (see `offload`).
    pool: Pool,
    /// Buffers of finished `read_on_pool`s, for the next ones.
    spare: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// How many `read_on_pool` buffers (up to `IO_BUF_BYTES` each) are kept
/// for reuse: as many reads as the pool runs at once.
const SPARE_BUFFERS: usize = POOL_THREADS;

/// How long a request waits before asking again whether a live snapshot
/// has finished replacing the stack.
const PAUSED_WAIT: types::Timespec = types::Timespec::new().nsec(200_000);

impl Backend {
    pub fn new(live: Arc<LiveStack>) -> std::io::Result<Backend> {
        Ok(Backend {
            live,
            pool: Pool::new(POOL_THREADS, "obd-offload")?,
            spare: std::sync::Mutex::default(),
        })
    }

    /// Hold the current stack for one request. While a live snapshot
    /// replaces it, wait on the ring: blocking the thread would stop the
    /// requests in flight on this queue, which the snapshot waits for.
    async fn enter(&self, q: &UblkQueue<'_>) -> Entry<'_> {
        loop {
            if let Some(entry) = self.live.try_enter() {
                return entry;
            }
            let wait = opcode::Timeout::new(&PAUSED_WAIT).build();
            let _ = q.ublk_submit_sqe(wait).await;
        }
    }

    /// Serve the request in `iod`; `buf` is the tag's I/O buffer. Returns
    /// the byte count (or 0) on success, a negative errno on failure.
    pub async fn handle(
        &self,
        q: &UblkQueue<'_>,
        iod: &sys::ublksrv_io_desc,
        buf: &mut [u8],
        scratch: &mut Scratch,
    ) -> i32 {
        let op = iod.op_flags & 0xff;
        let offset = iod.start_sector << 9;
        let bytes = u64::from(iod.nr_sectors) << 9;
        let data_op = matches!(op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE);
        if data_op && bytes > buf.len() as u64 {
            return -libc::EINVAL;
        }
        let entry = self.enter(q).await;
        let stack = entry.stack();
        let result = match op {
            sys::UBLK_IO_OP_READ => {
                self.read(q, stack, offset, &mut buf[..bytes as usize], scratch)
                    .await
            }
            sys::UBLK_IO_OP_WRITE if stack.store_reads_around(offset, bytes) => {
                let data = buf[..bytes as usize].to_vec();
                self.offload_store(q, stack, move |s| s.write(&data, offset))
                    .await
            }
            sys::UBLK_IO_OP_WRITE => stack
                .write(&buf[..bytes as usize], offset)
                .map_err(|e| -e.errno()),
            sys::UBLK_IO_OP_FLUSH => self.flush(q, stack).await,
            // On a sparse top a discard stores zeros over lower data, in
            // pieces that may cut blocks: see `offload_store`.
            sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES
                if stack.top().is_some_and(|top| top.is_sparse()) =>
            {
                self.offload_store(q, stack, move |s| s.discard(offset, bytes))
                    .await
            }
            sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
                stack.discard(offset, bytes).map_err(|e| -e.errno())
            }
            _ => Err(-libc::EOPNOTSUPP),
        };
        drop(entry);
        match result {
            Ok(()) if data_op => bytes as i32,
            Ok(()) => 0,
            Err(errno) => errno,
        }
    }

    /// How the `len` bytes of plan piece `source` are read.
    fn fetch_of<'s>(
        &self,
        stack: &'s Stack,
        source: PieceSource,
        len: usize,
    ) -> Result<Fetch<'s>, i32> {
        let access = stack.access(source, len as u64).map_err(|e| -e.errno())?;
        if access.may_fetch(len as u64) {
            return Ok(Fetch::Offload);
        }
        Ok(match access {
            Access::Plain(At::File { file, offset }) => Fetch::Direct {
                fd: file.as_raw_fd(),
                offset,
            },
            Access::Compressed {
                reader,
                position,
                stored: At::File { file, offset },
                stored_len,
            } => Fetch::ZFile {
                fd: file.as_raw_fd(),
                offset,
                stored_len: usize::try_from(stored_len).map_err(|_| -libc::EIO)?,
                reader,
                position,
            },
            Access::Plain(At::Fetch { blob, offset }) => Fetch::Cached {
                blob,
                offset,
                zfile: None,
            },
            Access::Compressed {
                reader,
                position,
                stored: At::Fetch { blob, offset },
                stored_len,
            } => Fetch::Cached {
                blob,
                offset,
                zfile: Some((
                    reader,
                    position,
                    usize::try_from(stored_len).map_err(|_| -libc::EIO)?,
                )),
            },
            other => Fetch::Sync(other),
        })
    }

    async fn read(
        &self,
        q: &UblkQueue<'_>,
        stack: &Arc<Stack>,
        offset: u64,
        buf: &mut [u8],
        scratch: &mut Scratch,
    ) -> Result<(), i32> {
        scratch.plan.clear();
        stack
            .plan(offset, buf.len() as u64, &mut scratch.plan)
            .map_err(|e| -e.errno())?;
        // Split the buffer along the plan and work out each piece's fetch.
        let mut jobs = Vec::with_capacity(scratch.plan.len());
        let mut rest: &mut [u8] = buf;
        let mut zfile_pieces = 0usize;
        for piece in &scratch.plan {
            let len = usize::try_from(piece.length).map_err(|_| -libc::EIO)?;
            if len > rest.len() {
                return Err(-libc::EIO);
            }
            let (chunk, tail) = rest.split_at_mut(len);
            rest = tail;
            if let PieceSource::Layer { .. } = piece.source {
                let fetch = self.fetch_of(stack, piece.source, len)?;
                let stored = zfile_pieces;
                if let Fetch::ZFile { .. } | Fetch::Cached { zfile: Some(_), .. } = fetch {
                    zfile_pieces += 1;
                }
                jobs.push(Job {
                    chunk,
                    fetch,
                    source: piece.source,
                    stored,
                });
            } else {
                chunk.fill(0);
            }
        }
        if !rest.is_empty() {
            return Err(-libc::EIO);
        }
        if zfile_pieces > 0 && offload_decoding(&jobs) {
            drop(jobs);
            return self.offload_request(q, stack, offset, buf).await;
        }
        if scratch.stored.len() < zfile_pieces {
            scratch.stored.resize_with(zfile_pieces, Vec::new);
        }
        for job in &jobs {
            match job.fetch {
                Fetch::ZFile { stored_len, .. } => {
                    scratch.stored[job.stored].resize(stored_len, 0);
                }
                Fetch::Cached {
                    zfile: Some((_, _, stored_len)),
                    ..
                } => {
                    scratch.stored[job.stored].resize(stored_len, 0);
                }
                _ => {}
            }
        }
        // Submit every read first, then collect them all, even after a
        // failure: no SQE may outlive the memory it reads into, and that
        // memory (request buffer, scratch) does not move in between.
        let mut submitted = Vec::with_capacity(jobs.len());
        // Local reads slower than the audit threshold are audited, timed
        // from submission to when this task collects them.
        let audit = overlaybd::audit::start();
        for job in jobs.iter_mut() {
            submitted.push(job.target(&mut scratch.stored).map(|(fd, at, target)| {
                let mut sqe =
                    opcode::Read::new(types::Fd(fd), target.as_mut_ptr(), target.len() as u32)
                        .offset(at)
                        .build();
                if target.len() >= ASYNC_READ_BYTES {
                    sqe = sqe.flags(squeue::Flags::ASYNC);
                }
                q.ublk_submit_sqe(sqe)
            }));
        }
        let mut result = Ok(());
        for (job, future) in jobs.iter_mut().zip(submitted) {
            let step = match future {
                Some(future) => {
                    let first = future.await;
                    match job.target(&mut scratch.stored) {
                        Some((fd, at, target)) => {
                            let len = target.len() as u64;
                            let read = finish_read(q, fd, at, target, first).await;
                            if audit.is_some() {
                                let outcome =
                                    read.map_err(|e| std::io::Error::from_raw_os_error(-e));
                                overlaybd::audit::slow_file_read(audit, &fd, at, len, &outcome);
                            }
                            read
                        }
                        None => Err(-libc::EIO),
                    }
                }
                None => match job.fetch {
                    Fetch::Sync(access) => sync_read(access, job.chunk),
                    Fetch::Cached {
                        blob,
                        offset,
                        zfile,
                    } => {
                        let target = match zfile {
                            Some(_) => scratch.stored[job.stored].as_mut_slice(),
                            None => &mut *job.chunk,
                        };
                        match blob.read_cached(target, offset) {
                            Ok(true) => Ok(()),
                            // Evicted since the plan: fetch on the pool
                            // (decoded there too), never here.
                            Ok(false) => {
                                job.fetch = Fetch::Offload;
                                self.offload_read(q, stack, job.chunk, job.source).await
                            }
                            Err(e) => {
                                eprintln!("obd: {e}");
                                Err(-overlaybd::error::errno_of(&e))
                            }
                        }
                    }
                    _ => self.offload_read(q, stack, job.chunk, job.source).await,
                },
            };
            if let (Err(errno), Ok(())) = (step, &result) {
                result = Err(errno);
            }
        }
        result?;
        // All stored bytes are in: check and decode the ZFile pieces.
        let mut decodes = Vec::new();
        for job in jobs.iter_mut() {
            let (reader, position) = match job.fetch {
                Fetch::ZFile {
                    reader, position, ..
                } => (reader, position),
                Fetch::Cached {
                    zfile: Some((reader, position, _)),
                    ..
                } => (reader, position),
                _ => continue,
            };
            decodes.push(Decode {
                reader,
                stored: &scratch.stored[job.stored],
                position,
                chunk: &mut *job.chunk,
            });
        }
        decode_all(decodes)
    }

    /// Read a whole request on the offload pool, through the engine's own
    /// read path (as `obd tcmu`'s workers do: one job, not one per plan
    /// piece).
    async fn offload_request(
        &self,
        q: &UblkQueue<'_>,
        stack: &Arc<Stack>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), i32> {
        self.read_on_pool(q, stack, buf, move |s, b| s.read(b, offset))
            .await
    }

    /// Run `read` on the offload pool into a buffer kept for the next such
    /// read, then copy what it read into `target`. A fresh buffer per read
    /// would cost a page fault per 4 KiB (large allocations are fresh
    /// mappings).
    async fn read_on_pool(
        &self,
        q: &UblkQueue<'_>,
        stack: &Arc<Stack>,
        target: &mut [u8],
        read: impl FnOnce(&Stack, &mut [u8]) -> overlaybd::Result<()> + Send + 'static,
    ) -> Result<(), i32> {
        let stack = stack.clone();
        let len = target.len();
        let mut bytes = self.spare_buffer();
        let bytes = self
            .pool
            .run(q, move || {
                if bytes.len() < len {
                    bytes.resize(len, 0);
                }
                match read(&stack, &mut bytes[..len]) {
                    Ok(()) => Ok(bytes),
                    Err(e) => {
                        eprintln!("obd: {e}");
                        Err(-e.errno())
                    }
                }
            })
            .await?;
        let read = bytes.get(..len).ok_or(-libc::EIO)?;
        target.copy_from_slice(read);
        self.keep_buffer(bytes);
        Ok(())
    }

    fn spare_buffer(&self) -> Vec<u8> {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        spare.pop().unwrap_or_default()
    }

    fn keep_buffer(&self, bytes: Vec<u8>) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < SPARE_BUFFERS {
            spare.push(bytes);
        }
    }

    /// A read that may wait on a registry, on the offload pool.
    async fn offload_read(
        &self,
        q: &UblkQueue<'_>,
        stack: &Arc<Stack>,
        chunk: &mut [u8],
        source: PieceSource,
    ) -> Result<(), i32> {
        self.read_on_pool(q, stack, chunk, move |s, b| s.read_piece(b, source))
            .await
    }

    /// A store that reads the layers below first (part of a sparse
    /// layer's block), which may fetch from a registry: on the offload
    /// pool, like such reads.
    async fn offload_store(
        &self,
        q: &UblkQueue<'_>,
        stack: &Arc<Stack>,
        store: impl FnOnce(&Stack) -> overlaybd::Result<()> + Send + 'static,
    ) -> Result<(), i32> {
        let stack = stack.clone();
        self.pool
            .run(q, move || match store(&stack) {
                Ok(()) => Ok(Vec::new()),
                Err(e) => {
                    eprintln!("obd: {e}");
                    Err(-e.errno())
                }
            })
            .await
            .map(drop)
    }

    /// Data file, then index file, each with fdatasync on the ring.
    async fn flush(&self, q: &UblkQueue<'_>, stack: &Stack) -> Result<(), i32> {
        let Some(top) = stack.top() else {
            return Ok(());
        };
        let files = [Some(top.data_file()), top.index_file()];
        for file in files.into_iter().flatten() {
            let sqe = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            let res = q.ublk_submit_sqe(sqe).await;
            if res < 0 {
                return Err(res);
            }
        }
        Ok(())
    }
}

/// Bytes of ZFile blocks a request must decode (whole blocks: a 4 KiB
/// random read of a 32 KiB-block layer counts 32 KiB) from which the
/// request is read and decoded on the offload pool instead of the queue
/// thread. Decoding 32 KiB takes longer than handing the work to another
/// thread and back, and meanwhile the queue serves its
/// other tags (a queue has one thread, and 6.12 has no per-tag daemons), so
/// the requests in flight decode on all CPUs at once. Measured in one boot
/// against decoding requests of 128 KiB or more in parallel parts on the
/// queue thread (rayon): sequential reads 1.5x faster on both ZFile stacks
/// of scripts/bench-ublk.sh (see scripts/bench-ublk.md).
const OFFLOAD_DECODE_BYTES: u64 = 32 << 10;

/// Whether a request is read on the offload pool: its local ZFile pieces
/// have at least [`OFFLOAD_DECODE_BYTES`] of blocks to decode.
fn offload_decoding(jobs: &[Job<'_, '_>]) -> bool {
    let mut blocks = 0u64;
    for job in jobs {
        if let Fetch::ZFile {
            reader, position, ..
        } = job.fetch
        {
            let bs = u64::from(reader.info().block_size).max(1);
            let last = (position + job.chunk.len() as u64).saturating_sub(1) / bs;
            blocks += (last + 1 - position / bs) * bs;
        }
    }
    blocks >= OFFLOAD_DECODE_BYTES
}

/// Decoded bytes of one request from which its ZFile blocks are decoded on
/// several CPUs at once. A request arrives on the queue of the CPU that
/// submitted it, so without this one CPU decodes a whole sequential stream.
const PARALLEL_DECODE_BYTES: usize = 128 << 10;
/// Decoded bytes per parallel part (whole blocks, at least one).
const DECODE_PART_BYTES: u64 = 64 << 10;

/// One ZFile span to check and decode: `chunk` is decompressed
/// `position..`, `stored` the stored bytes `stored_span` names for it.
struct Decode<'a> {
    reader: &'a ZFileReader,
    stored: &'a [u8],
    position: u64,
    chunk: &'a mut [u8],
}

impl<'a> Decode<'a> {
    fn run(self) -> Result<(), i32> {
        self.reader
            .decode_range(self.stored, self.position, self.chunk)
            .map_err(|e| {
                eprintln!("obd: {e}");
                -libc::EIO
            })
    }

    /// Cut into parts of whole blocks, each with its own stored bytes.
    fn split(self, out: &mut Vec<Decode<'a>>) -> Result<(), i32> {
        let Decode {
            reader,
            stored,
            mut position,
            chunk,
        } = self;
        let bad = |e: std::io::Error| {
            eprintln!("obd: {e}");
            -libc::EIO
        };
        let block = u64::from(reader.info().block_size).max(1);
        let part = DECODE_PART_BYTES.max(block) / block * block;
        let (piece_start, _) = reader.stored_span(position, chunk.len()).map_err(bad)?;
        let mut rest = chunk;
        while !rest.is_empty() {
            let boundary = (position / part + 1) * part;
            let n = ((boundary - position) as usize).min(rest.len());
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
            let (start, len) = reader.stored_span(position, n).map_err(bad)?;
            let from = usize::try_from(start - piece_start).map_err(|_| -libc::EIO)?;
            let bytes = stored.get(from..from + len as usize).ok_or(-libc::EIO)?;
            out.push(Decode {
                reader,
                stored: bytes,
                position,
                chunk: head,
            });
            position += n as u64;
            rest = tail;
        }
        Ok(())
    }
}

/// Check and decode every ZFile span of a request: on this thread when
/// they are small, else cut into parts decoded by rayon's pool on all CPUs,
/// straight into the request buffer.
fn decode_all(decodes: Vec<Decode<'_>>) -> Result<(), i32> {
    let total: usize = decodes.iter().map(|d| d.chunk.len()).sum();
    if total < PARALLEL_DECODE_BYTES {
        return decodes.into_iter().try_for_each(Decode::run);
    }
    let mut parts = Vec::new();
    for decode in decodes {
        decode.split(&mut parts)?;
    }
    use rayon::prelude::*;
    parts.into_par_iter().try_for_each(Decode::run)
}

/// The synchronous read of a piece without a local file underneath.
fn sync_read(access: Access<'_>, chunk: &mut [u8]) -> Result<(), i32> {
    access.read(chunk).map_err(|e| {
        eprintln!("obd: {e}");
        -overlaybd::error::errno_of(&e)
    })
}

/// Complete a read whose first SQE returned `first`: short reads are
/// continued, EAGAIN/EINTR retried, end of file is EIO.
async fn finish_read(
    q: &UblkQueue<'_>,
    fd: RawFd,
    offset: u64,
    buf: &mut [u8],
    first: i32,
) -> Result<(), i32> {
    let mut done = 0usize;
    let mut res = first;
    let mut retries = 0;
    loop {
        match res {
            r if r > 0 => {
                done += r as usize;
                if done >= buf.len() {
                    return Ok(());
                }
            }
            0 => return Err(-libc::EIO),
            r if (r == -libc::EAGAIN || r == -libc::EINTR) && retries < 16 => retries += 1,
            r => return Err(r),
        }
        let rest = &mut buf[done..];
        let sqe = opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), rest.len() as u32)
            .offset(offset + done as u64)
            .build();
        res = q.ublk_submit_sqe(sqe).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlaybd::io::{Bytes, Source};
    use overlaybd::zfile::{compress, ZFileOptions};

    /// Which requests leave the queue thread to be decoded: those with at
    /// least 32 KiB of blocks to decode.
    #[test]
    fn small_reads_of_large_blocks_are_decoded_off_the_queue_thread() {
        let data = vec![7u8; 1 << 20];
        let plain: Source = Arc::new(Bytes::new(data, "plain"));
        let reader_of = |kib: u32| {
            let mut out = std::io::Cursor::new(Vec::new());
            let options = ZFileOptions {
                block_size: kib << 10,
                ..ZFileOptions::default()
            };
            compress(&*plain, &mut out, &options, &mut |_| {}).unwrap();
            ZFileReader::open(Arc::new(Bytes::new(out.into_inner(), "z"))).unwrap()
        };
        let (small, large) = (reader_of(4), reader_of(32));
        let offloaded = |reader: &ZFileReader, position: u64, len: usize| {
            let mut buf = vec![0u8; len];
            let job = Job {
                chunk: &mut buf,
                fetch: Fetch::ZFile {
                    fd: -1,
                    offset: 0,
                    stored_len: 0,
                    reader,
                    position,
                },
                source: PieceSource::Layer { layer: 0, position },
                stored: 0,
            };
            offload_decoding(&[job])
        };
        assert!(offloaded(&large, 8192, 4096), "4 KiB of a 32 KiB block");
        assert!(!offloaded(&small, 8192, 4096), "one 4 KiB block");
        assert!(!offloaded(&small, 4096, 28 << 10), "7 blocks of 4 KiB");
        assert!(offloaded(&small, 2048, 32 << 10), "9 blocks of 4 KiB");
        assert!(offloaded(&small, 0, 512 << 10), "128 blocks of 4 KiB");
    }

    /// A large request's ZFile span, cut into parts and decoded on the
    /// pool, gives the same bytes as decoding it whole; a bad block in any
    /// part is EIO.
    #[test]
    fn parallel_decode_matches_and_catches_bad_blocks() {
        let data: Vec<u8> = (0..(3 << 20) as u32)
            .map(|i| (i / 7 % 251) as u8 ^ (i >> 13) as u8)
            .collect();
        let mut out = std::io::Cursor::new(Vec::new());
        let options = ZFileOptions::default();
        let plain: Source = Arc::new(Bytes::new(data.clone(), "plain"));
        compress(&*plain, &mut out, &options, &mut |_| {}).unwrap();
        let file: Source = Arc::new(Bytes::new(out.into_inner(), "zfile"));
        let reader = ZFileReader::open(file.clone()).unwrap();
        // An unaligned 1 MiB - 1000 range.
        let (position, len) = (123_456u64, (1 << 20) - 1000);
        let (start, stored_len) = reader.stored_span(position, len).unwrap();
        let mut stored = vec![0u8; stored_len as usize];
        file.read_exact_at(&mut stored, start).unwrap();
        let mut chunk = vec![0u8; len];
        decode_all(vec![Decode {
            reader: &reader,
            stored: &stored,
            position,
            chunk: &mut chunk,
        }])
        .unwrap();
        assert!(chunk == data[position as usize..position as usize + len]);
        stored[stored_len as usize / 2] ^= 0x40;
        let result = decode_all(vec![Decode {
            reader: &reader,
            stored: &stored,
            position,
            chunk: &mut chunk,
        }]);
        assert_eq!(result, Err(-libc::EIO));
    }
}
