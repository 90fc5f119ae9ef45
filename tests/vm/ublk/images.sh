#!/usr/bin/env bash
# Tests 2 and 3: real ext4 images served as ublk devices and mounted.
#  - the reference convertor's image (two tar-wrapped ZFile blobs), mounted
#    -o ro,noload, matches dev-tree.json;
#  - an ext4 image made here (`mkfs.ext4 -d` over many small files and a
#    few large ones, `obd import`ed, then zfile-compressed as a second
#    variant) mounted read-only: every file matches the source tree.
#   tests/vm/run.sh -- bash tests/vm/ublk/images.sh
SUITE=ublk-images
source "$(dirname "$0")/lib.sh"

MNT=$WORK/mnt
mkdir -p "$MNT"

real_dev_image() {
    need_ublk || return 1
    local d=$FIXTURES/real-dev-image cfg=$WORK/realdev.json dev
    write_config "$cfg" "" "" "$d/dev-layer0.blob" "$d/dev-layer1.blob"
    dev=$(add_device "$cfg" --queues 2) || return 1
    expect_result "$cfg" success || return 1
    mount -o ro,noload "$dev" "$MNT" || { fail "mount $dev"; return 1; }
    "$PY" "$d/checktree.py" "$d/dev-tree.json" "$MNT" | sed 's/^/  /'
    local rc=${PIPESTATUS[0]}
    umount "$MNT" || return 1
    "$OBD" del -n "${dev#/dev/ublkb}" || return 1
    no_devices || return 1
    return "$rc"
}

# make_tree DIR: many small files, a few large ones, a symlink (random_tree),
# a file of 5 MiB of zeros and 4 bytes, an empty dir.
make_tree() {
    random_tree "$1" seed=42 files_per_dir=40 sub_every=3 \
        sizes=0,1,100,511,512,4095,4096,4097,20000 large_mib=3,9,17 || return 1
    { head -c $((5 << 20)) /dev/zero && printf tail; } >"$1/big/sparse-ish.bin" || return 1
    mkdir "$1/empty"
}

ext4_import() {
    need_ublk || return 1
    local src=$WORK/tree raw=$WORK/ext4.raw layer=$WORK/ext4.lsmt zlayer=$WORK/ext4.zfile
    make_tree "$src" || return 1
    mkfs.ext4 -q -F -d "$src" "$raw" 96M || { fail "mkfs.ext4"; return 1; }
    "$OBD" import "$raw" "$layer" || return 1
    "$OBD" import -z "$raw" "$zlayer" || return 1
    rm -f "$raw"
    for l in "$layer" "$zlayer"; do
        local cfg=$WORK/ext4-$(basename "$l").json dev
        write_config "$cfg" "" "" "$l"
        dev=$(add_device "$cfg" --queues 2 --depth 32) || return 1
        mount -o ro,noload "$dev" "$MNT" || { fail "mount $dev"; return 1; }
        same_tree "$src" "$MNT"
        local rc=$?
        umount "$MNT" || return 1
        "$OBD" del -n "${dev#/dev/ublkb}" || return 1
        ((rc == 0)) || return 1
    done
    no_devices
}

check "reference convertor image (2 tar+zfile blobs) mounts and matches dev-tree.json" real_dev_image
check "mkfs.ext4 -d image, imported (plain and zfile), mounts and matches its source" ext4_import
finish
