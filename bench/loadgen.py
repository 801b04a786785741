#!/usr/bin/env python3
"""Fixed-workload load generator for any OpenAI-compatible chat server (mmserve, vLLM, ...).

For each workload kind (text-only, or one image plus text) and each concurrency level C, C
closed-loop clients send streaming chat requests until ROUNDS x C requests (at least 4) are done.
Every request asks for exactly MAX_TOKENS greedy tokens with end-of-sequence ignored (vLLM's
`ignore_eos` and `min_tokens`, both sent). Per level it reports:

- TTFT: request sent to the first chunk carrying content (median, p99);
- TPOT: time per output token after the first, (finish - first) / (tokens - 1) (median);
- aggregate output tokens/s: completion tokens of the level / its wall time;
- peak RSS of the server process (PID, sampled from /proc every 50 ms), and its VmHWM, reset
  after the warm-up where /proc allows, so that it is the peak under load;
- from mmserve's /health, after the warm-up and after the load: the KV pool's blocks held by
  sequences and kept for the prefix cache (whose pages the load has touched).

A request that errs or returns another token count than asked is counted and makes the exit
status 1. Every prompt starts with its own request number, and with Pillow installed every image
gets a distinct marker, so no prefix or image cache can answer one request from another.

The `repeat` kind measures what an image cache saves, one request at a time: a request with an
image never sent before, then a second request with the same image (as a chat's next turn resends
it), TTFT of each, for max(ROUNDS, 3) pairs after one unmeasured pair. Its prompts start with their
own request number before the image, so a prefix cache cannot reuse the image's KV from the first
request: only its encoder output can be reused. Needs Pillow (for images no other request sends).

    python bench/loadgen.py BASE_URL MODEL --image photo.jpg [--pid PID] [--concurrency 1,4,16]
        [--kinds text,image,repeat,prefix] [--max-tokens 64] [--rounds 2] [--json out.json]

The `prefix` kind (not in the default set) measures a prefix cache: ROUNDS sessions, one after
the other, each a long system prompt of its own (about 900 words) asked two different questions
in turn; it reports the median TTFT of the first and of the second request.

Needs httpx (installed with the openai SDK, as httpx or httpx2); Pillow optional.
"""
import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time

try:  # newer openai SDKs ship httpx as `httpx2`
    import httpx2 as httpx
except ImportError:
    import httpx

TEXT = ("Here are some notes from a meeting about the spring garden project. The team agreed to plant "
        "tomatoes, beans and sunflowers along the south fence, to fix the water tank before April, and "
        "to ask the neighbours whether they want to share the compost. Summarise the notes in a short "
        "list, then suggest two more things the team should plan.")
IMAGE_TEXT = "Describe this image in detail: what is in it, the colours, and the mood."
SYSTEM = "You are the assistant of the garden cooperative. Its latest notes follow. " + " ".join([TEXT] * 12)
QUESTIONS = ("Which vegetables were chosen?", "What must be done before April?")


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base")
    p.add_argument("model")
    p.add_argument("--image", help="an image file for the image workload (512x512 in the benchmark)")
    p.add_argument("--kinds", default="text,image", help="text, image, repeat (comma-separated)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    p.add_argument("--pid", type=int, help="the server's process id, for its RSS")
    p.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    p.add_argument("--settle", type=float, default=3,
                   help="seconds to wait after the load before reading RSS (servers may trim when idle)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--first", type=int, default=0,
                   help="number of the first request and image marker: runs against one server use "
                        "disjoint ranges, so that no cache answers one from another")
    return p.parse_args()


def proc_kib(pid, key):
    """A `VmRSS:`-style field of /proc/PID/status in KiB, or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


async def kv_state(args, client):
    """The model's KV pool figures from mmserve's /health (blocks held by sequences, kept for
    the prefix cache, in all, and the pool's bytes), or None from a server without them."""
    try:
        r = await client.get(f"{args.base.rstrip('/')}/health")
        m = r.json()["models"][args.model]
        return {k: m[k] for k in ("kv_blocks_used", "kv_blocks_cached", "kv_blocks_total", "kv_cache_bytes")}
    except Exception:  # another server: no such figures
        return None


def reset_hwm(pid):
    """Resets the process's peak RSS (VmHWM) so that it counts from now; False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def marked(base, i, corner=False):
    """A copy of the PIL image `base` with an 8x8 marker of its own in the top-left corner, or
    with `corner` in the bottom-right one."""
    img = base.copy()
    x, y = (img.width - 8, img.height - 8) if corner else (0, 0)
    # One colour per i below 2**24: the image cache keys on exact pixels (PNG keeps them).
    img.paste((i % 256, i // 256 % 256, i // 65536 % 256), (x, y, x + 8, y + 8))
    return img


def distinct_images(path, count, corner=False, first=0):
    """`count` data URLs of the image, each with its own marker when Pillow is there (markers
    `first`, `first + 1`, ...; in the other corner with `corner`: a set of images distinct from
    the first)."""
    raw = open(path, "rb").read()
    try:
        from PIL import Image
    except ImportError:
        url = "data:image/jpeg;base64," + base64.b64encode(raw).decode()
        return [url] * count, False
    base = Image.open(io.BytesIO(raw)).convert("RGB")
    urls = []
    for i in range(first, first + count):
        img = marked(base, i, corner)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls, True


def repeat_body(args, n, image_url):
    """A request whose text before the image is its own, for the `repeat` kind."""
    content = [{"type": "text", "text": f"Request {n}. Look at this picture."},
               {"type": "image_url", "image_url": {"url": image_url}},
               {"type": "text", "text": IMAGE_TEXT}]
    return {"model": args.model, "messages": [{"role": "user", "content": content}],
            "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
            "min_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True}}


async def repeat_pairs(args, client, counter):
    """TTFT of a request with a new image, then of one with the same image again, pair by pair."""
    pairs = max(args.rounds, 3)
    images, distinct = distinct_images(args.image, pairs + 1, corner=True)
    if not distinct:
        sys.exit("the repeat workload needs Pillow (images no other request sends)")
    url = f"{args.base.rstrip('/')}/v1/chat/completions"
    first, again, errors = [], [], []
    for i, image in enumerate(images):
        try:
            ttft = [(await one_request(client, url, repeat_body(args, next(counter), image)))[0]
                    for _ in range(2)]
        except Exception as e:  # noqa: BLE001 - every failure is reported
            errors.append(f"{type(e).__name__}: {e}")
            continue
        if i > 0:  # the first pair warms up
            first.append(ttft[0])
            again.append(ttft[1])
    med = (lambda xs: statistics.median(xs) if xs else None)
    r = {"pairs": pairs, "errors": len(errors), "error_sample": errors[:3],
         "ttft_first_median_s": med(first), "ttft_repeat_median_s": med(again),
         "ttft_first_s": first, "ttft_repeat_s": again}
    print(f"repeat pairs={pairs} TTFT first med {r['ttft_first_median_s'] or 0:7.3f} s  "
          f"repeat med {r['ttft_repeat_median_s'] or 0:7.3f} s  errors {len(errors)}", flush=True)
    return r


def request_body(args, kind, n, image_url):
    text = f"Request {n}. " + (IMAGE_TEXT if kind == "image" else TEXT)
    content = [{"type": "text", "text": text}]
    if kind == "image":
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"model": args.model, "messages": [{"role": "user", "content": content}],
            "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
            "min_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True}}


def prefix_body(args, session, question):
    messages = [{"role": "system", "content": f"Session {session}. {SYSTEM}"},
                {"role": "user", "content": question}]
    return {"model": args.model, "messages": messages, "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True, "min_tokens": args.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}


async def prefix_sessions(args, client, counter):
    """ROUNDS sessions in turn, each a system prompt of its own asked two questions."""
    url = f"{args.base.rstrip('/')}/v1/chat/completions"
    first, second, errors = [], [], []
    for _ in range(args.rounds):
        session = next(counter)
        try:
            for question, into in zip(QUESTIONS, (first, second)):
                into.append((await one_request(client, url, prefix_body(args, session, question)))[0])
        except Exception as e:  # noqa: BLE001 - every failure is reported
            errors.append(f"{type(e).__name__}: {e}")
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return {"kind": "prefix", "concurrency": 1, "requests": 2 * args.rounds, "errors": len(errors),
            "error_sample": errors[:3], "wrong_token_count": 0,
            "ttft_first_median_s": med(first), "ttft_second_median_s": med(second),
            "ttft_first_s": first, "ttft_second_s": second}


async def one_request(client, url, body):
    """Streams one request; returns (ttft, tpot, completion tokens) in seconds."""
    sent = time.perf_counter()
    first = done = None
    tokens = 0
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                if first is None and (choice.get("delta") or {}).get("content"):
                    first = time.perf_counter()
                if choice.get("finish_reason"):
                    done = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if first is None or done is None:
        raise RuntimeError("the stream carried no content or no finish_reason")
    return first - sent, (done - first) / max(tokens - 1, 1), tokens


async def sample_rss(pid, peak, stop):
    while not stop.is_set():
        rss = proc_kib(pid, "VmRSS:")
        if rss:
            peak[0] = max(peak[0], rss)
        await asyncio.sleep(0.05)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def level(args, client, kind, conc, images, counter):
    total = max(args.rounds * conc, 4)
    url = f"{args.base.rstrip('/')}/v1/chat/completions"
    results, errors = [], []
    queue = list(range(total))
    peak, stop = [0], asyncio.Event()
    sampler = asyncio.create_task(sample_rss(args.pid, peak, stop))

    async def client_loop():
        while queue:
            queue.pop()
            n = next(counter)
            body = request_body(args, kind, n, images[n % len(images)] if images else None)
            try:
                results.append(await one_request(client, url, body))
            except Exception as e:  # noqa: BLE001 - every failure is reported
                errors.append(f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(conc)))
    wall = time.perf_counter() - start
    stop.set()
    await sampler
    ttft = [r[0] for r in results]
    short = sum(1 for r in results if r[2] != args.max_tokens)
    return {
        "kind": kind, "concurrency": conc, "requests": total, "errors": len(errors), "error_sample": errors[:3],
        "wrong_token_count": short, "wall_s": wall,
        "ttft_median_s": statistics.median(ttft) if ttft else None,
        "ttft_p99_s": pct(ttft, 0.99) if ttft else None,
        "tpot_median_ms": statistics.median(r[1] for r in results) * 1e3 if results else None,
        "output_tok_s": sum(r[2] for r in results) / wall,
        "peak_rss_mb": peak[0] / 1024 if peak[0] else None,
    }


async def run(args):
    kinds = args.kinds.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    counter = iter(range(args.first, 10**9))
    images, distinct = [], False
    if "image" in kinds:
        if not args.image:
            sys.exit("--image is needed for the image workload")
        images, distinct = distinct_images(args.image, 2 * max(levels) * args.rounds + 8, first=args.first)
    if "repeat" in kinds and not args.image:
        sys.exit("--image is needed for the repeat workload")
    out = {"base": args.base, "model": args.model, "max_tokens": args.max_tokens,
           "distinct_images": distinct, "rss_after_load_mb": None, "levels": []}
    limits = httpx.Limits(max_connections=max(levels) + 4)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        for kind in kinds:
            if kind == "prefix":
                r = out["prefix"] = await prefix_sessions(args, client, counter)
                print(f"prefix sessions={args.rounds} TTFT med first {r['ttft_first_median_s'] or 0:7.3f} s "
                      f"second {r['ttft_second_median_s'] or 0:7.3f} s  errors {r['errors']}", flush=True)
                continue
            if kind == "repeat":
                out["repeat"] = await repeat_pairs(args, client, counter)
                continue
            # Warm-up: one request of the kind, not measured.
            n = next(counter)
            url = f"{args.base.rstrip('/')}/v1/chat/completions"
            await one_request(client, url, request_body(args, kind, n, images[n % len(images)] if images else None))
            if "rss_after_warmup_mb" not in out:
                rss = proc_kib(args.pid, "VmRSS:")
                out["rss_after_warmup_mb"] = rss / 1024 if rss else None
                out["kv_after_warmup"] = await kv_state(args, client)
                out["hwm_reset_after_warmup"] = args.pid is not None and reset_hwm(args.pid)
            for conc in levels:
                r = await level(args, client, kind, conc, images, counter)
                out["levels"].append(r)
                print(f"{kind:5} c={conc:<3} n={r['requests']:<3} TTFT med {r['ttft_median_s'] or 0:7.3f} s "
                      f"p99 {r['ttft_p99_s'] or 0:7.3f} s  TPOT {r['tpot_median_ms'] or 0:7.1f} ms  "
                      f"{r['output_tok_s']:7.1f} tok/s  peak RSS {r['peak_rss_mb'] or 0:7.0f} MB  "
                      f"errors {r['errors']} wrong-length {r['wrong_token_count']}", flush=True)
        await asyncio.sleep(args.settle)
        out["kv_after_load"] = await kv_state(args, client)
    rss, hwm = proc_kib(args.pid, "VmRSS:"), proc_kib(args.pid, "VmHWM:")
    out["rss_after_load_mb"] = rss / 1024 if rss else None
    out["vm_hwm_mb"] = hwm / 1024 if hwm else None
    return out


def main():
    args = parse()
    out = asyncio.run(run(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    bad = [lv for lv in out["levels"] if lv["errors"] or lv["wrong_token_count"]]
    if out.get("repeat", {}).get("errors"):
        print(f"FAILED repeat: {out['repeat']['error_sample']}", file=sys.stderr)
        bad.append(out["repeat"])
    if out.get("prefix", {}).get("errors"):
        print(f"FAILED prefix: {out['prefix']['error_sample']}", file=sys.stderr)
        bad.append(out["prefix"])
    for lv in bad:
        print(f"FAILED {lv['kind']} c={lv['concurrency']}: {lv['errors']} errors {lv['error_sample']}, "
              f"{lv['wrong_token_count']} with another token count than {args.max_tokens}", file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
