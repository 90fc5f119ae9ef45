#!/usr/bin/env bash
# Print the path of a promtool (Prometheus' metrics checker), for the
# exporter's test. Uses one on PATH, else unpacks Debian's prometheus
# package once into /var/cache/obd-promtool (only the binary is used: the
# package itself is not installed, so no Prometheus service is started).
set -euo pipefail
if command -v promtool >/dev/null; then
    command -v promtool
    exit 0
fi
cache=/var/cache/obd-promtool
if [[ ! -x $cache/usr/bin/promtool ]]; then
    mkdir -p "$cache"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) ||
        { apt-get update >/dev/null && (cd "$tmp" && apt-get download prometheus >/dev/null); }
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
    install -D -m 755 "$tmp/root/usr/bin/promtool" "$cache/usr/bin/promtool"
fi
echo "$cache/usr/bin/promtool"
