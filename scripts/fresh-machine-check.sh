#!/usr/bin/env bash
# Does the README's first command work on a fresh Debian 12 machine that has
# nothing but Rust? This debootstraps a minimal Debian bookworm (--variant
# minbase) into a new directory, gives it the host's CA bundle and DNS, binds
# the host's Rust toolchain into it read-only, clones the commit under test
# into it (a clean clone: nothing untracked, nothing uncommitted), and runs
# `bash scripts/demo.sh` there as root. It fails when the demo fails, e.g.
# when scripts/packages.sh misses a package the build or the demo needs.
# scripts/test.sh runs it.
#
# The chroot has its own, empty CARGO_HOME (only the rustup proxies in
# CARGO_HOME/bin come from the host, read-only), so cargo fetches the
# registry index and every crate afresh, as a new user's first build does.
#
# The pristine debootstrap result is cached as a tarball (OBD_FRESH_CACHE,
# default /var/cache/obd-fresh) and unpacked into a new directory on every
# run; the directory is removed afterwards.
#
# Environment:
#   OBD_FRESH_CACHE        cache dir (default /var/cache/obd-fresh)
#   OBD_FRESH_REFRESH=1    debootstrap again even if a cached base exists
#   OBD_FRESH_MAX_AGE      days before the cached base is made again (default 30)
#   OBD_FRESH_MIRROR       Debian mirror (default: the host's apt source for bookworm)
#   OBD_FRESH_WORKDIR      where the chroot directory is made (default /var/tmp)
#   OBD_FRESH_KEEP=1       keep the chroot directory (unmounted) for a look afterwards
#   OBD_FRESH_WORKTREE=1   also apply the work tree's uncommitted changes to
#                          tracked files (to try a change before committing it)
set -euo pipefail
# The whole script is one { ... } block, read before any of it runs, so that
# editing or checking out this file while a check runs cannot derail it.
{
cd "$(dirname "$0")/.."
repo=$PWD
SUITE=bookworm
VARIANT=minbase
ARCH=$(dpkg --print-architecture)
CACHE=${OBD_FRESH_CACHE:-/var/cache/obd-fresh}
MAX_AGE=${OBD_FRESH_MAX_AGE:-30}

log() { printf 'fresh-machine: %s\n' "$*" >&2; }
die() { printf 'fresh-machine: ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (debootstrap, chroot, mount)"
# shellcheck source=scripts/packages.sh
source scripts/packages.sh
obd_install fresh || die "could not install debootstrap and git"

commit=$(git rev-parse HEAD) || die "$repo is not a git checkout"
if [[ ${OBD_FRESH_WORKTREE:-0} != 1 ]] && ! git diff --quiet HEAD; then
    log "note: the work tree has uncommitted changes; checking the commit ${commit:0:12} without them"
fi

# The mirror the host's apt uses for bookworm (deb822 .sources first, then
# one-line .list files), so the chroot reaches the same, allowed, mirror.
host_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk -v suite="$SUITE" '
            /^[[:space:]]*$/ { if (uri != "" && types ~ /(^|[[:space:]])deb([[:space:]]|$)/ && suites ~ "(^|[[:space:]])" suite "([[:space:]]|$)") { print uri; exit }
                               uri = ""; types = ""; suites = ""; next }
            /^URIs:/ { uri = $2 }
            /^Types:/ { sub(/^Types:[[:space:]]*/, ""); types = $0 }
            /^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); suites = $0 }
            END { if (uri != "" && types ~ /(^|[[:space:]])deb([[:space:]]|$)/ && suites ~ "(^|[[:space:]])" suite "([[:space:]]|$)") print uri }
        ' "$f" | head -n1
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        awk -v suite="$SUITE" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i + 1) == suite) { print $i; exit } }' "$f"
    done
}
mirror=${OBD_FRESH_MIRROR:-$( (host_mirror || true) | head -n1)}
mirror=${mirror:-http://deb.debian.org/debian}

# --- the pristine base, cached ------------------------------------------------
mkdir -p "$CACHE"
base=$CACHE/$SUITE-$VARIANT-$ARCH-$(printf '%s' "$mirror" | sha256sum | cut -c1-8).tar.gz
t_start=$SECONDS
exec 9>"$CACHE/.lock"
flock 9
if [[ ${OBD_FRESH_REFRESH:-0} == 1 ]] || [[ ! -s $base ]] || [[ -n $(find "$base" -mtime +"$MAX_AGE") ]]; then
    log "debootstrap --variant=$VARIANT $SUITE from $mirror (cached as $base)"
    rm -rf "$CACHE"/.boot.*
    boot=$(mktemp -d "$CACHE/.boot.XXXXXX")
    if ! debootstrap --variant="$VARIANT" --arch="$ARCH" "$SUITE" "$boot" "$mirror" >"$boot.log" 2>&1; then
        tail -n 20 "$boot.log" >&2
        rm -rf --one-file-system "$boot"
        die "debootstrap failed (log: $boot.log)"
    fi
    chmod 755 "$boot"
    tar -C "$boot" --numeric-owner -czf "$base.tmp" .
    mv "$base.tmp" "$base"
    rm -rf --one-file-system "$boot" "$boot.log"
    log "base made in $((SECONDS - t_start)) s ($(du -h "$base" | cut -f1))"
    t_base="debootstrap $((SECONDS - t_start)) s, "
else
    t_base=""
    log "using the cached base $base (from $(date -r "$base" +%F); OBD_FRESH_REFRESH=1 makes it again)"
fi
flock -u 9

# --- a fresh copy of it ---------------------------------------------------------
workdir=${OBD_FRESH_WORKDIR:-/var/tmp}
root=$(mktemp -d "$workdir/obd-fresh.XXXXXX")
mounts=()

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
    local i left
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        umount -R "${mounts[i]}" 2>/dev/null || umount -lR "${mounts[i]}" || true
    done
    left=$(awk -v r="$root" 'index($5, r) == 1 { print $5 }' /proc/self/mountinfo)
    if [[ -n $left ]]; then
        log "ERROR: still mounted under $root, not removing it: $left"
        return
    fi
    if [[ ${OBD_FRESH_KEEP:-0} == 1 ]]; then
        log "kept $root (OBD_FRESH_KEEP=1)"
    else
        rm -rf --one-file-system "$root"
    fi
}
trap cleanup EXIT

# bind SRC DST [ro]: bind-mount SRC on DST inside the chroot (read-only with ro).
bind() {
    mkdir -p "$root$2"
    mount --bind "$1" "$root$2"
    mounts+=("$root$2")
    if [[ ${3:-} == ro ]]; then
        mount -o remount,bind,ro "$root$2"
    fi
}

t_unpack=$SECONDS
tar -C "$root" --numeric-owner -xzf "$base"
# / is 0755 as on a real machine (mktemp makes 0700 dirs, and a base cached
# by an earlier version has a 0700 root entry): otherwise no user but root,
# e.g. apt's _apt, can enter it
chmod 755 "$root"
t_unpacked=$SECONDS

# What a real machine has and a chroot does not: DNS, and the CA bundle the
# network here needs (its TLS goes through a proxy with its own CA); the
# local CAs too, so that a package whose postinst runs update-ca-certificates
# keeps them.
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root/etc/ssl/certs" "$root/usr/local/share/ca-certificates"
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
if compgen -G '/usr/local/share/ca-certificates/*' >/dev/null; then
    cp -rL /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi

mount -t proc proc "$root/proc"
mounts+=("$root/proc")
mount -t sysfs sysfs "$root/sys"
mounts+=("$root/sys")
mkdir -p "$root/dev"
mount --rbind /dev "$root/dev"
mounts+=("$root/dev")
mount --make-rslave "$root/dev"

# Rust: the host's toolchains and the rustup proxies, read-only.
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
[[ -d $rustup_home/toolchains && -x $cargo_home/bin/cargo ]] \
    || die "no Rust toolchain at $rustup_home and $cargo_home/bin (rustup)"
bind "$rustup_home" /root/.rustup ro
bind "$cargo_home/bin" /root/.cargo/bin ro

# The commit under test, cloned clean.
src=/root/obd
git clone -q "$repo" "$root$src"
if [[ $(git -C "$root$src" rev-parse HEAD) != "$commit" ]]; then
    git -C "$root$src" checkout -q --detach "$commit" || die "the clone has no commit $commit"
fi
if [[ ${OBD_FRESH_WORKTREE:-0} == 1 ]] && ! git diff --quiet HEAD; then
    log "applying the work tree's uncommitted changes (OBD_FRESH_WORKTREE=1)"
    git diff --binary HEAD | git -C "$root$src" apply --index
fi
[[ -z $(git -C "$root$src" status --porcelain --untracked-files=all) || ${OBD_FRESH_WORKTREE:-0} == 1 ]] \
    || die "the clone in the chroot is not clean"

log "running bash scripts/demo.sh in $root on ${commit:0:12} (Debian $(cat "$root/etc/debian_version"), $VARIANT)"
out=$root/demo.log
t_demo=$SECONDS
set +e
chroot "$root" /usr/bin/env -i \
    HOME=/root USER=root LOGNAME=root LANG=C.UTF-8 TERM=dumb \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUSTUP_HOME=/root/.rustup CARGO_HOME=/root/.cargo \
    bash -c "cd $src && bash scripts/demo.sh" </dev/null 2>&1 | tee "$out" | sed -u 's/^/  | /'
rc=${PIPESTATUS[0]}
set -e
t_end=$SECONDS
timing="${t_base}unpack $((t_unpacked - t_unpack)) s, demo $((t_end - t_demo)) s, total $((t_end - t_start)) s"
((rc == 0)) || die "bash scripts/demo.sh failed (status $rc) on a fresh Debian $SUITE ($timing)"
# The serve step either served the image or said, in one line, why not.
if [[ -c /dev/ublk-control ]]; then
    grep -q '^obd add served it as /dev/ublkb[0-9]' "$out" \
        || die "the host has ublk, but the demo did not serve the image as /dev/ublkbN"
else
    skipped=$(grep -c '^skipped serving' "$out" || true)
    ((skipped == 1)) || die "without ublk the demo should print one 'skipped serving' line, it printed $skipped"
fi
log "PASS: bash scripts/demo.sh works on a fresh Debian $SUITE with only Rust ($timing)"
exit 0
}
