#!/usr/bin/env python3
"""Generates the small tokenizer fixtures under tests/fixtures/text/.

Run from the repository root with the project venv:
    python scripts/gen_text_fixtures.py

Outputs (committed; the Rust tests never need Python):
  bytelevel.json      GPT-2/Qwen-style byte-level BPE (ByteLevel pre-tokenizer and decoder),
                      a small vocab so CJK characters and emojis end up split across tokens,
                      plus special and non-special added tokens.
  sentencepiece.json  Llama/Mistral-style BPE with byte fallback: `<0xNN>` tokens, a Metaspace
                      pre-tokenizer (prepend_scheme "first"), and the decoder
                      Sequence[Replace(▁→" "), ByteFallback, Fuse, Strip(" ", 1, 0)].
  sample_text.txt     A multilingual text the tests encode to get realistic id sequences.
"""
import json
import os
import random

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = os.path.join("tests", "fixtures", "text")

WORDS = [
    # English, French, German, Spanish, Vietnamese, Polish (accents and combining-free diacritics)
    "the", "image", "shows", "a", "cat", "sitting", "on", "table", "with", "two", "dogs",
    "café", "crème", "brûlée", "naïve", "façade", "élève", "où", "déjà",
    "Straße", "Grüße", "schön", "Mädchen", "über",
    "niño", "mañana", "corazón", "¿qué?", "¡hola!",
    "Tiếng", "Việt", "người", "đẹp",
    "zażółć", "gęślą", "jaźń",
    # CJK, Korean, Cyrillic, Greek, Arabic, Hindi
    "猫がテーブルの上に座っています", "这张图片显示了一只猫", "東京", "漢字", "中文字符",
    "한국어", "고양이", "Привет", "мир", "Ελληνικά", "مرحبا", "नमस्ते",
    # emojis, including ZWJ sequences and skin-tone modifiers
    "🐱", "🐶", "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🚀",
    # punctuation, digits, whitespace
    "3.14", "2024", "—", "…", "\"quoted\"", "(x)", "\n", "\t",
]

# Rare characters that appear only a few times so the small vocab cannot merge them whole.
RARE = ["𝄞", "龘", "🦀", "ꙮ", "𓀀", "﷽", "ẞ", "ǅ"]


def corpus(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.05:
            words.insert(rng.randint(0, len(words)), rng.choice(RARE))
        lines.append(" ".join(words))
    return lines


def byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(1, 3000), trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"])
    # Non-special added tokens: ASCII, chars outside the byte-level table (kept as UTF-8 by the
    # decoder), and Latin-1 chars inside the table (the decoder maps them to single bytes).
    tok.add_tokens([AddedToken("<tool_call>", special=False),
                    AddedToken("你好世界", special=False),
                    AddedToken("Ġindent", special=False)])
    return tok


def sentencepiece() -> Tokenizer:
    # Train a plain BPE on ▁-joined text with a limited alphabet, then rebuild it Llama-style with
    # <unk>, <s>, </s>, the 256 byte tokens first and byte_fallback on.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=600, limit_alphabet=120, show_progress=False)
    tok.train_from_iterator(corpus(2, 3000), trainer)
    trained = json.loads(tok.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if t not in vocab:
            vocab[t] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    sp = Tokenizer(model)
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    sp.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)
    ])
    sp.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    sp.add_special_tokens(["<image>", "<end_of_turn>"])
    sp.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("你好世界", special=False)])
    return sp


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    byte_level().save(os.path.join(OUT, "bytelevel.json"))
    sentencepiece().save(os.path.join(OUT, "sentencepiece.json"))
    sample = corpus(3, 40)
    sample.insert(5, "Rare: " + " ".join(RARE) + " <tool_call> 你好世界")
    with open(os.path.join(OUT, "sample_text.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(sample) + "\n")


if __name__ == "__main__":
    main()
