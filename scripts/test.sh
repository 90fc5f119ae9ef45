#!/usr/bin/env bash
# Every test of obd: formatting, lints, unit/integration/property tests.
# Installs what it needs on a fresh Debian machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

need_debs=()
# libclang-dev: bindgen in libublk-rs-sys generates the ublk UAPI bindings.
# docker-registry, apache2-utils (htpasswd), openssl, python3-jwt and
# python3-cryptography (a token issuer): the registry-blob tests.
# clang-16 and libbpf-dev build the eBPF probes (ebpf/build.rs); mount
# (losetup, mount) and util-linux (setpriv) run the eBPF tests, which need
# root; fonts-dejavu-core labels `obd trace plot` images.
for pkg in e2fsprogs xz-utils docker-registry apache2-utils openssl python3-jwt python3-cryptography \
    clang-16 libbpf-dev mount util-linux fonts-dejavu-core libclang-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_debs+=("$pkg")
done
if ((${#need_debs[@]})); then
    echo "test.sh: installing ${need_debs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_debs[@]}"
fi
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
OBD_BIN=target/release/obd tests/vm/run.sh --timeout 1500 --env OBD_BIN -- bash tests/vm/ublk/all.sh
echo "== VM: TCMU (obd tcmu serving configfs/tcm_loop devices in a Debian 6.12 kernel under qemu)"
cargo build --locked --bin obd
tests/vm/run.sh --timeout 1500 -- tests/vm/tcmu/tcmu.sh
