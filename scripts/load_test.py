"""Bounded loopback load test for a running mmserve.

CLIENTS concurrent streaming clients send chat requests (text, some with an
image) for DURATION seconds; ABORTERS more clients hang up after a few chunks.
Checks that every completed stream is well-formed (chunks in OpenAI's shape, a
finish_reason, then [DONE]), that no request errs or hangs, that every model's
queue, running and KV cache figures in /health return to zero, and that the
server's RSS returns near its baseline. Prints the figures; exits non-zero on a
failure.

Usage: python scripts/load_test.py BASE_URL MODELS IMAGE_FILE [--clients 64]
       [--aborters 8] [--duration 120] [--pid PID] [--rss-slack-mb 256]
MODELS is a comma-separated list of chat models; PID (the server's) enables
the RSS check. Needs httpx (installed with the openai SDK, as httpx or httpx2).
"""
import argparse
import asyncio
import base64
import json
import random
import statistics
import sys
import time

try:  # newer openai SDKs ship httpx as `httpx2`
    import httpx2 as httpx
except ImportError:
    import httpx

PROMPTS = ["hi", "hello", "tell me a story", "x", "What is in this image?", "describe it"]


def args():
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("models")
    p.add_argument("image")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--aborters", type=int, default=8)
    p.add_argument("--duration", type=float, default=120)
    p.add_argument("--pid", type=int)
    p.add_argument("--rss-slack-mb", type=float, default=256)
    p.add_argument("--timeout", type=float, default=120, help="per request, seconds")
    return p.parse_args()


def rss_mb(pid):
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


class Stats:
    def __init__(self):
        self.ok = 0
        self.aborted = 0
        self.busy = 0  # 429: allowed, counted
        self.errors = []
        self.latencies = []
        self.first_token = []


def body(rng, models, image_url):
    content = rng.choice(PROMPTS)
    if rng.random() < 0.3:
        content = [{"type": "image_url", "image_url": {"url": image_url}},
                   {"type": "text", "text": content}]
    return {"model": rng.choice(models), "stream": True, "temperature": rng.choice([0, 0.8]),
            "max_tokens": rng.randint(8, 128),
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": content}]}


def check_chunk(chunk, req):
    """One `chat.completion.chunk` in OpenAI's shape; returns its finish_reason."""
    assert chunk.get("object") == "chat.completion.chunk", chunk
    assert chunk.get("id", "").startswith("chatcmpl-"), chunk
    assert chunk.get("model") == req["model"], chunk
    finish = None
    for c in chunk["choices"]:
        assert c["index"] == 0, chunk
        finish = c.get("finish_reason") or finish
    if not chunk["choices"]:
        assert chunk["usage"]["completion_tokens"] <= req["max_tokens"], chunk
    return finish


async def sse_data(resp):
    """The `data:` payloads of an SSE response. Events end with a blank line;
    the bytes are split here, as aiter_lines() would also split at U+2028 or
    U+0085 inside the JSON."""
    buf = b""
    async for part in resp.aiter_bytes():
        buf += part
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            line = event.decode()
            assert line.startswith("data: "), line
            yield line[len("data: "):]
    assert not buf.strip(), f"trailing bytes: {buf[:100]!r}"


async def one_request(client, req, stats, abort_after=None):
    """Sends one streaming request; with abort_after, hangs up after that many chunks."""
    start = time.monotonic()
    first = None
    finish, done, n = None, False, 0
    async with client.stream("POST", "/v1/chat/completions", json=req) as resp:
        if resp.status_code == 429:
            stats.busy += 1
            await asyncio.sleep(float(resp.headers.get("retry-after", "1")))
            return
        if resp.status_code != 200:
            stats.errors.append(f"status {resp.status_code}: {(await resp.aread())[:200]!r}")
            return
        async for data in sse_data(resp):
            assert not done, "data after [DONE]"
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                stats.errors.append(f"stream error: {chunk['error']}")
                return
            finish = check_chunk(chunk, req) or finish
            n += 1
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.monotonic() - start
            if abort_after is not None and n >= abort_after:
                stats.aborted += 1
                return
    if not done or finish not in ("stop", "length"):
        stats.errors.append(f"malformed stream: done={done} finish={finish}")
        return
    stats.ok += 1
    stats.latencies.append(time.monotonic() - start)
    if first is not None:
        stats.first_token.append(first)


async def client_loop(i, a, stats, models, image_url, until, abort):
    rng = random.Random(i)
    async with httpx.AsyncClient(base_url=a.base, timeout=a.timeout) as client:
        while time.monotonic() < until:
            req = body(rng, models, image_url)
            try:
                await asyncio.wait_for(
                    one_request(client, req, stats, rng.randint(1, 4) if abort else None),
                    a.timeout)
            except (AssertionError, ValueError) as e:
                stats.errors.append(f"bad stream: {type(e).__name__}: {e}")
            except (asyncio.TimeoutError, httpx.HTTPError) as e:
                stats.errors.append(f"{type(e).__name__}: {e}")


async def figures(a):
    async with httpx.AsyncClient(base_url=a.base, timeout=30) as client:
        r = await client.get("/health")
        assert r.status_code == 200, r.text
        return r.json()["models"]


async def settled(a, models):
    """Waits (30 s at most) for every chat model's figures to return to zero."""
    deadline = time.monotonic() + 30
    while True:
        figs = await figures(a)
        busy = {m: f for m, f in figs.items() if m in models
                and (f["waiting"] or f["running"] or f["kv_cache_bytes"])}
        if not busy or time.monotonic() > deadline:
            return figs, busy
        await asyncio.sleep(0.1)


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main():
    a = args()
    models = a.models.split(",")
    with open(a.image, "rb") as f:
        image_url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
    # Warm-up, so the baseline RSS includes what the first requests allocate for good.
    warm = Stats()
    await asyncio.gather(*(client_loop(i, a, warm, models, image_url, time.monotonic() + 2, False)
                           for i in range(min(a.clients, 8))))
    await settled(a, models)
    rss_before = rss_mb(a.pid)
    stats = Stats()
    until = time.monotonic() + a.duration
    start = time.monotonic()
    await asyncio.gather(
        *(client_loop(i, a, stats, models, image_url, until, False) for i in range(a.clients)),
        *(client_loop(1000 + i, a, stats, models, image_url, until, True)
          for i in range(a.aborters)))
    elapsed = time.monotonic() - start
    figs, busy = await settled(a, models)
    rss_after = rss_mb(a.pid)
    report = {
        "clients": a.clients, "aborters": a.aborters, "seconds": round(elapsed, 1),
        "completed": stats.ok, "aborted": stats.aborted, "busy_429": stats.busy,
        "errors": len(stats.errors),
        "latency_p50_s": round(pct(stats.latencies, 0.5), 3),
        "latency_p99_s": round(pct(stats.latencies, 0.99), 3),
        "first_token_p50_s": round(pct(stats.first_token, 0.5), 3),
        "first_token_p99_s": round(pct(stats.first_token, 0.99), 3),
        "rss_mb_before": rss_before and round(rss_before), "rss_mb_after": rss_after and round(rss_after),
        "engines_after": figs,
    }
    print(json.dumps(report, indent=1))
    failures = []
    if stats.errors:
        failures.append(f"{len(stats.errors)} errors, e.g. {stats.errors[:3]}")
    if stats.ok == 0:
        failures.append("no request completed")
    if busy:
        failures.append(f"engines did not return to idle: {busy}")
    if rss_before and rss_after and rss_after > rss_before + a.rss_slack_mb:
        failures.append(f"RSS grew from {rss_before:.0f} MB to {rss_after:.0f} MB")
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        sys.exit(1)
    if stats.latencies:
        print(f"ok: {stats.ok} streams, mean {statistics.mean(stats.latencies):.3f} s")


if __name__ == "__main__":
    asyncio.run(main())
