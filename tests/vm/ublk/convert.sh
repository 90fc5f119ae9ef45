#!/usr/bin/env bash
# Test 9: `obd convert`, proven on a real kernel. An OCI image made here
# from real files (oci-image.py: python3.11, its shared libraries as ldd
# lists them and /usr/lib/python3.11; a layer of every tar entry kind: file,
# setuid/setgid, sticky dir, hard links (one to a lower file), symlinks
# (relative, absolute, dangling, long), FIFO, char and block devices, xattrs
# including security.capability, long and UTF-8 names, implicit parents;
# and a layer of whiteouts of files and dirs, opaque dirs (a marker after a
# same-layer file), file<->dir<->symlink replacements) is pushed to a
# docker-registry on the guest's 127.0.0.1 and converted with `obd convert`
# registry to registry. Then:
#  - `e2fsck -fn` is clean on every layer prefix of the converted stack
#    (`obd export` of the layers fetched back);
#  - the tree of the whole stack read without a kernel (`obd export`, then
#    debugfs) equals the tree that applying the OCI layers to a directory
#    gives (tar-apply with the kernel's file operations: names, types, modes,
#    owners, sizes, contents, link targets, device numbers, xattrs, hard
#    links);
#  - served by `obd add` from the registry (the config names the converted
#    blobs, no local copy) and mounted read-only, /dev/ublkbN has that tree;
#  - python3 runs chrooted in the mounted image and prints what it prints
#    chrooted in the tar-applied directory.
#   tests/vm/run.sh --timeout 1500 -- bash tests/vm/ublk/convert.sh
SUITE=ublk-convert
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/registry-lib.sh"

IMAGE_PY=$(dirname "$0")/oci-image.py
[[ $IMAGE_PY == /* ]] || IMAGE_PY=$PWD/$IMAGE_PY
OCI=$WORK/oci          # the source layers
APPLIED=$WORK/applied  # the OCI layers applied to a directory
OBDIMG=$WORK/obd       # the converted layers, fetched back
MNT=$WORK/mnt
HOST=127.0.0.1:$REG_PORT
mkdir -p "$MNT"

# What python prints, chrooted in a tree: it needs the stdlib, zlib (libz),
# and sees layer 2's whiteout and opaque dir.
PY_CHECK='import sys, os, json, zlib
print(json.dumps({"version": sys.version.split()[0],
                  "os.py crc32": zlib.crc32(open("/usr/lib/python3.11/os.py", "rb").read()),
                  "lib2to3": sorted(os.listdir("/usr/lib/python3.11/lib2to3")),
                  "idlelib": os.path.exists("/usr/lib/python3.11/idlelib")}))'

build_and_push() {
    need_registry || return 1
    "$PY" "$IMAGE_PY" layers "$OCI" || { fail "oci-image.py layers"; return 1; }
    "$PY" "$IMAGE_PY" push "$REG_URL" src/py v1 "$OCI" >"$WORK/src.digest" || { fail "push the OCI image"; return 1; }
    "$PY" "$IMAGE_PY" apply "$APPLIED" "$OCI"/layer{0,1,2}.tar || { fail "tar-apply of the OCI layers"; return 1; }
    log "source manifest $(cat "$WORK/src.digest"), tar-applied tree: $(find "$APPLIED" | wc -l) names, $(du -sm "$APPLIED" | cut -f1) MB"
}

convert_image() {
    need_registry || return 1
    local t0 out
    t0=$(date +%s.%N)
    "$OBD" convert --from "$HOST/src/py:v1" --to "$HOST/obd/py:v1" --work-dir "$WORK" \
        >"$WORK/convert.out" 2>"$WORK/convert.err" ||
        { fail "obd convert: $(tail -c 600 "$WORK/convert.err")"; return 1; }
    log "obd convert took $(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)") s: $(tr '\n' ' ' <"$WORK/convert.out")"
    sed 's/^/    /' "$WORK/convert.err"
    (($(grep -c ', pushed' "$WORK/convert.err") == 3)) || { fail "expected 3 layers pushed"; return 1; }
    "$PY" "$IMAGE_PY" fetch "$REG_URL" obd/py v1 "$OBDIMG" || { fail "fetch the converted image"; return 1; }
    "$PY" - "$OBDIMG/manifest.json" <<'PY' || { fail "the converted manifest"; return 1; }
import json, sys
m = json.load(open(sys.argv[1]))
layers = m["layers"]
assert len(layers) == 3, layers
for l in layers:
    a = l["annotations"]
    assert a["containerd.io/snapshot/overlaybd/blob-digest"] == l["digest"], l
    assert a["containerd.io/snapshot/overlaybd/blob-size"] == str(l["size"]), l
print("  converted layers:", ", ".join(f"{l['size']} bytes" for l in layers))
PY
}

fsck_prefixes() {
    [[ -f $OBDIMG/layer2.blob ]] || { fail "no converted layers"; return 1; }
    local n raw=$WORK/prefix.raw layers=()
    for n in 0 1 2; do
        layers+=("$OBDIMG/layer$n.blob")
        rm -f "$raw"
        "$OBD" export --output "$raw" "${layers[@]}" || { fail "obd export of layers 0..$n"; return 1; }
        e2fsck -fn "$raw" >"$WORK/fsck.out" 2>&1 ||
            { fail "e2fsck -fn on layers 0..$n: $(tail -n 20 "$WORK/fsck.out")"; return 1; }
        log "layers 0..$n: $(tail -n 1 "$WORK/fsck.out")"
    done
    rm -f "$raw"
}

tree_without_kernel() {
    [[ -f $OBDIMG/layer2.blob ]] || { fail "no converted layers"; return 1; }
    local raw=$WORK/stack.raw
    rm -f "$raw"
    "$OBD" export --output "$raw" "$OBDIMG"/layer{0,1,2}.blob || { fail "obd export"; return 1; }
    "$PY" "$IMAGE_PY" compare "$APPLIED" "$raw" | sed 's/^/  /'
    local rc=${PIPESTATUS[0]}
    rm -f "$raw"
    return "$rc"
}

# serve: `obd add` of the converted image from the registry, mounted ro
# on $MNT; sets DEV and CACHE.
serve() {
    local cfg=$WORK/add/config.v1.json global=$WORK/add/overlaybd.json
    CACHE=$WORK/add/cache
    mkdir -p "$WORK/add"
    "$PY" - "$OBDIMG/manifest.json" "$REG_URL/v2/obd/py/blobs" "$WORK/add" "$cfg" <<'PY' || return 1
import json, sys
manifest, blobs, layer_dir, cfg = sys.argv[1:]
lowers = [{"digest": l["digest"], "size": l["size"],
           "dir": f"{layer_dir}/layers/{l['digest'].replace(':', '_')}"}
          for l in json.load(open(manifest))["layers"]]
json.dump({"repoBlobUrl": blobs, "lowers": lowers, "resultFile": cfg + ".result"},
          open(cfg, "w"), indent=1)
PY
    mountpoint -q "$CACHE" || cache_dir "$CACHE" || return 1
    global_config "$global" "$CACHE" || return 1
    DEV=$(add_device "$cfg" --global-config "$global") || return 1
    expect_result "$cfg" success || return 1
    mount -o ro "$DEV" "$MNT" || { fail "mount -o ro $DEV"; return 1; }
}

unserve() {
    umount "$MNT"
    "$OBD" del -n "${DEV#/dev/ublkb}"
    no_devices
}

tree_on_device() {
    need_ublk || return 1
    need_registry || return 1
    serve || return 1
    "$PY" "$IMAGE_PY" compare "$APPLIED" "$MNT" | sed 's/^/  /'
    local rc=${PIPESTATUS[0]}
    unserve || return 1
    return "$rc"
}

python_runs() {
    need_ublk || return 1
    need_registry || return 1
    local want got
    want=$(chroot "$APPLIED" /usr/bin/python3 -c "$PY_CHECK") || { fail "python3 chrooted in the tar-applied tree"; return 1; }
    serve || return 1
    got=$(chroot "$MNT" /usr/bin/python3 -c "$PY_CHECK")
    local rc=$?
    unserve || return 1
    log "chrooted in the image: $got"
    ((rc == 0)) || { fail "python3 chrooted in the image exited $rc"; return 1; }
    [[ $got == "$want" ]] || { fail "python3 printed '$got' there, '$want' in the tar-applied tree"; return 1; }
    [[ $got == *'"version": "3.11.'*'"lib2to3": ["README.obd"], "idlelib": false}' ]] ||
        { fail "unexpected output '$got'"; return 1; }
}

start_registry || echo "  registry start failed"
check "an OCI image of python3.11 and generated layers, pushed to the registry and tar-applied to a directory" build_and_push
check "obd convert registry to registry: 3 overlaybd layers with the snapshotter's annotations" convert_image
check "e2fsck -fn is clean on every layer prefix of the converted stack" fsck_prefixes
check "without a kernel (obd export + debugfs), the converted stack's tree equals the tar-applied one" tree_without_kernel
check "obd add from the registry, mounted ro: /dev/ublkbN's tree equals the tar-applied one" tree_on_device
check "python3 runs chrooted in the mounted image, as in the tar-applied tree" python_runs
stop_registry
unmount_caches
finish
