"""SCR / TPP (evals/scr_tpp.py) and their probes (evals/probes.py).

The scoring tests use synthetic token activations where one known direction carries each attribute, and a
ground-truth SAE whose latents are +-those directions: it must score near the maximum, a random SAE near 0.
One smoke test runs the whole pipeline through the tiny random model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evals.labelled import LabelledSet, offline_scr_set, offline_tpp_set
from evals.probes import (
    TokenActivations,
    pooled_activations,
    probe_accuracy,
    token_activations,
    train_probe,
)
from evals.scr_tpp import (
    ablated_accuracies,
    ablated_pooled,
    attribution_effects,
    contrast,
    pooled_latents,
    rank_latents,
    sae_ablation,
    scr_from_activations,
    scr_scores,
    select_top_latents,
    tpp_from_activations,
    tpp_scores,
)
from vsae.checkpoint import SAEWeights

D = 128  # activation width of the synthetic cases (random directions then overlap a class direction little)


def _tokens(directions: np.ndarray, sigma: float, rng: np.random.Generator) -> TokenActivations:
    """Texts of 2-5 tokens each; every token is its text's row of `directions` plus N(0, sigma^2) noise."""
    counts = rng.integers(2, 6, len(directions))
    acts = np.repeat(directions, counts, axis=0) + sigma * rng.standard_normal((counts.sum(), directions.shape[1]))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return TokenActivations(torch.tensor(acts, dtype=torch.float32), torch.tensor(offsets, dtype=torch.long))


def _ground_truth_sae(d: int = D) -> SAEWeights:
    """Latent j < d reads relu(x_j), latent d + j reads relu(-x_j); decoding gives x back exactly."""
    eye = torch.eye(d)
    return SAEWeights(torch.cat([eye, -eye], 1), torch.zeros(2 * d), torch.cat([eye, -eye], 0), torch.zeros(d),
                      k=2 * d, apply_b_dec_to_input=False)


def _random_sae(d: int = D, d_sae: int = 2 * D, k: int = 16, seed: int = 0) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d_sae, generator=g) / d**0.5
    return SAEWeights(W, 0.1 * torch.randn(d_sae, generator=g), W.T.clone(), 0.1 * torch.randn(d, generator=g),
                      k=k, apply_b_dec_to_input=True)


def _scr_case(q: int = 150, q_test: int = 150, seed: int = 0) -> tuple[LabelledSet, TokenActivations]:
    """Target on dimension 0 (weak), spurious on dimension 1 (strong), SAEBench's quadrant layout."""
    rng = np.random.default_rng(seed)
    t, s, splits = [], [], {"train": [], "train_balanced": [], "validation": [], "test": []}
    for split, sizes in (("train", None), ("validation", q_test), ("test", q_test)):
        for tv, sv in ((1, 1), (1, 0), (0, 1), (0, 0)):
            n = (2 * q if tv == sv else q) if split == "train" else sizes
            rows = list(range(len(t), len(t) + n))
            t += [tv] * n
            s += [sv] * n
            if split == "train":
                splits["train_balanced"] += rows[:q]
                if tv == sv:
                    splits["train"] += rows
            else:
                splits[split] += rows
    t, s = np.array(t), np.array(s)
    means = np.zeros((len(t), D))
    means[:, 0] = 1.0 * (2 * t - 1)
    means[:, 1] = 3.0 * (2 * s - 1)
    data = LabelledSet([""] * len(t), {"a": t, "b": s}, splits, {"a": ("no", "yes"), "b": ("no", "yes")},
                       {"target": "a", "spurious": "b"})
    return data, _tokens(means, 1.0, rng)


def _tpp_case(per_class: int = 100, n_classes: int = 5, seed: int = 0) -> tuple[LabelledSet, TokenActivations]:
    """Class c lives on dimension c."""
    rng = np.random.default_rng(seed)
    y = np.tile(np.repeat(np.arange(n_classes), per_class), 3)
    n = len(y) // 3
    splits = {"train": np.arange(n), "validation": np.arange(n, 2 * n), "test": np.arange(2 * n, 3 * n)}
    means = np.zeros((len(y), D))
    means[np.arange(len(y)), y] = 3.0
    data = LabelledSet([""] * len(y), {"c": y}, splits, {"c": tuple(f"class{i}" for i in range(n_classes))},
                       {"classes": "c"})
    return data, _tokens(means, 1.0, rng)


@pytest.fixture(scope="module")
def scr_case():
    return _scr_case()


@pytest.fixture(scope="module")
def tpp_case():
    return _tpp_case()


def test_scr_near_one_when_one_latent_pair_carries_the_spurious_attribute(scr_case):
    data, tokens = scr_case
    result = scr_from_activations(tokens, data, _ground_truth_sae(), n_values=(0, 2))
    acc = result["accuracy"]
    # The biased probe leans on the spurious attribute; the oracle does much better on the target.
    assert acc["base_target"] < acc["base_spurious"]
    assert acc["oracle_target"] - acc["base_target"] > 0.15
    # The spurious probe's top latents are exactly +-dimension 1; ablating them leaves the target.
    assert set(result["ranked_latents"]["dir1"]) == {1, D + 1}
    assert result["metrics"]["scr_metric_threshold_2"] > 0.85
    assert result["metrics"]["scr_metric_threshold_2"] == result["metrics"]["scr_dir1_threshold_2"]
    # N = 0 ablates nothing: accuracy stays at its base, the score at 0.
    assert result["ablated_accuracy"]["dir1"][0] == acc["base_target"]
    assert result["metrics"]["scr_metric_threshold_0"] == 0.0


def test_scr_near_zero_for_a_random_sae(scr_case):
    data, tokens = scr_case
    result = scr_from_activations(tokens, data, _random_sae(), n_values=(2,))
    assert abs(result["metrics"]["scr_metric_threshold_2"]) < 0.15


def test_tpp_near_maximum_when_one_latent_carries_each_class(tpp_case):
    data, tokens = tpp_case
    result = tpp_from_activations(tokens, data, _ground_truth_sae(), n_values=(0, 1))
    assert min(result["clean_accuracy"].values()) > 0.95
    for c, name in enumerate(result["classes"]):
        assert result["ranked_latents"][name][0] == c
    # Ablating class i's latent sends probe i to chance and leaves the others alone: TPP ~ clean - 0.5.
    assert result["metrics"]["tpp_threshold_1_total_metric"] > 0.4
    assert result["metrics"]["tpp_threshold_1_unintended_diff_only"] < 0.02
    assert result["metrics"]["tpp_threshold_0_total_metric"] == 0.0


def test_tpp_near_zero_for_a_random_sae(tpp_case):
    data, tokens = tpp_case
    result = tpp_from_activations(tokens, data, _random_sae(), n_values=(2,))
    assert abs(result["metrics"]["tpp_threshold_2_total_metric"]) < 0.05


def test_pooled_ablation_equals_ablating_every_token_then_pooling():
    rng = np.random.default_rng(1)
    tokens = _tokens(rng.standard_normal((30, D)), 0.5, rng)
    sae = _random_sae(seed=2)
    chosen = torch.tensor([3, 17, 100])
    direct = tokens.pooled(ablate=sae_ablation(sae, chosen))
    # The error term is added back: x' = decode(z with S zeroed) + x - decode(z), token by token.
    z = sae.encode(tokens.acts)
    z_abl = z.clone()
    z_abl[:, chosen] = 0
    literal = TokenActivations(sae.decode(z_abl) + tokens.acts - sae.decode(z), tokens.offsets).pooled()
    shortcut = ablated_pooled(tokens.pooled(), pooled_latents(tokens, sae), sae.W_dec, chosen)
    assert torch.allclose(direct, literal, atol=1e-5)
    assert torch.allclose(shortcut, literal, atol=1e-5)
    assert torch.equal(sae_ablation(sae, [])(tokens.acts), tokens.acts)


def test_token_activations_select_and_batches():
    rng = np.random.default_rng(3)
    tokens = _tokens(rng.standard_normal((9, 4)), 1.0, rng)
    manual = torch.stack([tokens.acts[tokens.offsets[i] : tokens.offsets[i + 1]].mean(0) for i in range(9)])
    assert torch.allclose(tokens.pooled(batch_tokens=5), manual, atol=1e-6)
    assert torch.allclose(tokens.select([4, 0, 4]).pooled(), manual[[4, 0, 4]], atol=1e-6)


def test_select_top_latents_keeps_only_nonzero_effects():
    effects = torch.tensor([0.0, 3.0, 0.0, 1.0, 2.0])
    assert select_top_latents(effects, 2).tolist() == [1, 4]
    assert select_top_latents(effects, 5).tolist() == [1, 4, 3]  # k = min(N, #nonzero)
    with pytest.raises(ValueError, match="d_sae"):
        select_top_latents(effects, 6)


def test_rank_latents_ranks_each_probe_by_its_attribution():
    rng = np.random.default_rng(4)
    tokens = _tokens(rng.standard_normal((40, D)), 0.5, rng)
    sae = _random_sae(seed=5)
    groups = [(np.arange(0, 10), np.arange(10, 25)), (np.arange(25, 40), np.arange(0, 5))]
    contrasts = torch.stack([contrast(40, pos, neg) for pos, neg in groups], dim=1)
    weights = [torch.randn(D, generator=torch.Generator().manual_seed(j)) for j in range(2)]
    latents = pooled_latents(tokens, sae)
    for scr in (True, False):
        effects, ranking = rank_latents(tokens, sae, contrasts, weights, 7, scr=scr)
        for (pos, neg), w, e, r in zip(groups, weights, effects, ranking, strict=True):
            diff = latents[pos].mean(0) - latents[neg].mean(0)
            want = attribution_effects(diff, w, sae.W_dec, scr=scr)
            assert torch.allclose(e, want, atol=1e-5)
            assert r.tolist() == select_top_latents(want, 7).tolist()


def test_ablated_accuracies_ablate_a_prefix_of_the_ranking():
    data, tokens = _tpp_case(per_class=20, n_classes=3)
    pooled, sae = tokens.pooled(), _ground_truth_sae()
    latents = pooled_latents(tokens, sae)
    y = (data.labels["c"] == 0).astype(np.int64)
    probe = train_probe(pooled, y, pooled, y, seed=0)
    rows = np.arange(0, len(y), 2)
    tests = [(probe, slice(None), y), (probe, rows, y[rows])]
    ranking = torch.tensor([0, D, 5])  # class 0's direction (both signs), then an unrelated one
    accs, n_selected = ablated_accuracies(pooled, latents, sae.W_dec, ranking, (0, 2, 10), tests)
    clean = probe_accuracy(probe, pooled, y)
    assert clean > 0.95 and accs[0] == [clean, probe_accuracy(probe, pooled[rows], y[rows])]
    assert n_selected == {0: 0, 2: 2, 10: 3}  # N beyond the ranking ablates all of it
    X = ablated_pooled(pooled, latents, sae.W_dec, ranking[:2])
    assert accs[2] == [probe_accuracy(probe, X, y), probe_accuracy(probe, X[rows], y[rows])]
    assert accs[2][0] < clean - 0.2  # the probe's direction is gone


def test_probe_weights_are_folded_back_to_raw_units():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 6)) * np.array([1, 10, 0.1, 1, 1, 1]) + 5
    y = ((X[:, 1] - 5) + 20 * (X[:, 2] - 5) > 0).astype(int)
    probe = train_probe(X[:150], y[:150], X[150:], y[150:], seed=0)
    assert probe.C_ in probe.validation_accuracy_
    manual = X @ probe.coef_[0] + probe.intercept_[0]
    assert np.allclose(probe.decision_function(X), manual)
    assert probe_accuracy(probe, X[150:], y[150:]) > 0.9


# ---------------------------------------------------------------------------------------------------------------
# Through the tiny random model


def _model(tiny_checkpoint):
    from activations.models import load_local_checkpoint

    return load_local_checkpoint(tiny_checkpoint)


def test_pooling_masks_bos_and_padding(tiny_checkpoint):
    model = _model(tiny_checkpoint)
    hook = "blocks.1.hook_resid_post"
    texts = ["To be, or not to be.", "The quick brown fox jumps over the lazy dog, again and again.", "Sparse"]
    seen = []

    def ablate(x):
        seen.append(len(x))
        return x

    pooled = pooled_activations(model, hook, texts, batch_size=3, ablate=ablate, progress=False)
    bos = model.tokenizer.bos_token_id
    for i, text in enumerate(texts):
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        _, cache = model.run_with_cache(torch.tensor([[bos, *ids]]), names_filter=hook)
        # Alone (no padding), BOS excluded: the same mean as in the padded batch.
        assert torch.allclose(pooled[i], cache[hook][0, 1:].mean(0), atol=1e-5)
    n_real = sum(len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert sum(seen) == n_real  # the ablation saw real tokens only
    tokens = token_activations(model, hook, texts, batch_size=2, progress=False)
    assert tokens.counts.sum() == n_real
    assert torch.allclose(tokens.pooled(), pooled, atol=1e-5)


def test_scr_and_tpp_end_to_end_on_the_tiny_model(tiny_checkpoint):
    model = _model(tiny_checkpoint)
    hook = "blocks.1.hook_resid_post"
    sae = _random_sae(d=model.cfg.d_model, d_sae=64, k=8)
    scr = scr_scores(model, hook, sae, offline_scr_set(train_size=32, test_size=16, validation_size=8),
                     n_values=(1, 4), progress=False)
    assert set(scr["ablated_accuracy"]["dir1"]) == {1, 4}
    assert all(np.isfinite(v) for v in scr["metrics"].values() if v is not None)
    assert 0 <= scr["accuracy"]["oracle_target"] <= 1
    tpp = tpp_scores(model, hook, sae, offline_tpp_set(train_size=8, test_size=8, validation_size=8),
                     n_values=(1, 4), progress=False)
    assert len(tpp["classes"]) == 5
    assert all(np.isfinite(v) for v in tpp["metrics"].values())
    assert set(tpp["per_class"][4]) == set(tpp["classes"])
