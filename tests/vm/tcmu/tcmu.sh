#!/usr/bin/env bash
# TCMU end to end, in the VM (tests/vm/run.sh -- tests/vm/tcmu/tcmu.sh):
# `obd tcmu` serves devices made with the containerd overlaybd
# snapshotter's configfs steps (target_core_user + tcm_loop → /dev/sdX).
#   a) reference vector stacks (LSMT, ZFile) read back with the right
#      sha256 per MiB;
#   b) the real two-layer image (its dev_config followed by `;<dev_id>`,
#      as newer snapshotters write it) mounts and matches dev-tree.json;
#   c) a writable upper: write files, umount, commit, serve again;
#   d) a bad config fails its device (resultFile failed:...) while another
#      device keeps working;
#   e) a restarted daemon picks up the devices that exist, and the reads
#      in flight when the old one was killed;
#   f) recordTracePath records under obd tcmu and the next device replays;
#   g) generic netlink: obd tcmu answers target_core_user as libtcmu does
#      (every device above is made with kernel command replies on, since
#      obd turns them on); a write left hanging by a daemon that is gone is
#      released when obd starts; enable, dev_size, emulate_write_cache and
#      rmdir return, each bounded; a larger dev_size grows an image with
#      a writable upper online (and is refused for a read-only one); a
#      bad config fails enable with an error instead of hanging; after obd
#      stops a device is made without a daemon and served by the next one;
#   h) logConfig and exporterConfig.
# Prints `tcmu: N passed, M failed` last; exits non-zero on any failure,
# including a kernel without TCMU.
set -u
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
OBD=${OBD_BIN:-$ROOT/target/debug/obd}
W=/tmp/tcmu
FIX=$ROOT/tests/fixtures
# shellcheck source=tests/vm/tcmu/lib.sh
. "$ROOT/tests/vm/tcmu/lib.sh"
mkdir -p $W/ref $W/mnt
LOG=${OBD_VM_RESULTS:-$W}/tcmu-daemon.log
pass=0
fail=0
ok() { echo "ok: $*"; pass=$((pass + 1)); }
bad() { echo "FAIL: $*"; fail=$((fail + 1)); }
finish() {
    echo "tcmu: $pass passed, $fail failed"
    [ "$fail" -eq 0 ] && [ "$pass" -gt 0 ]
    exit $?
}
t0=$(date +%s)
elapsed() { echo "$(($(date +%s) - t0))s"; }

if [ ! -d $C/core ] || [ ! -d /sys/module/target_core_user ] || [ ! -d /sys/module/tcm_loop ]; then
    bad "TCMU is missing in this kernel (target_core_user, tcm_loop, configfs)"
    finish
fi
if ! [ -x "$OBD" ]; then
    bad "no obd binary at $OBD (cargo build first)"
    finish
fi

DAEMON=
start_daemon() {
    "$OBD" tcmu >>$LOG 2>&1 &
    DAEMON=$!
}
stop_daemon() {
    [ -n "$DAEMON" ] && kill -${1:-TERM} "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
    DAEMON=
}

# vsize LAYER: the virtual size in its header.
vsize() {
    "$OBD" info "$1" --json | grep -m1 '"virtual_size"' | tr -dc 0-9
}

# config NAME LOWER... [-- UPPER_DATA UPPER_INDEX]: write $W/NAME.json.
config() {
    local name=$1 lowers="" upper="{}" sep=""
    shift
    while [ $# -gt 0 ] && [ "$1" != -- ]; do
        lowers="$lowers$sep{\"file\": \"$1\"}"
        sep=", "
        shift
    done
    [ "${1:-}" = -- ] && upper="{\"data\": \"$2\", \"index\": \"$3\"}"
    echo "{\"lowers\": [$lowers], \"upper\": $upper, \"resultFile\": \"$W/$name.result\"}" >$W/$name.json
}

# sha_per_mib DEV COUNT: sha256 of each of the first COUNT MiB, one a line
# (dd and sha256sum: python3 starts slowly over 9p under TCG).
sha_per_mib() {
    local i
    for i in $(seq 0 $(($2 - 1))); do
        timeout 60 dd if="$1" bs=1M count=1 skip=$i iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
    done
}

# still_reads_right NAME: device NAME (made in a)) reads again what its
# NAME.want says, every MiB of it.
still_reads_right() {
    sha_per_mib "${DEV[$1]:-/nonexistent}" "$(wc -l <"$W/$1.want")" >"$W/$1.again" 2>/dev/null
    cmp -s "$W/$1.want" "$W/$1.again"
}

# wait_result NAME: the resultFile of NAME, once written (10 s at most).
wait_result() {
    local i
    for i in $(seq 1 50); do
        [ -s $W/$1.result ] && break
        sleep 0.2
    done
    cat $W/$1.result 2>/dev/null
}

start_daemon
echo "setup done ($(elapsed))"

# ---- a) reference vectors -------------------------------------------------
tar xzf $FIX/overlaybd-ref-v1.tgz -C $W/ref
echo "  fixtures extracted ($(elapsed))"
R=$W/ref
REF_SIZE=$(vsize $R/layer0.lsmt)
DEV_SIZE=$(vsize $FIX/real-dev-image/dev-layer1.blob)
echo "  sizes read ($(elapsed))"
# One python3 run writes every reference config and its expected hashes.
python3 - $R $W <<'EOF' >$W/ref/plan
import json, sys
r, w = sys.argv[1], sys.argv[2]
m = json.load(open(r + "/manifest.json"))
layers = m["layers"]
mib = m["span_bytes"] >> 20
last = len(layers) - 1
stacks = [("lsmt%d" % k, k, [l["lsmt"] for l in layers[: k + 1]]) for k in range(len(layers))]
stacks += [("zcommit", last, [l["zfile_commit"] for l in layers]),
           ("ztool", last, [l["zfile_tool"] for l in layers])]
for name, top, files in stacks:
    cfg = {"lowers": [{"file": r + "/" + f} for f in files], "upper": {}, "resultFile": w + "/" + name + ".result"}
    json.dump(cfg, open(w + "/" + name + ".json", "w"))
    open(w + "/" + name + ".want", "w").write("\n".join(layers[top]["stack_sha256_per_mib"]) + "\n")
    print(name, mib, *files)
EOF
echo "  reference plan written ($(elapsed))"
while read -r name mib files; do
    [ -n "${TCMU_ONLY:-}" ] && [ "$name" != "$TCMU_ONLY" ] && continue
    if ! make_dev "$name" "$W/$name.json" "$REF_SIZE"; then
        bad "a) $name: device not created"
        [ -n "${TCMU_FAILFAST:-}" ] && finish
        continue
    fi
    echo "  $name: device ${DEV[$name]} ($(elapsed))"
    sha_per_mib ${DEV[$name]} "$mib" >$W/$name.got
    if cmp -s $W/$name.want $W/$name.got && [ "$(wait_result $name)" = success ]; then
        ok "a) $name ($files) on ${DEV[$name]}: $mib MiB match ($(elapsed))"
    else
        bad "a) $name: sha256 per MiB differ or result '$(cat $W/$name.result 2>/dev/null)'"
    fi
done <$W/ref/plan
[ -n "${TCMU_ONLY:-}" ] && finish

# ---- b) the real image ----------------------------------------------------
# dev_config as newer snapshotters write it: `overlaybd/<config>;<dev_id>`.
D=$FIX/real-dev-image
config dev $D/dev-layer0.blob $D/dev-layer1.blob
if make_dev dev "$W/dev.json;snapshot-42" "$DEV_SIZE"; then
    if mount -o ro,noload ${DEV[dev]} $W/mnt && python3 $D/checktree.py $D/dev-tree.json $W/mnt; then
        ok "b) real image (dev_config ...dev.json;snapshot-42) on ${DEV[dev]} mounts and matches dev-tree.json ($(elapsed))"
    else
        bad "b) real image tree differs or does not mount"
    fi
    umount $W/mnt 2>/dev/null
else
    bad "b) device not created"
fi

# ---- c) writable upper ----------------------------------------------------
"$OBD" create $W/upper.data $W/upper.index 64 >/dev/null
config rw $D/dev-layer0.blob $D/dev-layer1.blob -- $W/upper.data $W/upper.index
if make_dev rw $W/rw.json "$DEV_SIZE" && [ "$(wait_result rw)" = success ]; then
    if mount ${DEV[rw]} $W/mnt; then
        mkdir -p $W/mnt/new
        head -c 3000000 /dev/urandom >$W/mnt/new/random.bin
        echo hello-tcmu >$W/mnt/new/hello.txt
        rm -f $W/mnt/docs/doc001.txt
        cp $W/mnt/new/random.bin $W/random.bin
        sync
        umount $W/mnt
        remove_dev rw
        if "$OBD" commit $W/upper.data $W/upper.index $W/layer2.lsmt >$W/commit.log 2>&1; then
            config rw2 $D/dev-layer0.blob $D/dev-layer1.blob $W/layer2.lsmt
            if make_dev rw2 $W/rw2.json "$DEV_SIZE"; then
                e2fsck -fn ${DEV[rw2]} >$W/fsck.log 2>&1
                fsck=$?
                mount -o ro,noload ${DEV[rw2]} $W/mnt
                if [ $fsck -eq 0 ] && cmp -s $W/mnt/new/random.bin $W/random.bin &&
                    [ "$(cat $W/mnt/new/hello.txt)" = hello-tcmu ] && [ ! -e $W/mnt/docs/doc001.txt ] &&
                    [ -e $W/mnt/docs/doc002.txt ]; then
                    ok "c) writes through TCMU survive commit; e2fsck -fn clean ($(elapsed))"
                else
                    bad "c) after commit: e2fsck rc $fsck or files differ"
                    tail -5 $W/fsck.log
                fi
                umount $W/mnt 2>/dev/null
            else
                bad "c) committed image: device not created"
            fi
        else
            bad "c) obd commit failed"
        fi
    else
        bad "c) writable device does not mount"
    fi
else
    bad "c) writable device not created: '$(cat $W/rw.result 2>/dev/null)'"
fi

# ---- d) bad configs -------------------------------------------------------
config missing $W/no-such-layer.lsmt
cp $R/layer0.lsmt $W/corrupt.lsmt
printf 'garbage-garbage-garbage' | dd of=$W/corrupt.lsmt conv=notrunc 2>/dev/null
config corrupt $W/corrupt.lsmt
for name in missing corrupt; do
    make_dev $name $W/$name.json 1073741824 >/dev/null 2>&1
    r=$(wait_result $name)
    case "$r" in
    failed:?*) ok "d) $name: resultFile says '$r'" ;;
    *) bad "d) $name: resultFile says '$r'" ;;
    esac
done
if still_reads_right lsmt0; then
    ok "d) another device still reads right"
else
    bad "d) another device stopped working"
fi

# ---- e) daemon restart ----------------------------------------------------
# Four readers run while the daemon is killed: the commands it had taken
# (answered as they finished, so some were answered out of ring order) are
# owed by the next daemon, from the ring or the ring journal, and every
# read completes once, with the right data.
mibs=$(wc -l <$W/ztool.want)
readers=""
for k in 1 2 3 4; do
    sha_per_mib "${DEV[ztool]:-/nonexistent}" "$mibs" >$W/ztool.inflight$k 2>/dev/null &
    readers="$readers $!"
done
sleep 0.5
stop_daemon KILL
echo 3 >/proc/sys/vm/drop_caches
start_daemon
# shellcheck disable=SC2086
wait $readers
right=0
for k in 1 2 3 4; do
    cmp -s $W/ztool.want $W/ztool.inflight$k && right=$((right + 1))
done
if [ $right -eq 4 ] && still_reads_right ztool && grep -q "answers as commands finish" $LOG; then
    ok "e) after a restart of obd tcmu (killed with reads in flight) the devices are served again, the reads right ($(elapsed))"
else
    bad "e) after a restart: $right of 4 readers in flight read right; served again: $(still_reads_right ztool && echo yes || echo no); out-of-order answers: $(grep -c 'answers as commands finish' $LOG)"
fi

# ---- f) recordTracePath: record under obd tcmu, then replay ---------------
# An empty trace file: the device's lower-layer reads are recorded and the
# trace (+ .ok) written when the device is removed; the next device with
# that trace replays it as prefetch (the daemon logs the replay's report).
config traced $R/layer0.lsmt
sed -i "s|\"resultFile\"|\"recordTracePath\": \"$W/traced.trace\", \"resultFile\"|" $W/traced.json
: >$W/traced.trace
make_dev traced $W/traced.json $(vsize $R/layer0.lsmt) >/dev/null 2>&1
if [ "$(wait_result traced)" = success ]; then
    sha_per_mib "${DEV[traced]}" 4 >/dev/null
    remove_dev traced
    for i in $(seq 1 50); do
        [ -e $W/traced.trace.ok ] && break
        sleep 0.2
    done
    if [ -s $W/traced.trace ] && [ -e $W/traced.trace.ok ]; then
        ok "f) a trace of $(stat -c %s $W/traced.trace) bytes was recorded under obd tcmu"
        rm -f $W/traced.result
        make_dev traced2 $W/traced.json $(vsize $R/layer0.lsmt) >/dev/null 2>&1
        for i in $(seq 1 100); do
            grep -q "trace replay done" $LOG && break
            sleep 0.2
        done
        if grep -q "trace replay done" $LOG; then
            ok "f) the next device replayed it: $(grep -m1 'trace replay done' $LOG)"
        else
            bad "f) no trace replay in the daemon log"
        fi
        remove_dev traced2
    else
        bad "f) no trace recorded (trace $(stat -c %s $W/traced.trace 2>/dev/null) bytes, .ok $(ls $W/traced.trace.ok 2>&1))"
    fi
else
    bad "f) the traced device did not start: $(cat $W/traced.result 2>/dev/null)"
fi

# ---- g) generic netlink -------------------------------------------------
# bounded SECS CMD...: run CMD, but wait at most SECS for it: 124 when it
# still runs then (a configfs write waiting for a netlink answer cannot be
# killed, so it is left behind), else its status. Its stderr is kept in
# $W/bounded.err.
bounded() {
    local secs=$1 i
    shift
    "$@" 2>$W/bounded.err &
    local pid=$!
    for i in $(seq 1 $((secs * 5))); do
        kill -0 $pid 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 $pid 2>/dev/null; then
        return 124
    fi
    wait $pid
}
# put FILE VALUE: write VALUE into the configfs FILE (one write).
put() {
    echo "$2" >"$1"
}
# answered WHAT STATUS: obd's log has an answer WHAT with STATUS after
# line $mark of the log.
answered() {
    tail -n +$((mark + 1)) $LOG | grep -q "answered $1 (dev id [0-9]*): $2"
}
# reply_support N: dmesg's last word on the kernel's reply support is N.
reply_support() {
    [ "$(dmesg | grep 'command reply support' | tail -1 | grep -o '[0-9]\.*$' | tr -dc 0-9)" = "$1" ]
}
U=$C/core/user_1
stop_daemon TERM
if reply_support 0; then
    ok "g) obd tcmu stopped: kernel command reply support turned off (dmesg)"
else
    bad "g) after obd tcmu stopped, dmesg: $(dmesg | grep 'command reply support' | tail -1)"
fi
# No daemon and replies off: a device is made at once, to be served later.
mkdir -p $U/idle
put $U/idle/control "dev_config=overlaybd/$W/lsmt0.json"
put $U/idle/control "dev_size=$REF_SIZE"
bounded 30 put $U/idle/enable 1
rc=$?
# A daemon that answers netlink (as libtcmu) ran and is gone: the kernel
# now waits for an answer to every new device.
"$OBD" tcmu --netlink-reply on >/dev/null
mkdir -p $U/hung
put $U/hung/control "dev_config=overlaybd/$W/lsmt0.json"
put $U/hung/control "dev_size=$REF_SIZE"
put $U/hung/enable 1 2>$W/hung.err &
hung=$!
sleep 2
if [ $rc -eq 0 ] && reply_support 1 && kill -0 $hung 2>/dev/null; then
    ok "g) with no daemon: replies off, enable returns; replies on (dmesg), enable waits"
else
    bad "g) with no daemon: enable rc $rc (want 0), reply support on: $(reply_support 1 && echo yes), enable waiting: $(kill -0 $hung 2>/dev/null && echo yes)"
fi
mark=$(wc -l <$LOG)
OBD_TCMU_NETLINK_DUMP=1 start_daemon
for i in $(seq 1 100); do
    kill -0 $hung 2>/dev/null || break
    sleep 0.2
done
if kill -0 $hung 2>/dev/null; then
    bad "g) the waiting enable was not released by obd tcmu's start"
else
    wait $hung
    ok "g) obd tcmu's start released the waiting enable (rc $?: $(tr -d '\n' <$W/hung.err | sed 's/.*: //'))"
fi
bounded 30 rmdir $U/hung
for i in $(seq 1 50); do
    tail -n +$((mark + 1)) $LOG | grep -q "(idle, .*serving" && break
    sleep 0.2
done
if tail -n +$((mark + 1)) $LOG | grep -q "(idle, .*serving" && reply_support 1; then
    ok "g) the device made with no daemon is served; reply support on again"
else
    bad "g) the device made with no daemon is not served"
fi
# Create, reconfigure and remove a device while obd answers.
mkdir -p $U/nl
put $U/nl/control "dev_config=overlaybd/$W/lsmt1.json"
put $U/nl/control "dev_size=$REF_SIZE"
bounded 120 put $U/nl/enable 1
rc=$?
if [ $rc -eq 0 ] && answered ADDED_DEVICE_DONE ok; then
    ok "g) enable returned once obd answered ADDED_DEVICE ($(elapsed))"
else
    bad "g) enable rc $rc ($(cat $W/bounded.err)), answer: $(grep -c ADDED_DEVICE_DONE $LOG)"
fi
bounded 60 put $U/nl/attrib/dev_size $REF_SIZE
rc1=$?
bounded 60 put $U/nl/attrib/dev_size $((REF_SIZE * 2))
rc2=$?
err2=$(cat $W/bounded.err)
bounded 60 put $U/nl/attrib/emulate_write_cache 0
rc3=$?
size=$(cat $U/nl/attrib/dev_size)
if [ $rc1 -eq 0 ] && [ $rc2 -ne 0 ] && [ $rc2 -ne 124 ] && [ $rc3 -ne 0 ] && [ $rc3 -ne 124 ] &&
    [ "$size" = "$REF_SIZE" ] && answered RECONFIG_DEVICE_DONE ok &&
    answered RECONFIG_DEVICE_DONE "-95 "; then
    ok "g) read-only image: dev_size the size served is taken, a larger one refused (${err2##*: }), emulate_write_cache refused; none hangs"
else
    bad "g) reconfig: same size rc $rc1, double rc $rc2 ($err2), write cache rc $rc3, dev_size now $size"
fi
# Online growth of an image with a writable upper: the kernel's dev_size,
# the disk's capacity (after the unit attention, on a rescan) and the
# upper's header follow; a write past the old end reads back.
"$OBD" create $W/nlrw.data $W/nlrw.index 1 >/dev/null
config nlrw $R/layer0.lsmt -- $W/nlrw.data $W/nlrw.index
GROWN=$((REF_SIZE + (64 << 20)))
if make_dev nlrw $W/nlrw.json "$REF_SIZE"; then
    sd=${DEV[nlrw]#/dev/}
    before=$(cat /sys/block/$sd/size)
    bounded 60 put $U/nlrw/attrib/dev_size $((REF_SIZE - (1 << 20)))
    rc1=$?
    err1=$(cat $W/bounded.err)
    bounded 60 put $U/nlrw/attrib/dev_size $GROWN
    rc2=$?
    echo 1 >/sys/block/$sd/device/rescan
    after=$(cat /sys/block/$sd/size)
    head -c $((1 << 20)) /dev/urandom >$W/tail.bin
    dd if=$W/tail.bin of=/dev/$sd bs=1M seek=$((REF_SIZE >> 20)) oflag=direct conv=notrunc 2>/dev/null
    back=$(timeout 60 dd if=/dev/$sd bs=1M skip=$((REF_SIZE >> 20)) count=1 iflag=direct 2>/dev/null | sha256sum)
    if [ $rc1 -ne 0 ] && [ $rc1 -ne 124 ] && [ $rc2 -eq 0 ] && [ "$before" = $((REF_SIZE / 512)) ] &&
        [ "$after" = $((GROWN / 512)) ] && [ "$(cat $U/nlrw/attrib/dev_size)" = $GROWN ] &&
        [ "$back" = "$(sha256sum <$W/tail.bin)" ] && [ "$(vsize $W/nlrw.data:$W/nlrw.index)" = $GROWN ]; then
        ok "g) writable upper: dev_size grows it online to $GROWN bytes ($before -> $after sectors, header too), a write past the old end reads back; shrinking refused (${err1##*: })"
    else
        bad "g) growth: shrink rc $rc1 ($err1), grow rc $rc2, sectors $before -> $after, upper vsize $(vsize $W/nlrw.data:$W/nlrw.index), tail read back $([ "$back" = "$(sha256sum <$W/tail.bin)" ] && echo same || echo differs)"
    fi
    remove_dev nlrw
else
    bad "g) growth: device nlrw not created"
fi
bounded 60 rmdir $U/nl
rc=$?
if [ $rc -eq 0 ] && answered REMOVED_DEVICE_DONE ok; then
    ok "g) rmdir returned once obd answered REMOVED_DEVICE"
else
    bad "g) rmdir rc $rc ($(cat $W/bounded.err))"
fi
# Bad configs: enable fails with the status obd answered, at once.
mkdir -p $U/nlbad $U/nlcorrupt
put $U/nlbad/control "dev_config=overlaybd/$W/no-such-config.json"
put $U/nlbad/control "dev_size=$REF_SIZE"
put $U/nlcorrupt/control "dev_config=overlaybd/$W/corrupt.json"
put $U/nlcorrupt/control "dev_size=$REF_SIZE"
bounded 60 put $U/nlbad/enable 1
rc1=$?
err1=$(cat $W/bounded.err)
bounded 60 put $U/nlcorrupt/enable 1
rc2=$?
err2=$(cat $W/bounded.err)
if [ $rc1 -ne 0 ] && [ $rc1 -ne 124 ] && [ $rc2 -ne 0 ] && [ $rc2 -ne 124 ] &&
    answered ADDED_DEVICE_DONE "-2 " && answered ADDED_DEVICE_DONE "-22 "; then
    ok "g) bad configs: enable fails at once (${err1##*: }; ${err2##*: })"
else
    bad "g) bad configs: enable rc $rc1 ($err1), $rc2 ($err2)"
fi
bounded 30 rmdir $U/nlbad
bounded 30 rmdir $U/nlcorrupt
bounded 30 rmdir $U/idle
echo "--- netlink answers"
tail -n +$((mark + 1)) $LOG | grep -E "netlink|answered" | head -40

# ---- h) logConfig: the daemon logs into logPath, rotated ----------------
stop_daemon TERM
cat >$W/logging.json <<JSON
{"logConfig": {"logPath": "$W/log/obd-tcmu.log", "logLevel": 1, "logSizeMB": 1, "logRotateNum": 2},
 "exporterConfig": {"enable": true, "port": 9863, "uriPrefix": "/metrics"},
 "enableAudit": true, "auditPath": "$W/audit.log", "ioEngine": 1, "cacheConfig": {"cacheType": "ocf"}}
JSON
"$OBD" tcmu --global-config $W/logging.json >>$LOG 2>&1 &
DAEMON=$!
for i in $(seq 1 50); do
    grep -q "serving" $W/log/obd-tcmu.log 2>/dev/null && break
    sleep 0.2
done
if grep -Eq '^[0-9]+\.[0-9]{3} INFO obd tcmu: .*serving' $W/log/obd-tcmu.log 2>/dev/null &&
    still_reads_right lsmt0; then
    ok "h) logConfig.logPath: $(grep -c . $W/log/obd-tcmu.log) timestamped lines, devices served"
else
    bad "h) no log in logConfig.logPath: $(head -c 300 $W/log/obd-tcmu.log 2>&1)"
fi
# Keys obd does not implement are named once, as warnings; enableAudit is
# implemented: not named, and the audit log is opened.
ignored=$(grep -c 'WARN obd tcmu: warning: not implemented, ignored: \(cacheConfig.cacheType "ocf"\|ioEngine 1\)' $W/log/obd-tcmu.log)
if [ "$ignored" = 2 ] && ! grep -q 'ignored: enableAudit' $W/log/obd-tcmu.log && [ -e $W/audit.log ]; then
    ok "h) cacheConfig.cacheType and ioEngine are named once as not implemented; enableAudit opened $W/audit.log"
else
    bad "h) $ignored of 2 ignored keys named, audit log $(ls $W/audit.log 2>&1): $(grep 'not implemented' $W/log/obd-tcmu.log)"
fi
# The exporter: a scrape over bash's /dev/tcp (python starts slowly here).
scrape() {
    exec 3<>/dev/tcp/127.0.0.1/9863 || return 1
    printf 'GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n' >&3
    timeout 10 cat <&3
    exec 3<&-
}
metrics=$(scrape 2>/dev/null)
reads=$(echo "$metrics" | grep "^obd_device_reads_total{config=\"$W/lsmt0.json\"}" | awk '{print $2}')
if echo "$metrics" | grep -q '^obd_tcmu_devices [1-9]' && [ "${reads:-0}" -gt 0 ]; then
    ok "h) exporterConfig: /metrics lists $(echo "$metrics" | grep '^obd_tcmu_devices') and $reads READs of lsmt0"
else
    bad "h) no metrics on :9863/metrics: $(echo "$metrics" | head -c 300)"
fi

# ---- teardown, reverse order ---------------------------------------------
for name in corrupt missing rw2 dev ztool zcommit lsmt2 lsmt1 lsmt0; do
    remove_dev $name
done
rmdir $C/core/user_1 2>/dev/null
if [ -z "$(ls $C/loopback 2>/dev/null | grep naa)" ] && [ ! -d $C/core/user_1 ]; then
    ok "teardown: configfs empty"
else
    bad "teardown left configfs entries"
fi
stop_daemon TERM
echo "--- daemon log"
tail -40 $LOG
finish
