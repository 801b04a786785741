#!/usr/bin/env bash
# The whole comparison in one command (see bench/README.md):
#
#   bench/run.sh [MODEL...]        # default: smolvlm-256m; also smolvlm-500m
#
# Builds mmserve and the probe (release), makes the random-weight models if missing, then, in
# this order on a machine as quiet as possible: the candle probe (bandwidth, matmul), mmserve
# under bench/loadgen.py (text and image, concurrency 1, 4, 16; a repeated image; a repeated
# system prompt), ROUNDS batch-1 requests of each kind (text, one image) sent to mmserve and
# run through transformers in turn (bench/alternate.py), then transformers alone
# (bench/hf_peer.py, batch 1 and 8). Writes
# bench/out/<date>/ (the binaries measured, JSON per step, report.md) and prints the report.
# Environment: PYTHON (a venv with torch, transformers, Pillow and httpx; default .venv/bin/python),
# THREADS (default: every core), PORT (default 18700), ROUNDS (batch-1 requests of each kind in
# turn, default 8), CARGO_TARGET_DIR; the server reads its own MMSERVE_* variables, e.g.
# MMSERVE_VISION_MATMUL_PRECISION=high (recorded in the report).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
threads=${THREADS:-$(nproc)}
port=${PORT:-18700}
rounds=${ROUNDS:-8}
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smolvlm-256m)
target=${CARGO_TARGET_DIR:-target}
out="bench/out/$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$out"
export RAYON_NUM_THREADS=$threads CANDLE_NUM_THREADS=$threads OMP_NUM_THREADS=$threads

cargo build --release --locked --bin mmserve --example candle_probe
# Copies: what was measured, safe from a later build into the same target directory.
cp "$target/release/mmserve" "$target/release/examples/candle_probe" "$out/"
"$py" bench/make_models.py "${models[@]}"

load() { cut -d' ' -f1-3 /proc/loadavg; }
load_before=$(load)
echo "== probe"
"$out/candle_probe" >"$out/probe.json"

. bench/serve.sh
dirs="{}"
for m in "${models[@]}"; do
  dir="bench/models/$m-1tile"
  dirs=$("$py" -c 'import json,sys; d=json.loads(sys.argv[1]); d[sys.argv[2]]=sys.argv[3]; print(json.dumps(d))' \
    "$dirs" "$m" "$dir")
  echo "== mmserve $m"
  start_mmserve "$out/mmserve-$m.log" --model "$dir" --served-model-name "$m"
  "$py" bench/loadgen.py "http://127.0.0.1:$port" "$m" --image bench/models/photo-512.jpg --pid "$server" \
    --kinds text,image,repeat,prefix --json "$out/mmserve-$m.json"
  # Batch-1 text decode and one-image TTFT against transformers, one request each in turn
  # (bench/alternate.py: the two sides of a round are seconds apart, so both meet the same
  # load; the server idles, using no CPU, while transformers runs). Their prompts and image
  # markers (--first) are none the main run sent, so neither the image cache nor the prefix
  # cache answers them.
  echo "== mmserve and transformers in turn, batch 1, text and one image, $rounds rounds each"
  "$py" bench/alternate.py "http://127.0.0.1:$port" "$m" "$dir" --image bench/models/photo-512.jpg \
    --threads "$threads" --rounds "$rounds" --first 20000 --json "$out/alternate-$m.json" \
    2> >(grep -v -e Warning -e 'Loading weights' >&2)
  stop_mmserve
  echo "== transformers $m"
  "$py" bench/hf_peer.py "$dir" --image bench/models/photo-512.jpg --threads "$threads" --json "$out/hf-$m.json" \
    2> >(grep -v -e Warning -e 'Loading weights' >&2)
done

"$py" - "$out/meta.json" "$load_before" "$(load)" "$threads" "$dirs" "${models[@]}" <<'EOF'
import json, os, platform, subprocess, sys, datetime
path, before, after, threads, dirs, *models = sys.argv[1:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((int(l.split()[1]) // 2**20 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump({"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{cpu}, {subprocess.check_output(['nproc']).decode().strip()} cores, {mem} GiB, {platform.system()}",
           "commit": commit, "threads": int(threads), "load_before": before, "load_after": after,
           "vision_matmul_precision": os.environ.get("MMSERVE_VISION_MATMUL_PRECISION", "highest"),
           "models": models, "model_dirs": json.loads(dirs)}, open(path, "w"), indent=2)
EOF
"$py" bench/report.py "$out" | tee "$out/report.md"
