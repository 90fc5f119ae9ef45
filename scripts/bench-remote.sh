#!/usr/bin/env bash
# Lazy loading vs full download of a 256 MiB registry image through a
# throttled link (20 ms latency, 100 Mbit/s): times, bytes fetched, ratio.
# Needs docker-registry (scripts/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test remote_bench -- --ignored --nocapture lazy_read_vs_full_download
