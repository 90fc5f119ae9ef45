#!/usr/bin/env bash
# Host-side setup for the containerd VM flow (tests/vm/containerd/flow.sh):
# Debian's containerd and runc (the `containerd` group of
# scripts/packages.sh), and the accelerated-container-image snapshotter and
# its ctr (rpull, record-trace), built with `go install` from the Go module
# proxy at a pinned release. Nothing of theirs is committed; the binaries go
# to $OBD_CTR_BIN, outside /tmp so the VM guest sees them through the host's
# root. Idempotent: a second run only checks that the binaries exist.
#
#   scripts/containerd-setup.sh        # prints OBD_CTR_BIN=<dir> last
#
# Env: OBD_CTR_BIN (default /var/cache/obd-ctr/bin-<tag>),
#      OBD_ACI_VERSION (default v1.4.4), GO (default: go on PATH, else
#      /usr/local/go/bin/go).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/packages.sh
. "$ROOT/scripts/packages.sh"

ACI_VERSION=${OBD_ACI_VERSION:-v1.4.4}
BIN=${OBD_CTR_BIN:-/var/cache/obd-ctr/bin-$ACI_VERSION}
ACI=github.com/containerd/accelerated-container-image

obd_install containerd

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
if [[ ! -x $BIN/overlaybd-snapshotter || ! -x $BIN/ctr ]]; then
    [[ -x $GO ]] || { echo "containerd-setup: no Go toolchain (set GO=...)" >&2; exit 1; }
    mkdir -p "$BIN"
    echo "containerd-setup: go install $ACI/cmd/{overlaybd-snapshotter,ctr}@$ACI_VERSION into $BIN" >&2
    # -buildvcs=false: the module cache has no VCS metadata to stamp.
    GOBIN=$BIN GOFLAGS=-buildvcs=false timeout 3600 "$GO" install \
        "$ACI/cmd/overlaybd-snapshotter@$ACI_VERSION" "$ACI/cmd/ctr@$ACI_VERSION"
fi
echo "OBD_CTR_BIN=$BIN"
