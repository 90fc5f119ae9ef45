#!/usr/bin/env bash
# Self-test of the obd test VM. Runs INSIDE the guest:
#   tests/vm/run.sh -- tests/vm/selftest.sh
# Checks the kernel facilities later tests rely on and prints a timing per
# check, then "N passed, N failed".
set -euo pipefail

if [[ ${OBD_VM:-} != 1 ]]; then
    echo "selftest.sh runs inside the VM: tests/vm/run.sh -- tests/vm/selftest.sh" >&2
    exit 2
fi

passed=0
failed=0
now() { date +%s.%N; }

check() { # check NAME FUNCTION
    local name=$1 t0 t1 out
    t0=$(now)
    if out=$("$2" 2>&1); then
        t1=$(now)
        passed=$((passed + 1))
        printf 'selftest: PASS %-28s %6.2fs\n' "$name" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
    else
        t1=$(now)
        failed=$((failed + 1))
        printf 'selftest: FAIL %-28s %6.2fs\n' "$name" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
        printf '%s\n' "$out" | sed 's/^/    /'
    fi
}

module_loaded() { [[ -d /sys/module/$1 ]] || { echo "module $1 not loaded"; return 1; }; }

t_ublk() {
    module_loaded ublk_drv || return 1
    [[ -c /dev/ublk-control ]] || { echo "/dev/ublk-control missing"; return 1; }
}

t_tcmu() {
    module_loaded target_core_user || return 1
    grep -qs ' /sys/kernel/config configfs ' /proc/mounts || { echo "configfs not mounted"; return 1; }
    [[ -d /sys/kernel/config/target ]] || { echo "/sys/kernel/config/target missing"; return 1; }
    [[ -d /sys/kernel/config/target/core ]] || { echo "/sys/kernel/config/target/core missing"; return 1; }
}

t_tcm_loop() {
    module_loaded tcm_loop || return 1
    module_loaded sd_mod || return 1
}

t_ext4_on_loop() {
    module_loaded crc32c_generic || return 1
    module_loaded loop || return 1
    local img dev mp sum1 sum2 rc=0
    img=$(mktemp /tmp/selftest-ext4.XXXXXX)
    mp=$(mktemp -d /tmp/selftest-mnt.XXXXXX)
    truncate -s 64M "$img"
    dev=$(losetup -f --show "$img")
    {
        mkfs.ext4 -q -F "$dev" &&
            mount -t ext4 "$dev" "$mp" &&
            dd if=/dev/urandom of="$mp/data" bs=1M count=8 status=none &&
            sum1=$(md5sum <"$mp/data") &&
            umount "$mp" &&
            echo 3 >/proc/sys/vm/drop_caches &&
            mount -t ext4 -o ro "$dev" "$mp" &&
            sum2=$(md5sum <"$mp/data") &&
            umount "$mp" &&
            [[ $sum1 == "$sum2" ]] &&
            fsck.ext4 -n -f "$dev" >/dev/null
    } || rc=1
    mountpoint -q "$mp" && umount "$mp"
    losetup -d "$dev"
    rm -rf "$img" "$mp"
    if ((rc)); then
        echo "ext4 on $dev failed (sums '${sum1:-}' '${sum2:-}')"
        dmesg | tail -n 20
    fi
    return "$rc"
}

t_bpffs() {
    [[ $(stat -f -c %T /sys/fs/bpf) == bpf_fs ]] || { echo "no bpf fs on /sys/fs/bpf"; return 1; }
    [[ -d /sys/kernel/tracing/events ]] || { echo "tracefs not mounted"; return 1; }
    [[ -d /sys/kernel/debug/block ]] || { echo "debugfs not mounted"; return 1; }
}

t_results() {
    [[ -d ${OBD_VM_RESULTS:-} ]] || { echo "OBD_VM_RESULTS not set"; return 1; }
    uname -a >"$OBD_VM_RESULTS/selftest-uname.txt" || return 1
    [[ -s $OBD_VM_RESULTS/selftest-uname.txt ]]
}

t_env() {
    [[ -w $TMPDIR && -w $HOME ]] || { echo "TMPDIR/HOME not writable"; return 1; }
    [[ $(stat -f -c %T "$TMPDIR") == tmpfs ]] || { echo "TMPDIR is not on tmpfs"; return 1; }
    if touch /usr/.obd-vm-rw-probe 2>/dev/null; then
        echo "host root is writable"
        return 1
    fi
}

echo "selftest: kernel $(uname -r), $(nproc) CPUs, cwd $PWD"
check "ublk-control" t_ublk
check "configfs target (tcmu)" t_tcmu
check "tcm_loop" t_tcm_loop
check "ext4 on loop over tmpfs" t_ext4_on_loop
check "bpf/trace/debug fs" t_bpffs
check "results export" t_results
check "environment" t_env
echo "selftest: $passed passed, $failed failed"
((failed == 0))
