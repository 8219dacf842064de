"""vsae.run: the one reader of a run directory, and its file names as the one place other modules take them from."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vsae.checkpoint import CheckpointError
from vsae.run import (
    EVAL_JSON,
    FIGURES_DIR,
    LOG_FILE,
    STATE_FILE,
    TRAIN_JSON,
    RunDir,
    read_run,
    read_trainer_state,
)

ROOT = Path(__file__).resolve().parent.parent


def test_every_file_is_optional(tmp_path):
    run = read_run(tmp_path)
    assert run == RunDir(path=tmp_path)
    assert (run.cfg, run.train, run.eval, run.log) == ({}, None, None, [])
    assert run.metrics == {} and run.hook_name is None and run.model_name is None
    assert run.eval_fraction == 0.05  # the trainer's default split, for SAEs trained elsewhere


def test_a_trained_and_evaluated_run(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 8, "d_sae": 32, "k": 4, "architecture": "topk",
                                                   "metadata": {"hook_name": "from-cfg", "model_name": "m-cfg"}}))
    train = {"hook_name": "blocks.3.hook_resid_post", "model": {"name": "tiny"}, "step": 7, "tokens_seen": 70,
             "sae": {"variant": "vsae", "k": 4}, "train": {"eval_fraction": 0.2, "out": "x", "lr": 1e-3}}
    (tmp_path / TRAIN_JSON).write_text(json.dumps(train))
    (tmp_path / EVAL_JSON).write_text(json.dumps({"metrics": {"core": {"l0": 3.5}}}))
    (tmp_path / LOG_FILE).write_text('{"step": 5}\n\n{"step": 10}\n{"step": 1')  # the last line cut by a crash
    (tmp_path / FIGURES_DIR).mkdir()
    (tmp_path / FIGURES_DIR / "density.html").write_text("<html>")
    run = read_run(str(tmp_path))
    assert run.name == tmp_path.name and run.train == train and run.log == [{"step": 5}, {"step": 10}]
    assert run.hook_name == "blocks.3.hook_resid_post" and run.model_name == "tiny"  # train.json first
    assert run.metrics == {"core": {"l0": 3.5}} and run.eval_fraction == 0.2
    config = run.config()
    assert config["sae.variant"] == "vsae" and config["train.lr"] == 1e-3 and "train.out" not in config
    assert config["d_sae"] == 32 and config["step"] == 7
    assert run.figure_file(f"{FIGURES_DIR}/density.html") == tmp_path / FIGURES_DIR / "density.html"
    assert run.figure_file(f"{FIGURES_DIR}/missing.html") is None and run.figure_file(None) is None
    # an SAE trained elsewhere names its model and hook in cfg.json's metadata
    (tmp_path / TRAIN_JSON).unlink()
    assert (read_run(tmp_path).hook_name, read_run(tmp_path).model_name) == ("from-cfg", "m-cfg")


def test_unreadable_files_read_as_empty(tmp_path):
    (tmp_path / TRAIN_JSON).write_text("{not json")
    (tmp_path / EVAL_JSON).write_text("[1, 2]")  # JSON, but not an object
    run = read_run(tmp_path)
    assert run.train is None and run.eval is None


def test_trainer_state(tmp_path):
    save_file({"fire_count": torch.zeros(3, dtype=torch.float64)}, str(tmp_path / STATE_FILE))
    assert read_trainer_state(tmp_path)["fire_count"].dtype == torch.float64
    (tmp_path / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        read_trainer_state(tmp_path)
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        read_trainer_state(tmp_path / "nowhere")


@pytest.mark.parametrize("package", ["vsae", "evals", "dashboards"])
def test_run_file_names_come_from_vsae_run(package):
    """No module but vsae/run.py (and vsae/checkpoint.py, for SAELens's names) spells a run-directory file name."""
    names = ["train.json", "eval.json", "log.jsonl", "trainer_state.safetensors", "cfg.json",
             "sae_weights.safetensors", "sparsity.safetensors"]
    files = "|".join(map(re.escape, names))
    # a file name as a string, a path "figures/...", or the figures folder joined onto a path
    literal = re.compile(rf"""(["'])(?:{files})\1|["']figures/|/\s*["']figures["']""")
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.relative_to(ROOT).as_posix() in ("vsae/run.py", "vsae/checkpoint.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if literal.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
