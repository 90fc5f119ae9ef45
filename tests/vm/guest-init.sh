#!/bin/sh
# /init of the obd test VM initramfs (busybox sh, PID 1). setup.sh copies
# this file into the initramfs; run.sh boots it. It:
#   1. mounts proc/sys/devtmpfs, loads the modules listed in
#      /etc/obd-vm/modules (already in dependency order), mounts configfs,
#      debugfs, tracefs and the bpf fs;
#   2. mounts the host's root read-only over 9p (tag "host") at /host and the
#      per-run results dir read-write over 9p (tag "results") at /results;
#   3. puts proc/sys/dev, a tmpfs /tmp and /run, the results dir
#      (/run/obd-vm/results) and the host's /tmp (/run/obd-vm/host-tmp,
#      read-only) into /host and runs /results/.vm/cmd.sh there under chroot;
#   4. writes the exit status to /results/.vm/rc and powers off.
# Any failure before the command runs prints "OBD-VM: FATAL: ..." and powers
# off without writing rc, so the host never mistakes it for success.

PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH

say() { echo "OBD-VM: $*"; }
up() { read -r u _ </proc/uptime && echo "$u"; }

halt_now() {
    sync
    poweroff -f
    # not reached unless poweroff failed; exiting PID 1 panics, and with
    # panic=-1 and qemu -no-reboot that ends the VM too
    sleep 2
    exit 1
}

die() {
    say "FATAL: $*"
    if [ -d /results/.vm ]; then
        echo "$*" >>/results/.vm/init-error
    fi
    halt_now
}

mnt() { # mnt FSTYPE SRC DIR [OPTIONS]
    mkdir -p "$3" 2>/dev/null
    if [ -n "${4:-}" ]; then
        mount -t "$1" -o "$4" "$2" "$3" || die "mount -t $1 $2 $3 failed"
    else
        mount -t "$1" "$2" "$3" || die "mount -t $1 $2 $3 failed"
    fi
}

mnt proc proc /proc
mnt sysfs sysfs /sys
mnt devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1
say "init started at uptime $(up)s, kernel $(uname -r)"

debug=0
case " $(cat /proc/cmdline) " in *" obd.debug "*) debug=1 ;; esac

KVER=$(cat /etc/obd-vm/kver)
[ "$KVER" = "$(uname -r)" ] || die "initramfs modules are for $KVER but the kernel is $(uname -r)"

# --- modules -------------------------------------------------------------
while read -r m; do
    [ -n "$m" ] || continue
    name=${m##*/}
    name=${name%.ko}
    # shellcheck disable=SC3060 # busybox ash has it
    name=${name//-/_}
    [ -d "/sys/module/$name" ] && continue
    insmod "/lib/modules/$KVER/$m" || die "cannot load module $m"
    [ "$debug" = 0 ] || say "loaded $name at uptime $(up)s"
done </etc/obd-vm/modules
say "modules loaded at uptime $(up)s"

mnt configfs configfs /sys/kernel/config
mnt debugfs debugfs /sys/kernel/debug
mnt tracefs tracefs /sys/kernel/tracing
mnt bpf bpf /sys/fs/bpf
mnt devpts devpts /dev/pts gid=5,mode=620,ptmxmode=666
mnt tmpfs tmpfs /dev/shm mode=1777
ln -sf /proc/self/fd /dev/fd 2>/dev/null
hostname obd-vm
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up || die "cannot bring up lo"

# --- 9p mounts ---------------------------------------------------------------
# virtio devices may still be probing right after the modules are in
mount9p() { # mount9p TAG DIR OPTS
    mkdir -p "$2"
    i=0
    until mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,$3" "$1" "$2" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -lt 50 ] || die "cannot mount 9p export '$1' on $2"
        sleep 0.1
    done
}
mount9p results /results rw
[ -f /results/.vm/cmd.sh ] || die "no /results/.vm/cmd.sh: nothing to run"
mount9p host /host "ro,$(cat /results/.vm/host-9p-opts 2>/dev/null || echo cache=none)"

R=/host
for d in proc sys dev tmp run; do
    [ -d "$R/$d" ] || die "host root has no /$d to mount over"
done
mnt proc proc $R/proc
mount -o rbind /sys $R/sys || die "bind /sys failed"
mount -o rbind /dev $R/dev || die "bind /dev failed"
mnt tmpfs tmpfs $R/run mode=0755
mkdir -p $R/run/obd-vm/results $R/run/obd-vm/host-tmp $R/run/lock
mount -o bind /results $R/run/obd-vm/results || die "bind results failed"
# keep the host's /tmp reachable (read-only) before hiding it under tmpfs
mount -o bind $R/tmp $R/run/obd-vm/host-tmp || die "bind host /tmp failed"
mnt tmpfs tmpfs $R/tmp mode=1777
if [ -d $R/var/tmp ]; then
    mount -o bind $R/tmp $R/var/tmp || die "bind /var/tmp failed"
fi

# --- the command -------------------------------------------------------------
start=$(up)
echo "start $start" >/results/.vm/timing
say "running command at uptime ${start}s"
chroot $R /usr/bin/env -i /bin/bash /run/obd-vm/results/.vm/cmd.sh
rc=$?
end=$(up)
echo "end $end" >>/results/.vm/timing
echo "$rc" >/results/.vm/rc.tmp && mv /results/.vm/rc.tmp /results/.vm/rc
say "command exited with status $rc at uptime ${end}s"
halt_now
