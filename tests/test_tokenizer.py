"""The byte-level BPE: special ids like Pythia's, exact round trip, save and reload."""

from __future__ import annotations

import itertools

import pytest

from activations.corpus import corpus_documents
from activations.tokenizer import SPECIAL_TOKENS, train_bpe

SAMPLES = [
    "Return the value of x.  Raise ValueError if x < 0 ?",
    "Grüße, naïve café — 日本語テキスト 😀\tand\r\n  spaces  ",
    " leading space, trailing newline\n",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return list(itertools.islice(corpus_documents("stdlib"), 60))


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_bpe(texts, vocab_size=512)


def test_special_tokens_and_size(tokenizer):
    assert len(tokenizer) == 512
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1]
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.unk_token_id == 0
    assert tokenizer.pad_token_id == 1
    assert tokenizer("hello")["input_ids"][0] != 0  # no BOS added: pack_contexts adds it


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_deterministic(tokenizer, texts):
    again = train_bpe(texts, vocab_size=512)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_save_and_reload(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 0, 1)


def test_vocab_too_small_is_an_error():
    with pytest.raises(ValueError, match="256 bytes"):
        train_bpe(["abc"], vocab_size=100)
