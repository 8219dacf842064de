"""k-sparse probing (evals/sparse_probing.py): SAEBench's variant and the sae-probes one, their intervals and nulls.

The known answers: a latent that equals the label is chosen first and probes perfectly; features independent of
the labels probe at chance; the SAEBench variant equals a direct scikit-learn computation; the weighted AUC equals
scikit-learn's on the rows it stands for. One test runs the group through `vsae eval` on the tiny model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from evals import sparse_probing as sp
from evals.baseline import attach_bootstrap
from evals.labelled import LabelledSet
from evals.probes import TokenActivations
from evals.scr_tpp import UNITS
from tests.test_scr_tpp import _ground_truth_sae, _random_sae

D = 16


def _planted(n: int = 400, d: int = 20, j: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Nonnegative noise features; column j equals the (balanced) label exactly."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    X = np.maximum(0.0, rng.normal(size=(n, d)))
    X[:, j] = y
    return X, y


def test_a_latent_equal_to_the_label_is_chosen_and_probes_perfectly():
    X, y = _planted()
    Xt, yt = _planted(seed=1)
    assert sp.top_k_by_mean_difference(X, y, 1).tolist() == [7]
    assert sp.saebench_probe(X[:, [7]], y, Xt[:, [7]], yt).accuracy == 1.0
    top = sp.top_k_by_mean_difference(sp.nonzero_mean_normalised(X), y, 1)
    assert top.tolist() == [7]
    score = sp.find_best_reg(X[:, top], y, Xt[:, top], yt, l1=True, seed=42)
    assert score.accuracy == 1.0 and score.auc(yt) == 1.0


def test_features_independent_of_the_label_probe_at_chance():
    rng = np.random.default_rng(3)
    X, Xt = np.maximum(0, rng.normal(size=(400, 30))), np.maximum(0, rng.normal(size=(400, 30)))
    y, yt = np.arange(400) % 2, rng.permutation(np.arange(400) % 2)
    for k in (1, 5):
        top = sp.top_k_by_mean_difference(X, y, k)
        assert abs(sp.saebench_probe(X[:, top], y, Xt[:, top], yt).accuracy - 0.5) < 0.1
        score = sp.find_best_reg(X[:, top], y, Xt[:, top], yt, l1=True, seed=42)
        assert abs(score.auc(yt) - 0.5) < 0.1 and abs(score.accuracy - 0.5) < 0.1


def test_selection_rejects_bad_k_and_one_class_labels():
    X, y = _planted(n=20)
    with pytest.raises(ValueError, match="k=21 must be in 1..20"):
        sp.top_k_by_mean_difference(X, y, 21)
    with pytest.raises(ValueError, match="both 0 and 1"):
        sp.top_k_by_mean_difference(X, np.ones(20), 1)


def test_weighted_auc_is_sklearn_s_on_the_rows_it_counts():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=60), 1)  # ties, counted one half
    labels = rng.permutation(np.arange(60) % 2)
    assert sp.weighted_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    counts = rng.integers(0, 4, size=(3, 60)).astype(float)
    got = sp.weighted_auc(scores, labels, counts)
    for b in range(3):
        rows = np.repeat(np.arange(60), counts[b].astype(int))
        assert got[b] == pytest.approx(roc_auc_score(labels[rows], scores[rows]))
    no_positive = np.where(labels == 1, 0.0, 1.0)[None]
    assert np.isnan(sp.weighted_auc(scores, labels, no_positive)[0])


# ---------------------------------------------------------------------------------------------------------------
# A labelled set of synthetic token activations: class c lives on dimension c


def _set(per_class: int = 70, n_classes: int = 3, tokens_per_text: int | None = 1, planted: bool = True,
         seed: int = 0) -> tuple[LabelledSet, TokenActivations]:
    """Every token of a class-c text has 3.0 on dimension c and 0 on the other class dimensions (planted), or noise
    there too (not planted); the other dimensions are noise. Tasks of 140 training texts: sae-probes' C search then
    holds out one validation split (>= 128 texts), which keeps the test fast."""
    rng = np.random.default_rng(seed)
    y = np.tile(np.repeat(np.arange(n_classes), per_class), 3)
    n = len(y) // 3
    counts = np.full(len(y), tokens_per_text) if tokens_per_text else rng.integers(2, 6, len(y))
    acts = rng.normal(size=(counts.sum(), D))
    text = np.repeat(np.arange(len(y)), counts)
    acts[:, :n_classes] = 0.0 if planted else rng.normal(size=(counts.sum(), n_classes))
    if planted:
        acts[np.arange(len(acts)), y[text]] = 3.0
    offsets = np.concatenate([[0], np.cumsum(counts)])
    data = LabelledSet([""] * len(y), {"c": y}, {"train": np.arange(n), "validation": np.arange(n, 2 * n),
                                                 "test": np.arange(2 * n, 3 * n)},
                       {"c": tuple(f"class{i}" for i in range(n_classes))}, {"classes": "c"},
                       {"name": "synthetic"})
    return data, TokenActivations(torch.tensor(acts, dtype=torch.float32), torch.tensor(offsets, dtype=torch.long))


@pytest.fixture(scope="module")
def planted():
    data, tokens = _set(tokens_per_text=None)
    return data, tokens, sp.fit_references(tokens, data, seed=42)


def test_planted_classes_are_found_by_both_variants(planted):
    data, tokens, refs = planted
    result = sp.sparse_probing_from_activations(tokens, data, _ground_truth_sae(D), refs, seed=42)
    m = result["metrics"]
    for key in ("saebench_top_1_accuracy", "sae_probes_top_1_accuracy", "sae_probes_top_1_auc",
                "saebench_top_5_accuracy", "saebench_sae_accuracy"):
        assert m[key] == 1.0, key
    for c, name in enumerate(result["classes"]):
        assert result["per_class"][name]["saebench_top_1"]["latents"] == [c]
        assert result["per_class"][name]["sae_probes_top_1"]["latents"] == [c]
    # a random SAE of the same shape does worse, and the references do not depend on the SAE
    other = sp.sparse_probing_from_activations(tokens, data, _random_sae(D, 2 * D, k=4), refs, seed=42)
    assert other["metrics"]["saebench_top_1_accuracy"] < 0.95
    assert other["metrics"]["saebench_llm_accuracy"] == m["saebench_llm_accuracy"]


def test_labels_unrelated_to_the_activations_probe_at_chance():
    data, tokens = _set(per_class=150, n_classes=2, planted=False, seed=1)
    refs = sp.fit_references(tokens, data, seed=42)
    m = sp.sparse_probing_from_activations(tokens, data, _ground_truth_sae(D), refs, seed=42)["metrics"]
    for key in ("saebench_top_1_accuracy", "sae_probes_top_1_auc", "saebench_llm_accuracy"):
        assert abs(m[key] - 0.5) < 0.1, (key, m[key])


def test_saebench_variant_equals_a_direct_sklearn_computation():
    """One token per text: pooled latents are relu([x, -x]) of that token; select, fit and score by hand."""
    data, tokens = _set(planted=False, seed=2)
    tokens.acts[:, 0] += torch.as_tensor(data.labels["c"] == 0, dtype=torch.float32)  # one text, one token: signal
    refs = sp.fit_references(tokens, data, seed=42)
    result = sp.sparse_probing_from_activations(tokens, data, _ground_truth_sae(D), refs, k_values=(1, 2), seed=42)
    x = tokens.acts.double().numpy()
    latents = np.maximum(np.concatenate([x, -x], axis=1), 0.0)
    for task in refs.tasks:
        for k in (1, 2):
            Xtr, Xte = latents[task.train], latents[task.test]
            diff = np.abs(Xtr[task.y_train == 1].mean(0) - Xtr[task.y_train == 0].mean(0))
            top = np.argsort(-diff, kind="stable")[:k]
            probe = LogisticRegression(C=1.0, max_iter=1000).fit(Xtr[:, top], task.y_train)
            accuracy = float((probe.predict(Xte[:, top]) == task.y_test).mean())
            got = result["per_class"][task.name][f"saebench_top_{k}"]
            assert got["latents"] == top.tolist() and got["accuracy"] == pytest.approx(accuracy)
        small = [t for t in refs.small_tasks if t.name == task.name][0]
        Xs = latents[small.train]
        normalised = Xs / (np.abs(Xs).sum(0) / ((Xs != 0).sum(0) + 1e-6) + 1e-6)
        diff = np.abs(normalised[small.y_train == 1].mean(0) - normalised[small.y_train == 0].mean(0))
        top = np.argsort(-diff, kind="stable")[:2]
        assert result["per_class"][task.name]["sae_probes_top_2"]["latents"] == top.tolist()
    assert result["metrics"]["saebench_top_1_accuracy"] == pytest.approx(
        np.mean([result["per_class"][t.name]["saebench_top_1"]["accuracy"] for t in refs.tasks]))


def test_intervals_and_paired_nulls(planted):
    data, tokens, refs = planted

    def group_result(sae):
        return sp.over_sets({"synthetic": sp.sparse_probing_from_activations(tokens, data, sae, refs, seed=42)}, 42)

    trained = group_result(_ground_truth_sae(D))
    nulls = [group_result(_random_sae(D, 2 * D, k=4, seed=s)) for s in (1, 2, 3)]
    point = sp.BOOTSTRAP.replicate(trained, None)
    assert point["saebench_top_1_accuracy"] == pytest.approx(trained["saebench_top_1_accuracy"])
    assert point["sae_probes_top_5_auc"] == pytest.approx(trained["sae_probes_top_5_auc"])
    assert "saebench_llm_accuracy" not in point  # a reference: an interval, no null comparison
    attach_bootstrap(sp.BOOTSTRAP, trained, nulls, seed=42)
    for key in ("saebench_top_1_accuracy", "sae_probes_top_1_auc", "saebench_llm_accuracy", "sae_probes_llm_auc"):
        lo, hi = trained["intervals"][key]
        assert lo <= trained[key] <= hi, key
    cmp = trained["null"]["saebench_top_1_accuracy"]
    assert cmp["includes_zero"] is False and cmp["difference"] > 0.05 and len(cmp["null_values"]) == 3
    # a random SAE scored as if trained is not separated from the other random ones
    alike = group_result(_random_sae(D, 2 * D, k=4, seed=9))
    attach_bootstrap(sp.BOOTSTRAP, alike, nulls, seed=42)
    assert alike["null"]["saebench_top_1_accuracy"]["includes_zero"] is True


def test_a_set_without_classes_is_refused():
    data, tokens = _set()
    data.roles = {"target": "c"}
    with pytest.raises(ValueError, match="class-labelled set"):
        sp.fit_references(tokens, data, seed=42)


# ---------------------------------------------------------------------------------------------------------------
# Through `vsae eval`


def test_vsae_eval_metrics_sparse_probing(tmp_path, tiny_checkpoint, text_corpus, capsys, monkeypatch):
    """The group through the CLI on the tiny model, on the generated TPP set only (the Shakespeare one doubles the
    time and adds nothing to the wiring): headlines with intervals and a paired comparison with a null."""
    from cli import main
    from evals import labelled
    from evals.null import random_sae
    from tests.provenance_helpers import mark_trained_on
    from tests.test_harvest import HOOK
    from tests.test_harvest import run as harvest_run
    from vsae.checkpoint import write_sae

    cache = tmp_path / "cache"
    harvest_run(cache, tiny_checkpoint, text_corpus, tokens=2000)
    d_in = json.loads((cache / "manifest.json").read_text())["d_in"]
    run = tmp_path / "run"
    run.mkdir()
    write_sae(run, random_sae(d_in, 48, 4, seed=11, b_dec=torch.zeros(d_in)),
              {"model_name": "tiny", "hook_name": HOOK, "context_size": 32, "dataset_path": str(cache)})
    mark_trained_on(run, cache)
    monkeypatch.setattr(labelled, "offline_tpp_sets", lambda **sizes: [labelled.hard_tpp_set(**sizes)])
    assert main(["eval", str(run), "--cache", str(cache), "--metrics", "sparse_probing", "--labelled-train", "260",
                 "--labelled-test", "20", "--null-seeds", "1", "--no-progress"]) == 0
    assert "sp_top1" in capsys.readouterr().out
    doc = json.loads((run / "eval.json").read_text())
    result = doc["metrics"]["sparse_probing"]
    assert result["k_values"] == [1, 2, 5] and result["set_names"] == ["generated_tpp"]
    for key in ("saebench_top_1_accuracy", "saebench_top_5_accuracy", "sae_probes_top_1_auc", "sae_probes_top_5_auc"):
        assert 0 <= result[key] <= 1
        lo, hi = result["intervals"][key]
        assert lo <= result[key] <= hi
        cmp = result["null"][key]
        assert len(cmp["null_values"]) == 1 and cmp["interval"][0] <= cmp["difference"] <= cmp["interval"][1]
    assert doc["definitions"]["sparse_probing"] and UNITS not in json.dumps(doc)
