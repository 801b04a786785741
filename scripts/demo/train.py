"""Trains mmserve's demo models on procedural scenes and saves them as Hugging Face directories.

    python scripts/demo/train.py --out models/demo

On CUDA it trains for about 6 minutes (an H100: 100 s of CLIP, 230 s of LLaVA, plus drawing the
scenes); on CPU for about an hour (20 minutes of CLIP, 40 of LLaVA, on smaller batches), which
is far fewer samples: the committed weights came from the CUDA run (models/demo/README.md).

Stage 1 trains a tiny CLIP (both towers) contrastively on (scene, caption) pairs and saves a
`CLIPModel` directory (`clip/`). Stage 2 freezes that vision tower, adds a projector and a tiny Llama
decoder, trains them to caption and to answer questions, and saves a `LlavaForConditionalGeneration`
directory (`llava/`) with its tokenizer, chat template and image processor. Weights are saved in
float16. The training log (`train_log.jsonl`) and a quick held-out evaluation through transformers
(`train_eval.json`) go next to them; the authoritative evaluation goes through mmserve's HTTP API
(scripts/demo/evaluate.py).

Training images are augmented the way served images differ from drawn ones: resized to random
sizes and aspect ratios and JPEG-compressed at random qualities, before the processor's own resize.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf  # noqa: E402
import scenes  # noqa: E402
from quick_eval import quick_eval  # noqa: E402


def log(out: Path, **fields) -> None:
    line = json.dumps(fields)
    print(line, flush=True)
    with open(out / "train_log.jsonl", "a") as f:
        f.write(line + "\n")


def augment(img: Image.Image, rng: random.Random) -> Image.Image:
    if rng.random() < 0.6:
        w, h = rng.randint(110, 420), rng.randint(110, 420)
        img = img.resize((w, h), rng.choice([Image.BICUBIC, Image.BILINEAR, Image.LANCZOS]))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(40, 95))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def to_model_pixels(img: Image.Image) -> np.ndarray:
    """The processor's resize (Pillow bicubic to 96x96), as uint8 (96, 96, 3)."""
    return np.asarray(img.convert("RGB").resize((hf.IMAGE_SIZE, hf.IMAGE_SIZE), Image.BICUBIC))


def make_sample(seed: int):
    scene = scenes.make_scene(seed)
    img = augment(scenes.render(scene), random.Random(seed * 31 + 7))
    return to_model_pixels(img), scene.caption(), scene.questions()


def make_pool(n: int, workers: int):
    seeds = [scenes.TRAIN_SEED_BASE + i for i in range(n)]
    with Pool(workers) as p:
        rows = p.map(make_sample, seeds, chunksize=256)
    pixels = torch.from_numpy(np.stack([r[0] for r in rows]))  # (n, 96, 96, 3) uint8
    return pixels, [r[1] for r in rows], [r[2] for r in rows]


def normalize(pixels_u8: torch.Tensor) -> torch.Tensor:
    """(b, 96, 96, 3) uint8 -> (b, 3, 96, 96) float in [-1, 1] (mean 0.5, std 0.5)."""
    return (pixels_u8.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def lr_factor(progress: float, warmup: float = 0.05) -> float:
    """Linear warm-up, then cosine to zero; `progress` runs from 0 to 1."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def train_loop(params, steps, lr, batch_fn, out, stage, max_seconds, device):
    """AdamW over `steps` steps or `max_seconds`, whichever ends first: progress (and so the
    learning-rate schedule) is the larger of the two fractions, so a time limit still anneals."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    start = time.time()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for step in range(steps):
        progress = max(step / steps, (time.time() - start) / max_seconds)
        if progress >= 1:
            log(out, stage=stage, stopped_at=step, reason=f"time limit {max_seconds}s")
            break
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(progress)
        with amp:
            loss = batch_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(out, stage=stage, step=step, loss=round(loss.item(), 4), lr=opt.param_groups[0]["lr"],
                seconds=round(time.time() - start, 1))


def train_clip(args, pixels, captions, out, device):
    from transformers import CLIPModel

    torch.manual_seed(args.seed)
    model = CLIPModel(hf.clip_config()).to(device)
    tok = hf.clip_tokenizer(hf.build_bpe())
    enc = tok(captions, padding="max_length", max_length=hf.TEXT_MAX, truncation=True, return_tensors="pt")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    pixels = pixels.to(device)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)

    def batch(step):
        idx = torch.randint(0, len(captions), (args.clip_batch,), generator=g).to(device)
        width = int(mask[idx].sum(1).max())
        return model(input_ids=ids[idx, :width], attention_mask=mask[idx, :width],
                     pixel_values=normalize(pixels[idx]), return_loss=True).loss

    model.train()
    train_loop(list(model.parameters()), args.clip_steps, args.clip_lr, batch, out, "clip", args.max_seconds_clip, device)
    model.eval()
    return model, tok


class QaBatches:
    """Token ids of (prompt, answer) training sequences, built once per distinct question."""

    def __init__(self, tok):
        self.tok = tok
        self.prefix_cache: dict[str, list[int]] = {}

    def prefix(self, question: str) -> list[int]:
        if question not in self.prefix_cache:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            at = ids.index(hf.IMAGE)
            self.prefix_cache[question] = ids[:at] + [hf.IMAGE] * hf.IMAGE_TOKENS + ids[at + 1:]
        return self.prefix_cache[question]

    def answer(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] + [hf.END]


def pick_task(rng: random.Random, caption: str, questions) -> tuple[str, str]:
    if rng.random() < 0.35:
        return scenes.CAPTION_PROMPT, caption
    kind = rng.choice(sorted({q[0] for q in questions}))
    _, q, a = rng.choice([q for q in questions if q[0] == kind])
    return q, a


def train_llava(args, clip, tok_bpe, pixels, captions, questions, out, device):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(args.seed + 2)
    model = LlavaForConditionalGeneration(hf.llava_config(clip.config.vision_config)).to(device)
    tower = next(m for n, m in model.named_modules() if n.endswith("vision_tower"))
    # transformers 5 puts the tower's modules directly on CLIPVisionModel; 4.x nests them in .vision_model
    getattr(tower, "vision_model", tower).load_state_dict(clip.vision_model.state_dict())
    tower.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tok = hf.chat_tokenizer(tok_bpe)
    qa = QaBatches(tok)
    pixels = pixels.to(device)
    rng = random.Random(args.seed + 3)

    def batch(step):
        idx = [rng.randrange(len(captions)) for _ in range(args.llava_batch)]
        seqs, labels = [], []
        for i in idx:
            q, a = pick_task(rng, captions[i], questions[i])
            p, ans = qa.prefix(q), qa.answer(a)
            seqs.append(p + ans)
            labels.append([-100] * len(p) + ans)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [hf.PAD] * (width - len(s)) for s in seqs], device=device)
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels], device=device)
        att = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        pix = normalize(pixels[torch.tensor(idx, device=device)])
        return model(input_ids=ids, attention_mask=att, pixel_values=pix, labels=lab).loss

    model.train()
    tower.eval()
    train_loop(trainable, args.llava_steps, args.llava_lr, batch, out, "llava", args.max_seconds_llava, device)
    model.eval()
    return model, tok


def save(out: Path, clip, clip_tok, llava, chat_tok) -> None:
    from transformers import GenerationConfig, LlavaProcessor

    ip = hf.image_processor()
    d = out / "clip"
    clip.to(torch.float16).save_pretrained(d)
    clip_tok.save_pretrained(d)
    ip.save_pretrained(d)
    d = out / "llava"
    llava.to(torch.float16).save_pretrained(d)
    proc = LlavaProcessor(image_processor=ip, tokenizer=chat_tok, patch_size=hf.PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=hf.CHAT_TEMPLATE)
    proc.save_pretrained(d)
    GenerationConfig(bos_token_id=hf.BOS, eos_token_id=hf.END, pad_token_id=hf.PAD).save_pretrained(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--pool", type=int, default=None, help="training scenes (default 80000 on CUDA, 20000 on CPU)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--clip-steps", type=int, default=None)
    ap.add_argument("--clip-batch", type=int, default=None)
    ap.add_argument("--clip-lr", type=float, default=1e-3)
    ap.add_argument("--llava-steps", type=int, default=None)
    ap.add_argument("--llava-batch", type=int, default=None)
    ap.add_argument("--llava-lr", type=float, default=1e-3)
    ap.add_argument("--max-seconds-clip", type=float, default=None)
    ap.add_argument("--max-seconds-llava", type=float, default=None)
    ap.add_argument("--eval-scenes", type=int, default=500, help="held-out scenes for the quick evaluation; 0 skips it")
    ap.add_argument("--clip-from", type=Path, default=None, help="skip stage 1: use this saved CLIP directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    args.pool = args.pool or (80000 if gpu else 20000)
    # Steps are upper bounds: the time limits end (and anneal) each stage.
    args.clip_steps = args.clip_steps or 100_000
    args.llava_steps = args.llava_steps or 100_000
    args.clip_batch = args.clip_batch or (256 if gpu else 128)
    args.llava_batch = args.llava_batch or (128 if gpu else 32)
    args.max_seconds_clip = args.max_seconds_clip or (100 if gpu else 1200)
    args.max_seconds_llava = args.max_seconds_llava or (230 if gpu else 2400)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_log.jsonl").unlink(missing_ok=True)
    import transformers

    log(args.out, stage="start", device=str(device), gpu=torch.cuda.get_device_name() if gpu else None,
        torch=torch.__version__, transformers=transformers.__version__,
        args={k: str(v) for k, v in vars(args).items()})
    t0 = time.time()
    pixels, captions, questions = make_pool(args.pool, args.workers)
    log(args.out, stage="data", scenes=len(captions), seconds=round(time.time() - t0, 1))

    if args.clip_from:
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(args.clip_from, dtype=torch.float32).to(device).eval()
        clip_tok = hf.clip_tokenizer(hf.build_bpe())
        log(args.out, stage="clip", loaded=str(args.clip_from))
    else:
        clip, clip_tok = train_clip(args, pixels, captions, args.out, device)
    llava, chat_tok = train_llava(args, clip, hf.build_bpe(), pixels, captions, questions, args.out, device)
    save(args.out, clip, clip_tok, llava, chat_tok)
    log(args.out, stage="saved", seconds=round(time.time() - t0, 1))
    if args.eval_scenes == 0:
        return
    report = quick_eval(args.out, args.eval_scenes, device)
    (args.out / "train_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    log(args.out, stage="done", seconds=round(time.time() - t0, 1), eval=report)


if __name__ == "__main__":
    main()
