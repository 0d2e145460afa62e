#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs what is missing first
# (Debian packages, Python and Node packages), then formatting, lints and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Independent clients used by the interop tests.
if ! python3 -c 'import websockets, aioquic' >/dev/null 2>&1; then
  echo "installing Python test clients (pip)"
  python3 -m pip install -q --disable-pip-version-check -r tests/interop/requirements.txt
fi
if [ -f tests/js/package-lock.json ] && [ ! -d tests/js/node_modules ]; then
  echo "installing Node test clients (npm ci)"
  (cd tests/js && npm ci --silent --no-audit --no-fund)
fi

# The browser client's protocol logic, under Node's test runner.
node --test clients/js/test/

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
