#!/usr/bin/env python3
"""The reference peer: the benchmark's model and prompts through transformers, batch 1 and 8.

    .venv/bin/python bench/hf_peer.py MODEL_DIR --image photo.jpg [--threads 2] [--json out.json]

Same prompts as bench/loadgen.py (text, and one image plus text, each prompt numbered, each image
marked), greedy, exactly MAX_TOKENS new tokens (`min_new_tokens`), f32 on the CPU by default
(`--device cuda --dtype bfloat16` for scripts/gpu-check.sh), torch on THREADS threads.
For each kind and batch size it reports TTFT (from the processor call to the first new token,
so image preprocessing counts as it does for a server), time per output token after the first,
aggregate output tokens/s (batch x tokens / wall time) and the process's peak RSS during the
runs (VmHWM reset after loading). Batch 1 is the median of three runs after a warm-up.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from loadgen import IMAGE_TEXT, TEXT, marked, proc_kib, reset_hwm  # noqa: E402


class Clock(BaseStreamer):
    """Records when generate hands out each step's tokens (the first call is the prompt)."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(time.perf_counter())

    def end(self):
        pass


def conversations(kind, batch, start, base_image):
    convs, images = [], []
    for n in range(start, start + batch):
        text = f"Request {n}. " + (IMAGE_TEXT if kind == "image" else TEXT)
        content = [{"type": "text", "text": text}]
        if kind == "image":
            content.insert(0, {"type": "image"})
            images.append([marked(base_image, n)])
        convs.append([{"role": "user", "content": content}])
    return convs, images or None


def run_once(model, processor, kind, batch, start, base_image, max_tokens):
    convs, images = conversations(kind, batch, start, base_image)
    t0 = time.perf_counter()
    prompts = processor.apply_chat_template(convs, add_generation_prompt=True)
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True).to(model.device)
    clock = Clock()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, streamer=clock)
    end = time.perf_counter()
    new = out.shape[1] - inputs["input_ids"].shape[1]
    steps = clock.calls[1:]  # after the prompt
    return {"ttft_s": steps[0] - t0, "tpot_ms": (steps[-1] - steps[0]) / max(new - 1, 1) * 1e3,
            "output_tok_s": batch * new / (end - t0), "new_tokens": new,
            "prompt_tokens": int(inputs["input_ids"].shape[1])}


def load_peer(model_dir, image, threads=None, device="cpu", dtype="float32"):
    """(model, processor, base image) for `run_once`, torch on `threads` threads (default: every
    core)."""
    torch.set_num_threads(threads or os.cpu_count())
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    return model, processor, Image.open(image).convert("RGB")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--image", required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--kinds", default="text,image")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (scripts/gpu-check.sh)")
    p.add_argument("--dtype", default="float32", help="float32, or bfloat16 on a GPU")
    p.add_argument("--json")
    args = p.parse_args()
    model, processor, base_image = load_peer(args.model_dir, args.image, args.threads, args.device, args.dtype)
    runs, n = [], 0
    for kind in args.kinds.split(","):
        run_once(model, processor, kind, 1, 10**6, base_image, 2)  # warm-up
        reset_hwm(os.getpid())
        for batch in [int(b) for b in args.batches.split(",")]:
            reps = []
            for _ in range(3 if batch == 1 else 1):
                reps.append(run_once(model, processor, kind, batch, n, base_image, args.max_tokens))
                n += batch
            r = {k: statistics.median(x[k] for x in reps) for k in reps[0]}
            hwm = proc_kib(os.getpid(), "VmHWM:")
            r.update(kind=kind, batch=batch, peak_rss_mb=hwm / 1024 if hwm else None)
            runs.append(r)
            print(f"transformers {kind:5} batch {batch}: TTFT {r['ttft_s']:7.3f} s  TPOT {r['tpot_ms']:7.1f} ms  "
                  f"{r['output_tok_s']:7.1f} tok/s  prompt {r['prompt_tokens']} tokens  "
                  f"peak RSS {r['peak_rss_mb'] or 0:7.0f} MB", flush=True)
    out = {"threads": args.threads, "torch": torch.__version__, "device": args.device,
           "dtype": args.dtype, "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
