# Shared by the ublk VM tests (sourced, not run). Each test script calls
# `check NAME FUNCTION` per case and `finish` at the end, which prints
# `<suite>: N passed, M failed` and exits non-zero on any failure. ublk
# missing is a failure, never a skip.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
OBD=${OBD_BIN:-$REPO/target/release/obd}
[[ $OBD == /* ]] || OBD=$REPO/$OBD
FIXTURES=$REPO/tests/fixtures
SUITE=${SUITE:-ublk}
PASSED=0
FAILED=0
WORK=$(mktemp -d /tmp/obd-ublk.XXXXXX)

obd() { "$OBD" "$@"; }
# The system python: a pyenv shim costs ~20 s per cold start under TCG.
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3

log() { echo "  $*"; }

# check NAME FUNCTION [ARGS...]: run one case, print PASS/FAIL with its time.
check() {
    local name=$1
    shift
    local t0 t1 rc
    t0=$(date +%s.%N)
    ("$@")
    rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(printf '%.1f' "$(echo "$t1 - $t0" | bc 2>/dev/null || echo 0)")
    if ((rc == 0)); then
        PASSED=$((PASSED + 1))
        echo "PASS: $name (${secs} s)"
    else
        FAILED=$((FAILED + 1))
        echo "FAIL: $name (${secs} s, status $rc)"
        echo "--- obd list"
        "$OBD" list 2>&1 | sed 's/^/  /'
        echo "--- daemon logs"
        tail -n 20 /run/obd/ublk/*.log 2>/dev/null | sed 's/^/  /'
        echo "--- dmesg (last 15)"
        dmesg 2>/dev/null | tail -n 15 | sed 's/^/  /'
    fi
    cleanup_devices
}

cleanup_devices() {
    "$OBD" del --all >/dev/null 2>&1 || true
}

finish() {
    cleanup_devices
    rm -rf "$WORK"
    echo "$SUITE: $PASSED passed, $FAILED failed"
    ((FAILED == 0 && PASSED > 0))
    exit $?
}

# need_ublk: a case that fails when ublk is missing (so the suite cannot
# pass on a kernel without it).
need_ublk() {
    if [[ ! -c /dev/ublk-control ]]; then
        echo "  /dev/ublk-control is missing: ublk_drv is not loaded" >&2
        return 1
    fi
}

# fail MESSAGE: print and return 1.
fail() {
    echo "  FAILED: $*" >&2
    return 1
}

# add_device CONFIG [ARGS...]: `obd add`, echo the device path; check it is a block device.
add_device() {
    local dev
    dev=$("$OBD" add --config "$@") || return 1
    [[ -b $dev ]] || { fail "obd add printed '$dev', which is not a block device"; return 1; }
    echo "$dev"
}

# write_config FILE UPPER_DATA UPPER_INDEX LOWER...: an image config
# (UPPER_DATA empty: read-only). resultFile is FILE.result.
write_config() {
    local file=$1 data=$2 index=$3
    shift 3
    "$PY" - "$file" "$data" "$index" "$@" <<'PY'
import json, sys
file, data, index, *lowers = sys.argv[1:]
cfg = {"lowers": [{"file": l} for l in lowers], "resultFile": file + ".result"}
if data:
    cfg["upper"] = {"data": data, "index": index}
json.dump(cfg, open(file, "w"), indent=1)
PY
}

# expect_result CONFIG WORD: the resultFile starts with WORD.
expect_result() {
    local got
    got=$(cat "$1.result" 2>/dev/null)
    [[ $got == "$2"* ]] || { fail "resultFile says '$got', expected '$2...'"; return 1; }
}

# no_devices: obd list is empty and no /dev/ublkc* is left.
no_devices() {
    local listed
    listed=$("$OBD" list)
    [[ -z $listed ]] || { fail "obd list is not empty: $listed"; return 1; }
    if compgen -G '/dev/ublkc*' >/dev/null; then
        fail "devices left behind: $(echo /dev/ublkc*)"
        return 1
    fi
}

# same_tree A B: every file, link and dir in A is in B with the same bytes (and no more).
same_tree() {
    "$PY" - "$1" "$2" <<'PY'
import hashlib, os, sys
a, b = sys.argv[1], sys.argv[2]
def walk(root):
    out = {}
    for r, ds, fs in os.walk(root):
        for n in ds + fs:
            p = os.path.join(r, n)
            q = os.path.relpath(p, root)
            if q.startswith("lost+found"):
                continue
            if os.path.islink(p):
                out[q] = "link:" + os.readlink(p)
            elif os.path.isdir(p):
                out[q] = "dir"
            else:
                out[q] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out
wa, wb = walk(a), walk(b)
bad = [q for q in wa if wb.get(q) != wa[q]] + [q for q in wb if q not in wa]
for q in bad[:5]:
    print("  mismatch:", q)
print(f"  {len(wa) - len(bad)}/{len(wa)} entries match")
sys.exit(1 if bad else 0)
PY
}

# The reference vectors (tests/fixtures/overlaybd-ref-v1.tgz), once unpacked
# by unpack_vectors.
VEC=$WORK/vectors
unpack_vectors() {
    mkdir -p "$VEC" && tar xzf "$FIXTURES/overlaybd-ref-v1.tgz" -C "$VEC"
}

# random_tree DIR seed=N files_per_dir=N sub_every=N sizes=N,N,... large_mib=N,N,...:
# a tree to build an ext4 image from: dirs d00..d19 of files_per_dir files
# fNNN of random bytes (every sub_every-th one in dNN/sub/), each of a size
# picked from sizes; big/largeN.bin of large_mib[N] MiB each; a symlink
# link -> d00/f001. The same arguments give the same tree.
random_tree() {
    "$PY" - "$@" <<'PY'
import os, random, sys
root = sys.argv[1]
opt = dict(a.split("=", 1) for a in sys.argv[2:])
per_dir, sub_every = int(opt["files_per_dir"]), int(opt["sub_every"])
sizes = [int(x) for x in opt["sizes"].split(",")]
large_mib = [int(x) for x in opt["large_mib"].split(",")]
rnd = random.Random(int(opt["seed"]))
for d in range(20):
    os.makedirs(f"{root}/d{d:02d}/sub", exist_ok=True)
    for f in range(per_dir):
        size = rnd.choice(sizes)
        with open(f"{root}/d{d:02d}/{'sub/' if f % sub_every == 0 else ''}f{f:03d}", "wb") as out:
            out.write(rnd.randbytes(size))
os.makedirs(f"{root}/big", exist_ok=True)
for i, mib in enumerate(large_mib):
    with open(f"{root}/big/large{i}.bin", "wb") as out:
        for _ in range(mib):
            out.write(rnd.randbytes(1 << 20))
os.symlink("d00/f001", f"{root}/link")
PY
}
