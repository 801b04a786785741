#!/usr/bin/env bash
# Batch-1 text decode speed of one model by weight format, side by side in one run
# (see bench/README.md, "Quantized and f16 decoding"):
#
#   bench/quantize.sh [MODEL]     # default: smolvlm-256m (its -1tile copy under bench/models)
#
# Runs the release mmserve once per setting (f32, f16, q8_0, q4k, q6k) under bench/loadgen.py
# (text, concurrency 1; q8_0 also at 16) and prints a markdown table with the load average
# next to each row. Expects the binary built (cargo build --release --bin mmserve) and the model
# made (bench/make_models.py). Then PAIRS (default 3) alternating f32 and q8_0 runs at
# concurrency 1, so that both sides of that ratio meet the same load (the machine's speed moves
# between minutes). Environment: PYTHON, THREADS, PORT, CARGO_TARGET_DIR as run.sh; PAIRS.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
threads=${THREADS:-$(nproc)}
port=${PORT:-18710}
model=${1:-smolvlm-256m}
pairs=${PAIRS:-3}
dir="bench/models/$model-1tile"
bin="${CARGO_TARGET_DIR:-target}/release/mmserve"
out="bench/out/quantize-$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$out"
cp "$bin" "$out/mmserve"
export RAYON_NUM_THREADS=$threads CANDLE_NUM_THREADS=$threads

. bench/serve.sh
rows=()
for setting in f32 f16 q8_0 q4k q6k; do
  case $setting in
    f32) flags=(--dtype f32) levels=1 ;;
    f16) flags=(--dtype f16) levels=1 ;;
    q8_0) flags=(--quantize q8_0) levels=1,16 ;;
    *) flags=(--quantize "$setting") levels=1 ;;
  esac
  start_mmserve "$out/$setting.log" --model "$dir" --served-model-name "$model" "${flags[@]}"
  load=$(cut -d' ' -f1 /proc/loadavg)
  "$py" bench/loadgen.py "http://127.0.0.1:$port" "$model" --kinds text --concurrency "$levels" \
    --pid "$server" --json "$out/$setting.json" >/dev/null
  load="$load-$(cut -d' ' -f1 /proc/loadavg)"
  stop_mmserve
  dense=$(grep -ao "kept_dense[^ ]*=[^ ]*[0-9]" "$out/$setting.log" | head -1 | grep -o "[0-9]*$" || true)
  rows+=("$setting|$load|${dense:--}")
done
for i in $(seq "$pairs"); do
  for setting in f32 q8_0; do
    case $setting in
      f32) flags=(--dtype f32) ;;
      *) flags=(--quantize "$setting") ;;
    esac
    start_mmserve "$out/pair$i-$setting.log" --model "$dir" --served-model-name "$model" "${flags[@]}"
    "$py" bench/loadgen.py "http://127.0.0.1:$port" "$model" --kinds text --concurrency 1 \
      --json "$out/pair$i-$setting.json" >/dev/null
    stop_mmserve
  done
done

"$py" - "$out" "${rows[@]}" <<'EOF'
import json, os, sys
out, rows = sys.argv[1], sys.argv[2:]
print("| weights | load avg (start-end) | projections kept dense | TPOT median ms, c=1 | decode tok/s, c=1 | vs f32 | aggregate tok/s, c=16 | peak RSS MB |")
print("|---|---|---|---|---|---|---|---|")
base = None
for row in rows:
    name, load, dense = row.split("|")
    levels = {lv["concurrency"]: lv for lv in json.load(open(f"{out}/{name}.json"))["levels"]}
    tps = 1000 / levels[1]["tpot_median_ms"]
    base = base or tps
    c16 = f"{levels[16]['output_tok_s']:.1f}" if 16 in levels else "—"
    rss = max(lv["peak_rss_mb"] or 0 for lv in levels.values())
    print(f"| {name} | {load} | {dense} | {levels[1]['tpot_median_ms']:.1f} | {tps:.1f} | {tps / base:.2f}× | {c16} | {rss:.0f} |")
tpot = lambda path: json.load(open(path))["levels"][0]["tpot_median_ms"]
pairs, i = [], 1
while all(os.path.exists(f"{out}/pair{i}-{s}.json") for s in ("f32", "q8_0")):
    pairs.append((tpot(f"{out}/pair{i}-f32.json"), tpot(f"{out}/pair{i}-q8_0.json")))
    i += 1
if pairs:
    ratios = sorted(f / q for f, q in pairs)
    each = ", ".join(f"{f / q:.2f}× ({q:.1f} vs {f:.1f} ms)" for f, q in pairs)
    print(f"\nq8_0 vs f32 batch-1 decode, {len(pairs)} alternating pairs: median {ratios[len(ratios) // 2]:.2f}× ({each})")
EOF
