#!/usr/bin/env bash
# Rebuild the fuzz seed corpus (fuzz/corpus/<target>/, gitignored) from the
# test fixtures. Tests-only: nothing here ships.
#
#   fuzz/seed.sh            # from anywhere; needs cargo (stable is fine), tar, gzip
#
# - lsmt_layer: small layers written with the engine (committed, sealed,
#   sparse) and two small layers cut out of the reference vectors;
# - zfile: the reference vectors' .zfile files plus generated ZFiles (lz4 and
#   zstd, 4 and 64 KiB blocks, both header flavors, empty);
# - layer_blob: the real-dev-image blobs (tar > zfile > LSMT), the reference
#   *.lsmt.zfile files, and generated raw / zfile / tar-wrapped layers;
# - trace: binary traces made with trace::encode, text lists (one over the
#   64 KiB limit), an empty file;
# - config: image and global configs, credential files;
# - oci_layer: small layer tars in the three tar formats, and whiteouts.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
fixtures="$here/../tests/fixtures"
corpus="$here/corpus"
vectors="$(mktemp -d)"
trap 'rm -rf "$vectors"' EXIT

tar -xzf "$fixtures/overlaybd-ref-v1.tgz" -C "$vectors"
# Seed files are (over)written by name; whatever the fuzzer added stays.
# `rm -rf fuzz/corpus` first for a corpus of seeds only.
mkdir -p "$corpus"/{lsmt_layer,zfile,layer_blob,trace,config,oci_layer}

for f in "$vectors"/*.zfile; do
    cp "$f" "$corpus/zfile/ref-$(basename "$f")"
done
for f in "$vectors"/*.lsmt.zfile; do
    cp "$f" "$corpus/layer_blob/ref-$(basename "$f")"
done
cp "$fixtures"/real-dev-image/*.blob "$corpus/layer_blob/"
cp "$vectors/manifest.json" "$corpus/config/ref-manifest.json"

# oci_layer: small layer tars (ustar, GNU, pax) of a tree with every
# entry kind tar can hold without root, and a layer of whiteouts.
tree="$vectors/oci-tree"
mkdir -p "$tree/etc/sub" "$tree/a/very/deep/path/of/directories/that/goes/on"
printf 'root:x:0:0\n' >"$tree/etc/passwd"
ln -s passwd "$tree/etc/link"
ln "$tree/etc/passwd" "$tree/etc/passwd-"
mkfifo "$tree/etc/fifo"
printf 'x' >"$tree/a/very/deep/path/of/directories/that/goes/on/$(printf 'n%.0s' $(seq 120))"
for format in ustar gnu pax; do
    tar --format=$format -cf "$corpus/oci_layer/tree-$format.tar" -C "$tree" .
done
mkdir -p "$vectors/oci-wh/etc"
touch "$vectors/oci-wh/etc/.wh.passwd" "$vectors/oci-wh/etc/.wh..wh..opq" "$vectors/oci-wh/.wh.a"
tar --format=pax -cf "$corpus/oci_layer/whiteouts.tar" -C "$vectors/oci-wh" .

# The generated files: a plain (non-fuzz) build of examples/seed.rs.
cargo run --quiet --release --manifest-path "$here/Cargo.toml" --example seed -- \
    "$vectors" "$corpus"

for t in lsmt_layer zfile layer_blob trace config oci_layer; do
    printf '%-11s %3d files %9d bytes\n' "$t" "$(ls "$corpus/$t" | wc -l)" \
        "$(cat "$corpus/$t"/* | wc -c)"
done
