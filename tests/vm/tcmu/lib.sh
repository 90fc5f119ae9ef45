# shellcheck shell=bash
# The containerd overlaybd snapshotter's configfs steps for one TCMU
# device (user_1/NAME with dev_config=overlaybd/CONFIG, enable, then a
# tcm_loop nexus and LUN give /dev/sdX), and their teardown. Sourced by the
# TCMU VM test and by scripts/bench-ublk.sh; bash, in the VM;
# safe under set -euo pipefail.
C=/sys/kernel/config/target

declare -gA DEV  # device name → /dev/sdX
declare -gA WWN  # device name → tcm_loop target wwn
n_dev=0
# sd_disks: the sdX names now in /sys/block, sorted (none is not an error).
sd_disks() {
    ls /sys/block | { grep '^sd' || true; } | sort
}
# make_dev NAME CONFIG SIZE: the snapshotter's configfs steps; sets DEV[NAME].
make_dev() {
    local name=$1 cfg=$2 size=$3
    n_dev=$((n_dev + 1))
    local wwn
    wwn=$(printf 'naa.6001405%09x' $n_dev)
    local d=$C/core/user_1/$name tpg=$C/loopback/$wwn/tpgt_1
    local before
    before=$(sd_disks)
    mkdir -p $d || return 1
    echo -n "dev_config=overlaybd/$cfg" >$d/control || return 1
    echo -n "dev_size=$size" >$d/control || return 1
    echo 1 >$d/enable || return 1
    mkdir -p $tpg/lun/lun_0 || return 1
    echo "$(printf 'naa.6001405%09x' $((n_dev + 1000)))" >$tpg/nexus || return 1
    ln -s $d $tpg/lun/lun_0/ || return 1
    WWN[$name]=$wwn
    local i new
    for i in $(seq 1 150); do
        new=$(comm -13 <(echo "$before") <(sd_disks) | head -1)
        if [ -n "$new" ] && [ -b /dev/$new ]; then
            DEV[$name]=/dev/$new
            # sd sets the size once it has read the capacity.
            for i in $(seq 1 50); do
                [ "$(cat /sys/block/$new/size 2>/dev/null)" != 0 ] && break
                sleep 0.2
            done
            return 0
        fi
        sleep 0.2
    done
    echo "no /dev/sdX appeared for $name" >&2
    return 1
}

# remove_dev NAME: configfs teardown in reverse order.
remove_dev() {
    local name=$1 wwn=${WWN[$1]:-}
    if [ -n "$wwn" ]; then
        local tpg=$C/loopback/$wwn/tpgt_1
        rm -f $tpg/lun/lun_0/$name
        rmdir $tpg/lun/lun_0 2>/dev/null
        echo NULL >$tpg/nexus 2>/dev/null
        rmdir $tpg $C/loopback/$wwn 2>/dev/null
    fi
    rmdir $C/core/user_1/$name 2>/dev/null
    unset "DEV[$name]" "WWN[$name]"
}

