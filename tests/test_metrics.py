"""evals.metrics: hand-computed answers, the identity SAE, planted dead latents, streaming == one-shot."""

import math

import pytest
import torch

from evals.metrics import (
    CoreAccumulator,
    ce_kl_scores,
    cosine_similarity,
    explained_variance,
    explained_variance_legacy,
    l0,
    mse,
    relative_reconstruction_bias,
)
from vsae.checkpoint import SAEWeights

# Two tokens in 2-d, worked by hand:
# x = [[1, 0], [3, 4]], x_hat = [[1, 1], [3, 0]]
# SSE = [1, 16]; mean x = [2, 2]; ||x - mean||^2 = [1 + 4, 1 + 4] = [5, 5]
# EV (global) = 1 - (1 + 16) / (5 + 5) = -0.7; legacy per token = [1 - 1/5, 1 - 16/5] = [0.8, -2.2]
# cos = [1/sqrt(2), 9/(5*3)] = [0.70710678, 0.6]; rrb = mean([2, 9]) / mean([1, 9]) = 5.5 / 5 = 1.1
X = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
X_HAT = torch.tensor([[1.0, 1.0], [3.0, 0.0]])


def test_hand_computed_values():
    torch.testing.assert_close(mse(X, X_HAT), torch.tensor([1.0, 16.0]))
    assert explained_variance(X, X_HAT).item() == pytest.approx(-0.7, abs=1e-12)
    assert explained_variance(X, X_HAT).dtype == torch.float64
    torch.testing.assert_close(explained_variance_legacy(X, X_HAT), torch.tensor([0.8, -2.2]))
    torch.testing.assert_close(cosine_similarity(X, X_HAT), torch.tensor([2**-0.5, 0.6]))
    assert relative_reconstruction_bias(X, X_HAT).item() == pytest.approx(1.1)
    z = torch.tensor([[0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(l0(z), torch.tensor([2.0, 0.0, 4.0]))  # != 0 counts the negative one too


def test_explained_variance_degenerate_input():
    # Zero total variance (all rows equal): SAELens returns 1 for a perfect reconstruction, else 0.
    x = torch.ones(5, 3)
    assert explained_variance(x, x).item() == 1.0
    assert explained_variance(x, x + 0.5).item() == 0.0


def test_explained_variance_is_variance_about_the_mean_not_zero():
    # A large constant offset must not inflate EV (the pre-#665 / SAEBench 0.6.0 bug measured variance about 0).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g)
    x_hat = x + 0.5 * torch.randn(1000, 8, generator=g)
    ev = explained_variance(x, x_hat).item()
    # (tolerance: x + 100 rounds to float32 before the float64 sums)
    assert explained_variance(x + 100.0, x_hat + 100.0).item() == pytest.approx(ev, abs=1e-6)
    assert ev == pytest.approx(0.75, abs=0.03)  # 1 - 0.25 / 1


def identity_sae(d: int) -> SAEWeights:
    return SAEWeights(
        W_enc=torch.eye(d), b_enc=torch.zeros(d), W_dec=torch.eye(d), b_dec=torch.zeros(d),
        k=d, apply_b_dec_to_input=False,
    )


def test_identity_sae_reconstructs_nonnegative_inputs_exactly():
    x = torch.rand(64, 8, generator=torch.Generator().manual_seed(0)) + 0.1
    sae = identity_sae(8)
    z = sae.encode(x)
    acc = CoreAccumulator()
    acc.update(x, sae.decode(z), z)
    r = acc.result()
    assert r["explained_variance"] == 1.0
    assert r["mse"] == 0.0
    assert r["explained_variance_legacy"] == 1.0
    assert r["cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert r["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)
    assert r["l0"] == 8.0
    assert r["n_tokens"] == 64


def test_accumulator_equals_one_shot_on_concatenation():
    g = torch.Generator().manual_seed(1)
    sizes = [7, 50, 1, 33]
    xs = [3.0 + torch.randn(n, 16, generator=g) for n in sizes]  # an offset, as residual streams have
    x_hats = [x + 0.3 * torch.randn(x.shape, generator=g) for x in xs]
    zs = [torch.randn(n, 40, generator=g).relu() for n in sizes]
    acc = CoreAccumulator()
    for x, x_hat, z in zip(xs, x_hats, zs, strict=True):
        acc.update(x, x_hat, z)
    acc.update(torch.zeros(0, 16), torch.zeros(0, 16), torch.zeros(0, 40))  # an all-special batch adds nothing
    r = acc.result()
    x, x_hat, z = torch.cat(xs), torch.cat(x_hats), torch.cat(zs)
    assert r["n_tokens"] == sum(sizes)
    assert r["explained_variance"] == pytest.approx(explained_variance(x, x_hat).item(), abs=1e-12)
    assert r["mse"] == pytest.approx(mse(x, x_hat).mean().item(), rel=1e-6)
    assert r["l0"] == pytest.approx(l0(z).mean().item(), rel=1e-6)
    assert r["cosine_similarity"] == pytest.approx(cosine_similarity(x, x_hat).mean().item(), rel=1e-6)
    assert r["relative_reconstruction_bias_global"] == pytest.approx(
        relative_reconstruction_bias(x, x_hat).item(), rel=1e-6
    )
    # The two per-batch SAELens metrics follow SAELens's batching: per-token / per-batch values of each batch.
    legacy = torch.cat([explained_variance_legacy(a, b) for a, b in zip(xs, x_hats, strict=True)])
    assert r["explained_variance_legacy"] == pytest.approx(legacy.mean().item(), rel=1e-6)
    rrb = [relative_reconstruction_bias(a, b).item() for a, b in zip(xs, x_hats, strict=True)]
    assert r["relative_reconstruction_bias"] == pytest.approx(sum(rrb) / len(rrb), rel=1e-6)


def test_empty_accumulator_is_nan():
    r = CoreAccumulator().result()
    assert r["n_tokens"] == 0 and math.isnan(r["explained_variance"])


def test_ce_kl_scores():
    s = ce_kl_scores(ce_clean=2.0, ce_sae=2.5, ce_zero=7.0, kl_sae=0.5, kl_zero=5.0)
    assert s["ce_score"] == pytest.approx(0.9)
    assert s["kl_score"] == pytest.approx(0.9)
    assert math.isnan(ce_kl_scores(1.0, 1.0, 1.0, 0.0, 0.0)["ce_score"])
