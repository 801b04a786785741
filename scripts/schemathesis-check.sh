#!/usr/bin/env bash
# Property-based API testing: schemathesis generates requests from
# openapi.yaml (valid and invalid ones) against a live mmserve serving a tiny
# chat model and a tiny embedding model, and fails on any 5xx, an
# undocumented status, content type or header, or a body that breaks the
# spec's schema. tests/schemathesis/hooks.py makes most requests name a served
# model. Installs schemathesis into .venv-schemathesis on first use.
#
# SCHEMATHESIS_EXAMPLES (default 25 per operation and phase),
# SCHEMATHESIS_MAX_TIME (default 75 s: the run stops there) and
# SCHEMATHESIS_SEED (default 1; "random" for a new one) size and fix the run.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv-schemathesis/bin/python ] || python3 -m venv .venv-schemathesis
[ -x .venv-schemathesis/bin/schemathesis ] || .venv-schemathesis/bin/pip install -q "schemathesis==4.32.5"
cargo build --locked --bin mmserve
bin="${CARGO_TARGET_DIR:-target}/debug/mmserve"
port=${MMSERVE_SCHEMATHESIS_PORT:-18439}
tmp=$(mktemp -d)
"$bin" serve --model tests/fixtures/models/llava-clip-llama \
  --model tests/fixtures/models/clip-tiny --port "$port" >"$tmp/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$port/ready" >/dev/null; then break; fi
  if ! kill -0 $pid 2>/dev/null; then cat "$tmp/server.log"; exit 1; fi
  sleep 0.5
done

seed=${SCHEMATHESIS_SEED:-1}
seed_args=(--seed "$seed")
[ "$seed" = random ] && seed_args=()
spec="$PWD/openapi.yaml"
# Run from the temporary directory: hypothesis keeps its example database in
# the working directory.
cd "$tmp"
SCHEMATHESIS_HOOKS=hooks PYTHONPATH="$OLDPWD/tests/schemathesis" \
  "$OLDPWD/.venv-schemathesis/bin/schemathesis" run "$spec" \
  --url "http://127.0.0.1:$port" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,negative_data_rejection,unsupported_method,missing_required_header \
  --max-examples "${SCHEMATHESIS_EXAMPLES:-25}" "${seed_args[@]}" \
  --max-time "${SCHEMATHESIS_MAX_TIME:-75}" --request-timeout 60
if ! kill -0 $pid 2>/dev/null; then
  echo "mmserve died during the run:"; cat "$tmp/server.log"; exit 1
fi
