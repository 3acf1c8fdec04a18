#!/usr/bin/env bash
# Property-based fuzzing of `ensueno serve` from its own OpenAPI document
# (schemathesis: every operation, schema-valid and schema-violating inputs,
# stateful sequences). Small limits keep each generated job fast.
#
# Usage (from the repository root, after `cargo build -p ensueno-cli` and
# `/root/venvs/ensueno/bin/pip install schemathesis`):
#   scripts/server/schemathesis.sh [MAX_EXAMPLES]
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${ENSUENO_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/ensueno}"
st="${SCHEMATHESIS:-/root/venvs/ensueno/bin/schemathesis}"
data="$(mktemp -d)"
port=$((20000 + RANDOM % 20000))
"$bin" serve --model "$repo/crates/ensueno/tests/fixtures/pipeline/tiny-sd1" --data-dir "$data" \
  --port "$port" --max-width 64 --max-height 64 --max-steps 25 --max-batch 2 --max-queue 1000 \
  2> "$data/server.log" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$port/" > /dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$data/server.log"; echo "the server did not start ($bin)"; exit 1; }
  sleep 0.2
done
status=0
(cd "$data" && "$st" run "http://127.0.0.1:$port/openapi.json" --checks all \
  --max-examples "${1:-50}") || status=$?
if grep -qi panick "$data/server.log"; then echo "the server panicked"; status=1; fi
exit "$status"
