"""Reference outputs of the Qwen2-VL and Idefics3/SmolVLM image processors (transformers 5).

Run with the project venv: `.venv/bin/python scripts/make_vlm_preprocess_reference.py`.
Writes tests/fixtures/preprocess/vlm/:
  <config>/preprocessor_config.json   the config the Rust test loads (as a model repo holds it)
  inputs/*.png                        generated inputs (portrait, landscape, tiny, round-half cases)
  cases.json                          per (config, image): shapes, grid / rows / cols, FNV-1a 64 of the
                                      PIL-backend float32 output, a strided sample of its values, and
                                      the max abs difference of the torchvision backend from it
  tensors.safetensors                 full PIL-backend outputs for a few small cases

The reference is the PIL backend (`AutoImageProcessor.from_pretrained(dir, backend="pil")`, i.e.
Qwen2VLImageProcessorPil / Idefics3ImageProcessorPil / SmolVLMImageProcessorPil); the torchvision
backend (the default `Qwen2VLImageProcessor` etc.) resizes differently and is only recorded.
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.numpy import save_file
from transformers import AutoImageProcessor
from transformers import __version__ as transformers_version

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/preprocess/vlm"
PHOTOS = ROOT / "tests/fixtures/images"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SAMPLES = 64

CONFIGS = {
    # Qwen2-VL hub style: top-level min_pixels / max_pixels.
    "qwen_minmax": {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12544,
                    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                    "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
    # transformers 5 style: size {shortest_edge, longest_edge}, as save_pretrained writes it.
    "qwen_size": {"image_processor_type": "Qwen2VLImageProcessorFast", "do_convert_rgb": True,
                  "size": {"shortest_edge": 6272, "longest_edge": 50176},
                  "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "resample": 3,
                  "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
    # Splitting: longest edge 128, tiles of 32 -> up to 16 tiles + global.
    "idefics_split": {"image_processor_type": "Idefics3ImageProcessor", "size": {"longest_edge": 128},
                      "max_image_size": {"longest_edge": 32}, "resample": 1, "do_image_splitting": True,
                      "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    # SmolVLM naming, tiles of 64.
    "smolvlm_split": {"image_processor_type": "SmolVLMImageProcessor", "size": {"longest_edge": 128},
                      "max_image_size": {"longest_edge": 64}, "resample": 1, "do_image_splitting": True},
    # No splitting: one image resized to max_image_size x max_image_size.
    "idefics_nosplit": {"image_processor_type": "Idefics3ImageProcessor", "size": {"longest_edge": 96},
                        "max_image_size": {"longest_edge": 48}, "do_image_splitting": False},
    # Splitting enabled but the image already fits: one non-square frame, rows = cols = 0.
    "idefics_fits": {"image_processor_type": "Idefics3ImageProcessor", "size": {"longest_edge": 40},
                     "max_image_size": {"longest_edge": 64}},
}

FULL = {("qwen_minmax", "tiny_20x14.png"), ("qwen_minmax", "gray.png"), ("idefics_split", "tiny_20x14.png"),
        ("idefics_fits", "rgba.png"), ("idefics_fits", "portrait_45x80.png"), ("idefics_nosplit", "palette.gif")}


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def make_inputs() -> list:
    rng = np.random.default_rng(7)
    (OUT / "inputs").mkdir(parents=True, exist_ok=True)
    names = []
    # (width, height): portrait, landscape, tiny, and sizes where height / 28 or width / 28 is x.5
    # (Python's round-half-to-even in smart_resize).
    for w, h, tag in [(45, 80, "portrait"), (150, 50, "landscape"), (20, 14, "tiny"), (98, 70, "halves")]:
        y, x = np.mgrid[0:h, 0:w]
        smooth = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // (w + h)], -1)
        noise = rng.integers(-40, 41, (h, w, 3))
        arr = np.clip(smooth + noise, 0, 255).astype(np.uint8)
        name = f"{tag}_{w}x{h}.png"
        Image.fromarray(arr).save(OUT / "inputs" / name)
        names.append(name)
    return names


def image_path(name: str) -> Path:
    return PHOTOS / name if (PHOTOS / name).exists() else OUT / "inputs" / name


def record(out: np.ndarray) -> dict:
    flat = np.ascontiguousarray(out, dtype=np.float32).reshape(-1)
    idx = np.linspace(0, flat.size - 1, SAMPLES).astype(np.int64)
    return {"fnv1a64": fnv1a64(flat.astype("<f4").tobytes()), "sample_index": idx.tolist(),
            "sample": [float(v) for v in flat[idx]]}


def run_case(cname: str, pil, tv, name: str, tensors: dict) -> dict:
    img = ImageOps.exif_transpose(Image.open(image_path(name)))  # what load_image does first
    case = {"config": cname, "image": name, "image_path": str(image_path(name).relative_to(ROOT))}
    if cname.startswith("qwen"):
        p = pil(img, return_tensors="np")
        t = tv(img, return_tensors="pt")
        out, tv_out = p["pixel_values"].astype(np.float32), t["pixel_values"].numpy()
        case["grid_thw"] = p["image_grid_thw"][0].tolist()
        assert t["image_grid_thw"][0].tolist() == case["grid_thw"]
    else:
        p = pil(img, return_tensors="np", return_row_col_info=True)
        t = tv(img, return_tensors="pt", return_row_col_info=True)
        out, tv_out = p["pixel_values"][0].astype(np.float32), t["pixel_values"][0].numpy()
        mask = p["pixel_attention_mask"][0]
        assert mask.all(), "a single image is never padded"
        case["rows"], case["cols"] = int(p["rows"][0][0]), int(p["cols"][0][0])
    case["shape"] = list(out.shape)
    case.update(record(out))
    case["torchvision_vs_pil_max_abs"] = float(np.abs(tv_out - out).max()) if tv_out.shape == out.shape else None
    if (cname, name) in FULL:
        tensors[f"{cname}/{name}"] = out
    return case


def main():
    names = ["cat.jpg", "bike.jpg", "gray.png", "rgba.png", "palette.gif", "exif_rotated.jpg"] + make_inputs()
    tensors, cases = {}, []
    for cname, cfg in CONFIGS.items():
        (OUT / cname).mkdir(parents=True, exist_ok=True)
        (OUT / cname / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        pil = AutoImageProcessor.from_pretrained(OUT / cname, backend="pil")
        tv = AutoImageProcessor.from_pretrained(OUT / cname, backend="torchvision")
        assert pil.backend == "pil" and tv.backend == "torchvision", (type(pil), type(tv))
        for name in names:
            c = run_case(cname, pil, tv, name, tensors)
            cases.append(c)
            print(f"{cname:16s} {name:20s} shape {c['shape']} grid {c.get('grid_thw')} rows/cols "
                  f"{c.get('rows')}/{c.get('cols')} torchvision vs PIL max abs {c['torchvision_vs_pil_max_abs']}")
    save_file(tensors, OUT / "tensors.safetensors")
    meta = {"transformers": transformers_version, "pillow": Image.__version__, "torch": torch.__version__,
            "reference_backend": "pil"}
    (OUT / "cases.json").write_text(json.dumps({"meta": meta, "cases": cases}, indent=0) + "\n")


if __name__ == "__main__":
    main()
