#!/usr/bin/env bash
# Test 8: trace record and replay on a registry image, daemon side.
#  - the image holds a real program: python3, the shared libraries and the
#    stdlib modules `import json, hashlib` loads (copied from the system),
#    a data file it hashes and filler it never reads; `mkfs.ext4 -d`,
#    `obd import`, `obd push` to a docker-registry on the guest's 127.0.0.1;
#  - run 1: `obd add` with recordTracePath naming an empty file and a fresh
#    cache, `obd trace record` (eBPF) on the device at the same time; the
#    program runs chrooted in the mount; `obd del` writes the trace and
#    `<trace>.ok`; it decodes, and the eBPF events converted to a layer
#    trace cover most of its ranges;
#  - run 2: a fresh cache, recordTracePath naming the recorded trace: the
#    daemon fetches the recorded extents before the program asks (the
#    registry's access log shows the GETs before the mount, and few after),
#    and the program prints the same.
#   tests/vm/run.sh -- bash tests/vm/ublk/trace.sh
SUITE=ublk-trace
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/registry-lib.sh"
source "$(dirname "$0")/chroot-lib.sh"

MNT=$WORK/mnt
ROOT=$WORK/root
LAYER=$WORK/app.lsmt
PUSHED=$WORK/pushed/config.v1.json
TRACE=$WORK/app.trace
mkdir -p "$MNT" "$WORK/pushed"
PROG='import json, hashlib
d = open("/data/input.bin", "rb").read()
print(json.dumps({"n": len(d), "sha256": hashlib.sha256(d).hexdigest()}))'

# program_files: python3 and every file `import json, hashlib` loads (its
# modules, the mapped libraries and each library's soname links), one a line.
program_files() {
    "$PY" - <<'PY'
import os, sys
import json, hashlib  # noqa: F401 -- what the program imports
files = {sys.executable, "/usr/bin/python3", "/lib64/ld-linux-x86-64.so.2"}
for m in list(sys.modules.values()):
    for attr in ("__file__", "__cached__"):
        f = getattr(m, attr, None)
        if isinstance(f, str) and os.path.isfile(f):
            files.add(f)
for line in open("/proc/self/maps"):
    parts = line.split()
    if len(parts) >= 6 and parts[5].startswith("/") and os.path.isfile(parts[5]):
        files.add(parts[5])
for f in sorted(files):
    print(f)
    if ".so" in f:
        real_dir = os.path.realpath(os.path.dirname(f))
        for name in os.listdir(real_dir):
            p = f"{real_dir}/{name}"
            if os.path.islink(p) and os.path.realpath(p) == os.path.realpath(f):
                print(p)
PY
}

# make_root DIR: the program's files (program_files) and its data: an input
# it hashes and filler it never reads.
make_root() {
    program_files >"$WORK/program.files" || return 1
    copy_into_root "$1" "$WORK/program.files" || return 1
    "$PY" - "$1" <<'PY'
import os, random, sys
root = sys.argv[1]
os.makedirs(f"{root}/usr/lib/python3.11/lib-dynload", exist_ok=True)
os.makedirs(f"{root}/data")
rnd = random.Random(11)
open(f"{root}/data/input.bin", "wb").write(rnd.randbytes(2 << 20))
for i in range(2):
    with open(f"{root}/data/filler{i}.bin", "wb") as out:
        for _ in range(6):
            out.write(rnd.randbytes(1 << 20))
PY
}

# trace_ranges FILE: "<records> <bytes>" of an overlaybd binary trace.
trace_ranges() {
    "$PY" - "$1" <<'PY'
import struct, sys
b = open(sys.argv[1], "rb").read()
n = struct.unpack_from("<Q", b, 8)[0] // 24
print(n, sum(struct.unpack_from("<Q", b, 24 + 24 * i + 8)[0] for i in range(n)))
PY
}

# coverage A B: percent of the bytes of trace A that trace B's ranges cover.
coverage() {
    "$PY" - "$1" "$2" <<'PY'
import struct, sys
def ranges(path):
    b = open(path, "rb").read()
    n = struct.unpack_from("<Q", b, 8)[0] // 24
    out = []
    for i in range(n):
        _op, layer, count, off = struct.unpack_from("<B3xIQq", b, 24 + 24 * i)
        out.append((layer, off, off + count))
    return out
def merge(rs):
    out = []
    for layer, s, e in sorted(rs):
        if out and out[-1][0] == layer and s <= out[-1][2]:
            out[-1][2] = max(out[-1][2], e)
        else:
            out.append([layer, s, e])
    return out
a, b = merge(ranges(sys.argv[1])), merge(ranges(sys.argv[2]))
total = sum(e - s for _, s, e in a)
covered = 0
for layer, s, e in a:
    for l2, s2, e2 in b:
        if l2 == layer:
            covered += max(0, min(e, e2) - max(s, s2))
print(100 * covered // max(total, 1))
PY
}

build_image() {
    make_root "$ROOT" || return 1
    EXPECTED=$(chroot "$ROOT" /usr/bin/python3 -c "$PROG") || { fail "the program does not run from its tree"; return 1; }
    log "program tree $(du -sh "$ROOT" | cut -f1); expected output $EXPECTED"
    mkfs.ext4 -q -F -d "$ROOT" "$WORK/app.raw" 64M >/dev/null || { fail "mkfs.ext4"; return 1; }
    "$OBD" import "$WORK/app.raw" "$LAYER" >/dev/null 2>"$WORK/import.err" ||
        { fail "obd import: $(tail -c 300 "$WORK/import.err")"; return 1; }
    rm -f "$WORK/app.raw"
}

# new_config NAME TRACE: a copy of the pushed config recording into (or
# replaying) TRACE, and a global config with a fresh cache; sets CFG,
# GLOBAL, CACHE.
new_config() {
    CFG=$WORK/$1.json
    GLOBAL=$WORK/$1-global.json
    CACHE=$WORK/$1-cache
    cp "$PUSHED" "$CFG"
    set_config "$CFG" "recordTracePath=\"$2\"" || return 1
    cache_dir "$CACHE" || return 1
    global_config "$GLOBAL" "$CACHE" 4
}

# run_program: mount $DEV, run the program chrooted, umount; sets OUT and SECS.
run_program() {
    mount -o ro,noload "$DEV" "$MNT" || { fail "mount $DEV"; return 1; }
    local t0
    t0=$(date +%s.%N)
    OUT=$(chroot "$MNT" /usr/bin/python3 -c "$PROG" 2>"$WORK/prog.err")
    local rc=$?
    SECS=$(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")
    umount "$MNT" || { fail "umount"; return 1; }
    ((rc == 0)) || { fail "the program failed: $(tail -c 300 "$WORK/prog.err")"; return 1; }
    [[ $OUT == "$EXPECTED" ]] || { fail "the program printed '$OUT', expected '$EXPECTED'"; return 1; }
}

record_run() {
    need_ublk || return 1
    need_registry || return 1
    [[ -n ${EXPECTED:-} ]] || { fail "the image was not built"; return 1; }
    push_layer "$LAYER" obd/app "$PUSHED" || return 1
    : >"$TRACE"
    new_config rec "$TRACE" || return 1
    local digest blob mark
    digest=$(blob_digest "$CFG")
    blob=$(stat -c %s "$LAYER")
    mark=$(log_mark)
    DEV=$(add_device "$CFG" --global-config "$GLOBAL") || return 1
    [[ -e $TRACE.lock ]] || { fail "no $TRACE.lock while recording"; return 1; }
    # eBPF on the same device, from before the mount.
    "$OBD" trace record --device "$DEV" --duration 900 -o "$WORK/app.events" 2>"$WORK/ebpf.err" &
    local ebpf=$! i
    for ((i = 0; i < 600; i++)); do
        grep -q '^recording ' "$WORK/ebpf.err" && break
        kill -0 "$ebpf" 2>/dev/null || { fail "obd trace record exited: $(cat "$WORK/ebpf.err")"; return 1; }
        sleep 0.1
    done
    grep -q '^recording ' "$WORK/ebpf.err" || { kill -INT "$ebpf"; fail "obd trace record did not start"; return 1; }
    local gets bytes
    read -r gets _ < <(fetched_since "$mark" "$digest")
    mark=$(log_mark)
    run_program || { kill -INT "$ebpf"; return 1; }
    read -r gets bytes < <(fetched_since "$mark" "$digest")
    echo "$gets" >"$WORK/run1.gets"
    log "run 1 (recording): mount + program ${SECS} s, $gets GETs / $bytes bytes fetched of a $blob-byte blob; printed $OUT"
    kill -INT "$ebpf"
    wait "$ebpf" || { fail "obd trace record: $(tail -c 300 "$WORK/ebpf.err")"; return 1; }
    "$OBD" del -n "${DEV#/dev/ublkb}" || return 1
    umount "$CACHE"
    no_devices || return 1
    [[ -e $TRACE.ok ]] || { fail "no $TRACE.ok after obd del"; return 1; }
    [[ ! -e $TRACE.lock ]] || { fail "$TRACE.lock is left after obd del"; return 1; }
    [[ -s $TRACE ]] || { fail "the trace is empty"; return 1; }
    "$OBD" trace show "$TRACE" >"$WORK/show.out" || { fail "obd trace show $TRACE"; return 1; }
    local n tb
    read -r n tb < <(trace_ranges "$TRACE")
    log "daemon trace: $n records, $tb bytes ($((100 * tb / blob))% of the blob)"
    ((n > 0 && tb < blob)) || { fail "expected a trace of part of the blob"; return 1; }
    "$OBD" trace convert "$LAYER" -i "$WORK/app.events" -o "$WORK/ebpf.trace" >"$WORK/convert.out" ||
        { fail "obd trace convert"; return 1; }
    local cov
    cov=$(coverage "$TRACE" "$WORK/ebpf.trace") || return 1
    read -r n tb < <(trace_ranges "$WORK/ebpf.trace")
    log "eBPF trace (converted): $n records, $tb bytes; covers $cov% of the daemon trace's bytes"
    ((cov >= 80)) || { fail "the eBPF trace covers only $cov% of the daemon trace"; return 1; }
}

replay_run() {
    need_ublk || return 1
    need_registry || return 1
    [[ -e $TRACE.ok && -s $TRACE ]] || { fail "no recorded trace (run 1 failed)"; return 1; }
    new_config rep "$TRACE" || return 1
    local digest blob mark gets bytes prev=-1 stable=0 i t0 secs
    digest=$(blob_digest "$CFG")
    blob=$(stat -c %s "$LAYER")
    mark=$(log_mark)
    t0=$(date +%s.%N)
    DEV=$(add_device "$CFG" --global-config "$GLOBAL") || return 1
    # The replay runs in the daemon; wait until the registry sees no more GETs.
    for ((i = 0; i < 240 && stable < 4; i++)); do
        sleep 0.5
        read -r gets bytes < <(fetched_since "$mark" "$digest")
        if ((gets == prev)); then stable=$((stable + 1)); else stable=0; fi
        prev=$gets
    done
    secs=$(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")
    local n tb
    read -r n tb < <(trace_ranges "$TRACE")
    log "run 2 (replay): before the mount, $gets GETs / $bytes bytes prefetched in ~$secs s (trace: $tb bytes), cache $(cache_bytes "$CACHE") bytes"
    grep -q "replaying" /run/obd/ublk/*.log || { fail "the daemon did not say it replays"; return 1; }
    ((bytes >= tb * 9 / 10)) || { fail "prefetched $bytes bytes, less than the trace's $tb"; return 1; }
    mark=$(log_mark)
    run_program || return 1
    read -r gets bytes < <(fetched_since "$mark" "$digest")
    local run1
    run1=$(cat "$WORK/run1.gets" 2>/dev/null || echo 0)
    log "run 2: mount + program ${SECS} s, $gets GETs / $bytes bytes fetched on demand (run 1: $run1 GETs); printed $OUT"
    "$OBD" del -n "${DEV#/dev/ublkb}" || return 1
    umount "$CACHE"
    no_devices || return 1
    ((gets * 5 <= run1)) || { fail "run 2 still fetched $gets times on demand (run 1: $run1)"; return 1; }
}

log "building the image"
build_image || echo "  image build failed"
start_registry || echo "  registry start failed"
check "trace record: recordTracePath empty → trace + .ok at obd del, decodes; eBPF trace covers it" record_run
check "trace replay: fresh cache, recorded extents prefetched before the program asks, same output" replay_run
stop_registry
unmount_caches
finish
