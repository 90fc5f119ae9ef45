//! Block devices for libext2fs: an overlaybd layer stack with a writable
//! top layer, a plain raw image file, and a disk in memory (tests, fuzzing).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use overlaybd::stack::Stack;

use crate::io_manager::{BlockDevice, SECTOR};

/// A layer stack: reads merge the layers, writes go to its writable top.
pub struct StackDevice {
    stack: Stack,
    durable: bool,
}

impl StackDevice {
    /// `stack` must have a writable top layer. Unless `durable`, flushes
    /// do nothing: for a scratch top layer that is committed elsewhere and
    /// deleted, syncing a sparse file of the whole disk size only waits.
    pub fn new(stack: Stack, durable: bool) -> StackDevice {
        StackDevice { stack, durable }
    }

    pub fn stack(&self) -> &Stack {
        &self.stack
    }
}

fn to_io(e: overlaybd::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl BlockDevice for StackDevice {
    fn size(&self) -> u64 {
        self.stack.virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.stack.read(buf, offset).map_err(to_io)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.stack.write(buf, offset).map_err(to_io)
    }
    fn flush(&self) -> io::Result<()> {
        if !self.durable {
            return Ok(());
        }
        self.stack.flush().map_err(to_io)
    }
}

/// A raw disk image file of a fixed size.
pub struct FileDevice {
    file: File,
    size: u64,
}

impl FileDevice {
    /// `file` is grown (sparsely) to `size` bytes if shorter.
    pub fn new(file: File, size: u64) -> io::Result<FileDevice> {
        if file.metadata()?.len() < size {
            file.set_len(size)?;
        }
        Ok(FileDevice { file, size })
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A disk in memory: the sectors written so far over a shared base image
/// (all zeros when there is none). For tests and fuzzing: each test gets
/// its own changes over one file system made once.
pub struct MemoryDevice {
    base: Arc<Vec<u8>>,
    size: u64,
    changed: Mutex<HashMap<u64, Box<[u8]>>>,
}

impl MemoryDevice {
    /// `size` bytes (a multiple of 512) of zeros.
    pub fn zeros(size: u64) -> MemoryDevice {
        MemoryDevice {
            base: Arc::new(Vec::new()),
            size,
            changed: Mutex::new(HashMap::new()),
        }
    }

    /// A disk that starts as `base`.
    pub fn over(base: Arc<Vec<u8>>) -> MemoryDevice {
        let size = base.len() as u64;
        MemoryDevice {
            base,
            size,
            changed: Mutex::new(HashMap::new()),
        }
    }

    /// The whole disk as it reads now.
    pub fn image(&self) -> Vec<u8> {
        let mut image = vec![0u8; self.size as usize];
        self.read_at(&mut image, 0)
            .expect("in-memory reads succeed");
        image
    }
}

impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        crate::io_manager::check_range(self.size, buf.len(), offset)?;
        let changed = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let at = offset / SECTOR + i as u64;
            let start = (at * SECTOR) as usize;
            match changed.get(&at) {
                Some(bytes) => sector.copy_from_slice(bytes),
                None if start < self.base.len() => {
                    sector.copy_from_slice(&self.base[start..start + SECTOR as usize])
                }
                None => sector.fill(0),
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        crate::io_manager::check_range(self.size, buf.len(), offset)?;
        let mut changed = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        for (i, sector) in buf.chunks(SECTOR as usize).enumerate() {
            changed.insert(offset / SECTOR + i as u64, sector.into());
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}
