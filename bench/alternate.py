#!/usr/bin/env python3
"""Batch-1 mmserve against transformers, one request each in turn, in one process.

    .venv/bin/python bench/alternate.py BASE_URL MODEL MODEL_DIR --image photo.jpg [--rounds 8]
        [--threads 2] [--kinds text,image] [--json out.json]

This machine's speed moves by tens of percent from one minute to the next, so a ratio of two
runs made minutes apart says as much about the minutes as about the servers. Here, for each
kind, ROUNDS rounds each send one streamed request to the server at BASE_URL (bench/loadgen.py's
request: MAX_TOKENS greedy tokens, EOS ignored) and then run the same prompt through transformers
(bench/hf_peer.py's batch-1 run), so the two measurements of a round are seconds apart. A pause
of PAUSE seconds before each lets the other side's threads go quiet (torch's OpenMP threads spin
a while after a call). After one unmeasured round per kind, it reports each round's TTFT and TPOT
of both sides, and the median over the rounds of mmserve's TTFT ÷ transformers' and of
transformers' TPOT ÷ mmserve's.

Every request gets a prompt number of its own, and every image a marker of its own (markers
FIRST, FIRST + 1, ... for mmserve and FIRST + 500000, ... for transformers), so no cache of
either side answers one request from another.
"""
import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_peer  # noqa: E402
from loadgen import distinct_images, httpx, one_request, request_body  # noqa: E402


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("model", help="the model name the server answers to")
    p.add_argument("model_dir", help="the same model as a Hugging Face directory, for transformers")
    p.add_argument("--image", required=True)
    p.add_argument("--kinds", default="text,image")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--first", type=int, default=20000)
    p.add_argument("--pause", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json")
    return p.parse_args()


async def ours(args, client, kind, n, image_url):
    """One streamed request to the server: {"ttft_s", "tpot_ms"}."""
    url = f"{args.base.rstrip('/')}/v1/chat/completions"
    ttft, tpot, tokens = await one_request(client, url, request_body(args, kind, n, image_url))
    if tokens != args.max_tokens:
        raise RuntimeError(f"the server returned {tokens} tokens, not {args.max_tokens}")
    return {"ttft_s": ttft, "tpot_ms": tpot * 1e3}


def theirs(args, peer, kind, n):
    """The same prompt through transformers at batch 1: {"ttft_s", "tpot_ms"}."""
    model, processor, base_image = peer
    r = hf_peer.run_once(model, processor, kind, 1, n, base_image, args.max_tokens)
    return {"ttft_s": r["ttft_s"], "tpot_ms": r["tpot_ms"]}


async def run(args, peer):
    rounds_out = []
    images = []
    if "image" in args.kinds.split(","):
        images, _ = distinct_images(args.image, args.rounds + 1, first=args.first)
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        for kind in args.kinds.split(","):
            for i in range(args.rounds + 1):  # round 0 warms both sides up
                n = args.first + i
                await asyncio.sleep(args.pause)
                a = await ours(args, client, kind, n, images[i] if kind == "image" else None)
                await asyncio.sleep(args.pause)
                b = theirs(args, peer, kind, n + 500000)
                if i == 0:
                    continue
                rounds_out.append({"kind": kind, "mmserve": a, "transformers": b})
                print(f"{kind:5} round {i}: TTFT {a['ttft_s']:.3f} vs {b['ttft_s']:.3f} s, "
                      f"TPOT {a['tpot_ms']:.1f} vs {b['tpot_ms']:.1f} ms (mmserve vs transformers)", flush=True)
    return rounds_out


def summary(rounds):
    """Per kind: the medians of mmserve's TTFT ÷ transformers' and transformers' TPOT ÷ mmserve's."""
    out = {}
    for kind in sorted({r["kind"] for r in rounds}):
        rs = [r for r in rounds if r["kind"] == kind]
        out[kind] = {
            "rounds": len(rs),
            "ttft_ratio_median": statistics.median(r["mmserve"]["ttft_s"] / r["transformers"]["ttft_s"] for r in rs),
            "tpot_speedup_median": statistics.median(r["transformers"]["tpot_ms"] / r["mmserve"]["tpot_ms"]
                                                     for r in rs),
        }
    return out


def main():
    args = parse()
    peer = hf_peer.load_peer(args.model_dir, args.image, args.threads)
    start = time.perf_counter()
    rounds = asyncio.run(run(args, peer))
    out = {"max_tokens": args.max_tokens, "pause_s": args.pause, "rounds": rounds, "summary": summary(rounds),
           "wall_s": time.perf_counter() - start}
    for kind, s in out["summary"].items():
        print(f"{kind:5} {s['rounds']} rounds, medians: TTFT mmserve ÷ transformers {s['ttft_ratio_median']:.2f}, "
              f"TPOT transformers ÷ mmserve {s['tpot_speedup_median']:.2f}×", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
