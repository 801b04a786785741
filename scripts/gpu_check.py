#!/usr/bin/env python3
"""The steps of scripts/gpu-check.sh, on a lent GPU machine (torch and transformers, no Rust, no
network). Each step writes JSON into OUT; `table` turns them into OUT/report.md.

    gpu_check.py libs                         LD_LIBRARY_PATH entries holding the CUDA 13 libraries
    gpu_check.py bandwidth OUT DEVICE         device-memory copy bandwidth (torch)
    gpu_check.py make-qwen2vl-2b DIR DEVICE   random-weight model with Qwen2-VL-2B's real config
    gpu_check.py parity OUT BIN DEVICE        mmserve vs transformers, greedy, on a tiny fixture
    gpu_check.py bench OUT BIN DEVICE DIR NAME   bench/loadgen.py on mmserve, bench/hf_peer.py
    gpu_check.py table OUT                    OUT/report.md

DEVICE is `cuda` on the GPU machine; `cpu` runs the same steps on a CPU (the dry run).
"""
import glob
import json
import os
import site
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = "llava-clip-llama"
PORT = int(os.environ.get("PORT", "18800"))


def libs():
    """Folders of pip-installed NVIDIA libraries (torch's CUDA 13 runtime, cuBLAS, cuRAND)."""
    roots = site.getsitepackages() + [site.getusersitepackages()]
    dirs = {d for r in roots for d in glob.glob(f"{r}/nvidia/*/lib") + glob.glob(f"{r}/nvidia/cu13/lib")}
    print(":".join(sorted(dirs)))


def bandwidth(out, device):
    import torch
    n = (2 if device == "cuda" else 1) << 30
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync()
    dt = time.perf_counter() - t0
    # A copy reads and writes each byte: the bytes moved are twice the size.
    gbs = 2 * n * reps / dt / 1e9
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    save(out, "bandwidth", {"device": name, "copy_gb_s": gbs})
    print(f"{name}: copy {gbs:.0f} GB/s")


def make_qwen2vl_2b(path, device):
    """Qwen2-VL-2B-Instruct's architecture (28 layers, hidden 1536, vocab 151936, a 32-layer
    ViT), random bf16 weights, and the tiny fixture's tokenizer and chat template (its ids are
    what the config names; prompts tokenize to more tokens than with the real vocabulary)."""
    import torch
    import transformers as tf
    sys.path.insert(0, str(ROOT / "bench"))
    from make_models import photo
    photo()  # the benchmark's 512x512 image
    path = Path(path)
    if (path / "config.json").exists():
        return
    tiny = ROOT / "tests/fixtures/models/qwen2-vl-tiny"
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["text_config"].update(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                              max_position_embeddings=32768, layer_types=["full_attention"] * 28,
                              max_window_layers=28, initializer_range=0.02)
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [16, 24, 24]
    cfg["vision_config"].update(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16,
                                initializer_range=0.02)
    cfg["dtype"] = "bfloat16"
    config = tf.Qwen2VLConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(path)
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
        if (tiny / f).exists():
            (path / f).write_bytes((tiny / f).read_bytes())
    # Qwen2-VL's real image processor: 14 px patches, merged 2x2, up to 12.8 MP.
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
        "do_normalize": True, "do_convert_rgb": True, "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2}, indent=2))
    print(f"wrote {path}")


class Server:
    """mmserve on PORT, until the `with` block ends."""

    def __init__(self, binary, args, log):
        self.cmd = [binary, "serve", "--port", str(PORT), *args]
        self.log = log

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        for _ in range(1200):
            if self.proc.poll() is not None:
                sys.exit(f"mmserve exited {self.proc.returncode}: see {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.25)
        sys.exit(f"mmserve never became ready: see {self.log}")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def post(body):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/chat/completions",
                                 data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def data_url(name):
    import base64
    raw = (ROOT / "tests/fixtures/images" / name).read_bytes()
    mime = "jpeg" if name.endswith(".jpg") else name.rsplit(".", 1)[-1]
    return f"data:image/{mime};base64,{base64.b64encode(raw).decode()}"


def with_images(messages):
    """The fixture's messages, image file names replaced by data URLs."""
    out = json.loads(json.dumps(messages))
    for m in out:
        for part in m["content"] if isinstance(m["content"], list) else []:
            url = part.get("image_url", {}).get("url", "")
            if url.startswith("fixture:"):
                part["image_url"]["url"] = data_url(url.removeprefix("fixture:"))
    return out


def hf_greedy(model_dir, cases, device, dtype, steps):
    """transformers' greedy tokens for each case (the fixture's prompt ids and pixel values), and
    its smallest top-1/top-2 logit gap over the steps it generated."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, GenerationConfig
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    # As scripts/make_fixtures.py: exactly `steps` argmax tokens, EOS neither stops nor is masked
    # (an emptied generation_config fills in no EOS).
    gc = GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=None, bos_token_id=None,
                          pad_token_id=0)
    model.generation_config = GenerationConfig()
    tensors = load_file(str(ROOT / f"tests/fixtures/reference/{FIXTURE}.safetensors"))
    out = {}
    for c in cases:
        ids = torch.tensor([c["prompt_ids"]], device=device)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        px = tensors.get(f"{c['name']}.pixel_values")
        if px is not None:
            kw["pixel_values"] = px.to(device=device, dtype=dtype)
        with torch.no_grad():
            g = model.generate(**kw, generation_config=gc, output_logits=True, return_dict_in_generate=True)
        logits = torch.stack(g.logits, 1).float()[0]
        top = logits.topk(2, -1).values
        out[c["name"]] = {"tokens": g.sequences[0, ids.shape[1]:].tolist(),
                          "min_gap": float((top[:, 0] - top[:, 1]).min())}
    return out


def parity(out, binary, device):
    """Greedy token ids, mmserve against transformers on the same device, f32 and bf16."""
    import torch
    model_dir = ROOT / "tests/fixtures/models" / FIXTURE
    ref = json.loads((ROOT / f"tests/fixtures/reference/{FIXTURE}.json").read_text())
    cases, steps = ref["cases"], len(ref["cases"][0]["greedy_tokens"])
    dev = "cuda:0" if device == "cuda" else "cpu"
    dtypes = [("f32", torch.float32)] + ([("bf16", torch.bfloat16)] if device == "cuda" else [])
    report = {"fixture": FIXTURE, "steps": steps, "dtypes": {}}
    for name, dtype in dtypes:
        hf = hf_greedy(model_dir, cases, device, dtype, steps)
        rows = []
        args = ["--model", str(model_dir), "--devices", dev, "--dtype", name]
        with Server(binary, args, f"{out}/parity-{name}.log"):
            for c in cases:
                body = {"model": FIXTURE, "messages": with_images(c["messages"]), "temperature": 0,
                        "max_tokens": steps, "ignore_eos": True, "logprobs": True, "top_logprobs": 1}
                got = post(body)["choices"][0]
                ours = [t["token"] for t in (got.get("logprobs") or {}).get("content") or []]
                want = hf[c["name"]]
                theirs = token_texts(model_dir, want["tokens"])
                same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                rows.append({"case": c["name"], "tokens": len(theirs), "identical_prefix": same,
                             "hf_min_top2_gap": want["min_gap"]})
        exact = sum(r["identical_prefix"] == r["tokens"] for r in rows)
        report["dtypes"][name] = {"cases": rows, "exact": exact, "of": len(rows)}
        print(f"parity {name}: {exact}/{len(rows)} cases token-identical over {steps} steps")
    save(out, "parity", report)


def token_texts(model_dir, ids):
    """Each token's text as OpenAI logprobs give it (special tokens included as text)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [tok.decode([i], skip_special_tokens=False) for i in ids]


def weight_bytes(model_dir, width):
    """Bytes a batch-1 decode step reads: every decoder weight (not the vision tower, not the
    embedding rows, but the lm_head, tied or not), at `width` bytes a weight (the served dtype:
    bf16 on a GPU, f32 on a CPU)."""
    from safetensors import safe_open
    files = list(Path(model_dir).glob("*.safetensors"))
    keys = [k for f in files for k in safe_open(str(f), "pt").keys()]
    tied = not any("lm_head" in k for k in keys)
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if "visual" in k or "vision" in k or "connector" in k or "multi_modal" in k:
                    continue
                if "embed_tokens" in k and not tied:
                    continue  # only its looked-up rows are read; the lm_head is read whole
                shape = st.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n * width
    return total


def bench(out, binary, device, model_dir, name):
    dev = "cuda:0" if device == "cuda" else "cpu"
    photo = ROOT / "bench/models/photo-512.jpg"
    py = sys.executable
    conc = os.environ.get("CONCURRENCY", "1,16")
    rounds = os.environ.get("ROUNDS", "2")
    with Server(binary, ["--model", model_dir, "--served-model-name", name, "--devices", dev,
                         "--max-num-seqs", "16"], f"{out}/mmserve-{name}.log") as s:
        subprocess.run([py, str(ROOT / "bench/loadgen.py"), f"http://127.0.0.1:{PORT}", name, "--image",
                        str(photo), "--pid", str(s.proc.pid), "--concurrency", conc, "--rounds", rounds,
                        "--json", f"{out}/mmserve-{name}.json"], check=True)
    dtype = "bfloat16" if device == "cuda" else "float32"
    batches = os.environ.get("HF_BATCHES", "1,16")
    subprocess.run([py, str(ROOT / "bench/hf_peer.py"), model_dir, "--image", str(photo), "--device", device,
                    "--dtype", dtype, "--batches", batches, "--json", f"{out}/hf-{name}.json"], check=True)
    width = 2 if device == "cuda" else 4
    save(out, f"weights-{name}", {"decode_weight_bytes": weight_bytes(model_dir, width)})


def table(out):
    out = Path(out)
    bw = load(out, "bandwidth")
    lines = [f"# GPU check: {bw.get('device', '?')}", "",
             f"Device copy bandwidth (torch): {bw.get('copy_gb_s', 0):.0f} GB/s.", ""]
    parity_report = load(out, "parity")
    for name, d in parity_report.get("dtypes", {}).items():
        gaps = [f"{r['case']} {r['identical_prefix']}/{r['tokens']} (gap {r['hf_min_top2_gap']:.3f})"
                for r in d["cases"] if r["identical_prefix"] != r["tokens"]]
        lines.append(f"Parity {name} ({parity_report['fixture']}): {d['exact']}/{d['of']} cases token-identical"
                     + (f"; differ: {', '.join(gaps)}" if gaps else "") + ".")
    lines += ["", "| model | server | TTFT text c=1 (s) | TTFT image c=1 (s) | decode c=1 (tok/s) "
              "| aggregate c=16 (tok/s) | batch-1 bandwidth use |", "|---|---|---|---|---|---|---|"]
    for f in sorted(out.glob("mmserve-*.json")):
        name = f.stem.removeprefix("mmserve-")
        wb = load(out, f"weights-{name}").get("decode_weight_bytes", 0)
        ours, hf = load(out, f.stem), load(out, f"hf-{name}")
        lines.append(row(name, "mmserve", ours.get("levels", []), "concurrency", wb, bw))
        lines.append(row(name, "transformers", hf.get("runs", []), "batch", wb, bw))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def row(name, server, levels, key, wb, bw):
    def pick(kind, n):
        return next((lv for lv in levels if lv["kind"] == kind and lv[key] == n), {})
    t1, i1 = pick("text", 1), pick("image", 1)
    t16 = pick("text", 16)
    ttft = lambda lv: lv.get("ttft_median_s", lv.get("ttft_s"))  # noqa: E731
    tpot = t1.get("tpot_median_ms", t1.get("tpot_ms"))
    decode = 1000 / tpot if tpot else None
    use = decode * wb / (bw.get("copy_gb_s", 0) * 1e9) if decode and bw.get("copy_gb_s") else None
    fmt = lambda v, p=2: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    return (f"| {name} | {server} | {fmt(ttft(t1))} | {fmt(ttft(i1))} | {fmt(decode, 1)} | "
            f"{fmt(t16.get('output_tok_s'), 1)} | {'–' if use is None else f'{use:.0%}'} |")


def save(out, name, obj):
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{name}.json").write_text(json.dumps(obj, indent=2))


def load(out, name):
    p = Path(out) / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else {}


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"libs": libs, "bandwidth": bandwidth, "make-qwen2vl-2b": make_qwen2vl_2b, "parity": parity,
     "bench": bench, "table": table}[cmd](*rest)
