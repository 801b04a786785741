"""Writes the JPEG decoding fixtures: small JPEG variants under
tests/fixtures/preprocess/inputs/jpeg/ and jpeg_decode_cases.json, which holds, for every JPEG
fixture of the repository, Pillow's decoded pixels (Image.open + exif_transpose + convert("RGB"))
as width, height and an FNV-1a 64 hash of the raw RGB bytes.

Variants come from Pillow's encoder (libjpeg-turbo) and, for the ones Pillow cannot write
(4:4:0, 4:1:1, YCCK), from TurboJPEG's tjCompress2 through ctypes (needs libturbojpeg0).
Run: .venv/bin/python scripts/make_jpeg_decode_reference.py
"""

import ctypes
import io
import json
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps, features

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/preprocess"
VARIANTS = OUT / "inputs/jpeg"

# TurboJPEG 2.x constants.
TJPF_RGB, TJPF_CMYK = 0, 11
TJSAMP = {"444": 0, "422": 1, "420": 2, "440": 4, "411": 5}


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def source(w: int, h: int) -> Image.Image:
    """An odd-sized crop of a photo (so MCU padding and edge upsampling are exercised)."""
    img = Image.open(ROOT / "tests/fixtures/images/bike.jpg").convert("RGB")
    return img.crop((300, 200, 300 + w, 200 + h))


def tj_compress(pixels: np.ndarray, pf: int, subsamp: int) -> bytes:
    tj = ctypes.CDLL("libturbojpeg.so.0")
    tj.tjInitCompress.restype = ctypes.c_void_p
    handle = ctypes.c_void_p(tj.tjInitCompress())
    h, w, _ = pixels.shape
    buf = ctypes.POINTER(ctypes.c_ubyte)()
    size = ctypes.c_ulong(0)
    src = np.ascontiguousarray(pixels)
    rc = tj.tjCompress2(handle, src.ctypes.data_as(ctypes.c_void_p), w, 0, h, pf,
                        ctypes.byref(buf), ctypes.byref(size), subsamp, 90, 0)
    assert rc == 0, tj.tjGetErrorStr2(handle)
    data = ctypes.string_at(buf, size.value)
    tj.tjFree(buf)
    tj.tjDestroy(handle)
    return data


def write_variants() -> None:
    img = source(45, 31)
    for name, kw in {
        "baseline_444.jpg": dict(subsampling=0),
        "baseline_422.jpg": dict(subsampling=1),
        "baseline_420.jpg": dict(subsampling=2),
        "progressive_420.jpg": dict(subsampling=2, progressive=True),
        "progressive_444.jpg": dict(subsampling=0, progressive=True, optimize=True),
        "restart_420.jpg": dict(subsampling=2, restart_marker_blocks=2),
    }.items():
        img.save(VARIANTS / name, quality=85, **kw)
    img.convert("L").save(VARIANTS / "gray.jpg", quality=85)
    img.convert("L").save(VARIANTS / "gray_progressive.jpg", quality=85, progressive=True)
    img.convert("CMYK").save(VARIANTS / "cmyk_adobe.jpg", quality=85)
    rgb = np.asarray(img)
    for s in ("440", "411"):
        (VARIANTS / f"tj_{s}.jpg").write_bytes(tj_compress(rgb, TJPF_RGB, TJSAMP[s]))
    cmyk = np.asarray(img.convert("CMYK"))
    (VARIANTS / "tj_ycck_420.jpg").write_bytes(tj_compress(cmyk, TJPF_CMYK, TJSAMP["420"]))


def main() -> None:
    VARIANTS.mkdir(parents=True, exist_ok=True)
    write_variants()
    files = sorted((ROOT / "tests/fixtures/images").glob("*.jpg"))
    files += sorted((OUT / "inputs").glob("*.jpg")) + sorted(VARIANTS.glob("*.jpg"))
    cases = []
    for path in files:
        with Image.open(path) as im:
            mode = im.mode
            progressive = bool(im.info.get("progressive"))
            rgb = ImageOps.exif_transpose(im).convert("RGB")
        cases.append({
            "path": str(path.relative_to(ROOT)),
            "pil_mode": mode,
            "progressive": progressive,
            "width": rgb.width,
            "height": rgb.height,
            "fnv1a64": fnv1a64(rgb.tobytes()),
        })
    meta = {"pillow": PIL.__version__,
            "libjpeg_turbo": features.version("libjpeg_turbo")}
    doc = {"meta": meta, "cases": cases}
    (OUT / "jpeg_decode_cases.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(cases)} cases")


if __name__ == "__main__":
    main()
