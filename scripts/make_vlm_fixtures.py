#!/usr/bin/env python3
"""Build mmserve's Qwen2-VL / Qwen2.5-VL / Idefics3 (SmolVLM) reference fixtures (run by hand, offline).

Command (from the repository root; same venv as scripts/make_fixtures.py):

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/make_vlm_fixtures.py [qwen2-vl-tiny qwen2.5-vl-tiny idefics3-tiny]

Deterministic (fixed seeds, one torch thread). Reuses the tokenizer, helpers and JSON schema of
scripts/make_fixtures.py (imported). Writes only:

  tests/fixtures/images/{bike_portrait,cat_landscape,robot_tiny,cat_gray,bike_strip}.png
                               derived from $MMSERVE_SHARED_IMAGES (default /work/shared/images)
  tests/fixtures/models/qwen2-vl-tiny/    Qwen2VLForConditionalGeneration, transformers 5.x save layout
                               (+ flat preprocessor_config.json next to the 5.x processor_config.json)
  tests/fixtures/models/qwen2.5-vl-tiny/  Qwen2_5_VLForConditionalGeneration rewritten to the 4.x-era hub
                               layout (flat text config, rope_theta + rope_scaling {type: mrope}, visual.* /
                               model.* / lm_head.weight tensor names, two shards + index, flat preprocessor_config.json,
                               chat_template.json)
  tests/fixtures/models/idefics3-tiny/    Idefics3ForConditionalGeneration (SmolVLM-style), 5.x save layout
  tests/fixtures/reference/<model>.json + .safetensors

The models are random: outputs are gibberish but exactly reproducible.
"""

import copy
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402
import numpy as np  # noqa: E402
import PIL.ImageOps  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoProcessor,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

ROOT, FIX, IMG_DIR, MODELS_DIR, REF_DIR = mf.ROOT, mf.FIX, mf.IMG_DIR, mf.MODELS_DIR, mf.REF_DIR
SHARED_IMAGES = mf.SHARED_IMAGES
MAX_NEW_TOKENS, MIN_GAP = mf.MAX_NEW_TOKENS, mf.MIN_GAP
sid = mf.special_id
img_part, txt = mf.img_part, mf.txt

# Qwen2-VL's processor also needs <|video_pad|>; it is not among make_fixtures' reserved tokens, so the
# Qwen tokenizers append it at id 512 and the Qwen text models have vocab_size 513.
VIDEO_PAD = "<|video_pad|>"

# --------------------------------------------------------------------------------------------
# Images (derived real photos, PNG)
# --------------------------------------------------------------------------------------------
DERIVED = {
    # name: (source, crop box (l, t, r, b) in source pixels or None, output size (w, h), mode)
    "bike_portrait.png": ("bike.jpg", (300, 40, 620, 573), (120, 200), "RGB"),  # portrait 3:5
    "cat_landscape.png": ("cat.jpg", (0, 150, 512, 359), (220, 90), "RGB"),  # landscape ~2.4:1
    "robot_tiny.png": ("flux-robot.jpg", None, (20, 14), "RGB"),  # tiny, 10:7
    "cat_gray.png": ("cat.jpg", (0, 64, 512, 448), (96, 72), "L"),  # grayscale 4:3
    "bike_strip.png": ("bike.jpg", (0, 200, 800, 345), (220, 40), "RGB"),  # very wide 5.5:1
}


def make_images():
    for name, (src, box, size, mode) in DERIVED.items():
        with Image.open(SHARED_IMAGES / src) as im:
            im = PIL.ImageOps.exif_transpose(im).convert("RGB")
            if box:
                im = im.crop(box)
            im = im.resize(size, Image.Resampling.LANCZOS)
            if mode == "L":
                im = im.convert("L")
            im.save(IMG_DIR / name, optimize=True)
        assert (IMG_DIR / name).stat().st_size < 120_000, name
    for name in ["flux-robot.jpg", "cat.jpg", "bike.jpg"]:  # reused as-is (written by make_fixtures.py)
        if not (IMG_DIR / name).exists():
            shutil.copyfile(SHARED_IMAGES / name, IMG_DIR / name)


def image_info(name):
    im = mf.load_fixture_image(name)
    return {"file": name, "size_wh": list(im.size), "mode": im.mode}


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
COMMON_CASES = [
    ("text_only", [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the capital of France? Répondez en français 🙂"},
    ]),
    ("portrait", [{"role": "user", "content": [img_part("bike_portrait.png"), txt("What is in this picture?")]}]),
    ("landscape", [{"role": "user", "content": [txt("Describe the image."), img_part("cat_landscape.png")]}]),
    ("tiny", [{"role": "user", "content": [img_part("robot_tiny.png"), txt("What colors do you see?")]}]),
    ("grayscale", [{"role": "user", "content": [img_part("cat_gray.png"), txt("Is this a gray picture?")]}]),
    ("large", [{"role": "user", "content": [img_part("flux-robot.jpg"), txt("Describe the robot.")]}]),
    ("two_images", [{"role": "user", "content": [
        txt("Here is a bike:"), img_part("bike_portrait.png"),
        txt("and here is a cat:"), img_part("cat_landscape.png"), txt("Which one is older?")]}]),
    ("multiturn", [
        {"role": "user", "content": [img_part("cat_gray.png"), txt("What animal is this?")]},
        {"role": "assistant", "content": "A cat sitting on a sofa."},
        {"role": "user", "content": [txt("And in this one?"), img_part("robot_tiny.png")]},
    ]),
]
IDEFICS3_EXTRA_CASES = [
    ("wide_strip", [{"role": "user", "content": [img_part("bike_strip.png"), txt("What is in this picture?")]}], {}),
    ("no_splitting", [{"role": "user", "content": [img_part("cat_landscape.png"), txt("Describe the image.")]}],
     {"do_image_splitting": False}),
]

# --------------------------------------------------------------------------------------------
# Chat templates (the real hub ones)
# --------------------------------------------------------------------------------------------
# Qwen2-VL-*-Instruct / Qwen2.5-VL-*-Instruct chat_template (identical in both families).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# HuggingFaceTB/SmolVLM-256M-Instruct chat_template.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def qwen_tokenizer(tok_obj):
    t = tokenizers.Tokenizer.from_str(tok_obj.to_str())
    t.add_special_tokens([VIDEO_PAD])
    assert t.token_to_id(VIDEO_PAD) == 512
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": VIDEO_PAD,
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
        model_max_length=4096, padding_side="left", clean_up_tokenization_spaces=False,
        add_bos_token=False, add_eos_token=False, chat_template=QWEN2_VL_TEMPLATE,
    )


def idefics3_tokenizer(tok_obj):
    t = tokenizers.Tokenizer.from_str(tok_obj.to_str())
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
        model_max_length=4096, padding_side="left", clean_up_tokenization_spaces=False,
        add_bos_token=False, add_eos_token=False, chat_template=SMOLVLM_TEMPLATE,
    )


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 112 * 112  # factor 28 = patch 14 * merge 2 -> <= 64 patches, 16 tokens
QWEN_TEXT = dict(
    vocab_size=513, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=0.2,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},  # head_dim 16
    bos_token_id=7, eos_token_id=6, pad_token_id=7, use_sliding_window=False, hidden_act="silu",
)
QWEN_TOKENS = dict(image_token_id=sid("<|image_pad|>"), video_token_id=512,
                   vision_start_token_id=sid("<|vision_start|>"), vision_end_token_id=sid("<|vision_end|>"))


def qwen2_vl_config():
    vc = dict(depth=2, embed_dim=32, hidden_size=64, hidden_act="quick_gelu", mlp_ratio=4, num_heads=4,
              in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2)
    # tie_word_embeddings=True like Qwen2-VL-2B-Instruct (no lm_head.weight in the checkpoint)
    return Qwen2VLConfig(vision_config=vc, text_config={**QWEN_TEXT, "tie_word_embeddings": True},
                         tie_word_embeddings=True, **QWEN_TOKENS)


def qwen2_5_vl_config():
    # window_size 56 px = 2x2 merged tokens (4x4 patches) per window; block 0 windowed, block 1 full attention.
    vc = dict(depth=2, hidden_size=32, intermediate_size=64, hidden_act="silu", num_heads=4, in_channels=3,
              patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=56,
              out_hidden_size=64, fullatt_block_indexes=[1], initializer_range=0.2)
    return Qwen2_5_VLConfig(vision_config=vc, text_config={**QWEN_TEXT, "tie_word_embeddings": False},
                            tie_word_embeddings=False, **QWEN_TOKENS)


IDEFICS3_TILE, IDEFICS3_SIZE = 32, 128  # SmolVLM-256M: 512 / 2048 (same 4x ratio); Idefics3-8B: 364 / 1456


def idefics3_config():
    vc = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=IDEFICS3_TILE, patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
              initializer_range=0.2)
    tc = dict(model_type="llama", vocab_size=mf.VOCAB_SIZE, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=sid("<|im_start|>"),
              eos_token_id=sid("<end_of_utterance>"), pad_token_id=sid("<|im_end|>"), tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    return Idefics3Config(vision_config=vc, text_config=tc, scale_factor=2, image_token_id=sid("<image>"),
                          tie_word_embeddings=False)


def qwen_image_processor():
    return Qwen2VLImageProcessor(
        min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), resample=PILImageResampling.BICUBIC,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
    )


def qwen_video_processor():
    return Qwen2VLVideoProcessor(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, patch_size=14,
                                 temporal_patch_size=2, merge_size=2,
                                 image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))


def idefics3_image_processor():
    # SmolVLM-256M-Instruct preprocessor_config.json values except the sizes.
    return Idefics3ImageProcessor(
        do_convert_rgb=True, do_resize=True, size={"longest_edge": IDEFICS3_SIZE}, resample=PILImageResampling.LANCZOS,
        do_image_splitting=True, max_image_size={"longest_edge": IDEFICS3_TILE}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=True,
    )


IDEFICS3_IMAGE_SEQ_LEN = (IDEFICS3_TILE // 8) ** 2 // (2 ** 2)  # (tile/patch)^2 / scale_factor^2 = 4

SPECS = {
    "qwen2-vl-tiny": dict(family="qwen", cls=Qwen2VLForConditionalGeneration, config=qwen2_vl_config,
                          proc_cls=Qwen2VLProcessor, hub_layout=False, seed0=711,
                          generation_config=dict(bos_token_id=7, eos_token_id=[6, 7], pad_token_id=7)),
    "qwen2.5-vl-tiny": dict(family="qwen", cls=Qwen2_5_VLForConditionalGeneration, config=qwen2_5_vl_config,
                            proc_cls=Qwen2_5_VLProcessor, hub_layout=True, seed0=1565,
                            generation_config=dict(bos_token_id=7, eos_token_id=[6, 7], pad_token_id=7)),
    "idefics3-tiny": dict(family="idefics3", cls=Idefics3ForConditionalGeneration, config=idefics3_config,
                          proc_cls=Idefics3Processor, hub_layout=False, seed0=363,
                          generation_config=dict(bos_token_id=5, eos_token_id=[10], pad_token_id=6)),
}

# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids",
              "pixel_attention_mask")


def greedy(model, inputs, pad_token_id):
    kw = {k: v for k, v in inputs.items() if k in MODEL_KEYS}
    gc = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None,
                          pad_token_id=pad_token_id, bos_token_id=None)
    saved = model.generation_config
    model.generation_config = GenerationConfig()  # no eos filled in from the model's generation config
    try:
        with torch.no_grad():
            out = model.generate(**kw, generation_config=gc, output_logits=True, return_dict_in_generate=True)
    finally:
        model.generation_config = saved
    n = kw["input_ids"].shape[1]
    assert out.sequences.shape[1] == n + MAX_NEW_TOKENS
    return out.sequences[:, n:], torch.stack(out.logits, dim=1).float()


def prepare(processor, messages, overrides):
    hf_messages, image_names = mf.openai_to_hf(messages)
    prompt_text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    images = [mf.load_fixture_image(n) for n in image_names]
    tok = processor.tokenizer
    add_special = not (tok.bos_token is not None and prompt_text.startswith(tok.bos_token))
    inputs = processor(text=[prompt_text], images=[images] if images else None, return_tensors="pt",
                       add_special_tokens=add_special, **overrides)
    if not overrides:  # cross-check against apply_chat_template(tokenize=True)
        with_imgs = copy.deepcopy(hf_messages)
        it = iter(images)
        for m in with_imgs:
            for p in m["content"]:
                if p["type"] == "image":
                    p["image"] = next(it)
        via = processor.apply_chat_template(with_imgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
        assert via["input_ids"].tolist() == inputs["input_ids"].tolist(), "apply_chat_template != processor()"
        if images:
            assert torch.equal(via["pixel_values"], inputs["pixel_values"])
    return dict(hf_messages=hf_messages, image_names=image_names, images=images, prompt_text=prompt_text,
                inputs=inputs, overrides=overrides, add_special_tokens=add_special)


# --------------------------------------------------------------------------------------------
# 4.x-era hub layout for Qwen2.5-VL
# --------------------------------------------------------------------------------------------


def qwen_hub_key(k):
    """5.x saved key -> 4.x-era hub key (Qwen/Qwen2-VL-*, Qwen/Qwen2.5-VL-*)."""
    if k.startswith("model.visual."):
        return k[len("model."):]
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model."):]
    return k  # lm_head.weight


def qwen_config_4x(cfg):
    cfg = copy.deepcopy(cfg)
    tc = cfg.pop("text_config")
    vc = cfg.pop("vision_config")
    rp = tc.pop("rope_parameters")
    out = {}
    for k, v in tc.items():
        if k in ("model_type", "architectures", "layer_types", "dtype", "output_hidden_states", "return_dict"):
            continue
        out[k] = v
    out.update({k: v for k, v in cfg.items() if k not in ("dtype", "output_hidden_states", "return_dict")})
    out["torch_dtype"] = "float32"
    out["rope_theta"] = rp["rope_theta"]
    out["rope_scaling"] = {"type": "mrope", "mrope_section": rp["mrope_section"]}
    vc = {k: v for k, v in vc.items() if k not in ("model_type", "dtype", "output_hidden_states", "return_dict",
                                                     "rope_parameters", "in_channels")}
    vc["in_chans"] = 3
    vc["spatial_patch_size"] = vc["patch_size"]
    out["vision_config"] = dict(sorted(vc.items()))
    out["transformers_version"] = "4.49.0"
    out["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    out["model_type"] = "qwen2_5_vl"
    return dict(sorted(out.items()))


def save_qwen_hub_layout(model_dir, processor):
    st = load_file(model_dir / "model.safetensors")
    renamed = {qwen_hub_key(k): v.contiguous() for k, v in st.items()}
    assert len(renamed) == len(st)
    keys = sorted(renamed)
    shards = [[k for k in keys if k.startswith("visual.") or k.startswith("lm_head")],
              [k for k in keys if k.startswith("model.")]]
    assert sum(map(len, shards)) == len(keys)
    (model_dir / "model.safetensors").unlink()
    weight_map, total = {}, 0
    for i, ks in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: renamed[k] for k in ks}, model_dir / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
        total += sum(renamed[k].numel() * renamed[k].element_size() for k in ks)
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(qwen_config_4x(cfg), indent=2) + "\n")
    # Processor files as in the Qwen/Qwen2.5-VL-*-Instruct repos: flat preprocessor_config.json (no
    # processor_config.json / video_preprocessor_config.json), chat_template.json, template also in tokenizer_config.
    for f in ("processor_config.json", "chat_template.jinja", "video_preprocessor_config.json"):
        if (model_dir / f).exists():
            (model_dir / f).unlink()
    ip = processor.image_processor.to_dict()
    flat = {k: ip[k] for k in ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean",
                               "image_std", "merge_size", "patch_size", "resample", "rescale_factor",
                               "temporal_patch_size")}
    flat.update(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, image_processor_type="Qwen2VLImageProcessor",
                processor_class="Qwen2_5_VLProcessor")
    (model_dir / "preprocessor_config.json").write_text(json.dumps(dict(sorted(flat.items())), indent=2) + "\n")
    (model_dir / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_TEMPLATE}, indent=2) + "\n")
    tc = json.loads((model_dir / "tokenizer_config.json").read_text())
    tc["chat_template"] = QWEN2_VL_TEMPLATE
    tc["processor_class"] = "Qwen2_5_VLProcessor"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# Build one model
# --------------------------------------------------------------------------------------------


def build(name, spec, tok_obj):
    fam = spec["family"]
    model_dir = MODELS_DIR / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    if fam == "qwen":
        ip = qwen_image_processor()
        processor = spec["proc_cls"](image_processor=ip, tokenizer=qwen_tokenizer(tok_obj),
                                     video_processor=qwen_video_processor(), chat_template=QWEN2_VL_TEMPLATE)
    else:
        ip = idefics3_image_processor()
        processor = Idefics3Processor(image_processor=ip, tokenizer=idefics3_tokenizer(tok_obj),
                                      image_seq_len=IDEFICS3_IMAGE_SEQ_LEN, chat_template=SMOLVLM_TEMPLATE)
    processor.save_pretrained(model_dir)
    ip.save_pretrained(model_dir)  # flat 4.x-style preprocessor_config.json next to 5.x processor_config.json

    cases_in = [(n, m, {}) for n, m in COMMON_CASES] + (IDEFICS3_EXTRA_CASES if fam == "idefics3" else [])
    processor = load_processors(model_dir)[0]
    prepared = [(n, m, prepare(processor, m, o)) for n, m, o in cases_in]
    pad_id = processor.tokenizer.pad_token_id
    config = spec["config"]()
    seed = spec["seed0"]
    while True:
        torch.manual_seed(seed)
        model = spec["cls"](config).eval()
        gaps = []
        for _, _, p in prepared:
            _, logits = greedy(model, p["inputs"], pad_id)
            top = logits[0].topk(2, -1).values
            gaps.append((top[:, 0] - top[:, 1]).min().item())
            if gaps[-1] <= MIN_GAP:
                break
        if min(gaps) > MIN_GAP:
            print(f"[{name}] seed {seed}: min gaps {[round(g, 4) for g in gaps]}", flush=True)
            break
        seed += 1
        assert seed < spec["seed0"] + 3000
    model.generation_config = GenerationConfig(**spec["generation_config"])
    model.save_pretrained(model_dir)
    native = mf.tensor_layout(model_dir)
    native_cfg = json.loads((model_dir / "config.json").read_text())
    if spec["hub_layout"]:
        save_qwen_hub_layout(model_dir, processor)
    loaded, info = spec["cls"].from_pretrained(model_dir, output_loading_info=True)
    loaded.eval()
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), (name, k, info.get(k))
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    return model_dir, model, loaded, seed, native, native_cfg, cases_in


def load_processors(model_dir):
    """(PIL-backend processor, torchvision-backend processor, default image processor class name).
    AutoProcessor.from_pretrained(dir, backend="pil") fails for Qwen2-VL (the backend is passed on to the video
    processor, which has no PIL backend): load the processor, then swap in the image processor of each backend."""
    processor = AutoProcessor.from_pretrained(model_dir)
    default_ip = type(processor.image_processor).__name__
    processor.image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    proc_tv = AutoProcessor.from_pretrained(model_dir)
    proc_tv.image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="torchvision")
    return processor, proc_tv, default_ip


def compute_positions(model, inputs):
    ids = inputs["input_ids"]
    with torch.no_grad():
        pos, delta = model.model.get_rope_index(
            ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"])
    return pos[:, 0, :], int(delta.reshape(-1)[0])


def make(name, tok_obj):
    spec = SPECS[name]
    fam = spec["family"]
    model_dir, mem_model, model, seed, native, native_cfg, cases_in = build(name, spec, tok_obj)
    processor, proc_tv, default_ip = load_processors(model_dir)
    assert type(processor) is spec["proc_cls"], type(processor)
    per_image_done = set()
    tok = processor.tokenizer
    pad_id = tok.pad_token_id
    tensors, cases = {}, []
    worst = {"pixel_values_max_abs_diff_pil_vs_torchvision": 0.0, "reload_vs_in_memory_logits_max_abs_diff": 0.0,
             "full_forward_vs_generate_max_abs_diff": 0.0}
    image_token = "<|image_pad|>" if fam == "qwen" else "<image>"
    image_token_id = tok.convert_tokens_to_ids(image_token)
    for cname, messages, overrides in cases_in:
        p = prepare(processor, messages, overrides)
        inputs = p["inputs"]
        new, logits = greedy(model, inputs, pad_id)
        _, logits_mem = greedy(mem_model, inputs, pad_id)
        worst["reload_vs_in_memory_logits_max_abs_diff"] = max(
            worst["reload_vs_in_memory_logits_max_abs_diff"], (logits - logits_mem).abs().max().item())
        new, logits = new[0], logits[0]
        assert torch.equal(new, logits.argmax(-1))
        top = logits.topk(2, -1).values
        gaps = top[:, 0] - top[:, 1]
        assert gaps.min().item() > MIN_GAP, (name, cname, gaps.min().item())
        ids = inputs["input_ids"][0]
        # Full forward (no cache) over prompt + generated tokens.
        full = torch.cat([ids, new])[None]
        fkw = {k: v for k, v in inputs.items() if k in MODEL_KEYS and k not in ("input_ids", "attention_mask")}
        if "mm_token_type_ids" in fkw:
            fkw["mm_token_type_ids"] = torch.cat(
                [fkw["mm_token_type_ids"], torch.zeros(1, MAX_NEW_TOKENS, dtype=fkw["mm_token_type_ids"].dtype)], 1)
        if fam == "qwen":
            model.model.rope_deltas = None
        with torch.no_grad():
            fw = model(input_ids=full, attention_mask=torch.ones_like(full), **fkw).logits[0, len(ids) - 1:-1]
        fw_diff = (fw - logits).abs().max().item()
        worst["full_forward_vs_generate_max_abs_diff"] = max(worst["full_forward_vs_generate_max_abs_diff"], fw_diff)

        n_img = len(p["images"])
        case = {
            "name": cname,
            "messages": messages,
            "add_generation_prompt": True,
            "hf_messages": p["hf_messages"],
            "images": p["image_names"],
            "image_sizes_wh": [list(im.size) for im in p["images"]],
            "processor_overrides": overrides,
            "prompt_text": p["prompt_text"],
            "tokenize_add_special_tokens": p["add_special_tokens"],
            "prompt_ids": ids.tolist(),
            "num_prompt_tokens": len(ids),
        }
        tensors[f"{cname}.logits"] = logits.contiguous()
        if fam == "qwen":
            thw = inputs["image_grid_thw"].tolist() if n_img else []
            per_image = [t * h * w // 4 for t, h, w in thw]
            assert int((ids == image_token_id).sum()) == sum(per_image)
            pos, delta = compute_positions(model, inputs)
            case.update(num_image_tokens=per_image, image_grid_thw=thw,
                        expanded_prompt_text=tok.decode(ids.tolist(), skip_special_tokens=False),
                        mrope_position_ids_key=f"{cname}.position_ids", rope_delta=delta,
                        mrope_position_ids_first_row_is_arange=bool(torch.equal(
                            pos[0], torch.arange(len(ids)))),
                        mm_token_type_ids=inputs["mm_token_type_ids"][0].tolist())
            tensors[f"{cname}.position_ids"] = pos.contiguous()
            if n_img:
                tensors[f"{cname}.image_grid_thw"] = inputs["image_grid_thw"].contiguous()
        else:
            rc = [processor.image_processor(images=[[im]], return_row_col_info=True, **overrides)
                  for im in p["images"]]
            rows = [int(x["rows"][0][0]) for x in rc]
            cols = [int(x["cols"][0][0]) for x in rc]
            frames = [r * c + 1 if r or c else 1 for r, c in zip(rows, cols)]
            per_image = [f * IDEFICS3_IMAGE_SEQ_LEN for f in frames]
            assert int((ids == image_token_id).sum()) == sum(per_image)
            expanded = tok.decode(ids.tolist(), skip_special_tokens=False)
            case.update(num_image_tokens=per_image, image_rows=rows, image_cols=cols, image_num_frames=frames,
                        expanded_prompt_text=expanded,
                        expanded_prompt_text_compact=expanded.replace("<image>" * IDEFICS3_IMAGE_SEQ_LEN,
                                                                      f"<image>*{IDEFICS3_IMAGE_SEQ_LEN}"))
        if n_img:
            pv = inputs["pixel_values"].float().contiguous()
            case["pixel_values_shape"] = list(pv.shape)
            tv = prepare(proc_tv, messages, overrides)["inputs"]
            assert tv["input_ids"].tolist() == inputs["input_ids"].tolist()
            pv_tv = tv["pixel_values"].float().contiguous()
            # Pixel values are stored once per image (image.<file>[.nosplit].*); the case's input is their
            # concatenation in prompt order (Qwen: dim 0 = patches; Idefics3: dim 1 = frames).
            tag = ".nosplit" if overrides.get("do_image_splitting") is False else ""
            keys = [f"image.{f}{tag}" for f in p["image_names"]]
            case["image_keys"] = keys
            cat_dim = 0 if fam == "qwen" else 1
            parts_pil, parts_tv = [], []
            for key, im in zip(keys, p["images"]):
                one = processor.image_processor(images=[im] if fam == "qwen" else [[im]], return_tensors="pt",
                                                **overrides)
                one_tv = proc_tv.image_processor(images=[im] if fam == "qwen" else [[im]], return_tensors="pt",
                                                 **overrides)
                parts_pil.append(one["pixel_values"].float())
                parts_tv.append(one_tv["pixel_values"].float())
                if key in per_image_done:
                    continue
                per_image_done.add(key)
                tensors[f"{key}.pixel_values"] = one["pixel_values"].float().contiguous()
                # The torchvision backend's pixels are compared (torchvision_backend_check)
                # but not stored: they would double the fixture size.
                if fam == "qwen":
                    tensors[f"{key}.image_grid_thw"] = one["image_grid_thw"].contiguous()
                    assert torch.equal(one["image_grid_thw"], one_tv["image_grid_thw"])
                else:
                    tensors[f"{key}.pixel_attention_mask"] = one["pixel_attention_mask"].to(torch.uint8).contiguous()
            assert torch.equal(torch.cat(parts_pil, cat_dim), pv), "per-image pixel_values != case pixel_values"
            assert torch.equal(torch.cat(parts_tv, cat_dim), pv_tv)
            if fam == "idefics3":
                case["pixel_attention_mask_all_true"] = bool(inputs["pixel_attention_mask"].all())
            new_tv, logits_tv = greedy(model, {**inputs, "pixel_values": tv["pixel_values"]}, pad_id)
            d = (pv_tv - pv).abs().max().item()
            worst["pixel_values_max_abs_diff_pil_vs_torchvision"] = max(
                worst["pixel_values_max_abs_diff_pil_vs_torchvision"], d)
            case["torchvision_backend_check"] = {
                "pixel_values_max_abs_diff": d,
                "pixel_values_mean_abs_diff": (pv_tv - pv).abs().mean().item(),
                "greedy_tokens_equal": bool(torch.equal(new_tv[0], new)),
                "logits_max_abs_diff": (logits_tv[0] - logits).abs().max().item(),
            }
        case.update({
            "greedy_tokens": new.tolist(),
            "greedy_text": tok.decode(new.tolist(), skip_special_tokens=True),
            "greedy_text_with_special": tok.decode(new.tolist(), skip_special_tokens=False),
            "min_top2_gap": round(gaps.min().item(), 6),
            "top2_gaps": [round(g, 6) for g in gaps.tolist()],
            "full_forward_vs_generate_max_abs_diff": fw_diff,
        })
        cases.append(case)
        print(f"[{name}] {cname}: {len(ids)} tokens, img tokens {per_image}, gap {case['min_top2_gap']:.4f}",
              flush=True)

    REF_DIR.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), REF_DIR / f"{name}.safetensors", metadata={"format": "pt"})
    layout = mf.tensor_layout(model_dir)
    ipd = {k: v for k, v in processor.image_processor.to_dict().items()}
    ref = {
        "model": name,
        "model_dir": f"tests/fixtures/models/{name}",
        "architecture": type(model).__name__,
        "checkpoint_layout": (
            "4.x-era hub layout: visual.*, model.{embed_tokens,layers,norm}.*, lm_head.weight; two shards + index; "
            "flat config.json (text fields top level, rope_theta, rope_scaling {type: mrope, mrope_section}, "
            "torch_dtype, vision_config.in_chans)" if spec["hub_layout"] else
            "transformers 5.x save_pretrained layout (single model.safetensors, nested text_config/vision_config, "
            "rope_parameters)"),
        "versions": mf.VERSIONS,
        "seed": seed,
        "dtype": "float32",
        "generation": {
            "call": "model.generate(**processor outputs, do_sample=False, max_new_tokens=20, eos_token_id=None, "
                    "output_logits=True, return_dict_in_generate=True) with model.generation_config emptied",
            "max_new_tokens": MAX_NEW_TOKENS, "eos_ignored": True,
            "logits": "raw per-step logits; greedy_tokens == argmax(logits) at every step",
        },
        "image_processor_backend": {
            "used_for_cases": "pil", "class": type(processor.image_processor).__name__,
            "default_without_backend_arg": default_ip,
            "torchvision_class": type(proc_tv.image_processor).__name__,
            "note": "<case>.pixel_values from AutoProcessor.from_pretrained(dir, backend='pil'); "
                    "<case>.pixel_values_torchvision from backend='torchvision' (same prompt ids)",
        },
        "image_loading": "PIL.Image.open then PIL.ImageOps.exif_transpose; the processor converts to RGB",
        "image_processor_config": ipd,
        "image_token": image_token,
        "image_token_id": image_token_id,
        "tokenizer": {
            "vocab_size": len(tok),
            "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
            "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
            "special_tokens": {**{t: i for i, t in enumerate(mf.SPECIAL_TOKENS)},
                               **({VIDEO_PAD: 512} if fam == "qwen" else {})},
        },
        "generation_config_eos_token_id": spec["generation_config"]["eos_token_id"],
        "checks": worst,
        "checkpoint_tensors": layout,
        "renamed_from_5x_save": {k: qwen_hub_key(k) for k in native if qwen_hub_key(k) != k}
        if spec["hub_layout"] else {},
        "config_5x_as_saved": native_cfg,
        "tensors_file": f"tests/fixtures/reference/{name}.safetensors",
        "cases": cases,
    }
    if fam == "qwen":
        vc = model.config.vision_config
        ref["tokens_per_image_rule"] = ("grid (t,h,w) in patches: t=1 for images (the image is repeated to "
                                        "temporal_patch_size=2), h,w = smart_resize(H,W, factor=patch*merge=28, "
                                        "min_pixels, max_pixels)/14; tokens = t*h*w/merge^2; prompt has "
                                        "<|vision_start|> + <|image_pad|>*tokens + <|vision_end|>")
        ref["tensor_keys"] = ("<case>.logits (20,vocab) float32; <case>.position_ids (3, seq) int64 M-RoPE positions "
                              "of the prompt (model.model.get_rope_index); <case>.image_grid_thw (n_images, 3) int64; "
                              "per image (case['image_keys']): image.<file>.pixel_values (t*h*w, 3*2*14*14) float32 "
                              "(PIL backend; a case's pixel_values = torch.cat over its images, dim 0), "
                              "image.<file>.pixel_values_torchvision, image.<file>.image_grid_thw (1,3). Row layout of "
                              "pixel_values: patches ordered by merge window (h/2, w/2, 2, 2), each row = "
                              "(C=3, T=2, 14, 14) flattened")
        ref["mrope"] = {"mrope_section": model.config.text_config.rope_parameters["mrope_section"],
                        "head_dim": model.config.text_config.hidden_size // model.config.text_config.num_attention_heads,
                        "rope_delta": "max(position_ids)+1 - seq_len; decode positions = cache_position + rope_delta "
                                      "for all 3 rows",
                        "text_after_image_starts_at": "image start position + max(h,w)/merge"}
        if name.startswith("qwen2.5"):
            ref["vision_window_attention"] = {
                "window_size_px": vc.window_size, "patch_size": vc.patch_size, "spatial_merge_size": vc.spatial_merge_size,
                "window_in_merged_tokens": vc.window_size // vc.spatial_merge_size // vc.patch_size,
                "fullatt_block_indexes": list(vc.fullatt_block_indexes),
                "note": "blocks not in fullatt_block_indexes attend within windows (cu_window_seqlens), others full"}
    else:
        ref["tokens_per_image_rule"] = {
            "image_seq_len_per_frame": IDEFICS3_IMAGE_SEQ_LEN,
            "formula": "image_seq_len = (image_size/patch_size)^2 / scale_factor^2 = (32/8)^2/4 = 4",
            "frames": "rows*cols tiles + 1 global image when split (rows,cols >0), else 1",
            "resize": "longest edge -> size.longest_edge (up OR down, other edge int(...) rounded up to even), then "
                      "each edge rounded UP to a multiple of max_image_size (aspect kept from the long edge), then "
                      "tiles of max_image_size in row-major order + the whole image resized to max_image_size x "
                      "max_image_size as the last frame",
            "layout_split": "for each row r, col c: <fake_token_around_image><row_r_col_c><image>*N; '\\n' after each "
                            "row; then '\\n<fake_token_around_image><global-img><image>*N<fake_token_around_image>'",
            "layout_single": "<fake_token_around_image><global-img><image>*N<fake_token_around_image>",
        }
        ref["tensor_keys"] = ("<case>.logits (20,vocab) float32; per image (case['image_keys']; '.nosplit' = "
                              "do_image_splitting False): image.<file>[.nosplit].pixel_values (1, frames, 3, 32, 32) "
                              "float32 (PIL backend; tiles row-major then the global image; a case's pixel_values = "
                              "torch.cat over its images, dim 1), image.<file>[.nosplit].pixel_values_torchvision, "
                              "image.<file>[.nosplit].pixel_attention_mask (1, frames, 32, 32) uint8 (bool)")
    (REF_DIR / f"{name}.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")


def main():
    names = sys.argv[1:] or list(SPECS)
    make_images()
    tok_obj = mf.build_tokenizer_object()
    for n in names:
        make(n, tok_obj)
    for p in sorted(list(IMG_DIR.glob("*.png")) + [q for n in names for q in (MODELS_DIR / n).rglob("*")]
                    + [REF_DIR / f"{n}.{e}" for n in names for e in ("json", "safetensors")]):
        if p.is_file():
            p.chmod(0o644)
            print(f"{p.stat().st_size:>9}  {hashlib.sha256(p.read_bytes()).hexdigest()[:12]}  {p.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
