"""The on-disk store of labelled texts' token activations (evals/probes.py `cached_token_activations`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from evals import probes
from evals.probes import cached_token_activations, token_activations

HOOK = "blocks.1.hook_resid_post"
TEXTS = ["To be, or not to be.", "The quick brown fox jumps over the lazy dog, again and again.", "Sparse", ""]
KEY = {"model": "tiny", "hook": HOOK, "set": {"name": "t"}}


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from activations.models import load_local_checkpoint

    return load_local_checkpoint(tiny_checkpoint)


@pytest.fixture
def calls(model, monkeypatch) -> list[int]:
    """Counts the model's forward passes (each batch of texts is one)."""
    seen: list[int] = []
    forward = model.forward

    def counting(*args, **kwargs):
        seen.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    return seen


def _get(model, store, key=KEY, texts=TEXTS, **kwargs):
    return cached_token_activations(model, HOOK, texts, store=store, key=key, batch_size=2, progress=False, **kwargs)


def _equal(a, b) -> bool:
    return torch.equal(a.acts, b.acts) and torch.equal(a.offsets, b.offsets)


def test_a_hit_returns_the_same_tensors_without_running_the_model(model, calls, tmp_path):
    first = _get(model, tmp_path)
    assert len(calls) == 2  # 4 texts, batches of 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert _equal(first, token_activations(model, HOOK, TEXTS, batch_size=2, progress=False))
    calls.clear()
    again = _get(model, tmp_path)
    assert calls == [] and _equal(again, first)
    assert again.acts.dtype == torch.float32 and len(again) == len(TEXTS)


def test_store_none_only_computes(model, calls, tmp_path):
    _get(model, None)
    _get(model, None)
    assert len(calls) == 4


def test_a_different_key_texts_or_setting_misses(model, calls, tmp_path):
    _get(model, tmp_path)
    calls.clear()
    _get(model, tmp_path, key={**KEY, "hook": "blocks.0.hook_resid_post"})
    _get(model, tmp_path, texts=TEXTS[:3] + ["x"])
    _get(model, tmp_path, prepend_bos=False)
    _get(model, tmp_path, context=4)
    assert len(calls) == 8
    assert len(list(tmp_path.glob("*.safetensors"))) == 5
    calls.clear()
    _get(model, tmp_path, key=dict(reversed(list(KEY.items()))))  # same key, other insertion order: a hit
    cached_token_activations(model, HOOK, TEXTS, store=tmp_path, key=KEY, batch_size=3, progress=False)
    assert calls == []


def test_batch_size_and_progress_do_not_change_the_digest():
    texts = ["a", "b"]
    base = probes.activations_digest(KEY, texts, {})
    assert probes.activations_digest(KEY, texts, {"batch_size": 7, "progress": True, "device": "cpu"}) == base
    assert probes.activations_digest(KEY, texts, {"context": 128, "prepend_bos": True}) == base  # the defaults
    assert probes.activations_digest(KEY, texts, {"context": 64}) != base
    assert probes.activations_digest(KEY, ["ab"], {}) != probes.activations_digest(KEY, ["a", "b"], {})


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_counts"])
def test_a_corrupt_or_mismatched_file_is_rebuilt_with_a_warning(model, calls, tmp_path, damage):
    first = _get(model, tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    else:  # a sound file for other texts, put where these texts' file belongs
        other = _get(model, tmp_path / "other", texts=TEXTS[:2] + ["other", "texts"])
        (other_path,) = (tmp_path / "other").glob("*.safetensors")
        os.replace(other_path, path)
        assert not _equal(other, first)
    calls.clear()
    with pytest.warns(UserWarning, match=path.name) as record:
        rebuilt = _get(model, tmp_path)
    assert len(record) == 1 and "recomputing" in str(record[0].message)
    assert len(calls) == 2 and _equal(rebuilt, first)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _equal(_get(model, tmp_path), first)  # the replaced file is sound again
    assert calls == []


def test_an_unwritable_store_computes_and_warns_once(model, calls, tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.write_text("a file where the store directory should be")
    monkeypatch.setattr(probes, "_warned_stores", set())
    with pytest.warns(UserWarning, match="cannot write labelled activations") as record:
        a = _get(model, store)
        b = _get(model, store, texts=TEXTS[:2])
    assert len(record) == 1
    assert _equal(a, token_activations(model, HOOK, TEXTS, batch_size=2, progress=False)) and len(b) == 2
    assert store.read_text().startswith("a file")


def test_no_pickle_the_file_is_plain_safetensors(model, tmp_path):
    from safetensors.torch import load_file

    _get(model, tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    tensors = load_file(str(path))
    assert set(tensors) == {"acts", "offsets"} and tensors["offsets"][-1] == tensors["acts"].shape[0]
    assert not list(Path(tmp_path).glob(".*.tmp"))  # the atomic writer left no temp behind
