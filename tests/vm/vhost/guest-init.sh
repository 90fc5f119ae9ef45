#!/bin/sh
# /sbin/init of the vhost boot test's root filesystem (busybox). The phase
# comes from the kernel command line: obd.phase=write (first boot) or
# obd.phase=check (second boot); obd.raw=BYTES is where the raw MiB past
# the filesystem starts. Results go to the console as `OBD-VHOST: ...`
# lines, which tests/vm/vhost/boot.sh looks for.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -o remount,rw /

say() { echo "OBD-VHOST: $*"; }
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p"; }
phase=$(arg obd.phase)
raw=$(arg obd.raw)
mib=$((raw >> 20))
HELLO="written by the first boot through vhost-user-blk"

say "queues $(find /sys/block/vda/mq -mindepth 1 -maxdepth 1 | wc -l) serial $(cat /sys/block/vda/serial)"

# Read the random file from both CPUs at once (each CPU submits on its own
# queue), one half each, and check the whole against its sha256.
read_check() {
    cd /data || return 1
    taskset 1 dd if=big.bin of=/tmp/a bs=64k count=64 2>/dev/null &
    taskset 2 dd if=big.bin of=/tmp/b bs=64k skip=64 2>/dev/null &
    wait
    [ "$(cat /tmp/a /tmp/b | sha256sum | cut -d' ' -f1)" = "$(cut -d' ' -f1 big.sha256)" ] || return 1
    sha256sum -c big.sha256 >/dev/null || return 1
    rm -f /tmp/a /tmp/b
    cd /
}

# The raw range holds the first MiB of big.bin.
raw_check() {
    [ "$(dd if=/dev/vda bs=1M skip=$mib count=1 2>/dev/null | sha256sum)" = \
        "$(dd if=/data/big.bin bs=1M count=1 2>/dev/null | sha256sum)" ]
}

# The live phase's files: /live/N holds `seq N $((N + 999))`.
live_file_ok() { [ "$(cat "/live/$1")" = "$(seq "$1" $(($1 + 999)))" ]; }

case $phase in
live)
    stty -F /dev/ttyS1 raw -echo 2>/dev/null
    echo "$HELLO before the snapshot" >/before.txt && sync && say "before synced"
    # A writer that writes and syncs one file after another until told to
    # stop, so writes are in flight while the host takes the snapshot.
    mkdir -p /live
    (
        n=0
        while [ ! -e /tmp/stop ]; do
            n=$((n + 1))
            seq $n $((n + 999)) >/live/$n
            sync
            echo $n >/tmp/count
        done
    ) &
    writer=$!
    read -r answer </dev/ttyS1
    say "host says '$answer' with $(cat /tmp/count 2>/dev/null) live files written"
    echo "$HELLO after the snapshot" >/after.txt && sync && say "after synced"
    sleep 1
    touch /tmp/stop
    wait $writer
    cp /tmp/count /live.count && sync && say "live files $(cat /live.count)"
    ;;
relive)
    [ "$(cat /before.txt)" = "$HELLO before the snapshot" ] && say "found before"
    [ "$(cat /after.txt)" = "$HELLO after the snapshot" ] && say "found after"
    count=$(cat /live.count)
    i=1
    while [ "$i" -le "$count" ] && live_file_ok "$i"; do i=$((i + 1)); done
    [ "$count" -gt 0 ] && [ "$i" -gt "$count" ] && say "live files ok $count"
    [ "$(cat /hello.txt)" = "$HELLO" ] && say "found hello"
    read_check && say "read ok"
    ;;
write)
    read_check && say "read ok"
    echo "$HELLO" >/hello.txt && sync && say "wrote hello"
    dd if=/data/big.bin of=/dev/vda bs=1M seek=$mib count=1 conv=fsync 2>/dev/null \
        && echo 3 >/proc/sys/vm/drop_caches && raw_check && say "raw ok"
    # Free trim.bin's blocks and trim them: DISCARD requests that the host
    # checks by reading those blocks back as zeros.
    rm /data/trim.bin && sync && fstrim -v / && say "fstrim ok"
    sync
    ;;
check)
    [ "$(cat /hello.txt)" = "$HELLO" ] && say "found hello"
    [ ! -e /data/trim.bin ] && say "trim.bin gone"
    read_check && say "read ok"
    raw_check && say "raw ok"
    ;;
*)
    say "unknown phase '$phase'"
    ;;
esac
say "phase $phase done"
sync
poweroff -f
