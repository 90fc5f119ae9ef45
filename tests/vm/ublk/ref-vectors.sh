#!/usr/bin/env bash
# Test 1: the reference vectors' stacks (plain LSMT, the ZFile tool's
# output, `commit -z` output in three codecs) served as ublk devices read
# back with the manifest's sha256 of every MiB. Runs inside the VM:
#   tests/vm/run.sh -- bash tests/vm/ublk/ref-vectors.sh
SUITE=ublk-ref-vectors
source "$(dirname "$0")/lib.sh"

unpack_vectors

# stack_reads_back NAME TOP_INDEX QUEUES LAYER_FILE...: serve the layers
# and compare each MiB of the first 16 with the manifest's entry for layer
# TOP_INDEX (the stack 0..=TOP_INDEX).
stack_reads_back() {
    local name=$1 top=$2 queues=$3
    shift 3
    need_ublk || return 1
    local cfg=$WORK/$name.json files=()
    for f in "$@"; do files+=("$VEC/$f"); done
    write_config "$cfg" "" "" "${files[@]}"
    local dev
    dev=$(add_device "$cfg" --queues "$queues") || return 1
    expect_result "$cfg" success || return 1
    "$OBD" list | grep -q "$cfg" || { fail "obd list does not show $cfg"; return 1; }
    "$PY" - "$dev" "$VEC/manifest.json" "$top" <<'PY' || return 1
import hashlib, json, os, sys
dev, manifest, top = sys.argv[1], sys.argv[2], int(sys.argv[3])
want = json.load(open(manifest))["layers"][top]["stack_sha256_per_mib"]
fd = os.open(dev, os.O_RDONLY)
bad = 0
for mib, digest in enumerate(want):
    data = os.pread(fd, 1 << 20, mib << 20)
    if len(data) != 1 << 20 or hashlib.sha256(data).hexdigest() != digest:
        print(f"  MiB {mib}: sha256 mismatch", file=sys.stderr)
        bad += 1
# Odd-sized, unaligned-to-block reads through the page cache as well.
for off in (512, 4096 * 3 + 512, (5 << 20) - 512):
    os.pread(fd, 70000, off)
os.close(fd)
print(f"  {len(want) - bad}/{len(want)} MiB match")
sys.exit(1 if bad else 0)
PY
    # A read-only image is a read-only device.
    if dd if=/dev/zero of="$dev" bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null; then
        fail "writing to the read-only device $dev succeeded"
        return 1
    fi
    "$OBD" del -n "${dev#/dev/ublkb}" || return 1
    no_devices
}

check "plain layer0" stack_reads_back plain-1 0 1 layer0.lsmt
check "plain layers 0-1" stack_reads_back plain-2 1 1 layer0.lsmt layer1.lsmt
check "plain layers 0-2, 2 queues" stack_reads_back plain-3 2 2 layer0.lsmt layer1.lsmt layer2.lsmt
check "zfile tool output, layers 0-2" stack_reads_back zfile-3 2 1 \
    layer0.lsmt.zfile layer1.lsmt.zfile layer2.lsmt.zfile
check "commit -z lz4 4k / zstd 8k / lz4 16k, 2 queues" stack_reads_back commitz-3 2 2 \
    layer0.lz44k.zfile layer1.zstd8k.zfile layer2.lz416k.zfile
check "mixed plain and zfile" stack_reads_back mixed-3 2 1 \
    layer0.lz44k.zfile layer1.lsmt layer2.lsmt.zfile
finish
