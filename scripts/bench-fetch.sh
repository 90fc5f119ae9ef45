#!/usr/bin/env bash
# Benchmark (issue 11): the fetch engine on the host, no VM. Real start-up
# access traces, recorded with eBPF on a loop device, replayed in-process
# through a throttled link to a real docker-registry. Needs root (losetup,
# mount, eBPF, chroot); not a test, scripts/test.sh may run the short form.
#
#   bash scripts/bench-fetch.sh [--short] [--no-build] [--rounds N] [--remake-data]
#
# The image: `mkfs.ext4 -d` of a tree holding
#   python  /usr/lib/python3.11 (its test/ dirs left out) and every file
#           `python3 -B -c 'import json, decimal, asyncio, email.parser,
#           http.client ...'` opens (strace), python3 and its libraries;
#   small   /small/dNN/fNNNN: 2000 files of 4-16 KiB (random bytes);
#   gcc     every file `gcc -O1 hello.c -lm` opens (cc1, as, collect2, ld,
#           headers, crt files, libc/libm): found with strace;
#   seq     /big/large.bin, 384 MiB of random bytes (most of the image);
# `obd import`ed as one plain LSMT layer. The raw image is attached read-only
# to a loop device and mounted read-only (a tmpfs on its /tmp for gcc), and
# each workload runs with the page cache dropped while `obd trace record`
# records the loop device:
#   python  chroot: python3 -B -c '<the import chain>'
#   small   cat of all the small files, in a random (seeded) order
#   gcc     chroot: gcc -O1 -o /tmp/hello /src/hello.c -lm
#   seq     cat /big/large.bin
# `obd trace convert` maps each event file to a layer trace. Then the ignored
# test tests/startup_bench.rs replays the device reads in-process (see it and
# scripts/bench-fetch.md) for every latency x bandwidth x workload x mode.
#
# --short: one link (20 ms, 1 Gbit/s), a 32 MiB large file, 300 small files,
# python's traced files only, one round, the test in the debug profile (which
# `cargo nextest run --workspace` has built); fails if a read returns wrong
# bytes (every mode checks every read against the local layer).
# --no-build: use the existing obd (${CARGO_TARGET_DIR:-target}/release/obd).
# --rounds N: rounds of the full form (default 3). --remake-data: make the
# image and traces again even if target/bench-fetch/full/ has them (the
# short form always makes them).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# The system python (/usr/lib/python3.11 is what goes into the image).
PY=/usr/bin/python3
# shellcheck source=tests/vm/ublk/chroot-lib.sh
source "$REPO/tests/vm/ublk/chroot-lib.sh"

short=0
build=1
rounds=3
remake=0
while (($#)); do
    case $1 in
        --short) short=1; shift ;;
        --no-build) build=0; shift ;;
        --rounds) rounds=$2; shift 2 ;;
        --remake-data) remake=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-fetch.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "bench-fetch.sh: --rounds needs a whole number >= 1" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "bench-fetch.sh: needs root (losetup, mount, eBPF, chroot)" >&2; exit 1; }
for tool in mkfs.ext4 losetup strace gcc docker-registry; do
    command -v "$tool" >/dev/null || {
        echo "bench-fetch.sh: $tool is missing (source scripts/packages.sh; obd_install build demo test)" >&2
        exit 1
    }
done

say() { printf 'bench-fetch: %s\n' "$*" >&2; }

target_dir=${CARGO_TARGET_DIR:-$REPO/target}
if ((build)); then
    say "cargo build --release -p obd"
    cargo build --release --locked -q -p obd
fi
OBD=${OBD_BIN:-$target_dir/release/obd}
[[ -x $OBD ]] || { echo "bench-fetch.sh: no $OBD (build it, or drop --no-build)" >&2; exit 1; }

if ((short)); then
    form=short seq_mib=32 small_files=300 whole_stdlib=0
else
    form=full seq_mib=384 small_files=2000 whole_stdlib=1
fi
DATA=$REPO/target/bench-fetch/$form
WORKLOADS=(python small gcc seq)

PYPROG='import json, decimal, asyncio, email.parser, http.client, urllib.request, logging, argparse, dataclasses, typing, sqlite3
d = json.loads(json.dumps({"x": [1, 2, 3]}))
print("python ok", d["x"], decimal.Decimal(1) / 7, email.parser.Parser().parsestr("A: b\n\nbody")["A"])'
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

# traced_paths STRACE_LOG SKIP: every absolute path the traced run opened,
# exec'd, stat'ed or access'ed (outside /tmp, /proc, /sys, /dev, /run and
# SKIP), and the dynamic loader, one a line.
traced_paths() {
    "$PY" - "$1" "$2" <<'PY'
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

# Cleanup of whatever make_data set up, on every exit path.
LOOP=
MNT=
RECORDER=
cleanup() {
    if [[ -n $RECORDER ]]; then
        kill "$RECORDER" 2>/dev/null || true
        wait "$RECORDER" 2>/dev/null || true
        RECORDER=
    fi
    if [[ -n $MNT ]]; then
        mountpoint -q "$MNT/tmp" && umount "$MNT/tmp"
        mountpoint -q "$MNT" && umount "$MNT"
        rmdir "$MNT" 2>/dev/null || true
        MNT=
    fi
    if [[ -n $LOOP ]]; then
        losetup -d "$LOOP" 2>/dev/null || true
        LOOP=
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# run_workload NAME: one workload on the mounted image ($MNT).
run_workload() {
    case $1 in
        python) chroot "$MNT" /usr/bin/python3 -B -c "$PYPROG" ;;
        small) (cd "$MNT" && xargs -a "$DATA/tmp/small.list" cat >/dev/null) ;;
        gcc) chroot "$MNT" /usr/bin/gcc -O1 -o /tmp/hello /src/hello.c -lm && chroot "$MNT" /tmp/hello ;;
        seq) cat "$MNT/big/large.bin" >/dev/null ;;
    esac
}

# record NAME: drop the caches, record the loop device around the workload,
# convert the events into a layer trace.
record() {
    local name=$1 log=$DATA/tmp/$1.record.log
    rm -f "$DATA/tmp/$name.events" "$DATA/tmp/$name.trace"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    "$OBD" trace record --device "$LOOP" --duration 900 -o "$DATA/tmp/$name.events" 2>"$log" &
    RECORDER=$!
    local waited=0
    until grep -q '^recording' "$log"; do
        sleep 0.05
        waited=$((waited + 1))
        if ((waited >= 400)) || ! kill -0 "$RECORDER" 2>/dev/null; then
            echo "bench-fetch.sh: obd trace record did not start: $(cat "$log")" >&2
            exit 1
        fi
    done
    local start=$EPOCHREALTIME
    run_workload "$name" >"$DATA/tmp/$name.out"
    local end=$EPOCHREALTIME
    kill -TERM "$RECORDER"
    wait "$RECORDER" || { echo "bench-fetch.sh: obd trace record failed: $(cat "$log")" >&2; exit 1; }
    RECORDER=
    "$OBD" trace convert --config "$DATA/tmp/local.json" -i "$DATA/tmp/$name.events" \
        -o "$DATA/tmp/$name.trace" >"$DATA/tmp/$name.convert.log"
    say "$name: $(python3 -c "print(f'{$end - $start:.2f}')") s on the loop device (page cache dropped); $(tail -1 "$log"); $(cat "$DATA/tmp/$name.convert.log")"
}

make_data() {
    local t=$DATA/tmp
    rm -rf "$DATA"
    mkdir -p "$t/root" "$t/host"
    say "making the image tree in $t/root ($form form)"
    # Workload inputs on the host, to strace the workloads there.
    printf '%s\n' "$CPROG" >"$t/host/hello.c"
    (cd "$t/host" && strace -f -qq -o "$t/py.strace" -e trace=file,process "$PY" -B -c "$PYPROG" >/dev/null)
    (cd "$t/host" && strace -f -qq -o "$t/gcc.strace" -e trace=file,process \
        gcc -O1 -o "$t/host/hello" "$t/host/hello.c" -lm)
    traced_paths "$t/py.strace" "$DATA" >"$t/py.paths"
    traced_paths "$t/gcc.strace" "$DATA" >"$t/gcc.paths"
    copy_into_root "$t/root" "$t/py.paths"
    copy_into_root "$t/root" "$t/gcc.paths"
    if ((whole_stdlib)); then
        # The rest of the standard library: what an image holds, not what
        # the import chain reads.
        (cd /usr/lib && tar --exclude='python3.11/test' --exclude='python3.11/*/test' \
            --exclude='python3.11/*/tests' -cf - python3.11) | tar -C "$t/root/usr/lib" --skip-old-files -xf -
    fi
    mkdir -p "$t/root/src" "$t/root/big"
    printf '%s\n' "$CPROG" >"$t/root/src/hello.c"
    install -d -m 1777 "$t/root/tmp"
    "$PY" - "$t/root" "$small_files" "$t/small.list" <<'PY'
import os, random, sys
root, n, listing = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rnd = random.Random(5)
names = []
for i in range(n):
    d = f"{root}/small/d{i // 50:02d}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i:04d}", "wb") as out:
        out.write(rnd.randbytes(rnd.randint(4096, 16384)))
    names.append(f"small/d{i // 50:02d}/f{i:04d}\n")
rnd.shuffle(names)
open(listing, "w").write("".join(names))
PY
    head -c "$((seq_mib << 20))" /dev/urandom >"$t/root/big/large.bin"
    # The workloads must run from the tree alone.
    chroot "$t/root" /usr/bin/python3 -B -c "$PYPROG" >"$t/python.expected"
    chroot "$t/root" /usr/bin/gcc -O1 -o /tmp/hello /src/hello.c -lm
    chroot "$t/root" /tmp/hello >"$t/gcc.expected"
    rm -f "$t/root/tmp/hello"
    local kb
    kb=$(du -sk "$t/root" | cut -f1)
    say "tree $((kb / 1024)) MiB; mkfs.ext4 -d, obd import"
    mkfs.ext4 -q -F -d "$t/root" "$t/disk.raw" "$((kb * 23 / 20 / 1024 + 32))M" >/dev/null
    "$OBD" import "$t/disk.raw" "$t/layer.lsmt" >/dev/null
    printf '{"lowers": [{"file": "%s"}]}\n' "$t/layer.lsmt" >"$t/local.json"

    LOOP=$(losetup -r -f --show "$t/disk.raw")
    MNT=$(mktemp -d /tmp/obd-bench-fetch.XXXXXX)
    mount -t ext4 -o ro,noload "$LOOP" "$MNT"
    mount -t tmpfs -o size=64m tmpfs "$MNT/tmp"
    say "recording on $LOOP (mounted at $MNT)"
    for w in "${WORKLOADS[@]}"; do
        record "$w"
    done
    cmp -s "$t/python.out" "$t/python.expected" || { echo "bench-fetch.sh: python printed $(cat "$t/python.out")" >&2; exit 1; }
    cmp -s "$t/gcc.out" "$t/gcc.expected" || { echo "bench-fetch.sh: gcc's program printed $(cat "$t/gcc.out")" >&2; exit 1; }
    cleanup

    for w in "${WORKLOADS[@]}"; do
        mv "$t/$w.events" "$t/$w.trace" "$DATA/"
    done
    mv "$t/layer.lsmt" "$DATA/"
    rm -rf "$t"
    touch "$DATA/done"
}

if ((remake || short)) || [[ ! -e $DATA/done ]]; then
    make_data
fi
say "layer $(du -h "$DATA/layer.lsmt" | cut -f1)"

if ((short)); then
    export OBD_BENCH_LATENCIES_MS=20 OBD_BENCH_MBITS=1000 OBD_BENCH_ROUNDS=1
    profile=()
else
    export OBD_BENCH_LATENCIES_MS=${OBD_BENCH_LATENCIES_MS:-5,20,50}
    export OBD_BENCH_MBITS=${OBD_BENCH_MBITS:-100,1000}
    export OBD_BENCH_ROUNDS=$rounds
    profile=(--release)
fi
export OBD_BENCH_DATA=$DATA OBD_BENCH_WORKLOADS=${OBD_BENCH_WORKLOADS:-python,small,gcc,seq}
export OBD_BENCH_REPORT=$REPO/target/bench-fetch/$form.md
say "replaying: latencies ${OBD_BENCH_LATENCIES_MS} ms, ${OBD_BENCH_MBITS} Mbit/s, ${OBD_BENCH_ROUNDS} round(s)"
cargo test "${profile[@]}" --locked -q --test startup_bench -- --ignored --nocapture --test-threads 1
say "table: $OBD_BENCH_REPORT"
