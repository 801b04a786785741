#!/usr/bin/env python3
"""Turns one benchmark run (bench/out/<run>/*.json, written by bench/run.sh) into a markdown report.

    python bench/report.py bench/out/<run> > bench/out/<run>/report.md

Tables: mmserve per workload and concurrency, transformers per workload and batch, the probe's
bandwidth and matmul figures, and the issue's targets as fractions of what was measured in the
same run. The batch-1 decode bound is the read bandwidth divided by the bytes a decode step must
read: the decoder's weights (layers, final norm, lm_head; not the embedding table, of which a
step reads one row), from the checkpoint's safetensors header.
"""
import json
import struct
import sys
from pathlib import Path

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def load(path):
    return json.loads(Path(path).read_text())


def decoder_bytes(model_dir):
    """Bytes of the tensors one batch-1 decode step reads, from the safetensors header."""
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, t in header.items():
            if key == "__metadata__" or "vision" in key or "connector" in key or "embed_tokens" in key:
                continue
            size = DTYPE_BYTES[t["dtype"]]
            for d in t["shape"]:
                size *= d
            total += size
    return total


def vision_gflop_per_tile(config):
    """Matmul GFLOP of the vision tower and connector for one tile (2 per multiply-add)."""
    v = config["vision_config"]
    d, ff, layers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    p = (v["image_size"] // v["patch_size"]) ** 2
    per_layer = 2 * p * d * (4 * d + 2 * ff) + 2 * 2 * p * p * d
    patch = 2 * p * d * 3 * v["patch_size"] ** 2
    s = config.get("scale_factor", 1)
    connector = 2 * (p // s**2) * d * s**2 * config["text_config"]["hidden_size"]
    return (layers * per_layer + patch + connector) / 1e9


def fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def find(rows, **kw):
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)


def main():
    run = Path(sys.argv[1])
    meta, probe = load(run / "meta.json"), load(run / "probe.json")
    lines = [f"Run {meta['date']} on {meta['machine']}; mmserve {meta['commit']}; threads {meta['threads']}; "
             f"load average before {meta['load_before']}, after {meta['load_after']}; "
             f"vision_matmul_precision {meta.get('vision_matmul_precision', 'highest')}.", ""]
    mat = {(r["m"], r["k"], r["n"], r["dtype"]): r for r in probe["matmul"]}
    enc_rate = mat[(1024, 768, 3072, "f32")]["gflops"]
    fetching = (f", 2 MiB pages prefetched as one stream {probe['read_huge_fetching_gbs']:.1f}"
                if "read_huge_fetching_gbs" in probe else "")
    fetching += (f", 2 MiB pages 4 rows at a time as the decode kernel reads {probe['read_huge_blocks_gbs']:.1f}"
                 if "read_huge_blocks_gbs" in probe else "")
    pages = (f" (4 KiB pages {probe['read_4k_gbs']:.1f}, 2 MiB pages {probe['read_huge_gbs']:.1f}{fetching}: "
             "the fastest is the ceiling)") if "read_huge_gbs" in probe else ""
    lines += ["**Probe** (candle, same session): read "
              f"{probe['read_gbs']:.1f} GB/s{pages}, copy {probe['copy_gbs']:.1f} GB/s (read + write).", "",
              "| Linear shape (m×k @ (n×k)ᵀ) | f32 ms | f32 GFLOP/s | f16 ms | f16 GFLOP/s "
              "| mmserve small-m f32 ms | GB/s of weights |", "|---|---|---|---|---|---|---|"]
    for r in probe["matmul"]:
        if r["dtype"] != "f32":
            continue
        h = mat[(r["m"], r["k"], r["n"], "f16")]
        s = mat.get((r["m"], r["k"], r["n"], "f32 small-m"))
        small = f"{s['ms']:.3f} | {s['weight_gbs']:.1f}" if s else "— | —"
        lines.append(f"| {r['what']}: {r['m']}×{r['k']} @ {r['n']}×{r['k']} | {r['ms']:.3f} | {r['gflops']:.1f} "
                     f"| {h['ms']:.3f} | {h['gflops']:.1f} | {small} |")
    for model in meta["models"]:
        ms, hf = load(run / f"mmserve-{model}.json"), load(run / f"hf-{model}.json")
        config = load(Path(meta["model_dirs"][model]) / "config.json")
        wbytes = decoder_bytes(meta["model_dirs"][model])
        bound = probe["read_gbs"] * 1e9 / wbytes
        lines += ["", f"### {model} (f32, 512×512 image as one 512 px tile, {ms['max_tokens']} output tokens, "
                  "EOS ignored)", "",
                  "| workload | server | concurrency / batch | TTFT median (s) | TTFT p99 (s) | TPOT median (ms) | "
                  "output tok/s | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|"]
        for lv in ms["levels"]:
            lines.append(f"| {lv['kind']} | mmserve | {lv['concurrency']} | {fmt(lv['ttft_median_s'])} | "
                         f"{fmt(lv['ttft_p99_s'])} | {fmt(lv['tpot_median_ms'], '.1f')} | "
                         f"{lv['output_tok_s']:.1f} | {fmt(lv['peak_rss_mb'], '.0f')} |")
        for r in hf["runs"]:
            lines.append(f"| {r['kind']} | transformers | batch {r['batch']} | {r['ttft_s']:.2f} | — | "
                         f"{r['tpot_ms']:.1f} | {r['output_tok_s']:.1f} | {fmt(r['peak_rss_mb'], '.0f')} |")
        lines += ["", *targets(ms, hf, bound, wbytes, vision_gflop_per_tile(config), enc_rate,
                               pairs(run, model))]
    print("\n".join(lines))


def pairs(run, model):
    """The batch-1 comparisons made in turn, as (how, [{"text": (mmserve TPOT ms, transformers
    TPOT ms)} or {"image": (mmserve TTFT s, transformers TTFT s)}, ...]): bench/alternate.py's
    rounds, one request each, or in older runs the alternating pairs of whole runs."""
    alt = run / f"alternate-{model}.json"
    if alt.exists():
        out = []
        for r in load(alt)["rounds"]:
            key = "tpot_ms" if r["kind"] == "text" else "ttft_s"
            out.append({r["kind"]: (r["mmserve"][key], r["transformers"][key])})
        return "rounds of one request each in turn", out
    out, i = [], 1
    while (run / f"pair{i}-mmserve-{model}.json").exists() and (run / f"pair{i}-hf-{model}.json").exists():
        mm = load(run / f"pair{i}-mmserve-{model}.json")["levels"]
        hf = load(run / f"pair{i}-hf-{model}.json")["runs"]
        pair = {}
        for kind, ours, theirs in (("text", "tpot_median_ms", "tpot_ms"), ("image", "ttft_median_s", "ttft_s")):
            a, b = find(mm, kind=kind, concurrency=1), find(hf, kind=kind, batch=1)
            if a and b:
                pair[kind] = (a[ours], b[theirs])
        out.append(pair)
        i += 1
    return "alternating pairs", out


def targets(ms, hf, bound, wbytes, tile_gflop, enc_rate, paired=("", ())):
    lv = {(x["kind"], x["concurrency"]): x for x in ms["levels"]}
    t1, t16 = lv.get(("text", 1)), lv.get(("text", 16))
    i1, i4 = lv.get(("image", 1)), lv.get(("image", 4))
    h1, h8 = find(hf["runs"], kind="text", batch=1), find(hf["runs"], kind="text", batch=8)
    hi1 = find(hf["runs"], kind="image", batch=1)
    out = ["| target (issue 6) | measured | goal |", "|---|---|---|"]

    def row(name, value, goal):
        out.append(f"| {name} | {value} | {goal} |")

    if t1:
        dec = 1000 / t1["tpot_median_ms"]
        row("batch-1 text decode vs the bandwidth bound "
            f"({bound:.1f} tok/s = read GB/s ÷ {wbytes / 1e6:.0f} MB)", f"{dec:.1f} tok/s = {dec / bound:.0%}", "≥ 75%")
        if h1:
            row("batch-1 text decode vs transformers", f"{dec / (1000 / h1['tpot_ms']):.2f}×", "≥ 2×")
    def paired_row(kind, ratio, shown, name, goal):
        """A row of the alternating pairs of `kind`: the median `ratio(ours, theirs)`, then each."""
        how, rounds = paired
        both = [p[kind] for p in rounds if kind in p]
        if both:
            ratios = sorted(ratio(a, b) for a, b in both)
            median = (ratios[(len(ratios) - 1) // 2] + ratios[len(ratios) // 2]) / 2
            row(f"{name}, {len(both)} {how} (median; each: mmserve vs transformers)",
                f"{median:.2f}: " + ", ".join(shown(a, b) for a, b in both), goal)

    paired_row("text", lambda m, h: h / m, lambda m, h: f"{h / m:.2f}× ({m:.1f} vs {h:.1f} ms TPOT)",
               "batch-1 text decode vs transformers (×)", "≥ 2×")
    paired_row("image", lambda m, h: m / h, lambda m, h: f"{m / h:.2f} ({m:.2f} vs {h:.2f} s)",
               "TTFT one image vs transformers (mmserve ÷ transformers)", "≤ 1")
    if t1 and t16:
        row("aggregate tok/s, 16 text streams vs 1", f"{t16['output_tok_s'] / t1['output_tok_s']:.2f}×", "≥ 4×")
        if h8:
            row("aggregate tok/s, 16 text streams vs transformers batch 8",
                f"{t16['output_tok_s'] / h8['output_tok_s']:.2f}×", "≥ 2×")
    if i1 and hi1:
        row("TTFT one image vs transformers", f"{i1['ttft_median_s']:.2f} s vs {hi1['ttft_s']:.2f} s", "no worse")
    if i1 and t1:
        enc = i1["ttft_median_s"] - t1["ttft_median_s"]
        if enc > 0:
            rate = tile_gflop / enc
            row(f"vision encoder rate, estimated: {tile_gflop:.0f} GFLOP per tile ÷ (TTFT image − TTFT text)",
                f"{rate:.0f} GFLOP/s = {rate / enc_rate:.0%} of the probe's f32 1024×768×3072", "≥ 50%")
    if i1 and i4:
        row("median TTFT, 4 concurrent images vs 1", f"{i4['ttft_median_s'] / i1['ttft_median_s']:.2f}×", "≤ 2.5×")
    rep = ms.get("repeat") or {}
    if rep.get("ttft_first_median_s") and rep.get("ttft_repeat_median_s"):
        a, b = rep["ttft_first_median_s"], rep["ttft_repeat_median_s"]
        row(f"TTFT of a repeated image vs its first request (median of {rep['pairs']} pairs)",
            f"{b:.2f} s vs {a:.2f} s = {b / a:.2f}", "≤ 0.5")
    pre = ms.get("prefix") or {}
    if pre.get("ttft_first_median_s") and pre.get("ttft_second_median_s"):
        a, b = pre["ttft_first_median_s"], pre["ttft_second_median_s"]
        row("TTFT of a second question on the same long system prompt vs the first (prefix cache)",
            f"{b:.2f} s vs {a:.2f} s = {b / a:.2f}", "recomputes only the question")
    kv1 = ms.get("kv_after_load")
    if kv1:
        row("KV blocks held by sequences after the load (mmserve's /health)", f"{kv1['kv_blocks_used']}", "0")
    r0, r1 = ms.get("rss_after_warmup_mb"), ms.get("rss_after_load_mb")
    if r0 and r1:
        row("RSS after the load vs after warm-up", f"{r1:.0f} MB vs {r0:.0f} MB ({r1 / r0 - 1:+.0%})", "within 10%")
    return out


if __name__ == "__main__":
    main()
