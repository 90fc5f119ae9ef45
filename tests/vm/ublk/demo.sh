#!/usr/bin/env bash
# The demo's last step, `bash scripts/demo.sh serve`, where ublk exists: it
# writes a config.v1.json for the bundled two-layer image, `obd add --config`
# serves it as /dev/ublkbN, debugfs reads /etc/os-release from the device
# (checked here against dev-tree.json), and `obd del` removes the device.
#   tests/vm/run.sh -- bash tests/vm/ublk/demo.sh
# shellcheck disable=SC2317 # the case runs through check
SUITE=ublk-demo
source "$(dirname "$0")/lib.sh"

demo_serve() {
    need_ublk || return 1
    local out=$WORK/demo.out cfg=$WORK/demo/config.v1.json dev n got want rc
    OBD_BIN=$OBD OBD_DEMO_WORK=$WORK/demo bash "$REPO/scripts/demo.sh" serve >"$out" 2>&1
    rc=$?
    sed 's/^/  | /' "$out"
    ((rc == 0)) || { fail "demo.sh serve exited with status $rc"; return 1; }
    if grep -q '^skipped' "$out"; then
        fail "demo.sh serve skipped the ublk step although /dev/ublk-control exists"
        return 1
    fi
    dev=$(sed -n 's|^obd add served it as \(/dev/ublkb[0-9][0-9]*\) .*|\1|p' "$out")
    [[ -n $dev ]] || { fail "no 'obd add served it as /dev/ublkbN' line"; return 1; }
    n=${dev#/dev/ublkb}
    expect_result "$cfg" success || return 1
    # the lines between the read's header and the del line are the file
    got=$(sed -n "\|^== /etc/os-release read from $dev |,\|^== obd del|{\|^== |d;p}" "$out" | sha256sum | cut -d' ' -f1)
    want=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["etc/os-release"])' \
        "$FIXTURES/real-dev-image/dev-tree.json") || return 1
    [[ $got == "$want" ]] || { fail "/etc/os-release from $dev: sha256 $got, dev-tree.json says $want"; return 1; }
    grep -q "^== obd del -n $n: $dev is gone$" "$out" || { fail "no line saying obd del removed $dev"; return 1; }
    [[ ! -e $dev && ! -e /dev/ublkc$n ]] || { fail "$dev or /dev/ublkc$n is still there"; return 1; }
    no_devices
}

check "demo.sh serve: obd add --config serves the demo image, debugfs reads /etc/os-release from the device, obd del removes it" demo_serve
finish
