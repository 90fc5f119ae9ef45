//! A small safe layer over libext2fs: make or open an ext4 on a
//! [`BlockDevice`], and the handful of inode and directory operations that
//! applying a layer needs. Every call that can fail returns an [`Error`]
//! naming the operation, the libext2fs message and, when the cause was the
//! device, the device's own error.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io::Read;
use std::ptr;
use std::sync::{Arc, Once};

use crate::io_manager::{manager, BlockDevice, Registration};
use crate::sys;
use crate::{Error, Result};

pub type Ino = u32;
pub const ROOT: Ino = sys::EXT2_ROOT_INO;

/// File type bits of `i_mode`.
pub const S_IFMT: u16 = 0o170000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFLNK: u16 = 0o120000;
pub const S_IFCHR: u16 = 0o020000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFIFO: u16 = 0o010000;

pub(crate) const BLOCK_SIZE: u32 = 4096;
/// Bytes of disk per inode when making a file system: 4,194,304 inodes
/// for 64 GiB, as the reference's `--mkfs`.
const BYTES_PER_INODE: u64 = 16384;
/// Smallest file system `mkfs` makes (libext2fs needs room for its tables).
pub const MIN_FS_SIZE: u64 = 16 << 20;

/// Owner, permissions and time of an inode (what a tar header states).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attrs {
    /// Permission bits with setuid, setgid and sticky (`0o7777` mask).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch; atime, ctime and mtime all get it.
    pub mtime: i64,
}

/// An extended attribute: full name (`user.x`, `security.capability`) and value.
pub type Xattr = (Vec<u8>, Vec<u8>);

/// One directory entry as stored.
pub(crate) struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    /// `EXT2_FT_*`.
    pub file_type: u8,
}

/// What kind of special file [`Ext4::mknod`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
}

/// An ext4 file system open for writing through libext2fs.
pub struct Ext4 {
    pub(crate) fs: sys::ext2_filsys,
    registration: Registration,
    /// File data passes through here (kept: a fresh 1 MiB buffer per file
    /// would be zeroed thousands of times per layer).
    buffer: Vec<u8>,
    /// Directories that grew past their first block here: hash-indexed at
    /// [`Ext4::close`] (see `htree`).
    pub(crate) grown: std::collections::BTreeSet<Ino>,
    /// Directories names were added to here: the unused bytes of their
    /// entries are zeroed at [`Ext4::close`].
    linked: std::collections::BTreeSet<Ino>,
}

/// File data is copied in pieces of this size.
const COPY_CHUNK: usize = 1 << 20;

// SAFETY: the handle is used by one thread at a time (&mut self for
// changes); libext2fs keeps no thread-local state for it.
unsafe impl Send for Ext4 {}

fn error_table() {
    static ONCE: Once = Once::new();
    // SAFETY: registers libext2fs's messages with com_err, once.
    ONCE.call_once(|| unsafe { sys::initialize_ext2_error_table() });
}

fn describe(code: sys::errcode_t) -> String {
    error_table();
    // SAFETY: com_err returns a static or thread-local NUL-terminated string.
    let text = unsafe { CStr::from_ptr(sys::error_message(code)) };
    text.to_string_lossy().into_owned()
}

fn cname(name: &[u8]) -> Result<CString> {
    CString::new(name).map_err(|_| {
        Error::Invalid(format!(
            "name {:?} holds a NUL byte",
            String::from_utf8_lossy(name)
        ))
    })
}

fn large_inode() -> sys::ext2_inode_large {
    // SAFETY: a plain C struct of integers; all zeros is a valid value.
    unsafe { std::mem::zeroed() }
}

const LARGE: c_int = std::mem::size_of::<sys::ext2_inode_large>() as c_int;
const EXTRA_ISIZE: u16 = (std::mem::size_of::<sys::ext2_inode_large>() - 128) as u16;

fn as_inode(inode: &mut sys::ext2_inode_large) -> *mut sys::ext2_inode {
    inode as *mut sys::ext2_inode_large as *mut sys::ext2_inode
}

pub fn file_type(mode: u16) -> u16 {
    mode & S_IFMT
}

fn dirent_type(mode: u16) -> c_int {
    (match file_type(mode) {
        S_IFREG => sys::EXT2_FT_REG_FILE,
        S_IFDIR => sys::EXT2_FT_DIR,
        S_IFLNK => sys::EXT2_FT_SYMLINK,
        S_IFCHR => sys::EXT2_FT_CHRDEV,
        S_IFBLK => sys::EXT2_FT_BLKDEV,
        S_IFIFO => sys::EXT2_FT_FIFO,
        _ => sys::EXT2_FT_UNKNOWN,
    }) as c_int
}

impl Ext4 {
    /// A file system libext2fs has just opened or made, its clock fixed
    /// (see [`Ext4::fix_clock`]).
    fn from_handle(fs: sys::ext2_filsys, registration: Registration) -> Ext4 {
        let mut this = Ext4 {
            fs,
            registration,
            buffer: Vec::new(),
            grown: Default::default(),
            linked: Default::default(),
        };
        this.fix_clock();
        this
    }

    /// Make a new, empty ext4 of `size` bytes on `device` (which must read
    /// as zeros): 4 KiB blocks, 256-byte inodes, one inode per 16 KiB,
    /// extents, 64bit, flex_bg, dir_index, no journal (the image is
    /// written offline and mounted read-only), root and lost+found.
    pub fn mkfs(device: Arc<dyn BlockDevice>, size: u64) -> Result<Ext4> {
        error_table();
        if size < MIN_FS_SIZE || size > device.size() {
            return Err(Error::Invalid(format!(
                "a file system of {size} bytes does not fit: at least {MIN_FS_SIZE} bytes, at most the disk's {}",
                device.size()
            )));
        }
        let registration = Registration::new(device);
        // SAFETY: a plain C struct; libext2fs reads the fields set here.
        let mut param: sys::ext2_super_block = unsafe { std::mem::zeroed() };
        let blocks = size / BLOCK_SIZE as u64;
        // SAFETY: `param` is a valid superblock struct.
        unsafe { sys::ext2fs_blocks_count_set(&mut param, blocks) };
        param.s_log_block_size = (BLOCK_SIZE / 1024).trailing_zeros();
        param.s_rev_level = sys::EXT2_DYNAMIC_REV;
        param.s_inode_size = 256;
        param.s_inodes_count = (size / BYTES_PER_INODE).min(u32::MAX as u64) as u32;
        param.s_log_groups_per_flex = 4;
        param.s_feature_compat = sys::EXT2_FEATURE_COMPAT_EXT_ATTR
            | sys::EXT2_FEATURE_COMPAT_RESIZE_INODE
            | sys::EXT2_FEATURE_COMPAT_DIR_INDEX;
        param.s_feature_incompat = sys::EXT2_FEATURE_INCOMPAT_FILETYPE
            | sys::EXT3_FEATURE_INCOMPAT_EXTENTS
            | sys::EXT4_FEATURE_INCOMPAT_64BIT
            | sys::EXT4_FEATURE_INCOMPAT_FLEX_BG;
        param.s_feature_ro_compat = sys::EXT2_FEATURE_RO_COMPAT_SPARSE_SUPER
            | sys::EXT2_FEATURE_RO_COMPAT_LARGE_FILE
            | sys::EXT4_FEATURE_RO_COMPAT_HUGE_FILE
            | sys::EXT4_FEATURE_RO_COMPAT_DIR_NLINK
            | sys::EXT4_FEATURE_RO_COMPAT_EXTRA_ISIZE;
        param.s_desc_size = sys::EXT2_MIN_DESC_SIZE_64BIT as u16;
        let mut fs: sys::ext2_filsys = ptr::null_mut();
        // SAFETY: valid name, param and out pointer.
        let code = unsafe {
            sys::ext2fs_initialize(
                registration.name().as_ptr(),
                sys::EXT2_FLAG_64BITS as c_int,
                &mut param,
                manager(),
                &mut fs,
            )
        };
        if code != 0 {
            return Err(fs_error("ext2fs_initialize", code, &registration));
        }
        let mut this = Ext4::from_handle(fs, registration);
        // SAFETY: live handle; its superblock is ours to edit.
        unsafe {
            let sb = &mut *(*fs).super_;
            let now = (*fs).now as u32;
            sb.s_mkfs_time = now;
            sb.s_lastcheck = now;
            sb.s_wtime = now;
            sb.s_mkfs_time_hi = 0;
            sb.s_lastcheck_hi = 0;
            sb.s_wtime_hi = 0;
        }
        this.lay_out()?;
        Ok(this)
    }

    /// What mke2fs does after `ext2fs_initialize`, minus zeroing the inode
    /// tables (a fresh device reads as zeros).
    fn lay_out(&mut self) -> Result<()> {
        let fs = self.fs;
        // SAFETY: `fs` is a live handle; the superblock is ours to edit.
        unsafe {
            let sb = &mut *(*fs).super_;
            sb.s_def_hash_version = sys::EXT2_HASH_HALF_MD4 as u8;
            // How this machine's C compiler hashes names with high bytes.
            sb.s_flags |= if (c_char::MIN as i32) < 0 {
                sys::EXT2_FLAGS_SIGNED_HASH
            } else {
                sys::EXT2_FLAGS_UNSIGNED_HASH
            };
            sb.s_max_mnt_count = -1;
            sb.s_errors = sys::EXT2_ERRORS_CONTINUE as u16;
        }
        self.check("ext2fs_allocate_tables", unsafe {
            sys::ext2fs_allocate_tables(fs)
        })?;
        // The root directory, owned by root.
        self.check("ext2fs_mkdir /", unsafe {
            sys::ext2fs_mkdir(fs, ROOT, ROOT, ptr::null())
        })?;
        // lost+found, 16 KiB as mke2fs makes it (e2fsck wants it to exist).
        let name = c"lost+found";
        self.check("ext2fs_mkdir lost+found", unsafe {
            sys::ext2fs_mkdir(fs, ROOT, 0, name.as_ptr())
        })?;
        let lpf = self
            .lookup(ROOT, b"lost+found")?
            .ok_or_else(|| Error::Fs("lost+found vanished after mkdir".into()))?;
        for _ in 1..(16384 / BLOCK_SIZE) {
            self.check("ext2fs_expand_dir lost+found", unsafe {
                sys::ext2fs_expand_dir(fs, lpf)
            })?;
        }
        // Inodes below the first usable one are reserved; the bad blocks
        // inode exists (empty).
        // SAFETY: live handle; inode numbers in range.
        unsafe {
            let first = (*(*fs).super_).s_first_ino;
            for ino in (ROOT + 1)..first {
                sys::ext2fs_inode_alloc_stats2(fs, ino, 1, 0);
            }
            sys::ext2fs_inode_alloc_stats2(fs, sys::EXT2_BAD_INO, 1, 0);
        }
        self.check("ext2fs_update_bb_inode", unsafe {
            sys::ext2fs_update_bb_inode(fs, ptr::null_mut())
        })?;
        self.check("ext2fs_create_resize_inode", unsafe {
            sys::ext2fs_create_resize_inode(fs)
        })?;
        Ok(())
    }

    /// Open the ext4 already on `device` for writing.
    pub fn open(device: Arc<dyn BlockDevice>) -> Result<Ext4> {
        error_table();
        let registration = Registration::new(device);
        let mut fs: sys::ext2_filsys = ptr::null_mut();
        // SAFETY: valid name and out pointer.
        let code = unsafe {
            sys::ext2fs_open2(
                registration.name().as_ptr(),
                ptr::null(),
                (sys::EXT2_FLAG_RW | sys::EXT2_FLAG_64BITS) as c_int,
                0,
                0,
                manager(),
                &mut fs,
            )
        };
        if code != 0 {
            return Err(match fs_error("ext2fs_open", code, &registration) {
                Error::Fs(text) => Error::Fs(format!(
                    "{text}: the lower layers do not hold an ext4 file system (use --mkfs for a first layer)"
                )),
                other => other,
            });
        }
        let this = Ext4::from_handle(fs, registration);
        // SAFETY: live handle.
        let (incompat, ro) = unsafe {
            let sb = &*(*fs).super_;
            (sb.s_feature_incompat, sb.s_feature_ro_compat)
        };
        if incompat & sys::EXT3_FEATURE_INCOMPAT_RECOVER != 0 {
            return Err(Error::Fs(
                "the file system's journal needs recovery (it was not unmounted cleanly); run e2fsck on it first".into(),
            ));
        }
        // Inline data, encryption and case folding change how names and
        // small files are stored; bigalloc how blocks are counted.
        let unsupported_incompat = incompat
            & (sys::EXT4_FEATURE_INCOMPAT_INLINE_DATA
                | sys::EXT4_FEATURE_INCOMPAT_ENCRYPT
                | sys::EXT4_FEATURE_INCOMPAT_CASEFOLD);
        if unsupported_incompat != 0 || ro & sys::EXT4_FEATURE_RO_COMPAT_BIGALLOC != 0 {
            return Err(Error::Fs(format!(
                "the file system uses features obd apply does not write (incompat {unsupported_incompat:#x}, ro_compat {ro:#x})"
            )));
        }
        this.check("ext2fs_read_bitmaps", unsafe {
            sys::ext2fs_read_bitmaps(fs)
        })?;
        Ok(this)
    }

    /// The time libext2fs stamps on what it makes itself (the superblock,
    /// root and lost+found): `SOURCE_DATE_EPOCH` if set, else 1 (0 would
    /// mean "read the clock"). Never the clock, so the same layers give
    /// byte-identical output (and the same registry digests).
    fn fix_clock(&mut self) {
        let epoch = std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|&t| t > 0)
            .unwrap_or(1);
        // SAFETY: live handle; `now` is a plain field libext2fs reads.
        unsafe { (*self.fs).now = epoch as sys::time_t };
    }

    /// Hash-index the directories that grew past one block, write back the
    /// superblock, group descriptors and bitmaps, and flush.
    pub fn close(mut self) -> Result<()> {
        for dir in std::mem::take(&mut self.grown) {
            self.index_dir(dir)?;
        }
        for dir in std::mem::take(&mut self.linked) {
            self.zero_unused_entry_bytes(dir)?;
        }
        let fs = std::mem::replace(&mut self.fs, ptr::null_mut());
        // SAFETY: live handle, freed by ext2fs_close2 whatever it returns.
        let code = unsafe { sys::ext2fs_close2(fs, 0) };
        if code != 0 {
            return Err(fs_error("ext2fs_close", code, &self.registration));
        }
        Ok(())
    }

    pub(crate) fn check(&self, what: &str, code: sys::errcode_t) -> Result<()> {
        if code == 0 {
            Ok(())
        } else {
            Err(fs_error(what, code, &self.registration))
        }
    }

    /// The inode `name` in directory `dir`, if there is one.
    pub fn lookup(&self, dir: Ino, name: &[u8]) -> Result<Option<Ino>> {
        let mut ino = 0;
        // SAFETY: live handle; name pointer + length.
        let code = unsafe {
            sys::ext2fs_lookup(
                self.fs,
                dir,
                name.as_ptr() as *const c_char,
                name.len() as c_int,
                ptr::null_mut(),
                &mut ino,
            )
        };
        match code {
            0 => Ok(Some(ino)),
            c if c == sys::EXT2_ET_FILE_NOT_FOUND as sys::errcode_t => Ok(None),
            c => Err(fs_error(
                &format!("lookup of {}", String::from_utf8_lossy(name)),
                c,
                &self.registration,
            )),
        }
    }

    pub fn read_inode(&self, ino: Ino) -> Result<sys::ext2_inode_large> {
        let mut inode = large_inode();
        self.check("ext2fs_read_inode", unsafe {
            sys::ext2fs_read_inode_full(self.fs, ino, as_inode(&mut inode), LARGE)
        })?;
        Ok(inode)
    }

    pub(crate) fn write_inode(
        &mut self,
        ino: Ino,
        inode: &mut sys::ext2_inode_large,
    ) -> Result<()> {
        self.check("ext2fs_write_inode", unsafe {
            sys::ext2fs_write_inode_full(self.fs, ino, as_inode(inode), LARGE)
        })
    }

    /// `i_mode` of an inode.
    pub fn mode(&self, ino: Ino) -> Result<u16> {
        Ok(self.read_inode(ino)?.i_mode)
    }

    /// Retry `op` after growing `dir` while it reports the directory full.
    fn with_room(
        &mut self,
        dir: Ino,
        what: &str,
        mut op: impl FnMut(&mut Self) -> sys::errcode_t,
    ) -> Result<()> {
        for _ in 0..64 {
            let code = op(self);
            if code != sys::EXT2_ET_DIR_NO_SPACE as sys::errcode_t {
                return self.check(what, code);
            }
            self.check("ext2fs_expand_dir", unsafe {
                sys::ext2fs_expand_dir(self.fs, dir)
            })?;
            self.grown.insert(dir);
        }
        Err(Error::Fs(format!(
            "{what}: the directory stays full after growing it"
        )))
    }

    fn new_ino(&mut self, dir: Ino, mode: u16) -> Result<Ino> {
        let mut ino = 0;
        self.check("ext2fs_new_inode", unsafe {
            sys::ext2fs_new_inode(self.fs, dir, mode as c_int, ptr::null_mut(), &mut ino)
        })?;
        Ok(ino)
    }

    fn link_raw(&mut self, dir: Ino, name: &CString, ino: Ino, mode: u16) -> Result<()> {
        self.linked.insert(dir);
        let fs = self.fs;
        self.with_room(dir, "ext2fs_link", |_| unsafe {
            sys::ext2fs_link(fs, dir, name.as_ptr(), ino, dirent_type(mode))
        })
    }

    /// Set owner, permission bits and times of `ino`, keeping its type.
    pub fn set_attrs(&mut self, ino: Ino, attrs: &Attrs) -> Result<()> {
        let mut inode = self.read_inode(ino)?;
        apply_attrs(&mut inode, attrs);
        self.write_inode(ino, &mut inode)
    }

    /// A new directory `name` in `dir`.
    pub fn mkdir(&mut self, dir: Ino, name: &[u8], attrs: &Attrs) -> Result<Ino> {
        let cname = cname(name)?;
        let ino = self.new_ino(dir, S_IFDIR | 0o755)?;
        let fs = self.fs;
        self.with_room(dir, "ext2fs_mkdir", |_| unsafe {
            sys::ext2fs_mkdir(fs, dir, ino, cname.as_ptr())
        })?;
        self.set_attrs(ino, attrs)?;
        Ok(ino)
    }

    /// A new inode of `mode` (type and permissions) linked as `name` in `dir`.
    fn new_linked_inode(
        &mut self,
        dir: Ino,
        name: &[u8],
        mode: u16,
        attrs: &Attrs,
        fill: impl FnOnce(&mut sys::ext2_inode_large),
    ) -> Result<Ino> {
        let cname = cname(name)?;
        let ino = self.new_ino(dir, mode)?;
        self.link_raw(dir, &cname, ino, mode)?;
        // SAFETY: live handle; `ino` was free and is now linked.
        unsafe { sys::ext2fs_inode_alloc_stats2(self.fs, ino, 1, 0) };
        let mut inode = large_inode();
        inode.i_mode = mode;
        inode.i_links_count = 1;
        inode.i_extra_isize = EXTRA_ISIZE;
        apply_attrs(&mut inode, attrs);
        fill(&mut inode);
        // write_new_inode also clears the rest of the on-disk inode (an
        // old in-inode xattr area of a freed inode must not come back).
        self.check("ext2fs_write_new_inode", unsafe {
            sys::ext2fs_write_new_inode(self.fs, ino, as_inode(&mut inode))
        })?;
        self.write_inode(ino, &mut inode)?;
        Ok(ino)
    }

    /// A regular file `name` in `dir` holding what `data` yields. Blocks
    /// that are all zeros are left as holes. Returns the inode and size.
    pub fn create_file(
        &mut self,
        dir: Ino,
        name: &[u8],
        attrs: &Attrs,
        data: &mut dyn Read,
    ) -> Result<(Ino, u64)> {
        let extents = self.has_extents();
        let fs = self.fs;
        let ino =
            self.new_linked_inode(dir, name, S_IFREG | (attrs.mode & 0o7777), attrs, |inode| {
                if extents {
                    inode.i_flags |= sys::EXT4_EXTENTS_FL;
                }
            })?;
        if extents {
            // An empty extent tree header in i_block.
            let mut inode = self.read_inode(ino)?;
            let mut handle: sys::ext2_extent_handle_t = ptr::null_mut();
            self.check("ext2fs_extent_open", unsafe {
                sys::ext2fs_extent_open2(fs, ino, as_inode(&mut inode), &mut handle)
            })?;
            // SAFETY: handle from extent_open2.
            unsafe { sys::ext2fs_extent_free(handle) };
            self.write_inode(ino, &mut inode)?;
        }
        let size = self.write_data(ino, data)?;
        // The file code rewrote the inode; restore what the header says.
        self.set_attrs(ino, attrs)?;
        Ok((ino, size))
    }

    fn has_extents(&self) -> bool {
        // SAFETY: live handle.
        unsafe { (*(*self.fs).super_).s_feature_incompat & sys::EXT3_FEATURE_INCOMPAT_EXTENTS != 0 }
    }

    fn write_data(&mut self, ino: Ino, data: &mut dyn Read) -> Result<u64> {
        let mut file: sys::ext2_file_t = ptr::null_mut();
        self.check("ext2fs_file_open", unsafe {
            sys::ext2fs_file_open(self.fs, ino, sys::EXT2_FILE_WRITE as c_int, &mut file)
        })?;
        let result = self.copy_into(file, data);
        // SAFETY: `file` is open; closing writes its inode.
        let closed = unsafe { sys::ext2fs_file_close(file) };
        let size = result?;
        self.check("ext2fs_file_close", closed)?;
        Ok(size)
    }

    fn copy_into(&mut self, file: sys::ext2_file_t, data: &mut dyn Read) -> Result<u64> {
        let mut buf = std::mem::take(&mut self.buffer);
        buf.resize(COPY_CHUNK, 0);
        let result = self.copy_through(file, data, &mut buf);
        self.buffer = buf;
        result
    }

    fn copy_through(
        &mut self,
        file: sys::ext2_file_t,
        data: &mut dyn Read,
        buf: &mut [u8],
    ) -> Result<u64> {
        let block = BLOCK_SIZE as usize;
        let mut position = 0u64;
        loop {
            let filled = read_full(data, buf)?;
            if filled == 0 {
                break;
            }
            for piece in buf[..filled].chunks(block) {
                if piece.iter().all(|&b| b == 0) {
                    // A hole: move on without allocating.
                    position += piece.len() as u64;
                    continue;
                }
                let mut at = 0u64;
                self.check("ext2fs_file_llseek", unsafe {
                    sys::ext2fs_file_llseek(file, position, sys::EXT2_SEEK_SET as c_int, &mut at)
                })?;
                let mut written = 0;
                self.check("ext2fs_file_write", unsafe {
                    sys::ext2fs_file_write(
                        file,
                        piece.as_ptr() as *const c_void,
                        piece.len() as u32,
                        &mut written,
                    )
                })?;
                if written as usize != piece.len() {
                    return Err(Error::Fs(format!(
                        "short write into the file system: {written} of {} bytes",
                        piece.len()
                    )));
                }
                position += piece.len() as u64;
            }
            if filled < buf.len() {
                break;
            }
        }
        self.check("ext2fs_file_set_size", unsafe {
            sys::ext2fs_file_set_size2(file, position as i64)
        })?;
        Ok(position)
    }

    /// A symbolic link `name` in `dir` pointing at `target` (kept verbatim).
    pub fn symlink(&mut self, dir: Ino, name: &[u8], target: &[u8], attrs: &Attrs) -> Result<Ino> {
        if target.is_empty() || target.len() >= BLOCK_SIZE as usize {
            return Err(Error::Invalid(format!(
                "symlink target of {} bytes: ext4 holds 1 to {} bytes",
                target.len(),
                BLOCK_SIZE - 1
            )));
        }
        let cname = cname(name)?;
        let ctarget = cname_target(target)?;
        let ino = self.new_ino(dir, S_IFLNK | 0o777)?;
        let fs = self.fs;
        self.with_room(dir, "ext2fs_symlink", |_| unsafe {
            sys::ext2fs_symlink(fs, dir, ino, cname.as_ptr(), ctarget.as_ptr())
        })?;
        let symlink_attrs = Attrs {
            mode: 0o777,
            ..attrs.clone()
        };
        self.set_attrs(ino, &symlink_attrs)?;
        Ok(ino)
    }

    /// A device node or FIFO `name` in `dir`.
    pub fn mknod(&mut self, dir: Ino, name: &[u8], kind: Special, attrs: &Attrs) -> Result<Ino> {
        let (kind_bits, rdev) = match kind {
            Special::Char { major, minor } => (S_IFCHR, Some((major, minor))),
            Special::Block { major, minor } => (S_IFBLK, Some((major, minor))),
            Special::Fifo => (S_IFIFO, None),
        };
        if let Some((major, minor)) = rdev {
            if major > 0xfff || minor > 0xfffff {
                return Err(Error::Invalid(format!(
                    "device {major}:{minor} does not fit ext4's 12-bit major, 20-bit minor"
                )));
            }
        }
        self.new_linked_inode(
            dir,
            name,
            kind_bits | (attrs.mode & 0o7777),
            attrs,
            |inode| {
                if let Some((major, minor)) = rdev {
                    // The kernel's encoding: the old 8:8 form when it fits,
                    // else the new one in the second word.
                    if major < 256 && minor < 256 {
                        inode.i_block[0] = (major << 8) | minor;
                    } else {
                        inode.i_block[1] = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
                    }
                }
            },
        )
    }

    /// Another name `name` in `dir` for the non-directory inode `target`.
    pub fn hard_link(&mut self, dir: Ino, name: &[u8], target: Ino) -> Result<()> {
        let mut inode = self.read_inode(target)?;
        if file_type(inode.i_mode) == S_IFDIR {
            return Err(Error::Invalid("a hard link cannot name a directory".into()));
        }
        if inode.i_links_count == u16::MAX {
            return Err(Error::Invalid(
                "the link target has the most links ext4 allows".into(),
            ));
        }
        let cname = cname(name)?;
        self.link_raw(dir, &cname, target, inode.i_mode)?;
        inode = self.read_inode(target)?;
        inode.i_links_count += 1;
        self.write_inode(target, &mut inode)
    }

    /// Names and inodes of a directory's entries, without `.` and `..`.
    pub fn list(&self, dir: Ino) -> Result<Vec<(Vec<u8>, Ino)>> {
        Ok(self
            .entries(dir)?
            .into_iter()
            .filter(|e| e.name != b"." && e.name != b"..")
            .map(|e| (e.name, e.ino))
            .collect())
    }

    /// Zero the bytes after each name in directory `dir` up to the next
    /// entry: padding and free space. libext2fs leaves them as they were
    /// in its buffers, which, when it splits a hash-indexed leaf, is
    /// uninitialised memory: the same layer applied twice would give
    /// different bytes. The record of `..` is left alone: in an indexed
    /// directory it holds the htree root.
    fn zero_unused_entry_bytes(&mut self, dir: Ino) -> Result<()> {
        /// `DIRENT_DOT_DOT_FILE` and `DIRENT_CHANGED` of ext2fs.h.
        const DOT_DOT: c_int = 2;
        const CHANGED: c_int = 1;
        unsafe extern "C" fn zero(
            _dir: sys::ext2_ino_t,
            entry: c_int,
            dirent: *mut sys::ext2_dir_entry,
            offset: c_int,
            blocksize: c_int,
            _buf: *mut c_char,
            private: *mut c_void,
        ) -> c_int {
            // SAFETY: libext2fs passes a live entry inside a block of
            // `blocksize` bytes at `offset`; `private` is the handle.
            let fs = private as sys::ext2_filsys;
            let name_len = ((*dirent).name_len & 0xff) as usize;
            let padded = (8 + name_len).next_multiple_of(4);
            let mut rec_len: u32 = 0;
            if sys::ext2fs_get_rec_len(fs, dirent, &mut rec_len) != 0 {
                return 0;
            }
            let end = if entry == DOT_DOT {
                padded
            } else {
                rec_len as usize
            };
            let room = (blocksize - offset).max(0) as usize;
            if (*dirent).inode == 0 || end > room || padded > end {
                return 0;
            }
            let bytes = std::slice::from_raw_parts_mut(dirent as *mut u8, end);
            let unused = &mut bytes[8 + name_len..];
            if unused.iter().all(|&b| b == 0) {
                return 0;
            }
            unused.fill(0);
            CHANGED
        }
        let fs = self.fs;
        self.check("ext2fs_dir_iterate (zeroing unused entry bytes)", unsafe {
            sys::ext2fs_dir_iterate2(fs, dir, 0, ptr::null_mut(), Some(zero), fs as *mut c_void)
        })
    }

    /// Every entry of a directory, `.` and `..` included.
    pub(crate) fn entries(&self, dir: Ino) -> Result<Vec<DirEntry>> {
        unsafe extern "C" fn collect(
            _dir: sys::ext2_ino_t,
            _entry: c_int,
            dirent: *mut sys::ext2_dir_entry,
            _offset: c_int,
            _blocksize: c_int,
            _buf: *mut c_char,
            private: *mut c_void,
        ) -> c_int {
            // SAFETY: libext2fs passes a valid entry; `private` is our Vec.
            let out = &mut *(private as *mut Vec<DirEntry>);
            // The low byte is the length; the high one the file type.
            let len = ((*dirent).name_len & 0xff) as usize;
            let name = std::slice::from_raw_parts((*dirent).name.as_ptr() as *const u8, len);
            if (*dirent).inode != 0 {
                out.push(DirEntry {
                    name: name.to_vec(),
                    ino: (*dirent).inode,
                    file_type: ((*dirent).name_len >> 8) as u8,
                });
            }
            0
        }
        let mut out: Vec<DirEntry> = Vec::new();
        self.check("ext2fs_dir_iterate", unsafe {
            sys::ext2fs_dir_iterate2(
                self.fs,
                dir,
                0,
                ptr::null_mut(),
                Some(collect),
                &mut out as *mut _ as *mut c_void,
            )
        })?;
        Ok(out)
    }

    /// Remove `name` (inode `ino`) from `dir`, with everything under it.
    pub fn remove(&mut self, dir: Ino, name: &[u8], ino: Ino) -> Result<()> {
        let inode = self.read_inode(ino)?;
        let is_dir = file_type(inode.i_mode) == S_IFDIR;
        if is_dir {
            for (child, child_ino) in self.list(ino)? {
                self.remove(ino, &child, child_ino)?;
            }
        }
        let cname = cname(name)?;
        self.check("ext2fs_unlink", unsafe {
            sys::ext2fs_unlink(self.fs, dir, cname.as_ptr(), ino, 0)
        })?;
        if is_dir {
            // Its ".." no longer counts as a link to the parent.
            let mut parent = self.read_inode(dir)?;
            if parent.i_links_count > 2 {
                parent.i_links_count -= 1;
                self.write_inode(dir, &mut parent)?;
            }
            self.free_inode(ino)
        } else {
            let mut inode = self.read_inode(ino)?;
            if inode.i_links_count > 1 {
                inode.i_links_count -= 1;
                self.write_inode(ino, &mut inode)
            } else {
                self.free_inode(ino)
            }
        }
    }

    /// Release an unlinked inode: its xattr block, its data blocks, itself.
    fn free_inode(&mut self, ino: Ino) -> Result<()> {
        let mut inode = self.read_inode(ino)?;
        self.check("ext2fs_free_ext_attr", unsafe {
            sys::ext2fs_free_ext_attr(self.fs, ino, &mut inode)
        })?;
        let mut inode = self.read_inode(ino)?;
        // SAFETY: live handle, valid inode.
        let has_blocks =
            unsafe { sys::ext2fs_inode_has_valid_blocks2(self.fs, as_inode(&mut inode)) } != 0;
        if has_blocks {
            self.check("ext2fs_punch", unsafe {
                sys::ext2fs_punch(self.fs, ino, as_inode(&mut inode), ptr::null_mut(), 0, !0)
            })?;
            inode = self.read_inode(ino)?;
        }
        let is_dir = file_type(inode.i_mode) == S_IFDIR;
        // A free inode is all zeros, as mke2fs leaves them: e2fsck reads
        // a deleted inode's dtime as an orphan-list link when it is small,
        // and wants one when the mode is set.
        // SAFETY: live handle; the fs's inode size is at most 1024 bytes.
        let inode_size = unsafe { (*(*self.fs).super_).s_inode_size } as usize;
        let mut zeros = vec![0u8; inode_size.max(LARGE as usize)];
        self.check("ext2fs_write_inode", unsafe {
            sys::ext2fs_write_inode_full(
                self.fs,
                ino,
                zeros.as_mut_ptr() as *mut sys::ext2_inode,
                inode_size as c_int,
            )
        })?;
        // SAFETY: live handle; the inode is unlinked.
        unsafe { sys::ext2fs_inode_alloc_stats2(self.fs, ino, -1, is_dir as c_int) };
        Ok(())
    }

    /// Make `xattrs` the inode's whole set of extended attributes.
    pub fn set_xattrs(&mut self, ino: Ino, xattrs: &[Xattr]) -> Result<()> {
        let mut handle: *mut sys::ext2_xattr_handle = ptr::null_mut();
        self.check("ext2fs_xattrs_open", unsafe {
            sys::ext2fs_xattrs_open(self.fs, ino, &mut handle)
        })?;
        let result = self.replace_xattrs(handle, xattrs);
        // SAFETY: `handle` came from xattrs_open.
        let closed = unsafe { sys::ext2fs_xattrs_close(&mut handle) };
        result?;
        self.check("ext2fs_xattrs_close", closed)
    }

    fn replace_xattrs(
        &mut self,
        handle: *mut sys::ext2_xattr_handle,
        xattrs: &[Xattr],
    ) -> Result<()> {
        unsafe extern "C" fn names(
            name: *mut c_char,
            _value: *mut c_char,
            _len: usize,
            private: *mut c_void,
        ) -> c_int {
            // SAFETY: `private` is our Vec; `name` a C string.
            let out = &mut *(private as *mut Vec<CString>);
            out.push(CStr::from_ptr(name).to_owned());
            0
        }
        self.check("ext2fs_xattrs_read", unsafe {
            sys::ext2fs_xattrs_read(handle)
        })?;
        let mut old: Vec<CString> = Vec::new();
        self.check("ext2fs_xattrs_iterate", unsafe {
            sys::ext2fs_xattrs_iterate(handle, Some(names), &mut old as *mut _ as *mut c_void)
        })?;
        let wanted: Vec<(CString, &[u8])> = xattrs
            .iter()
            .map(|(name, value)| Ok((cname(name)?, value.as_slice())))
            .collect::<Result<_>>()?;
        for name in old {
            if wanted.iter().any(|(w, _)| *w == name) {
                continue;
            }
            self.check("ext2fs_xattr_remove", unsafe {
                sys::ext2fs_xattr_remove(handle, name.as_ptr())
            })?;
        }
        for (name, value) in &wanted {
            let code = unsafe {
                sys::ext2fs_xattr_set(
                    handle,
                    name.as_ptr(),
                    value.as_ptr() as *const c_void,
                    value.len(),
                )
            };
            if code != 0 {
                return Err(fs_error(
                    &format!("xattr {}", name.to_string_lossy()),
                    code,
                    &self.registration,
                ));
            }
        }
        Ok(())
    }

    /// The target of symlink `ino`.
    pub fn read_link(&self, ino: Ino) -> Result<Vec<u8>> {
        let mut inode = self.read_inode(ino)?;
        let size = inode.i_size as usize;
        if file_type(inode.i_mode) != S_IFLNK || size >= BLOCK_SIZE as usize {
            return Err(Error::Fs(format!("inode {ino} is not a symlink")));
        }
        // SAFETY: valid inode struct.
        if unsafe { sys::ext2fs_is_fast_symlink(as_inode(&mut inode)) } != 0 {
            // SAFETY: i_block is 60 bytes of plain data.
            let raw: [u8; 60] = unsafe { std::mem::transmute(inode.i_block) };
            return Ok(raw[..size.min(60)].to_vec());
        }
        let mut file: sys::ext2_file_t = ptr::null_mut();
        self.check("ext2fs_file_open", unsafe {
            sys::ext2fs_file_open(self.fs, ino, 0, &mut file)
        })?;
        let mut buf = vec![0u8; size];
        let mut got = 0u32;
        let code = unsafe {
            sys::ext2fs_file_read(file, buf.as_mut_ptr() as *mut c_void, size as u32, &mut got)
        };
        unsafe { sys::ext2fs_file_close(file) };
        self.check("ext2fs_file_read", code)?;
        buf.truncate(got as usize);
        Ok(buf)
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        if !self.fs.is_null() {
            // Not closed: an error path. Free without writing anything more.
            // SAFETY: live handle, freed once.
            unsafe { sys::ext2fs_free(self.fs) };
            self.fs = ptr::null_mut();
        }
    }
}

fn cname_target(target: &[u8]) -> Result<CString> {
    CString::new(target).map_err(|_| Error::Invalid("symlink target holds a NUL byte".into()))
}

fn fs_error(what: &str, code: sys::errcode_t, registration: &Registration) -> Error {
    let mut text = format!("{what}: {}", describe(code));
    if let Some(io) = registration.take_error() {
        text.push_str(&format!(" ({io})"));
    }
    Error::Fs(text)
}

/// Fill as much of `buf` as `data` gives before its end.
fn read_full(data: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match data.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::Layer(format!(
                    "reading file data from the layer: {e}"
                )))
            }
        }
    }
    Ok(filled)
}

/// Owner, permission bits and times into an inode, keeping its type.
fn apply_attrs(inode: &mut sys::ext2_inode_large, attrs: &Attrs) {
    inode.i_mode = (inode.i_mode & S_IFMT) | (attrs.mode & 0o7777);
    inode.i_uid = attrs.uid as u16;
    inode.i_gid = attrs.gid as u16;
    inode.osd2.linux2.l_i_uid_high = (attrs.uid >> 16) as u16;
    inode.osd2.linux2.l_i_gid_high = (attrs.gid >> 16) as u16;
    // ext4 time: a signed 32-bit second count plus two epoch bits in the
    // low bits of the *_extra field (nanoseconds above them stay 0).
    let low = attrs.mtime as i32;
    let epoch = (((attrs.mtime - low as i64) >> 32) & 3) as u32;
    let seconds = low as u32;
    inode.i_atime = seconds;
    inode.i_ctime = seconds;
    inode.i_mtime = seconds;
    if inode.i_extra_isize >= EXTRA_ISIZE {
        inode.i_atime_extra = epoch;
        inode.i_ctime_extra = epoch;
        inode.i_mtime_extra = epoch;
        inode.i_crtime = seconds;
        inode.i_crtime_extra = epoch;
    }
}
