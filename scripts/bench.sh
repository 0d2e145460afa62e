#!/usr/bin/env bash
# Runs the whole benchmark (bench/run.py): the gateway, the Node ws peer and uWebSockets.js
# under the same load generator, pinned server core 0 / load generator core 1.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 bench/run.py "$@"
