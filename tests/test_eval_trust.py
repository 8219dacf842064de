"""Evaluation you can trust: intervals, random-SAE nulls, provenance and no leakage (issue 15)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from activations.loader import split_sequences
from evals.baseline import Bootstrap, attach_bootstrap
from evals.driver import EvalConfig, EvalError, evaluate
from evals.metrics import CoreAccumulator
from evals.null import STORE_DIR, random_sae
from evals.stats import (
    bootstrap_weights,
    dead_fraction_interval,
    detectable_density,
    null_comparison,
    percentile_interval,
    weighted_means,
    wilson_interval,
)
from tests.test_harvest import run as harvest_run
from vsae.checkpoint import write_sae
from vsae.config import SAEConfig, TrainConfig
from vsae.trainer import train

# --- statistics on known answers ---------------------------------------------------------------------------------


def test_bootstrap_weights_resample_n_units_and_repeat_for_a_seed():
    w = bootstrap_weights(50, n_boot=200, seed=3)
    assert w.shape == (200, 50) and np.all(w.sum(axis=1) == 50)
    assert np.array_equal(w, bootstrap_weights(50, n_boot=200, seed=3))
    assert not np.array_equal(w, bootstrap_weights(50, n_boot=200, seed=4))
    values = np.arange(50.0)
    assert np.allclose(weighted_means(values, np.ones((1, 50))), values.mean())


def test_bootstrap_interval_of_a_mean_matches_its_standard_error():
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    lo, hi = percentile_interval(weighted_means(x, bootstrap_weights(400, 2000, seed=1)))
    se = x.std(ddof=1) / math.sqrt(400)
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.15)
    assert lo < x.mean() < hi


def test_wilson_interval_known_values():
    assert wilson_interval(0, 100) == pytest.approx([0.0, 0.0370], abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


def test_paired_null_comparison_cancels_shared_noise():
    """Trained = null + 0.05 on every unit: the paired difference is exactly 0.05, however noisy the units."""
    rng = np.random.default_rng(0)
    null_units = rng.normal(size=300) + np.array([[0.0], [0.002], [-0.002]])  # seeds that differ a little
    w = bootstrap_weights(300, seed=0)
    trained_units = null_units.mean(0) + 0.05
    trained_boot = weighted_means(trained_units, w)
    nulls_boot = np.stack([weighted_means(u, w) for u in null_units])
    cmp = null_comparison(trained_units.mean(), trained_boot, null_units.mean(1), nulls_boot)
    assert cmp["difference"] == pytest.approx(0.05) and cmp["paired_interval"] == pytest.approx([0.05, 0.05])
    # widened only by the seeds' spread (sd 0.002): z * 0.002 * sqrt(1 + 1/3)
    half = 1.96 * 0.002 * (4 / 3) ** 0.5
    assert cmp["interval"] == pytest.approx([0.05 - half, 0.05 + half], abs=1e-4)
    assert not cmp["includes_zero"]
    same = null_comparison(null_units[0].mean(), nulls_boot[0], null_units.mean(1), nulls_boot)
    assert same["includes_zero"]


def test_dead_fraction_interval():
    assert dead_fraction_interval(np.zeros(10), 1000) == [1.0, 1.0]
    assert dead_fraction_interval(np.full(10, 500), 1000) == pytest.approx([0.0, 0.0], abs=1e-12)
    # 1000 latents that fired once: none is dead, but each would look dead in another sample with probability
    # (1 - 1/N)^N ~ 1/e, so the dead fraction's SE is sqrt(q (1 - q) / 1000)
    q = (1 - 1 / 10_000) ** 10_000
    assert dead_fraction_interval(np.ones(1000), 10_000) == pytest.approx([0.0, 1.96 * math.sqrt(q * (1 - q) / 1000)],
                                                                          rel=1e-3)
    # the observed fraction is always inside its interval
    counts = np.array([0] * 10 + [1] * 50 + [100] * 40)
    lo, hi = dead_fraction_interval(counts, 5000)
    assert lo <= 0.10 <= hi and lo > 0
    assert detectable_density(1000) == pytest.approx(-math.log(0.05) / 1000)


def test_explained_variance_blocks_give_the_global_value():
    acc = CoreAccumulator()
    x = torch.randn(1000, 8) + 2
    x_hat = x + 0.5 * torch.randn(1000, 8)
    acc.update(x[:700], x_hat[:700], torch.ones(700, 1))
    acc.update(x[700:], x_hat[700:], torch.ones(300, 1))
    blocks = acc.blocks()
    assert len(blocks["sse"]) == math.ceil(700 / 128) + math.ceil(300 / 128)
    assert 1 - sum(blocks["sse"]) / sum(blocks["sst"]) == pytest.approx(acc.result()["explained_variance"], abs=1e-12)


def test_attach_bootstrap_flags_a_trained_score_above_its_null():
    def result(units):
        return {"value": float(np.mean(units)), "_units": {"texts": units}}

    boot = Bootstrap(lambda r: {"texts": len(r["_units"]["texts"])},
                     lambda r, w: {"value": weighted_means(np.asarray(r["_units"]["texts"]), w["texts"])
                                   if w is not None else np.mean(r["_units"]["texts"])})
    rng = np.random.default_rng(1)
    nulls = [result(rng.binomial(1, 0.5, 500).astype(float)) for _ in range(3)]
    better = result(rng.binomial(1, 0.7, 500).astype(float))
    attach_bootstrap(boot, better, nulls, seed=0)
    assert better["null"]["value"]["includes_zero"] is False and better["null"]["value"]["difference"] > 0.1
    lo, hi = better["intervals"]["value"]
    assert lo < better["value"] < hi
    alike = result(rng.binomial(1, 0.5, 500).astype(float))
    attach_bootstrap(boot, alike, nulls, seed=0)
    assert alike["null"]["value"]["includes_zero"] is True


def test_random_sae_shape():
    mean = torch.arange(6.0)
    sae = random_sae(6, 40, 3, seed=1, b_dec=mean)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(40))
    assert torch.equal(sae.W_enc, sae.W_dec.T) and torch.equal(sae.b_dec, mean) and sae.apply_b_dec_to_input
    assert not torch.equal(sae.W_dec, random_sae(6, 40, 3, seed=2, b_dec=mean).W_dec)


# --- through the driver ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trust(tmp_path_factory, tiny_checkpoint, text_corpus):
    root = tmp_path_factory.mktemp("trust")
    harvest_run(root / "cache", tiny_checkpoint, text_corpus, tokens=4000)
    harvest_run(root / "other", tiny_checkpoint, text_corpus, tokens=3000)
    runs = train(TrainConfig(cache=str(root / "cache"), out=str(root / "runs"), steps=30, batch_size=128, lr=2e-3,
                             lr_warmup_steps=3, eval_fraction=0.2, progress=False),
                 [SAEConfig(d_sae=64, k=4)], names=["wide"])
    narrow = train(TrainConfig(cache=str(root / "cache"), out=str(root / "runs2"), steps=30, batch_size=128, lr=2e-3,
                               lr_warmup_steps=3, eval_fraction=0.05, progress=False),
                   [SAEConfig(d_sae=64, k=4)], names=["narrow"])
    return root, runs[0], narrow[0]


def _cfg(cache, **kw):
    return EvalConfig(cache=str(cache), progress=False, ce_contexts=8, **kw)


def test_a_run_on_another_cache_is_refused_unless_other_cache(trust):
    root, run, _ = trust
    with pytest.raises(EvalError, match="cache hash .*--other-cache"):
        evaluate([run], _cfg(root / "other", metrics=["core"], null_seeds=0))
    doc = evaluate([run], _cfg(root / "other", metrics=["core"], null_seeds=0, other_cache=True))[str(run)]
    assert doc["other_cache"] and doc["split"]["kind"] == "whole_cache"
    manifest = json.loads((root / "other" / "manifest.json").read_text())
    assert doc["split"]["n_sequences"] == manifest["n_sequences"]


def test_runs_with_different_eval_fractions_are_scored_only_on_their_common_held_out_rows(trust):
    root, wide, narrow = trust
    out = evaluate([wide, narrow], _cfg(root / "cache", metrics=["core"], null_seeds=0))
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    n = manifest["n_sequences"]
    split = out[str(wide)]["split"]
    assert split["eval_fraction"] == 0.05 and split["run_fractions"] == {str(wide): 0.2, str(narrow): 0.05}
    scored = set(split_sequences(n, split["eval_fraction"])[1])
    for fraction in (0.2, 0.05):  # no scored sequence is in either run's training split
        assert not scored & set(split_sequences(n, fraction)[0])
    assert split["n_sequences"] == len(scored)
    per_seq = manifest["rows_per_sequence"]
    assert out[str(wide)]["metrics"]["core"]["n_tokens"] <= len(scored) * per_seq


def test_a_partial_eval_after_more_training_drops_the_stale_groups(trust, tmp_path):
    root, trained, _ = trust
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    evaluate([run], _cfg(root / "cache", metrics=["core", "density"], null_seeds=0))
    evaluate([run], _cfg(root / "cache", metrics=["density"], null_seeds=0))
    kept = json.loads((run / "eval.json").read_text())
    assert set(kept["metrics"]) == {"core", "density"}  # same weights: the earlier group stays
    # the weights change (as a resumed run's do): a later partial eval must not keep the old core numbers
    write_sae(run, random_sae(run_d_in(run), 64, 4, seed=9, b_dec=torch.zeros(run_d_in(run))),
              json.loads((run / "cfg.json").read_text()).get("metadata", {}))
    doc = evaluate([run], _cfg(root / "cache", metrics=["density"], null_seeds=0))[str(run)]
    assert set(doc["metrics"]) == {"density"} and doc["dropped"] == ["core"]
    assert doc["provenance"]["density"]["weights_hash"] != kept["provenance"]["core"]["weights_hash"]


def run_d_in(run):
    return json.loads((run / "cfg.json").read_text())["d_in"]


def test_core_reports_intervals_the_random_sae_null_and_mean_ablation(trust):
    root, run, _ = trust
    doc = evaluate([run], _cfg(root / "cache", metrics=["core", "density"]))[str(run)]
    core = doc["metrics"]["core"]
    for key in ("explained_variance", "ce_score", "kl_score"):
        lo, hi = core["intervals"][key]
        assert lo <= core[key] <= hi, key
    assert core["ce_mean_ablation"] > core["ce_clean"] and "ce_score_vs_mean_ablation" in core
    null = core["null"]["ce_score"]
    assert len(null["null_values"]) == 3 and null["trained"] == core["ce_score"]
    assert "explained_variance" not in core["null"]  # the nulls' pass is shorter: reported there, not paired
    assert "_units" not in json.dumps(doc)
    density = doc["metrics"]["density"]
    lo, hi = density["intervals"]["dead_fraction"]
    assert lo <= density["dead_fraction"] + 1e-9 and hi <= 1
    stored = list((root / "cache" / STORE_DIR).glob("core-*.json"))
    assert len(stored) == 3
    # a second eval reads the nulls from the store: the same numbers, no new files
    again = evaluate([run], _cfg(root / "cache", metrics=["core"]))[str(run)]["metrics"]["core"]["null"]
    assert again["ce_score"]["null_values"] == null["null_values"]
    assert sorted((root / "cache" / STORE_DIR).glob("core-*.json")) == sorted(stored)


def test_dashboard_summary_shows_intervals_and_says_when_random_is_as_good():
    from dashboards.run_info import metric_summary

    shown = metric_summary({"ce_score": 0.9, "intervals": {"ce_score": [0.8, 0.95]}, "nested": {"a": 1},
                            "null": {"ce_score": {"difference": 0.05, "interval": [-0.01, 0.1],
                                                  "includes_zero": True}}})
    assert shown["ce_score 95% interval"] == "[0.8, 0.95]" and "nested" not in shown
    assert shown["ce_score minus random SAE"] == "+0.05 [-0.01, 0.1] (not separated from a random SAE)"


def test_a_random_sae_is_not_separated_from_the_null_on_scr_and_tpp(trust, tmp_path):
    """A random SAE scored as if trained: every SCR/TPP score minus the nulls' has an interval including 0 at the
    headline N, though its own scores need not be 0 (so reading them without the null would mislead)."""
    root, trained, _ = trust
    run = tmp_path / "random"
    shutil.copytree(trained, run)
    d_in = run_d_in(run)
    write_sae(run, random_sae(d_in, 64, 4, seed=11, b_dec=torch.zeros(d_in)),
              json.loads((run / "cfg.json").read_text()).get("metadata", {}))
    doc = evaluate([run], _cfg(root / "cache", metrics=["scr", "tpp"], labelled_train=200, labelled_test=200))
    m = doc[str(run)]["metrics"]
    for group, key in (("scr", "scr_metric_threshold_{n}"), ("tpp", "tpp_threshold_{n}_total_metric")):
        for n in (10, 20):
            cmp = m[group]["null"][key.format(n=n)]
            assert cmp["includes_zero"], (group, n, cmp)
            assert cmp["difference"] == pytest.approx(cmp["trained"] - np.mean(cmp["null_values"]))
            assert cmp["trained"] == pytest.approx(m[group]["metrics"][key.format(n=n)])
    assert list((root / "cache" / ".vsae-labelled").glob("*.safetensors"))  # the texts' activations are stored


def test_an_scr_pair_without_room_between_base_and_oracle_is_reported_not_averaged():
    from evals.registry import _over_sets

    def pair(base_t, base_s, oracle_t, score):
        return {"accuracy": {"base_target": base_t, "base_spurious": base_s, "oracle_target": oracle_t,
                             "oracle_spurious": 0.9}, "metrics": {"scr_metric_threshold_10": score}, "n_values": [10]}

    out = _over_sets("scr", {"good": pair(0.6, 0.9, 0.9, 0.4), "flat": pair(0.52, 0.9, 0.56, 3.0)})
    assert out["metrics"]["scr_metric_threshold_10"] == 0.4 and out["n_sets"] == 1
    assert out["sets_not_counted"] == ["flat"] and out["sets"]["flat"]["counted"] is False


@pytest.mark.slow
def test_demo_sized_topk_verdict_shown_matches_its_intervals(tmp_path):
    """The demo's TopK recipe (embedded model, d_sae 2048, k 32, 300 steps) against its nulls at N = 20: whatever
    the verdict, the CLI lines and the compare page show "not separated" exactly where the interval includes 0."""
    import dataclasses

    from activations.harvest import HarvestConfig, harvest
    from activations.tiny_model import ensure_tiny_model
    from dashboards.compare import NOT_SEPARATED, _null_text
    from evals.driver import table
    from vsae.config import apply_preset

    ensure_tiny_model(progress=False)
    cache = str(tmp_path / "cache")
    harvest(HarvestConfig(out=cache, corpus=["shakespeare"], tokens=200_000, progress=False))
    arm = dataclasses.replace(apply_preset("paper-topk", SAEConfig(), TrainConfig())[0], d_sae=2048, k=32,
                              dead_after=None)
    [run] = train(TrainConfig(cache=cache, out=str(tmp_path / "sae"), steps=300, batch_size=4096,
                              lr_warmup_steps=30, progress=False), [arm], names=["topk"])
    out = evaluate([run], EvalConfig(cache=cache, metrics=["scr", "tpp"], labelled_train=2000, labelled_test=1000,
                                     progress=False))
    lines = table(out)
    m = out[str(run)]["metrics"]
    for group, key in (("scr", "scr_metric_threshold_20"), ("tpp", "tpp_threshold_20_total_metric")):
        cmp = m[group]["null"][key]
        lo, hi = cmp["interval"]
        assert cmp["includes_zero"] == (lo <= 0 <= hi)
        assert (NOT_SEPARATED in _null_text(cmp)) == cmp["includes_zero"], (group, cmp)
        assert (f"{group}.{key}" in lines) == cmp["includes_zero"], (group, lines)
