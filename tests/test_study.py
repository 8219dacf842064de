import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline.study
from dashboards.assets import CSS
from pipeline.study import StudyConfig, StudyError, expand, load_plan, run_study, switch_effects
from tests.test_harvest import run as harvest_run
from vsae.variants import VariationalTopKSAE

PLAN = """
name = "tiny"
description = "A tiny grid <script>alert('x')</script> & co: variant x sample x k, and the size-matched arm."

[train]
steps = {steps}
batch_size = 128
lr = 0.002
lr_warmup_steps = 3
eval_fraction = 0.2
log_every = 10
checkpoint_every = {every}

[sae]
d_sae = 256
aux_k_coef = 0.0
kl_coef = 0.05

[eval]
metrics = ["core", "density"]
tokens = 2000
ce_contexts = 4

[[arm]]
name = "grid"
variant = ["topk", "vsae"]
sample = [false, true]
variance = ["fixed", "learned"]
k = [4, 8, 512]

[size_matched]
"""


def write_plan(path: Path, steps: int = 20, every: int = 1000) -> Path:
    path.write_text(PLAN.format(steps=steps, every=every))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_checkpoint, text_corpus):
    root = tmp_path_factory.mktemp("study")
    harvest_run(root / "cache", tiny_checkpoint, text_corpus, tokens=4000)
    return root / "cache"


def test_expand_skips_and_lists_impossible_and_meaningless(tmp_path):
    specs, skipped = expand(load_plan(write_plan(tmp_path / "p.toml")), d_in=32)
    names = [s.name for s in specs]
    # topk: sample/variance act only on vsae (deduplicated); vsae: learned variance needs sampling; k 512 > d_sae 256
    assert names == ["topk-k4", "topk-k8", "vsae-k4-nosample-variancefixed", "vsae-k8-nosample-variancefixed",
                     "vsae-k4-sample-variancefixed", "vsae-k8-sample-variancefixed", "vsae-k4-sample-variancelearned",
                     "vsae-k8-sample-variancelearned"]
    text = "\n".join(skipped)
    assert "act only on vsae; same run as topk-k4" in text
    assert "learned variance reaches only the KL" in text
    assert "impossible: k must be in 1..d_sae (256), got 512" in text
    assert len(skipped) == 24 - len(specs)


def test_switch_effects_pairs_runs_differing_in_one_switch(tmp_path):
    specs, _ = expand(load_plan(write_plan(tmp_path / "p.toml")), d_in=32)
    rows = {s.name: {"l0": float(s.sae["k"]) + (0.5 if s.sae["sample"] else 0.0)} for s in specs}
    effects = {(e["switch"], json.dumps(e["from"]), json.dumps(e["to"])): e for e in switch_effects(specs, rows)}
    assert effects[("k", "4", "8")]["deltas"]["l0"] == 4.0 and effects[("k", "4", "8")]["pairs"] == 4
    assert effects[("sample", "false", "true")]["deltas"]["l0"] == 0.5
    assert effects[("sample", "false", "true")]["pairs"] == 2  # vsae fixed-variance only: the rest differ in more


def test_variant_own_fields_come_from_the_variant_class(tmp_path, monkeypatch):
    plan = load_plan(write_plan(tmp_path / "p.toml"))
    plan["arm"] = [{"name": "grid", "variant": ["topk", "vsae"], "kl_coef": [0.05, 1.0], "k": 4}]
    specs, skipped = expand(plan, d_in=32)
    assert [s.name for s in specs] == ["topk", "vsae-klcoef0.05", "vsae-klcoef1.0"]
    assert skipped == ["grid: variant=topk, kl_coef=1.0, k=4 (duplicate: kl_coef act only on vsae; same run as topk)"]
    # Once the vSAE no longer declares kl_coef its own, it names and separates TopK runs too.
    monkeypatch.setattr(VariationalTopKSAE, "own_fields", ("sample", "variance", "kl_warmup"))
    specs, skipped = expand(plan, d_in=32)
    assert [s.name for s in specs] == ["topk-klcoef0.05", "topk-klcoef1.0", "vsae-klcoef0.05", "vsae-klcoef1.0"]
    assert skipped == []


def test_study_runs_resumes_and_refuses_another_plan(tmp_path, cache, monkeypatch):
    plan = write_plan(tmp_path / "p.toml")
    out = tmp_path / "s"
    compared = []
    compare_runs = pipeline.study.compare_runs
    monkeypatch.setattr(pipeline.study, "compare_runs",
                        lambda runs, ccfg: (compared.append((runs, ccfg)), compare_runs(runs, ccfg))[1])
    cfg = StudyConfig(cache=str(cache), plan=str(plan), out=str(out), progress=False)
    state = run_study(cfg)
    assert all(state["done"][k] for k in ("train", "eval", "train_size_matched", "eval_size_matched", "compare",
                                          "report"))
    [(runs, ccfg)] = compared
    assert len(runs) == len(state["runs"]) + len(state["size_matched"])
    assert (ccfg.cache, ccfg.out, ccfg.device, ccfg.progress) == (str(cache), str(out / "compare.html"), "cpu", False)
    assert all(r.split("/")[-1] in (out / "compare.html").read_text() for r in runs)
    for s in state["size_matched"]:  # d_sae = the vSAE's alive latents, same k
        assert s["sae"]["variant"] == "topk" and s["sae"]["k"] == [r for r in state["runs"]
                                                                 if r["name"] == s["matched_to"]][0]["sae"]["k"]
        assert s["sae"]["d_sae"] == state["alive"][s["matched_to"]] < 256
    for line in state["size_matched_skipped"]:  # every latent alive: the size-matched TopK is a grid run already
        assert re.search(r"same run as topk-k\d: all its latents are alive", line)
    md = (out / "report.md").read_text()
    for needle in ("explained_variance", "ce_score", "alive", "l0", "Effect of each switch", "Size-matched TopK",
                   "compare.html", "figures/l0.html", "Skipped combinations", "activation rows"):
        assert needle in md, needle
    assert (out / "figures" / "explained_variance.html").is_file()
    page = (out / "report.html").read_text()
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page
    assert CSS in page and '<table class="data">' in page and '<a href="compare.html">' in page
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/eval.json")}
    monkeypatch.setattr(pipeline.study, "compare_runs", lambda *a: pytest.fail("the compare page was done already"))
    run_study(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/eval.json")} == before  # nothing recomputed
    assert (out / "report.md").read_text() == md
    write_plan(plan, steps=21)
    with pytest.raises(StudyError, match=r"another plan; it differs in plan.train.steps: 20 -> 21"):
        run_study(cfg)


def study_cmd(cache, plan, out):
    return [sys.executable, "-m", "cli", "study", "--cache", str(cache), "--plan", str(plan), "--out", str(out),
            "--no-progress"]


def test_unwritable_out_is_one_clear_error(tmp_path, cache):
    plan = write_plan(tmp_path / "p.toml")
    (tmp_path / "file").write_text("not a directory")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    r = subprocess.run(study_cmd(cache, plan, tmp_path / "file" / "s"), env=env, capture_output=True, text=True)
    assert r.returncode == 2
    expected = r"vsae study: error: --out .*file/s: .*file is a file, not a directory; .*\n"
    assert re.fullmatch(expected, r.stderr), r.stderr


def test_disk_full_during_eval_leaves_no_complete_looking_eval(tmp_path, cache, monkeypatch):
    import errno

    import evals.driver

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(evals.driver, "write_json", full)
    out = tmp_path / "s"
    cfg = StudyConfig(cache=str(cache), plan=str(write_plan(tmp_path / "p.toml")), out=str(out), progress=False)
    with pytest.raises(StudyError, match="No space left on device.*rerun the same command"):
        run_study(cfg)
    state = json.loads((out / "study.json").read_text())
    assert state["done"] == {"train": True} and not list(out.glob("runs/*/eval.json"))
    monkeypatch.undo()
    assert run_study(cfg)["done"]["report"]


@pytest.mark.slow
def test_sigkill_twice_then_resume_gives_the_same_report(tmp_path, cache):
    plan = write_plan(tmp_path / "p.toml", steps=150, every=10)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    full, killed = tmp_path / "full", tmp_path / "killed"
    t0 = time.time()
    subprocess.run(study_cmd(cache, plan, full), check=True, env=env, capture_output=True)
    total = time.time() - t0
    rng = random.Random(7)
    for _ in range(2):
        proc = subprocess.Popen(study_cmd(cache, plan, killed), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.7) * total)
        assert proc.poll() is None, "the study finished before it was killed; make it longer"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (killed / "report.md").exists() or not json.loads(
            (killed / "study.json").read_text())["done"].get("report")
    subprocess.run(study_cmd(cache, plan, killed), check=True, env=env, capture_output=True)
    assert (killed / "report.md").read_text() == (full / "report.md").read_text()
    for run in sorted((full / "runs").iterdir()):
        a = json.loads((run / "eval.json").read_text())["metrics"]
        b = json.loads((killed / "runs" / run.name / "eval.json").read_text())["metrics"]
        assert a == b, run.name


def test_figures_skip_metrics_a_run_lacks(tmp_path):
    """A size-matched TopK smaller than 500 latents has no SCR at N=500; the report must still be written."""
    from dataclasses import asdict

    from pipeline.study import TRAIN_SWITCHES, RunSpec, _figures
    from vsae.config import SAEConfig, TrainConfig

    train = {k: v for k, v in asdict(TrainConfig(steps=10)).items() if k in TRAIN_SWITCHES}
    specs = [RunSpec("a", "x", asdict(SAEConfig(k=16, d_sae=1024)), train),
             RunSpec("b", "x", asdict(SAEConfig(k=32, d_sae=300)), train)]
    rows = {"a": {"scr_500": 0.1, "l0": 16}, "b": {"l0": 32}}
    assert _figures(tmp_path, specs, rows, ["l0", "scr_500"]) == ["l0", "scr_500"]
    assert (tmp_path / "figures" / "scr_500.html").is_file()
