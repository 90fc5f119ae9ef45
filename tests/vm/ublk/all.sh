#!/usr/bin/env bash
# Every ublk VM suite in one boot; the last line sums them up:
#   tests/vm/run.sh --timeout 1500 -- bash tests/vm/ublk/all.sh
# Suites run in the order below; each prints its own `<suite>: N passed,
# M failed` line. OBD_BIN picks the binary (default target/release/obd).
set -uo pipefail
here=$(dirname "$0")
suites=(${OBD_UBLK_SUITES:-ref-vectors images demo bad-configs writable recovery remote trace convert})
passed=0
failed=0
for suite in "${suites[@]}"; do
    echo "=== $suite"
    log=$(mktemp /tmp/obd-suite.XXXXXX)
    bash "$here/$suite.sh" 2>&1 | tee "$log"
    out=$(tail -n 1 "$log")
    rm -f "$log"
    if [[ $out =~ :\ ([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
        passed=$((passed + BASH_REMATCH[1]))
        failed=$((failed + BASH_REMATCH[2]))
    else
        echo "$suite: did not finish (last line: $out)"
        failed=$((failed + 1))
    fi
done
echo "ublk: $passed passed, $failed failed"
((failed == 0 && passed > 0))
