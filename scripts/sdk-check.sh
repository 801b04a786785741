#!/usr/bin/env bash
# Starts mmserve on tiny fixture models (one chat model per family and an
# embedding one) and runs the official `openai` Python SDK against it
# (tests/sdk/openai_sdk_check.py), then a short load test
# (scripts/load_test.py, 8 streaming clients and 2 that hang up, 15 s) and a
# smoke run of the benchmark's load generator (bench/loadgen.py); then a
# second mmserve with a one-place queue for the SDK's retry of 429
# (tests/sdk/openai_backpressure_check.py). Installs the SDK into .venv-ci on
# first use.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/serve-lib.sh
venv_with openai "openai>=1.40"
port=${MMSERVE_SDK_PORT:-18437}

chat=(llava-clip-llama qwen2-vl-tiny idefics3-tiny)
embed=clip-tiny
args=()
for m in "${chat[@]}" "$embed"; do args+=(--model "tests/fixtures/models/$m"); done
serve "$port" "${args[@]}"
models=$(IFS=,; echo "${chat[*]}")
.venv-ci/bin/python tests/sdk/openai_sdk_check.py "http://127.0.0.1:$port" "$models" "$embed" tests/fixtures/images/cat.jpg
.venv-ci/bin/python scripts/load_test.py "http://127.0.0.1:$port" "$models" tests/fixtures/images/cat.jpg \
  --clients 8 --aborters 2 --duration 15 --pid "${pids[0]}"
# The benchmark's load generator for a few seconds (smoke test): every request gets exactly
# max_tokens through ignore_eos / min_tokens, or it exits 1.
.venv-ci/bin/python bench/loadgen.py "http://127.0.0.1:$port" idefics3-tiny --image tests/fixtures/images/cat.jpg \
  --concurrency 1,4 --rounds 1 --max-tokens 8 --pid "${pids[0]}"

printf '[engine]\nmax_num_seqs = 1\nmax_waiting = 1\n' >"$tmp/queue.toml"
serve $((port + 1)) --config "$tmp/queue.toml" --model tests/fixtures/models/qwen2-vl-tiny
.venv-ci/bin/python tests/sdk/openai_backpressure_check.py "http://127.0.0.1:$((port + 1))" qwen2-vl-tiny
