//! SCSI block commands as Linux `sd` and ext4 use them: CDB parsing and
//! response building, pure functions over byte slices so every field can be
//! tested on a machine without TCMU.
//!
//! Only what a disk needs is understood; anything else is answered with
//! CHECK CONDITION, ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE, which
//! `sd` handles by not using the feature.

/// SCSI status bytes.
pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;

/// Sense keys.
pub const NO_SENSE: u8 = 0x0;
pub const NOT_READY: u8 = 0x2;
pub const MEDIUM_ERROR: u8 = 0x3;
pub const ILLEGAL_REQUEST: u8 = 0x5;
pub const UNIT_ATTENTION: u8 = 0x6;
pub const DATA_PROTECT: u8 = 0x7;

/// Length of a fixed-format sense buffer as we build it.
pub const SENSE_LEN: usize = 18;

/// A sense key with its additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    pub const INVALID_OPCODE: Sense = Sense::new(ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(ILLEGAL_REQUEST, 0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(ILLEGAL_REQUEST, 0x24, 0x00);
    pub const INVALID_FIELD_IN_PARAMETERS: Sense = Sense::new(ILLEGAL_REQUEST, 0x26, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(ILLEGAL_REQUEST, 0x1a, 0x00);
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(MEDIUM_ERROR, 0x0c, 0x00);
    pub const WRITE_PROTECTED: Sense = Sense::new(DATA_PROTECT, 0x27, 0x00);
    /// LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED: the image
    /// could not be opened.
    /// The disk's size changed: the initiator reads the capacity again.
    pub const CAPACITY_DATA_HAS_CHANGED: Sense = Sense::new(UNIT_ATTENTION, 0x2a, 0x09);
    pub const NOT_READY_MANUAL: Sense = Sense::new(NOT_READY, 0x04, 0x03);

    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense { key, asc, ascq }
    }

    /// Fixed-format sense data (SPC-4 4.5.3), current error.
    pub fn fixed(&self) -> [u8; SENSE_LEN] {
        let mut s = [0u8; SENSE_LEN];
        s[0] = 0x70;
        s[2] = self.key & 0x0f;
        s[7] = (SENSE_LEN - 8) as u8;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }
}

/// A parsed command descriptor block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ReportLuns {
        alloc: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        pc: u8,
        page: u8,
        subpage: u8,
        alloc: u32,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    Read {
        lba: u64,
        blocks: u32,
    },
    Write {
        lba: u64,
        blocks: u32,
        /// Force unit access: the data must be on stable storage before
        /// the command completes (we advertise DPOFUA).
        fua: bool,
    },
    SyncCache,
    /// UNMAP; the descriptors come in a parameter list of `param_len` bytes.
    Unmap {
        param_len: u32,
    },
    /// WRITE SAME 10/16; `blocks == 0` means "to the end of the medium".
    WriteSame {
        lba: u64,
        blocks: u32,
        unmap: bool,
    },
    /// START STOP UNIT: nothing to do for a virtual disk.
    StartStop,
}

fn be16(b: &[u8], at: usize) -> u32 {
    u16::from_be_bytes([b[at], b[at + 1]]) as u32
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

/// Length of a CDB from its group code (the top three bits of the opcode).
pub fn cdb_len(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// Parse a CDB. `cdb` may be longer than the command; shorter is an error.
pub fn parse(cdb: &[u8]) -> Result<Command, Sense> {
    let Some(&opcode) = cdb.first() else {
        return Err(Sense::INVALID_OPCODE);
    };
    if cdb.len() < cdb_len(opcode) {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let c = cdb;
    Ok(match opcode {
        0x00 => Command::TestUnitReady,
        0x03 => Command::RequestSense { alloc: c[4] as u32 },
        0x12 => {
            let evpd = c[1] & 1 != 0;
            if !evpd && c[2] != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            Command::Inquiry {
                evpd,
                page: c[2],
                alloc: be16(c, 3),
            }
        }
        0xa0 => Command::ReportLuns { alloc: be32(c, 6) },
        0x1a | 0x5a => {
            let ten = opcode == 0x5a;
            Command::ModeSense {
                ten,
                dbd: c[1] & 0x08 != 0,
                pc: c[2] >> 6,
                page: c[2] & 0x3f,
                subpage: c[3],
                alloc: if ten { be16(c, 7) } else { c[4] as u32 },
            }
        }
        0x25 => Command::ReadCapacity10,
        0x9e if c[1] & 0x1f == 0x10 => Command::ReadCapacity16 { alloc: be32(c, 10) },
        0x08 | 0x0a => {
            let lba = (be32(c, 0) & 0x001f_ffff) as u64;
            let blocks = if c[4] == 0 { 256 } else { c[4] as u32 };
            if opcode == 0x08 {
                Command::Read { lba, blocks }
            } else {
                // WRITE(6) has no FUA bit.
                Command::Write {
                    lba,
                    blocks,
                    fua: false,
                }
            }
        }
        0x28 => Command::Read {
            lba: be32(c, 2) as u64,
            blocks: be16(c, 7),
        },
        0x2a => Command::Write {
            lba: be32(c, 2) as u64,
            blocks: be16(c, 7),
            fua: c[1] & 0x08 != 0,
        },
        0xa8 => Command::Read {
            lba: be32(c, 2) as u64,
            blocks: be32(c, 6),
        },
        0xaa => Command::Write {
            lba: be32(c, 2) as u64,
            blocks: be32(c, 6),
            fua: c[1] & 0x08 != 0,
        },
        0x88 => Command::Read {
            lba: be64(c, 2),
            blocks: be32(c, 10),
        },
        0x8a => Command::Write {
            lba: be64(c, 2),
            blocks: be32(c, 10),
            fua: c[1] & 0x08 != 0,
        },
        0x35 | 0x91 => Command::SyncCache,
        0x42 => Command::Unmap {
            param_len: be16(c, 7),
        },
        0x41 => Command::WriteSame {
            lba: be32(c, 2) as u64,
            blocks: be16(c, 7),
            unmap: c[1] & 0x08 != 0,
        },
        0x93 => Command::WriteSame {
            lba: be64(c, 2),
            blocks: be32(c, 10),
            unmap: c[1] & 0x08 != 0,
        },
        0x1b => Command::StartStop,
        _ => return Err(Sense::INVALID_OPCODE),
    })
}

/// What a disk says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Bytes per logical block.
    pub block_size: u32,
    /// Number of logical blocks.
    pub blocks: u64,
    /// A writable layer is on top: writes, UNMAP and WRITE SAME work.
    pub writable: bool,
    /// Unit serial number (VPD 0x80), printable ASCII.
    pub serial: String,
    /// 12 bytes that identify the logical unit (from the config path), for
    /// the NAA designator in VPD 0x83.
    pub id: [u8; 12],
    /// Largest READ/WRITE in blocks.
    pub max_transfer_blocks: u32,
    /// Largest UNMAP / WRITE SAME in blocks.
    pub max_unmap_blocks: u32,
    /// Most UNMAP block descriptors in one command.
    pub max_unmap_descriptors: u32,
}

/// Pad or cut `text` to `len` bytes with spaces (INQUIRY string fields).
fn ascii_field(out: &mut Vec<u8>, text: &str, len: usize) {
    let mut bytes: Vec<u8> = text
        .bytes()
        .filter(|b| (0x20..0x7f).contains(b))
        .take(len)
        .collect();
    bytes.resize(len, b' ');
    out.extend_from_slice(&bytes);
}

pub const VENDOR: &str = "OBD";
pub const PRODUCT: &str = "overlaybd";
pub const REVISION: &str = "0001";

/// Standard INQUIRY data (36 bytes): a direct-access block device, SPC-4,
/// command queuing.
pub fn inquiry_standard() -> Vec<u8> {
    let mut d = vec![0x00, 0x00, 0x06, 0x02, 31, 0x00, 0x00, 0x02];
    ascii_field(&mut d, VENDOR, 8);
    ascii_field(&mut d, PRODUCT, 16);
    ascii_field(&mut d, REVISION, 4);
    d
}

/// The VPD pages we answer, in order.
pub const VPD_PAGES: [u8; 5] = [0x00, 0x80, 0x83, 0xb0, 0xb2];

/// A VPD page, or `None` for a page we do not have.
pub fn inquiry_vpd(page: u8, disk: &DiskInfo) -> Option<Vec<u8>> {
    let body: Vec<u8> = match page {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => {
            let mut s = Vec::new();
            let len = disk.serial.len().clamp(1, 64);
            ascii_field(&mut s, &disk.serial, len);
            s
        }
        0x83 => {
            let mut s = Vec::new();
            // NAA IEEE Registered Extended (type 6), binary, LU association.
            s.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
            // NAA 6, OUI 00-14-05 (the one LIO uses), then our 12 id bytes
            // with the first nibble of the vendor-specific field.
            let mut naa = [0u8; 16];
            naa[0] = 0x60;
            naa[1] = 0x01;
            naa[2] = 0x40;
            naa[3] = 0x50 | (disk.id[0] & 0x0f);
            naa[4..16].copy_from_slice(&disk.id);
            s.extend_from_slice(&naa);
            // T10 vendor ID: ASCII, LU association, vendor + serial.
            let mut t10 = Vec::new();
            ascii_field(&mut t10, VENDOR, 8);
            t10.extend(
                disk.serial
                    .bytes()
                    .filter(|b| (0x21..0x7f).contains(b))
                    .take(64),
            );
            s.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
            s.extend_from_slice(&t10);
            s
        }
        0xb0 => {
            let mut s = vec![0u8; 0x3c];
            // `at` is a page offset (SBC-4 table 6.6.4); the body starts at 4.
            let put32 = |s: &mut Vec<u8>, at: usize, v: u32| {
                s[at - 4..at].copy_from_slice(&v.to_be_bytes());
            };
            put32(&mut s, 8, disk.max_transfer_blocks);
            if disk.writable {
                put32(&mut s, 20, disk.max_unmap_blocks);
                put32(&mut s, 24, disk.max_unmap_descriptors);
                put32(&mut s, 28, 1); // optimal unmap granularity
                s[32..40].copy_from_slice(&(disk.max_unmap_blocks as u64).to_be_bytes());
            }
            s
        }
        0xb2 => {
            let mut s = vec![0u8; 4];
            if disk.writable {
                // LBPU, LBPWS, LBPWS10; LBPRZ = 1: unmapped blocks read zero.
                s[1] = 0x80 | 0x40 | 0x20 | 0x04;
                s[2] = 0x02; // thin provisioned
            }
            s
        }
        _ => return None,
    };
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    Some(d)
}

/// READ CAPACITY (10): last LBA (saturated) and block size.
pub fn read_capacity10(disk: &DiskInfo) -> Vec<u8> {
    let last = disk.blocks.saturating_sub(1).min(0xffff_ffff) as u32;
    let mut d = last.to_be_bytes().to_vec();
    d.extend_from_slice(&disk.block_size.to_be_bytes());
    d
}

/// READ CAPACITY (16): last LBA, block size, and LBPME/LBPRZ when the
/// disk is thin provisioned (writable).
pub fn read_capacity16(disk: &DiskInfo) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&disk.blocks.saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&disk.block_size.to_be_bytes());
    if disk.writable {
        d[14] = 0x80 | 0x40;
    }
    d
}

/// REPORT LUNS: the single LUN 0.
pub fn report_luns() -> Vec<u8> {
    let mut d = vec![0u8; 16];
    d[3] = 8;
    d
}

/// The caching mode page (0x08): WCE=1, since the writable layer is
/// persisted only on SYNCHRONIZE CACHE. `changeable` gives the mask page.
fn caching_page(changeable: bool) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    if !changeable {
        p[2] = 0x04;
    }
    p
}

/// The control mode page (0x0a), all defaults.
fn control_page(_changeable: bool) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p[0] = 0x0a;
    p[1] = 0x0a;
    p
}

/// MODE SENSE (6) or (10) data. No block descriptors are returned.
/// Page 0x3f is every page; an unknown page or subpage is an error.
pub fn mode_sense(
    ten: bool,
    pc: u8,
    page: u8,
    subpage: u8,
    disk: &DiskInfo,
) -> Result<Vec<u8>, Sense> {
    if pc == 3 {
        // Saved values are not supported.
        return Err(Sense::new(ILLEGAL_REQUEST, 0x39, 0x00));
    }
    let changeable = pc == 1;
    if subpage != 0 && subpage != 0xff {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let mut pages = Vec::new();
    match page {
        0x08 => pages.extend(caching_page(changeable)),
        0x0a => pages.extend(control_page(changeable)),
        0x3f => {
            pages.extend(caching_page(changeable));
            pages.extend(control_page(changeable));
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    }
    // Device-specific parameter: WP when read-only, DPOFUA.
    let specific = if disk.writable { 0x10 } else { 0x80 | 0x10 };
    let mut d = if ten {
        let len = (6 + pages.len()) as u16;
        let mut h = len.to_be_bytes().to_vec();
        h.extend_from_slice(&[0x00, specific, 0, 0, 0, 0]);
        h
    } else {
        vec![(3 + pages.len()) as u8, 0x00, specific, 0x00]
    };
    d.extend(pages);
    Ok(d)
}

/// Fixed-format sense data with no error, for REQUEST SENSE.
pub fn request_sense_none() -> Vec<u8> {
    Sense::new(NO_SENSE, 0, 0).fixed().to_vec()
}

/// One UNMAP block descriptor: `blocks` logical blocks from `lba`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnmapRange {
    pub lba: u64,
    pub blocks: u32,
}

/// Parse an UNMAP parameter list (8-byte header, 16-byte descriptors).
pub fn parse_unmap(list: &[u8], max_descriptors: u32) -> Result<Vec<UnmapRange>, Sense> {
    if list.is_empty() {
        return Ok(Vec::new());
    }
    if list.len() < 8 {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let desc_len = be16(list, 2) as usize;
    let avail = list.len() - 8;
    let desc_len = desc_len.min(avail) / 16 * 16;
    if desc_len / 16 > max_descriptors as usize {
        return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
    }
    Ok(list[8..8 + desc_len]
        .chunks_exact(16)
        .map(|d| UnmapRange {
            lba: be64(d, 0),
            blocks: be32(d, 8),
        })
        .collect())
}

/// Check that `blocks` blocks from `lba` lie on a disk of `total` blocks.
pub fn check_range(lba: u64, blocks: u64, total: u64) -> Result<(), Sense> {
    match lba.checked_add(blocks) {
        Some(end) if end <= total => Ok(()),
        _ => Err(Sense::LBA_OUT_OF_RANGE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(writable: bool) -> DiskInfo {
        DiskInfo {
            block_size: 512,
            blocks: 1 << 21,
            writable,
            serial: "cfg-1234".into(),
            id: [7; 12],
            max_transfer_blocks: 2048,
            max_unmap_blocks: 1 << 22,
            max_unmap_descriptors: 64,
        }
    }

    #[test]
    fn sense_is_fixed_format() {
        let s = Sense::INVALID_OPCODE.fixed();
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], 0x05);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x20, 0x00));
        let m = Sense::UNRECOVERED_READ_ERROR.fixed();
        assert_eq!((m[2], m[12], m[13]), (0x03, 0x11, 0x00));
    }

    #[test]
    fn reads_and_writes_of_every_size() {
        assert_eq!(
            parse(&[0x08, 0x01, 0x02, 0x03, 0, 0]),
            Ok(Command::Read {
                lba: 0x10203,
                blocks: 256
            })
        );
        assert_eq!(
            parse(&[0x0a, 0xff, 0xff, 0xff, 4, 0]),
            Ok(Command::Write {
                lba: 0x1fffff,
                blocks: 4,
                fua: false
            })
        );
        assert_eq!(
            parse(&[0x28, 0, 0, 0, 1, 0, 0, 0, 8, 0]),
            Ok(Command::Read {
                lba: 256,
                blocks: 8
            })
        );
        assert_eq!(
            parse(&[0x2a, 0, 0x12, 0x34, 0x56, 0x78, 0, 0x01, 0x00, 0]),
            Ok(Command::Write {
                lba: 0x12345678,
                blocks: 256,
                fua: false
            })
        );
        assert_eq!(
            parse(&[0x2a, 0x08, 0, 0, 0, 1, 0, 0, 1, 0]),
            Ok(Command::Write {
                lba: 1,
                blocks: 1,
                fua: true
            })
        );
        assert_eq!(
            parse(&[0xa8, 0, 0, 0, 0, 9, 0, 1, 0, 0, 0, 0]),
            Ok(Command::Read {
                lba: 9,
                blocks: 0x10000
            })
        );
        assert_eq!(
            parse(&[0xaa, 0, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0]),
            Ok(Command::Write {
                lba: 9,
                blocks: 1,
                fua: false
            })
        );
        let mut r16 = [0u8; 16];
        r16[0] = 0x88;
        r16[2..10].copy_from_slice(&0x1_0000_0000u64.to_be_bytes());
        r16[10..14].copy_from_slice(&16u32.to_be_bytes());
        assert_eq!(
            parse(&r16),
            Ok(Command::Read {
                lba: 1 << 32,
                blocks: 16
            })
        );
        r16[0] = 0x8a;
        r16[1] = 0x08;
        assert_eq!(
            parse(&r16),
            Ok(Command::Write {
                lba: 1 << 32,
                blocks: 16,
                fua: true
            })
        );
    }

    #[test]
    fn short_and_unknown_cdbs_are_errors() {
        assert_eq!(parse(&[]), Err(Sense::INVALID_OPCODE));
        assert_eq!(parse(&[0x28, 0, 0]), Err(Sense::INVALID_FIELD_IN_CDB));
        assert_eq!(
            parse(&[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(Sense::INVALID_OPCODE)
        );
        assert_eq!(
            parse(&[0x9e, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(Sense::INVALID_OPCODE)
        );
        assert_eq!(
            parse(&[0x12, 0, 0x80, 0, 36, 0]),
            Err(Sense::INVALID_FIELD_IN_CDB)
        );
    }

    #[test]
    fn unmap_write_same_and_sync() {
        assert_eq!(
            parse(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Ok(Command::SyncCache)
        );
        let mut sync16 = [0u8; 16];
        sync16[0] = 0x91;
        assert_eq!(parse(&sync16), Ok(Command::SyncCache));
        assert_eq!(
            parse(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]),
            Ok(Command::Unmap { param_len: 24 })
        );
        assert_eq!(
            parse(&[0x41, 0x08, 0, 0, 0, 8, 0, 0, 16, 0]),
            Ok(Command::WriteSame {
                lba: 8,
                blocks: 16,
                unmap: true
            })
        );
        let mut ws = [0u8; 16];
        ws[0] = 0x93;
        ws[9] = 3;
        ws[13] = 5;
        assert_eq!(
            parse(&ws),
            Ok(Command::WriteSame {
                lba: 3,
                blocks: 5,
                unmap: false
            })
        );
    }

    #[test]
    fn unmap_parameter_list() {
        let mut list = vec![0u8; 8];
        list[2..4].copy_from_slice(&32u16.to_be_bytes());
        for (lba, n) in [(100u64, 8u32), (1 << 33, 1)] {
            list.extend_from_slice(&lba.to_be_bytes());
            list.extend_from_slice(&n.to_be_bytes());
            list.extend_from_slice(&[0; 4]);
        }
        let got = parse_unmap(&list, 64).unwrap();
        assert_eq!(
            got,
            vec![
                UnmapRange {
                    lba: 100,
                    blocks: 8
                },
                UnmapRange {
                    lba: 1 << 33,
                    blocks: 1
                }
            ]
        );
        assert_eq!(
            parse_unmap(&list, 1),
            Err(Sense::INVALID_FIELD_IN_PARAMETERS)
        );
        // A descriptor length beyond the data is cut to whole descriptors.
        assert_eq!(parse_unmap(&list[..30], 64).unwrap().len(), 1);
        assert_eq!(
            parse_unmap(&list[..4], 64),
            Err(Sense::PARAMETER_LIST_LENGTH_ERROR)
        );
        assert!(parse_unmap(&[], 64).unwrap().is_empty());
    }

    #[test]
    fn inquiry_pages() {
        let std = inquiry_standard();
        assert_eq!(std.len(), 36);
        assert_eq!(std[4] as usize, std.len() - 5);
        assert_eq!(&std[8..16], b"OBD     ");
        assert_eq!(&std[16..32], b"overlaybd       ");
        let d = disk(true);
        let p0 = inquiry_vpd(0, &d).unwrap();
        assert_eq!(&p0[4..], &VPD_PAGES);
        for page in VPD_PAGES {
            let p = inquiry_vpd(page, &d).unwrap();
            assert_eq!(p[1], page);
            assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len() - 4);
        }
        assert_eq!(&inquiry_vpd(0x80, &d).unwrap()[4..], b"cfg-1234");
        let b0 = inquiry_vpd(0xb0, &d).unwrap();
        assert_eq!(b0.len(), 64);
        assert_eq!(be32(&b0, 8), 2048);
        assert_eq!(be32(&b0, 20), 1 << 22);
        assert_eq!(be32(&b0, 24), 64);
        assert_eq!(be64(&b0, 36), 1 << 22);
        let b2 = inquiry_vpd(0xb2, &d).unwrap();
        assert_eq!(b2[5] & 0xe0, 0xe0);
        let ro = inquiry_vpd(0xb2, &disk(false)).unwrap();
        assert_eq!(ro[5], 0);
        assert_eq!(be32(&inquiry_vpd(0xb0, &disk(false)).unwrap(), 20), 0);
        assert!(inquiry_vpd(0x86, &d).is_none());
        let p83 = inquiry_vpd(0x83, &d).unwrap();
        assert_eq!(&p83[4..8], &[0x01, 0x03, 0x00, 16]);
        assert_eq!(p83[8] >> 4, 6);
    }

    #[test]
    fn capacity() {
        let d = disk(true);
        assert_eq!(read_capacity10(&d), vec![0, 0x1f, 0xff, 0xff, 0, 0, 2, 0]);
        let c = read_capacity16(&d);
        assert_eq!(be64(&c, 0), (1 << 21) - 1);
        assert_eq!(be32(&c, 8), 512);
        assert_eq!(c[14], 0xc0);
        assert_eq!(read_capacity16(&disk(false))[14], 0);
        let huge = DiskInfo {
            blocks: 1 << 40,
            ..d
        };
        assert_eq!(&read_capacity10(&huge)[..4], &[0xff; 4]);
        assert_eq!(
            parse(&[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]),
            Ok(Command::ReadCapacity16 { alloc: 32 })
        );
    }

    #[test]
    fn mode_sense_pages() {
        let d = disk(true);
        let m6 = mode_sense(false, 0, 0x08, 0, &d).unwrap();
        assert_eq!(m6[0] as usize, m6.len() - 1);
        assert_eq!(m6[2], 0x10);
        assert_eq!(m6[3], 0);
        assert_eq!(m6[4], 0x08);
        assert_eq!(m6[6] & 0x04, 0x04, "WCE");
        let m10 = mode_sense(true, 0, 0x3f, 0, &disk(false)).unwrap();
        assert_eq!(u16::from_be_bytes([m10[0], m10[1]]) as usize, m10.len() - 2);
        assert_eq!(m10[3] & 0x80, 0x80, "WP");
        assert_eq!(m10.len(), 8 + 20 + 12);
        let changeable = mode_sense(false, 1, 0x08, 0, &d).unwrap();
        assert_eq!(changeable[6], 0);
        assert_eq!(
            mode_sense(false, 0, 0x1c, 0, &d),
            Err(Sense::INVALID_FIELD_IN_CDB)
        );
        assert!(mode_sense(false, 3, 0x08, 0, &d).is_err());
        assert_eq!(
            parse(&[0x5a, 0x08, 0x48, 0, 0, 0, 0, 0x01, 0x00, 0]),
            Ok(Command::ModeSense {
                ten: true,
                dbd: true,
                pc: 1,
                page: 8,
                subpage: 0,
                alloc: 256
            })
        );
    }

    #[test]
    fn ranges() {
        assert!(check_range(0, 10, 10).is_ok());
        assert_eq!(check_range(1, 10, 10), Err(Sense::LBA_OUT_OF_RANGE));
        assert_eq!(check_range(u64::MAX, 2, 10), Err(Sense::LBA_OUT_OF_RANGE));
    }

    #[test]
    fn misc() {
        assert_eq!(report_luns().len(), 16);
        assert_eq!(request_sense_none()[0], 0x70);
        assert_eq!(cdb_len(0x88), 16);
        assert_eq!(cdb_len(0xa8), 12);
        assert_eq!(cdb_len(0x28), 10);
        assert_eq!(cdb_len(0x00), 6);
    }
}
