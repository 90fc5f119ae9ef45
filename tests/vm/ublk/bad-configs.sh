#!/usr/bin/env bash
# Test 7: bad configs make `obd add` fail with a clear message and
# failed:<reason> in the resultFile, and leave no device behind.
#   tests/vm/run.sh -- bash tests/vm/ublk/bad-configs.sh
SUITE=ublk-bad-configs
source "$(dirname "$0")/lib.sh"

unpack_vectors

# refused CONFIG WORDS...: obd add fails, says each WORD on stderr and in
# the resultFile, prints no device, leaves nothing.
refused() {
    need_ublk || return 1
    local cfg=$1 out err
    shift
    out=$("$OBD" add --config "$cfg" 2>"$WORK/err")
    local rc=$?
    err=$(cat "$WORK/err")
    log "obd said: $err"
    ((rc != 0)) || { fail "obd add succeeded"; return 1; }
    [[ -z $out ]] || { fail "printed '$out'"; return 1; }
    expect_result "$cfg" "failed:" || return 1
    local result
    result=$(cat "$cfg.result")
    for word in "$@"; do
        [[ $err == *"$word"* ]] || { fail "stderr lacks '$word'"; return 1; }
        [[ $result == *"$word"* ]] || { fail "resultFile lacks '$word'"; return 1; }
    done
    no_devices
}

missing_layer() {
    local cfg=$WORK/missing.json
    write_config "$cfg" "" "" "$VEC/layer0.lsmt" "$VEC/no-such-layer.lsmt"
    refused "$cfg" "no-such-layer.lsmt"
}

corrupt_layer() {
    local cfg=$WORK/corrupt.json bad=$WORK/corrupt.lsmt
    # A ZFile whose header digest no longer matches, and a truncated LSMT.
    cp "$VEC/layer1.lsmt.zfile" "$bad"
    printf '\xff' | dd of="$bad" bs=1 seek=40 conv=notrunc 2>/dev/null
    write_config "$cfg" "" "" "$VEC/layer0.lsmt" "$bad"
    refused "$cfg" "corrupt.lsmt" || return 1
    head -c 10000 "$VEC/layer0.lsmt" >"$bad"
    refused "$cfg" "corrupt.lsmt"
}

unparseable() {
    local cfg=$WORK/garbage.json
    printf '{"lowers": [ {"file": oops ], "resultFile": "%s"}' "$cfg.result" >"$cfg"
    refused "$cfg" "config"
}

no_layers() {
    local cfg=$WORK/empty.json
    printf '{"lowers": [], "resultFile": "%s"}' "$cfg.result" >"$cfg"
    refused "$cfg" "no layers"
}

check "missing layer file" missing_layer
check "corrupt layers (bad ZFile digest, truncated LSMT)" corrupt_layer
check "unparseable JSON" unparseable
check "config without layers" no_layers
finish
