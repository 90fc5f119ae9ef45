# shellcheck shell=bash
# The "app" stack of scripts/bench-ublk.sh (sourced by it; not run alone):
# a 4-layer container image made the way the overlaybd convertor makes one,
# and the start-up workloads the issue names, timed on each front end.
#
# Host (make_app_data, once, into target/bench/data/app/): four OCI-style
# layer tars,
#   0  python3, the libraries ldd lists for it, /usr/lib/python3.11 (no
#      tests, idlelib, tkinter, ensurepip)
#   1  /data/small/dNN/fNNNN.*: 1200 files of 1-16 KiB (text-like and
#      random bytes; fixed seed)
#   2  /data/big.bin (32 MiB, text-like and random), /app/start.py
#   3  100 of the small files whited out (.wh.), 100 rewritten, /app/app.json
# each applied onto the ext4 of the layers below and committed as ZFile
# lz4 4 KiB in a tar (`-z -t`), as the convertor stores layers: with the
# reference tools (overlaybd-create --mkfs/-s, overlaybd-apply,
# overlaybd-commit, from the directory of --ref-tcmu) when they are there,
# else with `obd apply --mkfs`/`obd apply` (app/made-by says which).
# app/small.list: 1000 of the small files that exist in the merged image, in
# a fixed random order.
#
# Guest (run_app): the image is mounted read-only (ext4, noload) from the
# case's device, and each workload runs after the page cache is dropped:
#   python  chroot: python3 -B /app/start.py (json, re, hashlib, decimal,
#           datetime, collections; hashes a file, prints a line)
#   small   cat the 1000 files of small.list
#   file32  cat /data/big.bin
#   tree    tar of the whole tree to a pipe (every file read)
# Seconds, wall clock, per workload; rows in $OUT/app.tsv.

APP_LAYERS=4

# app_tars DIR: the four layer tars in DIR (layerI.tar) and small.list.
app_tars() {
    local dir=$1 t
    t=$(mktemp -d "$BENCH/app-tree.XXXXXX")
    # layer 0: python3 and what it loads
    local list=$t/l0.list
    {
        echo /usr/bin/python3
        readlink -f /usr/bin/python3
        ldd "$(readlink -f /usr/bin/python3)" | awk '/=>/ { print $3 } $1 ~ /^\// { print $1 }'
        find /usr/lib/python3.11 -type f \
            -not -path '*/test/*' -not -path '*/tests/*' -not -path '*/idlelib/*' \
            -not -path '*/tkinter/*' -not -path '*/ensurepip/*' -not -path '*/__pycache__/*'
        # the encodings and site's dirs python opens at start-up
        find /usr/lib/python3.11 -type d -not -path '*/test/*' -not -path '*/__pycache__*'
    } >"$list"
    copy_into_root "$t/l0" "$list"
    mkdir -p "$t/l0/tmp" "$t/l0/dev" "$t/l0/proc"
    # layers 1-3 and the list of small files
    "$PY" - "$t" "$dir/small.list" <<'PY'
import os, random, sys
t, small_list = sys.argv[1:]
rnd = random.Random(12)
words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz_") for _ in range(rnd.randint(2, 10)))
         for _ in range(400)]
def text(n):
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rnd.choices(words, k=12)) + b"\n"
    return bytes(out[:n])
def content(n):
    return text(n) if rnd.random() < 0.6 else rnd.randbytes(n)
small = []
for d in range(40):
    base = f"{t}/l1/data/small/d{d:02d}"
    os.makedirs(base, exist_ok=True)
    for f in range(30):
        rel = f"data/small/d{d:02d}/f{d * 30 + f:04d}.dat"
        with open(f"{t}/l1/{rel}", "wb") as out:
            out.write(content(rnd.randint(1, 16) << 10))
        small.append(rel)
os.makedirs(f"{t}/l2/data", exist_ok=True)
os.makedirs(f"{t}/l2/app", exist_ok=True)
with open(f"{t}/l2/data/big.bin", "wb") as out:
    for _ in range(32):
        out.write(content(1 << 20))
with open(f"{t}/l2/app/start.py", "w") as out:
    out.write('''import collections, datetime, decimal, hashlib, json, re
h = hashlib.sha256(open("/data/big.bin", "rb").read(256 << 10)).hexdigest()
c = collections.Counter(re.findall(r"[a-z]+", json.dumps({"d": str(datetime.date(2020, 1, 1))})))
print("started", h[:12], decimal.Decimal("1.10") + decimal.Decimal("2.20"), sorted(c)[:2])
''')
gone = set(rnd.sample(small, 100))
rest = [s for s in small if s not in gone]
changed = rnd.sample(rest, 100)
for rel in gone:
    d, name = os.path.split(rel)
    os.makedirs(f"{t}/l3/{d}", exist_ok=True)
    open(f"{t}/l3/{d}/.wh.{name}", "wb").close()
for rel in changed:
    os.makedirs(os.path.dirname(f"{t}/l3/{rel}"), exist_ok=True)
    with open(f"{t}/l3/{rel}", "wb") as out:
        out.write(content(rnd.randint(1, 16) << 10))
os.makedirs(f"{t}/l3/app", exist_ok=True)
with open(f"{t}/l3/app/app.json", "w") as out:
    out.write('{"name": "bench", "layers": 4}\n')
rnd.shuffle(rest)
with open(small_list, "w") as out:
    out.write("".join(f"/{s}\n" for s in rest[:1000]))
PY
    local i
    for i in 0 1 2 3; do
        tar -C "$t/l$i" --owner=0 --group=0 --numeric-owner --sort=name -cf "$dir/layer$i.tar" .
    done
    rm -rf "$t"
}

# make_app_data REF_BIN_DIR: the app stack (see the header) into $DATA/app.
make_app_data() {
    local ref_bin=$1 dir=$DATA/app.tmp i
    rm -rf "$DATA/app" "$dir"
    mkdir -p "$dir"
    say "making the app image's layer tars"
    app_tars "$dir"
    if [[ -n $ref_bin && -x $ref_bin/overlaybd-apply ]]; then
        say "applying them with the reference tools in $ref_bin"
        local lib=$ref_bin/../lib lowers="" w
        cat >"$dir/ref.json" <<JSON
{"logConfig":{"logLevel":1,"logPath":"$dir/ref.log"},
 "cacheConfig":{"cacheType":"file","cacheDir":"$dir/cache","cacheSizeGB":1},
 "gzipCacheConfig":{"enable":false},"credentialConfig":{"mode":"file","path":""},
 "ioEngine":0,"download":{"enable":false},"enableAudit":false}
JSON
        # overlaybd-apply validates its --service_config_path default,
        # /etc/overlaybd/overlaybd.json, even when given another path, and
        # aborts if it is missing: an empty one is put there for the run
        # (and taken away after) when the host has none.
        local made_etc=()
        if [[ ! -e /etc/overlaybd/overlaybd.json ]]; then
            [[ -d /etc/overlaybd ]] || made_etc+=(/etc/overlaybd)
            mkdir -p /etc/overlaybd
            cp "$dir/ref.json" /etc/overlaybd/overlaybd.json
            made_etc=(/etc/overlaybd/overlaybd.json "${made_etc[@]}")
        fi
        for i in 0 1 2 3; do
            w=$dir/w$i
            mkdir -p "$w"
            if ((i == 0)); then
                LD_LIBRARY_PATH=$lib "$ref_bin/overlaybd-create" "$w/data" "$w/index" 64 -s --mkfs
            else
                LD_LIBRARY_PATH=$lib "$ref_bin/overlaybd-create" "$w/data" "$w/index" 0 -s
            fi
            printf '{"repoBlobUrl":"","lowers":[%s],"upper":{"index":"%s","data":"%s"},"resultFile":""}' \
                "$lowers" "$w/index" "$w/data" >"$w/config.json"
            LD_LIBRARY_PATH=$lib "$ref_bin/overlaybd-apply" "$dir/layer$i.tar" "$w/config.json" \
                --service_config_path "$dir/ref.json" >"$w/apply.log" 2>&1 ||
                { cat "$w/apply.log"; say "overlaybd-apply of layer $i failed"; exit 1; }
            LD_LIBRARY_PATH=$lib "$ref_bin/overlaybd-commit" "$w/data" "$w/index" "$dir/layer$i.app" -z -t \
                >"$w/commit.log" 2>&1 || { cat "$w/commit.log"; say "overlaybd-commit of layer $i failed"; exit 1; }
            rm -f "$w/data" "$w/index"
            lowers="$lowers${lowers:+,}{\"file\":\"$dir/layer$i.app\"}"
        done
        ((${#made_etc[@]} == 0)) || { rm -f "${made_etc[0]}"; [[ -z ${made_etc[1]:-} ]] || rmdir "${made_etc[1]}"; }
        echo "the reference's overlaybd-create, overlaybd-apply and overlaybd-commit -z -t ($ref_bin)" >"$dir/made-by"
    else
        say "applying them with obd apply (no reference tools given)"
        local below=()
        for i in 0 1 2 3; do
            if ((i == 0)); then
                "$BENCH/obd" apply --mkfs -z -t "$dir/layer$i.tar" "$dir/layer$i.app"
            else
                "$BENCH/obd" apply -z -t "$dir/layer$i.tar" "$dir/layer$i.app" "${below[@]}"
            fi
            below+=("$dir/layer$i.app")
        done
        echo "obd apply -z -t (no reference tools given)" >"$dir/made-by"
    fi
    rm -rf "$dir"/w? "$dir"/cache "$dir"/layer?.tar
    mv "$dir" "$DATA/app"
}

# run_app DEV LABEL: the start-up workloads on the image DEV serves; a row
# each in $OUT/app.tsv: round label workload seconds.
run_app() {
    local dev=$1 label=$2 m=$W/app-mnt wl
    mkdir -p "$m"
    for wl in python small file32 tree; do
        sync
        echo 3 >/proc/sys/vm/drop_caches
        mount -t ext4 -o ro,noload "$dev" "$m" || { echo "$label: mount $dev failed"; return 1; }
        local t0 t1 out rc=0
        t0=$(date +%s.%N)
        case $wl in
            python) out=$(chroot "$m" /usr/bin/python3 -B /app/start.py 2>&1) || rc=$? ;;
            small) out=$(sed "s|^|$m|" "$DATA/app/small.list" | xargs cat | wc -c) || rc=$? ;;
            file32) out=$(wc -c <"$m/data/big.bin") || rc=$? ;;
            tree) out=$(tar -C "$m" -cf - . | wc -c) || rc=$? ;;
        esac
        t1=$(date +%s.%N)
        umount "$m"
        if ((rc)); then
            echo "  $label $wl: FAILED (exit $rc): $(tail -c 300 <<<"$out")"
            continue
        fi
        local secs
        secs=$("$PY" -c "print(f'{$t1 - $t0:.2f}')")
        echo "  $label $wl: $secs s ($out)" | head -c 300
        echo
        printf '%s\t%s\t%s\t%s\n' "$round" "$label" "$wl" "$secs" >>"$OUT/app.tsv"
    done
}

# app_table: the medians of $OUT/app.tsv, and each front end against the
# reference, as markdown.
app_table() {
    [[ -s $OUT/app.tsv ]] || return 0
    "$PY" - "$OUT/app.tsv" "$(cat "$DATA/app/made-by")" <<'PY'
import statistics, sys
path, made_by = sys.argv[1:]
r, order = {}, []
for line in open(path):
    rnd, label, wl, secs = line.split()
    if label not in r:
        r[label] = {}
        order.append(label)
    r[label].setdefault(wl, []).append(float(secs))
wls = ["python", "small", "file32", "tree"]
print()
print(f"Start-up workloads on the app image (4 layers, ZFile lz4 4 KiB, tar-wrapped; made by {made_by}),")
print("mounted ro from each device, page cache dropped before each; seconds, medians [each round]:")
print()
print("| device | " + " | ".join(wls) + " |")
print("|---|" + "---:|" * len(wls))
med = {}
for label in order:
    cells = []
    for wl in wls:
        v = r[label].get(wl, [])
        if v:
            med[(label, wl)] = statistics.median(v)
            cells.append(f"{med[(label, wl)]:.2f} [" + "/".join(f"{x:.2f}" for x in v) + "]")
        else:
            cells.append("-")
    print(f"| {label} | " + " | ".join(cells) + " |")
if "ref-tcmu-app" in r:
    print()
    print("reference seconds / obd seconds (above 1: obd is faster):")
    print()
    print("| device | " + " | ".join(wls) + " |")
    print("|---|" + "---:|" * len(wls))
    for label in order:
        if label == "ref-tcmu-app":
            continue
        cells = []
        for wl in wls:
            a, b = med.get(("ref-tcmu-app", wl)), med.get((label, wl))
            cells.append(f"{a / b:.2f}" if a and b else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")
PY
}
