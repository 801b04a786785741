"""A held-out evaluation of the saved demo models through transformers (used by train.py for its
log; the figures the README reports come from evaluate.py, through mmserve's HTTP API)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

import heldout


def features(out) -> torch.Tensor:
    """transformers 5 returns the projected embeddings as `pooler_output`; 4.x returns the tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def quick_eval(out: Path, n: int, device: torch.device) -> dict:
    from transformers import AutoProcessor, AutoTokenizer, CLIPImageProcessor, CLIPModel, LlavaForConditionalGeneration

    cases = heldout.cases(n)
    llava = LlavaForConditionalGeneration.from_pretrained(out / "llava", dtype=torch.float32).to(device).eval()
    proc = AutoProcessor.from_pretrained(out / "llava")
    proc.tokenizer.padding_side = "left"
    rows = []
    for variant in heldout.VARIANTS:
        prompts = []
        for c in cases:
            img = Image.open(io.BytesIO(c.images[variant])).convert("RGB")
            prompts.append((c, "caption", "Describe the image.", c.caption, img))
            prompts += [(c, t, q, a, img) for t, q, a in c.questions]
        for s in range(0, len(prompts), 256):
            chunk = prompts[s:s + 256]
            texts = [proc.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p[2]}]}],
                add_generation_prompt=True) for p in chunk]
            inputs = proc(text=texts, images=[p[4] for p in chunk], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
            gen = llava.generate(**inputs, max_new_tokens=60, do_sample=False)
            answers = proc.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for p, a in zip(chunk, answers):
                ok = a.strip() == p[3] if p[1] == "caption" else heldout.normalize_answer(a) == p[3]
                rows.append({"variant": variant, "type": p[1], "ok": ok})
    report = heldout.score(rows)

    clip = CLIPModel.from_pretrained(out / "clip", dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(out / "clip")
    ip = CLIPImageProcessor.from_pretrained(out / "clip")
    captions = [c.caption for c in cases]
    t = tok(captions, padding=True, return_tensors="pt").to(device)
    text = torch.nn.functional.normalize(features(clip.get_text_features(**t)), dim=-1)
    for variant in heldout.VARIANTS:
        imgs = [Image.open(io.BytesIO(c.images[variant])).convert("RGB") for c in cases]
        pix = ip(images=imgs, return_tensors="pt")["pixel_values"].to(device)
        image = torch.nn.functional.normalize(features(clip.get_image_features(pixel_values=pix)), dim=-1)
        hits = 0
        for i in range(len(cases)):
            cand = [i] + heldout.distractors(len(cases), i, captions)
            hits += int(torch.argmax(text[cand] @ image[i]) == 0)
        report[variant]["clip_retrieval_top1_of_10"] = {"accuracy": round(hits / len(cases), 4), "n": len(cases)}
    return report
