# Shared by the ublk VM suites that read layers from a registry (sourced
# after lib.sh, not run): a real /usr/bin/docker-registry on the guest's own
# 127.0.0.1 with its storage on tmpfs and its access log on, the ext4 image
# pushed to it, and counts of what the daemon fetched. A missing registry
# binary or a registry that does not answer fails the cases, never skips them.

REGISTRY_BIN=/usr/bin/docker-registry
REG_PORT=${OBD_VM_REGISTRY_PORT:-5000}
REG_DIR=$WORK/registry
REG_LOG=$REG_DIR/registry.log
REG_URL=http://127.0.0.1:$REG_PORT

# start_registry: start docker-registry in the background (once per suite).
start_registry() {
    [[ -x $REGISTRY_BIN ]] || { fail "$REGISTRY_BIN is missing (apt-get install docker-registry)"; return 1; }
    # guest-init brings lo up; make sure, in case it did not.
    ip link set lo up 2>/dev/null || true
    mkdir -p "$REG_DIR/storage"
    cat >"$REG_DIR/config.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $REG_DIR/storage
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$REG_PORT
  secret: obd-vm-secret
YML
    setsid "$REGISTRY_BIN" serve "$REG_DIR/config.yml" >"$REG_LOG" 2>&1 </dev/null &
    echo $! >"$REG_DIR/pid"
    local i
    for ((i = 0; i < 300; i++)); do
        registry_up && return 0
        kill -0 "$(cat "$REG_DIR/pid")" 2>/dev/null || break
        sleep 0.2
    done
    fail "docker-registry did not answer on $REG_URL: $(tail -n 5 "$REG_LOG")"
}

# registry_up: something answers /v2/ on the registry port.
registry_up() {
    "$PY" - "$REG_PORT" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/", timeout=2).read()
PY
}

# need_registry: a case fails unless the suite's registry answers.
need_registry() {
    registry_up || { fail "the registry at $REG_URL is not running"; return 1; }
}

stop_registry() {
    [[ -f $REG_DIR/pid ]] || return 0
    local pid
    pid=$(cat "$REG_DIR/pid")
    kill "$pid" 2>/dev/null
    local i
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    rm -f "$REG_DIR/pid"
}

# log_mark: the access log's current line count (pass it to fetched_since).
log_mark() {
    wc -l <"$REG_LOG"
}

# fetched_since MARK DIGEST: "<GETs> <bytes>" of blob DIGEST answered after MARK.
fetched_since() {
    tail -n +"$(($1 + 1))" "$REG_LOG" | awk -v d="$2" '
        $0 ~ "\"GET [^ ]*/blobs/" d " " && $9 ~ /^20[06]$/ { n++; b += $10 }
        END { printf "%d %d\n", n, b }'
}

# push_layer LAYER CONFIG NAME: push LAYER as repository NAME, writing CONFIG.
push_layer() {
    "$OBD" push --repo "$REG_URL/v2/$2" -o "$3" "$1" >/dev/null || { fail "obd push $1"; return 1; }
}

# set_config CONFIG KEY=JSON...: set top-level keys of a JSON config
# (resultFile defaults to CONFIG.result).
set_config() {
    "$PY" - "$@" <<'PY'
import json, sys
path, *pairs = sys.argv[1:]
cfg = json.load(open(path))
cfg.setdefault("resultFile", path + ".result")
for p in pairs:
    k, v = p.split("=", 1)
    cfg[k] = json.loads(v)
json.dump(cfg, open(path, "w"), indent=1)
PY
}

# global_config FILE CACHE_DIR [PREFETCH_CONCURRENCY]: a global config
# whose blob cache is CACHE_DIR.
global_config() {
    "$PY" - "$1" "$2" "${3:-4}" <<'PY'
import json, sys
path, cache, conc = sys.argv[1:]
json.dump({"cacheConfig": {"cacheType": "file", "cacheDir": cache, "cacheSizeGB": 2},
           "prefetchConfig": {"concurrency": int(conc)}},
          open(path, "w"), indent=1)
PY
}

# blob_digest CONFIG: the digest of the config's (only) lower.
blob_digest() {
    "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["lowers"][-1]["digest"])' "$1"
}

# cache_dir DIR: a fresh blob cache directory on its own tmpfs. The cache
# evicts when its file system has less than 1 GiB free, and the guest's /tmp
# (half of 2 GiB RAM) always has less; a cache disk has room.
cache_dir() {
    mkdir -p "$1" && mount -t tmpfs -o size=4g obd-cache "$1" || { fail "mount a tmpfs on $1"; return 1; }
}

# cache_bytes DIR: bytes the blob cache holds on disk (its sparse files' blocks).
cache_bytes() {
    du -s -B1 "$1" 2>/dev/null | awk '{print $1}'
}

# unmount_caches: the cache tmpfs mounts a failed case left under $WORK.
unmount_caches() {
    local m
    for m in $(awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m"
    done
}
