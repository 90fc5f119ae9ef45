# shellcheck shell=bash
# The Debian 12 packages obd needs, in one place (sourced, not run) by
# scripts/demo.sh, scripts/test.sh and tests/vm/setup.sh, so the demo, the
# tests and the VM harness cannot drift apart. Rust itself (rustup, Rust 1.95)
# is not a Debian package and is not installed here.
#
#   obd_packages GROUP...        print the packages of the groups, one a line
#   obd_install GROUP...         apt-get install those not installed yet
#                                (root; apt-get update first when needed)
#
# Groups:
#   build  `cargo build` of the whole workspace
#   demo   scripts/demo.sh, beyond build
#   test   scripts/test.sh (nextest, registry and eBPF tests), beyond build+demo
#   vm     tests/vm (qemu, the initramfs, the guest's tools)
#   fresh  scripts/fresh-machine-check.sh (a debootstrapped Debian 12)
#   containerd  tests/vm/containerd (scripts/containerd-setup.sh)

# gcc, libc6-dev: the linker rustc calls (cc) and the C parts of zstd-sys,
# lz4-sys and ring. libclang1-16: the libclang that bindgen in
# libublk-rs-sys loads for the ublk UAPI bindings (libclang-dev would add
# all of LLVM 14 next to clang-16's LLVM 16, for nothing). clang-16,
# libbpf-dev: ebpf/build.rs compiles the BPF probes. libext2fs-dev: the
# headers ext4-apply/build.rs hands to bindgen and the libext2fs/libcom_err
# that `obd apply` links to write ext4 in user space (no Rust crate writes ext4).
OBD_PKGS_BUILD=(gcc libc6-dev libclang1-16 clang-16 libbpf-dev libext2fs-dev)
# e2fsprogs: mkfs.ext4 -d and debugfs, which read the image's files.
OBD_PKGS_DEMO=(e2fsprogs)
# python3: the tests and tests/vm run /usr/bin/python3. xz-utils: compressed
# fixtures. docker-registry, apache2-utils (htpasswd), openssl, python3-jwt,
# python3-cryptography (a token issuer): the registry-blob tests. mount
# (losetup, mount) and util-linux (setpriv): the eBPF tests.
# fonts-dejavu-core labels `obd trace plot` images. strace: scripts/bench-fetch.sh
# (its short form runs in scripts/test.sh) finds the files python's import
# chain and gcc's compile open, to copy them into its image.
OBD_PKGS_TEST=(python3 xz-utils docker-registry apache2-utils openssl python3-jwt python3-cryptography
    mount util-linux fonts-dejavu-core strace)
OBD_PKGS_VM=(qemu-system-x86 busybox-static cpio kmod xz-utils e2fsprogs fio util-linux)
# debootstrap makes the fresh Debian; git clones the commit under test into it.
OBD_PKGS_FRESH=(debootstrap git)
# containerd (1.6, with its shim and the 1.6 ctr) and runc: the
# snapshotter's flow in tests/vm/containerd; busybox-static is the one
# binary the fixture image's container runs (bind-mounted in).
OBD_PKGS_CONTAINERD=(containerd runc busybox-static)

obd_packages() {
    local group
    for group in "$@"; do
        case $group in
            build) printf '%s\n' "${OBD_PKGS_BUILD[@]}" ;;
            demo) printf '%s\n' "${OBD_PKGS_DEMO[@]}" ;;
            test) printf '%s\n' "${OBD_PKGS_TEST[@]}" ;;
            vm) printf '%s\n' "${OBD_PKGS_VM[@]}" ;;
            fresh) printf '%s\n' "${OBD_PKGS_FRESH[@]}" ;;
            containerd) printf '%s\n' "${OBD_PKGS_CONTAINERD[@]}" ;;
            *)
                echo "packages.sh: unknown package group '$group'" >&2
                return 2
                ;;
        esac
    done
}

obd_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

# obd_install GROUP...: installs with --no-install-recommends, so that what
# works here works with exactly these lists (the fresh-machine check relies
# on that).
obd_install() {
    local list missing=() pkg
    list=$(obd_packages "$@" | sort -u) || return 2
    for pkg in $list; do
        obd_installed "$pkg" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) != 0 ]]; then
        echo "missing Debian packages: ${missing[*]}; run as root, or: apt-get install ${missing[*]}" >&2
        return 1
    fi
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || { echo "apt-get install ${missing[*]} failed" >&2; return 1; }
}
