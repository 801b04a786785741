#!/usr/bin/env python3
"""Random-weight SmolVLM-256M and SmolVLM-500M for the benchmark (offline, never committed).

    .venv/bin/python bench/make_models.py [smolvlm-256m smolvlm-500m]

Writes bench/models/<name>/ (gitignored) in the transformers 5 save layout mmserve reads:
Idefics3ForConditionalGeneration with the public configs of HuggingFaceTB/SmolVLM-256M-Instruct
and SmolVLM-500M-Instruct (SigLIP base patch-16/512 vision tower, pixel-shuffle scale 4 so 64
tokens per 512 px tile, a SmolLM2 decoder, untied lm_head), their image processor settings
(longest edge 2048, 512 px tiles, splitting on) and SmolVLM's chat template. A second directory
<name>-1tile shares the weights (symlink) with `do_image_splitting` off: one 512 px tile per image,
the setting of the issue's reference figures; the real setting gives a 512 px photo 17 tiles.

The tokenizer is a byte-level BPE trained here on Python's standard library sources to the real
base vocabulary size (49152), followed by SmolVLM's added tokens at their real ids
(`<image>` 49190, `<end_of_utterance>` 49279): token counts of English prompts are realistic,
the text is not. Weights are transformers' random init (seeded): output is gibberish, speed is
what it would be with the real checkpoint. Also writes bench/models/photo-512.jpg, a 512x512
photo (from tests/fixtures/images/cat.jpg) for the image workload.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.image_utils import PILImageResampling  # noqa: E402

from bpe import train_bytelevel_bpe  # noqa: E402
from make_vlm_fixtures import SMOLVLM_TEMPLATE  # noqa: E402

OUT = ROOT / "bench" / "models"
BASE_VOCAB = 49152
VOCAB = 49280
# SmolLM2's leading special tokens (ids 0..16).
SMOLLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>",
                   "<file_sep>", "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>",
                   "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
                   "<jupyter_output>", "<jupyter_script>", "<empty_output>"]
# SmolVLM's added tokens from id 49152 on: the global-image and tile-position markers, the
# image-boundary and image tokens, reserved ones, and the end of a turn at the last id.
ADDED = (["<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
         + ["<fake_token_around_image>", "<image>"])
ADDED += [f"<|reserved_special_token_{i}|>" for i in range(VOCAB - BASE_VOCAB - len(ADDED) - 1)]
ADDED += ["<end_of_utterance>"]

VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=512, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
TEXT = dict(model_type="llama", vocab_size=VOCAB, max_position_embeddings=8192, rms_norm_eps=1e-5,
            hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, attention_bias=False)
SPECS = {
    "smolvlm-256m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64),
    "smolvlm-500m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, head_dim=64),
}


def corpus():
    """Python's standard library sources, one file at a time (about 30 MB)."""
    lib = Path(os.__file__).parent
    for path in sorted(lib.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def tokenizer():
    cache = OUT / "tokenizer-cache.json"
    if cache.exists():
        return tokenizers.Tokenizer.from_file(str(cache))
    tok = train_bytelevel_bpe(corpus(), BASE_VOCAB, SMOLLM_SPECIALS)
    short = BASE_VOCAB - tok.get_vocab_size()
    # A corpus too small for every merge: fill the base vocabulary with reserved tokens.
    tok.add_special_tokens([f"<|unused_{i}|>" for i in range(short)])
    tok.add_special_tokens(ADDED)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert tok.token_to_id("<image>") == 49190 and tok.token_to_id("<end_of_utterance>") == 49279
    OUT.mkdir(parents=True, exist_ok=True)
    tok.save(str(cache))
    return tok


def processor(tok_obj, split):
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok_obj, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", extra_special_tokens={"image_token": "<image>"},
        model_max_length=8192, padding_side="left", clean_up_tokenization_spaces=False,
        add_bos_token=False, add_eos_token=False, chat_template=SMOLVLM_TEMPLATE)
    ip = tf.Idefics3ImageProcessor(
        do_convert_rgb=True, do_resize=True, size={"longest_edge": 2048}, resample=PILImageResampling.LANCZOS,
        do_image_splitting=split, max_image_size={"longest_edge": 512}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True)
    return tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=64, chat_template=SMOLVLM_TEMPLATE)


def save_processor(proc, out):
    """transformers 5's processor_config.json plus the flat preprocessor_config.json of the hub."""
    proc.save_pretrained(out)
    proc.image_processor.save_pretrained(out)


def make(name, tok_obj):
    out = OUT / name
    if (out / "model.safetensors").exists():
        print(f"{out} exists")
        return
    torch.manual_seed(sum(map(ord, name)))
    config = tf.Idefics3Config(vision_config=VISION, text_config={**TEXT, **SPECS[name]}, scale_factor=4,
                            image_token_id=49190, tie_word_embeddings=False)
    model = tf.Idefics3ForConditionalGeneration(config).to(torch.float32).eval()
    model.save_pretrained(out)
    save_processor(processor(tok_obj, True), out)
    tf.GenerationConfig(bos_token_id=1, eos_token_id=[2, 49279], pad_token_id=2).save_pretrained(out)
    one = OUT / f"{name}-1tile"
    one.mkdir(exist_ok=True)
    for f in out.iterdir():
        if f.name not in ("preprocessor_config.json", "processor_config.json") and not (one / f.name).exists():
            (one / f.name).symlink_to(Path("..") / name / f.name)
    save_processor(processor(tok_obj, False), one)
    params = sum(p.numel() for p in model.parameters())
    print(f"{out}: {params / 1e6:.1f}M parameters; {one} (one tile per image)")


def photo():
    dst = OUT / "photo-512.jpg"
    if not dst.exists():
        src = Image.open(ROOT / "tests" / "fixtures" / "images" / "cat.jpg").convert("RGB")
        src.resize((512, 512), Image.Resampling.LANCZOS).save(dst, quality=90)


def main():
    names = sys.argv[1:] or list(SPECS)
    tok_obj = tokenizer()
    for name in names:
        make(name, tok_obj)
    photo()
    print(json.dumps({"models": [str(OUT / n) for n in names], "image": str(OUT / "photo-512.jpg")}))


if __name__ == "__main__":
    main()
