#!/usr/bin/env bash
# Benchmark (issue 12): the in-process engine, no kernel device. Reading a
# whole image through `obd export` against `cat` and `dd` of the flattened
# raw file, on the host, files in the page cache, output to /dev/shm. Not a
# test; scripts/test.sh runs a short form (--size-mib 64 --rounds 1).
#
#   bash scripts/bench-engine.sh [--size-mib N] [--rounds N] [--no-build]
#
# Images, made once per run under target/bench-engine/ from one generated
# raw disk (somewhat compressible, some all-zero sectors):
#   plain   `obd import` of the raw (one LSMT layer)
#   zfile   `obd import -z` (lz4, 4 KiB blocks)
#   stack   the plain layer under a second layer that rewrites a quarter of
#           the disk (`obd import` of a raw that is zero elsewhere)
# Each round runs every case in a rotated order; the report gives each
# round's seconds, the median, MB/s and the ratio to cat's median. Every
# export is compared with what it must equal (cmp); a mismatch fails.
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib=1024
rounds=5
build=1
while (($#)); do
    case $1 in
        --size-mib) size_mib=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-engine.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $size_mib =~ ^[0-9]+$ && $size_mib -ge 4 && $rounds =~ ^[1-9][0-9]*$ ]] || {
    echo "bench-engine.sh: --size-mib needs a whole number >= 4, --rounds one >= 1" >&2
    exit 2
}

if ((build)); then
    cargo build --release --locked -q -p obd
fi
obd=${OBD_BIN:-target/release/obd}
work=target/bench-engine
out=/dev/shm/obd-bench-engine.$$
rm -rf "$work" && mkdir -p "$work"
trap 'rm -f "$out"' EXIT

echo "making a ${size_mib} MiB disk and its images in $work"
python3 - "$work" "$size_mib" <<'PY'
import os, random, sys
work, mib = sys.argv[1], int(sys.argv[2])
rng = random.Random(12)
words = [b"overlaybd ", b"block ", b"layer ", b"\0" * 8, b"ext4 ", b"0123456789"]
def block():
    out = bytearray()
    while len(out) < 4096:
        out += rng.choice(words) if rng.random() < 0.9 else rng.randbytes(32)
    return bytes(out[:4096])
pool = [block() for _ in range(256)]
zero = bytes(4096)
with open(os.path.join(work, "base.raw"), "wb") as base, \
     open(os.path.join(work, "top.raw"), "wb") as top:
    for i in range(mib * 256):
        data = zero if rng.random() < 0.05 else rng.choice(pool)
        base.write(data)
        # the second layer rewrites every fourth 64 KiB run
        top.write(rng.choice(pool) if (i // 16) % 4 == 1 else zero)
PY
"$obd" import "$work/base.raw" "$work/plain.lsmt" >/dev/null
"$obd" import "$work/base.raw" "$work/zfile.lsmt" -z --algorithm lz4 >/dev/null
"$obd" import "$work/top.raw" "$work/top.lsmt" >/dev/null
# What the stack must export: the base with the top's non-zero blocks over it.
python3 - "$work" <<'PY'
import os, sys
work = sys.argv[1]
with open(os.path.join(work, "base.raw"), "rb") as b, open(os.path.join(work, "top.raw"), "rb") as t, \
     open(os.path.join(work, "stack.raw"), "wb") as o:
    while True:
        x, y = b.read(512), t.read(512)
        if not x:
            break
        o.write(y if any(y) else x)
PY
cat "$work"/*.raw "$work"/*.lsmt >/dev/null

cases=(cat dd plain zfile stack)
run_case() {
    rm -f "$out"
    case $1 in
        cat) cat "$work/base.raw" >"$out" ;;
        dd) dd if="$work/base.raw" of="$out" bs=1M status=none ;;
        plain) "$obd" export --output "$out" "$work/plain.lsmt" >/dev/null ;;
        zfile) "$obd" export --output "$out" "$work/zfile.lsmt" >/dev/null ;;
        stack) "$obd" export --output "$out" "$work/plain.lsmt" "$work/top.lsmt" >/dev/null ;;
    esac
}
expected_of() {
    case $1 in
        stack) echo "$work/stack.raw" ;;
        *) echo "$work/base.raw" ;;
    esac
}

declare -A times
for ((r = 0; r < rounds; r++)); do
    for ((k = 0; k < ${#cases[@]}; k++)); do
        c=${cases[(k + r) % ${#cases[@]}]}
        start=$EPOCHREALTIME
        run_case "$c"
        end=$EPOCHREALTIME
        cmp -s "$out" "$(expected_of "$c")" || { echo "bench-engine.sh: $c exported the wrong bytes" >&2; exit 1; }
        times[$c]+="$(python3 -c "print(f'{$end - $start:.3f}')") "
    done
done

python3 - "$size_mib" "${cases[@]}" <<PY
import statistics, sys
mib = int(sys.argv[1])
times = {$(for c in "${cases[@]}"; do printf '"%s": [%s], ' "$c" "$(echo "${times[$c]}" | tr ' ' ',')"; done)}
base = statistics.median(times["cat"])
print(f"engine, {mib} MiB, page cache, output to /dev/shm; seconds per round, median, MB/s, ratio to cat")
for case in sys.argv[2:]:
    t = times[case]
    m = statistics.median(t)
    rounds = " ".join(f"{x:.3f}" for x in t)
    print(f"{case:6} {rounds:40} median {m:.3f}  {mib * 1.048576 / m:8.0f} MB/s  {base / m:.2f}x cat")
PY
