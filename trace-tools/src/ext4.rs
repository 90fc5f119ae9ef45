//! A minimal read-only ext4 (and ext2/3) reader over any byte source —
//! usually an image's [`Stack`](overlaybd::stack::Stack) through
//! [`StackSource`](crate::StackSource).
//!
//! Prefetch needs what a general ext4 library does not expose: where a
//! file's blocks are on the device (its extents) and which path an inode
//! number has. So this reads exactly that: the superblock, group
//! descriptors, inodes, extent trees (and legacy block maps), directories
//! and symlinks. It never writes, ignores the journal, and treats every
//! on-disk number as untrusted: a bad value is an error naming the image,
//! never a panic or an endless loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use std::sync::Arc;

use overlaybd::io::{ReadAt, Source, Window};
use overlaybd::{Error, Result};

const SUPERBLOCK_OFFSET: u64 = 1024;
const MAGIC: u16 = 0xEF53;
pub const ROOT_INO: u32 = 2;

const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_ENCRYPT: u32 = 0x10000;

const FLAG_EXTENTS: u32 = 0x80000;
const FLAG_INLINE_DATA: u32 = 0x1000_0000;

const EXTENT_MAGIC: u16 = 0xF30A;
const MAX_EXTENT_DEPTH: u16 = 5;
/// Symlinks followed while resolving one path (Linux's limit).
const MAX_SYMLINKS: usize = 40;
/// Directories larger than this are refused (a bad size would otherwise
/// make us read the whole device).
const MAX_DIR_BYTES: u64 = 256 << 20;

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    Other,
}

/// An inode, as much of it as prefetch needs.
#[derive(Debug, Clone)]
pub struct Inode {
    pub ino: u32,
    pub kind: FileKind,
    pub size: u64,
    flags: u32,
    block: [u8; 60],
}

/// A run of a file's blocks: `len` blocks from file block `logical` stored
/// at device block `physical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u32,
}

/// An open ext4 filesystem.
pub struct Ext4 {
    dev: Source,
    name: String,
    block_size: u64,
    blocks_count: u64,
    inodes_count: u32,
    inodes_per_group: u32,
    inode_size: u64,
    /// Device block of each group's inode table.
    inode_tables: Vec<u64>,
    /// Where the filesystem starts on the disk it was found on (its
    /// partition's start; 0 for a bare filesystem).
    base: u64,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Ext4 {
    /// Read the superblock and group descriptors of the ext4 on `dev`.
    pub fn open(dev: Source) -> Result<Ext4> {
        let name = dev.name().to_string();
        let bad = |problem: String| Error::corrupt(&name, format!("ext4: {problem}"));
        let mut sb = [0u8; 1024];
        if dev.size() < SUPERBLOCK_OFFSET + 1024 {
            return Err(bad(format!(
                "{} bytes is too small to hold an ext4 filesystem",
                dev.size()
            )));
        }
        dev.read_exact_at(&mut sb, SUPERBLOCK_OFFSET)
            .map_err(|e| Error::io(&name, e))?;
        let magic = le16(&sb, 0x38);
        if magic != MAGIC {
            return Err(bad(format!(
                "no ext2/3/4 superblock (magic {magic:#06X} at byte 1080, expected {MAGIC:#06X})"
            )));
        }
        let inodes_count = le32(&sb, 0x0);
        let first_data_block = u64::from(le32(&sb, 0x14));
        let log_block_size = le32(&sb, 0x18);
        if log_block_size > 6 {
            return Err(bad(format!("block size 1024 << {log_block_size}")));
        }
        let block_size = 1024u64 << log_block_size;
        let blocks_per_group = u64::from(le32(&sb, 0x20));
        let inodes_per_group = le32(&sb, 0x28);
        let rev_level = le32(&sb, 0x4C);
        let inode_size = if rev_level == 0 {
            128
        } else {
            u64::from(le16(&sb, 0x58))
        };
        let incompat = le32(&sb, 0x60);
        let is_64bit = incompat & INCOMPAT_64BIT != 0;
        let blocks_count = u64::from(le32(&sb, 0x4))
            | if is_64bit {
                u64::from(le32(&sb, 0x150)) << 32
            } else {
                0
            };
        for (flag, what) in [
            (INCOMPAT_COMPRESSION, "compression"),
            (INCOMPAT_META_BG, "meta_bg"),
            (INCOMPAT_ENCRYPT, "encryption"),
        ] {
            if incompat & flag != 0 {
                return Err(Error::Invalid(format!(
                    "{name}: ext4 feature {what} is not supported by the prefetch reader"
                )));
            }
        }
        if blocks_per_group == 0 || inodes_per_group == 0 {
            return Err(bad("zero blocks or inodes per group".into()));
        }
        if !(128..=block_size).contains(&inode_size) || !inode_size.is_power_of_two() {
            return Err(bad(format!("inode size {inode_size}")));
        }
        if first_data_block >= blocks_count {
            return Err(bad(format!(
                "first data block {first_data_block} of {blocks_count}"
            )));
        }
        let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
        if groups.saturating_mul(u64::from(inodes_per_group)) < u64::from(inodes_count)
            || groups > (1 << 32)
        {
            return Err(bad(format!(
                "{groups} groups of {inodes_per_group} inodes cannot hold {inodes_count} inodes"
            )));
        }
        let desc_size = if is_64bit {
            u64::from(le16(&sb, 0xFE))
        } else {
            32
        };
        if !(32..=block_size).contains(&desc_size) || !desc_size.is_power_of_two() {
            return Err(bad(format!("group descriptor size {desc_size}")));
        }
        let table_bytes = groups * desc_size;
        let table_at = (first_data_block + 1) * block_size;
        if table_at
            .checked_add(table_bytes)
            .is_none_or(|end| end > dev.size())
        {
            return Err(bad(format!(
                "{groups} group descriptors do not fit in the device"
            )));
        }
        let mut table = vec![0u8; table_bytes as usize];
        dev.read_exact_at(&mut table, table_at)
            .map_err(|e| Error::io(&name, e))?;
        let inode_tables = table
            .chunks_exact(desc_size as usize)
            .map(|d| {
                let lo = u64::from(le32(d, 0x8));
                let hi = if desc_size >= 64 {
                    u64::from(le32(d, 0x28))
                } else {
                    0
                };
                lo | hi << 32
            })
            .collect();
        Ok(Ext4 {
            dev,
            name,
            block_size,
            blocks_count,
            inodes_count,
            inodes_per_group,
            inode_size,
            inode_tables,
            base: 0,
        })
    }

    /// Find the ext4 on a disk: the whole device, else the first primary
    /// MBR or GPT partition that holds one (VM images are partitioned).
    /// Byte ranges from [`Ext4::data_ranges`] are then offsets on `disk`.
    pub fn open_disk(disk: Source) -> Result<Ext4> {
        let whole = match Ext4::open(Arc::clone(&disk)) {
            Ok(fs) => return Ok(fs),
            Err(e) => e,
        };
        for (start, len) in partitions(&*disk) {
            let Ok(window) = Window::new(Arc::clone(&disk), start, len) else {
                continue;
            };
            if let Ok(mut fs) = Ext4::open(Arc::new(window)) {
                fs.base = start;
                fs.name = disk.name().to_string();
                return Ok(fs);
            }
        }
        Err(whole)
    }

    /// Byte offset of the filesystem on the disk it was opened from.
    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    fn corrupt(&self, problem: String) -> Error {
        Error::corrupt(&self.name, format!("ext4: {problem}"))
    }

    fn read_block(&self, block: u64, buf: &mut [u8]) -> Result<()> {
        if block == 0 || block >= self.blocks_count {
            return Err(self.corrupt(format!(
                "block {block} is outside the filesystem ({} blocks)",
                self.blocks_count
            )));
        }
        self.dev
            .read_exact_at(buf, block * self.block_size)
            .map_err(|e| Error::io(&self.name, e))
    }

    /// Read inode `ino`.
    pub fn inode(&self, ino: u32) -> Result<Inode> {
        if ino == 0 || ino > self.inodes_count {
            return Err(self.corrupt(format!("inode {ino} is outside 1..={}", self.inodes_count)));
        }
        let group = ((ino - 1) / self.inodes_per_group) as usize;
        let index = u64::from((ino - 1) % self.inodes_per_group);
        let table = *self
            .inode_tables
            .get(group)
            .ok_or_else(|| self.corrupt(format!("inode {ino} is in missing group {group}")))?;
        let mut raw = [0u8; 160];
        let at = table
            .checked_mul(self.block_size)
            .and_then(|t| t.checked_add(index * self.inode_size))
            .filter(|&at| table != 0 && at + 128 <= self.dev.size())
            .ok_or_else(|| {
                self.corrupt(format!(
                    "inode table of group {group} at block {table} is outside the device"
                ))
            })?;
        self.dev
            .read_exact_at(&mut raw[..128], at)
            .map_err(|e| Error::io(&self.name, e))?;
        let mode = le16(&raw, 0);
        let kind = match mode & 0xF000 {
            0x8000 => FileKind::Regular,
            0x4000 => FileKind::Directory,
            0xA000 => FileKind::Symlink,
            _ => FileKind::Other,
        };
        let size = u64::from(le32(&raw, 0x4)) | u64::from(le32(&raw, 0x6C)) << 32;
        let mut block = [0u8; 60];
        block.copy_from_slice(&raw[0x28..0x28 + 60]);
        Ok(Inode {
            ino,
            kind,
            size,
            flags: le32(&raw, 0x20),
            block,
        })
    }

    /// Where `inode`'s data blocks are, in file order. Holes and
    /// uninitialized (reads-as-zero) extents are left out; a file whose data
    /// sits inside its inode (inline data, fast symlinks) has none.
    pub fn extents(&self, inode: &Inode) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        if inode.flags & FLAG_INLINE_DATA != 0 || self.is_fast_symlink(inode) {
            return Ok(out);
        }
        if inode.flags & FLAG_EXTENTS != 0 {
            let mut seen = HashSet::new();
            self.walk_extent_node(inode, &inode.block, None, &mut seen, &mut out)?;
        } else if inode.kind != FileKind::Other {
            self.walk_block_map(inode, &mut out)?;
        }
        Ok(out)
    }

    fn is_fast_symlink(&self, inode: &Inode) -> bool {
        inode.kind == FileKind::Symlink && inode.size < 60 && inode.flags & FLAG_EXTENTS == 0
    }

    fn walk_extent_node(
        &self,
        inode: &Inode,
        node: &[u8],
        expect_depth: Option<u16>,
        seen: &mut HashSet<u64>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let bad =
            |problem: &str| self.corrupt(format!("inode {}: extent tree: {problem}", inode.ino));
        if node.len() < 12 || le16(node, 0) != EXTENT_MAGIC {
            return Err(bad("bad node magic"));
        }
        let entries = usize::from(le16(node, 2));
        let depth = le16(node, 6);
        if depth > MAX_EXTENT_DEPTH || expect_depth.is_some_and(|d| d != depth) {
            return Err(bad(&format!("node depth {depth} out of place")));
        }
        if 12 + entries * 12 > node.len() {
            return Err(bad(&format!("{entries} entries overflow the node")));
        }
        for e in node[12..12 + entries * 12].chunks_exact(12) {
            let logical = u64::from(le32(e, 0));
            if depth == 0 {
                let raw_len = u64::from(le16(e, 4));
                let physical = u64::from(le16(e, 6)) << 32 | u64::from(le32(e, 8));
                if raw_len > 32768 {
                    continue; // uninitialized: reads as zeros, nothing on disk
                }
                if physical
                    .checked_add(raw_len)
                    .is_none_or(|end| end > self.blocks_count)
                {
                    return Err(bad(&format!(
                        "extent {physical}+{raw_len} passes the end of the filesystem"
                    )));
                }
                push_extent(
                    out,
                    Extent {
                        logical,
                        physical,
                        len: raw_len,
                    },
                );
            } else {
                let child = u64::from(le32(e, 4)) | u64::from(le16(e, 8)) << 32;
                if !seen.insert(child) {
                    return Err(bad(&format!("node block {child} is referenced twice")));
                }
                let mut block = vec![0u8; self.block_size as usize];
                self.read_block(child, &mut block)?;
                self.walk_extent_node(inode, &block, Some(depth - 1), seen, out)?;
            }
        }
        Ok(())
    }

    /// ext2/3-style direct and indirect block pointers.
    fn walk_block_map(&self, inode: &Inode, out: &mut Vec<Extent>) -> Result<()> {
        let file_blocks = inode.size.div_ceil(self.block_size);
        let per_block = self.block_size / 4;
        let mut logical = 0u64;
        for slot in 0..15 {
            if logical >= file_blocks {
                break;
            }
            let ptr = u64::from(le32(&inode.block, slot * 4));
            let level = slot.saturating_sub(11) as u32; // 0 direct, 1..=3 indirect
            let span = per_block.pow(level);
            if ptr != 0 {
                self.walk_map_level(ptr, level, logical, file_blocks, out)?;
            }
            logical += span;
        }
        Ok(())
    }

    fn walk_map_level(
        &self,
        ptr: u64,
        level: u32,
        logical: u64,
        file_blocks: u64,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        if ptr >= self.blocks_count {
            return Err(self.corrupt(format!("block pointer {ptr} is outside the filesystem")));
        }
        if level == 0 {
            push_extent(
                out,
                Extent {
                    logical,
                    physical: ptr,
                    len: 1,
                },
            );
            return Ok(());
        }
        let mut block = vec![0u8; self.block_size as usize];
        self.read_block(ptr, &mut block)?;
        let span = (self.block_size / 4).pow(level - 1);
        for (i, p) in block.chunks_exact(4).enumerate() {
            let at = logical + i as u64 * span;
            if at >= file_blocks {
                break;
            }
            let child = u64::from(le32(p, 0));
            if child != 0 {
                self.walk_map_level(child, level - 1, at, file_blocks, out)?;
            }
        }
        Ok(())
    }

    /// Byte ranges `(offset, length)` of the disk holding `inode`'s data, in
    /// file order, the last one cut at the file size rounded up to 512 bytes.
    pub fn data_ranges(&self, inode: &Inode) -> Result<Vec<(u64, u64)>> {
        let bs = self.block_size;
        let end = inode.size.div_ceil(512) * 512;
        Ok(self
            .extents(inode)?
            .into_iter()
            .filter_map(|e| {
                let start = e.logical * bs;
                let len = (e.len * bs).min(end.saturating_sub(start));
                (len > 0).then_some((self.base + e.physical * bs, len))
            })
            .collect())
    }

    /// Read all of a file's data (at most `limit` bytes, else an error).
    pub fn read_file(&self, inode: &Inode, limit: u64) -> Result<Vec<u8>> {
        if inode.size > limit {
            return Err(self.corrupt(format!(
                "inode {} is {} bytes, more than the {limit} this reader accepts here",
                inode.ino, inode.size
            )));
        }
        let mut data = vec![0u8; inode.size as usize];
        if inode.flags & FLAG_INLINE_DATA != 0 || self.is_fast_symlink(inode) {
            let n = data.len().min(60);
            data[..n].copy_from_slice(&inode.block[..n]);
            data.truncate(n);
            return Ok(data);
        }
        let bs = self.block_size;
        let mut block = vec![0u8; bs as usize];
        for e in self.extents(inode)? {
            for i in 0..e.len {
                let start = (e.logical + i) * bs;
                if start >= inode.size {
                    break;
                }
                self.read_block(e.physical + i, &mut block)?;
                let n = (inode.size - start).min(bs) as usize;
                data[start as usize..start as usize + n].copy_from_slice(&block[..n]);
            }
        }
        Ok(data)
    }

    /// The entries of directory `dir` (without `.` and `..`).
    pub fn read_dir(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        if dir.kind != FileKind::Directory {
            return Err(Error::Invalid(format!(
                "{}: inode {} is not a directory",
                self.name, dir.ino
            )));
        }
        let data = self.read_file(dir, MAX_DIR_BYTES)?;
        let mut entries = Vec::new();
        if dir.flags & FLAG_INLINE_DATA != 0 {
            // 4 bytes of parent inode, then entries.
            parse_dir_block(data.get(4..).unwrap_or(&[]), &mut entries);
        } else {
            for block in data.chunks(self.block_size as usize) {
                parse_dir_block(block, &mut entries);
            }
        }
        Ok(entries)
    }

    /// Resolve an absolute path inside the filesystem, following symlinks
    /// (absolute ones relative to this filesystem's root).
    pub fn lookup(&self, path: &Path) -> Result<Inode> {
        let not_found = || {
            Error::io(
                format!("{}: {}", self.name, path.display()),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        };
        let mut todo: VecDeque<Vec<u8>> = components(path);
        let mut chain: Vec<Inode> = vec![self.inode(ROOT_INO)?];
        let mut links = 0;
        while let Some(name) = todo.pop_front() {
            let here = chain.last().expect("chain holds the root");
            if name == b".." {
                if chain.len() > 1 {
                    chain.pop();
                }
                continue;
            }
            if here.kind != FileKind::Directory {
                return Err(not_found());
            }
            let entry = self
                .read_dir(here)?
                .into_iter()
                .find(|e| e.name == name)
                .ok_or_else(not_found)?;
            let inode = self.inode(entry.ino)?;
            if inode.kind == FileKind::Symlink {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Error::Invalid(format!(
                        "{}: {}: too many levels of symbolic links",
                        self.name,
                        path.display()
                    )));
                }
                let target = self.read_file(&inode, 4096)?;
                if target.first() == Some(&b'/') {
                    chain.truncate(1);
                }
                let mut parts = components(Path::new(std::ffi::OsStr::from_bytes(&target)));
                parts.extend(todo);
                todo = parts;
            } else {
                chain.push(inode);
            }
        }
        Ok(chain.pop().expect("chain holds the root"))
    }

    /// Every regular file under directory `dir` (recursively, not following
    /// symlinks), with its path below `prefix`.
    pub fn walk(&self, dir: &Inode, prefix: &Path) -> Result<Vec<(PathBuf, Inode)>> {
        let mut files = Vec::new();
        let mut seen = HashSet::from([dir.ino]);
        let mut queue = VecDeque::from([(prefix.to_path_buf(), dir.clone())]);
        while let Some((path, dir)) = queue.pop_front() {
            for entry in self.read_dir(&dir)? {
                let inode = self.inode(entry.ino)?;
                let child = path.join(std::ffi::OsStr::from_bytes(&entry.name));
                match inode.kind {
                    FileKind::Directory if seen.insert(inode.ino) => {
                        queue.push_back((child, inode));
                    }
                    FileKind::Regular => files.push((child, inode)),
                    _ => {}
                }
            }
        }
        Ok(files)
    }

    /// A path for every inode reachable from the root (the first found,
    /// breadth first); directories included.
    pub fn inode_paths(&self) -> Result<HashMap<u32, PathBuf>> {
        let root = self.inode(ROOT_INO)?;
        let mut paths = HashMap::from([(ROOT_INO, PathBuf::from("/"))]);
        let mut queue = VecDeque::from([(PathBuf::from("/"), root)]);
        while let Some((path, dir)) = queue.pop_front() {
            for entry in self.read_dir(&dir)? {
                if paths.contains_key(&entry.ino) {
                    continue;
                }
                let child = path.join(std::ffi::OsStr::from_bytes(&entry.name));
                paths.insert(entry.ino, child.clone());
                let inode = self.inode(entry.ino)?;
                if inode.kind == FileKind::Directory {
                    queue.push_back((child, inode));
                }
            }
        }
        Ok(paths)
    }
}

/// Partitions `(start, length)` in bytes from an MBR (primary entries) or
/// a GPT (512-byte sectors; entries bounded), in table order. Garbage
/// yields nothing.
fn partitions(disk: &dyn ReadAt) -> Vec<(u64, u64)> {
    let mut sector = [0u8; 512];
    if disk.read_exact_at(&mut sector, 0).is_err() || sector[510..512] != [0x55, 0xAA] {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut header = [0u8; 512];
    if disk.read_exact_at(&mut header, 512).is_ok() && &header[..8] == b"EFI PART" {
        let entries_at = u64::from_le_bytes(header[72..80].try_into().unwrap_or_default());
        let count = le32(&header, 80).min(1024) as usize;
        let size = le32(&header, 84) as usize;
        if (128..=4096).contains(&size) {
            let mut table = vec![0u8; count * size];
            if entries_at
                .checked_mul(512)
                .is_some_and(|at| disk.read_exact_at(&mut table, at).is_ok())
            {
                for entry in table.chunks_exact(size) {
                    let first = u64::from_le_bytes(entry[32..40].try_into().unwrap_or_default());
                    let last = u64::from_le_bytes(entry[40..48].try_into().unwrap_or_default());
                    if entry[..16].iter().any(|&b| b != 0) && first > 0 && last >= first {
                        if let (Some(start), Some(len)) =
                            (first.checked_mul(512), (last - first + 1).checked_mul(512))
                        {
                            out.push((start, len));
                        }
                    }
                }
            }
        }
        return out;
    }
    for entry in sector[446..510].chunks_exact(16) {
        let kind = entry[4];
        let start = u64::from(le32(entry, 8)) * 512;
        let len = u64::from(le32(entry, 12)) * 512;
        if kind != 0 && !matches!(kind, 0x05 | 0x0F | 0x85 | 0xEE) && start > 0 && len > 0 {
            out.push((start, len));
        }
    }
    out
}

/// The normal components of `path` as bytes (`.` dropped, `..` kept).
fn components(path: &Path) -> VecDeque<Vec<u8>> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.as_bytes().to_vec()),
            Component::ParentDir => Some(b"..".to_vec()),
            _ => None,
        })
        .collect()
}

/// Append a block run, merging it into the previous one when contiguous.
fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        if last.logical + last.len == e.logical && last.physical + last.len == e.physical {
            last.len += e.len;
            return;
        }
    }
    out.push(e);
}

/// Linear directory entries of one block. htree index blocks and checksum
/// tails look like entries with inode 0, so a linear scan sees every name.
fn parse_dir_block(block: &[u8], out: &mut Vec<DirEntry>) {
    let mut at = 0usize;
    while at + 8 <= block.len() {
        let ino = le32(block, at);
        let rec_len = usize::from(le16(block, at + 4));
        let name_len = usize::from(block[at + 6]);
        if rec_len < 8 || at + rec_len > block.len() || 8 + name_len > rec_len {
            break; // corrupt rest of block: skip it
        }
        let name = &block[at + 8..at + 8 + name_len];
        if ino != 0 && name != b"." && name != b".." && !name.is_empty() {
            out.push(DirEntry {
                name: name.to_vec(),
                ino,
            });
        }
        at += rec_len;
    }
}
