#!/usr/bin/env bash
# Benchmark (issues 3, 6 and 12): /dev/ublkbN and a TCMU /dev/sdX (`obd tcmu`,
# the snapshotter's configfs steps) serving a 5-layer stack, against the
# kernel loop device over the same image flattened to a raw file, in one VM
# boot. Not a test; CI does not run it.
#
#   bash scripts/bench-ublk.sh [--runtime S] [--ramp S] [--rounds N] [--mem MB]
#                              [--smp N] [--no-build] [--remake-data]
#                              [--cases 'CASE ...'] [--storage disk|tmpfs]
#                              [--ref-tcmu PATH]
#   bash scripts/bench-ublk.sh --data-only [--no-build] [--remake-data]
#
# --data-only: make the data below (when missing) and stop; what
# scripts/bench-vhost.sh uses for its stacks.
# On the host it builds obd (cargo build --release -p obd) and copies the
# binary to target/bench/obd (so a rebuild by someone else mid-run cannot
# change it), and makes, once, under target/bench/data/:
#   layer 0   `obd import` of a 1 GiB `mkfs.ext4 -d` image of ~620 MiB of
#             generated files (code-like text, binary-like, random; fixed
#             seed; lz4 4 KiB blocks compress it ~1.4x);
#   layer 1-4 sparse writable layers (`obd create -s`) given random 4 KiB and
#             64 KiB writes (~31 MiB each, fixed seeds), then `obd commit`;
#             layer 1 also maps sector 0 (512 non-zero bytes in the ext4
#             boot area), so that the reference builds its linearized index
#             (it falls back to binary search when no layer maps offset 0);
#   three stacks of the same bytes, checked to `obd export` the same raw:
#   lsmt (plain LSMT), zfile (lz4, 4 KiB blocks everywhere) and mixed
#   (ZFile with lz4 and zstd, 4-64 KiB blocks: layer 0 zstd/32K, then
#   lz4/16K, zstd/4K, lz4/64K, zstd/8K).
# Then one VM boot (tests/vm/run.sh, 6 GiB, 2 vCPUs) copies the layers to
# the guest's storage, exports the flattened raw there, and runs for each
# case fio --ioengine=io_uring (--direct=1 on devices), caches dropped
# before each:
#   seq     read     bs=1M iodepth=8
#   rand    randread bs=4k iodepth=32
# time_based RUNTIME s after RAMP s. Cases: loop over the raw with
# direct-io on and off; fio on the raw file itself (buffered: what a
# userspace reader of that storage gets); ublk over the LSMT stack and over
# the ZFile stack with --queues 1 and 2; TCMU (`obd tcmu`, tcm_loop) over
# the same two stacks. N rounds, even ones in reverse order (the host's
# load drifts: other jobs share its cores). --cases picks a subset (names:
# loop-on loop-off file ublk-KIND-1 ublk-KIND-2 tcmu-KIND ref-tcmu-KIND,
# KIND = lsmt, zfile or mixed; tcmu-KIND-wN runs `obd tcmu --workers N`).
# KIND app (ublk-app-1, tcmu-app, ref-tcmu-app; not in the defaults) is a
# 4-layer container image made by the reference convertor's tools (or obd
# apply without --ref-tcmu) on which start-up workloads are timed instead of
# fio: see scripts/bench-ublk-app.sh.
# Write cases (only when asked for with --cases; not in the default set):
# the writable upper's write and flush throughput, against the kernel loop
# device over a raw file on the same storage. Each makes its target fresh
# in every round, a 1 GiB sparse raw file (losetup --direct-io on or off)
# or an `obd add` device of a 1 GiB writable upper alone (append: data +
# index; sparse: `obd create -s`), and runs
#   fsync4k  randwrite bs=4k iodepth=1 fsync=1 (a FLUSH after every write)
#   seqw     write bs=1M iodepth=8 end_fsync=1
# with --direct=1, time_based RUNTIME s after RAMP s. Names: write-loop-on
# write-loop-off write-ublk-append write-ublk-sparse. Their table (IOPS for
# fsync4k, MB/s for seqw, ratio to the better loop mode) follows the read
# table.
# --ref-tcmu PATH: also serve both stacks through the reference C++
# overlaybd-tcmu (PATH: the binary, or a wrapper that sets LD_LIBRARY_PATH
# and execs it; it must be outside /tmp, the guest runs it from the host's
# root) with the same configfs steps and tcm_loop: cases ref-tcmu-lsmt and
# ref-tcmu-zfile and ref-tcmu-mixed, added to the default cases. It gets its own global
# config, /tmp/obd-ref/overlaybd.json in the guest (its only argument),
# with its log and cache under /tmp/obd-ref (the log is copied to the
# results as ref-overlaybd.log). Without --ref-tcmu the ref-* cases cannot
# be asked for and the benchmark runs as before.
# Order: obd's `obd tcmu` and overlaybd-tcmu both claim every
# overlaybd/... TCMU device, so only one runs at a time (each is stopped
# before the other starts). Once overlaybd-tcmu (libtcmu) has registered
# for netlink replies, the kernel waits for an answer to every new TCMU
# device, which `obd tcmu` never sends. So in every round the reference
# cases run last, after all of obd's cases (rotated among themselves the
# same way), and after the reference daemon is stopped the script tells
# target_core_user over generic netlink that no daemon answers any more
# (TCMU_CMD_SET_FEATURES, reply support 0) and checks the kernel's
# "command reply support 0" message before the next round's obd TCMU case;
# without that message the remaining obd TCMU cases are skipped, not hung.
# --storage: where the guest keeps the layers and the raw. disk (default):
# ext4 on a virtio disk backed by a fresh sparse file target/bench/disk.img
# (host page cache, cache=unsafe), like a real host's layer directory.
# tmpfs: the guest's tmpfs. tmpfs does not take non-blocking reads
# (RWF_NOWAIT gives EOPNOTSUPP), so io_uring hands every read of it to an
# io-wq thread, which penalises the ublk path against loop.
# The table (medians and per-round MB/s and IOPS, ratio to the better loop
# mode, TCMU/ublk ratio, CPU use, obd daemon CPU per thread) is printed,
# written to $OBD_VM_RESULTS/bench-ublk.md and copied to target/bench/.
# Emulated CPUs (TCG) distort absolutes: read the ratios.
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
# shellcheck source=tests/vm/ublk/chroot-lib.sh
source "$REPO/tests/vm/ublk/chroot-lib.sh"
# shellcheck source=scripts/bench-ublk-app.sh
source "$REPO/scripts/bench-ublk-app.sh"
DATA=$BENCH/data

runtime=15
ramp=2
rounds=2
mem=6144
smp=2
storage=disk
cases=
ref_tcmu=
data_only=0
while (($#)); do
    case $1 in
        --runtime) runtime=$2; shift 2 ;;
        --ramp) ramp=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --cases) cases=$2; shift 2 ;;
        --storage) storage=$2; shift 2 ;;
        --ref-tcmu) ref_tcmu=$2; shift 2 ;;
        --data-only) data_only=1; shift ;;
        *) bench_option "$@"; shift "$BENCH_OPTION_WORDS" ;;
    esac
done
if [[ -z $cases ]]; then
    cases="loop-on loop-off file ublk-lsmt-1 ublk-lsmt-2 ublk-zfile-1 ublk-zfile-2 ublk-mixed-1 tcmu-lsmt tcmu-zfile tcmu-mixed"
    [[ -z $ref_tcmu ]] || cases+=" ref-tcmu-lsmt ref-tcmu-zfile ref-tcmu-mixed"
fi

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

# random_writes SPARSE SEED [SECTOR0]: random 4 KiB and 64 KiB writes into
# a sparse writable layer, where virtual byte X lives at file offset
# 4096 + X; with SECTOR0 also 512 non-zero bytes at X = 0 (the ext4 boot
# area, which ext4 leaves unused).
random_writes() {
    "$PY" - "$1" "$2" "${3:-}" <<'PY'
import os, random, sys
path, seed, sector0 = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rnd = random.Random(seed)
vsize = os.path.getsize(path) - 4096
fd = os.open(path, os.O_WRONLY)
n = 0
if sector0:
    n += os.pwrite(fd, b"obd bench: sector 0 is mapped\n".ljust(512, b"."), 4096)
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
    # the mixed stack's ZFile settings, layer by layer
    # (no 64 KiB blocks in layer 0: its random files do not compress, and
    # the reference cannot read a block stored in more than 64 KiB)
    local mixed=("zstd 32" "lz4 16" "zstd 4" "lz4 64" "zstd 8") m
    read -r -a m <<<"${mixed[0]}"
    "$obd" import "$t/disk.raw" "$t/layer0.lsmt"
    "$obd" import -z "$t/disk.raw" "$t/layer0.zfile"
    "$obd" import -z --algorithm "${m[0]}" --bs "${m[1]}" "$t/disk.raw" "$t/layer0.mixed"
    rm -f "$t/disk.raw"
    local i
    for i in 1 2 3 4; do
        "$obd" create -s "$t/up$i.sparse" 1
        random_writes "$t/up$i.sparse" "$((100 + i))" "$( ((i == 1)) && echo sector0)"
        read -r -a m <<<"${mixed[i]}"
        "$obd" commit "$t/up$i.sparse" "$t/layer$i.lsmt"
        "$obd" commit -z "$t/up$i.sparse" "$t/layer$i.zfile"
        "$obd" commit -z --algorithm "${m[0]}" --bs "${m[1]}" "$t/up$i.sparse" "$t/layer$i.mixed"
        rm -f "$t/up$i.sparse"
    done
    local kind
    "$obd" export --output "$t/flat.raw" "$t"/layer[0-4].lsmt
    for kind in zfile mixed; do
        "$obd" export --output "$t/flat.$kind" "$t"/layer[0-4].$kind
        cmp "$t/flat.raw" "$t/flat.$kind" || { say "the LSMT and $kind stacks differ"; exit 1; }
        rm -f "$t/flat.$kind"
    done
    sha256sum <"$t/flat.raw" | cut -d' ' -f1 >"$t/flat.sha256"
    rm -f "$t/flat.raw"
    mv "$t" "$DATA"
}

host_main() {
    local ref_args=()
    if [[ " $cases " == *" ref-tcmu-"* && -z $ref_tcmu ]]; then
        say "the ref-tcmu-* cases need --ref-tcmu PATH"
        exit 2
    fi
    if [[ -n $ref_tcmu ]]; then
        ref_tcmu=$(realpath -s "$ref_tcmu")
        [[ -f $ref_tcmu && -x $ref_tcmu ]] || { say "--ref-tcmu $ref_tcmu is not an executable file"; exit 2; }
        # the guest sees the host's root, but its /tmp is its own tmpfs
        [[ $ref_tcmu != /tmp/* ]] || { say "--ref-tcmu: the guest cannot see the host's /tmp"; exit 2; }
        ref_args=(--ref-tcmu "$ref_tcmu")
    fi
    install_obd
    # (data from before the 5-layer stacks has no layer4.mixed)
    if ((remake)) || [[ ! -s $DATA/flat.sha256 || ! -s $DATA/layer4.mixed ]]; then
        make_data
    fi
    if [[ " $cases " == *-app[-\ ]* ]] && { ((remake)) || [[ ! -s $DATA/app/layer3.app ]]; }; then
        make_app_data "$([[ -z $ref_tcmu ]] || dirname "$ref_tcmu")"
    fi
    (cd "$DATA" && ls -ls layer*) | sed 's/^/  /' >&2
    ((!data_only)) || return 0
    local results
    results=$(mktemp -d /tmp/obd-bench-ublk.XXXXXX)
    local rc=0
    BENCH_DISK_ARGS=()
    case $storage in
        tmpfs) ;;
        disk) bench_disk "$BENCH/disk.img" 6G obdbench ;;
        *) say "--storage is disk or tmpfs"; exit 2 ;;
    esac
    # Each case of a round takes 2 x (ramp + runtime) of fio plus set-up,
    # which TCG on a busy host can stretch several times over.
    local n_cases vm_timeout
    n_cases=$(wc -w <<<"$cases")
    vm_timeout=$((900 + rounds * n_cases * (2 * (ramp + runtime) + 60) * 2))
    tests/vm/run.sh --timeout "$vm_timeout" --mem "$mem" --smp "$smp" --results "$results" --quiet "${BENCH_DISK_ARGS[@]}" \
        -- bash scripts/bench-ublk.sh --guest --runtime "$runtime" --ramp "$ramp" --rounds "$rounds" \
        --cases "$cases" --storage "$storage" "${ref_args[@]}" || rc=$?
    rm -f "$BENCH/disk.img"
    if [[ -s $results/bench-ublk.md ]]; then
        cp "$results/bench-ublk.md" "$BENCH/bench-ublk.md"
        rm -rf "$BENCH/fio"
        cp -r "$results/fio" "$results/rows.tsv" "$BENCH/" 2>/dev/null || true
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
REF_TCMU=$ref_tcmu
W=/tmp/bench
OUT=${OBD_VM_RESULTS:-/tmp}
ROWS=$OUT/rows.tsv
WROWS=$OUT/write-rows.tsv

# threads PIDS...: "comm utime stime" (ticks) of every thread of PIDS
threads() {
    local p t
    for p in "$@"; do
        for t in /proc/"$p"/task/*; do
            # threads come and go (io-wq workers exit when idle)
            if [[ -r $t/stat ]]; then
                echo "$(cat "$t/comm" 2>/dev/null) $(awk '{ print $14, $15 }' "$t/stat" 2>/dev/null)"
            fi
        done
    done
    return 0
}

# run_fio DEV LABEL QUEUES FIOFLAGS PIDS...: both workloads; a row each in
# ROWS: round label queues workload MB/s IOPS cpu-busy% daemon-threads
run_fio() {
    local dev=$1 label=$2 queues=$3 flags=$4
    shift 4
    local pids=("$@") wl
    for wl in seq rand; do
        local args
        read -r -a args <<<"$(fio_read_args "$wl")"
        sync
        echo 3 >/proc/sys/vm/drop_caches
        local json=$OUT/fio/r$round-$label-q$queues-$wl.json
        local c0 c1
        read -r -a c0 <<<"$(cpu_total)"
        threads "${pids[@]}" >"$W/t0"
        # shellcheck disable=SC2086 # flags are words
        fio --name="$wl" --filename="$dev" $flags --ioengine=io_uring "${args[@]}" \
            --time_based --runtime="$runtime" --ramp_time="$ramp" \
            --output-format=json --output="$json" >/dev/null
        read -r -a c1 <<<"$(cpu_total)"
        threads "${pids[@]}" >"$W/t1"
        "$PY" - "$json" "$round" "$label" "$queues" "$wl" "${c0[@]}" "${c1[@]}" \
            "$(getconf CLK_TCK)" "$(nproc)" "$W/t0" "$W/t1" >>"$ROWS" <<'PY'
import collections, json, re, sys
path, rnd, label, queues, wl = sys.argv[1:6]
b0, i0, b1, i1, hz, ncpu = map(float, sys.argv[6:12])
j = json.load(open(path))["jobs"][0]["read"]
busy = 100 * (b1 - b0) / max(1, (b1 - b0) + (i1 - i0))
secs = (b1 - b0 + i1 - i0) / hz / ncpu   # wall time of the fio run, ramp included
def snap(f):
    out = collections.Counter()
    for line in open(f):
        w = line.split()
        if len(w) == 3:
            comm = re.sub(r"-?\d+$", "", w[0])   # iou-wrk-257 -> iou-wrk
            out[(comm, "u")] += int(w[1])
            out[(comm, "s")] += int(w[2])
    return out
t0, t1 = snap(sys.argv[12]), snap(sys.argv[13])
parts = []
for comm in sorted({c for c, _ in t1}):
    u = 100 * (t1[(comm, "u")] - t0[(comm, "u")]) / hz / secs
    s_ = 100 * (t1[(comm, "s")] - t0[(comm, "s")]) / hz / secs
    if u + s_ >= 1:
        parts.append(f"{comm} {u:.0f}u+{s_:.0f}s")
daemon = ", ".join(parts) if parts else "-"
print(f"{rnd}\t{label}\t{queues}\t{wl}\t{j['bw_bytes'] / 1e6:.1f}\t{j['iops']:.0f}\t{busy:.0f}\t{daemon}")
PY
        tail -n 1 "$ROWS" | sed 's/^/  /'
    done
}

# run_fio_write DEV LABEL: the write workloads (see the header); a row
# each in WROWS: round label workload MB/s IOPS cpu-busy%
run_fio_write() {
    local dev=$1 label=$2 wl
    for wl in fsync4k seqw; do
        local args
        if [[ $wl == fsync4k ]]; then
            args=(--rw=randwrite --bs=4k --iodepth=1 --fsync=1 --randrepeat=1)
        else
            args=(--rw=write --bs=1M --iodepth=8 --end_fsync=1)
        fi
        local json=$OUT/fio/r$round-$label-$wl.json c0 c1
        read -r -a c0 <<<"$(cpu_total)"
        # (a stall shows as a missing row, not a hung benchmark)
        if ! timeout $((ramp + runtime + 240)) fio --name="$wl" --filename="$dev" --direct=1 \
            --ioengine=io_uring "${args[@]}" --time_based --runtime="$runtime" --ramp_time="$ramp" \
            --output-format=json --output="$json" >/dev/null; then
            echo "  $label $wl: fio did not finish within $((ramp + runtime + 240)) s"
            continue
        fi
        read -r -a c1 <<<"$(cpu_total)"
        fio_row "$json" "$round" "$label" "$wl" write "${c0[@]}" "${c1[@]}" >>"$WROWS"
        tail -n 1 "$WROWS" | sed 's/^/  /'
    done
}

# write_case loop-on|loop-off|ublk-append|ublk-sparse: a fresh 1 GiB
# target on the bench storage, the write workloads, then it is removed.
write_case() {
    local what=$1 dev
    rm -rf "$W/wr"
    mkdir -p "$W/wr"
    case $what in
        loop-*)
            truncate -s 1G "$W/wr/disk.raw"
            dev=$(losetup -f --show --direct-io="${what#loop-}" "$W/wr/disk.raw")
            echo "== round $round write-$what: $dev over a sparse raw file (dio $(cat "/sys/block/${dev#/dev/}/loop/dio"))"
            run_fio_write "$dev" "write-$what"
            losetup -d "$dev"
            ;;
        ublk-append | ublk-sparse)
            if [[ $what == ublk-append ]]; then
                "$OBD" create "$W/wr/upper.data" "$W/wr/upper.index" 1 >/dev/null
                printf '{"upper":{"data":"%s","index":"%s"}}\n' "$W/wr/upper.data" "$W/wr/upper.index" >"$W/wr/config.json"
            else
                "$OBD" create -s "$W/wr/upper.data" 1 >/dev/null
                printf '{"upper":{"data":"%s"}}\n' "$W/wr/upper.data" >"$W/wr/config.json"
            fi
            dev=$("$OBD" add --config "$W/wr/config.json")
            [[ -b $dev ]] || { echo "obd add printed '$dev'"; return 1; }
            echo "== round $round write-$what: $dev"
            run_fio_write "$dev" "write-$what"
            "$OBD" del -n "${dev#/dev/ublkb}"
            ;;
    esac
    rm -rf "$W/wr"
}

loop_case() {
    local dio=$1 label=loop-dio-$1 dev
    dev=$(losetup -f --show --read-only --direct-io="$dio" "$W/flat.raw")
    local got
    got=$(cat "/sys/block/${dev#/dev/}/loop/dio")
    echo "== round $round $label: $dev (direct-io=$dio asked, /sys/block/${dev#/dev/}/loop/dio=$got)"
    echo "$label	$got" >>"$W/dio.tsv"
    run_fio "$dev" "$label" - --direct=1
    losetup -d "$dev"
}

# fio straight on the raw file, buffered, io_uring: roughly what a
# userspace server reading these bytes with io_uring can get at most.
file_case() {
    echo "== round $round file: fio --direct=0 on $W/flat.raw"
    run_fio "$W/flat.raw" file-buffered - --direct=0
}

# stack_config KIND: write $W/KIND.json, the stack of KIND (lsmt, zfile,
# mixed: 5 layers; app: 4), and print its path.
stack_config() {
    local cfg=$W/$1.json
    write_stack_config "$cfg" "$W"/layer?."$1"
    echo "$cfg"
}

# run_workloads KIND DEV LABEL QUEUES PIDS...: fio's seq and rand, or the
# start-up workloads on the app image.
run_workloads() {
    local kind=$1
    shift
    if [[ $kind == app ]]; then
        run_app "$1" "$2"
    else
        run_fio "$1" "$2" "$3" --direct=1 "${@:4}"
    fi
}

ublk_case() {
    local kind=$1 queues=$2 cfg dev
    cfg=$(stack_config "$kind")
    dev=$("$OBD" add --config "$cfg" --queues "$queues")
    [[ -b $dev ]] || { echo "obd add printed '$dev'"; return 1; }
    local pids
    mapfile -t pids < <(pgrep -f -- "--config $cfg" || true)
    echo "== round $round ublk $kind --queues $queues: $dev (daemon pids ${pids[*]:-?})"
    run_workloads "$kind" "$dev" "ublk-$kind" "$queues" "${pids[@]}"
    "$OBD" del -n "${dev#/dev/ublkb}"
}

# TCMU: one `obd tcmu` daemon while obd's TCMU cases run (stopped while
# the reference's run, see the header); a device per case, made and
# removed with the snapshotter's configfs steps.
TCMU_DAEMON=
TCMU_WORKERS=
REF_DAEMON=
NL_QUIET=1    # the kernel waits for no netlink answer (see ref_stop)

# stop_daemon PID: SIGTERM, then wait for it (SIGKILL after 10 s).
stop_daemon() {
    local pid=$1 i
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

obd_tcmu_stop() {
    [[ -n $TCMU_DAEMON ]] || return 0
    stop_daemon "$TCMU_DAEMON"
    TCMU_DAEMON=
}

# tcmu_device KIND LABEL DAEMON: a TCMU device over the KIND stack made
# with make_dev, fio on it (as LABEL), then remove_dev; DAEMON serves it.
tcmu_device() {
    local kind=$1 label=$2 daemon=$3 cfg size
    cfg=$(stack_config "$kind")
    rm -f "$cfg.result"
    if [[ $kind == app ]]; then
        size=$((64 << 30))  # the convertor's virtual size
    else
        size=$(stat -c %s "$W/flat.raw")
    fi
    make_dev "bench-$kind" "$cfg" "$size" || { echo "$label: TCMU device not created"; return 1; }
    local dev=${DEV[bench-$kind]} i
    for i in $(seq 1 50); do
        [[ -s $cfg.result ]] && break
        sleep 0.2
    done
    [[ $(cat "$cfg.result" 2>/dev/null) == success ]] ||
        { echo "$label: resultFile '$(cat "$cfg.result" 2>/dev/null)'"; remove_dev "bench-$kind" || true; return 1; }
    # the same request limits as ublk's defaults would not be fair to
    # either: leave sd's own (max_sectors_kb from the block limits VPD)
    echo "== round $round $label: $dev (max_sectors_kb $(cat "/sys/block/${dev#/dev/}/queue/max_sectors_kb"), daemon pid $daemon)"
    run_workloads "$kind" "$dev" "$label" 1 "$daemon"
    remove_dev "bench-$kind" || true
}

# tcmu_case KIND[-wN]: obd tcmu over the KIND stack, with N workers per
# device (`--workers N`; the daemon's default without -wN).
tcmu_case() {
    local kind=${1%-w*} workers=
    [[ $1 != *-w* ]] || workers=${1##*-w}
    ref_stop
    if ((!NL_QUIET)); then
        echo "== round $round tcmu-$1: skipped (the kernel may still wait for netlink answers)"
        return 0
    fi
    if [[ -n $TCMU_DAEMON && $TCMU_WORKERS != "$workers" ]]; then
        obd_tcmu_stop
    fi
    if [[ -z $TCMU_DAEMON ]]; then
        "$OBD" tcmu ${workers:+--workers "$workers"} >>"$OUT/tcmu-daemon.log" 2>&1 &
        TCMU_DAEMON=$!
        TCMU_WORKERS=$workers
    fi
    tcmu_device "$kind" "tcmu-$1" "$TCMU_DAEMON"
}

# The reference overlaybd-tcmu takes its global config as its only
# argument (default /etc/overlaybd/overlaybd.json). Ours: every path in it
# is writable in the guest (/tmp), nothing talks to a network (no p2p,
# exporter or API server; the layers are local files), the rest as in the
# reference's example config (file cache, ioEngine 0 = psync) and its
# defaults (enableThread off: every device on the one main photon thread).
REF_DIR=/tmp/obd-ref
ref_config() {
    mkdir -p "$REF_DIR/registry_cache" "$REF_DIR/gzip_cache"
    echo '{}' >"$REF_DIR/cred.json"
    cat >"$REF_DIR/overlaybd.json" <<JSON
{
    "logConfig": { "logLevel": 1, "logPath": "$REF_DIR/overlaybd.log" },
    "cacheConfig": { "cacheType": "file", "cacheDir": "$REF_DIR/registry_cache", "cacheSizeGB": 1 },
    "gzipCacheConfig": { "enable": false, "cacheDir": "$REF_DIR/gzip_cache", "cacheSizeGB": 1 },
    "credentialConfig": { "mode": "file", "path": "$REF_DIR/cred.json" },
    "ioEngine": 0,
    "download": { "enable": false },
    "p2pConfig": { "enable": false },
    "exporterConfig": { "enable": false },
    "enableAudit": false,
    "auditPath": "$REF_DIR/overlaybd-audit.log",
    "registryFsVersion": "v2",
    "serviceConfig": { "enable": false }
}
JSON
}

# nl_quiet: tell target_core_user over generic netlink that no daemon
# answers its netlink commands (TCMU_CMD_SET_FEATURES with
# TCMU_ATTR_SUPP_KERN_CMD_REPLY = 0; libtcmu sends 1 when it starts), and
# check for the kernel's "command reply support 0" message.
nl_quiet() {
    "$PY" - <<'PY' || return 1
import socket, struct
NETLINK_GENERIC, GENL_ID_CTRL, CTRL_CMD_GETFAMILY = 16, 0x10, 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
TCMU_CMD_SET_FEATURES, TCMU_ATTR_SUPP_KERN_CMD_REPLY = 7, 9
NLMSG_ERROR, NLM_F_REQUEST, NLM_F_ACK = 2, 1, 4
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
s.bind((0, 0))

def attr(t, payload):
    n = 4 + len(payload)
    return struct.pack("=HH", n, t) + payload + bytes((4 - n % 4) % 4)

def attrs(buf):
    out = {}
    while len(buf) >= 4:
        n, t = struct.unpack_from("=HH", buf)
        out[t & 0x3fff] = buf[4:n]
        buf = buf[(n + 3) & ~3:]
    return out

# request: send one genetlink command with an ACK asked for; return the
# payload after the genl header of the last reply before the ACK.
def request(typ, cmd, version, body, seq):
    payload = struct.pack("=BBH", cmd, version, 0) + body
    s.send(struct.pack("=IHHII", 16 + len(payload), typ, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + payload)
    reply = None
    while True:
        data = s.recv(65536)
        while len(data) >= 16:
            n, t = struct.unpack_from("=IH", data)
            if t == NLMSG_ERROR:
                err = struct.unpack_from("=i", data, 16)[0]
                if err:
                    raise SystemExit(f"netlink: error {err} for genl command {cmd}")
                return reply
            reply = data[20:n]
            data = data[(n + 3) & ~3:]

fam = attrs(request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, attr(CTRL_ATTR_FAMILY_NAME, b"TCM-USER\0"), 1))
family = struct.unpack("=H", fam[CTRL_ATTR_FAMILY_ID][:2])[0]
request(family, TCMU_CMD_SET_FEATURES, 2, attr(TCMU_ATTR_SUPP_KERN_CMD_REPLY, b"\0"), 2)
PY
    dmesg | tail -n 20 | grep -q 'command reply support 0'
}

# ref_stop: stop overlaybd-tcmu if it runs, then make the kernel stop
# waiting for netlink answers (nl_quiet), so that the next round's obd
# TCMU cases can make their devices.
ref_stop() {
    [[ -n $REF_DAEMON ]] || return 0
    stop_daemon "$REF_DAEMON"
    REF_DAEMON=
    if nl_quiet; then
        echo "== overlaybd-tcmu stopped; target_core_user told that no daemon answers netlink (command reply support 0)"
        NL_QUIET=1
    else
        echo "== overlaybd-tcmu stopped; target_core_user's netlink reply support could not be reset: obd's TCMU cases are skipped from here on"
        NL_QUIET=0
    fi
}

ref_case() {
    local kind=$1 i
    obd_tcmu_stop
    if [[ -z $REF_DAEMON ]]; then
        [[ -s $REF_DIR/overlaybd.json ]] || ref_config
        "$REF_TCMU" "$REF_DIR/overlaybd.json" >>"$OUT/ref-tcmu-daemon.log" 2>&1 &
        REF_DAEMON=$!
        NL_QUIET=0
        # give it time to register with libtcmu (it logs its version just
        # before; a device made earlier is found by its start-up scan)
        for i in $(seq 1 150); do
            grep -qs 'current version' "$REF_DIR/overlaybd.log" && break
            kill -0 "$REF_DAEMON" 2>/dev/null || break
            sleep 0.2
        done
        sleep 1
        if ! kill -0 "$REF_DAEMON" 2>/dev/null; then
            echo "ref-tcmu-$kind: overlaybd-tcmu exited:"
            tail -n 20 "$OUT/ref-tcmu-daemon.log" "$REF_DIR/overlaybd.log" 2>/dev/null || true
            ref_stop
            return 1
        fi
    fi
    tcmu_device "$kind" "ref-tcmu-$kind" "$REF_DAEMON"
}

run_case() {
    case $1 in
        write-*) write_case "${1#write-}" ;;
        tcmu-*) tcmu_case "${1#tcmu-}" ;;
        ref-tcmu-*) ref_case "${1#ref-tcmu-}" ;;
        loop-*) loop_case "${1#loop-}" ;;
        file) file_case ;;
        ublk-*)
            local k=${1#ublk-}
            ublk_case "${k%-*}" "${k##*-}"
            ;;
    esac
}

guest_main() {
    set -E
    trap 'echo "bench-ublk: failed at line $LINENO: $BASH_COMMAND"' ERR
    [[ -c /dev/ublk-control ]] || { echo "ublk_drv is not loaded"; exit 1; }
    if [[ $cases == *tcmu-* ]]; then
        [[ -d /sys/module/target_core_user && -d /sys/module/tcm_loop && -d /sys/kernel/config/target/core ]] ||
            { echo "TCMU (target_core_user, tcm_loop, configfs) is missing in this kernel"; exit 1; }
        # shellcheck source=tests/vm/tcmu/lib.sh
        . "$REPO/tests/vm/tcmu/lib.sh"
    fi
    if [[ " $cases " == *" ref-tcmu-"* ]]; then
        [[ -x $REF_TCMU ]] || { echo "--ref-tcmu '$REF_TCMU' is not executable in the guest"; exit 1; }
    fi
    mkdir -p "$W" "$OUT/fio"
    local storage_label=tmpfs
    if [[ $storage == disk ]]; then
        mount_bench_disk obdbench "$W"
        storage_label="ext4 on virtio-blk"
    fi
    echo "storage: $storage_label"
    : >"$ROWS"
    : >"$WROWS"
    : >"$W/dio.tsv"
    local t0=$SECONDS
    # the LSMT layers (flat.raw is made from them) and those of every kind
    # a case serves
    # (not needed when every case is on the app image)
    local kind kinds="" c
    for c in $cases; do [[ $c == *-app || $c == *-app-* ]] || kinds="lsmt"; done
    for kind in zfile mixed; do
        [[ " $cases " =~ -$kind(-[0-9]|-w[0-9]+)?\  ]] && kinds+=" $kind"
    done
    for kind in $kinds; do cp "$DATA"/layer[0-4]."$kind" "$W/"; done
    local copied=$kinds
    if [[ " $cases " == *-app[-\ ]* ]]; then
        cp "$DATA"/app/layer?.app "$W/"
        copied+=" app ($(cat "$DATA/app/made-by"))"
    fi
    echo "copied the layers ($copied) in $((SECONDS - t0)) s"
    if [[ -n $kinds ]]; then
        # the flattened raw, made here (faster than copying 1 GiB over 9p)
        t0=$SECONDS
        "$OBD" export --output "$W/flat.raw" "$W"/layer[0-4].lsmt \
            2>"$W/export.err" || { cat "$W/export.err"; exit 1; }
        [[ $(sha256sum <"$W/flat.raw" | cut -d' ' -f1) == "$(cat "$DATA/flat.sha256")" ]] ||
            { echo "flat.raw differs from the host's export"; exit 1; }
        echo "exported and checked flat.raw in $((SECONDS - t0)) s"
    fi
    (cd "$W" && ls -ls layer* flat.raw 2>/dev/null || true) | sed 's/^/  /'
    free -m | sed 's/^/  /'
    fio --version
    uname -r

    # Odd rounds in this order, even rounds reversed, so a slow drift in the
    # host's load (other jobs share its cores) evens out in the medians. The
    # reference's cases come last in every round, rotated among themselves
    # (see the header: after overlaybd-tcmu the kernel waits for netlink
    # answers until ref_stop resets that).
    local c obd_cases="" ref_cases=""
    for c in $cases; do
        if [[ $c == ref-tcmu-* ]]; then ref_cases+=" $c"; else obd_cases+=" $c"; fi
    done
    for ((round = 1; round <= rounds; round++)); do
        # shellcheck disable=SC2086 # lists of words
        for c in $(rotated $obd_cases) $(rotated $ref_cases); do run_case "$c"; done
    done
    obd_tcmu_stop
    ref_stop
    [[ ! -s $REF_DIR/overlaybd.log ]] || cp "$REF_DIR/overlaybd.log" "$OUT/ref-overlaybd.log"

    local rev
    rev=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')
    : >"$OUT/bench-ublk.md"
    [[ ! -s $ROWS ]] || "$PY" - "$ROWS" "$W/dio.tsv" "$runtime" "$ramp" "$(nproc)" "$(free -m | awk '/Mem:/ { print $2 }')" \
        "$(fio --version)" "$(uname -r)" "$rev" "$rounds" "$storage_label" >"$OUT/bench-ublk.md" <<'PY'
import statistics, sys
rows_path, dio_path, runtime, ramp, ncpu, mem, fiov, kver, rev, rounds, storage = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(rows_path) if l.strip()]
dio = dict(l.split() for l in open(dio_path) if l.strip())
r, order = {}, []
for rnd, label, q, wl, mbs, iops, busy, threads in rows:
    key = (label, q)
    if key not in r:
        r[key] = {"seq": [], "rand": []}
        order.append(key)
    r[key][wl].append((float(mbs), float(iops), int(busy), threads))
def val(key, wl):   # per-round values: MB/s for seq, IOPS for rand
    return [x[0] if wl == "seq" else x[1] for x in r[key][wl]]
def median(key, wl):
    return statistics.median(val(key, wl))
loops = [k for k in (("loop-dio-on", "-"), ("loop-dio-off", "-")) if k in r]
base = {wl: max((median(k, wl) for k in loops), default=None) for wl in ("seq", "rand")}
print(f"fio --ioengine=io_uring, time_based {runtime} s after {ramp} s ramp, caches dropped before each;")
print("seq = read bs=1M iodepth=8, rand = randread bs=4k iodepth=32; devices with --direct=1.")
print(f"Guest: {ncpu} vCPUs (qemu TCG), {mem} MB, kernel {kver}, {fiov}, obd {rev}; images on {storage}.")
print(f"{rounds} round(s), even rounds in reverse order; values are medians [each round].")
print("ratio = value / the better loop mode's median for that workload.")
print("CPU = whole-guest busy % (seq / rand). file-buffered = fio on the raw file itself,")
print("buffered, io_uring: roughly the ceiling for a userspace reader of that storage.")
print()
print("| device | queues | seq MB/s | seq ratio | rand IOPS | rand ratio | CPU % |")
print("|---|---|---:|---:|---:|---:|---:|")
for key in order:
    label, q = key
    name = label + (f" (loop/dio={dio[label]})" if label in dio else "")
    cells = []
    for wl in ("seq", "rand"):
        v = val(key, wl)
        cells.append(f"{median(key, wl):.0f} [" + "/".join(f"{x:.0f}" for x in v) + "]")
        cells.append(f"{median(key, wl) / base[wl]:.2f}" if base[wl] else "-")
    cpu = (f"{statistics.median(x[2] for x in r[key]['seq']):.0f} / "
           f"{statistics.median(x[2] for x in r[key]['rand']):.0f}")
    print(f"| {name} | {q} | " + " | ".join(cells) + f" | {cpu} |")
pairs = [(k, ("ublk-" + k, "1"), ("tcmu-" + k, "1")) for k in ("lsmt", "zfile", "mixed")]
pairs = [p for p in pairs if p[1] in r and p[2] in r]
if pairs:
    print()
    print("TCMU / ublk (--queues 1), same stack, same boot:")
    print()
    print("| stack | seq MB/s tcmu / ublk | seq ratio | rand IOPS tcmu / ublk | rand ratio |")
    print("|---|---:|---:|---:|---:|")
    for kind, u, t in pairs:
        cells = []
        for wl in ("seq", "rand"):
            cells.append(f"{median(t, wl):.0f} / {median(u, wl):.0f}")
            cells.append(f"{median(t, wl) / median(u, wl):.2f}")
        print(f"| {kind} | " + " | ".join(cells) + " |")
refs = [(k, ("ref-tcmu-" + k, "1"), ("ublk-" + k, "1"), ("tcmu-" + k, "1")) for k in ("lsmt", "zfile", "mixed")]
refs = [p for p in refs if p[1] in r]
if refs:
    print()
    print("obd / reference (overlaybd-tcmu, its TCMU device made the same way), same stack, same boot;")
    print("above 1: obd is faster. ublk = `obd add --queues 1`, obd tcmu = `obd tcmu`:")
    print()
    print("| stack | seq MB/s ref | seq ublk / ref | seq obd tcmu / ref "
          "| rand IOPS ref | rand ublk / ref | rand obd tcmu / ref |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, f, u, t in refs:
        cells = []
        for wl in ("seq", "rand"):
            m = median(f, wl)
            cells.append(f"{m:.0f}")
            for o in (u, t):
                cells.append(f"{median(o, wl) / m:.2f}" if o in r and m else "-")
        print(f"| {kind} | " + " | ".join(cells) + " |")
print()
print("daemon CPU by thread (obd; overlaybd-tcmu for ref-tcmu-*), % of one vCPU, user+sys, round 1")
print("(iou-wrk = io_uring io-wq workers):")
print()
for key in order:
    if key[0].startswith(("ublk", "tcmu", "ref-tcmu")):
        s, x = r[key]["seq"][0][3], r[key]["rand"][0][3]
        print(f"- {key[0]} --queues {key[1]}: seq: {s}; rand: {x}")
PY
    if [[ -s $WROWS ]]; then
        "$PY" - "$WROWS" "$runtime" "$ramp" "$rounds" >>"$OUT/bench-ublk.md" <<'PY'
import statistics, sys
rows_path, runtime, ramp, rounds = sys.argv[1:]
r, order = {}, []
for line in open(rows_path):
    if not line.strip():
        continue
    rnd, label, wl, mbs, iops, busy = line.rstrip("\n").split("\t")
    if label not in r:
        r[label] = {"fsync4k": [], "seqw": []}
        order.append(label)
    r[label][wl].append((float(mbs), float(iops), int(busy)))
def val(label, wl):   # IOPS for fsync4k, MB/s for seqw
    return [x[1] if wl == "fsync4k" else x[0] for x in r[label][wl]]
def med(label, wl):   # (nan when fio never finished for it)
    v = val(label, wl)
    return statistics.median(v) if v else float("nan")
loops = [l for l in ("write-loop-on", "write-loop-off") if l in r]
base = {wl: max((med(l, wl) for l in loops), default=None) for wl in ("fsync4k", "seqw")}
print()
print("Writes: a fresh 1 GiB target per case and round on the same storage; fio --direct=1")
print(f"--ioengine=io_uring, time_based {runtime} s after {ramp} s ramp. fsync4k = randwrite bs=4k")
print("iodepth=1 fsync=1 (IOPS), seqw = write bs=1M iodepth=8 end_fsync=1 (MB/s). write-loop-*:")
print("loop over a sparse raw file; write-ublk-*: `obd add` of a writable upper alone (append:")
print(f"data + index, sparse: one file). {rounds} round(s); medians [each round]; ratio = value /")
print("the better loop mode's median. CPU = whole-guest busy % (fsync4k / seqw).")
print()
print("| target | fsync4k IOPS | ratio | seqw MB/s | ratio | CPU % |")
print("|---|---:|---:|---:|---:|---:|")
for label in order:
    cells = [label]
    for wl in ("fsync4k", "seqw"):
        cells.append(f"{med(label, wl):.0f} [" + "/".join(f"{x:.0f}" for x in val(label, wl)) + "]")
        cells.append(f"{med(label, wl) / base[wl]:.2f}" if base[wl] else "-")
    cpu = [statistics.median(x[2] for x in r[label][wl]) if r[label][wl] else float("nan")
           for wl in ("fsync4k", "seqw")]
    cells.append(f"{cpu[0]:.0f} / {cpu[1]:.0f}")
    print("| " + " | ".join(cells) + " |")
PY
    fi
    if [[ $cases == *tcmu-* ]]; then
        rmdir /sys/kernel/config/target/core/user_1 2>/dev/null || true
    fi
    app_table >>"$OUT/bench-ublk.md"
    echo
    cat "$OUT/bench-ublk.md"
}

run_bench
