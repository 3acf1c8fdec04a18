#!/usr/bin/env bash
# Prints how vendor/candle-core/src differs from the crates.io release it
# patches (vendor/README.md): the only difference must be src/backprop.rs.
# Uses the registry's copy of candle-core 0.11.1 when cargo has one, else
# downloads the release from crates.io; a path argument names another copy.
set -euo pipefail
cd "$(dirname "$0")/.."
upstream="${1:-$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-0.11.1 2>/dev/null | head -1 || true)}"
if [ -z "$upstream" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    curl -sSfL https://static.crates.io/crates/candle-core/candle-core-0.11.1.crate | tar -xz -C "$tmp"
    upstream="$tmp/candle-core-0.11.1"
fi
if [ ! -d "$upstream/src" ]; then
    echo "no candle-core source at $upstream" >&2
    exit 2
fi
diff -ru "$upstream/src" vendor/candle-core/src || true
