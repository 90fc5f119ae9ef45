#!/usr/bin/env bash
# Benchmark (issue 15): time and peak memory of `obd convert` against the
# layer sizes, on the host, no VM. Needs root (the baseline extracts with
# owners). Not a test.
#
#   bash scripts/bench-convert.sh [--short] [--rounds N] [--no-build] [--remake-data]
#
# The images (OCI, gzip'd tar layers of real files of this machine, made
# once under target/bench/convert/ with GNU tar and gzip -6):
#   python  one layer: /usr/lib/python3.11
#   share   one layer: /usr/share (many small files)
#   libs    one layer: /usr/lib/x86_64-linux-gnu (large shared libraries)
#   stack   the three layers above as one image, python at the bottom
#           (only with --images; 1.6 GB of tar)
# pushed to a docker-registry on 127.0.0.1 and written as OCI layouts. The
# registry's storage, the work dirs of obd convert, its layout output and
# the baseline's extraction go to the scratch dir. Each round runs, per
# image, in this order:
#   tar -x    the baseline: `gzip -dc | tar -x` of each layer into an empty
#             directory on the same file system (what a plain OCI unpack does)
#   layout    obd convert --from oci:SRC:v1 --to oci:OUT:v1
#   registry  obd convert --from 127.0.0.1:PORT/src/NAME:v1
#             --to 127.0.0.1:PORT/obd/NAME-rROUND:v1 (a new repository each
#             round, so every layer is uploaded)
# timing wall time and the peak RSS (getrusage of the child). It prints, per
# image, the layer sizes, the median and every value of each, MB/s of tar
# bytes and the ratio to the baseline, and the converted layers' size.
# The layers are read from the page cache (each is read once before).
#
# --short: the python image only, one round (about 20 s). --rounds N:
# rounds (default 3). --images "NAME...": the images to run (default
# "python share libs"). --scratch DIR: the scratch dir (default
# target/bench/convert/scratch; it needs about 3 GB, a tmpfs such as
# /dev/shm/NAME keeps that off the disk). --no-build: use the existing
# release obd. --remake-data: make the layers again.
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"

short=0
rounds=3
images="python share libs"
scratch=
while (($#)); do
    case $1 in
        --short) short=1; shift ;;
        --rounds) rounds=$2; shift 2 ;;
        --images) images=$2; shift 2 ;;
        --scratch) scratch=$2; shift 2 ;;
        -h | --help) usage ;;
        *) bench_option "$@"; shift "$BENCH_OPTION_WORDS" ;;
    esac
done
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { say "--rounds needs a whole number >= 1"; exit 2; }
((short)) && rounds=1
[[ $(id -u) == 0 ]] || { say "needs root (the tar -x baseline keeps owners)"; exit 1; }
command -v docker-registry >/dev/null || { say "docker-registry is missing (apt-get install docker-registry)"; exit 1; }

install_obd
OBD=$BENCH/obd
IMAGE_PY=$REPO/tests/vm/ublk/oci-image.py
DATA=$BENCH/convert
mkdir -p "$DATA"
declare -A LAYER_PATHS=([python]=usr/lib/python3.11 [share]=usr/share [libs]=usr/lib/x86_64-linux-gnu)
if ((short)); then
    IMAGES=(python)
else
    read -ra IMAGES <<<"$images"
fi
for name in "${IMAGES[@]}"; do
    [[ $name =~ ^(python|share|libs|stack)$ ]] || { say "no image $name (python share libs stack)"; exit 2; }
done
SCRATCH=${scratch:-$DATA/scratch}/bench-convert.$$
mkdir -p "$SCRATCH"
image_layers() {
    case $1 in
        stack) echo python share libs ;;
        *) echo "$1" ;;
    esac
}

# make_layer NAME: $DATA/layers/NAME.{blob,tar-size,diff-id} from LAYER_PATHS[NAME].
make_layer() {
    local out=$DATA/layers/$1
    [[ -f $out.blob && $remake == 0 ]] && return
    mkdir -p "$DATA/layers"
    say "making layer $1 from /${LAYER_PATHS[$1]}"
    tar -C / --sort=name --numeric-owner -cf "$out.tar" "${LAYER_PATHS[$1]}"
    stat -c %s "$out.tar" >"$out.tar-size"
    echo "sha256:$(sha256sum "$out.tar" | cut -d' ' -f1)" >"$out.diff-id"
    gzip -6 -c "$out.tar" >"$out.blob.tmp"
    rm "$out.tar"
    mv "$out.blob.tmp" "$out.blob"
}

# make_image NAME: $DATA/src/NAME in oci-image.py's form, and its OCI layout.
make_image() {
    local dir=$DATA/src/$1 i=0 l
    rm -rf "$dir" "$DATA/layout/$1"
    mkdir -p "$dir"
    for l in $(image_layers "$1"); do
        ln "$DATA/layers/$l.blob" "$dir/layer$i.blob"
        cp "$DATA/layers/$l.tar-size" "$dir/layer$i.tar-size"
        cp "$DATA/layers/$l.diff-id" "$dir/layer$i.diff-id"
        i=$((i + 1))
    done
    "$PY" - "$dir" "$i" <<'PY'
import hashlib, json, os, sys
d, n = sys.argv[1], int(sys.argv[2])
layers = []
for i in range(n):
    h = hashlib.sha256()
    with open(f"{d}/layer{i}.blob", "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                   "digest": "sha256:" + h.hexdigest(),
                   "size": os.path.getsize(f"{d}/layer{i}.blob"),
                   "diff_id": open(f"{d}/layer{i}.diff-id").read().strip()})
json.dump(layers, open(f"{d}/layers.json", "w"), indent=1)
PY
    "$PY" "$IMAGE_PY" layout "$dir" "$DATA/layout/$1" v1
}

REG_PID=
cleanup() {
    if [[ -n $REG_PID ]]; then
        kill "$REG_PID" 2>/dev/null || true
        wait "$REG_PID" 2>/dev/null || true
    fi
    rm -rf "$SCRATCH"
}
trap cleanup EXIT

start_registry() {
    mkdir -p "$SCRATCH/registry/storage" "$DATA/registry"
    PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat >"$DATA/registry/config.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $SCRATCH/registry/storage
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$PORT
  secret: bench-convert
YML
    docker-registry serve "$DATA/registry/config.yml" >"$DATA/registry/log" 2>&1 &
    REG_PID=$!
    local i
    for ((i = 0; i < 100; i++)); do
        curl -fs "http://127.0.0.1:$PORT/v2/" >/dev/null && return
        sleep 0.1
    done
    say "docker-registry did not start: $(tail -n 5 "$DATA/registry/log")"
    exit 1
}

# measure RESULTS KEY CMD...: run CMD, append "KEY wall_seconds peak_rss_kib" to RESULTS.
measure() {
    local results=$1 key=$2
    shift 2
    "$PY" - "$results" "$key" "$@" <<'PY'
import resource, subprocess, sys, time
results, key, *cmd = sys.argv[1:]
t0 = time.monotonic()
p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, err = p.communicate()
wall = time.monotonic() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
if p.returncode != 0:
    sys.exit(f"{' '.join(cmd)} exited {p.returncode}: {err.decode()[-800:]}")
with open(results, "a") as f:
    f.write(f"{key} {wall:.3f} {usage.ru_maxrss}\n")
PY
}

for name in "${IMAGES[@]}"; do
    for l in $(image_layers "$name"); do
        make_layer "$l"
    done
done
for name in "${IMAGES[@]}"; do
    make_image "$name"
done
start_registry
for name in "${IMAGES[@]}"; do
    "$PY" "$IMAGE_PY" push "http://127.0.0.1:$PORT" "src/$name" v1 "$DATA/src/$name" >/dev/null
done

RESULTS=$DATA/results.txt
: >"$RESULTS"
for ((r = 1; r <= rounds; r++)); do
    for name in "${IMAGES[@]}"; do
        say "round $r/$rounds: $name"
        blobs=("$DATA/src/$name"/layer*.blob)
        cat "${blobs[@]}" >/dev/null
        rm -rf "$SCRATCH/extract" "$SCRATCH/work" "$SCRATCH/out"
        mkdir -p "$SCRATCH/extract" "$SCRATCH/work"
        # shellcheck disable=SC2016 # the inner script's own $1 and $@
        measure "$RESULTS" "$name tar-x" bash -c 'for b in "${@:2}"; do gzip -dc "$b" | tar -x --numeric-owner -C "$1"; done' _ \
            "$SCRATCH/extract" "${blobs[@]}"
        rm -rf "$SCRATCH/extract"
        measure "$RESULTS" "$name layout" "$OBD" convert --from "oci:$DATA/layout/$name:v1" \
            --to "oci:$SCRATCH/out:v1" --work-dir "$SCRATCH/work"
        if ((r == 1)); then
            "$PY" - "$SCRATCH/out" >"$DATA/out-size.$name" <<'PY'
import json, sys
d = sys.argv[1]
idx = json.load(open(f"{d}/index.json"))
m = json.load(open(f"{d}/blobs/sha256/{idx['manifests'][0]['digest'][7:]}"))
print(sum(l["size"] for l in m["layers"]), " ".join(str(l["size"]) for l in m["layers"]))
PY
        fi
        rm -rf "$SCRATCH/out"
        measure "$RESULTS" "$name registry" "$OBD" convert --from "127.0.0.1:$PORT/src/$name:v1" \
            --to "127.0.0.1:$PORT/obd/$name-r$r:v1" --work-dir "$SCRATCH/work"
    done
done

echo
echo "obd convert, $rounds round(s), $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%MZ)"
for name in "${IMAGES[@]}"; do
    "$PY" - "$RESULTS" "$name" "$DATA/src/$name" "$DATA/out-size.$name" <<'PY'
import json, statistics, sys
results, name, src, out_size = sys.argv[1:]
layers = json.load(open(f"{src}/layers.json"))
tars = [int(open(f"{src}/layer{i}.tar-size").read()) for i in range(len(layers))]
out_total, *out_layers = open(out_size).read().split()
def mbs(sizes):
    return " + ".join(f"{int(b) / 1e6:.1f}" for b in sizes)
print(f"\n{name}: {len(layers)} layer(s); tar {mbs(tars)} MB = {sum(tars) / 1e6:.1f} MB;"
      f" gzip {mbs(l['size'] for l in layers)} MB; overlaybd layers {mbs(out_layers)} MB")
rows = {}
for line in open(results):
    img, mode, wall, rss = line.split()
    if img == name:
        rows.setdefault(mode, []).append((float(wall), int(rss)))
base = statistics.median(w for w, _ in rows["tar-x"])
print(f"  {'':10} {'wall s (median)':>16} {'MB/s':>7} {'x tar-x':>8} {'peak RSS MiB':>13}  every round: wall s / RSS MiB")
for mode in ("tar-x", "layout", "registry"):
    walls = [w for w, _ in rows[mode]]
    rss = [r for _, r in rows[mode]]
    w = statistics.median(walls)
    print(f"  {mode:10} {w:16.2f} {sum(tars) / 1e6 / w:7.1f} {w / base:8.2f} {statistics.median(rss) / 1024:13.1f}"
          f"  {' '.join(f'{x:.2f}' for x in walls)} / {' '.join(f'{x / 1024:.0f}' for x in rss)}")
PY
done
