#!/usr/bin/env python3
"""Build mmserve's reference test fixtures with Python transformers (run by hand, offline).

Command (from the repository root; the venv at .venv has torch, torchvision, transformers,
tokenizers, safetensors, pillow, numpy, jinja2):

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/make_fixtures.py

It is deterministic (fixed seeds, single torch thread) and takes well under a minute on a
laptop CPU. It writes only under tests/fixtures/:

  images/                      copies of cat.jpg, bike.jpg, flux-robot.jpg (from $MMSERVE_SHARED_IMAGES,
                               default /work/shared/images) and generated gray.png (L), rgba.png (RGBA),
                               palette.gif (P with a transparent index), exif_rotated.jpg (EXIF Orientation=6)
  models/llava-clip-llama/     tiny random Llava (CLIP vision + Llama text) in transformers 5.x save layout
  models/llava-siglip-qwen2/   tiny random Llava (SigLIP vision + Qwen2 text) rewritten into the 4.x-era hub
                               layout (vision_tower.vision_model.*, language_model.model.*,
                               language_model.lm_head.weight, two shards + index, rope_theta in config)
  reference/<model>.json       chat-template / tokenization / greedy-generation reference per case
  reference/<model>.safetensors  <case>.pixel_values (N,3,H,W) and <case>.logits (20, vocab), float32
  reference/preprocess.json    image-preprocessing reference (both transformers image-processor backends)
  reference/preprocess.safetensors  preprocess.<processor>.<image>.<backend> (1,3,H,W) float32 and
                               rgb.<image> (H,W,3) uint8 for the small generated images

The models are random (not trained): the greedy outputs are gibberish but exactly reproducible.
"""

import copy
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import PIL.ImageOps  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
import transformers  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from bpe import train_bytelevel_bpe  # noqa: E402  (scripts/bpe.py)
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
IMG_DIR = FIX / "images"
MODELS_DIR = FIX / "models"
REF_DIR = FIX / "reference"
SHARED_IMAGES = Path(os.environ.get("MMSERVE_SHARED_IMAGES", "/work/shared/images"))

MAX_NEW_TOKENS = 20
MIN_GAP = 0.02  # required min over steps of (top1 - top2) logit, for robust token-exact comparisons

VERSIONS = {
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
    "pillow": PIL.__version__,
    "numpy": np.__version__,
}

# --------------------------------------------------------------------------------------------
# Special tokens: fixed ids 0.. in this order, shared by every fixture tokenizer (the later
# families -- Idefics3/SmolVLM, Qwen2-VL, Gemma3 -- are reserved now so ids never move).
# --------------------------------------------------------------------------------------------
SPECIAL_TOKENS = [
    "<unk>",  # 0
    "<s>",  # 1  bos (llama-style)
    "</s>",  # 2  eos (llama-style)
    "<pad>",  # 3
    "<image>",  # 4  llava image placeholder
    "<|im_start|>",  # 5  ChatML
    "<|im_end|>",  # 6  ChatML (qwen2 eos)
    "<|endoftext|>",  # 7  qwen2 pad / document end
    "<fake_token_around_image>",  # 8  idefics3
    "<global-img>",  # 9  idefics3
    "<end_of_utterance>",  # 10 idefics3
    "<|vision_start|>",  # 11 qwen2-vl
    "<|vision_end|>",  # 12 qwen2-vl
    "<|image_pad|>",  # 13 qwen2-vl
    "<start_of_image>",  # 14 gemma3
    "<end_of_image>",  # 15 gemma3
    "<image_soft_token>",  # 16 gemma3
    "<start_of_turn>",  # 17 gemma3
    "<end_of_turn>",  # 18 gemma3
] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]  # 19..54 idefics3 tiles
VOCAB_SIZE = 512


TOKENIZER_SAMPLES = [
    "Hello world!",
    "café naïve résumé 😀🚲 你好，世界",
    "<image>\nWhat is this?",
    "<s>USER: hi</s>",
    "<|im_start|>user\nhi<|im_end|>\n",
    "  leading spaces and\ttabs\n\nnewlines  ",
    "unknownword xyzzy 12345",
]


def special_id(tok):
    return SPECIAL_TOKENS.index(tok)


# --------------------------------------------------------------------------------------------
# Chat templates (written for these fixtures).
# --------------------------------------------------------------------------------------------
# LLaVA-1.5 style ("USER: <image>\n... ASSISTANT:"), iterates content parts in order, whitespace
# fully controlled with '-' so it renders the same with or without trim_blocks/lstrip_blocks.
LLAVA_LLAMA_TEMPLATE = (
    "{#- LLaVA-1.5 style prompt: images and text rendered in the order of the content parts -#}\n"
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message['role'] == 'system' -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}\n"
    "        {%- endfor -%}\n"
    "        {{- '\\n' -}}\n"
    "    {%- elif message['role'] == 'user' -%}\n"
    "        {{- 'USER: ' -}}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}\n"
    "            {%- elif item['type'] == 'text' -%}{{- item['text'] -}}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "        {{- ' ' -}}\n"
    "    {%- elif message['role'] == 'assistant' -%}\n"
    "        {{- 'ASSISTANT: ' }}{% generation %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endgeneration %}{{ '\\n' -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}\n"
)

# ChatML with a default system message; content may be a string or a list of parts. This one
# relies on transformers' Jinja settings trim_blocks=True and lstrip_blocks=True (as many hub
# templates do): rendering it without them gives extra newlines/indentation.
QWEN2_CHATML_TEMPLATE = """{% set default_system = 'You are a helpful assistant.' %}
{% if messages | selectattr('role', 'equalto', 'system') | list | length == 0 %}
<|im_start|>system
{{ default_system }}<|im_end|>
{% endif %}
{% for message in messages %}
<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}
{{ message['content'] }}<|im_end|>
{% else %}
    {% for part in message['content'] %}
        {% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}
    {% endfor %}
<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

# --------------------------------------------------------------------------------------------
# Test cases (OpenAI chat format; "fixture:<file>" is replaced by a data URL in the Rust tests)
# --------------------------------------------------------------------------------------------


def img_part(name):
    return {"type": "image_url", "image_url": {"url": f"fixture:{name}"}}


def txt(text):
    return {"type": "text", "text": text}


CASES = [
    (
        "text_system",
        [
            {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
            {"role": "user", "content": "What is the capital of France? Répondez en français, s'il vous plaît 🙂"},
        ],
    ),
    (
        "text_multiturn",
        [
            {"role": "user", "content": "Hello! Can you count to three?"},
            {"role": "assistant", "content": "Sure: one, two, three."},
            {"role": "user", "content": [txt("Now count backwards. 你好，谢谢！")]},
        ],
    ),
    (
        "one_image",
        [{"role": "user", "content": [img_part("cat.jpg"), txt("What animal is in this picture?")]}],
    ),
    (
        "two_images",
        [
            {
                "role": "user",
                "content": [
                    txt("Here is a bike:"),
                    img_part("bike.jpg"),
                    txt("and here is a robot:"),
                    img_part("flux-robot.jpg"),
                    txt("Which one is older?"),
                ],
            }
        ],
    ),
    (
        "gray_image",
        [
            {"role": "system", "content": [txt("You describe images.")]},
            {"role": "user", "content": [txt("Describe the gradient."), img_part("gray.png")]},
        ],
    ),
    (
        "rgba_image",
        [{"role": "user", "content": [img_part("rgba.png"), txt("Is this image transparent?")]}],
    ),
    (
        "exif_image",
        [{"role": "user", "content": [img_part("exif_rotated.jpg"), txt("Which way is the arrow pointing?")]}],
    ),
    (
        "palette_multiturn",
        [
            {"role": "user", "content": [img_part("palette.gif"), txt("What colors do you see?")]},
            {"role": "assistant", "content": "Red, green and blue."},
            {"role": "user", "content": "And which one is the largest?"},
        ],
    ),
]


def openai_to_hf(messages):
    """OpenAI messages -> HF processor messages: string content becomes one text part, image_url
    parts become {"type": "image"}. Returns (hf_messages, [image file names in order])."""
    out, images = [], []
    for m in messages:
        c = m["content"]
        if isinstance(c, str):
            parts = [{"type": "text", "text": c}]
        else:
            parts = []
            for p in c:
                if p["type"] == "text":
                    parts.append({"type": "text", "text": p["text"]})
                elif p["type"] == "image_url":
                    parts.append({"type": "image"})
                    images.append(p["image_url"]["url"].split(":", 1)[1])
                else:
                    raise ValueError(p)
        out.append({"role": m["role"], "content": parts})
    return out, images


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def make_images():
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    for name in ["cat.jpg", "bike.jpg", "flux-robot.jpg"]:
        shutil.copyfile(SHARED_IMAGES / name, IMG_DIR / name)

    # gray.png: mode L, 40x30, horizontal gradient with a dark square and a bright disc.
    g = np.tile(np.linspace(20, 235, 40, dtype=np.float64), (30, 1)).round().astype(np.uint8)
    gray = Image.fromarray(g, mode="L")
    d = ImageDraw.Draw(gray)
    d.rectangle([4, 4, 13, 13], fill=10)
    d.ellipse([24, 14, 35, 25], fill=250)
    gray.save(IMG_DIR / "gray.png", optimize=False)

    # rgba.png: 50x40 RGBA, colour gradient, alpha ramp left->right, fully transparent corner.
    yy, xx = np.mgrid[0:40, 0:50]
    rgba = np.zeros((40, 50, 4), dtype=np.uint8)
    rgba[..., 0] = (xx * 5).clip(0, 255)
    rgba[..., 1] = (yy * 6).clip(0, 255)
    rgba[..., 2] = 200
    rgba[..., 3] = (40 + xx * 4.3).clip(0, 255).astype(np.uint8)
    rgba[:12, :12, 3] = 0
    rgba[:12, :12, :3] = (0, 0, 0)  # hidden colour under full transparency
    rgba[28:, 38:] = (255, 0, 0, 255)  # opaque red block
    Image.fromarray(rgba, mode="RGBA").save(IMG_DIR / "rgba.png", optimize=False)

    # palette.gif: 30x30 mode P with a 5-entry palette; index 0 is transparent.
    pal_img = Image.new("P", (30, 30), 0)
    palette = [0, 0, 0, 255, 0, 0, 0, 160, 0, 0, 0, 255, 255, 255, 0]
    pal_img.putpalette(palette + [0] * (768 - len(palette)))
    d = ImageDraw.Draw(pal_img)
    d.rectangle([2, 2, 17, 17], fill=1)  # red, largest
    d.rectangle([18, 4, 27, 13], fill=2)  # green
    d.ellipse([6, 19, 16, 28], fill=3)  # blue
    d.line([20, 20, 28, 28], fill=4, width=2)  # yellow
    pal_img.save(IMG_DIR / "palette.gif", transparency=0, optimize=False)

    # exif_rotated.jpg: stored 64x40, EXIF Orientation=6 (displayed 40x64, rotated 90 deg clockwise).
    stored = Image.new("RGB", (64, 40), (235, 235, 235))
    d = ImageDraw.Draw(stored)
    d.rectangle([0, 0, 15, 39], fill=(200, 30, 30))  # red bar on the stored left
    d.polygon([(22, 12), (48, 12), (48, 4), (62, 20), (48, 36), (48, 28), (22, 28)], fill=(20, 40, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(IMG_DIR / "exif_rotated.jpg", quality=90, exif=exif.tobytes(), subsampling=0)


def load_fixture_image(name):
    """What the Rust server is expected to do: decode, then apply the EXIF orientation."""
    with Image.open(IMG_DIR / name) as im:
        im.load()
        return PIL.ImageOps.exif_transpose(im)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def corpus():
    rng = random.Random(1234)
    subjects = ["The cat", "A small dog", "My friend", "The robot", "A red bike", "The teacher", "Our team",
                "The old man", "A young girl", "The computer", "This picture", "The image", "The assistant",
                "Every student", "The bird", "A blue car", "The chef", "The city", "The river", "The model"]
    verbs = ["sees", "likes", "describes", "shows", "paints", "finds", "carries", "answers", "watches",
             "counts", "reads", "writes", "builds", "opens", "follows", "explains", "draws", "visits"]
    objects = ["a bright window", "the green garden", "three apples", "an interesting question", "the sky",
               "a long story", "the blue ocean", "two wheels", "a tall building", "the morning news",
               "a gray gradient", "the transparent layer", "five colors", "the picture on the wall",
               "a helpful answer", "the capital of France", "the largest square", "a wooden table"]
    tails = ["today.", "in the morning.", "with care.", "very slowly!", "again and again.", "near the door.",
             "because it is fun.", "without any help?", "for the first time.", "at night.", "quickly.", ""]
    lines = []
    for _ in range(260):
        lines.append(" ".join(x for x in [rng.choice(subjects), rng.choice(verbs), rng.choice(objects),
                                         rng.choice(tails)] if x))
    lines += [
        "USER: What is in this image? ASSISTANT: A cat sitting on a sofa.",
        "You are a helpful assistant. Answer the question about the picture.",
        "Describe the image in detail. What colors do you see? Which one is older?",
        "One, two, three, four, five, six, seven, eight, nine, ten. 1 2 3 4 5 6 7 8 9 10 100 2024",
        "Hello! How are you? I am fine, thank you. Sure: here is the answer.",
        "Le café est très bon. Un naïve résumé de la façade. Répondez en français, s'il vous plaît.",
        "Straße, Größe, über, schön; señor, año, niño; Ångström, Øre, Æble.",
        "Emoji time: 🙂 😀 🐱 🚲 🤖 🎨 ❤️ 👍 — fin.",
        "你好，世界。这是一只猫。谢谢！我喜欢自行车和机器人。",
        "日本語のテキストです。こんにちは。",
        "Здравствуйте, как дела? Спасибо.",
        "Code: fn main() { println!(\"hi\"); } // tabs\tand\nnewlines\n\n  indented",
        "Symbols: #$%&*()[]{}<>+=-_~^|\\/@!?;:'\",. `quotes`",
    ]
    return lines


def build_tokenizer_object():
    tok = train_bytelevel_bpe(corpus(), VOCAB_SIZE, SPECIAL_TOKENS)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return tok


def wrap_tokenizer(tok_obj, kind):
    tok_obj = tokenizers.Tokenizer.from_str(tok_obj.to_str())
    common = dict(
        tokenizer_object=tok_obj,
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=512,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    if kind == "llama":
        t = PreTrainedTokenizerFast(
            bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
            add_bos_token=True, add_eos_token=False, chat_template=LLAVA_LLAMA_TEMPLATE, **common,
        )
    else:
        t = PreTrainedTokenizerFast(
            bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            add_bos_token=False, add_eos_token=False, chat_template=QWEN2_CHATML_TEMPLATE, **common,
        )
    return t


# --------------------------------------------------------------------------------------------
# Model specs
# --------------------------------------------------------------------------------------------


def llava_clip_llama_config():
    vc = CLIPVisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=48, patch_size=8, projection_dim=32, initializer_range=0.2,
    )
    tc = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=512, rms_norm_eps=1e-6,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vc, text_config=tc, image_token_index=special_id("<image>"), image_seq_length=36,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        initializer_range=0.2, tie_word_embeddings=False,
    )


def llava_siglip_qwen2_config():
    vc = SiglipVisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, vision_use_head=False, initializer_range=0.2,
    )
    tc = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        initializer_range=0.2, bos_token_id=7, eos_token_id=6, tie_word_embeddings=False,
        use_sliding_window=False,
    )
    return LlavaConfig(
        vision_config=vc, text_config=tc, image_token_index=special_id("<image>"), image_seq_length=16,
        vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
        initializer_range=0.2, tie_word_embeddings=False,
    )


def clip_image_processor(cls=CLIPImageProcessor):
    return cls(
        do_resize=True, size={"shortest_edge": 48}, resample=PILImageResampling.BICUBIC,
        do_center_crop=True, crop_size={"height": 48, "width": 48},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True,
    )


def siglip_image_processor(cls=SiglipImageProcessor):
    return cls(
        do_resize=True, size={"height": 32, "width": 32}, resample=PILImageResampling.BICUBIC,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )


MODELS = [
    {
        "name": "llava-clip-llama",
        "config": llava_clip_llama_config,
        "tokenizer": "llama",
        "image_processor": clip_image_processor,
        "preprocess_name": "clip-48",
        "processor_kwargs": dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1),
        "generation_config": dict(bos_token_id=1, eos_token_id=2, pad_token_id=3),
        "seed0": 1520,
        "hub_layout": False,
    },
    {
        "name": "llava-siglip-qwen2",
        "config": llava_siglip_qwen2_config,
        "tokenizer": "qwen2",
        "image_processor": siglip_image_processor,
        "preprocess_name": "siglip-32",
        "processor_kwargs": dict(patch_size=8, vision_feature_select_strategy="full", num_additional_image_tokens=0),
        "generation_config": dict(bos_token_id=7, eos_token_id=[6, 7], pad_token_id=7),
        "seed0": 3114,
        "hub_layout": True,
    },
]


# --------------------------------------------------------------------------------------------
# Generation helpers
# --------------------------------------------------------------------------------------------


def prepare_case(processor, messages):
    hf_messages, image_names = openai_to_hf(messages)
    prompt_text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    images = [load_fixture_image(n) for n in image_names]
    # Same messages with the decoded (EXIF-transposed) PIL images attached to the image parts.
    with_imgs = copy.deepcopy(hf_messages)
    it = iter(images)
    for m in with_imgs:
        for p in m["content"]:
            if p["type"] == "image":
                p["image"] = next(it)
    inputs = processor.apply_chat_template(
        with_imgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    # Cross-check: the processor called directly on the rendered prompt gives the same ids.
    # NB: apply_chat_template(tokenize=True) tokenizes with add_special_tokens=False only when the rendered
    # prompt starts with bos_token; calling processor(text=...) yourself adds a second bos otherwise.
    starts_with_bos = processor.tokenizer.bos_token is not None and prompt_text.startswith(processor.tokenizer.bos_token)
    direct = processor(text=prompt_text, images=images or None, return_tensors="pt",
                       add_special_tokens=not starts_with_bos)
    assert direct["input_ids"].tolist() == inputs["input_ids"].tolist(), "apply_chat_template != processor()"
    if images:
        assert torch.equal(direct["pixel_values"], inputs["pixel_values"])
    return hf_messages, image_names, images, prompt_text, inputs


def greedy(model, inputs, pad_token_id):
    kw = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    # Exactly MAX_NEW_TOKENS argmax tokens, eos ignored (like vLLM's ignore_eos): generate() fills unset
    # (None) fields from model.generation_config, so that one is swapped for an empty config meanwhile.
    # (min_new_tokens is NOT used: it would mask the eos logits and change the greedy choice.)
    gc = GenerationConfig(
        do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None, pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        with torch.no_grad():
            out = model.generate(
                **kw, generation_config=gc, output_logits=True, output_scores=True, return_dict_in_generate=True,
            )
    finally:
        model.generation_config = saved
    assert out.sequences.shape[1] == kw["input_ids"].shape[1] + MAX_NEW_TOKENS
    prompt_len = kw["input_ids"].shape[1]
    new = out.sequences[:, prompt_len:]
    logits = torch.stack(out.logits, dim=1).float()  # (B, steps, vocab): raw, before logits processors
    return new, logits


def top2_gaps(logits):
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


# --------------------------------------------------------------------------------------------
# Hub-layout rewrite (4.x era), used for llava-siglip-qwen2
# --------------------------------------------------------------------------------------------


def hub_key(k):
    """transformers 5.x saved key -> 4.x-era hub key (as in llava-hf/* checkpoints)."""
    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + k[len("vision_tower."):]
    if k == "lm_head.weight":
        return "language_model.lm_head.weight"
    if k.startswith("language_model.") and not (
        k.startswith("language_model.model.") or k.startswith("language_model.lm_head.")
    ):
        return "language_model.model." + k[len("language_model."):]
    if k.startswith("model."):  # in case a version saves the runtime names
        rest = k[len("model."):]
        if rest.startswith("language_model."):
            return "language_model.model." + rest[len("language_model."):]
        if rest.startswith("vision_tower."):
            return hub_key(rest)
        return rest
    return k


def rewrite_config_4x(cfg):
    """config.json (5.x) -> the 4.x-era hub style: rope_theta instead of rope_parameters,
    torch_dtype instead of dtype, no 5.x-only bookkeeping fields."""
    cfg = copy.deepcopy(cfg)

    def fix(d):
        if "dtype" in d:
            d["torch_dtype"] = d.pop("dtype")
        rp = d.pop("rope_parameters", None)
        if rp is not None:
            rp = dict(rp)
            d["rope_theta"] = rp.pop("rope_theta")
            if rp.get("rope_type", "default") != "default":
                d["rope_scaling"] = {"type": rp.pop("rope_type"), **rp}
            else:
                d["rope_scaling"] = None
        d.pop("layer_types", None)
        return d

    fix(cfg)
    tc = fix(cfg["text_config"])
    tc.setdefault("architectures", ["Qwen2ForCausalLM"])
    cfg["vision_config"] = fix(cfg["vision_config"])
    cfg["text_config"] = dict(sorted(tc.items()))
    cfg["vision_config"] = dict(sorted(cfg["vision_config"].items()))
    cfg["transformers_version"] = "4.45.0"
    return {k: cfg[k] for k in sorted(cfg)}


def save_hub_layout(model_dir):
    st = load_file(model_dir / "model.safetensors")
    renamed = {hub_key(k): v.contiguous() for k, v in st.items()}
    assert len(renamed) == len(st)
    keys = sorted(renamed)
    total = sum(renamed[k].numel() * renamed[k].element_size() for k in keys)
    shards, acc, cur = [[], []], 0, 0
    for k in keys:
        if cur == 0 and acc >= total / 2:
            cur = 1
        shards[cur].append(k)
        acc += renamed[k].numel() * renamed[k].element_size()
    assert shards[0] and shards[1]
    (model_dir / "model.safetensors").unlink()
    weight_map = {}
    for i, ks in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: renamed[k] for k in ks}, model_dir / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(rewrite_config_4x(cfg), indent=2) + "\n")
    return [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]


def save_hub_processor_files(model_dir, spec, tok_obj):
    """Replace the 5.x processor/tokenizer files by the 4.x-era hub ones (as in llava-hf/* repos):
    preprocessor_config.json (image processor, flat), processor_config.json (processor attributes only),
    chat_template.json ({"chat_template": ...}) and a tokenizer_config.json with the template inline and
    an added_tokens_decoder; tokenizer.json is kept as written."""
    pc = json.loads((model_dir / "processor_config.json").read_text())
    ip = pc.pop("image_processor")
    ip["processor_class"] = "LlavaProcessor"
    (model_dir / "preprocessor_config.json").write_text(json.dumps(dict(sorted(ip.items())), indent=2) + "\n")
    proc = {"image_token": "<image>", "processor_class": "LlavaProcessor", **spec["processor_kwargs"]}
    (model_dir / "processor_config.json").write_text(json.dumps(dict(sorted(proc.items())), indent=2) + "\n")
    template = (model_dir / "chat_template.jinja").read_text()
    (model_dir / "chat_template.jinja").unlink()
    (model_dir / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    tok = wrap_tokenizer(tok_obj, spec["tokenizer"])
    tc = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": tok.bos_token,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": tok.eos_token,
        "errors": "replace",
        "extra_special_tokens": {"image_token": "<image>"},
        "model_max_length": 512,
        "pad_token": tok.pad_token,
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def tensor_layout(model_dir):
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    keys = {}
    for f in files:
        with safe_open(model_dir / f, "pt") as h:
            for k in h.keys():
                keys[k] = {"file": f, "shape": list(h.get_slice(k).get_shape()), "dtype": h.get_slice(k).get_dtype()}
    return dict(sorted(keys.items()))


# --------------------------------------------------------------------------------------------
# Build one model + its reference
# --------------------------------------------------------------------------------------------


def build_model(spec, tok_obj):
    name = spec["name"]
    model_dir = MODELS_DIR / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)

    tokenizer = wrap_tokenizer(tok_obj, spec["tokenizer"])
    image_processor = spec["image_processor"]()
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template,
        image_token="<image>", **spec["processor_kwargs"],
    )
    processor.save_pretrained(model_dir)
    if spec["hub_layout"]:
        save_hub_processor_files(model_dir, spec, tok_obj)
    else:
        # 5.x nests the image processor inside processor_config.json; also write the standalone
        # preprocessor_config.json that image-processor-only loaders (and hub repos) have.
        image_processor.save_pretrained(model_dir)
    template = tokenizer.chat_template
    # The cases use the PIL image-processor backend (transformers' default would be torchvision when it is
    # installed): its uint8 resampling is what a PIL-exact implementation reproduces bit for bit. The
    # torchvision backend's outputs are compared per case (torchvision_backend_check) and in preprocess.json.
    default_cls = type(AutoProcessor.from_pretrained(model_dir).image_processor).__name__
    assert default_cls == type(image_processor).__name__, default_cls
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.chat_template == template and processor.tokenizer.chat_template == template
    assert type(processor.image_processor).__name__ == type(image_processor).__name__ + "Pil"
    drop = lambda d: {k: v for k, v in d.items() if k != "image_processor_type"}  # noqa: E731
    assert drop(processor.image_processor.to_dict()) == drop(image_processor.to_dict())
    for k, v in spec["processor_kwargs"].items():
        assert getattr(processor, k) == v, (k, getattr(processor, k), v)
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id
    fresh = wrap_tokenizer(tok_obj, spec["tokenizer"])
    for text in TOKENIZER_SAMPLES:
        for add in (True, False):
            assert tokenizer(text, add_special_tokens=add)["input_ids"] == fresh(text, add_special_tokens=add)["input_ids"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (fresh.bos_token, fresh.eos_token, fresh.pad_token)

    prepared = []
    for case_name, messages in CASES:
        hf_messages, image_names, images, prompt_text, inputs = prepare_case(processor, messages)
        prepared.append((case_name, messages, hf_messages, image_names, images, prompt_text, inputs))

    # Pick the first seed (from seed0 on) whose greedy decodes have top1 - top2 > MIN_GAP at every step of
    # every case. With a random model each step's gap is roughly exponential with mean ~0.05, so only about
    # one seed in a few hundred passes for 8 cases x 20 steps; seed0 is set to the seed found by this search
    # so the normal run needs one try (the loop stays as a check and as the search if anything changes).
    config = spec["config"]()
    seed = spec["seed0"]
    while True:
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
        gaps = []
        for (_, _, _, _, _, _, inputs) in prepared:
            _, logits = greedy(model, inputs, pad_id)
            gaps.append(top2_gaps(logits[0]).min().item())
            if gaps[-1] <= MIN_GAP:
                break
        if min(gaps) > MIN_GAP:
            print(f"[{name}] seed {seed}: min top2 gap per case {[round(g, 4) for g in gaps]}")
            break
        seed += 1
        assert seed < spec["seed0"] + 5000, "no seed with a large enough logit gap"

    model.generation_config = GenerationConfig(**spec["generation_config"])
    model.save_pretrained(model_dir)
    native_layout = tensor_layout(model_dir)
    if spec["hub_layout"]:
        save_hub_layout(model_dir)

    # Reload from disk: the reference comes from exactly what is in the fixture directory.
    loaded, info = LlavaForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    loaded.eval()
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), (name, k, info.get(k))
    sd_mem, sd_disk = model.state_dict(), loaded.state_dict()
    assert sd_mem.keys() == sd_disk.keys()
    for k in sd_mem:
        assert torch.equal(sd_mem[k], sd_disk[k]), (name, k)
    return model_dir, processor, tokenizer, loaded, model, seed, prepared, native_layout


def make_reference(spec, tok_obj):
    name = spec["name"]
    model_dir, processor, tokenizer, model, mem_model, seed, prepared, native_layout = build_model(spec, tok_obj)
    pad_id = tokenizer.pad_token_id
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_token_id == model.config.image_token_id == special_id("<image>")

    # Torchvision-backend image processor, to check how sensitive the greedy outputs are to the backend.
    tv_ip = AutoImageProcessor.from_pretrained(model_dir, backend="torchvision")
    used_ip_cls = type(processor.image_processor).__name__

    tensors = {}
    cases = []
    max_same_logits_diff = 0.0
    for case_name, messages, hf_messages, image_names, images, prompt_text, inputs in prepared:
        new, logits = greedy(model, inputs, pad_id)
        _, logits_mem = greedy(mem_model, inputs, pad_id)
        max_same_logits_diff = max(max_same_logits_diff, (logits - logits_mem).abs().max().item())
        new, logits = new[0], logits[0]
        assert new.shape[0] == MAX_NEW_TOKENS
        assert torch.equal(new, logits.argmax(-1)), "greedy token != argmax of raw logits"
        gaps = top2_gaps(logits)
        ids = inputs["input_ids"][0]

        # Full-sequence forward (no KV cache) vs the incremental logits of generate().
        full_ids = torch.cat([ids, new])[None]
        with torch.no_grad():
            fw = model(
                input_ids=full_ids, attention_mask=torch.ones_like(full_ids),
                pixel_values=inputs.get("pixel_values"),
            ).logits[0, len(ids) - 1: len(ids) - 1 + MAX_NEW_TOKENS]
        fw_diff = (fw - logits).abs().max().item()

        n_img_tok = int((ids == image_token_id).sum())
        per_image = [n_img_tok // len(images)] * len(images) if images else []
        if images:
            # LlavaProcessor computes (H // patch) * (W // patch) + num_additional_image_tokens - (1 if strategy
            # == "default") from the processed pixel_values; its _get_num_multimodal_tokens helper reads
            # crop_size, which SigLIP's processor does not have (TypeError), so it is only checked for CLIP.
            if getattr(processor.image_processor, "crop_size", None):
                mm = processor._get_num_multimodal_tokens(image_sizes=[im.size[::-1] for im in images])
                assert list(mm["num_image_tokens"]) == per_image, (mm, per_image)
            h, w = inputs["pixel_values"].shape[-2:]
            pk = spec["processor_kwargs"]
            expect = (h // pk["patch_size"]) * (w // pk["patch_size"]) + pk["num_additional_image_tokens"] - (
                1 if pk["vision_feature_select_strategy"] == "default" else 0)
            assert per_image == [expect] * len(images) and n_img_tok == expect * len(images)
            assert expect == model.config.image_seq_length

        case = {
            "name": case_name,
            "messages": messages,
            "add_generation_prompt": True,
            "hf_messages": hf_messages,
            "images": image_names,
            "prompt_text": prompt_text,
            "prompt_ids": ids.tolist(),
            "num_prompt_tokens": len(ids),
            "num_image_tokens": per_image,
            "greedy_tokens": new.tolist(),
            "greedy_text": tokenizer.decode(new.tolist(), skip_special_tokens=True),
            "greedy_text_with_special": tokenizer.decode(new.tolist(), skip_special_tokens=False),
            "min_top2_gap": round(gaps.min().item(), 6),
            "top2_gaps": [round(g, 6) for g in gaps.tolist()],
            "full_forward_vs_generate_max_abs_diff": fw_diff,
        }
        tensors[f"{case_name}.logits"] = logits.contiguous()
        if images:
            pv = inputs["pixel_values"].float().contiguous()
            tensors[f"{case_name}.pixel_values"] = pv
            case["pixel_values_shape"] = list(pv.shape)
            with torch.no_grad():
                feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            tensors[f"{case_name}.image_features"] = torch.stack(list(feats)).float().contiguous()
            pv_tv = tv_ip(images, return_tensors="pt")["pixel_values"].float()
            new_tv, logits_tv = greedy(model, {**inputs, "pixel_values": pv_tv}, pad_id)
            case["torchvision_backend_check"] = {
                "pixel_values_max_abs_diff": (pv_tv - pv).abs().max().item(),
                "greedy_tokens_equal": bool(torch.equal(new_tv[0], new)),
                "logits_max_abs_diff": (logits_tv[0] - logits).abs().max().item(),
            }
        cases.append(case)
        print(f"[{name}] {case_name}: {len(ids)} prompt tokens, images {image_names}, "
              f"gap {case['min_top2_gap']:.4f}, text {case['greedy_text']!r}")

    # Same cases as one left-padded batch: greedy tokens should not change (informative, recorded in the JSON).
    batched = batched_check(model, processor, prepared, cases, pad_id, tensors)

    # String content vs list-of-text-parts content must render identically for the qwen2 template.
    if spec["tokenizer"] == "qwen2":
        for case_name, messages, hf_messages, *_ in prepared:
            if any(not isinstance(m["content"], str) and any(p["type"] != "text" for p in m["content"])
                   for m in messages):
                continue
            as_str = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                       else "".join(p["text"] for p in m["content"])} for m in messages]
            a = processor.apply_chat_template(as_str, add_generation_prompt=True, tokenize=False)
            b = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
            assert a == b, (a, b)

    REF_DIR.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), REF_DIR / f"{name}.safetensors", metadata={"format": "pt"})

    layout = tensor_layout(model_dir)
    ref = {
        "model": name,
        "model_dir": f"tests/fixtures/models/{name}",
        "checkpoint_layout": (
            "transformers 5.x hub-compatible save_pretrained layout (single model.safetensors)"
            if not spec["hub_layout"] else
            "rewritten to the 4.x-era hub layout: vision_tower.vision_model.*, language_model.model.*, "
            "language_model.lm_head.weight, multi_modal_projector.*; two shards + model.safetensors.index.json; "
            "config.json with rope_theta/torch_dtype (no rope_parameters)"
        ),
        "versions": VERSIONS,
        "seed": seed,
        "dtype": "float32",
        "generation": {
            "call": "model.generate(input_ids, attention_mask, pixel_values, do_sample=False, max_new_tokens=20, "
                    "eos_token_id=None, output_logits=True, return_dict_in_generate=True) with model.generation_config "
                    "temporarily emptied so no eos is filled in (eos never stops or is masked)",
            "max_new_tokens": MAX_NEW_TOKENS,
            "eos_ignored": True,
            "logits": "raw per-step logits (output_logits, before any logits processor); "
                      "greedy_tokens == argmax(logits) at every step",
        },
        "image_processor_backend": {
            "used_for_cases": "pil",
            "class": used_ip_cls,
            "note": "cases use AutoProcessor.from_pretrained(model_dir, backend='pil'); without backend= transformers "
                    "picks torchvision when it is installed (class %s); torchvision_backend_check re-runs each image "
                    "case with AutoImageProcessor.from_pretrained(model_dir, backend='torchvision') pixel_values"
                    % type(tv_ip).__name__,
        },
        "image_loading": "PIL.Image.open(file) then PIL.ImageOps.exif_transpose; the PIL image is passed to the "
                         "processor, which converts to RGB compositing any transparency onto white",
        "tokenizer": {
            "vocab_size": len(tokenizer),
            "bos_token": tokenizer.bos_token, "bos_token_id": tokenizer.bos_token_id,
            "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
            "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
            "unk_token": tokenizer.unk_token, "unk_token_id": tokenizer.unk_token_id,
            "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)},
            "adds_bos_when_add_special_tokens": tokenizer("a", add_special_tokens=True)["input_ids"][:1]
            == [tokenizer.bos_token_id],
            "bos_source": "tokenizer.json post_processor (TemplateProcessing); tokenizer_config.json has no add_bos_token"
            if spec["tokenizer"] == "llama" else "none (bos_token is null)",
        },
        "tokenizer_samples": [
            {"text": t,
             "ids_add_special_tokens_true": tokenizer(t, add_special_tokens=True)["input_ids"],
             "ids_add_special_tokens_false": tokenizer(t, add_special_tokens=False)["input_ids"],
             "decoded_skip_special": tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"],
                                                      skip_special_tokens=True)}
            for t in TOKENIZER_SAMPLES
        ],
        "generation_config_eos_token_id": spec["generation_config"]["eos_token_id"],
        "image_token": "<image>",
        "image_token_id": image_token_id,
        "image_tokens_per_image": int(model.config.image_seq_length),
        "processor": {k: v for k, v in spec["processor_kwargs"].items()},
        "reload_vs_in_memory_logits_max_abs_diff": max_same_logits_diff,
        "batched_check": batched,
        "tensors_file": f"tests/fixtures/reference/{name}.safetensors",
        "tensor_keys": "<case>.logits (20, vocab) float32 for every case; for cases with images also "
                       "<case>.pixel_values (N,3,H,W) float32 (the generation input) and <case>.image_features "
                       "(N, tokens_per_image, text_hidden) float32 = multi_modal_projector output that replaces the "
                       "<image> token embeddings",
        "vision_feature_notes": (
            "features = vision_tower hidden_states[vision_feature_layer] where hidden_states[0] is the embedding "
            "output (CLIP: after pre_layrnorm) and hidden_states[i] the output of encoder layer i; post_layernorm "
            "is NOT applied (its weights, and those of layers after the selected one, are present but unused); "
            "strategy 'default' drops the CLS position, 'full' keeps all; then linear_1 -> gelu -> linear_2"
        ),
        "checkpoint_tensors": layout,
        "renamed_from_5x_save": {k: hub_key(k) for k in native_layout if hub_key(k) != k} if spec["hub_layout"] else {},
        "cases": cases,
    }
    (REF_DIR / f"{name}.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
    return processor


def batched_check(model, processor, prepared, cases, pad_id, ref_logits):
    """All cases in one left-padded batch: do the greedy tokens match the single-sequence runs?"""
    texts = [p[5] for p in prepared]
    images = [p[4] for p in prepared]
    flat = [im for ims in images for im in ims]
    try:
        bos = processor.tokenizer.bos_token
        enc = processor(text=texts, images=flat, return_tensors="pt", padding=True,
                        add_special_tokens=not (bos is not None and texts[0].startswith(bos)))
    except Exception as e:  # pragma: no cover - informative only
        return {"ok": False, "error": repr(e)}
    assert processor.tokenizer.padding_side == "left"
    new, logits = greedy(model, enc, pad_id)
    res = {"batch_size": len(texts), "padding_side": "left", "per_case": {}}
    for i, c in enumerate(cases):
        ref = torch.tensor(c["greedy_tokens"])
        ids = enc["input_ids"][i][enc["attention_mask"][i].bool()]
        assert ids.tolist() == c["prompt_ids"], "batched prompt ids differ"
        res["per_case"][c["name"]] = {
            "greedy_tokens_equal": bool(torch.equal(new[i], ref)),
            "logits_max_abs_diff_vs_single": (logits[i] - ref_logits[c["name"] + ".logits"]).abs().max().item(),
        }
    res["all_equal"] = all(v["greedy_tokens_equal"] for v in res["per_case"].values())
    res["max_logits_abs_diff_vs_single"] = max(v["logits_max_abs_diff_vs_single"] for v in res["per_case"].values())
    return res


# --------------------------------------------------------------------------------------------
# Preprocessing reference (both backends)
# --------------------------------------------------------------------------------------------


def make_preprocess_reference():
    images = sorted(p.name for p in IMG_DIR.iterdir() if p.is_file())
    procs = {
        "clip-48": ("llava-clip-llama", clip_image_processor),
        "siglip-32": ("llava-siglip-qwen2", siglip_image_processor),
    }
    tensors, entries, summary = {}, [], {}
    for pname, (model_name, _) in procs.items():
        model_dir = MODELS_DIR / model_name
        backends = {
            "pil": AutoImageProcessor.from_pretrained(model_dir, backend="pil"),
            "torchvision": AutoImageProcessor.from_pretrained(model_dir, backend="torchvision"),
        }
        worst = 0.0
        for img_name in images:
            img = load_fixture_image(img_name)
            outs = {}
            for b, ip in backends.items():
                pv = ip(img, return_tensors="pt")["pixel_values"].float().contiguous()
                outs[b] = pv
                tensors[f"preprocess.{pname}.{img_name}.{b}"] = pv
            diff = (outs["pil"] - outs["torchvision"]).abs().max().item()
            worst = max(worst, diff)
            std = torch.tensor(backends["pil"].image_std).view(1, 3, 1, 1)
            diff_u8 = ((outs["pil"] - outs["torchvision"]).abs() * std * 255).max().item()
            entries.append({
                "processor": pname,
                "image": img_name,
                "decoded_size_wh": list(img.size),
                "decoded_mode": img.mode,
                "keys": {b: f"preprocess.{pname}.{img_name}.{b}" for b in backends},
                "shape": list(outs["pil"].shape),
                "pil_vs_torchvision_max_abs_diff": diff,
                "pil_vs_torchvision_max_abs_diff_uint8_levels": round(diff_u8, 3),
                "pil_vs_torchvision_num_values_differing": int(((outs["pil"] - outs["torchvision"]).abs() > 1e-4).sum()),
                "num_values": outs["pil"].numel(),
            })
        summary[pname] = {
            "used_by_model": model_name,
            "backends": {b: type(ip).__name__ for b, ip in backends.items()},
            "config": json.loads((model_dir / "preprocessor_config.json").read_text()),
            "max_abs_diff_pil_vs_torchvision": worst,
        }
    # Decoded RGB (after exif_transpose and white-compositing of transparency) of the small generated images.
    from transformers.image_transforms import convert_to_rgb
    for img_name in ["gray.png", "rgba.png", "palette.gif", "exif_rotated.jpg"]:
        rgb = convert_to_rgb(load_fixture_image(img_name), return_numpy=True)
        tensors[f"rgb.{img_name}"] = torch.from_numpy(np.ascontiguousarray(rgb))
    save_file(dict(sorted(tensors.items())), REF_DIR / "preprocess.safetensors", metadata={"format": "pt"})
    ref = {
        "versions": VERSIONS,
        "image_loading": "PIL.Image.open(file) then PIL.ImageOps.exif_transpose; the PIL image is passed to the image "
                         "processor (do_convert_rgb: transparency composited onto white, L/P expanded to RGB)",
        "how_backends_are_selected": "AutoImageProcessor.from_pretrained(dir, backend='pil' | 'torchvision'); "
                                     "the deprecated use_fast=False/True maps to the same; the default is "
                                     "torchvision when it is installed",
        "key_format": "preprocess.<processor>.<image>.<backend>: (1,3,H,W) float32; rgb.<image>: (H,W,3) uint8 "
                      "decoded+exif_transpose+convert_to_rgb (generated small images only)",
        "processors": summary,
        "entries": entries,
    }
    (REF_DIR / "preprocess.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")


def main():
    FIX.mkdir(parents=True, exist_ok=True)
    make_images()
    tok_obj = build_tokenizer_object()
    for spec in MODELS:
        make_reference(spec, tok_obj)
    make_preprocess_reference()
    for p in sorted(FIX.rglob("*")):
        if p.is_file():
            p.chmod(0o644)  # safetensors writes 0600
            print(f"{p.stat().st_size:>9}  {hashlib.sha256(p.read_bytes()).hexdigest()[:12]}  {p.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
