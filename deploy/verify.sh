#!/usr/bin/env bash
# Checks deploy/ringlink.service with systemd's own tools: `systemd-analyze verify` (syntax,
# directives, the ExecStart binary) and `systemd-analyze security --offline` (exposure score at
# most 2.0). The unit names /usr/local/bin/ringlink; the check points it at the binary built
# here. Skips, saying so, where systemd-analyze is absent.
#
#   deploy/verify.sh [path/to/ringlink]
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$(realpath -m "${1:-$root/target/release/ringlink}")"
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "SKIP: systemd-analyze not installed; deploy/ringlink.service not verified"
    exit 0
fi
[ -x "$bin" ] || { echo "no ringlink binary at $bin (cargo build --release)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sed "s#/usr/local/bin/ringlink#$bin#" "$root/deploy/ringlink.service" >"$work/ringlink.service"
systemd-analyze verify "$work/ringlink.service"
systemd-analyze security --offline=true --threshold=20 --no-pager "$work/ringlink.service" \
    | grep -E "Overall exposure" || true
systemd-analyze security --offline=true --threshold=20 --no-pager "$work/ringlink.service" >/dev/null
echo "deploy/ringlink.service: systemd-analyze verify and security (exposure <= 2.0) pass"
