#!/usr/bin/env bash
# Benchmark: container start-up workloads on one image served lazily from a
# registry through a throttled link (the ImageApparate comparison, scaled for
# qemu TCG). Not a test; CI does not run it.
#
#   bash scripts/bench-startup.sh [--seq-mb N] [--latency MS] [--mbit N]
#                                 [--mem MB] [--no-build] [--remake-data]
#
# On the host it builds obd (cargo build --release -p obd) into
# target/bench/obd and makes, once, target/bench/startup/app.lsmt: an
# `obd import` of a `mkfs.ext4 -d` image holding
#   /big/large.bin   SEQ_MB MiB (default 160) of random bytes;
#   /small/dNN/fNNNN 3000 files of 4-16 KiB (random bytes);
#   python3 and every file `python3 -B /app/startup.py` opens (strace -f);
#   gcc and every file `gcc -O1 /src/hello.c -lm` opens (cc1, as, collect2,
#   ld, headers, crt files, libc/libm link scripts and archives).
# Then one VM boot (tests/vm/run.sh, 4 GiB, 2 vCPUs): docker-registry on the
# guest's 127.0.0.1:5000, the layer `obd push`ed to it, and a python TCP
# proxy on :5001 in front of it adding LATENCY ms (20) to every request and
# pacing responses to MBIT Mbit/s (100) over all connections together. The
# image config points at the proxy. Workloads:
#   seq     cat /big/large.bin
#   small   cat 1000 of the small files, chosen and ordered at random (seed)
#   python  chroot: python3 -B /app/startup.py (json, re, hashlib, datetime,
#           decimal, collections; hashes 256 KiB, prints a line)
#   gcc     chroot: gcc -O1 -o /tmp/hello /src/hello.c -lm; /tmp/hello
# Modes, each with a fresh blob cache (own tmpfs) and a fresh device:
#   cold      lazy, no trace;
#   record    lazy, recordTracePath empty (records the trace; informational);
#   prefetch  lazy, recordTracePath = that trace: the daemon replays it from
#             `obd add` on while the workload starts right after the mount;
#   full      the whole blob downloaded through the proxy first (curl) into
#             the lower's dir as overlaybd.commit, then served from it.
# Seconds run from just before `obd add` (full: before the download) to the
# workload's end, and include add + mount. Bytes are the blob bytes the
# registry's access log shows sent for the mode. The table is printed,
# written to $OBD_VM_RESULTS/bench-startup.md and copied to target/bench/.
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
# shellcheck source=tests/vm/ublk/chroot-lib.sh
source "$REPO/tests/vm/ublk/chroot-lib.sh"
DATA=$BENCH/startup

seq_mb=160
latency=20
mbit=100
mem=4096
while (($#)); do
    case $1 in
        --seq-mb) seq_mb=$2; shift 2 ;;
        --latency) latency=$2; shift 2 ;;
        --mbit) mbit=$2; shift 2 ;;
        *) bench_option "$@"; shift "$BENCH_OPTION_WORDS" ;;
    esac
done

PYPROG='import json, re, hashlib, datetime, decimal, collections
d = open("/app/data.bin", "rb").read()
words = re.findall(r"[a-z]+", "the quick brown fox jumps over the lazy dog " * 50)
c = collections.Counter(words).most_common(3)
print(json.dumps({"sha": hashlib.sha256(d).hexdigest()[:16], "top": c,
                  "sum": str(sum(decimal.Decimal(i) / 7 for i in range(100))),
                  "y": datetime.date(2024, 1, 1).isoformat()}))'
CPROG='#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
int main(void) {
    double s = 0;
    char buf[64];
    for (int i = 1; i <= 1000; i++) s += sqrt((double)i);
    snprintf(buf, sizeof buf, "%.3f", s);
    printf("hello from gcc: %s (%zu chars)\n", buf, strlen(buf));
    return EXIT_SUCCESS;
}'

# ---------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------

# traced_paths STRACE_LOG: every path the traced run opened, exec'd, stat'ed
# or access'ed (outside /tmp, /proc, /sys, /dev, /run and the data dir), and
# the dynamic loader, one a line.
traced_paths() {
    "$PY" - "$1" "$DATA" <<'PY'
import os, re, sys
log, skip = sys.argv[1:]
paths = {"/lib64/ld-linux-x86-64.so.2"}
pat = re.compile(r'^(?:\d+ +)?(?:openat|open|execve|newfstatat|stat|lstat|statx|access|faccessat2?|readlink)\((?:AT_FDCWD, )?"([^"]+)"')
for line in open(log):
    m = pat.match(line)
    if m and m.group(1).startswith("/"):
        paths.add(os.path.normpath(m.group(1)))
for p in sorted(paths):
    if p.split("/")[1] in ("tmp", "proc", "sys", "dev", "run") or p.startswith(skip) or p == "/":
        continue
    print(p)
PY
}

make_data() {
    local t=$DATA/tmp
    rm -rf "$t"
    mkdir -p "$t/root"
    say "making the image tree ($seq_mb MiB large file, 3000 small files, python3, gcc)"
    "$PY" - "$t/root" "$seq_mb" <<'PY'
import os, random, sys
root, mb = sys.argv[1], int(sys.argv[2])
rnd = random.Random(5)
os.makedirs(f"{root}/big")
with open(f"{root}/big/large.bin", "wb") as out:
    for _ in range(mb):
        out.write(rnd.randbytes(1 << 20))
for d in range(60):
    os.makedirs(f"{root}/small/d{d:02d}")
    for f in range(50):
        with open(f"{root}/small/d{d:02d}/f{d * 50 + f:04d}", "wb") as out:
            out.write(rnd.randbytes(rnd.randint(4096, 16384)))
os.makedirs(f"{root}/app")
open(f"{root}/app/data.bin", "wb").write(rnd.randbytes(256 << 10))
os.makedirs(f"{root}/src")
os.makedirs(f"{root}/tmp")
os.chmod(f"{root}/tmp", 0o1777)
PY
    printf '%s\n' "$PYPROG" >"$t/root/app/startup.py"
    printf '%s\n' "$CPROG" >"$t/root/src/hello.c"
    # strace the workloads on the host, in a copy of their inputs at the same paths.
    printf '%s\n' "${PYPROG//\/app\/data.bin/$t/root/app/data.bin}" >"$t/startup-host.py"
    (cd "$t" && strace -f -qq -o "$t/py.strace" -e trace=file,process /usr/bin/python3 -B "$t/startup-host.py" >/dev/null)
    (cd "$t" && strace -f -qq -o "$t/gcc.strace" -e trace=file,process \
        gcc -O1 -o "$t/hello" "$t/root/src/hello.c" -lm)
    traced_paths "$t/py.strace" >"$t/py.paths"
    traced_paths "$t/gcc.strace" >"$t/gcc.paths"
    copy_into_root "$t/root" "$t/py.paths"
    copy_into_root "$t/root" "$t/gcc.paths"
    # The workloads must run from the tree alone.
    chroot "$t/root" /usr/bin/python3 -B /app/startup.py >"$t/py.expected"
    chroot "$t/root" /usr/bin/gcc -O1 -o /tmp/hello /src/hello.c -lm
    chroot "$t/root" /tmp/hello >"$t/gcc.expected"
    rm -f "$t/root/tmp/hello"
    say "python prints $(cat "$t/py.expected"); gcc's program prints $(cat "$t/gcc.expected")"
    local kb
    kb=$(du -sk "$t/root" | cut -f1)
    say "tree: $((kb / 1024)) MiB; mkfs.ext4 + obd import"
    mkfs.ext4 -q -F -d "$t/root" "$t/disk.raw" "$((kb * 13 / 10 / 1024 + 64))M" >/dev/null
    "$BENCH/obd" import "$t/disk.raw" "$t/app.lsmt" >/dev/null
    # the files the small-file workload reads: 1000 of 3000, random order.
    "$PY" - "$t/small.list" <<'PY'
import random, sys
rnd = random.Random(9)
picks = rnd.sample(range(3000), 1000)
open(sys.argv[1], "w").write("".join(f"small/d{i // 50:02d}/f{i:04d}\n" for i in picks))
PY
    mv "$t/app.lsmt" "$t/small.list" "$t/py.expected" "$t/gcc.expected" "$DATA/"
    echo "$seq_mb" >"$DATA/seq_mb"
    rm -rf "$t"
}

host_main() {
    install_obd
    if ((remake)) || [[ ! -s $DATA/app.lsmt || $(cat "$DATA/seq_mb" 2>/dev/null) != "$seq_mb" ]]; then
        mkdir -p "$DATA"
        make_data
    fi
    say "layer $(du -h "$DATA/app.lsmt" | cut -f1); booting the VM"
    local results rc=0
    results=$(mktemp -d /tmp/obd-bench-startup.XXXXXX)
    tests/vm/run.sh --timeout 3000 --mem "$mem" --results "$results" \
        -- bash scripts/bench-startup.sh --guest --latency "$latency" --mbit "$mbit" || rc=$?
    if [[ -s $results/bench-startup.md ]]; then
        cp "$results/bench-startup.md" "$results/rows.tsv" "$BENCH/" 2>/dev/null || true
        say "results: $BENCH/bench-startup.md (VM results dir $results)"
    fi
    return "$rc"
}

# ---------------------------------------------------------------------------
# guest side
# ---------------------------------------------------------------------------
guest_main() {
    OBD_BIN=$BENCH/obd
    set +e
    source "$REPO/tests/vm/ublk/lib.sh"
    source "$REPO/tests/vm/ublk/registry-lib.sh"
    set -uo pipefail
    OUT=${OBD_VM_RESULTS:-/tmp}
    PROXY_PORT=5001
    MNT=$WORK/mnt
    mkdir -p "$MNT" "$WORK/pushed"
    LAYER=$DATA/app.lsmt
    ROWS=$OUT/rows.tsv
    : >"$ROWS"

    start_registry || exit 1
    cat >"$WORK/proxy.py" <<'PY'
# TCP proxy: LATENCY ms before each client->server chunk (a request), and all
# server->client bytes paced through one MBIT Mbit/s link.
import socket, sys, threading, time
lport, uport, lat, mbit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000, float(sys.argv[4])
rate = mbit * 1e6 / 8
lock = threading.Lock()
link = [0.0]
def pump(src, dst, upstream):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if upstream:
                time.sleep(lat)
            else:
                with lock:
                    now = time.monotonic()
                    link[0] = max(now, link[0]) + len(data) / rate
                    end = link[0]
                d = end - time.monotonic()
                if d > 0:
                    time.sleep(d)
            dst.sendall(data)
    except OSError:
        pass
    for s in (dst, src):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
def conn(c):
    u = socket.create_connection(("127.0.0.1", uport))
    for s in (c, u):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=pump, args=(c, u, True), daemon=True).start()
    threading.Thread(target=pump, args=(u, c, False), daemon=True).start()
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", lport))
ls.listen(128)
print("proxy up", flush=True)
while True:
    c, _ = ls.accept()
    threading.Thread(target=conn, args=(c,), daemon=True).start()
PY
    setsid "$PY" "$WORK/proxy.py" "$PROXY_PORT" "$REG_PORT" "$latency" "$mbit" >"$WORK/proxy.log" 2>&1 </dev/null &
    PROXY_PID=$!
    sleep 1
    kill -0 "$PROXY_PID" || { echo "proxy died: $(cat "$WORK/proxy.log")"; exit 1; }

    PUSHED=$WORK/pushed/config.v1.json
    push_layer "$LAYER" obd/app "$PUSHED" || exit 1
    "$PY" - "$PUSHED" "$REG_PORT" "$PROXY_PORT" <<'PY'
import json, sys
p, a, b = sys.argv[1:]
cfg = json.load(open(p))
cfg["repoBlobUrl"] = cfg["repoBlobUrl"].replace(f":{a}/", f":{b}/")
json.dump(cfg, open(p, "w"), indent=1)
PY
    DIGEST=$(blob_digest "$PUSHED")
    BLOB=$(stat -c %s "$LAYER")
    BLOB_URL=$("$PY" -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c["repoBlobUrl"].rstrip("/") + "/" + c["lowers"][-1]["digest"])' "$PUSHED")
    echo "blob $DIGEST, $BLOB bytes, lazily from $BLOB_URL (proxy: ${latency} ms/request, ${mbit} Mbit/s)"

    for w in seq small python gcc; do
        for mode in cold record prefetch full; do
            run_case "$w" "$mode" || echo "FAILED: $w $mode"
        done
    done
    kill "$PROXY_PID" 2>/dev/null
    stop_registry
    unmount_caches
    report | tee "$OUT/bench-startup.md"
    cleanup_devices
}

# workload W: run it against the image mounted at $MNT.
workload() {
    case $1 in
        seq) cat "$MNT/big/large.bin" >/dev/null ;;
        small) (cd "$MNT" && xargs -a "$DATA/small.list" cat >/dev/null) ;;
        python) [[ $(chroot "$MNT" /usr/bin/python3 -B /app/startup.py) == "$(cat "$DATA/py.expected")" ]] ;;
        gcc) chroot "$MNT" /usr/bin/gcc -O1 -o /tmp/hello /src/hello.c -lm &&
            [[ $(chroot "$MNT" /tmp/hello) == "$(cat "$DATA/gcc.expected")" ]] ;;
    esac
}

# run_case W MODE: one fresh device, one run; appends a row to $ROWS.
run_case() {
    local w=$1 mode=$2 cfg=$WORK/$1-$2.json global=$WORK/$1-$2-global.json cache=$WORK/$1-$2-cache
    local trace=$WORK/$w.trace
    cp "$PUSHED" "$cfg"
    case $mode in
        cold) set_config "$cfg" ;;
        record) : >"$trace"; set_config "$cfg" "recordTracePath=\"$trace\"" ;;
        prefetch)
            [[ -s $trace && -e $trace.ok ]] || { echo "no trace for $w"; return 1; }
            set_config "$cfg" "recordTracePath=\"$trace\"" ;;
        full)
            set_config "$cfg"
            # a lower dir of its own that will hold the downloaded copy
            "$PY" - "$cfg" "$WORK/full-$w" <<'PY'
import json, sys
p, d = sys.argv[1:]
cfg = json.load(open(p))
cfg["lowers"][-1]["dir"] = d
json.dump(cfg, open(p, "w"), indent=1)
PY
            ;;
    esac
    cache_dir "$cache" || return 1
    global_config "$global" "$cache" 4 || return 1
    sync
    echo 3 >/proc/sys/vm/drop_caches
    local mark t0 tdl=0 tadd tmnt t1 dev rc=0
    mark=$(log_mark)
    t0=$(date +%s.%N)
    if [[ $mode == full ]]; then
        mkdir -p "$WORK/full-$w"
        curl -sf -o "$WORK/full-$w/overlaybd.commit" "$BLOB_URL" || { echo "download failed"; return 1; }
        tdl=$(echo "$(date +%s.%N) - $t0" | bc)
        [[ $(stat -c %s "$WORK/full-$w/overlaybd.commit") == "$BLOB" ]] || { echo "short download"; return 1; }
    fi
    dev=$(add_device "$cfg" --global-config "$global") || return 1
    mount -o ro,noload "$dev" "$MNT" || { echo "mount $dev"; return 1; }
    mount -t tmpfs tmp "$MNT/tmp" || return 1
    tmnt=$(echo "$(date +%s.%N) - $t0" | bc)
    workload "$w" 2>"$WORK/$w-$mode.err" || rc=1
    t1=$(echo "$(date +%s.%N) - $t0" | bc)
    local gets bytes
    read -r gets bytes < <(fetched_since "$mark" "$DIGEST")
    umount "$MNT/tmp" "$MNT"
    # a replay may still be fetching: let it settle so the next case starts quiet
    if [[ $mode == prefetch ]]; then
        local prev=-1 stable=0 i g2 b2
        for ((i = 0; i < 120 && stable < 3; i++)); do
            sleep 0.5
            read -r g2 b2 < <(fetched_since "$mark" "$DIGEST")
            if ((g2 == prev)); then stable=$((stable + 1)); else stable=0; fi
            prev=$g2
        done
        echo "  (prefetch total after settling: $g2 GETs, $b2 bytes)"
    fi
    "$OBD" del -n "${dev#/dev/ublkb}" >/dev/null || echo "obd del $dev failed"
    umount "$cache"
    rm -rf "$WORK/full-$w"
    if ((rc)); then
        echo "workload $w failed in mode $mode: $(tail -c 300 "$WORK/$w-$mode.err")"
        return 1
    fi
    printf '%s\t%s\t%.2f\t%.2f\t%.2f\t%s\t%s\n' "$w" "$mode" "$t1" "$tmnt" "$tdl" "$gets" "$bytes" >>"$ROWS"
    printf '%-7s %-9s %7.2f s (add+mount %.2f s, download %.2f s)  %5s GETs %11s bytes\n' \
        "$w" "$mode" "$t1" "$tmnt" "$tdl" "$gets" "$bytes"
}

report() {
    "$PY" - "$ROWS" "$BLOB" "$latency" "$mbit" "$(cat "$DATA/seq_mb")" "$OBD" <<'PY'
import os, subprocess, sys
rows_path, blob, lat, mbit, seq_mb, obd = sys.argv[1:]
blob = int(blob)
rows = {}
for line in open(rows_path):
    w, m, t, tm, tdl, g, b = line.rstrip("\n").split("\t")
    rows[(w, m)] = (float(t), float(tm), float(tdl), int(g), int(b))
kver = os.uname().release
ncpu = os.cpu_count()
mem = int(open("/proc/meminfo").readline().split()[1]) // 1024
ver = subprocess.run([obd, "--version"], capture_output=True, text=True).stdout.strip()
print(f"Guest: {ncpu} vCPUs (qemu TCG), {mem} MB, kernel {kver}, {ver}.")
print(f"Image: one ext4 LSMT layer, {blob / 2**20:.1f} MiB blob, from docker-registry on the guest's 127.0.0.1")
print(f"through a python proxy adding {lat} ms per request and pacing responses to {mbit} Mbit/s.")
print(f"seq = cat one {seq_mb} MiB file; small = cat 1000 random 4-16 KiB files of 3000;")
print("python = python3 -B short script (json/re/hashlib/decimal...); gcc = gcc -O1 hello.c -lm + run.")
print("Seconds: obd add -> workload end (full: download + add -> end). MiB: blob bytes the registry sent.")
print()
modes = ["cold", "record", "prefetch", "full"]
print("| workload | " + " | ".join(f"{m} s | {m} MiB" for m in modes) + " |")
print("|---|" + "---:|---:|" * len(modes))
for w in ["seq", "small", "python", "gcc"]:
    cells = []
    for m in modes:
        r = rows.get((w, m))
        if r:
            extra = f" ({r[2]:.1f} dl)" if m == "full" else ""
            cells += [f"{r[0]:.2f}{extra}", f"{r[4] / 2**20:.1f}"]
        else:
            cells += ["-", "-"]
    print(f"| {w} | " + " | ".join(cells) + " |")
print()
print("| workload | cold / prefetch | full / cold | full / prefetch | prefetch bytes / cold bytes |")
print("|---|---:|---:|---:|---:|")
for w in ["seq", "small", "python", "gcc"]:
    c, p, f = rows.get((w, "cold")), rows.get((w, "prefetch")), rows.get((w, "full"))
    def ratio(a, b, i=0):
        return f"{a[i] / b[i]:.2f}x" if a and b and b[i] else "-"
    print(f"| {w} | {ratio(c, p)} | {ratio(f, c)} | {ratio(f, p)} | {ratio(p, c, 4)} |")
PY
}

run_bench
