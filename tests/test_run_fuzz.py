"""Fuzz a run directory's files one change at a time (the run-file half of the manifest fuzz test).

For each change to cfg.json, train.json, log.jsonl, eval.json or a weights file, `vsae train --resume` (two more
steps) and `vsae eval` must succeed or fail with exactly one `vsae ...` line on stderr: never a traceback, a hang,
or a change to any file outside the run and the cache (a victim directory beside them is watched, and the changes
point paths at it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from activations.cache import write_array_cache
from cli import main
from tests.synthetic import planted_features
from tests.test_cache_fuzz import check_outcome, run_cli, snapshot

CONTEXT = 17
TRAIN = ["--batch-size", "64", "--d-sae", "16", "--k", "2", "--no-progress", "--eval-fraction", "0.2"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    """(a valid cache, an evaluated run of 2 steps trained on it); the cases work on copies."""
    root = tmp_path_factory.mktemp("runfuzz")
    rows, _ = planted_features(16 * 40, d_in=8, n_features=32)
    write_array_cache(root / "cache", rows, CONTEXT, {"kind": "synthetic", "name": "planted"})
    assert main(["train", "--cache", str(root / "cache"), "--out", str(root / "run"), "--steps", "2", *TRAIN]) == 0
    assert main(["eval", str(root / "run"), "--cache", str(root / "cache"), "--metrics", "core,density",
                 "--no-progress"]) == 0
    return root / "cache", root / "run"


Change = Callable[[Path, Path], None]  # (run, victim directory)


def json_edit(name: str, edit: Callable[[dict, Path], object]) -> Change:
    def change(run: Path, victim: Path) -> None:
        doc = json.loads((run / name).read_text())
        edit(doc, victim)
        (run / name).write_text(json.dumps(doc))
    return change


def write(name: str, content: str | bytes) -> Change:
    def change(run: Path, victim: Path) -> None:
        (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return change


def truncate(name: str) -> Change:
    def change(run: Path, victim: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])
    return change


def remove(name: str) -> Change:
    return lambda run, victim: (run / name).unlink()


def set_key(*keys: str, value: object) -> Callable[[dict, Path], None]:
    def edit(doc: dict, victim: Path) -> None:
        for k in keys[:-1]:
            doc = doc[k]
        doc[keys[-1]] = value(victim) if callable(value) else value
    return edit


def del_key(*keys: str) -> Callable[[dict, Path], None]:
    def edit(doc: dict, victim: Path) -> None:
        for k in keys[:-1]:
            doc = doc[k]
        del doc[keys[-1]]
    return edit


CHANGES: dict[str, Change] = {
    "cfg.json: k deleted": json_edit("cfg.json", del_key("k")),
    "cfg.json: k a string": json_edit("cfg.json", set_key("k", value="abc")),
    "cfg.json: k negative": json_edit("cfg.json", set_key("k", value=-3)),
    "cfg.json: k huge": json_edit("cfg.json", set_key("k", value=10**12)),
    "cfg.json: d_sae wrong": json_edit("cfg.json", set_key("d_sae", value=17)),
    "cfg.json: a list": write("cfg.json", "[1, 2]"),
    "cfg.json: not JSON": write("cfg.json", "{"),
    "train.json: step negative": json_edit("train.json", set_key("step", value=-5)),
    "train.json: step a string": json_edit("train.json", set_key("step", value="two")),
    "train.json: step huge": json_edit("train.json", set_key("step", value=10**15)),
    "train.json: sae deleted": json_edit("train.json", del_key("sae")),
    "train.json: d_in wrong": json_edit("train.json", set_key("d_in", value=9)),
    "train.json: eval_fraction 2": json_edit("train.json", set_key("train", "eval_fraction", value=2.0)),
    "train.json: eval_fraction a string": json_edit("train.json", set_key("train", "eval_fraction", value="x")),
    "train.json: cache outside": json_edit("train.json", set_key("cache", value=lambda v: str(v))),
    "train.json: a list": write("train.json", "[]"),
    "train.json: not JSON": write("train.json", "{"),
    "train.json: removed": remove("train.json"),
    "log.jsonl: last line cut": lambda run, victim: (run / "log.jsonl").write_text(
        (run / "log.jsonl").read_text() + '{"step": 3, "lo'),
    "log.jsonl: a number per line": write("log.jsonl", "1\n2\n"),
    "eval.json: figure outside": json_edit("eval.json", set_key(
        "metrics", "density", "figure", value=lambda v: str(v / "notes.txt"))),
    "eval.json: metrics a list": json_edit("eval.json", set_key("metrics", value=[1])),
    "eval.json: not JSON": write("eval.json", "{"),
    "sae_weights truncated": truncate("sae_weights.safetensors"),
    "sae_weights removed": remove("sae_weights.safetensors"),
    "trainer_state truncated": truncate("trainer_state.safetensors"),
    "trainer_state not safetensors": write("trainer_state.safetensors", b"\x80\x04 pickle?"),
    "sparsity truncated": truncate("sparsity.safetensors"),
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_changed_run_gives_success_or_one_line(name, pristine, tmp_path, capsys, monkeypatch):
    cache_src, run_src = pristine
    monkeypatch.setenv("VSAE_CACHE_DIR", str(tmp_path / "vsae-home"))
    cache, run, victim = tmp_path / "cache", tmp_path / "run", tmp_path / "victim"
    shutil.copytree(cache_src, cache)
    shutil.copytree(run_src, run)
    victim.mkdir()
    (victim / "notes.txt").write_text("precious")
    CHANGES[name](run, victim)
    skip = {cache, run, tmp_path / ".cache.lock", tmp_path / ".run.lock", tmp_path / "vsae-home"}
    before = snapshot(tmp_path, skip=skip)
    capsys.readouterr()
    for command, argv in (
            ("train", ["train", "--cache", str(cache), "--out", str(run), "--steps", "4", "--resume", *TRAIN]),
            ("eval", ["eval", str(run), "--cache", str(cache), "--metrics", "core,density", "--no-progress"])):
        code, err = run_cli(argv, capsys)
        check_outcome(command, code, err)
    assert snapshot(tmp_path, skip=skip) == before, "a file outside the run and the cache changed"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")]
    assert not leftovers, leftovers
