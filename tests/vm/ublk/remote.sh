#!/usr/bin/env bash
# Test 7: an image whose layer lives in a registry, served lazily.
#  - an ext4 image (`mkfs.ext4 -d` over many small files and a few large
#    ones) is `obd import`ed, `obd push`ed to a docker-registry on the
#    guest's own 127.0.0.1, and `obd add --config --global-config` serves the
#    pushed config (dir + digest + size, no local copy) with a fresh blob
#    cache; mounted -o ro, a few small files read fetch a small fraction of
#    the blob (counted in the registry's access log and the cache), then
#    every file matches the source tree;
#  - the same for the ZFile-compressed layer;
#  - with the registry frozen (SIGSTOP), a read of unfetched data waits
#    while cached data on the same (single) queue is still served, and
#    completes right once the registry resumes;
#  - with the registry stopped, a read of a range never fetched fails (EIO)
#    within a bounded time instead of hanging, and `obd del` still works;
#  - a ublk device and an `obd tcmu` device of one registry image share one
#    cacheDir smaller than the blob; both trees match, the cache stays
#    within its capacity, and obd tcmu's audit log lists the downloads;
#  - with background download on (no delay), the daemon that `obd add`
#    starts downloads the whole blob into the lower's dir and switches to
#    it (the download threads start when the image opens, which must be in
#    the daemon, not in the `obd add` process that exits); with
#    enableAudit, that daemon's audit log lists the blob's `download`s and
#    `bk_download` chunks, and its log names the ignored `ioEngine` once.
#   tests/vm/run.sh -- bash tests/vm/ublk/remote.sh
SUITE=ublk-remote
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/registry-lib.sh"

MNT=$WORK/mnt
SRC=$WORK/tree
mkdir -p "$MNT"

# The image, built once: plain and ZFile layers of one ext4 filesystem.
build_image() {
    random_tree "$SRC" seed=7 files_per_dir=30 sub_every=4 \
        sizes=0,1,100,511,4096,4097,12000,30000 large_mib=2,4,10 || return 1
    mkfs.ext4 -q -F -d "$SRC" "$WORK/ext4.raw" 64M >/dev/null || { fail "mkfs.ext4"; return 1; }
    "$OBD" import "$WORK/ext4.raw" "$WORK/ext4.lsmt" >/dev/null 2>"$WORK/import.err" ||
        { fail "obd import: $(tail -c 300 "$WORK/import.err")"; return 1; }
    "$OBD" import -z "$WORK/ext4.raw" "$WORK/ext4.zfile" >/dev/null 2>"$WORK/import.err" ||
        { fail "obd import -z: $(tail -c 300 "$WORK/import.err")"; return 1; }
    rm -f "$WORK/ext4.raw"
}

# serve_remote LAYER NAME: push LAYER as obd/NAME, then add its config with
# a fresh cache; sets CFG, GLOBAL, CACHE, DIGEST, BLOB_SIZE, DEV, MARK.
serve_remote() {
    local layer=$1 name=$2 queues=${3:-2}
    CFG=$WORK/$name/config.v1.json
    GLOBAL=$WORK/$name/overlaybd.json
    CACHE=$WORK/$name/cache
    mkdir -p "$WORK/$name"
    push_layer "$layer" "obd/$name" "$CFG" || return 1
    set_config "$CFG" || return 1
    cache_dir "$CACHE" || return 1
    global_config "$GLOBAL" "$CACHE" || return 1
    DIGEST=$(blob_digest "$CFG")
    BLOB_SIZE=$(stat -c %s "$layer")
    [[ ! -e $WORK/$name/layers ]] || { fail "a local copy of the layer exists"; return 1; }
    MARK=$(log_mark)
    DEV=$(add_device "$CFG" --global-config "$GLOBAL" --queues "$queues" --depth 32) || return 1
    expect_result "$CFG" success
}

# lazy_case LAYER NAME: the lazy read test for one layer kind.
lazy_case() {
    need_ublk || return 1
    need_registry || return 1
    local layer=$1 name=$2
    serve_remote "$layer" "$name" || return 1
    local t0 added
    read -r added _ < <(fetched_since "$MARK" "$DIGEST")
    log "blob $BLOB_SIZE bytes; obd add made $added GETs"
    t0=$(date +%s.%N)
    mount -o ro,noload "$DEV" "$MNT" || { fail "mount $DEV"; return 1; }
    local f
    for f in d00/f001 d03/f010 d07/sub/f008 d19/f029 link; do
        cmp "$SRC/$f" "$MNT/$f" || { fail "$f differs"; umount "$MNT"; return 1; }
    done
    local gets bytes cached
    read -r gets bytes < <(fetched_since "$MARK" "$DIGEST")
    cached=$(cache_bytes "$CACHE")
    log "mount + 5 small files: $gets GETs, $bytes bytes fetched ($((100 * bytes / BLOB_SIZE))% of the blob), cache holds $cached bytes, $(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)") s"
    if ((bytes == 0 || bytes * 4 > BLOB_SIZE)); then
        fail "expected a small part of the blob to be fetched, got $bytes of $BLOB_SIZE"
        umount "$MNT"
        return 1
    fi
    ((cached * 3 < BLOB_SIZE)) || { fail "the cache holds $cached bytes of a $BLOB_SIZE-byte blob"; umount "$MNT"; return 1; }
    t0=$(date +%s.%N)
    same_tree "$SRC" "$MNT"
    local rc=$?
    read -r gets bytes < <(fetched_since "$MARK" "$DIGEST")
    log "whole tree: $gets GETs, $bytes bytes fetched in all ($((100 * bytes / BLOB_SIZE))% of the blob), cache $(cache_bytes "$CACHE") bytes, $(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)") s"
    umount "$MNT" || return 1
    "$OBD" del -n "${DEV#/dev/ublkb}" || return 1
    umount "$CACHE"
    no_devices || return 1
    return "$rc"
}

# registry_stalls: with one queue and the registry frozen (SIGSTOP: its
# connections open but nothing answers), a read of unfetched data waits on
# the registry while reads of cached data on the same queue are still
# served; once the registry resumes, the waiting read completes right.
registry_stalls() {
    need_ublk || return 1
    need_registry || return 1
    serve_remote "$WORK/ext4.lsmt" stall 1 || return 1
    mount -o ro,noload "$DEV" "$MNT" || { fail "mount $DEV"; return 1; }
    # large0.bin (2 MiB) is fetched (and cached) now. Reading it in order
    # has read-ahead fetch up to two windows past it (large1.bin, 4 MiB,
    # may come with them); the last MiBs of large2.bin (10 MiB) are not.
    cmp "$SRC/big/large0.bin" "$MNT/big/large0.bin" || { fail "large0.bin differs"; umount "$MNT"; return 1; }
    local reg
    reg=$(cat "$REG_DIR/pid")
    kill -STOP "$reg"
    timeout 120 dd if="$MNT/big/large2.bin" of="$WORK/stalled.bin" bs=1M skip=8 count=2 iflag=direct \
        2>"$WORK/stalled.err" &
    local stalled=$! rc=0 waiting_before waiting_after
    sleep 2
    kill -0 "$stalled" 2>/dev/null && waiting_before=1 || waiting_before=0
    # O_DIRECT: past the page cache, to the device, for cached chunks.
    timeout 120 dd if="$MNT/big/large0.bin" of="$WORK/cached.bin" bs=1M iflag=direct 2>"$WORK/cached.err" || rc=$?
    kill -0 "$stalled" 2>/dev/null && waiting_after=1 || waiting_after=0
    log "registry frozen: unfetched read waiting before/after the cached read: $waiting_before/$waiting_after; cached read status $rc"
    kill -CONT "$reg"
    local stalled_rc=0
    wait "$stalled" || stalled_rc=$?
    local same=0
    dd if="$SRC/big/large2.bin" of="$WORK/stalled.want" bs=1M skip=8 count=2 2>/dev/null
    [[ $stalled_rc == 0 ]] && cmp -s "$WORK/stalled.want" "$WORK/stalled.bin" && same=1
    log "after the registry resumed: the waiting read ended with status $stalled_rc, bytes match: $same"
    umount "$MNT" || return 1
    "$OBD" del -n "${DEV#/dev/ublkb}" || return 1
    umount "$CACHE"
    no_devices || return 1
    ((waiting_before == 1)) || { fail "the read of unfetched data did not wait on the frozen registry"; return 1; }
    ((rc == 0)) && cmp -s "$SRC/big/large0.bin" "$WORK/cached.bin" ||
        { fail "the cached read failed ($rc) or differs: $(head -c 200 "$WORK/cached.err")"; return 1; }
    ((waiting_after == 1)) || { fail "the cached read was only served after the stalled fetch ended"; return 1; }
    ((same == 1)) || { fail "the waiting read did not return the right bytes once the registry resumed: $(head -c 200 "$WORK/stalled.err")"; return 1; }
}

# registry_down: reads that miss the cache fail with EIO once the registry
# is gone, in bounded time; the device is still deleted cleanly.
registry_down() {
    need_ublk || return 1
    need_registry || return 1
    serve_remote "$WORK/ext4.lsmt" down || return 1
    mount -o ro,noload "$DEV" "$MNT" || { fail "mount $DEV"; return 1; }
    cmp "$SRC/d01/f002" "$MNT/d01/f002" || { fail "d01/f002 differs"; umount "$MNT"; return 1; }
    stop_registry
    local t0 rc secs
    t0=$(date +%s.%N)
    timeout 240 cat "$MNT/big/large2.bin" >/dev/null 2>"$WORK/down.err"
    rc=$?
    secs=$(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")
    log "read with the registry stopped: status $rc after $secs s: $(head -c 200 "$WORK/down.err")"
    umount "$MNT" || { fail "umount"; return 1; }
    "$OBD" del -n "${DEV#/dev/ublkb}" || return 1
    umount "$CACHE"
    no_devices || return 1
    ((rc != 124)) || { fail "the read hung (killed by timeout after 240 s)"; return 1; }
    ((rc != 0)) || { fail "the read succeeded with no registry"; return 1; }
    grep -q "Input/output error" "$WORK/down.err" || { fail "expected EIO"; return 1; }
    grep -h "obd: " /run/obd/ublk/*.log 2>/dev/null | grep -m 2 -i "refused\|connect" | sed 's/^/  daemon: /'
    return 0
}

# download_in_daemon: the background download runs in the daemon and
# completes while the device is served.
download_in_daemon() {
    need_ublk || return 1
    need_registry || return 1
    local name=download
    CFG=$WORK/$name/config.v1.json
    GLOBAL=$WORK/$name/overlaybd.json
    CACHE=$WORK/$name/cache
    mkdir -p "$WORK/$name"
    push_layer "$WORK/ext4.lsmt" "obd/$name" "$CFG" || return 1
    set_config "$CFG" || return 1
    cache_dir "$CACHE" || return 1
    global_config "$GLOBAL" "$CACHE" || return 1
    "$PY" - "$GLOBAL" "$WORK/$name/audit.log" <<'PY' || { fail "edit $GLOBAL"; return 1; }
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["download"] = {"enable": True, "delay": 0, "delayExtra": 0, "maxMBps": 0}
cfg["enableAudit"] = True
cfg["auditPath"] = sys.argv[2]
cfg["ioEngine"] = 0
json.dump(cfg, open(sys.argv[1], "w"))
PY
    local digest
    digest=$(blob_digest "$CFG")
    DEV=$(add_device "$CFG" --global-config "$GLOBAL") || return 1
    local dir i
    dir=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["lowers"][-1]["dir"])' "$CFG")
    for ((i = 0; i < 300; i++)); do
        [[ -s $dir/overlaybd.commit ]] && break
        sleep 0.2
    done
    if [[ ! -s $dir/overlaybd.commit ]]; then
        fail "no download in $dir after 60 s (lost with the process that started the daemon?)"
        "$OBD" del -n "${DEV#/dev/ublkb}"
        umount "$CACHE"
        return 1
    fi
    cmp "$WORK/ext4.lsmt" "$dir/overlaybd.commit" || { fail "the downloaded layer differs"; return 1; }
    log "downloaded $(stat -c %s "$dir/overlaybd.commit") bytes into $dir"
    mount -o ro,noload "$DEV" "$MNT" || { fail "mount $DEV"; return 1; }
    cmp "$SRC/d03/f010" "$MNT/d03/f010" || { fail "d03/f010 differs"; umount "$MNT"; return 1; }
    umount "$MNT"
    local bk downloads ignored
    "$OBD" del -n "${DEV#/dev/ublkb}" || return 1
    umount "$CACHE"
    no_devices || return 1
    bk=$(grep -c " bk_download file=.*/$digest offset=[0-9]* size=[0-9]* latency_us=[0-9]* result=ok$" "$WORK/$name/audit.log")
    downloads=$(grep -c " download file=.*/$digest offset=" "$WORK/$name/audit.log")
    ignored=$(cat /run/obd/ublk/*.log 2>/dev/null | grep -c "warning: not implemented, ignored: ioEngine 0")
    log "audit log: $bk bk_download and $downloads download lines of $digest; ioEngine named $ignored times in the daemon logs"
    ((bk > 0 && downloads >= bk)) || { fail "the audit log lacks the download: $(head -n 3 "$WORK/$name/audit.log")"; return 1; }
    ((ignored == 1)) || { fail "the daemon named ioEngine $ignored times"; return 1; }
}

# shared_cache: a ublk device (obd add) and a TCMU device (obd tcmu) of one
# registry image at the same time, through one cacheDir smaller than the
# blob, so each process evicts what the other reads: both trees match, and
# the cache stays within its capacity; obd tcmu's audit log (enableAudit)
# lists the blob's downloads.
shared_cache() {
    need_ublk || return 1
    need_registry || return 1
    local name=shared cap_mb=8
    CFG=$WORK/$name/config.v1.json
    GLOBAL=$WORK/$name/overlaybd.json
    CACHE=$WORK/$name/cache
    mkdir -p "$WORK/$name" "$MNT.tcmu"
    push_layer "$WORK/ext4.zfile" "obd/$name" "$CFG" || return 1
    set_config "$CFG" || return 1
    cache_dir "$CACHE" || return 1
    "$PY" - "$GLOBAL" "$CACHE" "$cap_mb" <<'PY' || { fail "write $GLOBAL"; return 1; }
import json, sys
json.dump({"cacheConfig": {"cacheDir": sys.argv[2], "cacheSizeMB": int(sys.argv[3]),
                           "refillSize": 65536}}, open(sys.argv[1], "w"))
PY
    # obd tcmu also writes an audit log (enableAudit).
    "$PY" - "$GLOBAL" "$GLOBAL.tcmu" "$WORK/$name/tcmu-audit.log" <<'PY' || { fail "write $GLOBAL.tcmu"; return 1; }
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg.update({"enableAudit": True, "auditPath": sys.argv[3]})
json.dump(cfg, open(sys.argv[2], "w"))
PY
    sed "s|$CFG.result|$CFG.tcmu-result|" "$CFG" >"$CFG.tcmu.json"
    local udev
    udev=$(add_device "$CFG" --global-config "$GLOBAL") || return 1
    # The TCMU helpers keep their devices in an array named DEV.
    unset DEV
    # shellcheck source=tests/vm/tcmu/lib.sh
    source "$(dirname "${BASH_SOURCE[0]}")/../tcmu/lib.sh"
    "$OBD" tcmu --global-config "$GLOBAL.tcmu" >"$WORK/$name/tcmu.log" 2>&1 &
    local tcmu=$! size
    size=$(blockdev --getsize64 "$udev")
    make_dev shared "$CFG.tcmu.json" "$size" || { fail "TCMU device: $(tail -n 3 "$WORK/$name/tcmu.log")"; kill $tcmu; return 1; }
    local sd=${DEV[shared]:-}
    [[ -b $sd ]] || { fail "no TCMU disk"; kill $tcmu; return 1; }
    mount -o ro,noload "$udev" "$MNT" && mount -o ro,noload "$sd" "$MNT.tcmu" ||
        { fail "mount $udev and $sd"; kill $tcmu; return 1; }
    local largest=0 bytes rc1 rc2
    same_tree "$SRC" "$MNT" >"$WORK/$name/ublk.cmp" 2>&1 &
    local p1=$!
    same_tree "$SRC" "$MNT.tcmu" >"$WORK/$name/tcmu.cmp" 2>&1 &
    local p2=$!
    while kill -0 $p1 2>/dev/null || kill -0 $p2 2>/dev/null; do
        bytes=$(cache_bytes "$CACHE")
        ((bytes > largest)) && largest=$bytes
        sleep 0.2
    done
    wait $p1; rc1=$?
    wait $p2; rc2=$?
    umount "$MNT" "$MNT.tcmu"
    remove_dev shared
    kill $tcmu; wait $tcmu 2>/dev/null
    "$OBD" del -n "${udev#/dev/ublkb}" || return 1
    umount "$CACHE"
    log "ublk: $(tail -n 1 "$WORK/$name/ublk.cmp"); TCMU: $(tail -n 1 "$WORK/$name/tcmu.cmp"); cache at most $largest bytes (capacity $((cap_mb << 20)))"
    ((rc1 == 0)) || { fail "the ublk device's tree differs"; return 1; }
    ((rc2 == 0)) || { fail "the TCMU device's tree differs"; return 1; }
    local digest downloads evictions
    digest=$(blob_digest "$CFG")
    downloads=$(grep -c " download file=.*/$digest offset=[0-9]* size=[0-9]* latency_us=[0-9]* result=ok$" "$WORK/$name/tcmu-audit.log")
    evictions=$(grep -c " eviction file=.* result=ok$" "$WORK/$name/tcmu-audit.log")
    log "obd tcmu's audit log: $downloads download lines of $digest, $evictions evictions"
    ((downloads > 0)) || { fail "obd tcmu audited no download: $(head -n 3 "$WORK/$name/tcmu-audit.log")"; return 1; }
    # du counts whole blocks of every file the cache keeps (records too).
    ((largest <= (cap_mb << 20) + (1 << 20))) || { fail "the cache held $largest bytes"; return 1; }
    no_devices
}

log "building the image"
build_image || echo "  image build failed"
start_registry || echo "  registry start failed"
check "registry LSMT layer: obd add --global-config, mount reads a fraction of the blob, tree matches" lazy_case "$WORK/ext4.lsmt" plain
check "registry ZFile layer: mount reads a fraction of the blob, tree matches" lazy_case "$WORK/ext4.zfile" zfile
check "registry frozen: a fetch on one queue does not hold up cached reads on it" registry_stalls
check "background download: the daemon obd add starts downloads the blob and serves it" download_in_daemon
check "shared cache: a ublk and a TCMU device of one registry image, one small cacheDir, both trees match" shared_cache
check "registry stopped: a read of unfetched data fails with EIO in bounded time, obd del works" registry_down
stop_registry
unmount_caches
finish
