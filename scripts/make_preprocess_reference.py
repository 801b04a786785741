#!/usr/bin/env python3
"""Generate the reference data for src/preprocess tests (run with the project venv).

Writes tests/fixtures/preprocess/:
  inputs/*.png|gif|webp|jpg  small input images (PIL / hand-written PNG encoder)
  resize_cases.json          PIL Image.resize outputs (FNV-1a 64 of raw RGB) per input/size/filter
  convert_cases.json         transformers 5 convert_to_rgb outputs per input file
  exif_cases.json            PIL ImageOps.exif_transpose outputs (raw bytes, tiny)
  exif_rotated_expected.png  exif_transpose of inputs/exif_rotated.jpg, decoded by Pillow
  cmyk_expected.png          convert_to_rgb of inputs/cmyk.jpg, decoded by Pillow
  e2e/<name>/preprocessor_config.json  written by transformers' save_pretrained
  e2e/pixel_values.safetensors         PIL-backend (and some torchvision-backend) pixel_values
  e2e_cases.json             which tensors exist, and measured torchvision-vs-PIL differences

Usage: /work/main/.venv/bin/python scripts/make_preprocess_reference.py
"""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.numpy import save_file
from transformers import CLIPImageProcessor, SiglipImageProcessor
from transformers import __version__ as transformers_version
from transformers.image_transforms import convert_to_rgb
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "preprocess"
INPUTS = OUT / "inputs"
PHOTOS = ROOT / "tests" / "fixtures" / "images"
FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def png_bytes(arr: np.ndarray, color_type: int, bit_depth: int, extra_chunks=()) -> bytes:
    """A minimal PNG encoder (PIL cannot write 16-bit RGB / RGBA / LA)."""
    h, w = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + arr[y].astype(dtype).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + b"".join(chunk(k, d) for k, d in extra_chunks)
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def rgb_raw(im: Image.Image) -> bytes:
    assert im.mode == "RGB", im.mode
    return np.asarray(im).tobytes()


def make_resize_inputs(rng) -> dict:
    inputs = {
        "pattern_37x23.png": Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)),
        "photo_96x64.png": Image.open(PHOTOS / "cat.jpg").convert("RGB").crop((200, 150, 296, 214)),
        "line_1x40.png": Image.fromarray(rng.integers(0, 256, (40, 1, 3), dtype=np.uint8)),
        "row_57x1.png": Image.fromarray(rng.integers(0, 256, (1, 57, 3), dtype=np.uint8)),
        "dot_1x1.png": Image.new("RGB", (1, 1), (250, 7, 128)),
        # Own generator, so adding it leaves the other inputs unchanged.
        "portrait_40x64.png": Image.fromarray(
            np.random.default_rng(4064).integers(0, 256, (64, 40, 3), dtype=np.uint8)
        ),
    }
    for name, im in inputs.items():
        im.save(INPUTS / name)
    return inputs


# Pillow 13 runs the vertical pass first iff out_h < in_h and in_h - out_h > 2 * (in_w - out_w)
# (python-pillow/Pillow#9549). Sizes on both sides of that boundary, per input; the tie
# (in_h - out_h == 2 * (in_w - out_w)) goes horizontal first.
PASS_ORDER_SIZES = {
    "pattern_37x23.png": [(29, 5), (28, 5), (36, 20), (35, 20)],
    "photo_96x64.png": [(70, 10), (69, 10), (95, 61), (94, 61), (50, 20)],
    "portrait_40x64.png": [
        (32, 32),  # the SigLIP exif_image case: vertical first
        (19, 20), (18, 20),  # both shrink, just past and at the boundary
        (60, 32),  # wider and shorter: vertical first
        (20, 128), (80, 128), (48, 70),  # taller: horizontal first
        (39, 61), (39, 62),
    ],
}


def resize_cases(inputs: dict) -> list:
    cases = []
    for name, im in inputs.items():
        w, h = im.size
        sizes = set(PASS_ORDER_SIZES.get(name, [])) | {
            (w * 3, h * 2),  # integer upscale
            (max(1, w // 3), max(1, h // 2)),  # integer downscale
            (max(1, w * 5 // 7), max(1, h * 7 // 5)),  # non-integer, mixed directions
            (w + 1, max(1, h - 1)),  # off-by-one ratios (Pillow 13 runs the vertical pass first)
            (w * 2, max(1, h // 3)),  # wider and shorter: vertical pass first
            (max(1, w // 3), h * 2),  # narrower and taller: horizontal pass first
            (1, 1),
            (48, 48),
            (7, 3),
        }
        for tw, th in sorted(sizes):
            for code, fname in FILTERS.items():
                out = im.resize((tw, th), resample=code)
                cases.append(
                    {"input": name, "filter": code, "filter_name": fname, "width": tw, "height": th,
                     "fnv1a64": fnv1a64(rgb_raw(out))}
                )
    return cases


def make_convert_inputs(rng) -> list:
    """Files covering every mode convert_to_rgb meets; returns their names."""
    gray = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    alpha[0, :3] = [0, 255, 128]
    rgb = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(np.stack([gray, alpha], -1), "LA").save(INPUTS / "la8.png")
    Image.fromarray(gray, "L").save(INPUTS / "gray_trns.png", transparency=int(gray[0, 0]))
    Image.fromarray(rgb, "RGB").save(INPUTS / "rgb_trns.png", transparency=tuple(int(v) for v in rgb[1, 1]))
    pal = Image.fromarray(rgb, "RGB").quantize(colors=16)
    pal.save(INPUTS / "palette_trns.png", transparency=3)
    pal.save(INPUTS / "palette_plain.png")
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(INPUTS / "rgba_lossless.webp", lossless=True)
    Image.fromarray(rgb, "RGB").save(INPUTS / "rgb_lossless.webp", lossless=True)
    frames = [Image.new("RGB", (5, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(INPUTS / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(INPUTS / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    # 16-bit PNGs, sample values around the byte boundaries.
    v16 = rng.integers(0, 65536, (6, 9, 4), dtype=np.uint32)
    v16[0, :4, :] = np.array([0, 255, 256, 65535])[:, None]
    (INPUTS / "gray16.png").write_bytes(png_bytes(v16[..., 0], 0, 16))
    (INPUTS / "gray16_low.png").write_bytes(png_bytes(v16[..., 0] % 300, 0, 16))
    (INPUTS / "la16.png").write_bytes(png_bytes(v16[..., :2], 4, 16))
    (INPUTS / "rgb16.png").write_bytes(png_bytes(v16[..., :3], 2, 16))
    (INPUTS / "rgba16.png").write_bytes(png_bytes(v16, 6, 16))
    names = ["la8.png", "gray_trns.png", "rgb_trns.png", "palette_trns.png", "palette_plain.png",
             "rgba_lossless.webp", "rgb_lossless.webp", "anim.gif", "anim.webp",
             "gray16.png", "gray16_low.png", "la16.png", "rgb16.png", "rgba16.png"]
    # Shared fixtures from tests/fixtures/images (made by another helper; identical copies).
    names += [f"../../images/{n}" for n in ("gray.png", "rgba.png", "palette.gif")]
    return names


def convert_cases(names: list) -> list:
    cases = []
    for name in names:
        im = Image.open(INPUTS / name)
        out = convert_to_rgb(im, return_numpy=True)
        cases.append({"input": name, "pil_mode": im.mode, "width": out.shape[1], "height": out.shape[0],
                      "fnv1a64": fnv1a64(out.tobytes())})
    # Every (value, alpha) pair: r = x, g = 255 - x, b = 7x mod 256, a = y (generated in the test too).
    x, y = np.meshgrid(np.arange(256), np.arange(256))
    rgba = np.stack([x, 255 - x, (7 * x) % 256, y], -1).astype(np.uint8)
    out = convert_to_rgb(Image.fromarray(rgba, "RGBA"), return_numpy=True)
    cases.append({"input": "<all value/alpha pairs>", "pil_mode": "RGBA", "width": 256, "height": 256,
                  "fnv1a64": fnv1a64(out.tobytes())})
    return cases


def exif_block(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def exif_cases() -> list:
    src = np.arange(3 * 2 * 3, dtype=np.uint8).reshape(2, 3, 3) * 13  # 3 wide, 2 tall
    cases = []
    for o in range(1, 9):
        name = f"exif_orientation_{o}.png"
        Image.fromarray(src, "RGB").save(INPUTS / name, exif=exif_block(o))
        out = ImageOps.exif_transpose(Image.open(INPUTS / name)).convert("RGB")
        cases.append({"input": name, "orientation": o, "width": out.width, "height": out.height,
                      "rgb": list(rgb_raw(out))})
    # A JPEG with Orientation = 6 (rotate 90 clockwise to display), 4:4:4, smooth content.
    yy, xx = np.mgrid[0:32, 0:48]
    img = np.stack([xx * 5, yy * 7, 128 + (xx - yy)], -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(img, "RGB").save(INPUTS / "exif_rotated.jpg", quality=95, subsampling=0, exif=exif_block(6))
    out = ImageOps.exif_transpose(Image.open(INPUTS / "exif_rotated.jpg")).convert("RGB")
    out.save(OUT / "exif_rotated_expected.png")
    return cases


def cmyk_case():
    """A CMYK JPEG (Pillow writes Adobe-inverted CMYK) and Pillow's convert_to_rgb of it."""
    yy, xx = np.mgrid[0:16, 0:24]
    cmyk = np.stack([xx * 10, yy * 15, (xx + yy) * 5, (xx * yy) % 256], -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(cmyk, "CMYK").save(INPUTS / "cmyk.jpg", quality=100)
    im = Image.open(INPUTS / "cmyk.jpg")
    assert im.mode == "CMYK"
    Image.fromarray(convert_to_rgb(im, return_numpy=True)).save(OUT / "cmyk_expected.png")


def e2e(names: list) -> list:
    configs = {
        "clip48": (CLIPImageProcessorPil, CLIPImageProcessor,
                   dict(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}, resample=3)),
        "siglip32": (SiglipImageProcessorPil, SiglipImageProcessor,
                     dict(size={"height": 32, "width": 32}, resample=3)),
        # Crop larger than the resized image (zero padding), non-square, bilinear.
        "clip_pad": (CLIPImageProcessorPil, CLIPImageProcessor,
                     dict(size={"shortest_edge": 40}, crop_size={"height": 48, "width": 56}, resample=2)),
    }
    tensors, cases = {}, []
    for cname, (pil_cls, tv_cls, kwargs) in configs.items():
        pil_proc, tv_proc = pil_cls(**kwargs), tv_cls(**kwargs)
        assert pil_proc.backend == "pil" and tv_proc.backend == "torchvision"
        pil_proc.save_pretrained(OUT / "e2e" / cname)
        for path in names:
            if cname == "clip_pad" and path.name not in ("gray.png", "rgba.png", "cat.jpg"):
                continue
            img = ImageOps.exif_transpose(Image.open(path))  # what load_image does before the processor
            pil = pil_proc(img, return_tensors="np")["pixel_values"][0].astype(np.float32)
            tv = tv_proc(img, return_tensors="pt")["pixel_values"][0].numpy().astype(np.float32)
            key = f"{cname}/{path.name}"
            tensors[f"{key}/pil"] = pil
            photo = path.suffix == ".jpg" and cname != "clip_pad"
            if photo:
                tensors[f"{key}/torchvision"] = tv
            cases.append({"config": cname, "image": path.name, "image_path": str(path.relative_to(ROOT)),
                          "shape": list(pil.shape), "has_torchvision": photo,
                          "torchvision_vs_pil_max_abs": float(np.abs(tv - pil).max()),
                          "torchvision_vs_pil_frac_differing": float((np.abs(tv - pil) > 1e-6).mean())})
    save_file(tensors, OUT / "e2e" / "pixel_values.safetensors")
    return cases


def main():
    INPUTS.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    resize_inputs = make_resize_inputs(rng)
    convert_names = make_convert_inputs(rng)
    meta = {"pillow": Image.__version__, "transformers": transformers_version, "torch": torch.__version__}
    (OUT / "resize_cases.json").write_text(json.dumps({"meta": meta, "cases": resize_cases(resize_inputs)}, indent=0))
    (OUT / "convert_cases.json").write_text(json.dumps({"meta": meta, "cases": convert_cases(convert_names)}, indent=1))
    (OUT / "exif_cases.json").write_text(json.dumps({"meta": meta, "cases": exif_cases()}))
    cmyk_case()
    line = np.random.default_rng(5).integers(0, 256, (500, 1, 3), dtype=np.uint8)
    Image.fromarray(line).save(INPUTS / "line_1x500.png")
    e2e_images = [PHOTOS / n for n in ("cat.jpg", "bike.jpg", "flux-robot.jpg", "gray.png", "rgba.png", "palette.gif")]
    e2e_images += [INPUTS / "line_1x500.png", INPUTS / "exif_rotated.jpg", INPUTS / "rgba_lossless.webp"]
    cases = e2e(e2e_images)
    (OUT / "e2e_cases.json").write_text(json.dumps({"meta": meta, "cases": cases}, indent=1))
    for c in cases:
        print(f"{c['config']:9s} {c['image']:20s} torchvision vs PIL: max abs diff "
              f"{c['torchvision_vs_pil_max_abs']:.6f}, {100 * c['torchvision_vs_pil_frac_differing']:.2f}% of values differ")


if __name__ == "__main__":
    main()
