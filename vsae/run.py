"""The run directory: what it holds, its file names, its one writer and its one reader.

    runs/NAME/
      cfg.json, sae_weights.safetensors, sparsity.safetensors   SAELens layout (vsae.checkpoint)
      train.json                  configs, cache identity, step, tokens seen, versions
      trainer_state.safetensors   training-space weights, Adam moments, dead counters, RNG
      log.jsonl                   one line per logging step
      eval.json, figures/         written by `vsae eval`

Each checkpoint is a complete new directory that replaces the old one by
rename, so a run killed at any moment leaves the previous checkpoint intact.
Every other module names these files through the constants here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from activations.atomic import fsync_dir
from vsae.checkpoint import CFG_FILENAME, CheckpointError, SAEWeights, write_sae
from vsae.checkpoint import SPARSITY_FILENAME as SPARSITY_FILENAME
from vsae.checkpoint import WEIGHTS_FILENAME as WEIGHTS_FILENAME
from vsae.config import TrainConfig

TRAIN_JSON = "train.json"
STATE_FILE = "trainer_state.safetensors"
LOG_FILE = "log.jsonl"
EVAL_JSON = "eval.json"
FIGURES_DIR = "figures"
DENSITY_FIGURE = "density.html"  # in FIGURES_DIR: the eval's log10 density histogram


class RunError(RuntimeError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


def is_run(path: Path) -> bool:
    return (path / TRAIN_JSON).is_file()


def recover(path: Path) -> None:
    """Finish a swap that a kill interrupted: the old checkpoint waits beside the run, renamed."""
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():
        os.replace(old, path)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)


def write_run(path: Path, *, weights: SAEWeights, metadata: dict, sparsity: torch.Tensor, info: dict,
              state: dict[str, torch.Tensor], log_lines: list[dict]) -> None:
    """Write a complete checkpoint into a temp dir beside `path`, then swap it in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_sae(tmp, weights, metadata, feature_sparsity=sparsity)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / STATE_FILE))
        (tmp / LOG_FILE).write_text("".join(json.dumps(line) + "\n" for line in log_lines))
        (tmp / TRAIN_JSON).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.chmod(0o755)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"cannot write the checkpoint {path}: {e}; the previous checkpoint is kept") from e


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} when the file is missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _read_log(path: Path) -> list[dict]:
    lines = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a blank line, or one cut by a crash
            if isinstance(entry, dict):
                lines.append(entry)
    return lines


@dataclass(frozen=True)
class RunDir:
    """What a run directory says about itself. Every file is optional: a missing or unreadable one reads as
    empty ({} for cfg.json, None for train.json and eval.json, [] for the log), so readers show what is there.

    `train` is None for an SAE trained elsewhere (SAELens), `eval` None before `vsae eval`. The weights are read
    by `vsae.checkpoint.read_sae`, the trainer's tensors by `read_trainer_state`.
    """

    path: Path
    cfg: dict = field(default_factory=dict)  # cfg.json
    train: dict | None = None  # train.json
    eval: dict | None = None  # eval.json
    log: list[dict] = field(default_factory=list)  # log.jsonl

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def hook_name(self) -> str | None:
        return (self.train or {}).get("hook_name") or self.cfg.get("metadata", {}).get("hook_name")

    @property
    def model_name(self) -> str | None:
        model = (self.train or {}).get("model")
        if isinstance(model, dict):
            return model.get("name")
        return self.cfg.get("metadata", {}).get("model_name")

    @property
    def metrics(self) -> dict:
        """eval.json's metric groups ({} before `vsae eval`)."""
        metrics = (self.eval or {}).get("metrics")
        return metrics if isinstance(metrics, dict) else {}

    @property
    def eval_fraction(self) -> float:
        """The held-out fraction the run was trained with (the trainer's default for SAEs trained elsewhere)."""
        try:
            return float(self.train["train"]["eval_fraction"])  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            return TrainConfig.eval_fraction

    def config(self) -> dict[str, Any]:
        """A flat view of the configuration: SAE shape, variant options, training settings."""
        train = self.train or {}
        out = {k: self.cfg.get(k) for k in ("architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input", "dtype")
               if k in self.cfg}
        out["hook_name"], out["model"] = self.hook_name, self.model_name
        for section in ("sae", "train"):
            for k, v in (train.get(section) or {}).items():
                if k not in ("out", "cache", "progress", "device"):
                    out[f"{section}.{k}"] = v
        for k in ("tokens_seen", "step", "norm_scale", "cache_hash"):
            if k in train:
                out[k] = train[k]
        return out

    def figure_file(self, relative: str | None) -> Path | None:
        """A file that eval.json names relative to the run directory, if it exists."""
        if not relative:
            return None
        path = self.path / relative
        return path if path.is_file() else None


def read_run(path: str | Path) -> RunDir:
    """The run directory at `path` (see `RunDir`); never raises for missing or unreadable files."""
    path = Path(path)
    return RunDir(path=path, cfg=read_json(path / CFG_FILENAME), train=read_json(path / TRAIN_JSON) or None,
                  eval=read_json(path / EVAL_JSON) or None, log=_read_log(path / LOG_FILE))


def read_trainer_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The trainer's tensors (weights in training space, Adam moments, dead counters, RNG) for resuming."""
    state_path = Path(path) / STATE_FILE
    try:
        return load_file(str(state_path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{state_path}: cannot read the training state ({e}); the run cannot be resumed") from e
