//! What the device tells the driver: virtio feature bits and the virtio-blk
//! config space (virtio 1.2, 5.2.4), and the id GET_ID answers with.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Bytes in a virtio-blk sector: request offsets and the capacity count in
/// these, whatever the block size.
pub const SECTOR: u64 = 512;

/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Length of the config space this device fills in: up to and including
/// `write_zeroes_may_unmap` and its padding. The secure-erase and zoned
/// fields after it read as zeros (their features are not offered).
pub const CONFIG_LEN: usize = 60;

/// The largest single DISCARD or WRITE_ZEROES range, in sectors (32 MiB).
/// A sparse upper stores zeros where a lower layer holds data, so a range
/// can cost real writes; bounded ranges keep one request short.
pub const MAX_DISCARD_SECTORS: u32 = 65536;

/// Ranges in one DISCARD or WRITE_ZEROES request.
pub const MAX_DISCARD_SEGMENTS: u32 = 16;

/// Data segments of one request. 126 fits a 128-entry queue (qemu's
/// default `queue-size`) with the header and the status; larger requests
/// come as indirect descriptors, which are offered too.
pub const SEG_MAX: u32 = 126;

/// Bytes in one data segment: the driver never makes one larger.
pub const SIZE_MAX: u32 = 1 << 20;

/// The shape of the device, fixed for as long as it is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Image size in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Logical block size the driver uses: 512 or 4096.
    pub block_size: u32,
    /// Request queues (one worker thread each).
    pub queues: u16,
    /// No writable layer: F_RO, and no DISCARD or WRITE_ZEROES.
    pub read_only: bool,
}

impl Geometry {
    /// Check the block size and that the image is made of whole blocks.
    pub fn check(&self) -> Result<(), String> {
        if self.block_size != 512 && self.block_size != 4096 {
            return Err(format!("block size {} is not 512 or 4096", self.block_size));
        }
        if self.size == 0 || !self.size.is_multiple_of(u64::from(self.block_size)) {
            return Err(format!(
                "the image size ({} bytes) is not a whole number of {}-byte blocks",
                self.size, self.block_size
            ));
        }
        if self.queues == 0 || self.queues > 64 {
            return Err(format!("{} queues: use 1 to 64", self.queues));
        }
        Ok(())
    }

    /// The virtio feature bits offered (without the vhost-user
    /// PROTOCOL_FEATURES bit, which the back end adds).
    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | 1 << bit);
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        bits
    }

    /// The config space, little-endian, laid out as `struct
    /// virtio_blk_config`.
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let put32 = |c: &mut [u8; CONFIG_LEN], at: usize, v: u32| {
            c[at..at + 4].copy_from_slice(&v.to_le_bytes())
        };
        // capacity: always in 512-byte sectors.
        c[0..8].copy_from_slice(&(self.size / SECTOR).to_le_bytes());
        put32(&mut c, 8, SIZE_MAX);
        put32(&mut c, 12, SEG_MAX);
        // 16..20: geometry, not offered.
        put32(&mut c, 20, self.block_size);
        // 24..32: topology, not offered. 32: writeback (F_CONFIG_WCE, not
        // offered: the cache is always write-back and FLUSH is honoured).
        c[34..36].copy_from_slice(&self.queues.to_le_bytes());
        if !self.read_only {
            let align = self.block_size / SECTOR as u32;
            put32(&mut c, 36, MAX_DISCARD_SECTORS);
            put32(&mut c, 40, MAX_DISCARD_SEGMENTS);
            put32(&mut c, 44, align);
            put32(&mut c, 48, MAX_DISCARD_SECTORS);
            put32(&mut c, 52, MAX_DISCARD_SEGMENTS);
            // write_zeroes_may_unmap: a zeroed range may become a hole,
            // which is what discard does in the writable layer.
            c[56] = 1;
        }
        c
    }

    /// `size` bytes of the config space from `offset`, as VHOST_USER_GET_CONFIG
    /// asks; bytes past the fields this device fills in read as zeros.
    pub fn config_bytes(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < space.len() {
            let n = (space.len() - start).min(out.len());
            out[..n].copy_from_slice(&space[start..start + n]);
        }
        out
    }
}

/// The GET_ID answer for a device: "obd-" and 16 hex digits of a 64-bit
/// FNV-1a hash of `key` (the writable layer's uuid when it has one, else
/// the config path): exactly 20 bytes, so no NUL ends it (the spec does
/// not ask for one). The same image served again
/// gets the same id, so /dev/disk/by-id links in the guest stay put.
pub fn device_id(key: &str) -> [u8; ID_BYTES] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let text = format!("obd-{hash:016x}");
    let mut id = [0u8; ID_BYTES];
    debug_assert_eq!(text.len(), ID_BYTES);
    id[..text.len()].copy_from_slice(text.as_bytes());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(read_only: bool) -> Geometry {
        Geometry {
            size: 64 << 20,
            block_size: 512,
            queues: 2,
            read_only,
        }
    }

    #[test]
    fn config_space_fields() {
        let c = geometry(false).config_space();
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 131072);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(
            u32::from_le_bytes(c[36..40].try_into().unwrap()),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(c[56], 1);
        let ro = geometry(true).config_space();
        assert_eq!(&ro[36..60], &[0u8; 24]);
    }

    #[test]
    fn features_follow_writability() {
        let rw = geometry(false).features();
        let ro = geometry(true).features();
        assert_ne!(rw & 1 << VIRTIO_BLK_F_DISCARD, 0);
        assert_eq!(rw & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(ro & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(
            ro & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
            0
        );
        assert_ne!(ro & 1 << VIRTIO_F_VERSION_1, 0);
    }

    #[test]
    fn config_bytes_windows() {
        let g = geometry(false);
        assert_eq!(g.config_bytes(0, 8), 131072u64.to_le_bytes());
        assert_eq!(g.config_bytes(34, 2), 2u16.to_le_bytes());
        // Past the filled-in part: zeros, as many as asked.
        assert_eq!(g.config_bytes(56, 40).len(), 40);
        assert_eq!(g.config_bytes(200, 4), vec![0; 4]);
    }

    #[test]
    fn geometry_checks() {
        assert!(geometry(false).check().is_ok());
        let odd = Geometry {
            size: 4096 * 3 + 512,
            block_size: 4096,
            ..geometry(false)
        };
        assert!(odd.check().unwrap_err().contains("4096-byte blocks"));
        let bs = Geometry {
            block_size: 1024,
            ..geometry(false)
        };
        assert!(bs.check().is_err());
    }

    #[test]
    fn ids_are_stable_and_short() {
        let a = device_id("/var/lib/obd/config.v1.json");
        assert_eq!(a, device_id("/var/lib/obd/config.v1.json"));
        assert_ne!(a, device_id("/other/config.v1.json"));
        assert!(a.starts_with(b"obd-"));
        assert!(a.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-'));
    }
}
