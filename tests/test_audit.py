"""The metric audit (evals/audit.py lenses, pipeline/audit.py, `vsae audit`), the trainer's snapshots, the eval's
sample_seed, and the audit marks on the pages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli import main
from evals import audit as lens
from evals.driver import EvalConfig, evaluate

RNG = np.random.default_rng(0)


# --- the lenses on test doubles -------------------------------------------------------------------------------

def test_pure_noise_fails_discriminability():
    steps = [100, 200, 300, 400, 500, 600]
    noise = np.random.default_rng(1).normal(0.5, 0.05, size=(6, 3))  # no trend at all, three reseeds per step
    v = lens.discriminability_lens(steps, noise)
    assert v.verdict == lens.FAIL and v.statistic < lens.SNR_MIN


def test_a_trend_far_above_its_noise_passes_discriminability():
    steps = np.array([100, 200, 300, 400, 500, 600])
    rising = 0.5 + 0.05 * np.arange(6)[:, None] + np.random.default_rng(2).normal(0, 0.005, size=(6, 3))
    v = lens.discriminability_lens(steps, rising)
    assert v.verdict == lens.PASS and v.inputs["spearman_rho"] == pytest.approx(1.0)
    falling = lens.discriminability_lens(steps, -rising)  # a falling trend is a trend too
    assert falling.verdict == lens.PASS and falling.inputs["spearman_rho"] == pytest.approx(-1.0)
    assert lens.discriminability_lens(steps, np.full((6, 3), 0.7)).verdict == lens.FAIL  # a constant never moves
    assert lens.discriminability_lens(steps[:2], rising[:2]).verdict.startswith("n/a")


def test_reseed_lens_constant_passes_noisy_fails():
    spread = np.array([[0.2], [0.5], [0.8], [0.6]])  # four SAEs clearly apart
    constant = np.repeat(spread, 3, axis=1)  # every reseed gives the same number
    v = lens.reseed_lens(constant)
    assert v.verdict == lens.PASS and v.statistic == 0
    noisy = spread + np.random.default_rng(3).normal(0, 0.3, size=(4, 3))  # reseed sd about the spread between SAEs
    v = lens.reseed_lens(noisy)
    assert v.verdict == lens.FAIL and v.statistic > lens.RESEED_RATIO_MAX
    assert v.inputs["reseed_sd"] == pytest.approx(lens.pooled_sd(noisy))
    assert lens.reseed_lens(np.full((4, 3), 0.5)).verdict.startswith("n/a")  # nothing to tell apart
    assert lens.reseed_lens([[0.1, None], [0.2, 0.3]]).verdict.startswith("n/a")  # one complete row only


def test_validity_sign_is_checked_against_the_better_direction():
    f1 = np.linspace(0.05, 0.95, 10)
    mcc = f1 ** 2 + 0.01 * np.random.default_rng(4).normal(size=10)
    refs = {"f1": f1, "mcc": mcc}
    assert lens.validity_lens(f1, refs, "higher").verdict == lens.PASS
    negated = lens.validity_lens(-f1, refs, "higher")  # ranks SAEs backwards
    assert negated.verdict == lens.FAIL and negated.statistic == pytest.approx(-1.0, abs=0.05)
    assert lens.validity_lens(-f1, refs, "lower").verdict == lens.PASS  # the same numbers, lower is better
    wide = np.linspace(0.05, 0.95, 30)  # 30 SAEs: a chance rank correlation of noise stays far below 0.6
    noise = np.random.default_rng(5).normal(size=30)
    assert lens.validity_lens(noise, {"f1": wide, "mcc": wide}, "higher").verdict == lens.FAIL
    assert lens.validity_lens(f1, refs, None).verdict.startswith("n/a")
    assert lens.validity_lens(f1[:3], {"f1": f1[:3]}, "higher").verdict.startswith("n/a")


# --- a short real run with snapshots on a tiny synthetic cache -------------------------------------------------

STEPS, EVERY = 40, 10


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    cache = root / "cache"
    assert main(["synth", "--preset", "tiny", "--out", str(cache), "--tokens", "10000", "--seed", "3",
                 "--no-progress", "--device", "cpu"]) == 0
    run = root / "run"
    assert main(["train", "--cache", str(cache), "--out", str(run), "--d-sae", "256", "--k", "8", "--steps",
                 str(STEPS), "--batch-size", "256", "--snapshot-every", str(EVERY), "--checkpoint-every", "15",
                 "--lr-warmup-steps", "4", "--no-progress", "--device", "cpu"]) == 0
    return cache, run


def _snapshots(run):
    from pipeline.audit import snapshot_runs

    return snapshot_runs(run)


def test_snapshots_exist_at_the_steps_and_evaluate(trajectory, tmp_path):
    cache, run = trajectory
    snaps = _snapshots(run)
    assert [s for s, _ in snaps] == list(range(EVERY, STEPS + 1, EVERY))
    assert [p.name for _, p in snaps] == [f"step-{s:06d}" for s in range(EVERY, STEPS + 1, EVERY)]
    assert not (run.parent / f".{run.name}.snapshots").exists()  # nothing left aside after the checkpoint swaps
    first = snaps[0][1]
    assert main(["eval", str(first), "--cache", str(cache), "--metrics", "core", "--tokens", "300",
                 "--null-seeds", "0", "--no-progress", "--device", "cpu"]) == 0
    doc = json.loads((first / "eval.json").read_text())
    assert doc["provenance"]["core"]["step"] == EVERY and doc["split"]["kind"] == "held_out"


def test_snapshots_set_aside_by_a_killed_checkpoint_come_back(tmp_path):
    from vsae.trainer import _put_back_snapshots, _snapshots_aside

    run = tmp_path / "run"
    (run).mkdir()
    aside = _snapshots_aside(run)
    (aside / "step-000010").mkdir(parents=True)
    _put_back_snapshots(run)
    assert (run / "snapshots" / "step-000010").is_dir() and not aside.exists()


@pytest.fixture(scope="module")
def reseeded(trajectory):
    """[snapshot][reseed] eval metrics blocks: 2 reseeds, each a seeded subset of 300 of the 381 held-out rows."""
    cache, run = trajectory
    snaps = [p for _, p in _snapshots(run)]
    blocks: list[list[dict]] = [[] for _ in snaps]
    for r in range(2):
        docs = evaluate(snaps, EvalConfig(cache=str(cache), metrics=["core", "density"], tokens=300, null_seeds=0,
                                          seed=42 + r, sample_seed=r, progress=False, device="cpu"))
        for i, p in enumerate(snaps):
            blocks[i].append(docs[str(p)]["metrics"])
    return [s for s, _ in _snapshots(run)], blocks


def test_explained_variance_along_training_passes_discriminability(reseeded):
    steps, blocks = reseeded
    ev = [[b["core"]["explained_variance"] for b in per] for per in blocks]
    assert ev[0][0] != ev[0][1]  # the two reseeds scored other rows
    v = lens.discriminability_lens(steps, ev)
    assert v.verdict == lens.PASS, v.why
    assert v.inputs["spearman_rho"] > 0


def test_sample_seed_draws_a_seeded_subset(trajectory):
    from evals.context import held_sequences
    from evals.provenance import EvalSplit

    split = EvalSplit("held_out", 0.05, 0, 6, {})
    plain = held_sequences(split, 126, None)
    assert np.array_equal(plain, split.sequences(126))  # unset: exactly today's order
    a, b = held_sequences(split, 126, 1), held_sequences(split, 126, 2)
    assert sorted(a) == sorted(plain) and not np.array_equal(a, b)
    assert np.array_equal(a, held_sequences(split, 126, 1))


# --- the marks on the pages ---------------------------------------------------------------------------------

def _audit_doc(failing=("core", "explained_variance"), passing=("core", "mse")) -> dict:
    fail = lens.Verdict("reseed", lens.FAIL, 0.9, lens.RESEED_RATIO_MAX, "reseed sd 0.1 is 0.9 x the spread").to_json()
    ok = lens.Verdict("reseed", lens.PASS, 0.1, lens.RESEED_RATIO_MAX, "fine").to_json()
    return {"metrics": [{"group": failing[0], "key": failing[1], "label": "x", "lenses": {"reseed": fail}},
                        {"group": passing[0], "key": passing[1], "label": "y", "lenses": {"reseed": ok}}]}


def test_compare_page_marks_a_failing_metric_only(trajectory, reseeded, tmp_path):
    cache, run = trajectory
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(_audit_doc()))
    snaps = [str(p) for _, p in _snapshots(run)][:2]
    out = tmp_path / "compare.html"
    assert main(["compare", *snaps, "--cache", str(cache), "--out", str(out), "--audit", str(path), "--tokens",
                 "300", "--no-progress", "--device", "cpu"]) == 0
    page = out.read_text()
    assert 'class="mark warn audit"' in page and "fails reseed" in page
    row = next(line for line in page.split("<tr>") if line.startswith("<td") and ">core.explained_variance<" in line)
    assert row.count("fails reseed") == 2  # beside both runs' numbers
    mse = next(line for line in page.split("<tr>") if line.startswith("<td") and ">core.mse<" in line)
    assert "fails" not in mse
    summary = next(line for line in page.split("<tr>") if ">explained variance<" in line)
    assert "fails reseed" in summary


def test_cli_table_run_summary_and_study_columns_carry_the_mark(reseeded):
    from dashboards.run_info import metric_summary
    from evals.driver import table
    from pipeline.study import column_marks

    marks = lens.read_marks(_audit_doc())
    _, blocks = reseeded
    text = table({"runs/a": {"metrics": blocks[-1][0]}}, marks)
    assert "[fails reseed]" in text and "explained_variance: vsae audit: reseed" in text.replace("[fails reseed] ", "")
    summary = metric_summary(blocks[-1][0]["core"], "core", marks)
    assert summary["explained_variance audit"].startswith("fails reseed") and "mse audit" not in summary
    scr = lens.read_marks(_audit_doc(("scr", "scr_metric_threshold_20"), ("density", "dead_fraction")))
    assert set(column_marks(["scr_20", "scr_2", "alive", "explained_variance"], scr)) == {"scr_20"}


def test_study_report_marks_the_failing_column(tmp_path):
    from dataclasses import asdict

    from pipeline.study import TRAIN_SWITCHES, RunSpec, write_report
    from tests.test_study import _doc
    from vsae.config import SAEConfig, TrainConfig

    train = {k: v for k, v in asdict(TrainConfig(steps=10)).items() if k in TRAIN_SWITCHES}
    specs = [RunSpec(f"r{k}", "x", asdict(SAEConfig(k=k, d_sae=256)), train) for k in (4, 8)]
    docs = {"r4": _doc(0.5, True, [True, False]), "r8": _doc(0.75, True, [False, False])}
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(_audit_doc(("scr", "scr_metric_threshold_20"), ("density", "dead_fraction"))))
    write_report(tmp_path, {"name": "t"}, specs, docs, {}, audit=str(path))
    md = (tmp_path / "report.md").read_text()
    runs_table = md.split("## Runs")[1].split("##")[0]
    assert runs_table.count("0.1 [fails reseed]") == 2  # scr_20 in both runs' rows
    assert "scr_20: fails reseed: vsae audit: reseed" in md and "alive" not in md.split("Marked [fails")[1][:200]
    write_report(tmp_path, {"name": "t"}, specs, docs, {})
    assert "fails reseed" not in (tmp_path / "report.md").read_text()


def test_bad_audit_file_is_a_clear_error(tmp_path):
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(ValueError, match="not an audit.json"):
        lens.read_audit(tmp_path / "x.json")


# --- the whole command on a tiny setting ---------------------------------------------------------------------

@pytest.mark.slow
def test_audit_cli_end_to_end_on_a_tiny_synthetic_setting(trajectory, tmp_path):
    cache, _ = trajectory
    out = tmp_path / "audit"
    assert main(["audit", "--cache", str(cache), "--synth-cache", str(cache), "--out", str(out), "--metrics",
                 "core,density,ground_truth", "--reseeds", "2", "--steps", "30", "--ladder-steps", "30",
                 "--snapshots", "3", "--d-sae", "256", "--k", "8", "--batch-size", "256", "--tokens", "300",
                 "--ladder-d-sae", "256", "--ladder-k", "4", "16", "--no-progress", "--device", "cpu"]) == 0
    doc = json.loads((out / "audit.json").read_text())
    rows = {(m["group"], m["key"]): m["lenses"] for m in doc["metrics"]}
    assert rows[("core", "ce_score")]["validity"]["verdict"].startswith("n/a: needs a model")
    assert rows[("ground_truth", "f1")]["validity"]["verdict"].startswith("n/a")
    assert rows[("core", "explained_variance")]["discriminability"]["verdict"] == lens.PASS
    assert len(doc["ladder"]["runs"]) == 2 * 3 + 2  # two runs of three snapshots, the truth and a random SAE
    md = (out / "audit.md").read_text()
    assert "| explained variance | core | higher |" in md


def test_dashboard_summary_marks_a_failing_metric(trajectory, reseeded, tmp_path):
    cache, run = trajectory
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(_audit_doc()))
    snap = str(_snapshots(run)[-1][1])
    out = tmp_path / "dash"
    assert main(["dashboard", snap, "--cache", str(cache), "--out", str(out), "--audit", str(path), "--tokens",
                 "300", "--features", "4", "--no-progress", "--device", "cpu"]) == 0
    page = (out / "index.html").read_text()
    assert "fails reseed" in page and "explained_variance audit" in page and "mse audit" not in page
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert main(["dashboard", snap, "--cache", str(cache), "--out", str(tmp_path / "d2"), "--audit", str(bad),
                 "--no-progress", "--device", "cpu"]) == 2
    assert not (tmp_path / "d2").exists()
