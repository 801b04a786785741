"""Evaluates the demo models through mmserve's HTTP API on held-out scenes.

    mmserve &                                   # serves the embedded demo models
    python scripts/demo/evaluate.py --scenes 500 --report models/demo/training/eval_http.json

For each held-out scene (seeds training never draws) and each image variant (the native PNG, and
the scene resized to 300x220 and saved as JPEG q75), it asks the chat model for a caption and one
question of each type (colour, count, shape, position) with greedy decoding, and asks the embedding
model to pick the scene's caption among 10 (zero-shot retrieval). Prints and writes the accuracies.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import heldout  # noqa: E402
import scenes  # noqa: E402


def post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def data_url(case: heldout.Case, variant: str) -> str:
    return f"data:{case.mime[variant]};base64," + base64.b64encode(case.images[variant]).decode()


def ask(base: str, model: str, case: heldout.Case, variant: str, kind: str, question: str, want: str) -> dict:
    body = {
        "model": model,
        "temperature": 0,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(case, variant)}},
            {"type": "text", "text": question},
        ]}],
    }
    got = post(base, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    ok = got.strip() == want if kind == "caption" else heldout.normalize_answer(got) == want
    return {"seed": case.seed, "variant": variant, "type": kind, "question": question, "want": want, "got": got, "ok": ok}


def embed(base: str, model: str, inputs: list) -> np.ndarray:
    data = post(base, "/v1/embeddings", {"model": model, "input": inputs})["data"]
    return np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])])


def retrieval(base: str, model: str, cases: list[heldout.Case], variant: str) -> dict:
    captions = [c.caption for c in cases]
    text = np.concatenate([embed(base, model, captions[i:i + 64]) for i in range(0, len(captions), 64)])
    hits = 0
    for s in range(0, len(cases), 32):
        chunk = cases[s:s + 32]
        images = embed(base, model, [{"type": "image_url", "image_url": {"url": data_url(c, variant)}} for c in chunk])
        for k, c in enumerate(chunk):
            i = s + k
            cand = [i] + heldout.distractors(len(cases), i, captions)
            hits += int(np.argmax(text[cand] @ images[k]) == 0)
    return {"accuracy": round(hits / len(cases), 4), "n": len(cases)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--chat-model", default="mmserve-demo")
    ap.add_argument("--embedding-model", default="mmserve-demo-clip")
    ap.add_argument("--scenes", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--report", type=Path, default=None)
    args = ap.parse_args()

    cases = heldout.cases(args.scenes)
    jobs = []
    for case in cases:
        for variant in heldout.VARIANTS:
            jobs.append((case, variant, "caption", scenes.CAPTION_PROMPT, case.caption))
            jobs += [(case, variant, t, q, a) for t, q, a in case.questions]
    with ThreadPoolExecutor(args.concurrency) as pool:
        rows = list(pool.map(lambda j: ask(args.url, args.chat_model, *j), jobs))
    report = heldout.score(rows)
    for variant in heldout.VARIANTS:
        report[variant]["clip_retrieval_top1_of_10"] = retrieval(args.url, args.embedding_model, cases, variant)
    report["drop_native_to_jpeg_points"] = {
        t: round(100 * (report["native"][t]["accuracy"] - report["jpeg"][t]["accuracy"]), 2) for t in report["native"]
    }
    report["failures"] = [r for r in rows if not r["ok"]][:40]
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")


if __name__ == "__main__":
    main()
