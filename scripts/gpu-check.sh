#!/usr/bin/env bash
# The one-command device check, for a lent GPU machine (one H100 or H200; Python with torch and
# transformers; no Rust toolchain, no network). It takes a binary built here by
# scripts/build-cuda.sh, which travels with the working tree (xz-compressed: about 15 MB).
#
#   MMSERVE_BIN=path/to/mmserve-cuda[.xz] scripts/gpu-check.sh [OUT]
#
# In OUT (default $OUT, else gpu-check-out/) it writes one JSON file per step, the server logs,
# and report.md:
#   1. the device's copy bandwidth (torch);
#   2. greedy parity of mmserve against transformers on the same device, on the tiny fixture
#      llava-clip-llama: f32 must be token-identical; bf16 may part where transformers' own
#      top-1/top-2 logit gap is within bf16's rounding (the gap is reported per case);
#   3. bench/loadgen.py against mmserve (text and one 512x512 image, 64 tokens, concurrency 1 and
#      16) and bench/hf_peer.py (transformers, batch 1 and 16) on random-weight models with real
#      configs: SmolVLM-256M (bench/make_models.py) and Qwen2-VL-2B (made here);
#   4. the table: TTFT, decode tok/s, aggregate tok/s, batch-1 bandwidth use (decoder weight bytes
#      x tok/s / measured bandwidth), mmserve next to transformers.
# Environment: DEVICE (cuda; `cpu` is the dry run of the same steps on a CPU), MODELS
# (smolvlm-256m,qwen2vl-2b), CONCURRENCY (1,16), HF_BATCHES (1,16), ROUNDS (2), PYTHON (python3).
# Designed to fit in 10 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check-out}}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
bin=${MMSERVE_BIN:-target/cuda/mmserve-cuda}
models=${MODELS:-smolvlm-256m,qwen2vl-2b}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true

if [[ "$bin" == *.xz ]]; then
  xz -dc "$bin" >"$out/mmserve"
  chmod +x "$out/mmserve"
  bin=$out/mmserve
fi
bin=$(realpath "$bin")
libs=$("$py" scripts/gpu_check.py libs)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
step() { echo "== $(date -u +%H:%M:%S) $*"; }
{
  [ "$device" != cuda ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$bin" --version
} | tee "$out/machine.txt"

step "bandwidth"
"$py" scripts/gpu_check.py bandwidth "$out" "$device"
step "parity"
"$py" scripts/gpu_check.py parity "$out" "$bin" "$device"
for m in ${models//,/ }; do
  step "model $m"
  case "$m" in
    smolvlm-256m)
      "$py" bench/make_models.py smolvlm-256m
      dir=bench/models/smolvlm-256m-1tile ;;
    qwen2vl-2b)
      dir=bench/models/qwen2vl-2b
      "$py" scripts/gpu_check.py make-qwen2vl-2b "$dir" "$device" ;;
    *) echo "unknown model $m" >&2; exit 2 ;;
  esac
  step "bench $m"
  "$py" scripts/gpu_check.py bench "$out" "$bin" "$device" "$dir" "$m"
done
step "report"
"$py" scripts/gpu_check.py table "$out"
