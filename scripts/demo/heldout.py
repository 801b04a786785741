"""The held-out evaluation set: scenes drawn from seeds training never uses, each with its caption,
one question of each type, and the image as sent in two variants.

    native: the drawn 192x192 scene as PNG
    jpeg:   the same scene resized to 300x220 (a non-native size and aspect) and saved as JPEG q75
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image

import scenes

VARIANTS = ["native", "jpeg"]


@dataclass
class Case:
    seed: int
    caption: str
    questions: list[tuple[str, str, str]]  # (type, question, answer)
    images: dict[str, bytes]  # variant -> encoded image
    mime: dict[str, str]


def encode(img: Image.Image, variant: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if variant == "native":
        img.save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    img.resize((300, 220), Image.BICUBIC).save(buf, format="JPEG", quality=75)
    return buf.getvalue(), "image/jpeg"


def cases(n: int) -> list[Case]:
    out = []
    for seed in range(n):
        assert seed < scenes.TRAIN_SEED_BASE
        scene = scenes.make_scene(seed)
        img = scenes.render(scene)
        enc = {v: encode(img, v) for v in VARIANTS}
        out.append(Case(seed, scene.caption(), scene.questions(random.Random(seed)),
                        {v: e[0] for v, e in enc.items()}, {v: e[1] for v, e in enc.items()}))
    return out


def normalize_answer(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def distractors(n_cases: int, i: int, captions: list[str], k: int = 9) -> list[int]:
    """k other held-out scenes whose captions differ from scene i's, chosen deterministically."""
    out, j = [], i
    while len(out) < k:
        j = (j + 37) % n_cases
        if captions[j] != captions[i] and j not in out:
            out.append(j)
    return out


def score(rows: list[dict]) -> dict:
    """rows: {variant, type, ok} -> accuracy per variant and type (type "caption" included)."""
    report: dict = {}
    for r in rows:
        t = report.setdefault(r["variant"], {}).setdefault(r["type"], [0, 0])
        t[0] += int(r["ok"])
        t[1] += 1
    return {v: {t: {"accuracy": round(c / n, 4), "n": n} for t, (c, n) in sorted(ts.items())}
            for v, ts in report.items()}
