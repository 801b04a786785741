#!/usr/bin/env bash
# Starts mmserve on tiny fixture models (one chat model per family and an embedding one) and runs the official `openai` Python
# SDK against it (tests/sdk/openai_sdk_check.py). Installs the SDK into
# .venv-ci on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv-ci/bin/python ]; then
  python3 -m venv .venv-ci
  .venv-ci/bin/pip install -q "openai>=1.40"
fi
cargo build --locked --bin mmserve
port=${MMSERVE_SDK_PORT:-18437}
chat=(llava-clip-llama qwen2-vl-tiny idefics3-tiny)
embed=clip-tiny
args=()
for m in "${chat[@]}" "$embed"; do args+=(--model "tests/fixtures/models/$m"); done
log=$(mktemp)
"${CARGO_TARGET_DIR:-target}/debug/mmserve" serve "${args[@]}" --port "$port" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$port/health" >/dev/null; then break; fi
  if ! kill -0 $pid 2>/dev/null; then cat "$log"; exit 1; fi
  sleep 0.5
done
.venv-ci/bin/python tests/sdk/openai_sdk_check.py "http://127.0.0.1:$port" "$(IFS=,; echo "${chat[*]}")" "$embed" tests/fixtures/images/cat.jpg
