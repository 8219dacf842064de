import json

import pytest

from evals.driver import EvalConfig, EvalError, evaluate, table
from evals.registry import parse_metrics
from tests.test_harvest import run as harvest_run
from vsae.config import SAEConfig, TrainConfig
from vsae.trainer import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_checkpoint, text_corpus):
    root = tmp_path_factory.mktemp("evalrun")
    harvest_run(root / "cache", tiny_checkpoint, text_corpus, tokens=4000)
    runs = train(TrainConfig(cache=str(root / "cache"), out=str(root / "runs"), steps=30, batch_size=128, lr=2e-3,
                             lr_warmup_steps=3, eval_fraction=0.2, progress=False),
                 [SAEConfig(d_sae=64, k=4), SAEConfig(variant="vsae", d_sae=64, k=4, kl_coef=0.01)],
                 names=["topk", "vsae"])
    return root / "cache", runs


def test_eval_writes_json_figures_and_table(trained):
    cache, runs = trained
    out = evaluate(runs, EvalConfig(cache=str(cache), metrics=["core", "density", "ablation", "independence"],
                                    ce_contexts=8, ablation_latents=3, progress=False))
    for run in runs:
        doc = json.loads((run / "eval.json").read_text())
        m = doc["metrics"]
        assert set(m) == {"core", "density", "ablation", "independence"}
        assert 0 < m["core"]["l0"] <= 4 and m["core"]["n_tokens"] > 0
        for key in ("ce_clean", "ce_sae", "ce_zero", "ce_score", "kl_score", "explained_variance", "mse"):
            assert isinstance(m["core"][key], float), key
        assert m["density"]["n_tokens"] == m["core"]["n_tokens"]
        assert len(m["density"]["per_latent"]) == 64 and m["density"]["training"]["dead_after_tokens"] > 0
        assert len(m["ablation"]["latents"]) == 3
        assert "explained_variance" in doc["definitions"] and doc["cache_hash"]
        assert (run / "figures" / "density.html").is_file()
    # the same held-out tokens for every run
    assert out[str(runs[0])]["metrics"]["core"]["n_tokens"] == out[str(runs[1])]["metrics"]["core"]["n_tokens"]
    text = table(out)
    assert "topk" in text and "vsae" in text and "ce_score" in text


def test_partial_eval_keeps_earlier_metrics(trained):
    cache, runs = trained
    evaluate(runs[:1], EvalConfig(cache=str(cache), metrics=["core"], ce_contexts=4, progress=False))
    before = json.loads((runs[0] / "eval.json").read_text())["metrics"]["core"]
    evaluate(runs[:1], EvalConfig(cache=str(cache), metrics=["tsne"], tsne_tokens=500, progress=False))
    doc = json.loads((runs[0] / "eval.json").read_text())
    assert doc["metrics"]["core"] == before and "tsne" in doc["metrics"]
    assert (runs[0] / "figures" / "tsne_decoder.html").is_file()


def test_width_mismatch_and_unknown_metric(trained, tmp_path):
    import numpy as np

    from activations.cache import write_array_cache

    cache, runs = trained
    write_array_cache(tmp_path / "narrow", np.zeros((310, 16), dtype=np.float32), 32, {"kind": "synthetic"})
    with pytest.raises(EvalError, match="d_in 32 .* width 16"):
        evaluate(runs[:1], EvalConfig(cache=str(tmp_path / "narrow"), progress=False))
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metrics("core,nope")
    assert parse_metrics("all")[0] == "core"


def test_scr_and_tpp_through_the_driver(trained):
    cache, runs = trained
    evaluate(runs, EvalConfig(cache=str(cache), metrics=["scr", "tpp"], labelled_train=400, labelled_test=200,
                              progress=False))
    for run in runs:
        m = json.loads((run / "eval.json").read_text())["metrics"]
        # d_sae 64: SAEBench's N values up to 50 apply, 100 and 500 do not
        assert "scr_metric_threshold_50" in m["scr"]["metrics"] and m["scr"]["n_values"] == [2, 5, 10, 20, 50]
        assert "tpp_threshold_50_total_metric" in m["tpp"]["metrics"]
        assert m["tpp"]["n_sets"] == len(m["tpp"]["set_names"]) >= 2  # every TPP set counts
        # SCR pairs without room between A_base and A_oracle are listed, not averaged
        assert m["scr"]["n_sets"] + len(m["scr"]["sets_not_counted"] or []) == len(m["scr"]["set_names"]) >= 2
