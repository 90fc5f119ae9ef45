//! Trace-driven prefetch for overlaybd images, and the tools around it.
//!
//! Daemon side ([`session`]): record the lower-layer reads an image serves
//! into the overlaybd trace format ([`recorder`]), or replay a trace — binary
//! records or a text list of paths — as prefetch ([`replay`]). Tool side:
//! raw block-device events from eBPF ([`events`]) mapped through an image's
//! stack and ext4 ([`ext4`]) into a trace ([`convert`]), summarized
//! ([`summary`]) and drawn ([`plot`], with the `plot` feature).

pub mod convert;
pub mod events;
pub mod ext4;
#[cfg(feature = "plot")]
pub mod plot;
pub mod recorder;
pub mod replay;
pub mod session;
pub mod summary;

use std::io;
use std::sync::Arc;

use overlaybd::index::SECTOR;
use overlaybd::io::ReadAt;
use overlaybd::stack::Stack;

pub use recorder::Recorder;
pub use replay::{ReplayHandle, ReplayOptions, ReplayReport};
pub use session::Session;

/// Something to tell a person that is not an error (a skipped record...).
pub type Warn = Arc<dyn Fn(&str) + Send + Sync>;

/// A [`Warn`] printing `warning: ...` on stderr.
pub fn warn_to_stderr() -> Warn {
    Arc::new(|message| eprintln!("warning: {message}"))
}

/// An image's merged virtual disk as a byte source (for the ext4 reader):
/// any offset and length, turned into 512-byte aligned stack reads.
pub struct StackSource {
    stack: Arc<Stack>,
    name: String,
}

impl StackSource {
    pub fn new(stack: Arc<Stack>, name: impl Into<String>) -> StackSource {
        StackSource {
            stack,
            name: name.into(),
        }
    }
}

impl ReadAt for StackSource {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.stack.virtual_size())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        if offset.is_multiple_of(SECTOR) && end.is_multiple_of(SECTOR) {
            return Ok(self.stack.read(buf, offset)?);
        }
        let start = offset / SECTOR * SECTOR;
        let aligned_end = end.div_ceil(SECTOR) * SECTOR;
        let mut bounce = vec![0u8; (aligned_end - start) as usize];
        self.stack.read(&mut bounce, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.stack.virtual_size()
    }

    fn name(&self) -> &str {
        &self.name
    }
}
