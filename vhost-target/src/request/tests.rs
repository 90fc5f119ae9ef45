//! Requests built as descriptor chains in a `GuestMemoryMmap` with
//! virtio-queue's mock split queue, run against a stack of one writable
//! layer in a temporary directory. No VMM involved.

use std::sync::Arc;

use overlaybd::lsmt::{CreateOptions, WritableLayer};
use overlaybd::stack::Stack;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::config::{device_id, Geometry};

const SIZE: u64 = 4 << 20;
/// Guest memory: the queue at 0, request buffers from BUF on.
const BUF: u64 = 0x10_0000;
/// A second memory region, right after the first in guest addresses.
const REGION2: u64 = 0x40_0000;

struct Fixture {
    _dir: tempfile::TempDir,
    stack: Arc<Stack>,
    mem: Memory,
    stats: Stats,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let top = WritableLayer::create(
            &dir.path().join("upper.data"),
            Some(&dir.path().join("upper.index")),
            &CreateOptions {
                virtual_size: SIZE,
                parent_uuid: None,
                sparse: false,
            },
        )
        .unwrap();
        let stack = Arc::new(Stack::new(Vec::new(), Some(Arc::new(top))).unwrap());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), REGION2 as usize),
            (GuestAddress(REGION2), 0x10_0000),
        ])
        .unwrap();
        Fixture {
            _dir: dir,
            stack,
            mem,
            stats: Stats::default(),
        }
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            size: SIZE,
            block_size: 512,
            queues: 1,
            read_only: false,
        }
    }

    /// Run one request made of `descs` (addr, len, device-writable).
    fn run_with(&self, geometry: Geometry, descs: &[(u64, u32, bool)]) -> Outcome {
        let queue = MockSplitQueue::new(&self.mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(addr, len, write)| {
                let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
            })
            .collect();
        let chain = queue.build_desc_chain(&raw).unwrap();
        let device = Device {
            stack: &self.stack,
            geometry,
            id: device_id("test"),
            stats: &self.stats,
        };
        execute(&device, chain, &mut Scratch::default())
    }

    fn run(&self, descs: &[(u64, u32, bool)]) -> Outcome {
        self.run_with(self.geometry(), descs)
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }
}

fn ok(used: u32) -> Outcome {
    Outcome {
        status: Some(Status::Ok),
        used,
    }
}

fn failed(status: Status) -> Outcome {
    Outcome {
        status: Some(status),
        used: 1,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const HDR: u64 = BUF;
const DATA: u64 = BUF + 0x1000;
const STATUS: u64 = BUF + 0x800;

#[test]
fn write_then_read_back() {
    let f = Fixture::new();
    let data = pattern(8192, 1);
    f.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    f.header(HDR, VIRTIO_BLK_T_OUT, 8);
    let out = f.run(&[(HDR, 16, false), (DATA, 8192, false), (STATUS, 1, true)]);
    assert_eq!(out, ok(1));
    assert_eq!(f.status(STATUS), 0);
    let mut back = vec![0u8; 8192];
    f.stack.read(&mut back, 8 * 512).unwrap();
    assert_eq!(back, data);

    // Read it back through IN, into two segments.
    let dest = BUF + 0x10000;
    f.header(HDR, VIRTIO_BLK_T_IN, 8);
    let out = f.run(&[
        (HDR, 16, false),
        (dest, 4096, true),
        (dest + 0x4000, 4096, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(out, ok(8193));
    assert_eq!(f.bytes(dest, 4096), data[..4096]);
    assert_eq!(f.bytes(dest + 0x4000, 4096), data[4096..]);
}

#[test]
fn header_split_and_status_in_the_data_descriptor() {
    // The spec lets a driver frame a request any way it likes: a header in
    // two pieces, the status byte at the end of the data descriptor.
    let f = Fixture::new();
    f.stack.write(&pattern(1024, 9), 0).unwrap();
    f.header(HDR, VIRTIO_BLK_T_IN, 0);
    let out = f.run(&[(HDR, 5, false), (HDR + 5, 11, false), (DATA, 1025, true)]);
    assert_eq!(out, ok(1025));
    assert_eq!(f.bytes(DATA, 1024), pattern(1024, 9));
    assert_eq!(f.status(DATA + 1024), 0);
}

#[test]
fn unaligned_segments_go_through_the_bounce_buffer() {
    let f = Fixture::new();
    let data = pattern(2048, 3);
    f.mem.write_slice(&data[..100], GuestAddress(DATA)).unwrap();
    f.mem
        .write_slice(&data[100..], GuestAddress(DATA + 0x8000))
        .unwrap();
    f.header(HDR, VIRTIO_BLK_T_OUT, 2);
    let out = f.run(&[
        (HDR, 16, false),
        (DATA, 100, false),
        (DATA + 0x8000, 1948, false),
        (STATUS, 1, true),
    ]);
    assert_eq!(out, ok(1));
    let mut back = vec![0u8; 2048];
    f.stack.read(&mut back, 1024).unwrap();
    assert_eq!(back, data);

    f.header(HDR, VIRTIO_BLK_T_IN, 2);
    let dest = BUF + 0x20000;
    let out = f.run(&[
        (HDR, 16, false),
        (dest, 1000, true),
        (dest + 0x2000, 1048, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(out, ok(2049));
    assert_eq!(f.bytes(dest, 1000), data[..1000]);
    assert_eq!(f.bytes(dest + 0x2000, 1048), data[1000..]);
}

#[test]
fn a_segment_across_two_memory_regions_is_read_and_written() {
    let f = Fixture::new();
    let data = pattern(8192, 5);
    let at = REGION2 - 4096;
    f.mem.write_slice(&data, GuestAddress(at)).unwrap();
    f.header(HDR, VIRTIO_BLK_T_OUT, 16);
    assert_eq!(
        f.run(&[(HDR, 16, false), (at, 8192, false), (STATUS, 1, true)]),
        ok(1)
    );
    f.mem.write_slice(&[0u8; 8192], GuestAddress(at)).unwrap();
    f.header(HDR, VIRTIO_BLK_T_IN, 16);
    assert_eq!(
        f.run(&[(HDR, 16, false), (at, 8192, true), (STATUS, 1, true)]),
        ok(8193)
    );
    assert_eq!(f.bytes(at, 8192), data);
}

#[test]
fn out_of_range_and_partial_sectors_are_io_errors() {
    let f = Fixture::new();
    let last = SIZE / 512;
    f.header(HDR, VIRTIO_BLK_T_IN, last);
    let out = f.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(out, failed(Status::IoErr));
    assert_eq!(f.status(STATUS), 1);
    // Ends exactly at the end: fine.
    f.header(HDR, VIRTIO_BLK_T_IN, last - 1);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]),
        ok(513)
    );
    // A sector number whose byte offset overflows.
    f.header(HDR, VIRTIO_BLK_T_OUT, u64::MAX / 4);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]),
        failed(Status::IoErr)
    );
    // Not whole sectors.
    f.header(HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 100, false), (STATUS, 1, true)]),
        failed(Status::IoErr)
    );
}

#[test]
fn bad_chains_never_panic() {
    let f = Fixture::new();
    // Short header.
    f.header(HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[(HDR, 8, false), (STATUS, 1, true)]),
        failed(Status::IoErr)
    );
    // No writable byte: nowhere to put the status.
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 512, false)]),
        Outcome {
            status: None,
            used: 0
        }
    );
    // Data outside guest memory.
    f.header(HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[
            (HDR, 16, false),
            (0x1_0000_0000, 512, true),
            (STATUS, 1, true)
        ]),
        failed(Status::IoErr)
    );
    f.header(HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        f.run(&[
            (HDR, 16, false),
            (u64::MAX - 100, 512, false),
            (STATUS, 1, true)
        ]),
        failed(Status::IoErr)
    );
    // A readable descriptor after a writable one.
    f.header(HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        f.run(&[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA, 512, false),
            (STATUS, 1, true)
        ]),
        failed(Status::IoErr)
    );
    // The status byte outside guest memory: nothing can be reported.
    assert_eq!(
        f.run(&[(HDR, 16, false), (0x1_0000_0000, 1, true)]).status,
        None
    );
}

#[test]
fn unknown_types_are_unsupported() {
    let f = Fixture::new();
    for kind in [2, 3, 14, 15, 99, u32::MAX] {
        f.header(HDR, kind, 0);
        assert_eq!(
            f.run(&[(HDR, 16, false), (STATUS, 1, true)]),
            failed(Status::Unsupp),
            "type {kind}"
        );
        assert_eq!(f.status(STATUS), 2);
    }
}

#[test]
fn flush_and_get_id() {
    let f = Fixture::new();
    f.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(f.run(&[(HDR, 16, false), (STATUS, 1, true)]), ok(1));
    f.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]),
        ok(21)
    );
    assert_eq!(f.bytes(DATA, 20), device_id("test"));
    // A short buffer gets what fits.
    f.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 4, true), (STATUS, 1, true)]),
        ok(5)
    );
    assert_eq!(f.bytes(DATA, 5), [b'o', b'b', b'd', b'-', 0xee]);
    assert_eq!(
        f.stats.summary(),
        "reads 0, writes 0, flushes 1, discards 0, write-zeroes 0, other 2, failed 0"
    );
}

fn put_range(f: &Fixture, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut r = [0u8; 16];
    r[0..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&sectors.to_le_bytes());
    r[12..16].copy_from_slice(&flags.to_le_bytes());
    f.mem.write_slice(&r, GuestAddress(at)).unwrap();
}

#[test]
fn discard_and_write_zeroes_zero_their_ranges() {
    let f = Fixture::new();
    f.stack.write(&[0xab; 65536], 0).unwrap();
    // Two ranges in one DISCARD.
    f.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
    put_range(&f, DATA, 8, 8, 0);
    put_range(&f, DATA + 16, 32, 16, 0);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 32, false), (STATUS, 1, true)]),
        ok(1)
    );
    let mut back = vec![0u8; 65536];
    f.stack.read(&mut back, 0).unwrap();
    for (i, byte) in back.iter().enumerate() {
        let sector = i / 512;
        let zeroed = (8..16).contains(&sector) || (32..48).contains(&sector);
        assert_eq!(*byte, if zeroed { 0 } else { 0xab }, "byte {i}");
    }
    // WRITE_ZEROES, with "may unmap".
    f.header(HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    put_range(&f, DATA, 64, 2, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]),
        ok(1)
    );
    f.stack.read(&mut back, 0).unwrap();
    assert!(back[64 * 512..66 * 512].iter().all(|&b| b == 0));
    assert_eq!(back[66 * 512], 0xab);
}

#[test]
fn bad_discards() {
    let f = Fixture::new();
    let one = |sector: u64, sectors: u32, flags: u32, kind: u32| {
        f.header(HDR, kind, 0);
        put_range(&f, DATA, sector, sectors, flags);
        f.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)])
    };
    // DISCARD with the unmap flag, or unknown flags: unsupported.
    assert_eq!(one(0, 8, 1, VIRTIO_BLK_T_DISCARD), failed(Status::Unsupp));
    assert_eq!(
        one(0, 8, 2, VIRTIO_BLK_T_WRITE_ZEROES),
        failed(Status::Unsupp)
    );
    // Past the end, or too long.
    assert_eq!(
        one(SIZE / 512 - 4, 8, 0, VIRTIO_BLK_T_DISCARD),
        failed(Status::IoErr)
    );
    assert_eq!(
        one(0, MAX_DISCARD_SECTORS + 1, 0, VIRTIO_BLK_T_DISCARD),
        failed(Status::IoErr)
    );
    // No range, or not whole ranges.
    f.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        f.run(&[(HDR, 16, false), (STATUS, 1, true)]),
        failed(Status::IoErr)
    );
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 20, false), (STATUS, 1, true)]),
        failed(Status::IoErr)
    );
    // With 4 KiB blocks, ranges must be whole blocks.
    let g4k = Geometry {
        block_size: 4096,
        ..f.geometry()
    };
    put_range(&f, DATA, 4, 8, 0);
    assert_eq!(
        f.run_with(
            g4k,
            &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]
        ),
        failed(Status::IoErr)
    );
    put_range(&f, DATA, 8, 8, 0);
    assert_eq!(
        f.run_with(
            g4k,
            &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]
        ),
        ok(1)
    );
}

#[test]
fn a_read_only_device_refuses_changes() {
    let f = Fixture::new();
    let ro = Geometry {
        read_only: true,
        ..f.geometry()
    };
    f.header(HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        f.run_with(
            ro,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]
        ),
        failed(Status::IoErr)
    );
    f.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
    put_range(&f, DATA, 0, 8, 0);
    assert_eq!(
        f.run_with(
            ro,
            &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]
        ),
        failed(Status::Unsupp)
    );
    f.header(HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run_with(
            ro,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]
        ),
        ok(513)
    );
}

#[test]
fn a_large_read_through_the_bounce_buffer_in_chunks() {
    // 700 KiB in segments of 1000 and the rest: several bounce chunks.
    let f = Fixture::new();
    let len = 700 << 10;
    let data = pattern(len, 7);
    f.stack.write(&data, 1 << 20).unwrap();
    f.header(HDR, VIRTIO_BLK_T_IN, (1 << 20) / 512);
    let dest = 0x20_0000;
    let out = f.run(&[
        (HDR, 16, false),
        (dest, 1000, true),
        (dest + 1000, (len - 1000) as u32, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(out, ok(len as u32 + 1));
    assert_eq!(f.bytes(dest, len), data);
}

/// The queue threads' path with a live snapshot in the middle: OUT requests
/// enter the live stack ([`crate::enter`]) one at a time, as a queue thread
/// runs them, while another thread freezes the upper and installs a fresh
/// one. Every acknowledged write reads back from the new stack, and those
/// that went to the old stack from the frozen layer too: none is lost.
#[test]
fn writes_through_the_queue_path_survive_a_live_snapshot() {
    use overlaybd::live::{snapshot_stack, LiveStack, NewUpper};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    let f = Fixture::new();
    let live = LiveStack::new(f.stack.clone());
    let new_data = f._dir.path().join("upper-1.data");
    let new_index = f._dir.path().join("upper-1.index");
    let blocks = SIZE / 4096;
    // Each block's last write: its seed, and whether it went to the old
    // stack (then the frozen layer must hold it).
    let mut last: Vec<Option<(u8, bool)>> = vec![None; blocks as usize];
    let snapshotted = AtomicBool::new(false);
    let (mut to_old, mut to_new) = (0u32, 0u32);
    std::thread::scope(|scope| {
        let snapshot = scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            live.replace(Duration::from_secs(10), |stack| {
                let upper = NewUpper {
                    data: &new_data,
                    index: Some(&new_index),
                };
                Ok((snapshot_stack(stack, &upper)?, ()))
            })
            .unwrap();
            snapshotted.store(true, Ordering::SeqCst);
        });
        let mut n = 0u64;
        while !snapshotted.load(Ordering::SeqCst) || to_new < 64 {
            let block = (n * 97) % blocks;
            let seed = n as u8;
            n += 1;
            f.mem
                .write_slice(&pattern(4096, seed), GuestAddress(DATA))
                .unwrap();
            f.header(HDR, VIRTIO_BLK_T_OUT, block * 8);
            let queue = MockSplitQueue::new(&f.mem, 16);
            let raw: Vec<RawDescriptor> = [(HDR, 16, 0), (DATA, 4096, 0), (STATUS, 1, 1)]
                .iter()
                .map(|&(addr, len, write)| {
                    let flags = if write == 1 {
                        VRING_DESC_F_WRITE as u16
                    } else {
                        0
                    };
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
                })
                .collect();
            let chain = queue.build_desc_chain(&raw).unwrap();
            let entry = crate::enter(&live);
            let old = Arc::ptr_eq(entry.stack(), &f.stack);
            let device = Device {
                stack: entry.stack(),
                geometry: f.geometry(),
                id: device_id("test"),
                stats: &f.stats,
            };
            assert_eq!(execute(&device, chain, &mut Scratch::default()), ok(1));
            drop(entry);
            last[block as usize] = Some((seed, old));
            if old {
                to_old += 1;
            } else {
                to_new += 1;
            }
        }
        snapshot.join().unwrap();
    });
    assert!(to_old > 0, "no write before the snapshot");
    let stack = live.current();
    assert_eq!(stack.lowers().len(), 1, "the old upper is now a lower");
    let frozen = Stack::new(stack.lowers().to_vec(), None).unwrap();
    let mut back = vec![0u8; 4096];
    for (block, last) in last.iter().enumerate() {
        let at = block as u64 * 4096;
        let Some((seed, old)) = *last else { continue };
        stack.read(&mut back, at).unwrap();
        assert!(back == pattern(4096, seed), "block {block}");
        if old {
            frozen.read(&mut back, at).unwrap();
            assert!(back == pattern(4096, seed), "frozen block {block}");
        }
    }
}
