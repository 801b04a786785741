"""Procedural scenes for mmserve's demo model: 1 to 3 coloured shapes on a light background.

Every scene is a pure function of its integer seed (Python's `random.Random(seed)`, no global
state), so the training set, the held-out evaluation set and the committed example images can be
redrawn anywhere. Seeds below `TRAIN_SEED_BASE` are held out: training never draws them.

A scene has a caption with one canonical wording and question/answer pairs of four types:
colour, count, shape and position. Answers are single lowercase words.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 192  # native width and height of a drawn scene, in pixels
TRAIN_SEED_BASE = 1_000_000  # training seeds are TRAIN_SEED_BASE + i; evaluation seeds are below it

SHAPES = ["circle", "square", "triangle", "star"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SIZES = {"small": 15, "large": 27}  # circumradius in pixels at SIZE
# Slot centres, and the caption's reading order: top to bottom, left to right.
POSITIONS = {
    "top": (96, 38),
    "left": (38, 96),
    "center": (96, 96),
    "right": (154, 96),
    "bottom": (96, 154),
}
PHRASE = {
    "top": "at the top",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom": "at the bottom",
}
NUMBERS = ["zero", "one", "two", "three"]
BACKGROUNDS = [(255, 255, 255), (238, 238, 238), (245, 240, 225), (225, 235, 245), (235, 245, 230)]
JITTER = 6  # pixels a shape may move away from its slot centre

CAPTION_PROMPT = "Describe the image."
QUESTION_TYPES = ["colour", "count", "shape", "position"]


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str

    def noun_phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    seed: int
    shapes: tuple[Shape, ...]  # in caption order
    background: tuple[int, int, int]
    texture: str  # "plain", "noise" or "gradient"

    def caption(self) -> str:
        parts = [f"{s.noun_phrase()} {PHRASE[s.position]}" for s in self.shapes]
        if len(parts) == 1:
            body = parts[0]
        else:
            body = ", ".join(parts[:-1]) + " and " + parts[-1]
        return body[0].upper() + body[1:] + "."

    def questions(self, rng: random.Random | None = None) -> list[tuple[str, str, str]]:
        """Every question this scene can answer unambiguously: (type, question, answer).

        With `rng`, one question of each type is drawn instead (the count question may ask about a
        shape that is absent: the answer is "zero")."""
        out: list[tuple[str, str, str]] = []
        kinds = [s.kind for s in self.shapes]
        for s in self.shapes:
            if kinds.count(s.kind) == 1:
                out.append(("colour", f"What colour is the {s.kind}?", s.colour))
            pair = [t for t in self.shapes if (t.kind, t.colour) == (s.kind, s.colour)]
            if len(pair) == 1:
                out.append(("position", f"Where is the {s.colour} {s.kind}?", s.position))
            out.append(("shape", f"What shape is {PHRASE[s.position]}?", s.kind))
        for k in SHAPES:
            out.append(("count", f"How many {PLURAL[k]} are there?", NUMBERS[kinds.count(k)]))
        if rng is None:
            return out
        picked = []
        for t in QUESTION_TYPES:
            of_type = [q for q in out if q[0] == t]
            if of_type:
                picked.append(rng.choice(of_type))
        return picked


def make_scene(seed: int) -> Scene:
    rng = random.Random(seed)
    n = rng.choice([1, 1, 2, 2, 3, 3, 3])
    slots = rng.sample(list(POSITIONS), n)
    shapes = [Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), p) for p in slots]
    order = list(POSITIONS)
    shapes.sort(key=lambda s: order.index(s.position))
    return Scene(seed, tuple(shapes), rng.choice(BACKGROUNDS), rng.choice(["plain", "noise", "gradient"]))


def _polygon(cx: float, cy: float, r: float, kind: str, rot: float) -> list[tuple[float, float]]:
    if kind == "square":
        r = r * 0.95  # corners a little inside the circumradius: about the circle's area
        return [(cx + r * math.cos(rot + math.pi / 4 + k * math.pi / 2),
                 cy + r * math.sin(rot + math.pi / 4 + k * math.pi / 2)) for k in range(4)]
    if kind == "triangle":
        return [(cx + r * math.cos(rot - math.pi / 2 + k * 2 * math.pi / 3),
                 cy + r * math.sin(rot - math.pi / 2 + k * 2 * math.pi / 3)) for k in range(3)]
    # star: five points, inner radius 0.45 r
    pts = []
    for k in range(10):
        rr = r if k % 2 == 0 else r * 0.45
        a = rot - math.pi / 2 + k * math.pi / 5
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _background(scene: Scene, rng: random.Random) -> Image.Image:
    base = np.array(scene.background, dtype=np.float32)
    pixels = np.broadcast_to(base, (SIZE, SIZE, 3)).copy()
    if scene.texture == "noise":
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 6.0, (SIZE, SIZE, 1))
        pixels += noise
    elif scene.texture == "gradient":
        pixels -= np.linspace(0.0, 18.0, SIZE, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def render(scene: Scene) -> Image.Image:
    """Draws the scene at SIZE x SIZE (RGB), anti-aliased by drawing at 4x and downsampling."""
    rng = random.Random(scene.seed * 7919 + 17)
    scale = 4
    img = _background(scene, rng).resize((SIZE * scale, SIZE * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy = POSITIONS[s.position]
        cx += rng.uniform(-JITTER, JITTER)
        cy += rng.uniform(-JITTER, JITTER)
        r = SIZES[s.size] * rng.uniform(0.92, 1.08)
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[s.colour])
        if s.kind == "circle":
            box = [(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale]
            draw.ellipse(box, fill=fill)
        else:
            rot = rng.uniform(-0.25, 0.25)
            draw.polygon([(x * scale, y * scale) for x, y in _polygon(cx, cy, r, s.kind, rot)], fill=fill)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def corpus() -> list[str]:
    """Every sentence the demo's text can contain, for training the tokenizer."""
    lines = [CAPTION_PROMPT]
    for seed in range(3000):
        scene = make_scene(TRAIN_SEED_BASE + seed)
        lines.append(scene.caption())
        for _, q, a in scene.questions():
            lines += [q, a]
    return lines
