#!/usr/bin/env bash
# Tests 4 and 5: a writable upper layer.
#  - ext4 mounted rw: write and delete files, sync, umount, `obd del`,
#    `obd commit` the upper into a layer, serve the two-layer stack again:
#    the changes are there and `e2fsck -fn` is clean;
#  - fio random writes with verify=crc32c; DISCARD and WRITE_ZEROES read
#    back as zeros; FLUSH succeeds;
#  - `obd snapshot` of a mounted device while fio writes and verifies on
#    it, twice, for append and sparse uppers: fio's verify passes, the
#    config names the frozen uppers, and the image served again from that
#    config has every file, e2fsck -fn clean;
#  - `obd resize`: on a kernel without UBLK_F_UPDATE_SIZE (before 6.16, as
#    this VM's 6.12) it fails saying so and nothing changes (device size,
#    upper files); on a newer one the device and the image grow. Shrinking
#    and a read-only device are clear errors.
#   tests/vm/run.sh -- bash tests/vm/ublk/writable.sh
SUITE=ublk-writable
source "$(dirname "$0")/lib.sh"

MNT=$WORK/mnt
mkdir -p "$MNT"

base_layer() {
    local src=$WORK/base-tree
    mkdir -p "$src/keep" "$src/gone"
    for i in $(seq 1 50); do head -c $((i * 1000)) /dev/urandom >"$src/keep/f$i"; done
    for i in $(seq 1 20); do head -c $((i * 3000)) /dev/urandom >"$src/gone/g$i"; done
    mkfs.ext4 -q -F -d "$src" "$WORK/base.raw" 64M || return 1
    "$OBD" import "$WORK/base.raw" "$WORK/base.lsmt" || return 1
    rm -f "$WORK/base.raw"
}

commit_roundtrip() {
    need_ublk || return 1
    base_layer || { fail "making the base layer"; return 1; }
    "$OBD" create "$WORK/up.data" "$WORK/up.index" 1 || return 1
    local cfg=$WORK/rw.json dev
    write_config "$cfg" "$WORK/up.data" "$WORK/up.index" "$WORK/base.lsmt"
    dev=$(add_device "$cfg" --queues 2) || return 1
    expect_result "$cfg" success || return 1
    mount "$dev" "$MNT" || { fail "mount rw"; return 1; }
    rm -rf "$MNT/gone"
    mkdir "$MNT/new"
    head -c 3M /dev/urandom >"$MNT/new/big.bin"
    for i in $(seq 1 100); do echo "file $i" >"$MNT/new/n$i.txt"; done
    echo changed >"$MNT/keep/f1"
    (cd "$MNT" && find new keep -type f -exec sha256sum {} + | sort -k2) >"$WORK/want.sums"
    sync
    umount "$MNT" || return 1
    "$OBD" del -n "${dev#/dev/ublkb}" || return 1
    "$OBD" commit "$WORK/up.data" "$WORK/up.index" "$WORK/up.lsmt" || return 1
    local cfg2=$WORK/ro.json
    write_config "$cfg2" "" "" "$WORK/base.lsmt" "$WORK/up.lsmt"
    dev=$(add_device "$cfg2") || return 1
    e2fsck -fn "$dev" >"$WORK/fsck.log" 2>&1 || { cat "$WORK/fsck.log"; fail "e2fsck -fn"; return 1; }
    log "e2fsck -fn: clean"
    mount -o ro,noload "$dev" "$MNT" || return 1
    local got
    got=$(cd "$MNT" && find new keep -type f -exec sha256sum {} + | sort -k2)
    local gone_left
    gone_left=$(ls "$MNT/gone" 2>/dev/null | wc -l)
    umount "$MNT"
    "$OBD" del -n "${dev#/dev/ublkb}" || return 1
    [[ $got == "$(cat "$WORK/want.sums")" ]] || { fail "files differ after commit"; return 1; }
    ((gone_left == 0)) || { fail "deleted files came back"; return 1; }
    log "$(wc -l <"$WORK/want.sums") files match after commit"
    no_devices
}

fio_verify() {
    need_ublk || return 1
    command -v fio >/dev/null || { fail "fio is not installed"; return 1; }
    "$OBD" create "$WORK/fio.data" "$WORK/fio.index" 1 || return 1
    local cfg=$WORK/fio.json dev
    write_config "$cfg" "$WORK/fio.data" "$WORK/fio.index"
    # An upper alone is a valid image; add a lower to read through, too.
    tar xzf "$FIXTURES/overlaybd-ref-v1.tgz" -C "$WORK" ./layer0.lsmt
    write_config "$cfg" "$WORK/fio.data" "$WORK/fio.index" "$WORK/layer0.lsmt"
    dev=$(add_device "$cfg" --queues 2 --depth 32) || return 1
    fio --name=verify --filename="$dev" --rw=randwrite --bs=4k --size=48M \
        --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c \
        --verify_fatal=1 --do_verify=1 --verify_state_save=0 --randrepeat=0 --output="$WORK/fio.out" ||
        { cat "$WORK/fio.out"; fail "fio verify"; return 1; }
    grep -E "err=|WRITE:|READ:" "$WORK/fio.out" | sed 's/^ */  /'
    # DISCARD and WRITE_ZEROES: the ranges read back as zeros.
    blkdiscard -o 1M -l 1M "$dev" || { fail "blkdiscard"; return 1; }
    blkdiscard -z -o 4M -l 2M "$dev" || { fail "blkdiscard -z"; return 1; }
    local z
    z=$(dd if="$dev" bs=1M skip=1 count=1 iflag=direct 2>/dev/null | tr -d '\0' | wc -c)
    ((z == 0)) || { fail "discarded MiB is not zeros"; return 1; }
    z=$(dd if="$dev" bs=1M skip=4 count=2 iflag=direct 2>/dev/null | tr -d '\0' | wc -c)
    ((z == 0)) || { fail "write-zeroed range is not zeros"; return 1; }
    sync "$dev" 2>/dev/null || blockdev --flushbufs "$dev"
    "$OBD" del -n "${dev#/dev/ublkb}" || return 1
    no_devices
}

live_snapshot() {
    need_ublk || return 1
    command -v fio >/dev/null || { fail "fio is not installed"; return 1; }
    [[ -f $WORK/base.lsmt ]] || base_layer || { fail "making the base layer"; return 1; }
    local kind
    for kind in append sparse; do
        local dir=$WORK/snap-$kind cfg dev id
        mkdir -p "$dir"
        cfg=$dir/config.json
        if [[ $kind == append ]]; then
            "$OBD" create "$dir/upper.data" "$dir/upper.index" 1 || return 1
            write_config "$cfg" "$dir/upper.data" "$dir/upper.index" "$WORK/base.lsmt"
        else
            "$OBD" create -s "$dir/upper.data" 1 || return 1
            printf '{"lowers":[{"file":"%s"}],"upper":{"data":"%s"}}\n' \
                "$WORK/base.lsmt" "$dir/upper.data" >"$cfg"
        fi
        dev=$(add_device "$cfg" --queues 2) || return 1
        id=${dev#/dev/ublkb}
        mount "$dev" "$MNT" || { fail "$kind: mount rw"; return 1; }
        echo before >"$MNT/before.txt"
        fio --name=snap --filename="$MNT/fio.dat" --rw=randwrite --bs=4k --size=24M \
            --ioengine=psync --fsync=16 --verify=crc32c --verify_fatal=1 \
            --do_verify=1 --verify_state_save=0 --randrepeat=0 \
            --output="$dir/fio.out" &
        local fio_pid=$! n
        for n in 1 2; do
            sleep 3
            "$OBD" snapshot -n "$id" >"$dir/snap$n.out" 2>&1 ||
                { cat "$dir/snap$n.out"; kill $fio_pid; fail "$kind: obd snapshot $n"; return 1; }
            log "$kind snapshot $n: $(tr '\n' ' ' <"$dir/snap$n.out")"
        done
        wait $fio_pid || { cat "$dir/fio.out"; fail "$kind: fio verify across two snapshots"; return 1; }
        grep -E "err=" "$dir/fio.out" | sed 's/^ */  /'
        echo after >"$MNT/after.txt"
        (cd "$MNT" && sha256sum before.txt after.txt fio.dat) >"$dir/want.sums"
        sync
        umount "$MNT" || return 1
        "$OBD" del -n "$id" || return 1
        local lowers
        lowers=$("$PY" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["lowers"]))' "$cfg")
        ((lowers == 3)) || { cat "$cfg"; fail "$kind: the config has $lowers lowers, not 3"; return 1; }
        [[ -f $dir/upper-2.data ]] || { ls "$dir"; fail "$kind: no upper-2.data"; return 1; }
        dev=$(add_device "$cfg") || return 1
        e2fsck -fn "$dev" >"$dir/fsck.log" 2>&1 || { cat "$dir/fsck.log"; fail "$kind: e2fsck -fn"; return 1; }
        mount "$dev" "$MNT" || return 1
        local got
        got=$(cd "$MNT" && sha256sum before.txt after.txt fio.dat)
        umount "$MNT"
        "$OBD" del -n "${dev#/dev/ublkb}" || return 1
        [[ $got == "$(cat "$dir/want.sums")" ]] || { fail "$kind: files differ when served again"; return 1; }
        log "$kind: 2 live snapshots under fio, served again from the rewritten config: files match, e2fsck clean"
    done
    # A read-only device has nothing to snapshot: a clear error.
    local ro=$WORK/snap-ro.json out
    write_config "$ro" "" "" "$WORK/base.lsmt"
    dev=$(add_device "$ro") || return 1
    if out=$("$OBD" snapshot -n "${dev#/dev/ublkb}" 2>&1); then
        fail "obd snapshot of a read-only device succeeded"; return 1
    fi
    [[ $out == *read-only* ]] || { fail "unclear error: $out"; return 1; }
    log "read-only device: $out"
    "$OBD" del -n "${dev#/dev/ublkb}" || return 1
    no_devices
}

resize() {
    need_ublk || return 1
    [[ -f $WORK/base.lsmt ]] || base_layer || { fail "making the base layer"; return 1; }
    local dir=$WORK/resize cfg dev id out before after sums
    mkdir -p "$dir"
    cfg=$dir/config.json
    "$OBD" create "$dir/upper.data" "$dir/upper.index" 1 || return 1
    write_config "$cfg" "$dir/upper.data" "$dir/upper.index" "$WORK/base.lsmt"
    dev=$(add_device "$cfg") || return 1
    id=${dev#/dev/ublkb}
    before=$(blockdev --getsize64 "$dev")
    dd if=/dev/urandom of="$dev" bs=1M count=1 seek=3 oflag=direct conv=fsync 2>/dev/null || return 1
    sums=$(sha256sum "$dir/upper.data" "$dir/upper.index")
    if out=$("$OBD" resize -n "$id" 512M 2>&1); then
        fail "obd resize to a smaller size succeeded"; return 1
    fi
    [[ $out == *"cannot shrink"* ]] || { fail "unclear error for shrinking: $out"; return 1; }
    log "shrink: $out"
    local kernel major minor
    kernel=$(uname -r)
    IFS=. read -r major minor _ <<<"$kernel"
    if ((major < 6 || (major == 6 && minor < 16))); then
        if out=$("$OBD" resize -n "$id" 2G 2>&1); then
            fail "obd resize succeeded on $kernel, which has no UBLK_F_UPDATE_SIZE"; return 1
        fi
        log "grow on $kernel: $out"
        [[ $out == *"cannot resize a live device"* && $out == *"nothing was changed"* ]] ||
            { fail "unclear error on $kernel: $out"; return 1; }
        after=$(blockdev --getsize64 "$dev")
        ((after == before)) || { fail "the device went from $before to $after bytes"; return 1; }
        [[ $(sha256sum "$dir/upper.data" "$dir/upper.index") == "$sums" ]] ||
            { fail "the upper's files changed"; return 1; }
    else
        "$OBD" resize -n "$id" 2G || { fail "obd resize on $kernel"; return 1; }
        after=$(blockdev --getsize64 "$dev")
        ((after == 2 << 30)) || { fail "the device has $after bytes after growing to 2G"; return 1; }
        dd if=/dev/urandom of="$dev" bs=1M count=1 seek=2000 oflag=direct 2>/dev/null ||
            { fail "writing past the old end"; return 1; }
    fi
    "$OBD" del -n "$id" || return 1
    # A read-only device cannot grow.
    local ro=$dir/ro.json
    write_config "$ro" "" "" "$WORK/base.lsmt"
    dev=$(add_device "$ro") || return 1
    if out=$("$OBD" resize -n "${dev#/dev/ublkb}" 2G 2>&1); then
        fail "obd resize of a read-only device succeeded"; return 1
    fi
    [[ $out == *read-only* ]] || { fail "unclear error: $out"; return 1; }
    log "read-only device: $out"
    "$OBD" del -n "${dev#/dev/ublkb}" || return 1
    no_devices
}

check "ext4 rw, obd commit, two-layer stack has the changes, e2fsck -fn clean" commit_roundtrip
check "fio randwrite verify=crc32c, discard, write-zeroes" fio_verify
check "obd snapshot twice under fio (append and sparse uppers), served again from the new config" live_snapshot
check "obd resize: a clear error and no change where the kernel cannot resize; no shrinking" resize
finish
