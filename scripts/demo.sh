#!/usr/bin/env bash
# The main job on a bundled demo image: the two-layer image the reference
# overlaybd convertor made (tar-wrapped ZFile layers holding ext4) is
# inspected, merged and exported to a raw disk, and its files are listed and
# read without mounting anything; then a new layer is made from a directory
# and stacked on top; last, the image is served as a ublk block device
# (obd add --config), a file is read from the device, and the device is
# removed (obd del). Installs what it needs on a fresh Debian 12 machine
# (the `build` and `demo` groups of scripts/packages.sh).
#
#   bash scripts/demo.sh         everything: packages, cargo build, every step
#   bash scripts/demo.sh serve   only the ublk step, with obd already built
#                                (tests/vm/ublk/demo.sh runs this in a VM)
#
# OBD_BIN picks the binary (default target/release/obd), OBD_DEMO_WORK the
# scratch dir (default target/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
obd=${OBD_BIN:-target/release/obd}
work=${OBD_DEMO_WORK:-target/demo}
blobs=tests/fixtures/real-dev-image

# serve: obd add --config on the two blobs, debugfs reads a file from the
# device, obd del removes it. Without ublk: one line saying what was skipped.
serve() {
    echo "== serve the image as a block device (obd add --config, ublk)"
    if [[ ! -c /dev/ublk-control ]]; then
        echo "skipped serving the image as /dev/ublkbN (obd add/del): this kernel has no ublk" \
            "(/dev/ublk-control is missing; modprobe ublk_drv); to see it in a VM:" \
            "tests/vm/run.sh -- bash scripts/demo.sh serve"
        return 0
    fi
    local dir cfg dev
    if mkdir -p "$work" 2>/dev/null && [[ -w $work ]]; then
        dir=$(cd "$work" && pwd)
    else
        # e.g. in the test VM, which sees the repo read-only
        dir=$(mktemp -d /tmp/obd-demo.XXXXXX)
    fi
    cfg=$dir/config.v1.json
    case $repo$dir in
        *[\"\\]*) echo "demo.sh: the repo or work path holds a quote or backslash; cannot write $cfg" >&2; return 1 ;;
    esac
    # lowers bottom to top; no upper, so the device is read-only
    cat >"$cfg" <<JSON
{
  "lowers": [
    { "file": "$repo/$blobs/dev-layer0.blob" },
    { "file": "$repo/$blobs/dev-layer1.blob" }
  ],
  "resultFile": "$dir/config.v1.json.result"
}
JSON
    rm -f "$cfg.result"
    echo "image config $cfg: two lowers, no upper (read-only)"
    dev=$("$obd" add --config "$cfg")
    # shellcheck disable=SC2064 # the device number is fixed now
    trap "'$obd' del -n '${dev#/dev/ublkb}' || true" EXIT
    echo "obd add served it as $dev (resultFile: $(cat "$cfg.result"))"
    [[ -b $dev ]] || { echo "demo.sh: $dev is not a block device" >&2; return 1; }
    echo "== /etc/os-release read from $dev (debugfs, nothing mounted)"
    debugfs -R "cat /etc/os-release" "$dev" 2>/dev/null
    "$obd" del -n "${dev#/dev/ublkb}"
    trap - EXIT
    if [[ -e $dev ]]; then
        echo "demo.sh: $dev is still there after obd del" >&2
        return 1
    fi
    echo "== obd del -n ${dev#/dev/ublkb}: $dev is gone"
}

case ${1:-all} in
    serve)
        serve
        exit
        ;;
    all) ;;
    *)
        echo "usage: bash scripts/demo.sh [serve]" >&2
        exit 2
        ;;
esac

command -v cargo >/dev/null || { echo "demo.sh: install the Rust toolchain (rustup, Rust 1.95) first" >&2; exit 1; }
source scripts/packages.sh
obd_install build demo || { echo "demo.sh: could not install the Debian packages it needs" >&2; exit 1; }

echo "== cargo build --release (the first build takes a while)"
cargo build --release --locked -q
rm -rf "$work" && mkdir -p "$work"

echo "== the layers, as a registry stores them"
for blob in "$blobs"/dev-layer0.blob "$blobs"/dev-layer1.blob; do
    "$obd" info "$blob" | grep -E '^(path|wrapping|kind)|virtual_size' | head -4
done

echo "== merge both layers into a raw disk (64 GiB virtual; unmapped ranges stay holes)"
"$obd" export --output "$work/dev.raw" "$blobs"/dev-layer0.blob "$blobs"/dev-layer1.blob
du -h --apparent-size "$work/dev.raw"; du -h "$work/dev.raw"
echo "== files in the merged ext4 (layer 1 deleted docs/doc007.txt and added data/blob.bin)"
debugfs -R "ls -l /data" "$work/dev.raw" 2>/dev/null
docs=$(debugfs -R "ls -p /docs" "$work/dev.raw" 2>/dev/null | awk -F/ '$6 ~ /^doc/ {print $6}' | sort)
echo "/docs holds $(echo "$docs" | wc -l) files: $(echo "$docs" | head -5 | tr '\n' ' ')..."
if echo "$docs" | grep -qx doc007.txt; then
    echo "demo.sh: doc007.txt is still there: layer 1's whiteout was not applied" >&2
    exit 1
fi
echo "doc007.txt is gone (whiteout applied)"
echo "== /etc/os-release read from the image"
debugfs -R "cat /etc/os-release" "$work/dev.raw" 2>/dev/null

echo "== a new layer from a directory: mkfs.ext4 -d, import, compress, tar-wrap"
mkdir -p "$work/tree/app"
echo "hello from obd" >"$work/tree/app/hello.txt"
truncate -s 64M "$work/app.raw"
mkfs.ext4 -q -F -d "$work/tree" "$work/app.raw"
"$obd" import "$work/app.raw" "$work/app.layer" -z --algorithm zstd -t -m "demo app layer"
"$obd" info "$work/app.layer"
"$obd" export --output "$work/app.back.raw" "$work/app.layer"
cmp "$work/app.raw" "$work/app.back.raw" || { echo "demo.sh: the exported disk differs from the imported one" >&2; exit 1; }
echo "round trip: the exported disk equals the imported one"
debugfs -R "cat /app/hello.txt" "$work/app.back.raw" 2>/dev/null

serve
