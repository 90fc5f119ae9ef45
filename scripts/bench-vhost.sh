#!/usr/bin/env bash
# Benchmark (issue 13): read speed of a VM disk served by `obd serve
# --vhost-user-blk` against qemu-storage-daemon's vhost-user-blk export of
# the same image flattened to a raw file, and against ublk (`obd add`) in
# the same guest. Not a test; CI does not run it.
#
#   bash scripts/bench-vhost.sh [--runtime S] [--ramp S] [--rounds N] [--mem MB]
#                               [--queues N] [--no-build] [--remake-data]
#                               [--cases 'CASE ...']
#
# Data: the 5-layer stacks of scripts/bench-ublk.sh (target/bench/data,
# made by `bench-ublk.sh --data-only` when missing): lsmt (plain LSMT) and
# zfile (lz4, 4 KiB blocks); the raw is `obd export` of the LSMT stack,
# checked against the data's flat.sha256. On the host, in
# target/bench/vhost: two `obd serve --vhost-user-blk --queues N` (one per
# stack, layers read from target/bench/data) and one qemu-storage-daemon
# exporting the raw (`--blockdev file,cache.direct=off,aio=threads --blockdev
# raw --export vhost-user-blk,num-queues=N,writable=off`), all reading from
# the host's page cache (the files are read once before the VM starts). One
# VM boot (tests/vm/run.sh, qemu TCG, 2 vCPUs, guest memory shared with
# memfd) has the three as vhost-user-blk-pci disks at fixed PCI slots
# (num-queues=N each) and a virtio disk for the ublk cases: ext4 on
# target/bench/disk.img (cache=unsafe, so the host's page cache again), the
# layers copied there, `obd add --queues N` in the guest. For each case
# fio --ioengine=io_uring --direct=1 on the device, guest caches dropped:
#   seq     read     bs=1M iodepth=8
#   rand    randread bs=4k iodepth=32
# time_based RUNTIME s after RAMP s. Cases: vhost-lsmt vhost-zfile qsd-raw
# ublk-lsmt ublk-zfile. N rounds, even ones in reverse order; the table has
# medians with each round's value, and ratios to qsd-raw of the same run.
# Emulated CPUs (TCG) distort absolutes: read the ratios. The table is
# printed and written to target/bench/bench-vhost.md.
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
DATA=$BENCH/data

runtime=15
ramp=2
rounds=3
mem=3072
queues=2
cases="vhost-lsmt vhost-zfile qsd-raw ublk-lsmt ublk-zfile"
while (($#)); do
    case $1 in
        --runtime) runtime=$2; shift 2 ;;
        --ramp) ramp=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --queues) queues=$2; shift 2 ;;
        --cases) cases=$2; shift 2 ;;
        *) bench_option "$@"; shift "$BENCH_OPTION_WORDS" ;;
    esac
done

# The vhost-user disks' PCI slots (the guest finds them by these).
declare -A SLOT=([vhost-lsmt]=10 [vhost-zfile]=11 [qsd-raw]=12)

# ---------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------
PIDS=()
host_cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

# wait_socket PATH PID: until PATH is a socket (20 s at most)
wait_socket() {
    local i
    for ((i = 0; i < 200; i++)); do
        [[ -S $1 ]] && return 0
        kill -0 "$2" 2>/dev/null || { say "the server of $1 exited"; return 1; }
        sleep 0.1
    done
    say "no socket at $1 after 20 s"
    return 1
}

host_main() {
    command -v qemu-storage-daemon >/dev/null ||
        { say "qemu-storage-daemon is missing (apt-get install qemu-system-x86)"; exit 1; }
    install_obd
    if ((remake)) || [[ ! -s $DATA/flat.sha256 || ! -s $DATA/layer4.zfile ]]; then
        local again=()
        ((!remake)) || again=(--remake-data)
        bash "$REPO/scripts/bench-ublk.sh" --data-only --no-build "${again[@]}"
    fi
    local V=$BENCH/vhost
    rm -rf "$V"
    mkdir -p "$V"
    trap host_cleanup EXIT
    "$BENCH/obd" export --output "$V/flat.raw" "$DATA"/layer[0-4].lsmt 2>/dev/null
    [[ $(sha256sum <"$V/flat.raw" | cut -d' ' -f1) == "$(cat "$DATA/flat.sha256")" ]] ||
        { say "flat.raw differs from the data's flat.sha256"; exit 1; }
    cat "$V/flat.raw" "$DATA"/layer[0-4].{lsmt,zfile} >/dev/null   # into the page cache
    local kind qemu_args=() results
    for kind in lsmt zfile; do
        write_stack_config "$V/$kind.json" "$DATA"/layer[0-4]."$kind"
        "$BENCH/obd" serve --vhost-user-blk "$V/$kind.sock" --config "$V/$kind.json" \
            --queues "$queues" >/dev/null 2>"$V/obd-$kind.log" &
        PIDS+=($!)
        wait_socket "$V/$kind.sock" "$!"
    done
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$V/flat.raw,cache.direct=off,aio=threads,read-only=on" \
        --blockdev driver=raw,node-name=raw0,file=file0,read-only=on \
        --export "type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,addr.path=$V/qsd.sock,num-queues=$queues,writable=off" \
        2>"$V/qsd.log" &
    PIDS+=($!)
    wait_socket "$V/qsd.sock" "$!"
    # shellcheck disable=SC2054 # commas are qemu's
    qemu_args=(-object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa node,memdev=mem)
    local name sock
    for name in vhost-lsmt vhost-zfile qsd-raw; do
        case $name in
            vhost-*) sock=$V/${name#vhost-}.sock ;;
            qsd-raw) sock=$V/qsd.sock ;;
        esac
        qemu_args+=(-chardev "socket,id=$name,path=$sock"
            -device "vhost-user-blk-pci,chardev=$name,num-queues=$queues,bus=pci.0,addr=0x${SLOT[$name]}")
    done
    local run_args=() a
    for a in "${qemu_args[@]}"; do run_args+=(--qemu-arg "$a"); done
    bench_disk "$BENCH/disk.img" 6G obdbench
    results=$(mktemp -d /tmp/obd-bench-vhost.XXXXXX)
    local rc=0 n_cases
    n_cases=$(wc -w <<<"$cases")
    tests/vm/run.sh --timeout $((900 + rounds * n_cases * (2 * (ramp + runtime) + 60) * 2)) \
        --mem "$mem" --smp 2 --results "$results" --quiet "${run_args[@]}" "${BENCH_DISK_ARGS[@]}" \
        -- bash scripts/bench-vhost.sh --guest --runtime "$runtime" --ramp "$ramp" \
        --rounds "$rounds" --queues "$queues" --cases "$cases" || rc=$?
    rm -f "$BENCH/disk.img"
    host_cleanup
    PIDS=()
    for kind in lsmt zfile; do
        grep -h 'served' "$V/obd-$kind.log" | sed "s/^/  obd $kind: /" >&2 || true
    done
    if [[ -s $results/bench-vhost.md ]]; then
        {
            cat "$results/bench-vhost.md"
            echo
            echo "Host: $(nproc) CPUs (shared), qemu $(qemu-system-x86_64 --version | head -n1 | awk '{ print $4 }'), obd $(git -C "$REPO" rev-parse --short HEAD)."
        } >"$BENCH/bench-vhost.md"
        cp -r "$results/fio" "$results/rows.tsv" "$BENCH/" 2>/dev/null || true
        cat "$BENCH/bench-vhost.md"
        say "table in $BENCH/bench-vhost.md (VM results in $results)"
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
ROWS=$OUT/rows.tsv


# run_fio DEV LABEL: both workloads; a row each in ROWS:
# round label workload MB/s IOPS guest-busy%
run_fio() {
    local dev=$1 label=$2 wl
    for wl in seq rand; do
        local args
        read -r -a args <<<"$(fio_read_args "$wl")"
        sync
        echo 3 >/proc/sys/vm/drop_caches
        local json=$OUT/fio/r$round-$label-$wl.json c0 c1
        read -r -a c0 <<<"$(cpu_total)"
        fio --name="$wl" --filename="$dev" --direct=1 --ioengine=io_uring "${args[@]}" \
            --time_based --runtime="$runtime" --ramp_time="$ramp" \
            --output-format=json --output="$json" >/dev/null
        read -r -a c1 <<<"$(cpu_total)"
        fio_row "$json" "$round" "$label" "$wl" read "${c0[@]}" "${c1[@]}" >>"$ROWS"
        tail -n 1 "$ROWS" | sed 's/^/  /'
    done
}

# vhost_disk NAME: the /dev/vdX at NAME's PCI slot
vhost_disk() {
    local b
    for b in /sys/block/vd*; do
        if [[ $(readlink -f "$b/device") == */0000:00:${SLOT[$1]}.0/* ]]; then
            echo "/dev/${b##*/}"
            return 0
        fi
    done
    echo "no disk at PCI slot ${SLOT[$1]} for $1" >&2
    return 1
}

run_case() {
    local name=$1 dev
    case $name in
        vhost-* | qsd-*)
            dev=$(vhost_disk "$name")
            echo "== round $round $name: $dev"
            run_fio "$dev" "$name"
            ;;
        ublk-*)
            local kind=${name#ublk-}
            write_stack_config "$W/$kind.json" "$W"/layer[0-4]."$kind"
            dev=$("$OBD" add --config "$W/$kind.json" --queues "$queues")
            [[ -b $dev ]] || { echo "obd add printed '$dev'"; return 1; }
            echo "== round $round $name: $dev"
            run_fio "$dev" "$name"
            "$OBD" del -n "${dev#/dev/ublkb}"
            ;;
    esac
}

guest_main() {
    set -E
    trap 'echo "bench-vhost: failed at line $LINENO: $BASH_COMMAND"' ERR
    mkdir -p "$W" "$OUT/fio"
    : >"$ROWS"
    local name dev
    for name in vhost-lsmt vhost-zfile qsd-raw; do
        dev=$(vhost_disk "$name")
        echo "$name: $dev, $(blockdev --getsize64 "$dev") bytes, $(find "/sys/block/${dev#/dev/}/mq" -mindepth 1 -maxdepth 1 | wc -l) queue(s)"
    done
    # The three must hold the same bytes: compare a few MiB of each.
    local a b c off
    for off in 0 300 700; do
        a=$(dd if="$(vhost_disk vhost-lsmt)" bs=1M skip=$off count=4 iflag=direct 2>/dev/null | sha256sum)
        b=$(dd if="$(vhost_disk vhost-zfile)" bs=1M skip=$off count=4 iflag=direct 2>/dev/null | sha256sum)
        c=$(dd if="$(vhost_disk qsd-raw)" bs=1M skip=$off count=4 iflag=direct 2>/dev/null | sha256sum)
        [[ $a == "$b" && $a == "$c" ]] || { echo "the disks differ at ${off} MiB"; exit 1; }
    done
    echo "the three vhost-user disks read the same bytes (3 x 4 MiB checked)"
    if [[ $cases == *ublk-* ]]; then
        [[ -c /dev/ublk-control ]] || { echo "ublk_drv is not loaded"; exit 1; }
        mount_bench_disk obdbench "$W"
        local kind t0=$SECONDS
        for kind in lsmt zfile; do
            [[ " $cases " == *" ublk-$kind "* ]] && cp "$DATA"/layer[0-4]."$kind" "$W/"
        done
        echo "copied the ublk cases' layers to ext4 on virtio-blk in $((SECONDS - t0)) s"
    fi
    fio --version
    uname -r
    for ((round = 1; round <= rounds; round++)); do
        # shellcheck disable=SC2086 # a list of words
        for name in $(rotated $cases); do run_case "$name"; done
    done
    "$PY" - "$ROWS" "$runtime" "$ramp" "$(nproc)" "$(free -m | awk '/Mem:/ { print $2 }')" \
        "$(fio --version)" "$(uname -r)" "$rounds" "$queues" >"$OUT/bench-vhost.md" <<'PY'
import statistics, sys
rows_path, runtime, ramp, ncpu, mem, fiov, kver, rounds, queues = sys.argv[1:]
r, order = {}, []
for line in open(rows_path):
    if not line.strip():
        continue
    rnd, label, wl, mbs, iops, busy = line.rstrip("\n").split("\t")
    if label not in r:
        r[label] = {"seq": [], "rand": []}
        order.append(label)
    r[label][wl].append((float(mbs), float(iops), int(busy)))
def val(label, wl):
    return [x[0] if wl == "seq" else x[1] for x in r[label][wl]]
def med(label, wl):
    return statistics.median(val(label, wl))
base = "qsd-raw"
print(f"fio --ioengine=io_uring --direct=1 on the guest's disk, time_based {runtime} s after {ramp} s ramp,")
print("guest caches dropped before each; seq = read bs=1M iodepth=8, rand = randread bs=4k iodepth=32.")
print(f"Guest: {ncpu} vCPUs (qemu TCG), {mem} MB, kernel {kver}, {fiov}; {queues} queue(s) on every disk.")
print(f"{rounds} round(s), even rounds in reverse order; values are medians [each round];")
print(f"ratio = value / {base}'s median (qemu-storage-daemon, vhost-user-blk export of the flattened raw).")
print("CPU = whole-guest busy % (seq / rand).")
print()
print("| disk | seq MB/s | seq ratio | rand IOPS | rand ratio | CPU % |")
print("|---|---:|---:|---:|---:|---:|")
for label in order:
    cells = [label]
    for wl in ("seq", "rand"):
        v = val(label, wl)
        cells.append(f"{med(label, wl):.0f} [" + "/".join(f"{x:.0f}" for x in v) + "]")
        cells.append(f"{med(label, wl) / med(base, wl):.2f}" if base in r and med(base, wl) else "-")
    cpu = (f"{statistics.median(x[2] for x in r[label]['seq']):.0f} / "
           f"{statistics.median(x[2] for x in r[label]['rand']):.0f}")
    cells.append(cpu)
    print("| " + " | ".join(cells) + " |")
PY
    cat "$OUT/bench-vhost.md"
}

run_bench
