# shellcheck shell=bash disable=SC2034 # its variables are for the scripts that source it
# Shared by the VM benchmarks scripts/bench-startup.sh and
# scripts/bench-ublk.sh (sourced right after `set -euo pipefail`, not run);
# the host benchmark scripts/bench-convert.sh uses its say, usage,
# bench_option and install_obd.
# Each script runs twice: on the host (it builds obd, makes its data once
# under target/bench/ and boots the VM with tests/vm/run.sh) and, given
# --guest, inside the VM (the workloads). A script sets the defaults of its
# own options, then parses them with this as the last case:
#     *) bench_option "$@"; shift "$BENCH_OPTION_WORDS" ;;
# defines host_main and guest_main, and ends with run_bench.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$REPO/target/bench
# The system python: a pyenv shim costs ~20 s per cold start under TCG.
PY=/usr/bin/python3
BENCH_NAME=$(basename "$0" .sh)

# The options every bench script takes (bench_option sets them).
guest=0
build=1
remake=0
BENCH_OPTION_WORDS=1

say() { printf '%s: %s\n' "$BENCH_NAME" "$*" >&2; }

# usage: print the script's header comment and exit 2.
usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

# bench_option ARGS...: take the option in $1 that every bench script knows
# (--guest, --mem MB, --no-build, --remake-data) and set BENCH_OPTION_WORDS
# to the number of words it used. Anything else prints the usage, exit 2.
bench_option() {
    case $1 in
        --guest) guest=1; BENCH_OPTION_WORDS=1 ;;
        --mem) mem=$2; BENCH_OPTION_WORDS=2 ;;
        --no-build) build=0; BENCH_OPTION_WORDS=1 ;;
        --remake-data) remake=1; BENCH_OPTION_WORDS=1 ;;
        *) usage ;;
    esac
}

# install_obd: cd to the repo, build obd (release; not with --no-build) and
# copy it to $BENCH/obd, so that a rebuild by someone else mid-run cannot
# change the binary the VM runs. The binary is taken from
# $CARGO_TARGET_DIR/release when that is set, as cargo puts it there.
install_obd() {
    cd "$REPO" || exit 1
    mkdir -p "$BENCH"
    if ((build)); then
        say "cargo build --release -p obd"
        cargo build --release -p obd
    fi
    cp "${CARGO_TARGET_DIR:-target}/release/obd" "$BENCH/obd.tmp" && mv "$BENCH/obd.tmp" "$BENCH/obd"
}

# bench_disk IMAGE SIZE SERIAL: a fresh sparse IMAGE of SIZE on the host,
# attached to the VM as a virtio disk with SERIAL; sets BENCH_DISK_ARGS to
# the tests/vm/run.sh options that do it. cache=unsafe: the host's page
# cache backs it, like a host's layer directory.
bench_disk() {
    rm -f "$1"
    truncate -s "$2" "$1"
    BENCH_DISK_ARGS=(--qemu-arg -drive
        --qemu-arg "file=$1,if=none,id=$3,format=raw,cache=unsafe"
        --qemu-arg -device --qemu-arg "virtio-blk-pci,drive=$3,serial=$3")
}

# mount_bench_disk SERIAL DIR (guest): make ext4 on the virtio disk with
# SERIAL and mount it on DIR; exit 1 when the disk is missing.
mount_bench_disk() {
    local b disk=
    for b in /sys/block/vd*; do
        [[ $(cat "$b/serial" 2>/dev/null) == "$1" ]] && disk=/dev/${b##*/}
    done
    [[ -b $disk ]] || { echo "the disk with virtio serial $1 is missing"; exit 1; }
    mkfs.ext4 -q -F "$disk"
    mount "$disk" "$2"
}

# write_stack_config CONFIG LAYER...: an image config of the LAYERs
# (bottom first), its resultFile next to it.
write_stack_config() {
    "$PY" - "$@" <<'PY'
import json, sys
cfg, *lowers = sys.argv[1:]
json.dump({"lowers": [{"file": l} for l in lowers], "resultFile": cfg + ".result"}, open(cfg, "w"))
PY
}

# cpu_total: the guest's busy and idle CPU ticks since boot.
cpu_total() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $5 + $6 }' /proc/stat; }

# rotated WORDS...: the words, reversed in even rounds ($round), so that a
# slow drift in the host's load evens out in the medians.
rotated() {
    if ((round % 2)); then
        echo "$@"
    else
        local i out=()
        for ((i = $#; i >= 1; i--)); do out+=("${!i}"); done
        echo "${out[@]}"
    fi
}

# fio_read_args seq|rand: fio's arguments for the read workloads every
# bench shares: seq = read bs=1M iodepth=8, rand = randread bs=4k iodepth=32.
fio_read_args() {
    if [[ $1 == seq ]]; then
        echo --rw=read --bs=1M --iodepth=8
    else
        echo --rw=randread --bs=4k --iodepth=32 --norandommap --randrepeat=1
    fi
}

# fio_row JSON ROUND LABEL WORKLOAD read|write BUSY0 IDLE0 BUSY1 IDLE1: one
# row of fio's result: round label workload MB/s IOPS cpu-busy% (the ticks
# of cpu_total before and after the run).
fio_row() {
    "$PY" - "$@" <<'PY'
import json, sys
path, rnd, label, wl, direction = sys.argv[1:6]
b0, i0, b1, i1 = map(float, sys.argv[6:10])
j = json.load(open(path))["jobs"][0][direction]
busy = 100 * (b1 - b0) / max(1, (b1 - b0) + (i1 - i0))
print(f"{rnd}\t{label}\t{wl}\t{j['bw_bytes'] / 1e6:.1f}\t{j['iops']:.0f}\t{busy:.0f}")
PY
}

# run_bench: guest_main with --guest, host_main without.
run_bench() {
    if ((guest)); then
        guest_main
    else
        host_main
    fi
}
