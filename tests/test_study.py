import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import pipeline.study
from dashboards.assets import CSS
from evals.null import STORE_DIR
from pipeline.study import (
    StudyConfig,
    StudyError,
    expand,
    load_plan,
    paired_effect,
    recipe_differences,
    run_study,
    significance_line,
    size_matched,
    switch_effects,
)
from tests.test_harvest import run as harvest_run
from vsae.config import diff_fields
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
                   "compare.html", "figures/l0.html", "Skipped combinations", "activation rows",
                   "Trained against random SAEs", "| run | CE score |", "In words", "95% t interval",
                   "nothing (variant and size only)"):
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
    # Each study its own cache without a null store: nulls stored by the full run (or earlier tests) would make
    # the killed runs finish before their kill.
    caches = {name: shutil.copytree(cache, tmp_path / f"cache-{name}", ignore=shutil.ignore_patterns(STORE_DIR))
              for name in ("full", "killed")}
    t0 = time.time()
    subprocess.run(study_cmd(caches["full"], plan, full), check=True, env=env, capture_output=True)
    total = time.time() - t0
    rng = random.Random(7)
    for _ in range(2):
        proc = subprocess.Popen(study_cmd(caches["killed"], plan, killed), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.7) * total)
        assert proc.poll() is None, "the study finished before it was killed; make it longer"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (killed / "report.md").exists() or not json.loads(
            (killed / "study.json").read_text())["done"].get("report")
    subprocess.run(study_cmd(caches["killed"], plan, killed), check=True, env=env, capture_output=True)
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


# ---------------------------------------------------------------- seeds, intervals, provenance (issue 15 item 9)

def test_seeds_train_every_spec_with_each_seed(tmp_path):
    plan = load_plan(write_plan(tmp_path / "p.toml"))
    one, skipped_one = expand(plan, d_in=32)
    plan["seeds"] = 2
    specs, skipped = expand(plan, d_in=32)
    assert [line.replace("-seed42)", ")") for line in skipped] == skipped_one  # once, whatever the seeds
    assert [s.name for s in specs] == [f"{s.name}-seed{seed}" for s in one for seed in (42, 43)]
    assert [s.train["seed"] for s in specs] == [42, 43] * len(one)
    plan["seeds"] = [7, 9]
    assert {s.train["seed"] for s in expand(plan, d_in=32)[0]} == {7, 9}
    controlled, paper = expand(load_plan("controlled"), d_in=128)[0], expand(load_plan("paper"), d_in=512)[0]
    assert {s.train["seed"] for s in controlled} == {42, 43} and all(s.name.endswith(("-seed42", "-seed43"))
                                                                       for s in controlled)
    assert {s.train["seed"] for s in paper} == {42} and "topk-k64" in [s.name for s in paper]


@pytest.mark.parametrize("seeds, arm_seed, match", [
    (0, None, "seeds must be a count >= 1"), ("2", None, "seeds must be"), ([1, 1], None, "distinct"),
    (2, 5, "arm grid set seed, but the plan's seeds = 2 sets every run's seed")])
def test_bad_seeds_are_refused(tmp_path, seeds, arm_seed, match):
    text = PLAN.format(steps=5, every=10).replace('name = "tiny"', f"name = \"tiny\"\nseeds = {json.dumps(seeds)}")
    if arm_seed is not None:
        text = text.replace("k = [4, 8, 512]", f"k = [4, 8, 512]\nseed = {arm_seed}")
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(StudyError, match=match):
        load_plan(tmp_path / "p.toml")


def test_paired_effect_t_interval_known_answers():
    two = paired_effect([1.0, 3.0])  # mean 2, sd sqrt(2): half-width t(0.975, 1) = 12.7062
    assert two["mean"] == 2.0 and two["n"] == 2 and two["significant"] is False
    assert two["interval"] == pytest.approx([2 - 12.7062, 2 + 12.7062], abs=1e-3)
    four = paired_effect([1.0, 1.2, 0.8, 1.0])  # sd 0.1633, t(0.975, 3) = 3.1824: half-width 0.2598
    assert four["interval"] == pytest.approx([0.7402, 1.2598], abs=1e-3) and four["significant"] is True
    assert paired_effect([0.5]) == {"mean": 0.5, "interval": None, "n": 1, "significant": None}


def test_switch_effects_pair_within_a_seed_and_say_what_is_significant(tmp_path):
    plan = load_plan(write_plan(tmp_path / "p.toml"))
    plan["seeds"] = 2
    specs, _ = expand(plan, d_in=32)
    # l0 moves with the seed by 1 and with k by 4: pairs across seeds would give 3 or 5, not 4
    rows = {s.name: {"l0": float(s.sae["k"] + s.train["seed"]),
                     "ev": 0.1 * (s.sae["k"] == 8) * (1 + 0.1 * (s.train["seed"] - 42)),
                     "ce": (s.train["seed"] - 42.5) * (s.sae["k"] == 8)} for s in specs}
    effects = {(e["switch"], json.dumps(e["from"]), json.dumps(e["to"])): e for e in switch_effects(specs, rows)}
    assert "seed" not in {sw for sw, _, _ in effects}  # seeds are replicates, not a switch
    k = effects[("k", "4", "8")]
    assert k["pairs"] == 8 and k["effects"]["l0"]["interval"] == [4.0, 4.0] and k["deltas"]["l0"] == 4.0
    assert k["effects"]["ev"]["significant"] is True and k["effects"]["ce"]["significant"] is False
    line = significance_line(k, ["l0", "ev", "ce"])
    assert line.startswith("k 4 -> 8 (8 pairs): significant (interval excludes 0): l0 +4 [+4, +4]; ev +0.105")
    assert line.endswith("not significant (interval includes 0): ce.")
    one = {**k, "pairs": 1, "effects": {c: paired_effect([1.0]) for c in ("l0", "ev", "ce")}}
    assert significance_line(one, ["l0"]) == "k 4 -> 8: no interval (one pair)."


def test_size_matched_copies_its_source_recipe_but_variant_and_size():
    plan = load_plan("controlled")
    specs, _ = expand(plan, d_in=128)
    by_name = {s.name: s for s in specs}
    alive = {s.name: 100 + s.sae["k"] for s in specs if s.sae["variant"] != "topk"}
    matched, _ = size_matched(plan, specs, alive, 128, None)
    assert len(matched) == len([s for s in specs if s.arm == "code" and s.sae["variant"] == "vsae"])
    recipes = set()
    for m in matched:
        src = by_name[m.matched_to]
        assert diff_fields(m.sae, src.sae) == ["d_sae", "variant"] and m.sae["d_sae"] == alive[src.name]
        assert m.train == src.train and recipe_differences(m, src) == []  # lr, steps, seed: the source's
        recipes.add((m.sae["decoder"], m.sae["pre_bias"], m.sae["aux_k_coef"], m.train["seed"]))
    assert ("free", False, 0.0, 43) in recipes and ("unit", True, 0.03125, 42) in recipes
    # The paper plan's [size_matched] names the paper's TopK preset: the report lists what else differs.
    paper = load_plan("paper")
    pspecs, _ = expand(paper, d_in=512)
    [m], _ = size_matched(paper, pspecs, {s.name: 100 for s in pspecs if s.sae["variant"] == "vsae"}, 512, None)
    assert {"decoder", "pre_bias", "aux_k_coef", "lr"} <= set(recipe_differences(m, {s.name: s for s in pspecs}[
        m.matched_to]))


def _doc(dead: float, ce_apart: bool, scr_apart: list[bool]) -> dict:
    def null(apart: bool) -> dict:
        return {"trained": 0.5, "null_mean": 0.3, "difference": 0.2, "interval": [0.1, 0.3] if apart else [-0.1, 0.5],
                "includes_zero": not apart}

    scr_keys = [f"scr_metric_threshold_{n}" for n in (2, 20)]
    return {"settings": {}, "metrics": {
        "core": {"explained_variance": 0.9, "ce_score": 0.8, "l0": 4.0, "null": {"ce_score": null(ce_apart)}},
        "density": {"dead_fraction": dead},
        "scr": {"metrics": dict.fromkeys(scr_keys, 0.1), "n_values": [2, 20],
                "null": {k: null(a) for k, a in zip(scr_keys, scr_apart, strict=True)}}}}


def test_report_gives_n_per_alive_latent_and_separation_from_the_null(tmp_path):
    from dataclasses import asdict

    from pipeline.study import TRAIN_SWITCHES, RunSpec, n_fractions, write_report
    from vsae.config import SAEConfig, TrainConfig

    train = {k: v for k, v in asdict(TrainConfig(steps=10)).items() if k in TRAIN_SWITCHES}
    specs = [RunSpec(f"r{k}", "x", asdict(SAEConfig(k=k, d_sae=256)), train) for k in (4, 8, 16)]
    docs = {"r4": _doc(0.5, True, [True, False]), "r8": _doc(0.75, True, [False, False]),
            "r16": _doc(0.0, True, [True, False])}
    assert n_fractions(specs[0], docs["r4"]) == {2: 2 / 128, 20: 20 / 128}  # alive: (1 - 0.5) * 256
    write_report(tmp_path, {"name": "t"}, specs, docs, {})
    md = (tmp_path / "report.md").read_text()
    assert "| r4 | 256 | 128 | 1.56% | 15.62% |" in md and "| r8 | 256 | 64 | 3.12% | 31.25% |" in md
    assert "| r4 | yes (+0.2) | yes (+0.2) | no (+0.2) |" in md
    assert "CE score separates trained from random SAEs for 3 of 3 runs." in md
    assert "SCR at N=2 separates trained from random SAEs for 2 of 3 runs." in md
    assert "SCR at N=20 does not separate trained from random SAEs for 3 of 3 runs" in md


def test_stale_reason_checks_each_groups_provenance(tmp_path):
    from dataclasses import asdict

    from evals.driver import EvalConfig
    from evals.provenance import weights_hash
    from pipeline.study import stale_reason

    run = tmp_path / "run"
    run.mkdir()
    (run / "sae_weights.safetensors").write_bytes(b"weights v1")
    (run / "train.json").write_text(json.dumps({"train": {"eval_fraction": 0.2}}))
    ecfg = EvalConfig(cache="c", metrics=["core", "density"], device="cpu", progress=False)

    def write(**change):
        origin = {"weights_hash": weights_hash(run), "cache_hash": "h", "step": 3, "settings": asdict(ecfg),
                  "split": {"kind": "held_out", "eval_fraction": 0.2, "seed": 0, "n_sequences": 9}}
        groups = {g: {**origin, **change} for g in ("core", "density")}
        (run / "eval.json").write_text(json.dumps({"metrics": {"core": {}, "density": {}}, "provenance": groups}))

    write()
    assert stale_reason(run, ecfg, "h") is None
    write(settings={**asdict(ecfg), "device": "cuda", "progress": True, "metrics": ["core"]})
    assert stale_reason(run, ecfg, "h") is None  # where and how loudly it ran change nothing computed
    write(settings={**asdict(ecfg), "tokens": 5})
    assert stale_reason(run, ecfg, "h") == "core: computed with other settings (tokens)"
    write(split={"kind": "held_out", "eval_fraction": 0.05})
    assert "core: scored on another split" in stale_reason(run, ecfg, "h")
    write()
    assert stale_reason(run, ecfg, "other") == "core: computed on another cache"
    assert stale_reason(run, replace(ecfg, metrics=["core", "scr"]), "h") == "scr: not evaluated, or with no provenance"
    (run / "sae_weights.safetensors").write_bytes(b"weights v2")  # e.g. trained on with --resume
    assert stale_reason(run, ecfg, "h") == "core: computed from other weights than the run's current ones"


SEEDS_PLAN = """
name = "seeds"
seeds = 2

[train]
steps = 5
batch_size = 128
lr = 0.002
lr_warmup_steps = 1
eval_fraction = 0.2
log_every = 5

[sae]
d_sae = 64
aux_k_coef = 0.0

[eval]
metrics = ["density"]
tokens = 1000

[[arm]]
name = "one"
variant = "topk"
k = 4
"""


def test_study_trains_each_seed_and_reevaluates_only_stale_runs(tmp_path, cache):
    from evals.provenance import weights_hash

    (tmp_path / "p.toml").write_text(SEEDS_PLAN)
    out = tmp_path / "s"
    cfg = StudyConfig(cache=str(cache), plan=str(tmp_path / "p.toml"), out=str(out), progress=False)
    state = run_study(cfg)
    runs = {r["name"]: out / "runs" / r["name"] for r in state["runs"]}
    assert list(runs) == ["seed42", "seed43"]
    assert [json.loads((r / "train.json").read_text())["train"]["seed"] for r in runs.values()] == [42, 43]
    assert weights_hash(runs["seed42"]) != weights_hash(runs["seed43"])
    assert "trained with each of the seeds 42, 43" in (out / "report.md").read_text()

    def mtimes():
        return {name: (r / "eval.json").stat().st_mtime_ns for name, r in runs.items()}

    before = mtimes()
    doc = json.loads((runs["seed42"] / "eval.json").read_text())
    doc["provenance"]["density"]["settings"]["tokens"] = 999  # as if `vsae eval --tokens 999` had been run on it
    (runs["seed42"] / "eval.json").write_text(json.dumps(doc))
    state = run_study(cfg)
    assert state["reevaluated"] == {"seed42": "density: computed with other settings (tokens)"}
    after = mtimes()
    assert after["seed42"] != before["seed42"] and after["seed43"] == before["seed43"]
    (runs["seed42"] / "sae_weights.safetensors").write_bytes((runs["seed43"] / "sae_weights.safetensors").read_bytes())
    state = run_study(cfg)
    assert state["reevaluated"]["seed42"] == "density: computed from other weights than the run's current ones"
    assert mtimes()["seed43"] == before["seed43"]
