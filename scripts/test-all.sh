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
if [ ! -f tests/js/node_modules/.package-lock.json ] \
  || [ tests/js/package-lock.json -nt tests/js/node_modules/.package-lock.json ]; then
  echo "installing Node test clients (npm ci)"
  (cd tests/js && npm ci --silent --no-audit --no-fund)
fi

# The browser client: its protocol logic under Node's test runner, and its declarations
# type-checked against the API as applications use it.
node --test clients/js/test/
(cd tests/js && node_modules/.bin/tsc --noEmit --strict --target es2022 --module nodenext \
  --moduleResolution nodenext --lib es2022,dom client-types.ts)

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo build --workspace --all-targets --locked
cargo test --workspace --locked

# The decoders under libFuzzer from the committed seeds, 30 s per target: a decoder that
# panics or a frame parser that misbehaves on some input fails here.
./scripts/fuzz.sh 30
