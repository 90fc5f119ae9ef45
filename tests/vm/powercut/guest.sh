#!/usr/bin/env bash
# The guest half of the power-cut test (tests/vm/powercut/run.sh runs it
# in the VM and kills qemu while it runs). On the virtio disk /dev/vda
# (ext4, opened by qemu with cache=none: what the guest has not flushed is
# really lost when qemu dies) it makes an image: an empty lower and a
# writable upper (POWERCUT_KIND: ublk-append, ublk-sparse, tcmu-append or
# tcmu-sparse), serves it, and writes 4 KiB blocks with O_DIRECT, each
# block stamped with its number and a generation; after every fsync of the
# device (a FLUSH), it appends the writes that the flush covered to
# $OBD_VM_RESULTS/acked.log. It never ends by itself.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MNT=/mnt/obd-powercut
OBD=${OBD_BIN:-obd}
# A relative path is relative to where the script started, not to $MNT.
[[ $OBD == */* && $OBD != /* ]] && OBD=$PWD/$OBD
kind=${POWERCUT_KIND:?}
mount /dev/vda "$MNT"
cd "$MNT"
size=$((1 << 30))
# An empty 1 GiB lower (a committed empty layer) under a fresh upper.
"$OBD" create empty.data empty.index 1 >/dev/null
"$OBD" commit empty.data empty.index lower.lsmt >/dev/null
case $kind in
    *-sparse) "$OBD" create -s upper.data 1 >/dev/null
        upper='{"data": "'$MNT'/upper.data"}' ;;
    *-append) "$OBD" create upper.data upper.index 1 >/dev/null
        upper='{"data": "'$MNT'/upper.data", "index": "'$MNT'/upper.index"}' ;;
    *) echo "unknown POWERCUT_KIND $kind" >&2; exit 2 ;;
esac
cat >config.v1.json <<JSON
{"lowers": [{"file": "$MNT/lower.lsmt"}], "upper": $upper, "resultFile": "$MNT/result"}
JSON
sync
case $kind in
    ublk-*) DEV=$("$OBD" add --config "$MNT/config.v1.json") ;;
    tcmu-*)
        # shellcheck source=tests/vm/tcmu/lib.sh
        source "$HERE/../tcmu/lib.sh"
        "$OBD" tcmu >"$OBD_VM_RESULTS/tcmu.log" 2>&1 &
        sleep 1
        make_dev powercut "$MNT/config.v1.json" "$size"
        DEV=${DEV[powercut]}
        ;;
esac
echo "serving $DEV ($kind)"
exec python3 - "$DEV" "$OBD_VM_RESULTS" <<'PY'
import mmap, os, random, struct, sys, zlib
dev, results = sys.argv[1], sys.argv[2]
BLOCKS = (64 << 20) // 4096
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
log = open(os.path.join(results, "acked.log"), "a")
rng = random.Random(os.getpid())
gen = 0
started = False
while True:
    pending = []
    for _ in range(rng.randint(1, 16)):
        gen += 1
        block = rng.randrange(BLOCKS)
        body = struct.pack("<8sQQ", b"OBDPCUT1", block, gen) * 170
        stamp = body + bytes(4096 - 4 - len(body))
        buf.seek(0)
        buf.write(stamp + struct.pack("<I", zlib.crc32(stamp)))
        os.pwrite(fd, buf, block * 4096)
        pending.append((block, gen))
    os.fsync(fd)
    log.write("".join(f"{b} {g}\n" for b, g in pending))
    log.flush()
    os.fsync(log.fileno())
    if not started:
        open(os.path.join(results, "started"), "w").close()
        started = True
PY
