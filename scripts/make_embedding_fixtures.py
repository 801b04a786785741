#!/usr/bin/env python3
"""Build mmserve's embedding reference fixtures (tiny random CLIP and SigLIP) with Python transformers.

Command (from the repository root, offline, with the project venv):

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/make_embedding_fixtures.py

Deterministic (fixed seeds, one torch thread, trained tokenizers from a fixed corpus); a few seconds.
It reuses helpers from scripts/make_fixtures.py (corpus, image loading, image processors) and reads the
images in tests/fixtures/images (written by that script). It writes only:

  tests/fixtures/models/clip-tiny/      CLIPModel (text + vision towers, text_projection/visual_projection,
                                        projection_dim 48), CLIPTokenizer (CLIP BPE trained here: vocab.json +
                                        merges.txt + tokenizer.json), flat 4.x-style preprocessor_config.json
                                        (CLIPImageProcessor 48 px), no processor_config.json (as on the hub)
  tests/fixtures/models/siglip-tiny/    SiglipModel (vision_use_head=True, text head), byte-level BPE
                                        PreTrainedTokenizerFast (SigLIP ids: <pad>=0 </s>=1 <unk>=2, eos appended),
                                        flat preprocessor_config.json (SiglipImageProcessor 32x32)
  tests/fixtures/reference/{clip-tiny,siglip-tiny}.json + .safetensors
      text_embeds.<i> / text_embeds_normalized.<i>  (projection_dim,) float32 from model.get_text_features
      image_embeds.<img> / image_embeds_normalized.<img>  (projection_dim,) from model.get_image_features
      pixel_values.<img>  (1,3,H,W) float32 (PIL backend of the image processor)
      siglip only: text_embeds_with_attention_mask.<i> (informative, see JSON)
"""

import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (helpers: corpus, load_fixture_image, image processors, VERSIONS)

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipModel,
    SiglipProcessor,
    SiglipTextConfig,
    SiglipVisionConfig,
)

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

ROOT = mf.ROOT
MODELS_DIR = mf.MODELS_DIR
REF_DIR = mf.REF_DIR
VERSIONS = mf.VERSIONS

IMAGES = ["cat.jpg", "gray.png", "rgba.png", "palette.gif"]
TEXT_MAX = 16  # text max_position_embeddings == tokenizer model_max_length for both tiny models
PROJ = 48

TEXTS = [
    "a photo of a cat",
    "A",  # shortest non-empty
    "",  # empty: CLIP -> [bos, eos]; SigLIP -> [eos, pad...]
    "The red bike is parked near the door, and the old man watches the blue ocean in the morning light today.",
    "Café naïve résumé 😀 你好，世界",
    "  Leading spaces\tand\nnewlines  ",
]

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode table (same order as openai/CLIP's simple_tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_clip_vocab():
    """Train a CLIP-style BPE (same normalizer / pre-tokenizer / '</w>' suffix as openai/clip-*) and lay its
    vocab out like the real one: 256 byte symbols (bytes_to_unicode order), the same 256 with '</w>', the
    merge results in merge order, then <|startoftext|>, <|endoftext|> as the last two ids."""
    t = tokenizers.Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    t.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tr = trainers.BpeTrainer(vocab_size=800, min_frequency=2, special_tokens=[],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
                             show_progress=False)
    t.train_from_iterator(mf.corpus(), trainer=tr)
    merges = json.loads(t.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    base = list(bytes_to_unicode().values())
    vocab_list = base + [b + "</w>" for b in base]
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            vocab_list.append(a + b)
            seen.add(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return vocab, merges


def build_clip_tokenizer():
    vocab, merges = build_clip_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_MAX)
    assert tok.bos_token_id == len(vocab) - 2 and tok.eos_token_id == len(vocab) - 1 == tok.pad_token_id
    return tok, vocab, merges


SIGLIP_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in google/siglip-* (T5-style sentencepiece)


def build_siglip_tokenizer():
    """Byte-level BPE (the real SigLIP tokenizer is a SentencePiece model with no tokenizer.json; sentencepiece is
    not installed here), with SigLIP's special ids and its 'append </s>' rule as a TemplateProcessing
    post-processor. Lowercased like SiglipTokenizer(do_lower_case=True); punctuation is NOT stripped
    (SiglipTokenizer.canonicalize_text would strip it)."""
    t = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    t.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=640, min_frequency=2, special_tokens=SIGLIP_SPECIALS,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(mf.corpus(), trainer=tr)
    for i, s in enumerate(SIGLIP_SPECIALS):
        assert t.token_to_id(s) == i
    t.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                     special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="</s>", pad_token="</s>", unk_token="<unk>", bos_token=None,
        model_max_length=TEXT_MAX, padding_side="right", truncation_side="right",
        clean_up_tokenization_spaces=False,
    )
    assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 1, 2)
    return tok


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def clip_config(vocab_size, bos, eos):
    tc = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TEXT_MAX, projection_dim=PROJ, hidden_act="quick_gelu",
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, initializer_range=0.2, initializer_factor=4.0,
    )
    vc = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=48,
        patch_size=8, projection_dim=PROJ, hidden_act="quick_gelu", initializer_range=0.2, initializer_factor=4.0,
    )
    return CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=PROJ,
                      logit_scale_init_value=2.6592, initializer_range=0.2,
                      # CLIP's _init_weights scales by initializer_factor (not initializer_range, which only sets the
                      # patch/position embeddings): 1.0 gave image embeds with pairwise cosine up to 0.98; 4.0 gives
                      # <= 0.91 for both towers (see embeddings.*_pairwise_cosine in the JSON)
                      initializer_factor=4.0)


def siglip_config(vocab_size):
    tc = SiglipTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TEXT_MAX, projection_size=PROJ, pad_token_id=1, eos_token_id=1, bos_token_id=None,
    )
    vc = SiglipVisionConfig(
        hidden_size=PROJ, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, vision_use_head=True,
    )
    return SiglipConfig(text_config=tc.to_dict(), vision_config=vc.to_dict())


# --------------------------------------------------------------------------------------------
# Saving in the hub file layout
# --------------------------------------------------------------------------------------------


def write_flat_preprocessor_config(model_dir, image_processor, processor_class):
    """4.x / hub style: flat preprocessor_config.json (image processor fields + image_processor_type +
    processor_class); the 5.x nested processor_config.json is removed (hub CLIP/SigLIP repos have none)."""
    d = image_processor.to_dict()
    d["image_processor_type"] = type(image_processor).__name__
    d["processor_class"] = processor_class
    for k in list(d):
        if k.startswith("_") or k in ("backend",):
            d.pop(k)
    (model_dir / "preprocessor_config.json").write_text(json.dumps(dict(sorted(d.items())), indent=2) + "\n")
    pc = model_dir / "processor_config.json"
    if pc.exists():
        pc.unlink()


def cos_stats(x):
    n = torch.nn.functional.normalize(x, dim=-1)
    c = n @ n.T
    off = c[~torch.eye(len(x), dtype=torch.bool)]
    return {"min": round(off.min().item(), 4), "max": round(off.max().item(), 4), "mean": round(off.mean().item(), 4)}


def tensor_keys(model_dir):
    return {k: v for k, v in mf.tensor_layout(model_dir).items()}


# --------------------------------------------------------------------------------------------
# Build one model + reference
# --------------------------------------------------------------------------------------------


def build(kind):
    name = f"{kind}-tiny"
    model_dir = MODELS_DIR / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)

    if kind == "clip":
        tok, vocab, merges = build_clip_tokenizer()
        ip = mf.clip_image_processor()
        proc = CLIPProcessor(image_processor=ip, tokenizer=tok)
        config = clip_config(len(vocab), tok.bos_token_id, tok.eos_token_id)
        seed, model_cls, proc_cls = 4242, CLIPModel, "CLIPProcessor"
    else:
        tok = build_siglip_tokenizer()
        ip = mf.siglip_image_processor()
        proc = SiglipProcessor(image_processor=ip, tokenizer=tok)
        config = siglip_config(len(tok))
        seed, model_cls, proc_cls = 2424, SiglipModel, "SiglipProcessor"

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if kind == "siglip":
        # SigLIP inits logit_scale/logit_bias to 0; give them real-looking values (google/siglip-base-patch16-224
        # has about log(112) and -16.5) so the sigmoid-logit example is not trivially cos.
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-2.5)
    model.save_pretrained(model_dir)
    proc.save_pretrained(model_dir)
    if kind == "clip":
        (model_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
        (model_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    write_flat_preprocessor_config(model_dir, ip, proc_cls)
    if kind == "siglip":
        # 5.x writes tokenizer_class "TokenizersBackend"; use the name 4.x (and hub repos with only a
        # tokenizer.json) know. transformers 5 maps it to the same class (checked below via AutoTokenizer).
        tc_path = model_dir / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc_path.write_text(json.dumps(dict(sorted(tc.items())), indent=2, ensure_ascii=False) + "\n")

    # Reload everything from disk: the reference comes from exactly what is in the fixture directory.
    loaded, info = model_cls.from_pretrained(model_dir, output_loading_info=True)
    loaded.eval()
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), (name, k, info.get(k))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    model = loaded
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    assert type(processor).__name__ == proc_cls, type(processor)
    assert type(processor.image_processor).__name__ == type(ip).__name__ + "Pil", type(processor.image_processor)
    tokenizer = processor.tokenizer
    auto_tok = AutoTokenizer.from_pretrained(model_dir)
    for t in TEXTS:
        assert tokenizer(t)["input_ids"] == tok(t)["input_ids"] == auto_tok(t)["input_ids"], t

    tensors, text_entries = {}, []
    # ---- texts
    if kind == "clip":
        tok_kwargs = dict(padding=True, truncation=True, max_length=TEXT_MAX)
    else:
        tok_kwargs = dict(padding="max_length", truncation=True, max_length=TEXT_MAX)
    raw_text = []
    for i, t in enumerate(TEXTS):
        enc = processor(text=[t], return_tensors="pt", **tok_kwargs)
        ids = enc["input_ids"]
        untrunc = tokenizer(t)["input_ids"]
        with torch.no_grad():
            if kind == "clip":
                e = model.get_text_features(input_ids=ids, attention_mask=enc["attention_mask"]).pooler_output[0]
                e_nomask = model.get_text_features(input_ids=ids).pooler_output[0]
                assert torch.allclose(e, e_nomask, atol=1e-6)  # single text, no padding: mask is all ones
            else:
                e = model.get_text_features(input_ids=ids).pooler_output[0]
                em = model.get_text_features(input_ids=ids, attention_mask=enc["attention_mask"]).pooler_output[0]
                tensors[f"text_embeds_with_attention_mask.{i}"] = em.contiguous()
        raw_text.append(e)
        tensors[f"text_embeds.{i}"] = e.contiguous()
        tensors[f"text_embeds_normalized.{i}"] = torch.nn.functional.normalize(e, dim=-1).contiguous()
        entry = {
            "index": i, "text": t,
            "input_ids": ids[0].tolist(),
            "attention_mask": enc["attention_mask"][0].tolist(),
            "tokens": tokenizer.convert_ids_to_tokens(ids[0].tolist()),
            "untruncated_input_ids": untrunc,
            "truncated": len(untrunc) > TEXT_MAX,
            "keys": {"raw": f"text_embeds.{i}", "normalized": f"text_embeds_normalized.{i}"},
        }
        if kind == "siglip":
            entry["keys"]["raw_with_attention_mask"] = f"text_embeds_with_attention_mask.{i}"
            entry["with_vs_without_attention_mask_max_abs_diff"] = (em - e).abs().max().item()
        text_entries.append(entry)
    assert any(e["truncated"] for e in text_entries)
    if kind == "clip":
        for e in text_entries:  # legacy argmax(input_ids) pooling == first-eos pooling for this vocab
            assert e["input_ids"].index(tokenizer.eos_token_id) == max(range(len(e["input_ids"])),
                                                                       key=lambda j: (e["input_ids"][j], -j))
        ids0 = text_entries[2]["input_ids"]
        assert ids0 == [tokenizer.bos_token_id, tokenizer.eos_token_id], ids0
        trunc = next(e for e in text_entries if e["truncated"])
        assert trunc["input_ids"][0] == tokenizer.bos_token_id and trunc["input_ids"][-1] == tokenizer.eos_token_id
        assert trunc["input_ids"][:-1] == trunc["untruncated_input_ids"][:TEXT_MAX - 1]
    else:
        trunc = next(e for e in text_entries if e["truncated"])
        assert trunc["input_ids"][-1] == 1 and trunc["input_ids"][:-1] == trunc["untruncated_input_ids"][:TEXT_MAX - 1]

    # Batched texts (informative): CLIP right-padded with padding=True + attention_mask; SigLIP max_length.
    with torch.no_grad():
        benc = processor(text=TEXTS, return_tensors="pt", **tok_kwargs)
        if kind == "clip":
            be = model.get_text_features(input_ids=benc["input_ids"], attention_mask=benc["attention_mask"]).pooler_output
        else:
            be = model.get_text_features(input_ids=benc["input_ids"]).pooler_output
    batched_diff = (be - torch.stack(raw_text)).abs().max().item()

    # ---- images
    image_entries, raw_img = [], []
    for n in IMAGES:
        im = mf.load_fixture_image(n)
        pv = processor(images=im, return_tensors="pt")["pixel_values"].float()
        with torch.no_grad():
            e = model.get_image_features(pixel_values=pv).pooler_output[0]
        raw_img.append(e)
        tensors[f"pixel_values.{n}"] = pv.contiguous()
        tensors[f"image_embeds.{n}"] = e.contiguous()
        tensors[f"image_embeds_normalized.{n}"] = torch.nn.functional.normalize(e, dim=-1).contiguous()
        image_entries.append({
            "image": n, "decoded_size_wh": list(im.size), "decoded_mode": im.mode,
            "pixel_values_shape": list(pv.shape),
            "keys": {"pixel_values": f"pixel_values.{n}", "raw": f"image_embeds.{n}",
                     "normalized": f"image_embeds_normalized.{n}"},
            "raw_l2_norm": e.norm().item(),
        })

    # ---- logits example: text 0 vs image 0, via model.forward and by hand
    enc = processor(text=[TEXTS[0]], images=mf.load_fixture_image(IMAGES[0]), return_tensors="pt", **tok_kwargs)
    fw_in = {"input_ids": enc["input_ids"], "pixel_values": enc["pixel_values"]}
    if kind == "clip":
        fw_in["attention_mask"] = enc["attention_mask"]
    with torch.no_grad():
        out = model(**fw_in)
    ti = torch.nn.functional.normalize(raw_text[0], dim=-1)
    ii = torch.nn.functional.normalize(raw_img[0], dim=-1)
    cos = (ti @ ii).item()
    scale = model.logit_scale.exp().item()
    bias = model.logit_bias.item() if kind == "siglip" else 0.0
    manual = scale * cos + bias
    got = out.logits_per_image[0, 0].item()
    assert abs(manual - got) < 1e-4, (manual, got)
    assert torch.allclose(out.text_embeds[0], ti, atol=1e-6) and torch.allclose(out.image_embeds[0], ii, atol=1e-6)

    save_file(dict(sorted(tensors.items())), REF_DIR / f"{name}.safetensors", metadata={"format": "pt"})

    cfg = json.loads((model_dir / "config.json").read_text())
    layout = tensor_keys(model_dir)
    if kind == "clip":
        tokenization = {
            "call": f"processor(text=[text], padding=True, truncation=True, max_length={TEXT_MAX}, return_tensors='pt') "
                    "-- each text alone, so padding=True adds nothing; the model gets input_ids + attention_mask",
            "padding": "none for a single text (padding=True pads a batch on the right with pad_token_id)",
            "truncation": f"truncation=True, max_length={TEXT_MAX} (= model_max_length = text max_position_embeddings): "
                          f"keeps <|startoftext|> + the first {TEXT_MAX - 2} tokens + <|endoftext|> (eos kept)",
            "max_length": TEXT_MAX,
            "special_tokens_added": "<|startoftext|> X <|endoftext|> (RobertaProcessing post-processor)",
            "pooling": (
                "CLIPTextTransformer: last_hidden_state (after final_layer_norm) at the FIRST position where input_ids == "
                "text_config.eos_token_id (transformers >= PR #24773 path, taken because eos_token_id != 2). Legacy rule "
                "when text_config.eos_token_id == 2 (as in openai/clip-vit-* configs: bos 0, pad 1, eos 2): position = "
                "input_ids.argmax(-1), i.e. the highest id, which is <|endoftext|>=49407 in the real vocab. Here eos is the "
                "highest id too, so both rules give the same position. Then text_projection (no bias)."
            ),
            "attention": "causal mask + padding mask",
        }
        vision_pooling = ("CLIPVisionTransformer: embeddings (class_embedding + patches + position) -> pre_layrnorm -> "
                          "encoder -> last_hidden_state[:, 0] (CLS) -> post_layernorm -> visual_projection (no bias)")
        logits_formula = "logits_per_image = logit_scale.exp() * cos(image_embeds, text_embeds)"
    else:
        tokenization = {
            "call": f"processor(text=[text], padding='max_length', truncation=True, max_length={TEXT_MAX}, "
                    "return_tensors='pt'); the model gets input_ids ONLY (no attention_mask)",
            "padding": f"'max_length': right-padded to exactly {TEXT_MAX} tokens with pad_token '</s>' id 1 (== eos id)",
            "pad_token_id": 1,
            "truncation": f"truncation=True, max_length={TEXT_MAX}: the first {TEXT_MAX - 1} tokens + '</s>' (eos kept)",
            "max_length": TEXT_MAX,
            "max_length_note": "real google/siglip-* checkpoints: model_max_length 64 = text max_position_embeddings 64",
            "special_tokens_added": "X </s> (TemplateProcessing post-processor; no bos)",
            "attention_mask": (
                "SigLIP was trained without a text attention mask (big_vision), and the transformers 4.x SiglipTokenizer "
                "returned only input_ids, so the reference text_embeds use input_ids only: pad tokens are attended. "
                "transformers 5.x SiglipTokenizer also returns attention_mask; passing it changes the result "
                "(text_embeds_with_attention_mask.<i>, informative)"
            ),
            "pooling": "SiglipTextTransformer: final_layer_norm(last_hidden_state)[:, -1] (the LAST position, always a pad/eos "
                       "token with max_length padding) -> head (Linear with bias)",
            "attention": "bidirectional (no causal mask)",
        }
        vision_pooling = ("SiglipVisionTransformer: patches + position (no CLS) -> encoder -> post_layernorm -> head = "
                          "SiglipMultiheadAttentionPoolingHead: probe (1,1,D) queries nn.MultiheadAttention over the "
                          "tokens (in_proj_weight/in_proj_bias packed q,k,v; out_proj), then x + mlp(layernorm(x)), "
                          "take [:, 0]. No separate projection: image embed dim = vision hidden_size")
        logits_formula = "logits_per_image = logit_scale.exp() * cos(image_embeds, text_embeds) + logit_bias (sigmoid loss)"

    tk = {
        "class_saved": json.loads((model_dir / "tokenizer_config.json").read_text()).get("tokenizer_class"),
        "class_loaded": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token": tokenizer.bos_token, "bos_token_id": tokenizer.bos_token_id,
        "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
        "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
        "unk_token": tokenizer.unk_token, "unk_token_id": tokenizer.unk_token_id,
        "model_max_length": tokenizer.model_max_length,
        "padding_side": tokenizer.padding_side,
        "files": sorted(p.name for p in model_dir.iterdir() if "tok" in p.name or p.name in ("vocab.json", "merges.txt")),
        "kind": ("CLIPTokenizer (transformers 5 tokenizers backend) built from a CLIP-style BPE trained here: "
                 "NFC + collapse whitespace + lowercase, CLIP split regex + ByteLevel, '</w>' end-of-word suffix; "
                 "vocab laid out as in openai/clip-* (256 byte symbols, 256 with </w>, merges, then "
                 "<|startoftext|>, <|endoftext|> last); unk and pad are <|endoftext|>")
        if kind == "clip" else
        ("PreTrainedTokenizerFast over a byte-level BPE trained here (NFC + lowercase, ByteLevel add_prefix_space) "
         "with SigLIP's ids <pad>=0 </s>=1 <unk>=2 and a TemplateProcessing post-processor appending </s>. Real "
         "SigLIP ships a SentencePiece spiece.model (SiglipTokenizer, which also strips punctuation); this fixture "
         "only reproduces the special-id / eos / padding behaviour"),
    }

    ref = {
        "model": name,
        "model_dir": f"tests/fixtures/models/{name}",
        "architecture": type(model).__name__,
        "versions": VERSIONS,
        "seed": seed,
        "dtype": "float32",
        "checkpoint_layout": {
            "file": "model.safetensors (single file, transformers 5.x save_pretrained)",
            "save_layout_equals_hub_layout": True,
            "why": (f"transformers 5.x conversion_mapping.py has no key renaming for model_type '{cfg['model_type']}' / "
                    f"{type(model).__name__}: top-level text_model.*, vision_model.*, "
                    + ("text_projection.weight, visual_projection.weight, logit_scale"
                       if kind == "clip" else "text_model.head.*, vision_model.head.*, logit_scale, logit_bias")
                    + " are the names used by the hub checkpoints. (Only the standalone CLIPVisionModel/CLIPTextModel, "
                      "and Siglip ones mapped to them, get a PrefixChange.) Differences to expect in real checkpoints: "
                      "older ones may also contain the position_ids buffers (*.embeddings.position_ids, int64), which "
                      "transformers 5 no longer saves (persistent=False): ignore them."),
        },
        "config": {
            "model_type": cfg["model_type"],
            "architectures": cfg.get("architectures"),
            "projection_dim": cfg.get("projection_dim"),
            "text_config": {k: cfg["text_config"].get(k) for k in (
                "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim",
                "projection_size", "bos_token_id", "eos_token_id", "pad_token_id") if k in cfg["text_config"]},
            "vision_config": {k: cfg["vision_config"].get(k) for k in (
                "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "image_size", "patch_size", "num_channels", "hidden_act", "layer_norm_eps", "projection_dim",
                "vision_use_head") if k in cfg["vision_config"]},
        },
        "tokenizer": tk,
        "tokenization": tokenization,
        "vision_pooling": vision_pooling,
        "image_loading": "PIL.Image.open then PIL.ImageOps.exif_transpose; processor(images=img) with "
                         "AutoProcessor.from_pretrained(model_dir, backend='pil') (%s); RGB conversion composites "
                         "transparency onto white" % type(processor.image_processor).__name__,
        "image_processor": json.loads((model_dir / "preprocessor_config.json").read_text()),
        "embeddings": {
            "text_call": "model.get_text_features(input_ids[, attention_mask]).pooler_output[0]",
            "image_call": "model.get_image_features(pixel_values).pooler_output[0]",
            "raw_vs_normalized": "text_embeds.* / image_embeds.* are raw projections; *_normalized.* are divided by "
                                 "their L2 norm. The OpenAI-style /v1/embeddings endpoint should return the NORMALISED "
                                 "vectors (what %s.forward uses for logits and what clients compare with dot "
                                 "products)." % type(model).__name__,
            "dim": PROJ,
            "text_pairwise_cosine": cos_stats(torch.stack(raw_text)),
            "image_pairwise_cosine": cos_stats(torch.stack(raw_img)),
            "batched_texts_vs_single_max_abs_diff": batched_diff,
            "batched_texts_note": ("CLIP: all texts in one right-padded batch (padding=True) with attention_mask"
                                   if kind == "clip" else "SigLIP: all texts in one max_length batch, input_ids only"),
        },
        "logits_example": {
            "text_index": 0, "text": TEXTS[0], "image": IMAGES[0],
            "formula": logits_formula,
            "cosine": cos,
            "logit_scale_param": model.logit_scale.item(),
            "logit_scale_exp": scale,
            **({"logit_bias": bias} if kind == "siglip" else {}),
            "logits_per_image": got,
            **({"sigmoid_probability": 1 / (1 + math.exp(-got))} if kind == "siglip" else {}),
        },
        "texts": text_entries,
        "images": image_entries,
        "tensors_file": f"tests/fixtures/reference/{name}.safetensors",
        "tensor_keys": "text_embeds.<i>, text_embeds_normalized.<i>: (dim,) float32, i = index in texts; "
                       "image_embeds.<image>, image_embeds_normalized.<image>: (dim,) float32; "
                       "pixel_values.<image>: (1,3,H,W) float32"
                       + ("; text_embeds_with_attention_mask.<i>: (dim,) informative" if kind == "siglip" else ""),
        "checkpoint_tensors": layout,
    }
    (REF_DIR / f"{name}.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
    print(f"[{name}] text cos {ref['embeddings']['text_pairwise_cosine']} image cos "
          f"{ref['embeddings']['image_pairwise_cosine']} logits {got:.4f} batched diff {batched_diff:.2e}")
    return model_dir


def main():
    REF_DIR.mkdir(parents=True, exist_ok=True)
    outs = []
    for kind in ("clip", "siglip"):
        d = build(kind)
        outs += sorted(d.iterdir()) + [REF_DIR / f"{d.name}.json", REF_DIR / f"{d.name}.safetensors"]
    for p in outs:
        p.chmod(0o644)  # safetensors writes 0600
        print(f"{p.stat().st_size:>9}  {hashlib.sha256(p.read_bytes()).hexdigest()[:12]}  {p.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
