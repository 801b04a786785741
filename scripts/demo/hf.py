"""The demo model's tokenizer, chat template, configs and image processor, as Hugging Face objects.

Shared by train.py (which builds and saves them) and evaluate.py. One byte-level BPE vocabulary
serves both models: the CLIP text tower appends `<s> ... <|end|>` itself (its tokenizer.json
has a post-processor) and pools at the first `<|end|>`; the LLaVA decoder's tokenizer adds nothing,
its chat template writes `<s>` and the turn ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tokenizers
from tokenizers import processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    PreTrainedTokenizerFast,
)

import scenes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bpe import train_bytelevel_bpe  # noqa: E402  (scripts/bpe.py)

IMAGE_SIZE = 96  # the processor's output, pixels; patches of 12 -> an 8x8 grid of 64 image tokens
PATCH = 12
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
VOCAB_SIZE = 384
SPECIAL = ["<pad>", "<s>", "<unk>", "<|end|>", "<image>", "<|user|>", "<|assistant|>", "<|system|>"]
PAD, BOS, UNK, END, IMAGE = 0, 1, 2, 3, 4
TEXT_MAX = 64  # CLIP text positions: the longest caption is about 40 tokens
CONTEXT = 256  # decoder positions: 64 image tokens, a question and the longest caption fit

CHAT_TEMPLATE = (
    "{#- mmserve demo: <|role|> lines, images before or between text parts, turns end with <|end|> -#}\n"
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "    {{- '<|' + message['role'] + '|>\\n' -}}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{- message['content'] -}}\n"
    "    {%- else -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}\n"
    "            {%- elif item['type'] == 'text' -%}{{- item['text'] -}}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- endif -%}\n"
    "    {{- eos_token + '\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}\n"
)


def build_bpe() -> tokenizers.Tokenizer:
    return train_bytelevel_bpe(scenes.corpus(), VOCAB_SIZE, SPECIAL)


def chat_tokenizer(bpe: tokenizers.Tokenizer) -> PreTrainedTokenizerFast:
    t = tokenizers.Tokenizer.from_str(bpe.to_str())
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<s>", eos_token="<|end|>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=CHAT_TEMPLATE,
        model_max_length=CONTEXT, padding_side="left", clean_up_tokenization_spaces=False,
    )


def clip_tokenizer(bpe: tokenizers.Tokenizer) -> PreTrainedTokenizerFast:
    t = tokenizers.Tokenizer.from_str(bpe.to_str())
    t.post_processor = processors.TemplateProcessing(
        single="<s> $A <|end|>", pair="<s> $A <|end|> $B <|end|>", special_tokens=[("<s>", BOS), ("<|end|>", END)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<s>", eos_token="<|end|>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=TEXT_MAX, padding_side="right", clean_up_tokenization_spaces=False,
    )


def image_processor() -> CLIPImageProcessor:
    # A plain resize to 96x96 (no centre crop): shapes near the edges survive any aspect ratio.
    return CLIPImageProcessor(
        do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3,
        do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )


def clip_config() -> CLIPConfig:
    tc = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=TEXT_MAX, bos_token_id=BOS, eos_token_id=END,
        pad_token_id=PAD, projection_dim=128,
    )
    vc = CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=128,
    )
    return CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=128)


def llava_config(vision_config) -> LlavaConfig:
    tc = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5,
        bos_token_id=BOS, eos_token_id=END, pad_token_id=PAD, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config, text_config=tc, image_token_index=IMAGE, image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
