"""vsae.firing: planted dead and dense latents, the code form against the dense form, the histogram, special rows."""

import numpy as np
import pytest
import torch

from vsae.code import TopKCode
from vsae.firing import (
    DENSE_THRESHOLD,
    FiringCounter,
    fired_counts,
    log10_density_histogram,
    special_ids,
    special_mask,
)


def test_firing_counter_planted_dead_and_dense_latents():
    g = torch.Generator().manual_seed(2)
    d_sae, dead = 100, [3, 17, 40, 41, 99]
    fc = FiringCounter(d_sae)
    n = 0
    for size in (300, 700):
        z = (torch.rand(size, d_sae, generator=g) < 0.05) * torch.rand(size, d_sae, generator=g)
        z[:, dead] = 0
        z[:, 0] = 1.0  # fires on every token: density 1, dense
        z[:, 1] = 0.0
        z[: size // 2, 1] = 2.0  # density 0.5: dense
        fc.update(z)
        n += size
    r = fc.result()
    assert r["n_tokens"] == n == 1000
    assert r["dead_fraction"] == len(dead) / d_sae
    assert r["dense_fraction"] == 2 / d_sae and DENSE_THRESHOLD == 0.1
    assert set((r["counts"] == 0).nonzero()[:, 0].tolist()) == set(dead)
    assert r["density"][0].item() == 1.0 and r["density"][1].item() == 0.5
    hist = r["log10_density_histogram"]
    assert hist["n_dead"] == len(dead)
    assert sum(hist["counts"]) == d_sae - len(dead)  # dead latents are not in the bins (no -inf)
    assert hist["edges"][0] == -3.0 and hist["edges"][-1] == 0.0  # floor(log10(1/1000)) .. 0
    assert len(hist["counts"]) == len(hist["edges"]) - 1 == 12  # 4 bins per decade
    assert hist["counts"][-1] >= 1  # density 1 lands in the last bin


def test_firing_counter_width():
    with pytest.raises(ValueError, match="latents"):
        FiringCounter(4).update(torch.zeros(2, 5))
    fc = FiringCounter()  # width from the first batch
    fc.update(torch.eye(3))
    assert fc.result()["counts"].tolist() == [1, 1, 1] and fc.result()["dead_fraction"] == 0.0
    with pytest.raises(ValueError, match="latents"):
        fc.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="d_sae"):
        FiringCounter().update_code(TopKCode(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long)))


def test_code_form_equals_dense_form():
    pre = torch.randn(50, 40, generator=torch.Generator().manual_seed(0))
    vals, idx = pre.topk(6, dim=1)
    code = TopKCode(vals.relu(), idx)
    a, b = FiringCounter(), FiringCounter(40)
    a.update(code.to_dense(40))
    batch = b.update_code(code)
    assert torch.equal(a.counts, b.counts) and a.n_tokens == b.n_tokens == 50
    assert torch.equal(batch, b.counts)
    assert a.result()["log10_density_histogram"] == b.result()["log10_density_histogram"]


def test_fired_means_a_positive_value():
    # A vSAE's training code keeps signed values: only the positive ones fire (as the exported ReLU code would).
    code = TopKCode(torch.tensor([[2.0, -1.0, 0.0], [0.5, 3.0, -0.2]]), torch.tensor([[0, 1, 2], [2, 1, 3]]))
    assert fired_counts(code, 5).tolist() == [1, 1, 1, 0, 0]
    counts = fired_counts(code, 5, torch.float64)
    assert counts.dtype == torch.float64 and counts.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    fc = FiringCounter(5, dtype=torch.float64)  # the trainer's counter: float64, like its saved state
    fc.add(counts, 2)
    fc.add(counts, 2)
    assert fc.counts.dtype == torch.float64 and fc.n_tokens == 4
    assert fc.result()["counts"].tolist() == [2, 2, 2, 0, 0]


def test_log10_density_histogram_from_numpy_or_torch():
    density = np.array([0.0, 1e-3, 0.5, 1.0, 2e-4])
    h = log10_density_histogram(density, 10_000)
    assert h["edges"][0] == -4.0 and h["edges"][-1] == 0.0 and len(h["counts"]) == 16
    assert sum(h["counts"]) == 4 and h["n_dead"] == 1 and h["counts"][-1] == 1
    assert log10_density_histogram(torch.from_numpy(density), 10_000) == h
    assert h["counts"][4] == 1  # 1e-3 sits on the edge -3 and opens bin [-3, -2.75)
    none_alive = log10_density_histogram(np.zeros(3), 100)
    assert sum(none_alive["counts"]) == 0 and none_alive["n_dead"] == 3


def test_special_rows():
    tokens = torch.tensor([0, 5, 7, 5, 1], dtype=torch.int32)
    assert special_mask(tokens, [5, 0]).tolist() == [True, True, False, True, False]
    assert not special_mask(tokens, []).any()
    assert special_ids({"special_token_ids": [2, 3], "bos_token_id": 2}) == [2, 3]
    assert special_ids({"bos_token_id": 9}) == [9]  # older caches name only BOS
    assert special_ids({"bos_token_id": None}) == [0]
