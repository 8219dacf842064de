"""Ground-truth metrics (evals/ground_truth.py): SynthSAEBench's definitions via sae_lens.synthetic, with nulls."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from activations.synthetic import TrueCodes, ground_truth_tensors
from cli import main
from evals.ground_truth import (
    BOOTSTRAP,
    DEFINITIONS,
    GroundTruthData,
    _replicate,
    ground_truth_group,
    ground_truth_metrics,
    held_out_rows,
    score_sae,
)
from evals.null import random_sae
from evals.scr_tpp import UNITS
from vsae.checkpoint import SAEWeights, write_sae

HEADLINES = ("mcc", "precision", "recall", "f1", "uniqueness", "dead_latent_fraction", "shrinkage")


def _sae(W_dec: torch.Tensor, W_enc: torch.Tensor | None = None, k: int | None = None, b_enc: float = 0.0,
         b_dec: torch.Tensor | None = None) -> SAEWeights:
    d_sae, d_in = W_dec.shape
    return SAEWeights(W_enc=(W_dec.T if W_enc is None else W_enc).contiguous(), b_enc=torch.full((d_sae,), b_enc),
                      W_dec=W_dec.contiguous(), b_dec=torch.zeros(d_in) if b_dec is None else b_dec,
                      k=k or d_sae, apply_b_dec_to_input=True)


@pytest.fixture(scope="module")
def orthonormal():
    """8 orthonormal true features, rows of 1-3 active features with magnitudes in [1, 3]: every answer is exact."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    Q = Q.float()
    acts = torch.zeros(600, 8)
    for i in range(600):
        on = torch.randperm(8, generator=g)[: 1 + i % 3]
        acts[i, on] = 1 + 2 * torch.rand(len(on), generator=g)
    return GroundTruthData(acts @ Q, TrueCodes.from_dense(acts), Q)


def test_known_answers_on_orthonormal_features(orthonormal):
    Q = orthonormal.dictionary
    # b_enc -1e-4: rounding leaves inactive latents at about +-1e-7, which would count as firing
    exact = score_sae(_sae(Q, b_enc=-1e-4), orthonormal, batch_size=256)
    for key in ("mcc", "precision", "recall", "f1", "uniqueness", "shrinkage"):
        assert exact[key] == pytest.approx(1.0, abs=1e-4), key
    assert exact["dead_latents"] == 0 and exact["true_l0"] == pytest.approx(2.0, abs=0.01)
    perm = torch.tensor([3, 1, 7, 0, 2, 6, 4, 5])
    permuted = score_sae(_sae(Q[perm], b_enc=-1e-4), orthonormal)  # the order of latents does not matter
    assert permuted["mcc"] == pytest.approx(1.0, abs=1e-5) and permuted["f1"] == pytest.approx(1.0)
    assert permuted["per_latent"]["best_feature"] == perm.tolist()
    half = score_sae(_sae(0.5 * Q, W_enc=Q.T, b_enc=-1e-4), orthonormal)  # same directions, half the output
    assert half["shrinkage"] == pytest.approx(0.5, abs=1e-4) and half["mcc"] == pytest.approx(1.0, abs=1e-5)
    twin = Q.clone()
    twin[7] = Q[6]  # latents 6 and 7 share feature 6; feature 7 has no latent
    dup = score_sae(_sae(twin, b_enc=-1e-4), orthonormal)
    assert dup["uniqueness"] == pytest.approx(7 / 8) and dup["mcc"] == pytest.approx(7 / 8, abs=1e-5)
    assert dup["per_latent"]["best_feature"][6:] == [6, 6]
    # latent 7 reads and writes feature 6: a perfect detector of its best match, so F1 stays 1
    assert dup["f1"] == pytest.approx(1.0, abs=1e-5)
    blind = score_sae(_sae(Q, b_enc=-100.0), orthonormal)  # nothing ever fires
    assert blind["dead_latents"] == 8 and blind["f1"] == 0 and blind["recall"] == 0 and blind["shrinkage"] == 0


def test_units_reproduce_the_reported_values(orthonormal):
    g = torch.Generator().manual_seed(1)
    noisy = score_sae(_sae(orthonormal.dictionary + 0.3 * torch.randn(8, 8, generator=g), k=2), orthonormal,
                      batch_size=100)
    point = _replicate(noisy, None)
    for key in HEADLINES:
        assert point[key] == pytest.approx(noisy[key], abs=1e-6), key
    sizes = BOOTSTRAP.units(noisy)
    assert sizes == {"pairs": 8, "latents": 8, "row_blocks": 5}  # 600 rows in blocks of 128
    weights = {name: np.ones((2, n)) for name, n in sizes.items()}
    for key, values in _replicate(noisy, weights).items():
        np.testing.assert_allclose(values, point[key], atol=1e-9)


class _AsSAELens:
    """SAEWeights seen through the SAELens SAE interface `eval_sae_on_synthetic_data` calls."""

    def __init__(self, sae: SAEWeights) -> None:
        self.sae, self.W_dec = sae, sae.W_dec

    def eval(self) -> None:
        pass

    def encode(self, x):
        return self.sae.encode(x)

    def decode(self, z):
        return self.sae.decode(z)


@pytest.mark.parametrize("d_sae", [24, 48])
def test_agrees_with_sae_lens_eval_sae_on_synthetic_data(d_sae):
    from sae_lens.synthetic import ActivationGenerator, FeatureDictionary, eval_sae_on_synthetic_data

    features = FeatureDictionary(32, 16, bias=True, seed=0, initializer=None)
    gen = ActivationGenerator(32, torch.linspace(0.3, 0.02, 32), std_firing_magnitudes=0.3)
    sae = random_sae(16, d_sae, 4, 5, torch.zeros(16))
    torch.manual_seed(11)
    theirs = eval_sae_on_synthetic_data(_AsSAELens(sae), features, gen, num_samples=3000)
    torch.manual_seed(11)  # the same draw of feature activations
    acts = gen.sample(3000)
    data = GroundTruthData(features(acts).detach(), TrueCodes.from_dense(acts), features.feature_vectors.detach())
    ours = score_sae(sae, data, batch_size=1000)
    c = theirs.classification
    for mine, lib in (("mcc", theirs.mcc), ("uniqueness", theirs.uniqueness), ("shrinkage", theirs.shrinkage),
                      ("precision", c.precision), ("recall", c.recall), ("f1", c.f1_score),
                      ("accuracy", c.accuracy), ("true_l0", theirs.true_l0), ("sae_l0", theirs.sae_l0),
                      ("dead_latents", theirs.dead_latents)):
        assert ours[mine] == pytest.approx(lib, rel=1e-5, abs=1e-6), mine


def test_group_is_empty_without_ground_truth(tmp_path):
    from types import SimpleNamespace

    from tests.synthetic import planted_features, synthetic_cache

    rows, _ = planted_features(400, d_in=8, n_features=16)
    cache = synthetic_cache(tmp_path / "cache", rows)
    ctx = SimpleNamespace(cfg=SimpleNamespace(cache=str(cache), tokens=100, batch_size=64), saes={})
    assert ground_truth_group(ctx) == {}
    assert set(DEFINITIONS) >= set(HEADLINES) and all(DEFINITIONS.values())


def test_rows_must_be_row_ids(orthonormal):
    with pytest.raises(ValueError, match="global row ids"):
        ground_truth_metrics(_sae(orthonormal.dictionary), "unused", torch.zeros(3, 8), seed=0)


# --- through vsae's own CLI on a tiny synthetic cache ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("gt") / "cache"
    assert main(["synth", "--preset", "tiny", "--out", str(cache), "--tokens", "8000", "--seed", "5",
                 "--no-progress", "--device", "cpu"]) == 0
    return cache


def _write(run, sae: SAEWeights, cache) -> str:
    run.mkdir()
    write_sae(run, sae, {"model_name": "synth-tiny", "hook_name": "synthetic", "context_size": 128,
                         "dataset_path": str(cache)})
    return str(run)


@pytest.fixture
def registered(monkeypatch):
    """The `ground_truth` group as proposed to evals/registry.py, until the registry carries it."""
    from evals import registry

    if "ground_truth" in registry.METRIC_GROUPS:
        return
    group = registry.MetricGroup(
        "ground_truth", ground_truth_group, DEFINITIONS, compare_rows=registry._scalars, nulls=True,
        null_settings=("tokens",), bootstrap=BOOTSTRAP,
        headlines=(registry.Headline("ground truth: MCC", "mcc", "higher"),
                   registry.Headline("ground truth: F1", "f1", "higher")))
    monkeypatch.setattr(registry, "GROUPS", (*registry.GROUPS, group))
    monkeypatch.setattr(registry, "METRIC_GROUPS", {**registry.METRIC_GROUPS, "ground_truth": group})


def test_truth_scores_near_one_and_random_near_chance_through_the_cli(tiny_cache, tmp_path, registered):
    truth = ground_truth_tensors(tiny_cache)
    D, bias = truth["feature_vectors"], truth["bias"]
    # The true dictionary as an SAE: encoder D^T, a threshold of 3 (magnitudes are about 4-5, interference from
    # 2x superposition well below), k above the true L0.
    exact = _sae(D, k=32, b_enc=-3.0, b_dec=bias)
    mean = torch.from_numpy(np.load(tiny_cache / "acts-00000.npy")[:2000].astype(np.float32)).mean(0)
    runs = [_write(tmp_path / "truth", exact, tiny_cache),
            _write(tmp_path / "random", random_sae(128, 256, 32, 99, mean), tiny_cache)]
    assert main(["eval", *runs, "--cache", str(tiny_cache), "--metrics", "ground_truth", "--other-cache",
                 "--tokens", "4000", "--no-progress", "--device", "cpu"]) == 0
    got = [json.loads((tmp_path / name / "eval.json").read_text())["metrics"]["ground_truth"]
           for name in ("truth", "random")]
    assert got[0]["mcc"] > 0.99 and got[0]["f1"] > 0.9 and got[0]["uniqueness"] == 1.0
    assert got[1]["mcc"] < 0.4 and got[1]["f1"] < 0.15
    for key in ("mcc", "f1"):
        lo, hi = got[0]["intervals"][key]
        assert lo <= got[0][key] <= hi
        null = got[0]["null"][key]
        assert null["null_mean"] == pytest.approx(got[1][key], abs=0.1)  # the random run is one more null
        assert not null["includes_zero"] and null["interval"][0] > 0.5
        assert abs(got[1]["null"][key]["difference"]) < 0.1
    assert got[0]["n_rows"] == 4000 and UNITS not in got[0]
    assert len(got[0]["per_latent"]["f1"]) == 256


def test_held_out_rows_follow_a_seeded_order(tiny_cache):
    """The audit's reseeds vary the rows: with `sample_seed` the group reads the context's seeded order of the split
    (EvalContext.held_rows), not its first rows."""
    from types import SimpleNamespace

    from activations.loader import ActivationLoader

    with ActivationLoader(tiny_cache, 1, shuffle=False, split="eval") as loader:
        split = loader.rows.copy()
    assert np.array_equal(held_out_rows(tiny_cache, {"split": "eval"}, 50), split[:50])
    order = np.random.default_rng(0).permutation(split)
    assert np.array_equal(held_out_rows(tiny_cache, {"split": "eval"}, 50, order), order[:50])
    seen = {}

    def fake_load(cache, rows):
        seen["rows"] = rows
        raise StopIteration

    ctx = SimpleNamespace(cfg=SimpleNamespace(cache=str(tiny_cache), tokens=50, batch_size=64), saes={},
                          split=SimpleNamespace(loader_args={"split": "eval"}), held_rows=lambda: order)
    import evals.ground_truth as gt

    original = gt.GroundTruthData.load
    gt.GroundTruthData.load = fake_load
    try:
        with pytest.raises(StopIteration):
            ground_truth_group(ctx)
    finally:
        gt.GroundTruthData.load = original
    assert np.array_equal(seen["rows"], order[:50])
