#!/bin/busybox sh
# shellcheck shell=dash
# /init of the vhost boot test's initramfs (on top of the VM tests' one,
# whose busybox and kernel modules it uses): load virtio_blk and ext4, mount
# /dev/vda and switch to it. Any failure prints OBD-VHOST: FATAL and powers
# off.
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

fatal() {
    echo "OBD-VHOST: FATAL: $*"
    poweroff -f
}

kver=$(cat /etc/obd-vm/kver)
# The modules list is in load order (dependencies first); take what a
# virtio-blk ext4 root needs.
while read -r mod; do
    case ${mod##*/} in
        crc32c_generic.ko | virtio_blk.ko | crc16.ko | mbcache.ko | jbd2.ko | ext4.ko)
            insmod "/lib/modules/$kver/$mod" || fatal "insmod $mod failed"
            ;;
    esac
done </etc/obd-vm/modules

i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && fatal "no /dev/vda after 10 s"
    sleep 0.1
done
mount -t ext4 /dev/vda /newroot || fatal "cannot mount /dev/vda"
umount /proc /sys
mount --move /dev /newroot/dev || umount /dev
exec switch_root /newroot /sbin/init
