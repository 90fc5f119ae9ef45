//! Hash-indexed ("htree", dir_index) directories.
//!
//! libext2fs adds names to an indexed directory (its `ext2fs_link` keeps
//! the index) but never makes one: a directory it grows stays a linear
//! list, which the kernel searches block by block on every lookup. So
//! each directory that grew past one block while a layer was applied is
//! rewritten once at the end, as e2fsck's rehash (`-D`) would: its
//! entries sorted by name hash into leaf blocks behind a one-level index
//! in block 0. A directory too large for one index level (more than 508
//! leaf blocks, some 25,000 names) stays linear, which is valid too.

use std::ffi::{c_char, c_int, c_void};
use std::ptr;

use crate::fs::{file_type, Ext4, Ino, S_IFDIR};
use crate::sys;
use crate::{Error, Result};

/// Bytes an entry with a name of `len` bytes takes (4-byte aligned).
fn rec_len(len: usize) -> usize {
    (8 + len + 3) & !3
}

struct Hashed {
    hash: u32,
    minor: u32,
    name: Vec<u8>,
    ino: Ino,
    file_type: u8,
}

fn put_entry(block: &mut [u8], at: usize, ino: Ino, rec: usize, name: &[u8], file_type: u8) {
    block[at..at + 4].copy_from_slice(&ino.to_le_bytes());
    block[at + 4..at + 6].copy_from_slice(&(rec as u16).to_le_bytes());
    block[at + 6] = name.len() as u8;
    block[at + 7] = file_type;
    block[at + 8..at + 8 + name.len()].copy_from_slice(name);
}

impl Ext4 {
    /// Rewrite directory `dir` with a hash index, if it is a linear
    /// directory of more than one block that one index level can hold.
    /// Returns whether it did.
    pub fn index_dir(&mut self, dir: Ino) -> Result<bool> {
        let fs = self.fs;
        // SAFETY: live handle.
        let (block_size, csum, version, seed) = unsafe {
            let sb = &*(*fs).super_;
            let mut version = sb.s_def_hash_version as c_int;
            if sb.s_flags & sys::EXT2_FLAGS_UNSIGNED_HASH != 0
                && version <= sys::EXT2_HASH_TEA as c_int
            {
                version += 3;
            }
            (
                (*fs).blocksize as usize,
                sb.s_feature_ro_compat & sys::EXT4_FEATURE_RO_COMPAT_METADATA_CSUM != 0,
                (sb.s_def_hash_version, version),
                sb.s_hash_seed,
            )
        };
        let dir_index =
            unsafe { (*(*fs).super_).s_feature_compat & sys::EXT2_FEATURE_COMPAT_DIR_INDEX != 0 };
        let inode = self.read_inode(dir)?;
        if !dir_index
            || csum // leaf blocks would need checksum tails; leave them linear
            || file_type(inode.i_mode) != S_IFDIR
            || inode.i_links_count == 0
            || inode.i_flags & (sys::EXT2_INDEX_FL | sys::EXT4_INLINE_DATA_FL) != 0
            || (inode.i_size as usize) <= block_size
        {
            return Ok(false);
        }
        let mut parent = None;
        let mut names = Vec::new();
        for entry in self.entries(dir)? {
            match entry.name.as_slice() {
                b"." => {}
                b".." => parent = Some(entry.ino),
                _ => {
                    let (mut hash, mut minor) = (0u32, 0u32);
                    // SAFETY: name pointer + length; seed is 4 words.
                    let code = unsafe {
                        sys::ext2fs_dirhash2(
                            version.1,
                            entry.name.as_ptr() as *const c_char,
                            entry.name.len() as c_int,
                            ptr::null(),
                            0,
                            seed.as_ptr(),
                            &mut hash,
                            &mut minor,
                        )
                    };
                    self.check("ext2fs_dirhash", code)?;
                    names.push(Hashed {
                        hash,
                        minor,
                        name: entry.name,
                        ino: entry.ino,
                        file_type: entry.file_type,
                    });
                }
            }
        }
        let parent = parent.ok_or_else(|| Error::Fs(format!("directory {dir} has no ..")))?;
        if names.is_empty() {
            return Ok(false);
        }
        names.sort_by(|a, b| (a.hash, a.minor, &a.name).cmp(&(b.hash, b.minor, &b.name)));

        // Leaves: as many entries as fit, in hash order.
        let mut leaves: Vec<(u32, Vec<u8>)> = Vec::new();
        let mut block = vec![0u8; block_size];
        let mut used = 0usize;
        let mut last: Option<(usize, u32)> = None; // offset of the last entry, its hash
        let mut first_hash = 0u32;
        let mut previous_hash: Option<u32> = None;
        for entry in &names {
            let need = rec_len(entry.name.len());
            if used + need > block_size {
                let (at, hash) = last.expect("a full block holds an entry");
                let rec = block_size - at;
                block[at + 4..at + 6].copy_from_slice(&(rec as u16).to_le_bytes());
                leaves.push((
                    first_hash,
                    std::mem::replace(&mut block, vec![0u8; block_size]),
                ));
                previous_hash = Some(hash);
                used = 0;
            }
            if used == 0 {
                // A leaf starting inside a run of equal hashes is marked as
                // its continuation (the low bit), as the kernel does.
                first_hash = entry.hash | u32::from(previous_hash == Some(entry.hash));
            }
            put_entry(
                &mut block,
                used,
                entry.ino,
                need,
                &entry.name,
                entry.file_type,
            );
            last = Some((used, entry.hash));
            used += need;
        }
        let (at, _) = last.expect("names is not empty");
        let rec = block_size - at;
        block[at + 4..at + 6].copy_from_slice(&(rec as u16).to_le_bytes());
        leaves.push((first_hash, block));

        let limit = (block_size - 32) / 8;
        if leaves.len() > limit {
            return Ok(false);
        }
        // Block 0: "." and ".." (covering the rest), the root info, the index.
        let mut root = vec![0u8; block_size];
        put_entry(&mut root, 0, dir, 12, b".", sys::EXT2_FT_DIR as u8);
        put_entry(
            &mut root,
            12,
            parent,
            block_size - 12,
            b"..",
            sys::EXT2_FT_DIR as u8,
        );
        root[28] = version.0; // hash version, without the unsigned offset
        root[29] = 8; // info length
        root[30] = 0; // indirect levels
        root[32..34].copy_from_slice(&(limit as u16).to_le_bytes());
        root[34..36].copy_from_slice(&(leaves.len() as u16).to_le_bytes());
        root[36..40].copy_from_slice(&1u32.to_le_bytes());
        for (i, (hash, _)) in leaves.iter().enumerate().skip(1) {
            let at = 32 + 8 * i;
            root[at..at + 4].copy_from_slice(&hash.to_le_bytes());
            root[at + 4..at + 8].copy_from_slice(&(i as u32 + 1).to_le_bytes());
        }
        let blocks = std::iter::once(&root).chain(leaves.iter().map(|(_, b)| b));
        self.rewrite_dir(dir, blocks, (leaves.len() + 1) * block_size)?;
        let mut inode = self.read_inode(dir)?;
        inode.i_flags |= sys::EXT2_INDEX_FL;
        self.write_inode(dir, &mut inode)?;
        Ok(true)
    }

    /// Replace the blocks of directory `dir` with `blocks` (`size` bytes).
    fn rewrite_dir<'b>(
        &mut self,
        dir: Ino,
        blocks: impl Iterator<Item = &'b Vec<u8>>,
        size: usize,
    ) -> Result<()> {
        let mut file: sys::ext2_file_t = ptr::null_mut();
        self.check("ext2fs_file_open", unsafe {
            sys::ext2fs_file_open(self.fs, dir, sys::EXT2_FILE_WRITE as c_int, &mut file)
        })?;
        let mut result = Ok(());
        for block in blocks {
            let mut written = 0u32;
            // SAFETY: `file` is open; `block` is a whole block.
            let code = unsafe {
                sys::ext2fs_file_write(
                    file,
                    block.as_ptr() as *const c_void,
                    block.len() as u32,
                    &mut written,
                )
            };
            if code != 0 {
                result = self.check("ext2fs_file_write (directory)", code);
                break;
            }
            if written as usize != block.len() {
                result = Err(Error::Fs(format!(
                    "short write into directory {dir}: {written} of {} bytes",
                    block.len()
                )));
                break;
            }
        }
        if result.is_ok() {
            result = self.check("ext2fs_file_set_size", unsafe {
                sys::ext2fs_file_set_size2(file, size as i64)
            });
        }
        // SAFETY: `file` is open; closing writes its inode.
        let closed = unsafe { sys::ext2fs_file_close(file) };
        result?;
        self.check("ext2fs_file_close", closed)
    }
}

#[cfg(test)]
mod tests {
    use super::rec_len;

    #[test]
    fn entry_lengths() {
        assert_eq!(rec_len(1), 12);
        assert_eq!(rec_len(2), 12);
        assert_eq!(rec_len(4), 12);
        assert_eq!(rec_len(5), 16);
        assert_eq!(rec_len(255), 264);
    }
}
