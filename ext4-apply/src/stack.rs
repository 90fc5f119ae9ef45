//! Block devices for libext2fs: an overlaybd layer stack with a writable
//! top layer, and a plain raw image file (for tests and tools).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use overlaybd::stack::Stack;

use crate::io_manager::BlockDevice;

/// A layer stack: reads merge the layers, writes go to its writable top.
pub struct StackDevice {
    stack: Stack,
}

impl StackDevice {
    /// `stack` must have a writable top layer.
    pub fn new(stack: Stack) -> StackDevice {
        StackDevice { stack }
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
