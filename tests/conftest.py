"""Shared fixtures: a tiny random GPT-NeoX checkpoint and a small text corpus, built in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may wait on the unreachable hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 15,
    "Sparse autoencoders decompose activations into features; each feature has a decoder row. " * 15,
    "Numbers 0123456789 and punctuation !?;:() appear here, with caf\u00e9 and na\u00efve words. " * 15,
]


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A folder of .txt documents (several thousand tokens)."""
    d = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(CORPUS_TEXT * 3):
        (d / f"doc{i:02d}.txt").write_text(f"Document {i}. {text}")
    return d


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, text_corpus) -> Path:
    """A randomly initialised 4-layer GPT-NeoX saved as a Hugging Face checkpoint with a BPE tokenizer."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from activations.tokenizer import train_bpe

    d = tmp_path_factory.mktemp("tiny-neox")
    tok = train_bpe(CORPUS_TEXT, vocab_size=300)
    cfg = GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25,
        use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    GPTNeoXForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def pytest_collection_modifyitems(config, items) -> None:
    """`cuda`-marked tests run only where CUDA exists (CI and the dev machine have none)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
