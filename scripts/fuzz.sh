#!/usr/bin/env bash
# Runs the cargo-fuzz targets (JSON and binary envelope decoders, WebTransport frame
# parser, cluster channel messages) for SECONDS each (default 60). The machine's
# toolchain is stable: RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the sanitizer flags it needs.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
secs="${1:-60}"; shift || true
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(decode_json decode_binary stream_frames cluster_message)
for t in "${targets[@]}"; do
  echo "== $t ($secs s)"
  # Committed seeds stay as they are; what the fuzzer finds goes to fuzz/corpus-run.
  mkdir -p "fuzz/corpus-run/$t"
  cp -n "fuzz/corpus/$t/"* "fuzz/corpus-run/$t/"
  RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus-run/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=4096
done
