#!/usr/bin/env bash
# The real containerd flow with obd in place of overlaybd-tcmu, in the VM:
#
#   scripts/containerd-setup.sh     # host: containerd, runc, snapshotter, ctr
#   [OBD_CTR_RWMODE=dir|dev] OBD_VM_EXTRA_MODULES=overlay tests/vm/run.sh --timeout 1800 -- \
#       bash tests/vm/containerd/flow.sh
#
# In the guest: Debian's containerd 1.6 with the accelerated-container-image
# overlaybd-snapshotter as a proxy snapshot plugin, `obd tcmu` as the TCMU
# daemon (target_core_user + tcm_loop), a docker-registry on 127.0.0.1, and
# /opt/overlaybd/bin/overlaybd-{create,commit,zfile,tcmu} as links to obd.
# Everything writable lives on tmpfs (the guest's root is the host's,
# read-only): the snapshotter's root and containerd's under $W, /opt is a
# tmpfs.
#   a) two images are pushed with the overlaybd annotations (push-image.py):
#      the real-dev-image fixture (layers made by the reference convertor;
#      it has no binary, so busybox is bind-mounted into its container) and
#      a one-layer busybox image made with obd (mkfs.ext4 -d, obd import);
#   b) `ctr rpull` pulls each lazily: no layer blob is fetched by containerd;
#   c) `ctr run` starts a container from the fixture that prints files
#      from the image (sha256 against dev-tree.json); the snapshotter made
#      a TCMU device for it, served by obd (resultFile `success`);
#   d) `ctr record-trace` records a trace of the busybox image's first
#      start under obd tcmu (recordTracePath, the .lock/.ok protocol) and
#      makes an image with an acceleration layer;
#   e) a container from the busybox image prints its files; its writes
#      land in the snapshotter's writable layer, not in the image (rwMode
#      overlayfs: the snapshot's upper dir; OBD_CTR_RWMODE=dir or dev: the
#      writable_data of the container's own overlaybd device; dev: that
#      device is what containerd mounts, as ext4);
#   f) the traced image is pushed and rpulled (so the snapshotter sees its
#      acceleration layer), and a container from it that reads one small
#      file starts on a cold cache (obd tcmu restarted on an empty cache,
#      page cache dropped): obd replays the trace from the acceleration
#      layer, so the registry sends the 8 MiB file the recorded start read,
#      against ~1 MiB for the same start of the image without the trace.
# Prints `containerd: N passed, M failed` last.
set -u
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
OBD=${OBD_BIN:-$ROOT/target/release/obd}
CTR_BIN=${OBD_CTR_BIN:-/var/cache/obd-ctr/bin-v1.4.4}
ACTR=$CTR_BIN/ctr # accelerated-container-image's ctr: rpull, record-trace
SNAPSHOTTER=$CTR_BIN/overlaybd-snapshotter
FIX=$ROOT/tests/fixtures/real-dev-image
# The snapshotter's rwMode: overlayfs (an overlay upper dir on the image's
# device), dir (a writable overlaybd device per container, made with
# /opt/overlaybd/bin/overlaybd-create, i.e. obd, mounted by the
# snapshotter) or dev (the same device, mounted by containerd).
RWMODE=${OBD_CTR_RWMODE:-overlayfs}
W=/tmp/ctrflow
WORK=$W
PY=python3
OUT=${OBD_VM_RESULTS:-$W}
mkdir -p $W
pass=0
failed=0
ok() { echo "ok: $*"; pass=$((pass + 1)); }
bad() { echo "FAIL: $*"; failed=$((failed + 1)); }
fail() { bad "$@"; }
t0=$(date +%s)
elapsed() { echo "$(($(date +%s) - t0))s"; }
step() { echo "== $* ($(elapsed))"; }
# shellcheck source=tests/vm/ublk/registry-lib.sh
. "$ROOT/tests/vm/ublk/registry-lib.sh"

PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    sleep 1
    for f in tcmu.log snapshotter.log containerd.log registry/registry.log; do
        [ -f $W/$f ] && [ "$OUT" != "$W" ] && cp $W/$f "$OUT/" 2>/dev/null
    done
}
finish() {
    cleanup
    echo "containerd: $pass passed, $failed failed ($(elapsed))"
    [ "$failed" -eq 0 ] && [ "$pass" -gt 0 ]
    exit $?
}
trap 'finish' TERM INT

# ---- preconditions ---------------------------------------------------------------
for b in "$OBD" "$ACTR" "$SNAPSHOTTER" /usr/bin/containerd /usr/bin/ctr /usr/bin/containerd-shim-runc-v2 \
    /usr/sbin/runc /bin/busybox; do
    [ -x "$b" ] || { bad "missing $b (cargo build --release -p obd; scripts/containerd-setup.sh)"; finish; }
done
[ -d /sys/kernel/config/target/core ] && [ -d /sys/module/target_core_user ] && [ -d /sys/module/tcm_loop ] \
    || { bad "TCMU is missing in this kernel"; finish; }
grep -qw overlay /proc/filesystems || { bad "no overlay filesystem (OBD_VM_EXTRA_MODULES=overlay)"; finish; }

# ---- the guest's writable places -------------------------------------------------
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup || { bad "mount cgroup2"; finish; }
# /opt/overlaybd/bin is where the snapshotter looks for its tools.
mount -t tmpfs -o size=16m obd-opt /opt || { bad "tmpfs on /opt"; finish; }
mkdir -p /opt/overlaybd/bin
for t in overlaybd-create overlaybd-commit overlaybd-zfile overlaybd-tcmu; do
    ln -s "$OBD" /opt/overlaybd/bin/$t
done
# The blob cache evicts below 1 GiB free: give it its own big tmpfs.
mkdir -p $W/cache && mount -t tmpfs -o size=4g obd-cache $W/cache
mkdir -p $W/sn $W/ctr/root /run/containerd /run/overlaybd-snapshotter

# ---- obd tcmu --------------------------------------------------------------------
cat >$W/overlaybd.json <<EOF
{"cacheConfig": {"cacheType": "file", "cacheDir": "$W/cache", "cacheSizeGB": 2},
 "logConfig": {"logLevel": 1},
 "prefetchConfig": {"concurrency": 4}}
EOF
# Run under the reference daemon's name: obd dispatches on it.
start_tcmu() {
    /opt/overlaybd/bin/overlaybd-tcmu --global-config $W/overlaybd.json >>$W/tcmu.log 2>&1 &
    TCMU_PID=$!
    PIDS+=("$TCMU_PID")
}
start_tcmu

# ---- registry, snapshotter, containerd -------------------------------------------
start_registry || finish
REG=127.0.0.1:$REG_PORT

cat >$W/snapshotter.json <<EOF
{"root": "$W/sn", "address": "/run/overlaybd-snapshotter/overlaybd.sock",
 "verbose": "debug", "rwMode": "$RWMODE", "logReportCaller": false,
 "autoRemoveDev": false, "mirrorRegistry": [{"host": "$REG", "insecure": true}]}
EOF
"$SNAPSHOTTER" $W/snapshotter.json >$W/snapshotter.log 2>&1 &
PIDS+=($!)

cat >$W/containerd.toml <<EOF
version = 2
root = "$W/ctr/root"
state = "/run/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "/run/containerd/containerd.sock"
[proxy_plugins.overlaybd]
  type = "snapshot"
  address = "/run/overlaybd-snapshotter/overlaybd.sock"
EOF
containerd --config $W/containerd.toml --log-level debug >$W/containerd.log 2>&1 &
PIDS+=($!)

for _ in $(seq 1 300); do
    [ -S /run/overlaybd-snapshotter/overlaybd.sock ] && timeout 10 ctr version >/dev/null 2>&1 && break
    sleep 0.5
done
if timeout 20 ctr plugins ls 2>/dev/null | grep -q 'io.containerd.snapshotter.v1 *overlaybd *- *ok'; then
    ok "containerd $(containerd --version | awk '{print $3}') runs with the overlaybd snapshotter as a proxy plugin ($(elapsed))"
else
    bad "containerd or the snapshotter did not come up: $(tail -n 3 $W/containerd.log $W/snapshotter.log)"
    finish
fi

# ---- a) images -------------------------------------------------------------------
step "a) push images"
FIX_IMG=$REG/obd/dev:fixture
"$PY" "$ROOT/tests/vm/containerd/push-image.py" http://$REG obd/dev fixture \
    $FIX/dev-layer0.blob $FIX/dev-layer1.blob >$W/fixture.digest \
    && ok "a) pushed the reference-made image $FIX_IMG ($(cat $W/fixture.digest))" \
    || bad "a) push the fixture image"

# A busybox image made with obd: the one binary the record-trace container runs.
mkdir -p $W/bb/bin $W/bb/etc $W/bb/data $W/bb/proc $W/bb/sys $W/bb/dev $W/bb/tmp
cp /bin/busybox $W/bb/bin/
for a in sh cat ls sleep sha256sum head; do ln -s busybox $W/bb/bin/$a; done
echo "hello from an obd-made layer" >$W/bb/etc/hello.txt
head -c $((8 << 20)) /dev/urandom >$W/bb/data/random.bin
sha256sum $W/bb/data/random.bin | cut -d' ' -f1 >$W/bb.random.sha
truncate -s 64M $W/bb.raw
BB_IMG=$REG/obd/busybox:1
if mkfs.ext4 -q -F -d $W/bb $W/bb.raw && "$OBD" import $W/bb.raw $W/bb.layer -z -t -m "busybox" >$W/import.log 2>&1 \
    && "$PY" "$ROOT/tests/vm/containerd/push-image.py" http://$REG obd/busybox 1 $W/bb.layer \
        --cmd /bin/sh --cmd -c --cmd "cat /etc/hello.txt" >$W/bb.digest; then
    ok "a) pushed an obd-made busybox image $BB_IMG ($(stat -c %s $W/bb.layer) bytes)"
else
    bad "a) make or push the busybox image"
fi

# ---- b) rpull --------------------------------------------------------------------
blob_bytes() { # bytes of layer blobs the registry sent since log line MARK
    tail -n +"$(($1 + 1))" "$REG_LOG" | awk '$0 ~ /"GET [^ ]*\/blobs\/sha256:/ && $9 ~ /^20[06]$/ { b += $10 } END { print b + 0 }'
}
for img in $FIX_IMG $BB_IMG; do
    step "b) rpull $img"
    m=$(log_mark)
    if timeout 300 "$ACTR" rpull --plain-http "$img" >$W/rpull.out 2>&1; then
        # rpull fetches manifest and config; the layers stay in the registry.
        ok "b) ctr rpull $img ($(tail -n 1 $W/rpull.out); $(blob_bytes $m) blob bytes fetched, config only)"
    else
        bad "b) ctr rpull $img: $(tail -n 5 $W/rpull.out)"
    fi
done

# ---- c) run the fixture ----------------------------------------------------------
want_sha() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' $FIX/dev-tree.json "$1"; }
step "c) ctr run the fixture image"
m=$(log_mark)
if timeout 600 ctr run --snapshotter overlaybd --rm \
    --mount type=bind,src=/bin/busybox,dst=/bin/busybox,options=rbind:ro \
    $FIX_IMG fixture1 /bin/busybox sh -c \
    'cat /etc/os-release; /bin/busybox sha256sum /etc/os-release /docs/doc008.txt /data/blob.bin; echo written >/written-by-container' \
    >$W/run1.out 2>&1; then
    echo "  $(head -n 1 $W/run1.out)"
    good=1
    for f in etc/os-release docs/doc008.txt data/blob.bin; do
        grep -q "^$(want_sha $f)  /$f\$" $W/run1.out || { good=0; bad "c) /$f in the container differs from dev-tree.json"; }
    done
    [ $good = 1 ] && ok "c) a container from the reference-made image printed its files (sha256 match dev-tree.json; $(blob_bytes $m) bytes fetched lazily)"
else
    bad "c) ctr run the fixture image: $(tail -n 5 $W/run1.out)"
fi
# The snapshotter's devices, served by obd (in rwMode dir a container's
# device goes with it, so count obd's answers rather than configfs).
n=$(grep -c 'answered ADDED_DEVICE_DONE .*: ok' $W/tcmu.log)
res=$(cat $W/sn/snapshots/*/block/init-debug.log 2>/dev/null | sort | uniq -c | tr '\n' ' ')
if [ "$n" -ge 1 ] && ! grep -q failed $W/sn/snapshots/*/block/init-debug.log 2>/dev/null; then
    ok "c) the snapshotter made $n TCMU device(s) in user_999999999, obd answered each (resultFiles: $res)"
else
    bad "c) no TCMU device served by obd (answered: $n, results: $res)"
fi

# ---- d) record-trace: the busybox image's first start ----------------------------
# Before any other container of this image: the snapshotter attaches the
# image's device once and keeps it, so only the first start can record.
step "d) record-trace"
TR_IMG=$REG/obd/busybox:1-trace
# --runtime: its default, "io.containerd.runtime.v2", names the runtime
# plugin type in containerd 2; containerd 1.6 takes it for a shim name.
if timeout 600 "$ACTR" record-trace --disable-network-isolation --time 60 --snapshotter overlaybd \
    --runtime io.containerd.runc.v2 \
    $BB_IMG $TR_IMG /bin/sh -c 'cat /etc/hello.txt; sha256sum /data/random.bin' >$W/record.out 2>&1; then
    ok "d) ctr record-trace: $(grep -E 'Found OK|created' $W/record.out | tr '\n' ' ')"
    grep -q 'wrote .* trace records' $W/tcmu.log && echo "  $(grep -m1 'wrote .* trace records' $W/tcmu.log)"
else
    bad "d) ctr record-trace: $(tail -n 5 $W/record.out)"
fi

# ---- e) run the busybox image; its writes ----------------------------------------
step "e) ctr run the busybox image"
if timeout 600 ctr run --snapshotter overlaybd --rm $BB_IMG bb1 \
    /bin/sh -c 'cat /etc/hello.txt; sha256sum /data/random.bin' >$W/run2.out 2>&1 \
    && grep -q "hello from an obd-made layer" $W/run2.out && grep -q "^$(cat $W/bb.random.sha) " $W/run2.out; then
    ok "e) a container from the obd-made image printed: $(head -n 1 $W/run2.out)"
else
    bad "e) ctr run the busybox image: $(tail -n 5 $W/run2.out)"
fi
MARKER=written-by-the-container-$$
if timeout 120 ctr run --snapshotter overlaybd $BB_IMG bbw /bin/sh -c "echo $MARKER >/etc/written.txt; sync" >$W/run3.out 2>&1; then
    if [ "$RWMODE" = overlayfs ]; then
        up=$(grep -l "$MARKER" $W/sn/snapshots/*/fs/etc/written.txt 2>/dev/null | head -n 1)
    else
        # The device's ext4 wrote the file's block into obd's writable layer.
        up=$(grep -la "$MARKER" $W/sn/snapshots/*/block/writable_data 2>/dev/null | head -n 1)
    fi
    if [ -n "$up" ] && ! timeout 60 ctr run --snapshotter overlaybd --rm $BB_IMG bbr \
        /bin/sh -c 'test -e /etc/written.txt' >/dev/null 2>&1; then
        ok "e) the container's write is in the snapshotter's writable layer ($up, rwMode $RWMODE), not in the image"
    else
        bad "e) the container's write: not found in the writable layer (rwMode $RWMODE), or it leaked into the image"
    fi
    timeout 60 ctr container rm bbw >/dev/null 2>&1
    if [ "$RWMODE" = dev ]; then
        # rwMode dev: containerd mounts the device's ext4 as the root
        # file system itself (no bind of the snapshotter's mount point).
        devmounts=$(grep -o 'return mount point(R/W mode: dev): \[{ext4 /dev/sd[a-z]* ' $W/snapshotter.log | sort -u | tr -s ' ' | tr '\n' ';')
        if [ -n "$devmounts" ]; then
            ok "e) rwMode dev: the snapshotter gave containerd the overlaybd devices to mount as ext4 ($devmounts)"
        else
            bad "e) rwMode dev: no ext4 device mount in the snapshotter's log"
        fi
    fi
else
    bad "e) ctr run (write): $(tail -n 5 $W/run3.out)"
fi

# ---- f) the traced image replays the trace on a cold cache --------------------
# record-trace made the image locally. Debian's ctr 1.6 unpacks without
# passing layer annotations on as snapshot labels, so the snapshotter would
# not see the acceleration layer: push the image and rpull it, as a user
# would. The push is the 2.x ctr's (--local: no transfer service in 1.6),
# which, unlike 1.6's, does not need the base layer (never downloaded) in
# the local content store; the registry has it.
step "f) replay"
# cold_start: obd tcmu restarted on an empty cache, the guest's page cache
# dropped, and the registry log marked.
cold_start() {
    kill "$TCMU_PID" && wait "$TCMU_PID" 2>/dev/null
    rm -rf "${W:?}"/cache/*
    start_tcmu
    sleep 2
    sync && echo 3 >/proc/sys/vm/drop_caches
    MARK=$(log_mark)
}
# settled_bytes: blob bytes fetched since MARK once the count stops growing
# (a prefetch goes on after the container has exited).
settled_bytes() {
    local a b=-1
    for _ in $(seq 1 30); do
        a=$(blob_bytes "$MARK")
        [ "$a" = "$b" ] && break
        b=$a
        sleep 2
    done
    echo "$a"
}
if timeout 120 "$ACTR" images push --local --plain-http "$TR_IMG" >$W/push.out 2>&1 \
    && timeout 60 ctr image rm "$TR_IMG" >/dev/null 2>&1 \
    && timeout 300 "$ACTR" rpull --plain-http "$TR_IMG" >$W/rpull2.out 2>&1; then
    ok "f) pushed the traced image and rpulled it"
else
    bad "f) push and rpull the traced image: $(tail -n 3 $W/push.out $W/rpull2.out 2>/dev/null)"
fi
# Without the trace: what a start that reads one small file fetches.
cold_start
timeout 300 ctr run --snapshotter overlaybd --rm $BB_IMG bbc /bin/sh -c 'cat /etc/hello.txt' >$W/run5.out 2>&1
plain=$(settled_bytes)
echo "  without a trace, a cold start fetched $plain blob bytes"
cold_start
if timeout 600 ctr run --snapshotter overlaybd --rm "$TR_IMG" bbt /bin/sh -c 'cat /etc/hello.txt' >$W/run4.out 2>&1 \
    && grep -q "hello from an obd-made layer" $W/run4.out; then
    traced=$(settled_bytes)
    # The recorded start read the 8 MiB random file; this one does not.
    if [ "$traced" -ge $((8 << 20)) ] && [ "$traced" -gt $((plain + (4 << 20))) ]; then
        ok "f) a start from the traced image fetched $traced blob bytes (the recorded reads, prefetched) against $plain without the trace"
    else
        bad "f) the traced image started but fetched $traced bytes against $plain without the trace: no prefetch"
    fi
else
    bad "f) ctr run the traced image: $(tail -n 5 $W/run4.out)"
fi
echo "  $(grep -c . $W/tcmu.log) tcmu log lines; replay: $(grep -m1 'replay' $W/tcmu.log)"
finish
