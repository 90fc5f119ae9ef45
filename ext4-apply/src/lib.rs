//! Applying OCI image layers (tar, tar+gzip, tar+zstd) onto an ext4 file
//! system kept in an overlaybd layer stack: what overlaybd-apply does, for
//! `obd apply`.
//!
//! # Why libext2fs
//! Writing ext4 means allocating blocks and inodes, growing directories,
//! extent trees, xattr blocks, group descriptors, bitmaps and link counts
//! that `e2fsck` and the kernel accept. There is no maintained pure-Rust
//! ext4 *writer* (the crates that exist read ext4, or write ext2 without
//! extents); libext2fs (e2fsprogs) is the library mke2fs, e2fsck, debugfs
//! and fuse2fs are built on, so it is as well kept as ext4 tooling gets,
//! and the reference overlaybd-apply writes through it the same way. It
//! is reached through bindgen (build.rs) and a custom `io_manager`
//! ([`io_manager`]) whose block reads and writes go to a [`BlockDevice`]:
//! in obd, a writable layer on top of the lower layers of the image
//! ([`StackDevice`]), which `obd apply` then commits like `obd commit`.
//! No root, no kernel module, no mount.
//!
//! # Layout
//! - [`fs`]: the ext4 operations (make, open, create, link, remove, xattrs)
//!   over libext2fs; directories that grow past a block get a hash index
//!   when the file system is closed (`htree`), as mke2fs/e2fsck -D would;
//! - [`layer`]: the OCI rules (whiteouts, opaque directories, replacing,
//!   hard links, implicit parents) over a sequentially read tar stream,
//!   with pax records parsed by [`pax`];
//! - [`io_manager`]: the bridge from libext2fs's I/O to a [`BlockDevice`],
//!   with a small read cache; it writes only the sectors whose bytes
//!   change, so a layer holds what it changed and not every bitmap and
//!   group descriptor libext2fs rewrites when it closes;
//! - [`stack`]: the devices (the layer stack, a raw file, memory).
//!
//! The output is reproducible: times come from the tar headers, and what
//! libext2fs stamps itself uses `SOURCE_DATE_EPOCH` (default 1), never the
//! clock, so the same layers give the same bytes and registry digests.
//!
//! # Room for TurboOCI
//! A TurboOCI layer keeps file contents in the original tar(.gz) and only
//! the ext4 metadata in the overlaybd layer: its index entries (tag 1)
//! point at 512-byte sectors of the uncompressed tar. File data in a tar
//! starts on a 512-byte boundary, so each 4 KiB file block maps to 8 tar
//! sectors (a last partial block shows the next header past i_size, which
//! ext4 ignores). [`fs::Ext4::create_file`] is the one place file bytes are
//! written: the TurboOCI step adds a variant that allocates the blocks the
//! same way but, instead of writing them, records "disk block → tar
//! offset" (the tar crate gives each entry's `raw_file_position`) for the
//! layer's index, while the gzip index is built from the same single read
//! of the stream. The layer rules in [`layer`] stay as they are.

pub mod fs;
mod htree;
pub mod io_manager;
pub mod layer;
pub mod pax;
pub mod stack;
pub mod sys;

pub use fs::Ext4;
pub use io_manager::BlockDevice;
pub use layer::{apply, decompress, open_layer, Stats};
pub use stack::{FileDevice, MemoryDevice, StackDevice};

/// What went wrong, by whose fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layer tarball is malformed or asks for something impossible.
    #[error("bad layer: {0}")]
    Layer(String),
    /// An argument (a size, a name) that cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// libext2fs or the device under it failed.
    #[error("ext4: {0}")]
    Fs(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
