"""The byte-level BPE recipe of every tokenizer the scripts make (test fixtures, the demo model):
trained on the given lines with `tokenizers`, special tokens at ids 0..n-1 in the order given."""

from __future__ import annotations

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers


def train_bytelevel_bpe(lines, vocab_size: int, specials: list[str]) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    for i, t in enumerate(specials):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok
