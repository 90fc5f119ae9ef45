#!/usr/bin/env bash
# Prepare everything the obd test VM needs: host packages, a Debian 12 kernel
# (linux-image-6.12.*+deb12-amd64-unsigned, picked with apt-cache) and an
# initramfs built from busybox-static + the kernel modules the tests need.
#
# Idempotent: a second run only checks stamps and prints the result.
# Output on stdout: KEY=VALUE lines (KVER, KPKG, VMLINUZ, INITRD, CACHE) that
# run.sh reads. Progress goes to stderr.
#
# Environment:
#   OBD_VM_CACHE          cache dir (default /var/cache/obd-vm)
#   OBD_VM_REFRESH=1      ask apt again for the newest 6.12 kernel
#   OBD_VM_KERNEL_PKG     use exactly this kernel package name
#   OBD_VM_EXTRA_MODULES  more module names to put in the initramfs and load
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${OBD_VM_CACHE:-/var/cache/obd-vm}
KPKG_PATTERN='^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$'

# Modules to load in the guest, in this order (their dependencies are pulled
# in and ordered automatically from modules.dep). Names that are built into
# the kernel are skipped; names that are neither built in nor modules abort.
# crc32c_generic comes first: ext4 needs a crc32c driver and does not pull
# one in by itself ("Cannot load crc32c driver").
WANTED_MODULES=(
    crc32c_generic
    virtio virtio_ring virtio_pci
    netfs 9pnet 9pnet_virtio 9p
    configfs
    uio target_core_mod target_core_user
    scsi_common scsi_mod sd_mod sg tcm_loop
    ublk_drv
    loop nbd virtio_blk
    crc16 mbcache jbd2 ext4
)
read -r -a EXTRA_MODULES <<<"${OBD_VM_EXTRA_MODULES:-}"
WANTED_MODULES+=("${EXTRA_MODULES[@]}")

# The host packages: the `vm` group of the one package list.
# shellcheck source=SCRIPTDIR/../../scripts/packages.sh
source "$HERE/../../scripts/packages.sh"
HOST_PACKAGES=("${OBD_PKGS_VM[@]}")

log() { printf 'obd-vm setup: %s\n' "$*" >&2; }
die() { printf 'obd-vm setup: ERROR: %s\n' "$*" >&2; exit 1; }

need_root() {
    [[ $(id -u) == 0 ]] || die "$1 needs root (run as root or pre-install/prepare $CACHE)"
}

# --- host packages ---------------------------------------------------------
pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

ensure_packages() {
    local missing=() p
    for p in "${HOST_PACKAGES[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    need_root "installing ${missing[*]}"
    log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
        log "install failed, running apt-get update and retrying"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
            || die "apt-get install ${missing[*]} failed"
    fi
}

# --- kernel package ---------------------------------------------------------
kernel_candidates() {
    # newest first
    apt-cache search --names-only "$KPKG_PATTERN" | awk '{print $1}' | sort -rV
}

choose_kernel_pkg() {
    if [[ -n ${OBD_VM_KERNEL_PKG:-} ]]; then
        echo "$OBD_VM_KERNEL_PKG"
        return
    fi
    if [[ ${OBD_VM_REFRESH:-0} != 1 && -s $CACHE/kernel-pkg ]]; then
        local cached
        cached=$(<"$CACHE/kernel-pkg")
        if [[ -f $CACHE/kernels/$cached/.extracted ]]; then
            echo "$cached"
            return
        fi
    fi
    local cands
    cands=$(kernel_candidates)
    if [[ -z $cands ]]; then
        log "no linux-image-6.12.*+deb12 package known to apt-cache; running apt-get update"
        need_root "apt-get update"
        apt-get update -q >&2
        cands=$(kernel_candidates)
    fi
    [[ -n $cands ]] || die "apt-cache finds no package matching $KPKG_PATTERN"
    head -n1 <<<"$cands"
}

fetch_and_extract_kernel() {
    local pkg=$1 tree=$CACHE/kernels/$1
    [[ -f $tree/.extracted ]] && return 0
    need_root "downloading $pkg"
    mkdir -p "$CACHE/debs"
    local deb
    deb=$(find "$CACHE/debs" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -n1)
    if [[ -z $deb ]]; then
        log "downloading $pkg (about 105 MB)"
        local tmp
        tmp=$(mktemp -d "$CACHE/debs/.dl.XXXXXX")
        (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) \
            || { rm -rf "$tmp"; die "apt-get download $pkg failed"; }
        deb=$(find "$tmp" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
        [[ -n $deb ]] || die "apt-get download produced no .deb for $pkg"
        mv "$deb" "$CACHE/debs/"
        rm -rf "$tmp"
        deb=$CACHE/debs/$(basename "$deb")
    fi
    log "extracting $(basename "$deb")"
    rm -rf "$tree"
    mkdir -p "$tree"
    dpkg-deb -x "$deb" "$tree" || die "dpkg-deb -x $deb failed"
    local moddir kver
    moddir=$(find "$tree" -mindepth 4 -maxdepth 5 -type f -name modules.order -printf '%h\n' | head -n1)
    [[ -n $moddir ]] || die "no lib/modules/*/modules.order in $deb"
    kver=$(basename "$moddir")
    log "running depmod for $kver"
    depmod -b "$(dirname "$(dirname "$(dirname "$moddir")")")" "$kver" 2>&1 | grep -v '^$' >&2 || true
    [[ -s $moddir/modules.dep ]] || die "depmod produced no modules.dep"
    printf '%s\n' "$moddir" >"$tree/.moddir"
    touch "$tree/.extracted"
}

# --- module closure -----------------------------------------------------------
declare -A DEP=() BY_NAME=() BUILTIN=() SEEN=()
ORDER=()

# module file path -> module name, in $MODNAME (no subshell: called per line)
modname() {
    MODNAME=${1##*/}
    MODNAME=${MODNAME%%.ko*}
    MODNAME=${MODNAME//-/_}
}

visit() {
    local path=$1 d
    [[ -n ${SEEN[$path]:-} ]] && return 0
    SEEN[$path]=1
    for d in ${DEP[$path]}; do
        visit "$d"
    done
    ORDER+=("$path")
}

resolve_modules() {
    local moddir=$1 mod deps line n
    while IFS= read -r line; do
        mod=${line%%:*}
        deps=${line#*:}
        DEP[$mod]=$deps
        modname "$mod"
        BY_NAME[$MODNAME]=$mod
    done <"$moddir/modules.dep"
    while IFS= read -r line; do
        modname "$line"
        BUILTIN[$MODNAME]=1
    done <"$moddir/modules.builtin"
    local missing=()
    for n in "${WANTED_MODULES[@]}"; do
        n=${n//-/_}
        if [[ -n ${BY_NAME[$n]:-} ]]; then
            visit "${BY_NAME[$n]}"
        elif [[ -n ${BUILTIN[$n]:-} ]]; then
            log "module $n is built into the kernel"
        else
            missing+=("$n")
        fi
    done
    ((${#missing[@]} == 0)) || die "kernel has neither a module nor a built-in for: ${missing[*]}"
}

# --- initramfs ---------------------------------------------------------------
build_initramfs() {
    local moddir=$1 kver=$2 out=$3
    local stage
    stage=$(mktemp -d "$CACHE/.initrd.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$stage'" RETURN
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc/obd-vm,etc/target,proc,sys,dev,host,results,tmp,run}
    cp /bin/busybox "$stage/bin/busybox"
    local applet
    while IFS= read -r applet; do
        [[ $applet == bin/busybox || -e $stage/$applet ]] && continue
        ln -s /bin/busybox "$stage/$applet"
    done < <("$stage/bin/busybox" --list-full)
    # the kernel runs /sbin/modprobe for request_module(); make sure it exists
    [[ -e $stage/sbin/modprobe ]] || ln -sf /bin/busybox "$stage/sbin/modprobe"

    local dst=$stage/lib/modules/$kver p
    mkdir -p "$dst"
    : >"$stage/etc/obd-vm/modules"
    for p in "${ORDER[@]}"; do
        mkdir -p "$dst/$(dirname "$p")"
        case $p in
            *.ko.xz) xz -dc "$moddir/$p" >"$dst/${p%.xz}" ;;
            *.ko.zst) zstd -qdc "$moddir/$p" >"$dst/${p%.zst}" ;;
            *.ko.gz) gzip -dc "$moddir/$p" >"$dst/${p%.gz}" ;;
            *.ko) cp "$moddir/$p" "$dst/$p" ;;
            *) die "unexpected module file $p" ;;
        esac
        printf '%s\n' "${p%.ko*}.ko" >>"$stage/etc/obd-vm/modules"
    done
    cp "$moddir"/modules.{order,builtin} "$dst/"
    [[ -f $moddir/modules.builtin.modinfo ]] && cp "$moddir/modules.builtin.modinfo" "$dst/"
    depmod -b "$stage" "$kver" >&2 || die "depmod on the initramfs tree failed"
    printf '%s\n' "$kver" >"$stage/etc/obd-vm/kver"
    install -m 0755 "$HERE/guest-init.sh" "$stage/init"
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1) >"$out.tmp"
    mv "$out.tmp" "$out"
}

main() {
    mkdir -p "$CACHE" 2>/dev/null || need_root "creating $CACHE"
    exec 9>"$CACHE/.lock"
    flock 9
    rm -rf "$CACHE"/.initrd.* "$CACHE"/debs/.dl.*

    ensure_packages

    local pkg tree moddir kver vmlinuz
    pkg=$(choose_kernel_pkg)
    fetch_and_extract_kernel "$pkg"
    tree=$CACHE/kernels/$pkg
    moddir=$(<"$tree/.moddir")
    kver=$(basename "$moddir")
    vmlinuz=$(find "$tree/boot" -maxdepth 1 -name "vmlinuz-$kver" | head -n1)
    [[ -n $vmlinuz ]] || die "no boot/vmlinuz-$kver in $pkg"
    if [[ ! -s $CACHE/kernel-pkg || $(<"$CACHE/kernel-pkg") != "$pkg" ]]; then
        printf '%s\n' "$pkg" >"$CACHE/kernel-pkg"
        # drop other kernels so the cache does not grow without bound
        find "$CACHE/kernels" -mindepth 1 -maxdepth 1 ! -name "$pkg" -exec rm -rf {} +
        find "$CACHE/debs" -maxdepth 1 -name '*.deb' ! -name "${pkg}_*" -delete
    fi

    # The initramfs is keyed on everything that goes into it.
    local key initrd
    key=$( {
        printf '%s\n' "$pkg" "$kver" "${WANTED_MODULES[@]}"
        dpkg-query -W -f='${Version}\n' busybox-static
        cat "$HERE/guest-init.sh" "${BASH_SOURCE[0]}"
    } | sha256sum | cut -c1-16)
    initrd=$CACHE/initrd-$key.cpio.gz
    if [[ ! -s $initrd ]]; then
        resolve_modules "$moddir"
        log "building initramfs with ${#ORDER[@]} modules"
        # other module sets' images: keep recently used ones (a concurrent
        # run may be about to boot one)
        find "$CACHE" -maxdepth 1 -name 'initrd-*.cpio.gz' -mmin +120 -delete
        build_initramfs "$moddir" "$kver" "$initrd"
        log "initramfs: $initrd ($(du -h "$initrd" | cut -f1))"
    else
        touch "$initrd"
    fi

    printf 'CACHE=%s\nKPKG=%s\nKVER=%s\nVMLINUZ=%s\nINITRD=%s\n' \
        "$CACHE" "$pkg" "$kver" "$vmlinuz" "$initrd"
}

main "$@"
