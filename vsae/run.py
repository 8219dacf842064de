"""The run directory: what it holds, its file names, its one writer and its one reader.

    runs/NAME/
      cfg.json, sae_weights.safetensors, sparsity.safetensors   SAELens layout (vsae.checkpoint)
      train.json                  configs, cache identity, step, tokens seen, versions
      trainer_state.safetensors   training-space weights, Adam moments, dead counters, RNG
      log.jsonl                   one line per logging step
      eval.json, figures/         written by `vsae eval`

Each checkpoint is a complete new directory that replaces the old one by
rename, so a run killed at any moment leaves the previous checkpoint intact.
cfg.json + train.json are the run's marker: vsae replaces only a directory
that has both (`vsae.outputs`), and one trainer at a time holds it
(`claim_run`). Every other module names these files through the constants here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from activations.guard import UnsafePathError, inside
from vsae.checkpoint import CFG_FILENAME, CheckpointError, SAEWeights, write_sae
from vsae.checkpoint import SPARSITY_FILENAME as SPARSITY_FILENAME
from vsae.checkpoint import WEIGHTS_FILENAME as WEIGHTS_FILENAME
from vsae.config import TrainConfig
from vsae.outputs import claim, replace_dir

TRAIN_JSON = "train.json"
STATE_FILE = "trainer_state.safetensors"
LOG_FILE = "log.jsonl"
EVAL_JSON = "eval.json"
FIGURES_DIR = "figures"
SNAPSHOTS_DIR = "snapshots"  # RUN/snapshots/step-NNNNNN: complete runs at `TrainConfig.snapshot_every` steps
DENSITY_FIGURE = "density.html"  # in FIGURES_DIR: the eval's log10 density histogram


class RunError(RuntimeError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


def is_run(path: Path) -> bool:
    """Whether `path` is a run vsae trained (its marker: cfg.json and train.json). A SAELens checkpoint has only
    cfg.json: vsae reads it but never replaces it."""
    path = Path(path)
    return (path / TRAIN_JSON).is_file() and (path / CFG_FILENAME).is_file()


@contextmanager
def claim_run(path: Path, resume: bool) -> Iterator[None]:
    """Hold the run directory `path` for the whole training (one writer), after checking vsae may write it: absent,
    empty, or a vsae run, and a run only with `resume`. A kill's leftovers (a swap cut short, temps) are finished
    first, so the check sees the last complete checkpoint."""
    with claim(path, is_run, "run", f"{CFG_FILENAME} + {TRAIN_JSON}", RunError):
        if is_run(path) and not resume:
            raise RunError(f"--out {path} holds a run already; pass --resume to continue it, or choose another --out")
        yield


def write_run(path: Path, *, weights: SAEWeights, metadata: dict, sparsity: torch.Tensor, info: dict,
              state: dict[str, torch.Tensor], log_lines: list[dict]) -> None:
    """Write a complete checkpoint into a temp dir beside `path`, then swap it in (only over a vsae run)."""

    def build(tmp: Path) -> None:
        write_sae(tmp, weights, metadata, feature_sparsity=sparsity)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / STATE_FILE))
        (tmp / LOG_FILE).write_text("".join(json.dumps(line) + "\n" for line in log_lines))
        (tmp / TRAIN_JSON).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")

    replace_dir(path, build, is_run, "checkpoint", RunError)


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
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a blank line, or one cut by a crash
            if isinstance(entry, dict):
                lines.append(entry)
    return lines


def read_resume_files(path: Path) -> tuple[dict, list[dict]]:
    """(train.json, log.jsonl) of a run to resume, strictly: a file vsae did not write as it is (not JSON, cut, not
    an object) is a CheckpointError naming it and the fix, where readers of finished runs skip it."""
    train_path, log_path = path / TRAIN_JSON, path / LOG_FILE
    fix = f"restore it from a copy, or train into a new --out (the run {path} cannot be resumed as it is)"
    try:
        saved = json.loads(train_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{train_path}: unreadable ({e}); {fix}") from e
    if not isinstance(saved, dict):
        raise CheckpointError(f"{train_path}: expected a JSON object, got {type(saved).__name__}; {fix}")
    log = []
    try:
        text = log_path.read_text() if log_path.exists() else ""
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{log_path}: unreadable ({e}); {fix}") from e
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            raise CheckpointError(f"{log_path}: line {number} is not a JSON object (cut or edited); delete that line "
                                  f"(the checkpoint does not need it) and rerun, or train into a new --out")
        log.append(entry)
    return saved, log


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

    def figure_file(self, relative: object) -> Path | None:
        """A file that eval.json names relative to the run directory, if it exists there: a name leading outside
        the run (`..`, an absolute path, a symlink out) reads as missing, so no page shows a file it names."""
        if not relative:
            return None
        try:
            path = inside(self.path, relative, "figure")
        except UnsafePathError:
            return None
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
