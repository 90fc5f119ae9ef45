#!/usr/bin/env bash
# Power-cut test (issue 13): every write acknowledged by a flush survives
# qemu being killed, on ublk and TCMU, append-only and sparse uppers.
#
#   bash tests/vm/powercut/run.sh [--trials N] [--kinds 'KIND ...'] [--no-build]
#
# Each trial: a fresh 1 GiB ext4 disk image on the host, attached to the
# test VM as virtio /dev/vda with cache=none (the guest's unflushed page
# cache and qemu's own buffers die with qemu; what the guest flushed is on
# the host's disk); the guest (guest.sh) serves an image with a writable
# upper on it and writes stamped 4 KiB blocks with O_DIRECT, logging the
# writes each fsync covered; 3-15 s (random) after the first fsync, qemu is
# killed with SIGKILL. Then, on the host, the disk is mounted (the ext4
# journal replays, as after a reboot), the image is exported with
# `obd export --config` (which reopens the upper as a daemon restart does)
# and check.py compares every block with the acknowledged writes. Kinds:
# ublk-append ublk-sparse tcmu-append tcmu-sparse, in turn. Prints a line
# per trial and the counts; exits 1 if any acknowledged write was lost or a
# block holds anything but a whole write of itself.
set -euo pipefail
cd "$(dirname "$0")/../../.."
trials=20
kinds="ublk-append ublk-sparse tcmu-append tcmu-sparse"
build=1
while (($#)); do
    case $1 in
        --trials) trials=$2; shift 2 ;;
        --kinds) kinds=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        *) echo "usage: $0 [--trials N] [--kinds 'KIND ...'] [--no-build]" >&2; exit 2 ;;
    esac
done
((build)) && cargo build --release -p obd
# The host runs this binary; the guest gets the path relative to the
# checkout, which it sees at another place when the checkout is under /tmp.
OBD_HOST=$PWD/target/release/obd
MNT=/mnt/obd-powercut
mkdir -p "$MNT"
WORK=$(mktemp -d /tmp/obd-powercut.XXXXXX)
cleanup() {
    mountpoint -q "$MNT" && umount "$MNT"
    rm -rf "$WORK"
}
trap cleanup EXIT
read -ra kind_list <<<"$kinds"
passed=0 failed=0 inconclusive=0
attempt=0
for ((t = 1; t <= trials; t++)); do
    kind=${kind_list[$(((t - 1) % ${#kind_list[@]}))]}
    attempt=$((attempt + 1))
    disk=$WORK/disk.img results=$WORK/trial-$t
    rm -f "$disk"
    mkdir -p "$results"
    truncate -s 1G "$disk"
    mkfs.ext4 -q -F "$disk"
    tests/vm/run.sh --quiet --timeout 400 --results "$results" \
        --env OBD_BIN=target/release/obd --env POWERCUT_KIND="$kind" \
        --qemu-arg -drive --qemu-arg "file=$disk,if=virtio,format=raw,cache=none" \
        -- bash tests/vm/powercut/guest.sh >"$results/run.out" 2>&1 &
    runner=$!
    for ((i = 0; i < 1500; i++)); do
        [[ -e $results/started ]] && break
        kill -0 "$runner" 2>/dev/null || break
        sleep 0.2
    done
    if [[ ! -e $results/started ]]; then
        wait "$runner" || true
        echo "trial $t ($kind): the workload never started; $(tail -n 5 "$results/run.out" | tr '\n' ' ')"
        # A boot that failed (TCG under load panics now and then) is tried
        # once more; a second failure counts.
        if ((attempt == 1)); then
            t=$((t - 1))
            continue
        fi
        inconclusive=$((inconclusive + 1))
        attempt=0
        continue
    fi
    attempt=0
    delay=$((3 + RANDOM % 13))
    sleep "$delay"
    pkill -KILL -f "path=$results,mount_tag=results" || true
    wait "$runner" || true
    mount -o loop "$disk" "$MNT"
    out=$WORK/image.raw
    rm -f "$out"
    if ! "$OBD_HOST" export --config "$MNT/config.v1.json" --length $((64 << 20)) \
        --output "$out" 2>"$results/export.err"; then
        echo "trial $t ($kind): FAIL: the image does not reopen: $(cat "$results/export.err")"
        failed=$((failed + 1))
        umount "$MNT"
        continue
    fi
    umount "$MNT"
    if verdict=$(python3 tests/vm/powercut/check.py "$out" "$results/acked.log"); then
        echo "trial $t ($kind, cut after ${delay}s): ok: ${verdict##*$'\n'}"
        passed=$((passed + 1))
    else
        echo "trial $t ($kind, cut after ${delay}s): FAIL:"
        echo "$verdict" | tail -n 20 | sed 's/^/  /'
        failed=$((failed + 1))
    fi
done
echo "power cut: $passed passed, $failed failed, $inconclusive inconclusive (of $trials trials)"
((failed == 0 && inconclusive == 0))
