"""vsae.outputs and its users: vsae replaces only what it wrote (markers), whole (a kill leaves the old or the new
output), one writer at a time, and says so in one line; compare.html shows only figures it draws itself."""

import json
import re
from pathlib import Path

import pytest
import torch

from activations.guard import DirLock, LockedError, UnsafePathError
from dashboards.build import DashboardConfig, DashboardError, build_dashboard
from dashboards.compare import CompareConfig, compare_runs
from tests.synthetic import planted_features, synthetic_cache
from tests.test_dashboards import random_sae, save_run
from tests.test_trainer import tcfg
from vsae.checkpoint import CheckpointError, read_sae
from vsae.config import SAEConfig
from vsae.outputs import check_out, claim, hold, is_temp_of, recover, replace_dir
from vsae.run import RunError, read_run, write_run
from vsae.trainer import train


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included) with its bytes: what "byte for byte intact" compares."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def documents(root: Path) -> Path:
    """A folder of someone's documents, with the names a dashboard or a run would write."""
    (root / "data" / "latents").mkdir(parents=True)
    (root / "index.html").write_text("<p>my homepage</p>")
    (root / "data" / "latents" / "0.js").write_text("my script")
    (root / "thesis.txt").write_text("five years of work")
    return root


def ours(path: Path) -> bool:
    return (path / "mark").is_file()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    rows, _ = planted_features(4_000, d_in=32, n_features=64, seed=3)
    return synthetic_cache(tmp_path_factory.mktemp("outputs") / "cache", rows * 3.0)


def fail_if_called(*a, **kw):
    raise AssertionError("work started before the output was checked")


# ---- vsae.outputs ---------------------------------------------------------------------------------------------


def test_recover_finishes_an_interrupted_swap_and_removes_only_vsae_temps(tmp_path):
    target = tmp_path / "out"
    old = tmp_path / ".out.old"
    old.mkdir()
    (old / "mark").write_text("old version")
    recover(target)  # killed between "old aside" and "new in": the old one comes back
    assert (target / "mark").read_text() == "old version" and not old.exists()
    old.mkdir()
    recover(target)  # killed after "new in": the old one goes
    assert not old.exists() and target.is_dir()
    temps = [".out.tmp-abc_1234", ".out.1234.0123456789ab.tmp"]  # a temp dir of replace_dir, a file of write_atomic
    foreign = [".out.tmp-mine", "out.tmp-abc_1234", ".other.tmp-abc_1234", ".out.backup", ".out.tmp-ABCDEFGH"]
    for name in temps + foreign:
        (tmp_path / name).mkdir()
    assert [n for n in temps + foreign if is_temp_of(tmp_path / n, target)] == temps
    recover(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *foreign])


def test_replace_dir_keeps_the_old_output_whole_when_interrupted(tmp_path):
    target = tmp_path / "out"
    replace_dir(target, lambda d: (d / "mark").write_text("1"), ours, "thing", RunError)
    assert (target / "mark").read_text() == "1"

    def half_then_killed(d: Path) -> None:
        (d / "mark").write_text("2")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_dir(target, half_then_killed, ours, "thing", RunError)
    assert snapshot(target) == {"mark": b"1"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    def disk_full(d: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(RunError, match="cannot write the thing .*No space left.*the previous thing is kept"):
        replace_dir(target, disk_full, ours, "thing", RunError)
    assert snapshot(target) == {"mark": b"1"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    replace_dir(target, lambda d: (d / "mark").write_text("3"), ours, "thing", RunError)
    assert snapshot(target) == {"mark": b"3"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_dir_checks_again_at_swap_time(tmp_path):
    """Something not ours that appeared at the target while the output was built is left alone."""
    target = tmp_path / "out"

    def build(d: Path) -> None:
        (d / "mark").write_text("new")
        documents(target)

    with pytest.raises(RunError, match="no longer a vsae thing; it was left as it is"):
        replace_dir(target, build, ours, "thing", RunError)
    assert snapshot(target) == snapshot(documents(tmp_path / "copy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "out"]


def test_check_out_refuses_what_vsae_did_not_write(tmp_path):
    check_out(tmp_path / "absent", ours, "thing", "mark", RunError)
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", ours, "thing", "mark", RunError)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "mark").write_text("")
    check_out(tmp_path / "mine", ours, "thing", "mark", RunError)
    documents(tmp_path / "docs")
    with pytest.raises(RunError, match=r"^--out \S+docs is an existing directory that is not a vsae thing \(no mark\)"):
        check_out(tmp_path / "docs", ours, "thing", "mark", RunError)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is an existing file that is not a vsae thing"):
        check_out(tmp_path / "file", ours, "thing", "mark", RunError)
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    with pytest.raises(RunError, match="is a symbolic link"):
        check_out(tmp_path / "link", ours, "thing", "mark", RunError)


def test_hold_is_one_writer_and_finds_an_unwritable_out(tmp_path):
    with hold(tmp_path / "out", "thing", RunError):
        with pytest.raises(LockedError, match=r"in use by another vsae process \(PID \d+\)"):
            with hold(tmp_path / "out", "thing", RunError):
                pass
    with hold(tmp_path / "out", "thing", RunError):  # released
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match=r"^cannot write the thing --out \S+file/out: .*; choose a writable --out"):
        with hold(tmp_path / "file" / "out", "thing", RunError):
            pass
    documents(tmp_path / "docs")
    with pytest.raises(RunError, match="not a vsae thing"):
        with claim(tmp_path / "docs", ours, "thing", "mark", RunError):
            pass
    assert not (tmp_path / ".docs.lock").exists()  # refused before a lock file is left beside it


# ---- train ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True])
def test_train_refuses_an_out_that_is_not_a_run(tmp_path, cache, monkeypatch, resume):
    """Today's bug: with --resume, the first checkpoint renamed --out aside and deleted it."""
    import vsae.trainer

    docs = documents(tmp_path / "docs")
    before, cache_before = snapshot(docs), snapshot(cache)
    monkeypatch.setattr(vsae.trainer, "update_step", fail_if_called)
    with pytest.raises(RunError, match="is an existing directory that is not a vsae run"):
        train(tcfg(cache, docs, steps=4), [SAEConfig(d_sae=16, k=2)], resume=resume)
    with pytest.raises(RunError, match="is an existing directory that is not a vsae run"):
        train(tcfg(cache, cache, steps=4), [SAEConfig(d_sae=16, k=2)], resume=resume)  # --out the cache itself
    saelens = tmp_path / "saelens"  # an SAE trained elsewhere: read, never replaced
    save_run(saelens, random_sae(32, 16, 2), "h")
    sl_before = snapshot(saelens)
    with pytest.raises(RunError, match="not a vsae run"):
        train(tcfg(cache, saelens, steps=4), [SAEConfig(d_sae=16, k=2)], resume=resume)
    (tmp_path / "file").write_text("notes")
    with pytest.raises(RunError, match="is an existing file"):
        train(tcfg(cache, tmp_path / "file", steps=4), [SAEConfig(d_sae=16, k=2)], resume=resume)
    assert snapshot(docs) == before and snapshot(cache) == cache_before and snapshot(saelens) == sl_before
    assert (tmp_path / "file").read_text() == "notes"


def test_cli_train_resume_into_documents_is_one_line(tmp_path, cache, capsys):
    from cli import main

    docs = documents(tmp_path / "docs")
    before = snapshot(docs)
    argv = ["train", "--cache", str(cache), "--out", str(docs), "--resume", "--steps", "4", "--batch-size", "64",
            "--d-sae", "16", "--k", "2", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"vsae train: error: --out \S+docs is an existing directory that is not a vsae run .*\n", err)
    assert snapshot(docs) == before


def test_write_run_replaces_only_a_run(tmp_path, cache):
    """write_run's own check, at swap time, whatever its caller checked before."""
    [run] = train(tcfg(cache, tmp_path / "r", steps=4, checkpoint_every=2), [SAEConfig(d_sae=16, k=2)])
    docs = documents(tmp_path / "docs")
    before = snapshot(docs)
    weights, cfg = read_sae(run)
    with pytest.raises(RunError, match="no longer a vsae checkpoint"):
        write_run(docs, weights=weights, metadata=cfg["metadata"], sparsity=torch.zeros(16),
                  info=read_run(run).train, state={"x": torch.zeros(1)}, log_lines=[])
    assert snapshot(docs) == before and sorted(p.name for p in tmp_path.iterdir() if "docs" in p.name) == ["docs"]


def test_sweep_names_stay_inside_out(tmp_path, cache, capsys):
    from cli import main

    docs = documents(tmp_path / "docs")
    before = snapshot(docs)
    out = tmp_path / "deep" / "er" / "sweep"
    with pytest.raises(UnsafePathError, match="run name '../../docs' is not a plain name"):
        train(tcfg(cache, out, steps=4), [SAEConfig(d_sae=16, k=2), SAEConfig(d_sae=16, k=4)],
              names=["../../docs", "b"])
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[[sae]]\nname = "../../../docs"\nk = 2\n\n[[sae]]\nname = "b"\nk = 4\n')
    argv = ["train", "--cache", str(cache), "--out", str(out), "--sweep", str(sweep), "--resume", "--steps", "4",
            "--batch-size", "64", "--d-sae", "16", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"vsae train: error: run name '../../../docs' is not a plain name .*\n", err)
    assert snapshot(docs) == before and not (tmp_path / "deep").exists()


def test_train_holds_its_runs_and_finds_an_unwritable_out_first(tmp_path, cache, monkeypatch):
    import vsae.trainer

    monkeypatch.setattr(vsae.trainer, "update_step", fail_if_called)
    with DirLock(tmp_path / "r", "run"):
        with pytest.raises(LockedError, match=r"the run \S+/r is in use by another vsae process \(PID \d+\)"):
            train(tcfg(cache, tmp_path / "r", steps=4), [SAEConfig(d_sae=16, k=2)])
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match=r"cannot write the run --out \S+file/r: "):
        train(tcfg(cache, tmp_path / "file" / "r", steps=4), [SAEConfig(d_sae=16, k=2)])
    monkeypatch.undo()
    held = []
    real = vsae.trainer.update_step

    def check_lock(s, *a):  # during training, a second writer is refused
        if not held:
            with pytest.raises(LockedError):
                DirLock(tmp_path / "r", "run").__enter__()
            held.append(True)
        real(s, *a)

    monkeypatch.setattr(vsae.trainer, "update_step", check_lock)
    train(tcfg(cache, tmp_path / "r", steps=2), [SAEConfig(d_sae=16, k=2)])
    assert held
    with DirLock(tmp_path / "r", "run"):  # and released at the end
        pass


def interrupted_run(cache: Path, out: Path, monkeypatch, at: int = 3) -> Path:
    """A run of 6 steps stopped by Ctrl-C at step `at` (saved there)."""
    import vsae.trainer

    real = vsae.trainer.update_step

    def stop(s, x, step, *a):
        if step == at:
            raise KeyboardInterrupt
        real(s, x, step, *a)

    monkeypatch.setattr(vsae.trainer, "update_step", stop)
    with pytest.raises(KeyboardInterrupt):
        train(tcfg(cache, out, steps=6), [SAEConfig(d_sae=16, k=2)])
    monkeypatch.setattr(vsae.trainer, "update_step", real)
    assert json.loads((out / "train.json").read_text())["step"] == at
    return out


def test_resume_cleans_a_killed_runs_leftovers(tmp_path, cache, monkeypatch):
    run = interrupted_run(cache, tmp_path / "r", monkeypatch)
    (tmp_path / ".r.tmp-k1lled00").mkdir()  # a checkpoint half written when the trainer was killed
    (tmp_path / ".r.tmp-k1lled00" / "cfg.json").write_text("{")
    (tmp_path / ".r.tmp-notours").mkdir()
    run.rename(tmp_path / ".r.old")  # killed between the two renames of a swap
    train(tcfg(cache, run, steps=6), [SAEConfig(d_sae=16, k=2)], resume=True)
    assert json.loads((run / "train.json").read_text())["step"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.tmp-notours", "r"]  # and no lock file left


def test_resume_names_a_broken_train_json_or_log(tmp_path, cache, monkeypatch):
    run = interrupted_run(cache, tmp_path / "r", monkeypatch)
    cfg = [SAEConfig(d_sae=16, k=2)]
    good_train, good_log = (run / "train.json").read_text(), (run / "log.jsonl").read_text()
    assert good_log == ""  # nothing logged before step 5: the cut line is line 1
    (run / "train.json").write_text(good_train[:40])
    with pytest.raises(CheckpointError, match=r"r/train.json: unreadable .*restore it from a copy, or train into"):
        train(tcfg(cache, run, steps=6), cfg, resume=True)
    (run / "train.json").write_text(json.dumps({k: v for k, v in json.loads(good_train).items() if k != "sae"}))
    with pytest.raises(CheckpointError, match=r"train.json and trainer_state.safetensors do not describe this run "
                                              r"\(KeyError: 'sae'\)"):
        train(tcfg(cache, run, steps=6), cfg, resume=True)
    (run / "train.json").write_text(good_train)
    (run / "log.jsonl").write_text('{"step": 5, "lo')
    with pytest.raises(CheckpointError, match=r"r/log.jsonl: line 1 is not a JSON object \(cut or edited\); delete"):
        train(tcfg(cache, run, steps=6), cfg, resume=True)
    (run / "log.jsonl").write_text(good_log)
    train(tcfg(cache, run, steps=6), cfg, resume=True)
    assert json.loads((run / "train.json").read_text())["step"] == 6


# ---- dashboard ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, cache):
    from activations.cache import read_manifest

    settings = read_manifest(cache)["settings"]
    return save_run(tmp_path_factory.mktemp("run") / "run", random_sae(32, 12, 2), settings["hook_name"],
                    model=settings["model"]["name"])


def dcfg(cache: Path, out: Path) -> DashboardConfig:
    return DashboardConfig(cache=str(cache), out=str(out), contexts=2, progress=False)


def test_dashboard_refuses_a_directory_it_did_not_write(tmp_path, cache, small_run, monkeypatch):
    import dashboards.build

    docs = documents(tmp_path / "docs")
    before = snapshot(docs)
    monkeypatch.setattr(dashboards.build, "_scan", fail_if_called)
    with pytest.raises(DashboardError, match="is an existing directory that is not a vsae dashboard "
                                             r"\(no dashboard.json\)"):
        build_dashboard(small_run, dcfg(cache, docs))
    (tmp_path / "file").write_text("x")
    with pytest.raises(DashboardError, match=r"cannot write the dashboard --out \S+file/d: "):
        build_dashboard(small_run, dcfg(cache, tmp_path / "file" / "d"))
    with DirLock(tmp_path / "d", "dashboard"):
        with pytest.raises(LockedError, match="the dashboard .* is in use"):
            build_dashboard(small_run, dcfg(cache, tmp_path / "d"))
    assert snapshot(docs) == before and sorted(p.name for p in tmp_path.iterdir()) == ["docs", "file"]


def test_a_killed_dashboard_rebuild_leaves_the_old_one_whole(tmp_path, cache, small_run, monkeypatch):
    import dashboards.build

    out = tmp_path / "dash"
    build_dashboard(small_run, dcfg(cache, out))
    old = snapshot(out)
    assert "dashboard.json" in old and sum(k.startswith("data/latents/") for k in old) == 12
    real = dashboards.build.write_index

    def killed(*a, **kw):  # every latent page of the new dashboard is written by now
        raise KeyboardInterrupt

    monkeypatch.setattr(dashboards.build, "write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        build_dashboard(small_run, DashboardConfig(cache=str(cache), out=str(out), features="3", progress=False))
    assert snapshot(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dash"]
    monkeypatch.setattr(dashboards.build, "write_index", real)
    (tmp_path / ".dash.tmp-sigk1ll0").mkdir()  # what a SIGKILL at that moment leaves
    (tmp_path / ".dash.tmp-sigk1ll0" / "index.html").write_text("partial")
    out.rename(tmp_path / ".dash.old")  # ... or a kill between the two renames of the swap
    build_dashboard(small_run, DashboardConfig(cache=str(cache), out=str(out), features="3", progress=False))
    new = snapshot(out)
    assert sorted(k for k in new if k.startswith("data/latents/")) == [f"data/latents/{i}.js" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dash"]


# ---- compare --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_run):
    second = save_run(tmp_path_factory.mktemp("run2") / "run2", random_sae(32, 12, 2, seed=1),
                      read_run(small_run).hook_name, model=read_run(small_run).model_name)
    return [small_run, second]


def ccfg(cache: Path, out: Path) -> CompareConfig:
    return CompareConfig(cache=str(cache), out=str(out), tokens=200, progress=False)


def test_compare_refuses_what_is_not_its_page(tmp_path, cache, two_runs, monkeypatch):
    import dashboards.compare

    (tmp_path / "manifest.json").write_text('{"my": "cache"}')
    monkeypatch.setattr(dashboards.compare, "_read_runs", fail_if_called)
    with pytest.raises(DashboardError, match="is an existing file that is not a vsae compare page"):
        compare_runs(two_runs, ccfg(cache, tmp_path / "manifest.json"))
    with pytest.raises(DashboardError, match=r"is a directory; give the page's file name, e\.g\. \S+/compare\.html"):
        compare_runs(two_runs, ccfg(cache, tmp_path))
    with pytest.raises(DashboardError, match="cannot write the compare page --out"):
        compare_runs(two_runs, ccfg(cache, tmp_path / "manifest.json" / "c.html"))
    with DirLock(tmp_path / "c.html", "compare page"), pytest.raises(LockedError):
        compare_runs(two_runs, ccfg(cache, tmp_path / "c.html"))
    assert (tmp_path / "manifest.json").read_text() == '{"my": "cache"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    monkeypatch.undo()
    compare_runs(two_runs, ccfg(cache, tmp_path / "c.html"))
    assert '<meta name="generator" content="vsae compare">' in (tmp_path / "c.html").read_text()
    compare_runs(two_runs, ccfg(cache, tmp_path / "c.html"))  # its own page is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.html", "manifest.json"]


def test_compare_embeds_no_html_an_eval_json_names(tmp_path, cache, two_runs):
    """A crafted eval.json names a hostile HTML file, inside the run and outside it; the page draws the joint map
    from its coordinates only, and never from a file outside the run."""
    runs = []
    for i, src in enumerate(two_runs):
        run = tmp_path / f"run{i}"
        run.mkdir()
        for f in src.iterdir():
            (run / f.name).write_bytes(f.read_bytes())
        runs.append(run)
    evil = "<script>alert('pwned')</script>"
    (tmp_path / "evil.html").write_text(evil)
    (tmp_path / "outside.json").write_text(json.dumps({"coords": [[0, 0]], "latent_ids": [0], "runs": ["OUTSIDE"]}))
    (runs[0] / "figures").mkdir()
    (runs[0] / "figures" / "evil.html").write_text(evil)
    joint = {"coords": [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], "latent_ids": [1, 2, 1], "runs": ["run0", "run0", "run1"]}
    (runs[0] / "figures" / "joint.json").write_text(json.dumps(joint))
    names = [str(r) for r in runs]
    (runs[0] / "figures" / "bad.json").write_text(json.dumps({**joint, "coords": [[0, "x"], [1], 2]}))
    for figure, coordinates, drawn in (("../evil.html", "../outside.json", False),
                                       (str(tmp_path / "evil.html"), str(tmp_path / "outside.json"), False),
                                       ("figures/evil.html", "figures/bad.json", False),
                                       ("figures/evil.html", "figures/joint.json", True)):
        entry = {"runs": names, "figure": figure, "coordinates": coordinates}
        (runs[0] / "eval.json").write_text(json.dumps({"metrics": {"tsne": {"joint": entry}}}))
        out = tmp_path / "c.html"
        compare_runs(runs, ccfg(cache, out))
        text = out.read_text()
        assert "pwned" not in text and "<iframe" not in text and "evil.html" not in text and "OUTSIDE" not in text
        figures = json.loads(re.search(r"VSAE\.figures\((.*)\);</script>", text).group(1))
        joint_figs = [f for f in figures if "decoder rows of" in json.dumps(f[1]["layout"].get("title"))]
        assert bool(joint_figs) == drawn, figure
        if drawn:
            traces = joint_figs[0][1]["data"]
            assert [t["name"] for t in traces] == ["run0", "run1"]
            assert [t["customdata"] for t in traces] == [[1, 2], [1]]
            assert "Joint decoder t-SNE" in text


def test_run_figure_files_stay_inside_the_run(tmp_path):
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    (run / "figures" / "a.html").write_text("x")
    (tmp_path / "outside.html").write_text("x")
    (run / "figures" / "link.html").symlink_to(tmp_path / "outside.html")
    info = read_run(run)
    assert info.figure_file("figures/a.html") == run / "figures" / "a.html"
    for bad in ("../outside.html", str(tmp_path / "outside.html"), "figures/../../outside.html", "figures/link.html",
                ["figures", "a.html"], 3):
        assert info.figure_file(bad) is None, bad


# ---- study ----------------------------------------------------------------------------------------------------


def test_a_study_arm_cannot_name_a_run_outside_the_study(tmp_path, cache):
    from pipeline.study import StudyConfig, run_study

    plan = tmp_path / "plan.toml"
    plan.write_text('name = "x"\n[train]\nsteps = 2\nbatch_size = 64\n[sae]\nd_sae = 16\n'
                    '[[arm]]\nname = "../../docs"\nk = 2\n[[arm]]\nname = "b"\nk = 4\n')
    out = tmp_path / "a" / "b" / "study"
    with pytest.raises(UnsafePathError, match=r"run name \(from arm '../../docs'\) '../../docs-?\S*' is not a plain"):
        run_study(StudyConfig(cache=str(cache), plan=str(plan), out=str(out), progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.toml"]  # nothing made, here or above


def test_one_study_writer_at_a_time(tmp_path, cache):
    from pipeline.study import StudyConfig, run_study

    plan = tmp_path / "plan.toml"
    plan.write_text('name = "x"\n[train]\nsteps = 2\nbatch_size = 64\n[sae]\nd_sae = 16\n[[arm]]\nname = "a"\nk = 2\n')
    with DirLock(tmp_path / "s", "study"), pytest.raises(LockedError, match="the study .* is in use"):
        run_study(StudyConfig(cache=str(cache), plan=str(plan), out=str(tmp_path / "s"), progress=False))
    assert not (tmp_path / "s").exists()
