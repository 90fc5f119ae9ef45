#!/usr/bin/env bash
# Boot a VM from an obd image through vhost-user-blk, on the host itself (no
# kernel module: no ublk, TCMU or nbd).
#
#   tests/vm/vhost/boot.sh            # OBD_BIN=path/to/obd to pick the binary
#
# 1. A root filesystem (busybox-static and tests/vm/vhost/guest-init.sh as
#    /sbin/init, plus an 8 MiB random file and its sha256) is built with
#    `mkfs.ext4 -d` into a 1 GiB raw disk (a 64 MiB filesystem; the rest is
#    raw space for the discard check), imported as a ZFile lower, and given a
#    fresh upper.
# 2. `obd serve --vhost-user-blk` serves it with 2 queues; qemu (TCG) boots
#    the Debian kernel of the VM tests (tests/vm/setup.sh) with root=/dev/vda
#    and a 2-queue vhost-user-blk-pci disk. The guest reads the random file
#    from both CPUs (one queue each) and checks its sha256, writes
#    /hello.txt and syncs, writes 1 MiB raw past the filesystem, deletes
#    /data/trim.bin and runs fstrim (DISCARD), and powers off.
# 3. obd (SIGTERM) flushes and exits; its log must show requests on both
#    queues, flushes and discards. The image is read back with `obd export`:
#    the raw MiB must hold the guest's pattern, and the blocks trim.bin had
#    (found with debugfs before the boot) must read as zeros. The upper is
#    committed into a new lower, and a fresh upper stacked on the two lowers.
# 4. The VM boots again from the new stack and must find /hello.txt and the
#    random file intact.
# 5. Live snapshot: a third boot writes and syncs /before.txt, then a file
#    after another while the host runs `obd snapshot --vhost-user-blk
#    vm.sock` and tells the guest on its second serial port (ttyS1); the
#    guest writes /after.txt and powers off. The config must now have 3
#    lowers (the frozen upper last) and the new upper-1 files. A fourth boot
#    from that config must find /before.txt, /after.txt and every file the
#    writer wrote.
#
# Fails (never skips) when qemu, the kernel, busybox-static or mkfs.ext4 is
# missing. Prints `N passed, N failed` and timings; exits non-zero on any
# failure. Work files stay in $OBD_VM_RUNS (default /tmp)/obd-vhost.XXXXXX.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
OBD=${OBD_BIN:-$ROOT/target/debug/obd}
# A relative OBD_BIN is relative to where the script was started.
[[ $OBD == /* ]] || OBD=$PWD/$OBD
TIMEOUT=${OBD_VHOST_TIMEOUT:-300}

t_start=$(date +%s.%N)
passed=0
failed=0
say() { printf 'vhost-boot: %s\n' "$*" >&2; }
die() {
    printf 'vhost-boot: FAILED: %s\n' "$*" >&2
    echo "$passed passed, $((failed + 1)) failed"
    exit 1
}
check() { # check NAME COMMAND...: one named check
    local name=$1
    shift
    if "$@"; then
        passed=$((passed + 1))
        say "ok: $name"
    else
        failed=$((failed + 1))
        say "FAILED: $name"
    fi
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# --- what it needs: fail clearly, never skip --------------------------------
[[ -x $OBD ]] || die "no obd binary at $OBD (cargo build --bin obd, or set OBD_BIN)"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing (apt-get install qemu-system-x86; group vm of scripts/packages.sh)"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 is missing (apt-get install e2fsprogs)"
BUSYBOX=/bin/busybox
if ! [[ -x $BUSYBOX ]] || ! "$BUSYBOX" --list | grep -qx switch_root; then
    die "$BUSYBOX (busybox-static) is missing"
fi
ldd "$BUSYBOX" >/dev/null 2>&1 && die "$BUSYBOX is not static (install busybox-static)"
setup_out=$("$ROOT/tests/vm/setup.sh") || die "tests/vm/setup.sh failed (kernel and initramfs)"
VMLINUZ=$(sed -n 's/^VMLINUZ=//p' <<<"$setup_out")
INITRD=$(sed -n 's/^INITRD=//p' <<<"$setup_out")
[[ -s $VMLINUZ ]] || die "no VM kernel (VMLINUZ) from tests/vm/setup.sh"
[[ -s $INITRD ]] || die "no VM initramfs (INITRD) from tests/vm/setup.sh"
grep -q . <(gzip -dc "$INITRD" | cpio -it --quiet 2>/dev/null | grep 'virtio_blk.ko$') \
    || die "the VM initramfs $INITRD has no virtio_blk module"

mkdir -p "${OBD_VM_RUNS:-/tmp}"
WORK=$(mktemp -d "${OBD_VM_RUNS:-/tmp}/obd-vhost.XXXXXX")
say "work dir $WORK, obd $OBD"
cd "$WORK"

obd_pid=""
qemu_pid=""
# The guest's second serial port (ttyS1): the host's line to it.
mkfifo ctl.in ctl.out
cleanup() {
    if [[ -n $qemu_pid ]]; then kill "$qemu_pid" 2>/dev/null || true; fi
    if [[ -n $obd_pid ]]; then kill "$obd_pid" 2>/dev/null || true; fi
    wait 2>/dev/null || true
}
trap cleanup EXIT

# --- 1. the root filesystem, the image --------------------------------------
t=$(date +%s.%N)
mkdir -p root/{bin,sbin,proc,sys,dev,tmp,data,mnt}
cp "$BUSYBOX" root/bin/busybox
for applet in $(root/bin/busybox --list); do
    [[ -e root/bin/$applet ]] || ln -s busybox "root/bin/$applet"
done
install -m 0755 "$HERE/guest-init.sh" root/sbin/init
head -c $((8 << 20)) /dev/urandom >root/data/big.bin
(cd root/data && sha256sum big.bin >big.sha256)
head -c $((1 << 20)) /dev/urandom >root/data/trim.bin
# The raw MiB the guest writes past the filesystem.
RAW_AT=$((512 << 20))
truncate -s 1G disk.raw
mkfs.ext4 -q -F -b 4096 -L obdroot -d root disk.raw 64M
# Where trim.bin's data lies: "(0-255):1234-1489" extents, in 4 KiB blocks.
trim_extents=$(debugfs -R "ex /data/trim.bin" disk.raw 2>/dev/null \
    | awk '$NF ~ /^[0-9]+$/ && $(NF-1) ~ /^[0-9]+$/ && NF >= 7 { print $(NF-3), $(NF-1) }') || true
[[ -n $trim_extents ]] || die "debugfs found no extents of /data/trim.bin"
read -r first last <<<"$trim_extents"
"$OBD" import -z disk.raw base.zfile >/dev/null
rm disk.raw
# The trim check below means something only if those blocks hold data.
"$OBD" export base.zfile --offset $((first * 4096)) --length 4096 -o trim-base.out >/dev/null
cmp -s trim-base.out <(head -c 4096 root/data/trim.bin) || die "trim.bin is not where debugfs says"
"$OBD" create upper.data upper.index 1 >/dev/null
cat >config.v1.json <<EOF
{"lowers": [{"file": "base.zfile"}],
 "upper": {"index": "upper.index", "data": "upper.data"},
 "resultFile": "result"}
EOF

# An initramfs that loads virtio_blk and ext4 (from the VM tests' initramfs)
# and switches to /dev/vda: the VM tests' initramfs with our /init on top
# (a second cpio archive overrides files of the first).
mkdir -p initrd-top
install -m 0755 "$HERE/initramfs-init.sh" initrd-top/init
(cd initrd-top && echo init | cpio -o -H newc -R 0:0 --quiet | gzip -1) >top.cpio.gz
cat "$INITRD" top.cpio.gz >initrd.cpio.gz
say "image and initramfs built in $(elapsed "$t")s"

# --- serving and booting ------------------------------------------------------
start_obd() { # start_obd LOG: serve config.v1.json on vm.sock
    local log=$1
    rm -f result
    "$OBD" serve --vhost-user-blk vm.sock --config config.v1.json --queues 2 >"$log.out" 2>"$log" &
    obd_pid=$!
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s $log.out ]] && break
        kill -0 "$obd_pid" 2>/dev/null || { cat "$log" >&2; die "obd serve exited at start"; }
        sleep 0.1
    done
    [[ -s $log.out ]] || die "obd serve did not get ready in 10 s"
    [[ $(<result) == success ]] || die "resultFile says '$(<result)'"
    [[ -S vm.sock ]] || die "no socket at vm.sock"
}

stop_obd() { # stop_obd: SIGTERM, which must flush and exit 0
    kill -TERM "$obd_pid"
    local rc=0
    wait "$obd_pid" || rc=$?
    obd_pid=""
    [[ $rc == 0 ]] || die "obd serve exited with $rc after SIGTERM"
    [[ ! -e vm.sock ]] || die "obd serve left its socket behind"
}

boot() { # boot PHASE: one VM run; console in console-PHASE.log
    boot_start "$1"
    boot_wait "$1"
}

boot_start() { # boot_start PHASE: start the VM in the background
    local phase=$1
    boot_t=$(date +%s.%N)
    # shellcheck disable=SC2054 # commas are qemu's
    local qemu=(
        qemu-system-x86_64 -accel tcg,thread=multi -cpu max -machine pc
        -m 512 -smp 2 -display none -no-reboot -nic none
        -serial stdio -serial pipe:ctl -monitor none
        -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
        -chardev socket,id=disk,path=vm.sock
        -device vhost-user-blk-pci,chardev=disk,num-queues=2
        -kernel "$VMLINUZ" -initrd initrd.cpio.gz
        -append "console=ttyS0 quiet panic=-1 root=/dev/vda obd.phase=$phase obd.raw=$RAW_AT"
    )
    "${qemu[@]}" </dev/null >"console-$phase.log" 2>&1 &
    qemu_pid=$!
}

boot_wait() { # boot_wait PHASE: wait for the VM to power off, check it finished
    local phase=$1
    local deadline=$((SECONDS + TIMEOUT))
    while kill -0 "$qemu_pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            kill "$qemu_pid" 2>/dev/null || true
            tail -n 40 "console-$phase.log" | tr -d '\r' >&2
            die "boot $phase: timeout after ${TIMEOUT}s"
        fi
        sleep 0.5
    done
    local rc=0
    wait "$qemu_pid" || rc=$?
    qemu_pid=""
    tr -d '\r' <"console-$phase.log" | grep 'OBD-VHOST' >&2 || true
    say "boot $phase: qemu exited with $rc after $(elapsed "$boot_t")s"
    if ! grep -q "OBD-VHOST: phase $phase done" "console-$phase.log"; then
        tail -n 40 "console-$phase.log" | tr -d '\r' >&2
        die "boot $phase: the guest did not finish (console-$phase.log)"
    fi
}

marker() { grep -q "OBD-VHOST: $1" "console-$2.log"; }

# --- 2. first boot: write ----------------------------------------------------
start_obd obd-1.log
boot write
check "guest sees a 2-queue disk with obd's id" marker 'queues 2 serial obd-' write
check "guest read the random file on both CPUs, sha256 matches" marker 'read ok' write
check "guest wrote and synced /hello.txt" marker 'wrote hello' write
check "guest wrote the raw MiB past the filesystem" marker 'raw ok' write
check "guest deleted trim.bin and ran fstrim" marker 'fstrim ok' write
stop_obd
stats=$(grep 'requests per queue' obd-1.log | tail -n1)
say "obd: $stats"
per_queue=${stats##*requests per queue: }
check "the VM's exit is a plain disconnect" grep -q 'the VMM disconnected' obd-1.log
# shellcheck disable=SC2016 # awk's own $1 and $2
check "requests on both queues ($per_queue)" awk '{ exit !($1 > 0 && $2 > 0) }' <<<"$per_queue"
check "flushes reached obd" grep -Eq 'flushes [1-9]' <<<"$stats"
check "discards reached obd" grep -Eq 'discards [1-9]' <<<"$stats"
check "no request failed" grep -q 'failed 0' <<<"$stats"

# --- 3. the upper: export the raw range, commit -----------------------------
"$OBD" export --config config.v1.json --offset "$RAW_AT" --length $((1 << 20)) -o raw.out >/dev/null
check "the raw MiB holds the guest's pattern" cmp -s raw.out <(head -c $((1 << 20)) root/data/big.bin)
trimmed_zero() {
    local first last n=0
    while read -r first last; do
        rm -f trim.out
        "$OBD" export --config config.v1.json --offset $((first * 4096)) \
            --length $(((last - first + 1) * 4096)) -o trim.out >/dev/null || return 1
        cmp -s trim.out <(head -c $(((last - first + 1) * 4096)) /dev/zero) || return 1
        n=$((n + last - first + 1))
    done <<<"$trim_extents"
    say "trim.bin's $n blocks read as zeros"
    ((n == 256))
}
check "the blocks of the trimmed file read as zeros after reopening" trimmed_zero
"$OBD" commit upper.data upper.index layer1.lsmt >/dev/null
rm upper.data upper.index
"$OBD" create upper.data upper.index 1 >/dev/null
cat >config.v1.json <<EOF
{"lowers": [{"file": "base.zfile"}, {"file": "layer1.lsmt"}],
 "upper": {"index": "upper.index", "data": "upper.data"},
 "resultFile": "result"}
EOF

# --- 4. second boot: check ---------------------------------------------------
start_obd obd-2.log
boot check
stop_obd
check "second boot found /hello.txt with its content" marker 'found hello' check
check "second boot: the random file is intact" marker 'read ok' check
check "second boot: the raw MiB is as left" marker 'raw ok' check
check "second boot: trim.bin stays deleted" marker 'trim.bin gone' check

# --- 5. live snapshot while the guest writes ----------------------------------
start_obd obd-3.log
boot_start live
for ((i = 0; i < TIMEOUT * 2; i++)); do
    marker 'before synced' live && break
    kill -0 "$qemu_pid" 2>/dev/null || break
    sleep 0.5
done
marker 'before synced' live || die "boot live: the guest never wrote /before.txt"
# Let the writer get going, then snapshot with its writes in flight.
sleep 2
snapshot_rc=0
"$OBD" snapshot --vhost-user-blk vm.sock >snapshot.out 2>snapshot.err || snapshot_rc=$?
cat snapshot.out snapshot.err >&2
answer="snapshot taken"
((snapshot_rc == 0)) || answer="snapshot failed"
# (a timeout: if qemu is gone, nothing reads the pipe)
timeout 10 bash -c "echo \"$answer\" >ctl.in" || say "could not tell the guest"
boot_wait live
stop_obd
check "obd snapshot --vhost-user-blk exits 0" test "$snapshot_rc" = 0
check "obd snapshot names the new upper" grep -q 'writes go to .*upper-1.data' snapshot.out
check "guest synced /before.txt and /after.txt" marker 'after synced' live
before=$(tr -d '\r' <console-live.log | sed -n "s/.*with \([0-9]*\) live files written.*/\1/p")
after=$(tr -d '\r' <console-live.log | sed -n 's/.*OBD-VHOST: live files \([0-9]*\).*/\1/p')
say "live files: $before when the snapshot was taken, $after in all"
check "the guest's writer wrote files before and after the snapshot" \
    test "${before:-0}" -gt 0 -a "${after:-0}" -gt "${before:-0}"
check "obd's log shows the snapshot" grep -q 'obd: snapshot: .*upper.data is now a read-only lower' obd-3.log
config_shape() {
    python3 - <<'PY'
import json, os
c = json.load(open("config.v1.json"))
lowers = c["lowers"]
assert len(lowers) == 3, lowers
assert os.path.basename(lowers[2]["data"]) == "upper.data", lowers[2]
assert os.path.basename(lowers[2]["index"]) == "upper.index", lowers[2]
assert os.path.basename(c["upper"]["data"]) == "upper-1.data", c["upper"]
assert os.path.basename(c["upper"]["index"]) == "upper-1.index", c["upper"]
assert c["resultFile"] == "result"
PY
}
check "the config has 3 lowers (the frozen upper last) and upper-1 as upper" config_shape

# --- 6. fourth boot from the rewritten config ---------------------------------
start_obd obd-4.log
boot relive
stop_obd
check "after the snapshot: /before.txt is there" marker 'found before' relive
check "after the snapshot: /after.txt is there" marker 'found after' relive
check "after the snapshot: every file the writer wrote is there (${after:-?})" marker "live files ok ${after:-x}" relive
check "after the snapshot: /hello.txt and the random file are intact" \
    bash -c "grep -q 'OBD-VHOST: found hello' console-relive.log && grep -q 'OBD-VHOST: read ok' console-relive.log"

say "total $(elapsed "$t_start")s"
echo "$passed passed, $failed failed"
((failed == 0))
