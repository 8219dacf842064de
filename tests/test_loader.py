import numpy as np
import pytest
import torch

from activations.cache import open_shards
from activations.loader import ActivationLoader, split_sequences
from tests.test_harvest import run


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_checkpoint, text_corpus):
    out = tmp_path_factory.mktemp("loader") / "c"
    run(out, tiny_checkpoint, text_corpus, tokens=1200, shard_tokens=150)
    return out


def all_rows(cache):
    _, acts, toks = open_shards(cache)
    return np.concatenate(acts), np.concatenate(toks)


def test_every_row_exactly_once_per_epoch(cache):
    acts, _ = all_rows(cache)
    loader = ActivationLoader(cache, batch_size=64, split="all", seed=3)
    assert loader.n_tokens == len(acts) and len(loader) == -(-len(acts) // 64)
    for _ in range(2):
        got = torch.cat(list(loader)).numpy()
        assert got.shape == acts.shape
        order = np.lexsort(got.T[::-1])
        np.testing.assert_array_equal(got[order], acts[np.lexsort(acts.T[::-1])])


def test_deterministic_for_a_seed_and_shuffled(cache):
    a = torch.cat(list(ActivationLoader(cache, 50, seed=1)))
    b = torch.cat(list(ActivationLoader(cache, 50, seed=1)))
    c = torch.cat(list(ActivationLoader(cache, 50, seed=2)))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    loader = ActivationLoader(cache, 50, seed=1)
    first, second = torch.cat(list(loader)), torch.cat(list(loader))
    assert not torch.equal(first, second)  # a new permutation each epoch


def test_unshuffled_order_is_the_cache_order(cache):
    acts, _ = all_rows(cache)
    got = torch.cat(list(ActivationLoader(cache, 100, split="all", shuffle=False))).numpy()
    np.testing.assert_array_equal(got, acts)


def test_held_out_split_is_by_whole_sequence(cache):
    kw = dict(batch_size=128, with_tokens=True, eval_fraction=0.2)
    train = torch.cat([t for _, t in ActivationLoader(cache, split="train", **kw)])
    held = torch.cat([t for _, t in ActivationLoader(cache, split="eval", **kw)])
    train_seqs, held_seqs = set(train[:, 1].tolist()), set(held[:, 1].tolist())
    assert not train_seqs & held_seqs and held_seqs
    _, toks = all_rows(cache)
    assert len(train) + len(held) == len(toks)
    tr, ev = split_sequences(100, 0.2)
    assert len(ev) == 20 and set(tr) | set(ev) == set(range(100))


def test_tokens_stay_aligned_with_activations(cache):
    acts, toks = all_rows(cache)
    for x, t in ActivationLoader(cache, 77, split="all", with_tokens=True, seed=5):
        rows = t[:, 1].numpy() * 31 + t[:, 2].numpy() - 1  # sequence * rows_per_seq + position - BOS
        np.testing.assert_array_equal(x.numpy(), acts[rows])
        np.testing.assert_array_equal(t.numpy(), toks[rows])


def test_breaking_out_early_stops_the_prefetch_thread(cache):
    import threading

    loader = ActivationLoader(cache, 10, prefetch=1)
    for _ in zip(range(2), loader, strict=False):
        pass
    assert not [t for t in threading.enumerate() if t.name == "vsae-prefetch" and t.is_alive()]
