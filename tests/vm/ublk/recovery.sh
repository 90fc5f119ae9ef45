#!/usr/bin/env bash
# Test 6: `kill -9` of the daemon under fio load, then `obd recover`: fio
# finishes with no I/O error and its crc32c verify passes.
#   tests/vm/run.sh -- bash tests/vm/ublk/recovery.sh
SUITE=ublk-recovery
source "$(dirname "$0")/lib.sh"

kill_and_recover() {
    need_ublk || return 1
    command -v fio >/dev/null || { fail "fio is not installed"; return 1; }
    tar xzf "$FIXTURES/overlaybd-ref-v1.tgz" -C "$WORK" ./layer0.lsmt
    "$OBD" create "$WORK/up.data" "$WORK/up.index" 1 || return 1
    local cfg=$WORK/rec.json dev id pid
    write_config "$cfg" "$WORK/up.data" "$WORK/up.index" "$WORK/layer0.lsmt"
    dev=$(add_device "$cfg" --queues 2 --depth 32) || return 1
    id=${dev#/dev/ublkb}
    pid=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "/run/obd/ublk/$id.json") || return 1
    fio --name=recover --filename="$dev" --rw=randwrite --bs=4k --size=32M \
        --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c \
        --verify_fatal=1 --do_verify=1 --verify_state_save=0 --randrepeat=0 --output="$WORK/fio.out" &
    local fio_pid=$!
    sleep 3
    kill -9 "$pid" || { fail "daemon $pid was not running"; return 1; }
    log "killed daemon $pid under fio load"
    sleep 1
    "$OBD" list | sed 's/^/  /'
    "$OBD" list --json | grep -q quiesced || { fail "device is not quiesced after the kill"; return 1; }
    local newdev
    newdev=$("$OBD" recover -n "$id") || { fail "obd recover"; return 1; }
    [[ $newdev == "$dev" ]] || { fail "recover printed $newdev, expected $dev"; return 1; }
    log "recovered $dev"
    wait "$fio_pid"
    local rc=$?
    grep -E "err=|WRITE:|READ:" "$WORK/fio.out" | sed 's/^ */  /'
    ((rc == 0)) || { cat "$WORK/fio.out"; fail "fio exited with $rc"; return 1; }
    "$OBD" list | grep -q live || { fail "device is not live after recovery"; return 1; }
    "$OBD" del -n "$id" || return 1
    no_devices
}

check "kill -9 under fio randwrite+verify, obd recover, fio passes" kill_and_recover
finish
