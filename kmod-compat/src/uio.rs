//! TCMU devices as uio devices: finding them under /sys/class/uio, and the
//! mapped ring with its interrupt fd.
//!
//! target_core_user names each device's uio node
//! `tcm-user/<hba>/<device>/<dev_config>`, where `dev_config` is what was
//! written to configfs: `overlaybd/<config path>` from the snapshotter,
//! which newer versions follow with `;<dev_id>` (an id the reference
//! daemon files the device under; the path ends at the first `;`).
//! Reading the uio fd waits for the kernel's "new commands" interrupt;
//! writing to it tells the kernel that `cmd_tail` moved.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

use crate::ring::SharedMem;

/// Where uio devices are listed.
pub const SYS_CLASS_UIO: &str = "/sys/class/uio";

/// A uio device's name, split into its TCMU parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcmuName {
    pub hba: String,
    pub device: String,
    /// The handler name before the first `/` of dev_config (`overlaybd`).
    pub subtype: String,
    /// The rest of dev_config up to the first `;`: for overlaybd, the
    /// image config's path.
    pub config: String,
    /// What follows that `;`, if anything: the snapshotter's device id.
    pub dev_id: Option<String>,
}

impl TcmuName {
    /// Parse `tcm-user/<hba>/<device>/<subtype>/<config>`; `None` for any
    /// other uio device.
    pub fn parse(name: &str) -> Option<TcmuName> {
        let rest = name.trim_end_matches('\n').strip_prefix("tcm-user/")?;
        let (hba, rest) = rest.split_once('/')?;
        let (device, dev_config) = rest.split_once('/')?;
        let (subtype, rest) = dev_config.split_once('/')?;
        let (config, dev_id) = match rest.split_once(';') {
            Some((config, id)) => (config, Some(id.to_string())),
            None => (rest, None),
        };
        if hba.is_empty() || device.is_empty() || subtype.is_empty() || config.is_empty() {
            return None;
        }
        Some(TcmuName {
            hba: hba.into(),
            device: device.into(),
            subtype: subtype.into(),
            config: config.into(),
            dev_id,
        })
    }

    /// The config path: dev_config holds it after `overlaybd/`, absolute
    /// (`overlaybd//var/...`) or, as some tools write it, without the
    /// leading slash.
    pub fn config_path(&self) -> PathBuf {
        if self.config.starts_with('/') {
            PathBuf::from(&self.config)
        } else {
            Path::new("/").join(&self.config)
        }
    }
}

/// One uio device as listed in sysfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UioEntry {
    /// `uioN`.
    pub node: String,
    pub name: String,
    /// Size of map0, from `maps/map0/size`.
    pub map_size: usize,
}

/// Every uio device under `sys_class_uio` whose name is a TCMU one.
pub fn scan(sys_class_uio: &Path) -> Vec<(UioEntry, TcmuName)> {
    let Ok(dir) = fs::read_dir(sys_class_uio) else {
        return Vec::new();
    };
    let mut found: Vec<_> = dir
        .flatten()
        .filter_map(|e| entry(sys_class_uio, &e.file_name().to_string_lossy()))
        .collect();
    found.sort_by(|a, b| a.0.node.cmp(&b.0.node));
    found
}

/// The uio device `node` (`uioN`) under `sys_class_uio`, if it exists and
/// its name is a TCMU one.
pub fn entry(sys_class_uio: &Path, node: &str) -> Option<(UioEntry, TcmuName)> {
    let base = sys_class_uio.join(node);
    let name = fs::read_to_string(base.join("name")).ok()?;
    let name = name.trim_end_matches('\n').to_string();
    let tcmu = TcmuName::parse(&name)?;
    let map_size = fs::read_to_string(base.join("maps/map0/size"))
        .ok()
        .and_then(|s| parse_size(&s))
        .unwrap_or(0);
    Some((
        UioEntry {
            node: node.to_string(),
            name,
            map_size,
        },
        tcmu,
    ))
}

/// Parse a sysfs size (`0x...` hex, as uio prints it, or decimal).
pub fn parse_size(text: &str) -> Option<usize> {
    let t = text.trim();
    match t.strip_prefix("0x") {
        Some(hex) => usize::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// An open, mapped TCMU uio device.
pub struct Mapping {
    file: File,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, valid until drop. Threads
// touch it only through the bounds-checked copies and atomics of
// `SharedMem`: the ring's entries under `Ring`'s lock, a command's data
// area only by the one worker running that command.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Open `/dev/<node>` and map `len` bytes of map0.
    pub fn open(dev: &Path, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "uio map0 has size 0",
            ));
        }
        let file = OpenOptions::new().read(true).write(true).open(dev)?;
        // SAFETY: a fresh shared mapping of the uio fd at an address the
        // kernel picks (no existing memory is replaced); the kernel checks
        // the length against the device's map, and we own the result.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &file,
                0,
            )
        }?;
        Ok(Mapping {
            file,
            ptr: ptr.cast(),
            len,
        })
    }

    /// Wait up to `timeout_ms` for the kernel's interrupt. `Ok(true)` when
    /// it came, `Ok(false)` on timeout, an error when the device is gone.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut fds = [PollFd::new(&self.file, PollFlags::IN)];
        // Negative: wait for ever, as poll(2) reads it.
        let timeout = u64::try_from(timeout_ms).ok().map(|ms| Timespec {
            tv_sec: (ms / 1000) as i64,
            tv_nsec: (ms % 1000 * 1_000_000) as i64,
        });
        let n = match poll(&mut fds, timeout.as_ref()) {
            Ok(n) => n,
            Err(Errno::INTR) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(false);
        }
        if fds[0]
            .revents()
            .intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL)
        {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the uio device went away",
            ));
        }
        let mut count = [0u8; 4];
        if rustix::io::read(&self.file, &mut count)? != 4 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short read of the uio interrupt count",
            ));
        }
        Ok(true)
    }

    /// Tell the kernel completions are ready.
    pub fn kick(&self) -> io::Result<()> {
        if rustix::io::write(&self.file, &1u32.to_ne_bytes())? != 4 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write of the uio interrupt",
            ));
        }
        Ok(())
    }

    /// What tells this device node from another made later under the same
    /// name: its inode, device number and filesystem.
    pub fn node_identity(&self) -> io::Result<[u64; 3]> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata()?;
        Ok([m.dev(), m.ino(), m.rdev()])
    }

    fn in_range(&self, offset: usize, len: usize) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
    }
}

impl SharedMem for Mapping {
    fn len(&self) -> usize {
        self.len
    }
    fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        if !self.in_range(offset, out.len()) {
            return false;
        }
        // SAFETY: in range of our mapping; the kernel does not change a
        // queued entry or its data until we complete it.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), out.len()) };
        true
    }
    fn write(&self, offset: usize, data: &[u8]) -> bool {
        if !self.in_range(offset, data.len()) {
            return false;
        }
        // SAFETY: in range of our mapping; see `read`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
        true
    }
    fn load_acquire(&self, offset: usize) -> Option<u32> {
        if !offset.is_multiple_of(4) || !self.in_range(offset, 4) {
            return None;
        }
        // SAFETY: aligned, in range, and only accessed atomically by the
        // kernel and us.
        let a = unsafe { &*(self.ptr.add(offset) as *const AtomicU32) };
        Some(a.load(Ordering::Acquire))
    }
    fn store_release(&self, offset: usize, value: u32) -> bool {
        if !offset.is_multiple_of(4) || !self.in_range(offset, 4) {
            return false;
        }
        // SAFETY: as in `load_acquire`.
        let a = unsafe { &*(self.ptr.add(offset) as *const AtomicU32) };
        a.store(value, Ordering::Release);
        true
    }
    fn fill(
        &self,
        offset: usize,
        len: usize,
        f: &mut dyn FnMut(&mut [u8]) -> Result<(), String>,
    ) -> Option<Result<(), String>> {
        self.fill_range(offset, len, f)
    }
}

impl Mapping {
    fn fill_range(
        &self,
        offset: usize,
        len: usize,
        f: &mut dyn FnMut(&mut [u8]) -> Result<(), String>,
    ) -> Option<Result<(), String>> {
        if !self.in_range(offset, len) {
            return None;
        }
        // SAFETY: in range of our mapping, and (see `SharedMem::fill`) a
        // command's own data area, which the kernel does not touch until
        // we answer the command and no other worker uses meanwhile.
        let s = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) };
        Some(f(s))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `open` mapped; nothing borrows it
        // any more (every access goes through `&self`).
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let n = TcmuName::parse("tcm-user/1/vol1/overlaybd//var/lib/obd/config.v1.json\n").unwrap();
        assert_eq!(n.hba, "1");
        assert_eq!(n.device, "vol1");
        assert_eq!(n.subtype, "overlaybd");
        assert_eq!(
            n.config_path(),
            PathBuf::from("/var/lib/obd/config.v1.json")
        );
        let rel = TcmuName::parse("tcm-user/3/d/overlaybd/run/x.json").unwrap();
        assert_eq!(rel.config_path(), PathBuf::from("/run/x.json"));
        let with_id = TcmuName::parse("tcm-user/2/v/overlaybd//a/config.v1.json;snap-17").unwrap();
        assert_eq!(with_id.config_path(), PathBuf::from("/a/config.v1.json"));
        assert_eq!(with_id.dev_id.as_deref(), Some("snap-17"));
        assert_eq!(n.dev_id, None);
        assert!(TcmuName::parse("tcm-user/1/vol1/overlaybd/;id").is_none());
        assert!(TcmuName::parse("uio_pdrv_genirq").is_none());
        assert!(TcmuName::parse("tcm-user/1/vol1/").is_none());
        assert!(TcmuName::parse("tcm-user/1/vol1/overlaybd/").is_none());
    }

    #[test]
    fn sizes_and_scan() {
        assert_eq!(parse_size("0x40800000\n"), Some(0x4080_0000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("zz"), None);
        let dir = std::env::temp_dir().join(format!("obd-uio-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (node, name) in [
            ("uio0", "tcm-user/1/a/overlaybd//c.json"),
            ("uio1", "other"),
        ] {
            fs::create_dir_all(dir.join(node).join("maps/map0")).unwrap();
            fs::write(dir.join(node).join("name"), format!("{name}\n")).unwrap();
            fs::write(dir.join(node).join("maps/map0/size"), "0x1000\n").unwrap();
        }
        let found = scan(&dir);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0.node, "uio0");
        assert_eq!(found[0].0.map_size, 4096);
        assert_eq!(found[0].1.device, "a");
        fs::remove_dir_all(&dir).unwrap();
        assert!(scan(&dir).is_empty());
    }
}
