"""Writes the demo's committed example images and the README's gallery.

    mmserve &                                     # the embedded demo models
    python scripts/demo/examples.py               # writes models/demo/examples/ and gallery.png

Examples are held-out scenes (seeds below scenes.TRAIN_SEED_BASE): each as PNG, one also as a
300x220 JPEG, with `examples.json` holding the true caption and answers (what tests/http_demo.rs
asks the server and expects back). The gallery shows each image with the caption the served model
gave, fetched through the HTTP API.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import heldout  # noqa: E402
import scenes  # noqa: E402
from evaluate import post  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SEEDS = [3, 5, 0, 7, 2, 9]


def write_examples(out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, seed in enumerate(SEEDS):
        scene = scenes.make_scene(seed)
        img = scenes.render(scene)
        variant = "jpeg" if i == 1 else "native"
        data, mime = heldout.encode(img, variant)
        name = f"scene-{seed}.{'jpg' if variant == 'jpeg' else 'png'}"
        (out / name).write_bytes(data)
        qa = [{"type": t, "question": q, "answer": a} for t, q, a in scene.questions(random.Random(seed))]
        entries.append({"file": name, "mime": mime, "seed": seed, "caption": scene.caption(), "questions": qa})
    (out / "examples.json").write_text(json.dumps(entries, indent=2) + "\n")
    return entries


def gallery(url: str, model: str, examples: Path, entries: list[dict], out: Path) -> None:
    tile, text_h = 192, 78
    sheet = Image.new("RGB", (tile * 3, (tile + text_h) * 2), "white")
    draw = ImageDraw.Draw(sheet)
    for i, e in enumerate(entries):
        data = (examples / e["file"]).read_bytes()
        body = {"model": model, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:{e['mime']};base64," + base64.b64encode(data).decode()}},
            {"type": "text", "text": scenes.CAPTION_PROMPT}]}]}
        caption = post(url, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
        x, y = (i % 3) * tile, (i // 3) * (tile + text_h)
        sheet.paste(Image.open(examples / e["file"]).convert("RGB").resize((tile, tile)), (x, y))
        draw.multiline_text((x + 4, y + tile + 4), "\n".join(textwrap.wrap(caption, 30)), fill="black")
    sheet.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="mmserve-demo")
    args = ap.parse_args()
    examples = ROOT / "models/demo/examples"
    entries = write_examples(examples)
    gallery(args.url, args.model, examples, entries, ROOT / "models/demo/gallery.png")


if __name__ == "__main__":
    main()
