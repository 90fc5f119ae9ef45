#!/usr/bin/env python3
"""Check an image read back after a power cut against the writes that were
acknowledged by a flush: every block whose write was acknowledged holds that
write or a later one to the same block, and no block holds anything but
zeros or a whole, correctly stamped write of that very block.

    check.py RAW ACKED_LOG
Prints one line of counts; exits 1 on any violation."""
import struct, sys, zlib

raw_path, log_path = sys.argv[1], sys.argv[2]
acked = {}
with open(log_path) as log:
    for line in log:
        parts = line.split()
        if len(parts) != 2:
            continue  # a torn last line: the cut hit the log write
        block, gen = int(parts[0]), int(parts[1])
        acked[block] = max(acked.get(block, 0), gen)
bad = lost = zero = newer = kept = unflushed = 0
with open(raw_path, "rb") as raw:
    data = raw.read()
for block in range(len(data) // 4096):
    page = data[block * 4096:(block + 1) * 4096]
    want = acked.get(block)
    if page == bytes(4096):
        zero += 1
        if want is not None:
            lost += 1
            print(f"block {block}: zeros, but generation {want} was flushed")
        continue
    stamp, crc = page[:-4], struct.unpack("<I", page[-4:])[0]
    magic, got_block, gen = struct.unpack("<8sQQ", stamp[:24])
    if magic != b"OBDPCUT1" or got_block != block or zlib.crc32(stamp) != crc \
            or stamp[:24] * 170 != stamp[:24 * 170]:
        bad += 1
        print(f"block {block}: not a whole write of this block")
        continue
    if want is None:
        unflushed += 1
    elif gen < want:
        lost += 1
        print(f"block {block}: generation {gen}, but {want} was flushed")
    elif gen > want:
        newer += 1
    else:
        kept += 1
print(f"flushed blocks {len(acked)}: kept {kept}, newer unflushed write {newer}, "
      f"lost {lost}; torn or foreign blocks {bad}; blocks written but never "
      f"flushed that made it {unflushed}; zero blocks {zero}")
sys.exit(1 if bad or lost else 0)
