"""The metric registry drives `vsae eval`, and an eval's eval.json + figures are swapped in whole."""

import json
from dataclasses import replace

import pytest
import torch

import evals.driver
from evals import registry
from evals.driver import EvalConfig, evaluate
from evals.registry import GROUPS, METRIC_GROUPS, MetricGroup, definitions, parse_metrics
from tests.provenance_helpers import mark_trained_on
from tests.synthetic import planted_features, synthetic_cache
from vsae.checkpoint import SAEWeights, write_sae


@pytest.fixture()
def cache_and_run(tmp_path):
    rows, dirs = planted_features(2048, d_in=16, n_features=32)
    cache = synthetic_cache(tmp_path / "cache", rows)
    W_dec = torch.from_numpy(dirs)
    sae = SAEWeights(W_enc=W_dec.T.contiguous(), b_enc=torch.zeros(32), W_dec=W_dec, b_dec=torch.zeros(16), k=4,
                     apply_b_dec_to_input=False)
    run = tmp_path / "run"
    run.mkdir()
    write_sae(run, sae, {"model_name": "planted", "hook_name": "synthetic", "context_size": 17,
                         "dataset_path": str(cache)})
    mark_trained_on(run, cache)
    return cache, run


def test_every_group_declares_what_it_needs_and_means():
    for g in GROUPS:
        assert g.definitions and all(v for v in g.definitions.values()), g.name
        assert g.needs <= {"stream", "model"}, g.name
    assert list(METRIC_GROUPS) == [g.name for g in GROUPS]
    assert parse_metrics("all") == [g.name for g in GROUPS]
    with pytest.raises(ValueError, match="unknown metric.*bogus.*choose from core"):
        parse_metrics("core,bogus")


def test_a_new_group_is_one_registry_entry(cache_and_run, monkeypatch):
    """A group added to the registry alone is accepted by --metrics, computed by the driver from the shared stream
    pass, and written with its definition; nothing else changes."""
    cache, run = cache_and_run

    def mean_l0_squared(ctx):
        return {r: {"value": ctx.stream[r].core["l0"] ** 2} for r in ctx.saes}

    extra = MetricGroup("l0_squared", mean_l0_squared, {"l0_squared": "mean L0, squared"}, frozenset({"stream"}),
                        columns=(("l0^2", "value"),))
    monkeypatch.setattr(registry, "GROUPS", (*GROUPS, extra))
    out = evaluate([run], EvalConfig(cache=str(cache), metrics=parse_metrics("core,l0_squared"), progress=False))
    doc = out[str(run)]
    assert doc["metrics"]["l0_squared"]["value"] == pytest.approx(doc["metrics"]["core"]["l0"] ** 2)
    assert doc["definitions"]["l0_squared"] == "mean L0, squared"
    assert "l0^2" in evals.driver.table(out)


def test_definitions_in_eval_json_are_the_registry_s(cache_and_run):
    cache, run = cache_and_run
    doc = evaluate([run], EvalConfig(cache=str(cache), metrics=["core"], progress=False))[str(run)]
    assert doc["definitions"] == definitions()
    assert doc["metrics"]["core"]["ce_score"] is None  # a synthetic cache has no model


def test_groups_run_only_when_asked(cache_and_run, monkeypatch):
    cache, run = cache_and_run
    called = []
    groups = tuple(replace(g, compute=lambda ctx, g=g: called.append(g.name) or g.compute(ctx)) for g in GROUPS)
    monkeypatch.setattr(registry, "GROUPS", groups)
    evaluate([run], EvalConfig(cache=str(cache), metrics=["density"], progress=False))
    assert called == ["density"]


def test_killed_eval_keeps_the_old_result_whole(cache_and_run, monkeypatch):
    cache, run = cache_and_run
    evaluate([run], EvalConfig(cache=str(cache), metrics=["core", "density"], progress=False))
    old_json = (run / "eval.json").read_bytes()
    old_fig = (run / "figures" / "density.html").read_bytes()

    def killed(ctx):
        raise KeyboardInterrupt  # after density wrote its new figure into the staging directory

    groups = tuple(replace(g, compute=killed) if g.name == "independence" else g for g in GROUPS)
    monkeypatch.setattr(registry, "GROUPS", groups)
    with pytest.raises(KeyboardInterrupt):
        evaluate([run], EvalConfig(cache=str(cache), metrics=["density", "independence"], tokens=50,
                                   progress=False))
    assert (run / "eval.json").read_bytes() == old_json
    assert (run / "figures" / "density.html").read_bytes() == old_fig
    assert not [p.name for p in run.iterdir() if p.name.startswith(".eval")]


def test_interrupted_swap_is_finished_forward(cache_and_run, monkeypatch):
    """A kill after the staged result was complete (renamed to .eval.new) but before it was moved in: the next
    eval finishes the swap, so eval.json and its figures always belong together."""
    cache, run = cache_and_run
    real_finish = evals.driver._finish_swap
    monkeypatch.setattr(evals.driver, "_finish_swap", lambda run: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        evaluate([run], EvalConfig(cache=str(cache), metrics=["density"], tokens=500, progress=False))
    assert (run / ".eval.new" / "eval.json").is_file() and not (run / "eval.json").exists()
    monkeypatch.setattr(evals.driver, "_finish_swap", real_finish)
    evals.driver.recover_eval(run)
    doc = json.loads((run / "eval.json").read_text())
    assert doc["metrics"]["density"]["n_tokens"] > 0 and (run / "figures" / "density.html").is_file()
    assert not (run / ".eval.new").exists()


def test_joint_tsne_reaches_the_compare_page(cache_and_run, tmp_path):
    """Two runs of one width evaluated together get a joint decoder map whose coordinates (with each point's run)
    the compare page draws itself."""
    import shutil

    from dashboards.compare import CompareConfig, compare_runs

    cache, run = cache_and_run
    other = tmp_path / "other"
    shutil.copytree(run, other)
    evaluate([run, other], EvalConfig(cache=str(cache), metrics=["density", "tsne"], tsne_tokens=96, progress=False))
    entry = json.loads((run / "eval.json").read_text())["metrics"]["tsne"]["joint"]
    coords = json.loads((run / entry["coordinates"]).read_text())
    assert sorted(set(coords["runs"])) == ["other", "run"] and len(coords["coords"]) == len(coords["runs"])
    page = compare_runs([run, other], CompareConfig(cache=str(cache), out=str(tmp_path / "c.html"), progress=False))
    html = (tmp_path / "c.html").read_text()
    assert page["runs"] == 2 and "Joint decoder t-SNE" in html and "No joint t-SNE map" not in html


def test_eval_refuses_a_run_another_process_writes(cache_and_run):
    from activations.guard import DirLock, LockedError

    cache, run = cache_and_run
    with DirLock(run, "run"), pytest.raises(LockedError, match="in use by another vsae process"):
        evaluate([run], EvalConfig(cache=str(cache), metrics=["core"], progress=False))
    assert not (run / "eval.json").exists()
