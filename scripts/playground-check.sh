#!/usr/bin/env bash
# Starts mmserve on its embedded demo models and drives the playground page at / in headless
# Chromium (tests/browser/playground_check.py): upload an example image, ask "Describe the
# image.", and see the streamed caption; rank the examples on the embeddings tab. About half a
# minute. Installs Playwright (the Python package; it drives Debian's chromium, no browser
# download) into .venv-ci on first use. --screenshot PNG saves the page after the answer.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-ci
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c 'import playwright' 2>/dev/null || "$venv/bin/pip" install -q "playwright==1.65.2"
cargo build --locked --bin mmserve
bin="${CARGO_TARGET_DIR:-target}/debug/mmserve"
port=${MMSERVE_PLAYGROUND_PORT:-18447}
tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$tmp"' EXIT
source scripts/serve-lib.sh

serve "$port"
timeout 180 "$venv/bin/python" tests/browser/playground_check.py "http://127.0.0.1:$port" models/demo/examples "$@"
