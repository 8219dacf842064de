"""A byte-level BPE tokenizer trained on the corpus, shaped like Pythia's.

Byte-level, so every string encodes and decodes back exactly (no unknown
tokens); `<|endoftext|>` is BOS = EOS = UNK and `<|padding|>` pads, at ids 0
and 1 as in Pythia's tokenizer, so code written for Pythia runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")  # ids 0 and 1, like Pythia


def train_bpe(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with `vocab_size` entries (fewer if the texts run out of merges).

    The `tokenizers` trainer breaks ties between equally frequent pairs by the
    pair itself, so the same texts always give the same vocabulary and merges.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must cover the 256 bytes and the special tokens, got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no tokens
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    eot, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=eot,
        eos_token=eot,
        unk_token=eot,
        pad_token=pad,
        # The default would turn " ." into "." on decode and break the round trip.
        clean_up_tokenization_spaces=False,
    )
