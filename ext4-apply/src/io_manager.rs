//! A libext2fs `io_manager` whose block reads and writes go to a
//! [`BlockDevice`] (in obd: a layer stack with a writable layer on top)
//! instead of a file descriptor.
//!
//! libext2fs opens its I/O channel by name, so a device is registered under
//! a unique name for as long as a file system uses it; the `open` callback
//! finds it there. Every callback catches panics (they must not unwind into
//! C) and turns Rust errors into `EIO`, keeping the message for the caller
//! to report (see [`Registration::take_error`]).

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_ulong, c_ulonglong, c_void, CStr, CString};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::sys;

/// Bytes addressed in units of this size must be aligned to it.
pub const SECTOR: u64 = 512;

/// A virtual disk read and written in whole 512-byte sectors.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes (a multiple of 512).
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; both are multiples of 512.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Store `buf` at `offset`; both are multiples of 512.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make what was written durable.
    fn flush(&self) -> io::Result<()>;
}

/// `Err` unless `[offset, offset + len)` is whole sectors inside `size` bytes.
pub fn check_range(size: u64, len: usize, offset: u64) -> io::Result<()> {
    let fits = offset
        .checked_add(len as u64)
        .is_some_and(|end| end <= size);
    if !fits || !offset.is_multiple_of(SECTOR) || !(len as u64).is_multiple_of(SECTOR) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "I/O of {len} bytes at {offset}: not whole sectors inside the {size} byte disk"
            ),
        ));
    }
    Ok(())
}

/// What the callbacks of one channel work with.
struct Channel {
    device: Arc<dyn BlockDevice>,
    /// The first I/O error since the caller last looked.
    error: Arc<Mutex<Option<String>>>,
    cache: Mutex<BlockCache>,
}

/// Unit of the read cache.
const CACHE_BLOCK: u64 = 4096;
/// Blocks the read cache holds (16 MiB).
const CACHE_BLOCKS: usize = 4096;

/// Copies of recently read 4 KiB blocks. libext2fs keeps no cache of its
/// own for directory blocks, so every name looked up or added reads the
/// whole directory again: without this, a layer adding thousands of names
/// to one directory costs millions of reads through the layer stack. Writes
/// go through to the device and refresh or drop the copies they touch.
#[derive(Default)]
struct BlockCache {
    blocks: HashMap<u64, Box<[u8]>>,
    /// Insertion order, for evicting the oldest.
    order: VecDeque<u64>,
}

impl BlockCache {
    fn insert(&mut self, block: u64, bytes: &[u8]) {
        if let Some(old) = self.blocks.get_mut(&block) {
            old.copy_from_slice(bytes);
            return;
        }
        while self.blocks.len() >= CACHE_BLOCKS {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.blocks.remove(&oldest);
                }
                None => break,
            }
        }
        self.blocks.insert(block, bytes.into());
        self.order.push_back(block);
    }

    /// After `[start, stop)` was written with `bytes`: keep whole blocks
    /// current, forget partly written ones.
    fn written(&mut self, start: u64, bytes: &[u8]) {
        let stop = start + bytes.len() as u64;
        let first = start / CACHE_BLOCK;
        let last = stop.div_ceil(CACHE_BLOCK);
        for block in first..last {
            let at = block * CACHE_BLOCK;
            if at >= start && at + CACHE_BLOCK <= stop {
                if let Some(copy) = self.blocks.get_mut(&block) {
                    let from = (at - start) as usize;
                    copy.copy_from_slice(&bytes[from..from + CACHE_BLOCK as usize]);
                }
            } else {
                self.blocks.remove(&block);
            }
        }
    }
}

impl Channel {
    fn note(&self, error: String) {
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(error);
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.device.size())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {} bytes at {offset} passes the end of the disk",
                        buf.len()
                    ),
                )
            })?;
        if offset.is_multiple_of(CACHE_BLOCK) && end.is_multiple_of(CACHE_BLOCK) {
            return self.read_cached(buf, offset);
        }
        if offset.is_multiple_of(SECTOR) && end.is_multiple_of(SECTOR) {
            return self.device.read_at(buf, offset);
        }
        let start = offset / SECTOR * SECTOR;
        let stop = end.div_ceil(SECTOR) * SECTOR;
        let mut whole = vec![0u8; (stop - start) as usize];
        self.device.read_at(&mut whole, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&whole[skip..skip + buf.len()]);
        Ok(())
    }

    /// A read of whole cache blocks: from the cache when all are there,
    /// else from the device in one read, then remembered.
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let first = offset / CACHE_BLOCK;
        let block = CACHE_BLOCK as usize;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let all_there =
            (0..buf.len() / block).all(|i| cache.blocks.contains_key(&(first + i as u64)));
        if all_there {
            for (i, chunk) in buf.chunks_mut(block).enumerate() {
                chunk.copy_from_slice(&cache.blocks[&(first + i as u64)]);
            }
            return Ok(());
        }
        self.device.read_at(buf, offset)?;
        for (i, chunk) in buf.chunks(block).enumerate() {
            cache.insert(first + i as u64, chunk);
        }
        Ok(())
    }

    /// Store `buf` at `offset`, writing only the sectors whose bytes
    /// change: libext2fs rewrites every bitmap and group descriptor block
    /// when it closes, and a layer should hold what the layer changed.
    fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.device.size())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "write of {} bytes at {offset} passes the end of the disk",
                        buf.len()
                    ),
                )
            })?;
        let start = offset / SECTOR * SECTOR;
        let stop = end.div_ceil(SECTOR) * SECTOR;
        let mut old = vec![0u8; (stop - start) as usize];
        self.read(&mut old, start)?;
        let skip = (offset - start) as usize;
        let mut new = old.clone();
        new[skip..skip + buf.len()].copy_from_slice(buf);
        let sector = SECTOR as usize;
        let mut run: Option<usize> = None;
        for i in 0..=new.len() / sector {
            let differs = i < new.len() / sector
                && new[i * sector..(i + 1) * sector] != old[i * sector..(i + 1) * sector];
            match (differs, run) {
                (true, None) => run = Some(i),
                (false, Some(first)) => {
                    self.device.write_at(
                        &new[first * sector..i * sector],
                        start + (first * sector) as u64,
                    )?;
                    run = None;
                }
                _ => {}
            }
        }
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .written(start, &new);
        Ok(())
    }
}

struct Registered {
    device: Arc<dyn BlockDevice>,
    error: Arc<Mutex<Option<String>>>,
}

fn registry() -> &'static Mutex<HashMap<String, Registered>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Registered>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// A device made reachable to libext2fs under [`Registration::name`];
/// unregistered when dropped.
pub struct Registration {
    name: CString,
    error: Arc<Mutex<Option<String>>>,
}

impl Registration {
    pub fn new(device: Arc<dyn BlockDevice>) -> Registration {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let text = format!("obd-device-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let error = Arc::new(Mutex::new(None));
        registry().lock().unwrap_or_else(|e| e.into_inner()).insert(
            text.clone(),
            Registered {
                device,
                error: error.clone(),
            },
        );
        Registration {
            name: CString::new(text).expect("no NUL in a generated name"),
            error,
        }
    }

    /// The name to pass to `ext2fs_open2` / `ext2fs_initialize`.
    pub fn name(&self) -> &CStr {
        &self.name
    }

    /// The I/O error behind the last failure, if it was one.
    pub fn take_error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(name) = self.name.to_str() {
            registry()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name);
        }
    }
}

struct ManagerPtr(*mut sys::struct_io_manager);
// SAFETY: the table is written once, before it is shared, and only read after.
unsafe impl Send for ManagerPtr {}
unsafe impl Sync for ManagerPtr {}

/// The io_manager table to hand to libext2fs.
pub fn manager() -> sys::io_manager {
    static MANAGER: OnceLock<ManagerPtr> = OnceLock::new();
    MANAGER
        .get_or_init(|| {
            let table = sys::struct_io_manager {
                magic: sys::EXT2_ET_MAGIC_IO_MANAGER as sys::errcode_t,
                name: c"obd block device".as_ptr(),
                open: Some(open),
                close: Some(close),
                set_blksize: Some(set_blksize),
                read_blk: Some(read_blk),
                write_blk: Some(write_blk),
                flush: Some(flush),
                write_byte: Some(write_byte),
                set_option: Some(set_option),
                get_stats: None,
                read_blk64: Some(read_blk64),
                write_blk64: Some(write_blk64),
                discard: None,
                cache_readahead: None,
                zeroout: None,
                reserved: [0; 14],
            };
            ManagerPtr(Box::into_raw(Box::new(table)))
        })
        .0
}

/// Run a callback body; a panic becomes `EIO` (it must not unwind into C).
fn guarded(body: impl FnOnce() -> sys::errcode_t) -> sys::errcode_t {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(libc::EIO as sys::errcode_t)
}

/// The channel state of `channel` (set by `open`).
///
/// # Safety
/// `channel` must be a channel made by [`open`] and not yet closed.
unsafe fn state<'a>(channel: sys::io_channel) -> &'a Channel {
    &*((*channel).private_data as *const Channel)
}

/// Bytes meant by a block count: negative counts are byte counts.
fn span(channel: sys::io_channel, block: u64, count: c_int) -> Option<(u64, usize)> {
    // SAFETY: libext2fs passes a live channel.
    let block_size = unsafe { (*channel).block_size } as u64;
    let offset = block.checked_mul(block_size)?;
    let len = if count < 0 {
        count.unsigned_abs() as u64
    } else {
        (count as u64).checked_mul(block_size)?
    };
    Some((offset, usize::try_from(len).ok()?))
}

fn io_result(channel: &Channel, what: &str, result: io::Result<()>) -> sys::errcode_t {
    match result {
        Ok(()) => 0,
        Err(e) => {
            channel.note(format!("{what}: {e}"));
            libc::EIO as sys::errcode_t
        }
    }
}

unsafe extern "C" fn open(
    name: *const c_char,
    _flags: c_int,
    out: *mut sys::io_channel,
) -> sys::errcode_t {
    guarded(|| {
        if name.is_null() || out.is_null() {
            return sys::EXT2_ET_BAD_DEVICE_NAME as sys::errcode_t;
        }
        // SAFETY: libext2fs passes the NUL-terminated name it was given.
        let key = unsafe { CStr::from_ptr(name) };
        let Some((device, error)) = key.to_str().ok().and_then(|key| {
            registry()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(key)
                .map(|r| (r.device.clone(), r.error.clone()))
        }) else {
            return sys::EXT2_ET_BAD_DEVICE_NAME as sys::errcode_t;
        };
        let state = Box::new(Channel {
            device,
            error,
            cache: Mutex::new(BlockCache::default()),
        });
        let channel = Box::new(sys::struct_io_channel {
            magic: sys::EXT2_ET_MAGIC_IO_CHANNEL as sys::errcode_t,
            manager: manager(),
            name: key.to_owned().into_raw(),
            block_size: 1024,
            read_error: None,
            write_error: None,
            refcount: 1,
            flags: 0,
            reserved: [0; 14],
            private_data: Box::into_raw(state) as *mut c_void,
            app_data: std::ptr::null_mut(),
            align: 0,
        });
        // SAFETY: `out` is libext2fs's slot for the new channel.
        unsafe { *out = Box::into_raw(channel) };
        0
    })
}

unsafe extern "C" fn close(channel: sys::io_channel) -> sys::errcode_t {
    guarded(|| {
        if channel.is_null() {
            return 0;
        }
        // SAFETY: the channel, its name and state were made by `open`
        // with Box/CString and are freed once, here.
        unsafe {
            let channel = Box::from_raw(channel);
            drop(CString::from_raw(channel.name));
            drop(Box::from_raw(channel.private_data as *mut Channel));
        }
        0
    })
}

unsafe extern "C" fn set_blksize(channel: sys::io_channel, blksize: c_int) -> sys::errcode_t {
    if blksize <= 0 || !(blksize as u64).is_multiple_of(SECTOR) {
        return sys::EXT2_ET_INVALID_ARGUMENT as sys::errcode_t;
    }
    // SAFETY: a live channel.
    unsafe { (*channel).block_size = blksize };
    0
}

unsafe extern "C" fn read_blk64(
    channel: sys::io_channel,
    block: c_ulonglong,
    count: c_int,
    data: *mut c_void,
) -> sys::errcode_t {
    guarded(|| {
        let Some((offset, len)) = span(channel, block, count) else {
            return sys::EXT2_ET_INVALID_ARGUMENT as sys::errcode_t;
        };
        // SAFETY: libext2fs gives a buffer of the span it asks for.
        let buf = unsafe { std::slice::from_raw_parts_mut(data as *mut u8, len) };
        let state = unsafe { state(channel) };
        io_result(state, "read", state.read(buf, offset))
    })
}

unsafe extern "C" fn write_blk64(
    channel: sys::io_channel,
    block: c_ulonglong,
    count: c_int,
    data: *const c_void,
) -> sys::errcode_t {
    guarded(|| {
        let Some((offset, len)) = span(channel, block, count) else {
            return sys::EXT2_ET_INVALID_ARGUMENT as sys::errcode_t;
        };
        // SAFETY: libext2fs gives a buffer of the span it writes.
        let buf = unsafe { std::slice::from_raw_parts(data as *const u8, len) };
        let state = unsafe { state(channel) };
        io_result(state, "write", state.write(buf, offset))
    })
}

unsafe extern "C" fn read_blk(
    channel: sys::io_channel,
    block: c_ulong,
    count: c_int,
    data: *mut c_void,
) -> sys::errcode_t {
    read_blk64(channel, block as c_ulonglong, count, data)
}

unsafe extern "C" fn write_blk(
    channel: sys::io_channel,
    block: c_ulong,
    count: c_int,
    data: *const c_void,
) -> sys::errcode_t {
    write_blk64(channel, block as c_ulonglong, count, data)
}

unsafe extern "C" fn write_byte(
    channel: sys::io_channel,
    offset: c_ulong,
    count: c_int,
    data: *const c_void,
) -> sys::errcode_t {
    guarded(|| {
        let Ok(len) = usize::try_from(count) else {
            return sys::EXT2_ET_INVALID_ARGUMENT as sys::errcode_t;
        };
        // SAFETY: libext2fs gives `count` bytes.
        let buf = unsafe { std::slice::from_raw_parts(data as *const u8, len) };
        let state = unsafe { state(channel) };
        io_result(state, "write", state.write(buf, offset))
    })
}

unsafe extern "C" fn flush(channel: sys::io_channel) -> sys::errcode_t {
    guarded(|| {
        let state = unsafe { state(channel) };
        io_result(state, "flush", state.device.flush())
    })
}

unsafe extern "C" fn set_option(
    _channel: sys::io_channel,
    _option: *const c_char,
    _arg: *const c_char,
) -> sys::errcode_t {
    sys::EXT2_ET_INVALID_ARGUMENT as sys::errcode_t
}
