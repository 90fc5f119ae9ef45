#!/usr/bin/env bash
# Every test of obd: formatting, lints, unit/integration/property tests.
# Installs what it needs on a fresh Debian machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

# The Debian packages of every group in scripts/packages.sh (the build, the
# demo, the tests, the VM harness and the fresh-machine check); what each is
# for is written there.
source scripts/packages.sh
obd_install build demo test vm fresh || { echo "test.sh: could not install the Debian packages it needs" >&2; exit 1; }
if ! command -v cargo >/dev/null; then
    echo "test.sh: cargo is missing; install the Rust toolchain (rustup, Rust 1.95) first" >&2
    exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo nextest"
cargo nextest run --workspace --locked --no-fail-fast
echo "== VM tests: ublk (qemu, Debian 6.12 kernel)"
cargo build --release --locked -p obd
echo "== benchmark, short form: obd export against cat of the flattened raw (scripts/bench-engine.sh)"
bash scripts/bench-engine.sh --no-build --size-mib 64 --rounds 1
echo "== benchmark, short form: start-up traces replayed through a throttled registry link (scripts/bench-fetch.sh)"
bash scripts/bench-fetch.sh --short --no-build
echo "== benchmark, short form: obd convert time and peak memory against gzip -dc | tar -x (scripts/bench-convert.sh)"
bash scripts/bench-convert.sh --short --no-build
OBD_BIN=target/release/obd tests/vm/run.sh --timeout 1500 --env OBD_BIN -- bash tests/vm/ublk/all.sh
echo "== VM: TCMU (obd tcmu serving configfs/tcm_loop devices in a Debian 6.12 kernel under qemu)"
cargo build --locked --bin obd
tests/vm/run.sh --timeout 1500 -- tests/vm/tcmu/tcmu.sh
echo "== VM: containerd 1.6 + the overlaybd snapshotter, obd tcmu as overlaybd-tcmu (rpull, run, record-trace, replay; ~4 min)"
# go install of the snapshotter and its ctr: ~8 min the first time, seconds after.
bash scripts/containerd-setup.sh >/dev/null
OBD_VM_EXTRA_MODULES=overlay tests/vm/run.sh --timeout 1800 -- bash tests/vm/containerd/flow.sh
echo "== VM: the same with rwMode dir (a writable overlaybd device per container, made by obd as overlaybd-create; ~3 min)"
OBD_CTR_RWMODE=dir OBD_VM_EXTRA_MODULES=overlay tests/vm/run.sh --timeout 1800 -- bash tests/vm/containerd/flow.sh
echo "== VM: the same with rwMode dev (containerd mounts the container's overlaybd device as ext4 itself; ~3 min)"
OBD_CTR_RWMODE=dev OBD_VM_EXTRA_MODULES=overlay tests/vm/run.sh --timeout 1800 -- bash tests/vm/containerd/flow.sh
echo "== VM: vhost-user-blk (obd serve; qemu boots the Debian 6.12 kernel from an obd image, no kernel module)"
OBD_BIN=target/debug/obd bash tests/vm/vhost/boot.sh
echo "== VM: power cut, short form (qemu killed under flushed writes; one trial per front end and upper kind)"
bash tests/vm/powercut/run.sh --no-build --trials 4
echo "== fresh machine: bash scripts/demo.sh in a debootstrapped Debian 12 that has only Rust"
bash scripts/fresh-machine-check.sh
