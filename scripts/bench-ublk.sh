#!/usr/bin/env bash
# Benchmark (issue 3): /dev/ublkbN serving a 3-layer stack against the kernel
# loop device over the same image flattened to a raw file, in one VM boot.
# Not a test; CI does not run it.
#
#   bash scripts/bench-ublk.sh [--runtime S] [--ramp S] [--mem MB] [--smp N]
#                              [--no-build] [--remake-data]
#
# On the host it builds obd (cargo build --release -p obd) and copies the
# binary to target/bench/obd (so a rebuild by someone else mid-run cannot
# change it), and makes, once, under target/bench/data/:
#   layer 0   `obd import` of a 1 GiB `mkfs.ext4 -d` image of ~620 MiB of
#             generated files (text-like, binary-like, random; fixed seed);
#   layer 1,2 sparse writable layers (`obd create -s`) given random 4 KiB and
#             64 KiB writes (~31 MiB each, fixed seeds), then `obd commit`;
#   both a plain LSMT stack and a ZFile stack (`import -z`, `commit -z`, lz4,
#   4 KiB blocks) of the same bytes, and the flattened raw (`obd export`);
#   the two stacks are checked to export the same bytes.
# Then one VM boot (tests/vm/run.sh) copies the files into the guest's tmpfs
# and runs, for each device, fio --direct=1 --ioengine=io_uring:
#   seq     read     bs=1M iodepth=8
#   rand    randread bs=4k iodepth=32
# each time_based for RUNTIME s after RAMP s, with caches dropped before.
# Devices: loop over the raw (direct-io on, then off), ublk over the LSMT
# stack and over the ZFile stack with --queues 1 and 2, and the first loop
# again at the end as a drift check (other jobs load the host).
# The table (MB/s, IOPS, ratio to loop dio=on, CPU use) is printed, written to
# $OBD_VM_RESULTS/bench-ublk.md and copied to target/bench/.
# Emulated CPUs (TCG) distort absolutes: read the ratios.
set -euo pipefail

if [[ ${1:-} == --guest ]]; then
    shift
    guest=1
else
    guest=0
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$REPO/target/bench
DATA=$BENCH/data
PY=/usr/bin/python3

runtime=15
ramp=2
mem=6144
smp=2
build=1
remake=0
while (($#)); do
    case $1 in
        --runtime) runtime=$2; shift 2 ;;
        --ramp) ramp=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --remake-data) remake=1; shift ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done

say() { printf 'bench-ublk: %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------
make_tree() {
    "$PY" - "$1" <<'PY'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(3)
# Pools of 4 MiB each, sliced into files: code-like text (lz4 in 4 KiB
# blocks: ~1.7x) and binary-like bytes (instruction-like tokens, small-int
# tables, zero padding: ~1.8x); "rand" content does not compress.
vocab = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz_") for _ in range(rnd.randint(2, 12)))
         for _ in range(300)]
weights = [1.0 / (i + 1) for i in range(len(vocab))]
punct = [b" = ", b"(", b"); ", b", ", b" {", b"}", b"->", b".", b" == ", b"[", b"]", b": "]
text = bytearray()
while len(text) < 4 << 20:
    line = bytearray(b"    " * rnd.randint(0, 4))
    for t in rnd.choices(vocab, weights, k=rnd.randint(2, 10)):
        line += t + rnd.choice(punct)
    text += line + b"\n"
text = bytes(text)
ins = [rnd.randbytes(rnd.randint(2, 7)) for _ in range(120)]
iw = [1.0 / (i + 1) ** 1.1 for i in range(len(ins))]
binl = bytearray()
while len(binl) < 4 << 20:
    k = rnd.random()
    if k < 0.75:
        binl += b"".join(rnd.choices(ins, iw, k=rnd.randint(8, 64)))
    elif k < 0.9:
        binl += b"".join(rnd.randint(0, 300).to_bytes(4, "little") for _ in range(rnd.randint(4, 64)))
    else:
        binl += bytes(rnd.randint(16, 512))
binl = bytes(binl)

def content(size, kind):
    if kind == "rand":
        return rnd.randbytes(size)
    pool = text if kind == "text" else binl
    out = bytearray()
    while len(out) < size:
        off = rnd.randrange(0, len(pool) - 65536)
        out += pool[off:off + rnd.randint(4096, 65536)]
    return bytes(out[:size])

total = 0
# ~6000 small files (0.5-64 KiB) in a few hundred dirs
for d in range(300):
    dd = f"{root}/usr/lib/pkg{d:03d}"
    os.makedirs(dd, exist_ok=True)
    for f in range(20):
        size = int(rnd.choice([512, 1500, 4096, 9000, 20000, 40000, 65536]) * rnd.uniform(0.5, 1.5))
        kind = rnd.choices(["text", "bin", "rand"], [5, 3, 2])[0]
        with open(f"{dd}/f{f:02d}.{kind}", "wb") as out:
            out.write(content(size, kind))
        total += size
# large files: 1-48 MiB, until ~620 MiB in all
i = 0
while total < 620 << 20:
    size = rnd.randint(1, 48) << 20
    kind = rnd.choices(["text", "bin", "rand"], [3, 4, 3])[0]
    os.makedirs(f"{root}/opt/big", exist_ok=True)
    with open(f"{root}/opt/big/b{i:03d}.{kind}", "wb") as out:
        for _ in range(size >> 20):
            out.write(content(1 << 20, kind))
    total += size
    i += 1
print(f"{total >> 20} MiB in files", file=sys.stderr)
PY
}

# random_writes SPARSE SEED: random 4 KiB and 64 KiB writes into a sparse
# writable layer, where virtual byte X lives at file offset 4096 + X.
random_writes() {
    "$PY" - "$1" "$2" <<'PY'
import os, random, sys
path, seed = sys.argv[1], int(sys.argv[2])
rnd = random.Random(seed)
vsize = os.path.getsize(path) - 4096
fd = os.open(path, os.O_WRONLY)
n = 0
for _ in range(3000):                      # 4 KiB writes anywhere
    off = rnd.randrange(0, vsize >> 12) << 12
    n += os.pwrite(fd, rnd.randbytes(2048) + bytes(1) * 1024 + rnd.randbytes(1024), 4096 + off)
for _ in range(300):                       # 64 KiB writes
    off = rnd.randrange(0, vsize >> 16) << 16
    n += os.pwrite(fd, rnd.randbytes(32768) + b"overlaybd " * 3276 + b"ob" * 8, 4096 + off)
os.close(fd)
print(f"{n >> 20} MiB written", file=sys.stderr)
PY
}

make_data() {
    local obd=$BENCH/obd
    rm -rf "$DATA" "$DATA.tmp"
    mkdir -p "$DATA.tmp"
    local t=$DATA.tmp
    say "making the layer-0 tree"
    make_tree "$t/tree"
    mkfs.ext4 -q -F -E root_owner=0:0 -d "$t/tree" "$t/disk.raw" 1G
    rm -rf "$t/tree"
    "$obd" import "$t/disk.raw" "$t/layer0.lsmt"
    "$obd" import -z "$t/disk.raw" "$t/layer0.zfile"
    rm -f "$t/disk.raw"
    local i
    for i in 1 2; do
        "$obd" create -s "$t/up$i.sparse" 1
        random_writes "$t/up$i.sparse" "$((100 + i))"
        "$obd" commit "$t/up$i.sparse" "$t/layer$i.lsmt"
        "$obd" commit -z "$t/up$i.sparse" "$t/layer$i.zfile"
        rm -f "$t/up$i.sparse"
    done
    "$obd" export --output "$t/flat.raw" "$t/layer0.lsmt" "$t/layer1.lsmt" "$t/layer2.lsmt"
    "$obd" export --output "$t/flatz.raw" "$t/layer0.zfile" "$t/layer1.zfile" "$t/layer2.zfile"
    cmp "$t/flat.raw" "$t/flatz.raw" || { say "the LSMT and ZFile stacks differ"; exit 1; }
    sha256sum <"$t/flat.raw" | cut -d' ' -f1 >"$t/flat.sha256"
    rm -f "$t/flatz.raw" "$t/flat.raw"
    mv "$t" "$DATA"
}

host_main() {
    cd "$REPO"
    mkdir -p "$BENCH"
    if ((build)); then
        say "cargo build --release -p obd"
        cargo build --release -p obd
    fi
    cp target/release/obd "$BENCH/obd.tmp" && mv "$BENCH/obd.tmp" "$BENCH/obd"
    if ((remake)) || [[ ! -s $DATA/flat.sha256 ]]; then
        make_data
    fi
    (cd "$DATA" && ls -ls layer*) | sed 's/^/  /' >&2
    local results
    results=$(mktemp -d /tmp/obd-bench-ublk.XXXXXX)
    local rc=0
    tests/vm/run.sh --timeout 1800 --mem "$mem" --smp "$smp" --results "$results" --quiet \
        -- bash scripts/bench-ublk.sh --guest --runtime "$runtime" --ramp "$ramp" || rc=$?
    if [[ -s $results/bench-ublk.md ]]; then
        cp "$results/bench-ublk.md" "$BENCH/bench-ublk.md"
        cp -r "$results/fio" "$BENCH/" 2>/dev/null || true
        cat "$BENCH/bench-ublk.md"
        say "table in $BENCH/bench-ublk.md (VM results in $results)"
    else
        say "no table came back (VM results in $results)"
    fi
    return "$rc"
}

# ---------------------------------------------------------------------------
# guest side
# ---------------------------------------------------------------------------
OBD=$BENCH/obd
W=/tmp/bench
OUT=${OBD_VM_RESULTS:-/tmp}
ROWS=$W/rows.tsv

cpu_total() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $5 + $6 }' /proc/stat; }
proc_cpu() { # "utime stime" (ticks) of PIDS, all their threads (io-wq workers too)
    local p u=0 s=0 a
    for p in "$@"; do
        if [[ -r /proc/$p/stat ]]; then
            read -r -a a <<<"$(awk '{ print $14, $15 }' "/proc/$p/stat")"
            u=$((u + a[0]))
            s=$((s + a[1]))
        fi
    done
    echo "$u $s"
}

# run_fio DEV LABEL QUEUES PIDS...: both workloads; one row each in ROWS:
# label queues workload MB/s IOPS cpu-busy% daemon-cpu%
run_fio() {
    local dev=$1 label=$2 queues=$3
    shift 3
    local pids=("$@") wl
    for wl in seq rand; do
        local args
        if [[ $wl == seq ]]; then
            args=(--rw=read --bs=1M --iodepth=8)
        else
            args=(--rw=randread --bs=4k --iodepth=32 --norandommap --randrepeat=1)
        fi
        sync
        echo 3 >/proc/sys/vm/drop_caches
        local json=$OUT/fio/$label-q$queues-$wl.json
        local c0 d0 c1 d1
        read -r -a c0 <<<"$(cpu_total)"
        read -r -a d0 <<<"$(proc_cpu "${pids[@]}")"
        fio --name="$wl" --filename="$dev" --direct=1 --ioengine=io_uring "${args[@]}" \
            --time_based --runtime="$runtime" --ramp_time="$ramp" \
            --output-format=json --output="$json" >/dev/null
        read -r -a c1 <<<"$(cpu_total)"
        read -r -a d1 <<<"$(proc_cpu "${pids[@]}")"
        "$PY" - "$json" "$label" "$queues" "$wl" "${c0[@]}" "${c1[@]}" "${d0[@]}" "${d1[@]}" \
            "$(getconf CLK_TCK)" "$(nproc)" >>"$ROWS" <<'PY'
import json, sys
path, label, queues, wl = sys.argv[1:5]
b0, i0, b1, i1, u0, s0, u1, s1, hz, ncpu = map(float, sys.argv[5:15])
j = json.load(open(path))["jobs"][0]["read"]
busy = 100 * (b1 - b0) / max(1, (b1 - b0) + (i1 - i0))
# daemon CPU over the whole fio run (ramp included), as % of one CPU
secs = (b1 - b0 + i1 - i0) / hz / ncpu
if u1 + s1 > 0:
    usr, sy = (100 * (u1 - u0) / hz / secs, 100 * (s1 - s0) / hz / secs)
    daemon = f"{usr + sy:.0f} ({usr:.0f}u+{sy:.0f}s)"
else:
    daemon = "-"
print(f"{label}\t{queues}\t{wl}\t{j['bw_bytes'] / 1e6:.1f}\t{j['iops']:.0f}\t{busy:.0f}\t{daemon}")
PY
        tail -n 1 "$ROWS" | sed 's/^/  /'
    done
}

loop_case() {
    local dio=$1 label=$2 dev
    dev=$(losetup -f --show --read-only --direct-io="$dio" "$W/flat.raw")
    local got
    got=$(cat "/sys/block/${dev#/dev/}/loop/dio")
    echo "== $label: $dev (direct-io=$dio asked, /sys/.../loop/dio=$got)"
    echo "$label	$got" >>"$W/dio.tsv"
    run_fio "$dev" "$label" - 
    losetup -d "$dev"
}

ublk_case() {
    local kind=$1 queues=$2 cfg=$W/$1.json dev
    "$PY" - "$cfg" "$W/layer0.$kind" "$W/layer1.$kind" "$W/layer2.$kind" <<'PY'
import json, sys
cfg, *lowers = sys.argv[1:]
json.dump({"lowers": [{"file": l} for l in lowers], "resultFile": cfg + ".result"}, open(cfg, "w"))
PY
    dev=$("$OBD" add --config "$cfg" --queues "$queues")
    [[ -b $dev ]] || { echo "obd add printed '$dev'"; return 1; }
    local pids
    mapfile -t pids < <(pgrep -f -- "--config $cfg" || true)
    echo "== ublk $kind --queues $queues: $dev (daemon pids ${pids[*]:-?})"
    run_fio "$dev" "ublk-$kind" "$queues" "${pids[@]}"
    "$OBD" del -n "${dev#/dev/ublkb}"
}

guest_main() {
    [[ -c /dev/ublk-control ]] || { echo "ublk_drv is not loaded"; exit 1; }
    mkdir -p "$W" "$OUT/fio"
    : >"$ROWS"
    : >"$W/dio.tsv"
    local t0=$SECONDS
    cp "$DATA"/layer* "$W/"
    echo "copied the layers into tmpfs in $((SECONDS - t0)) s"
    # the flattened raw, made here (faster than copying 1 GiB over 9p)
    t0=$SECONDS
    "$OBD" export --output "$W/flat.raw" "$W/layer0.lsmt" "$W/layer1.lsmt" "$W/layer2.lsmt"
    [[ $(sha256sum <"$W/flat.raw" | cut -d' ' -f1) == "$(cat "$DATA/flat.sha256")" ]] ||
        { echo "flat.raw differs from the host's export"; exit 1; }
    echo "exported and checked flat.raw in $((SECONDS - t0)) s:"
    (cd "$W" && ls -ls layer* flat.raw) | sed 's/^/  /'
    free -m | sed 's/^/  /'
    fio --version
    uname -r

    loop_case on loop-dio-on
    loop_case off loop-dio-off
    for kind in lsmt zfile; do
        for q in 1 2; do
            ublk_case "$kind" "$q"
        done
    done
    loop_case on loop-dio-on-again

    local rev
    rev=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')
    "$PY" - "$ROWS" "$W/dio.tsv" "$runtime" "$ramp" "$(nproc)" "$(free -m | awk '/Mem:/ { print $2 }')" \
        "$(fio --version)" "$(uname -r)" "$rev" >"$OUT/bench-ublk.md" <<'PY'
import sys
rows_path, dio_path, runtime, ramp, ncpu, mem, fiov, kver, rev = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(rows_path) if l.strip()]
dio = dict(l.split() for l in open(dio_path) if l.strip())
r = {}
order = []
for label, q, wl, mbs, iops, busy, dcpu in rows:
    key = (label, q)
    if key not in r:
        r[key] = {}
        order.append(key)
    r[key][wl] = (float(mbs), float(iops), busy, dcpu)
# baseline: the better of the two loop modes, per workload
loops = [r[k] for k in (("loop-dio-on", "-"), ("loop-dio-off", "-")) if k in r]
base = {wl: max(l[wl][0 if wl == "seq" else 1] for l in loops) for wl in ("seq", "rand")}
print(f"fio --direct=1 --ioengine=io_uring, time_based {runtime} s after {ramp} s ramp, caches dropped before each;")
print(f"seq = read bs=1M iodepth=8, rand = randread bs=4k iodepth=32. Guest: {ncpu} vCPUs (qemu TCG), {mem} MB,")
print(f"kernel {kver}, {fiov}, obd {rev}. Images in guest tmpfs.")
print("Ratio = this / the better loop mode (first runs) for that workload.")
print("CPU = whole-guest busy %; daemon = obd daemon CPU (all threads) as % of one vCPU, user+sys.")
print()
print("| device | queues | seq MB/s | seq ratio | rand IOPS | rand ratio | CPU seq/rand | daemon seq/rand |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for key in order:
    label, q = key
    s, x = r[key]["seq"], r[key]["rand"]
    name = label
    if label in dio:
        name += f" (loop/dio={dio[label]})"
    d = "-" if s[3] == "-" else f"{s[3]} / {x[3]}"
    print(f"| {name} | {q} | {s[0]:.0f} | {s[0] / base['seq']:.2f} | {x[1]:.0f} | "
          f"{x[1] / base['rand']:.2f} | {s[2]}% / {x[2]}% | {d} |")
PY
    echo
    cat "$OUT/bench-ublk.md"
}

if ((guest)); then
    guest_main
else
    host_main
fi
