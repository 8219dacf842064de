"""The run directory: SAELens-format weights plus vsae's training state, written atomically.

    runs/NAME/
      cfg.json, sae_weights.safetensors, sparsity.safetensors   SAELens layout (vsae.checkpoint)
      train.json                  configs, cache identity, step, tokens seen, versions
      trainer_state.safetensors   training-space weights, Adam moments, dead counters, RNG
      log.jsonl                   one line per logging step

Each checkpoint is a complete new directory that replaces the old one by
rename, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vsae.checkpoint import CheckpointError, SAEWeights, write_sae

TRAIN_JSON = "train.json"
STATE_FILE = "trainer_state.safetensors"
LOG_FILE = "log.jsonl"


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
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"cannot write the checkpoint {path}: {e}; the previous checkpoint is kept") from e


def read_run(path: Path) -> tuple[dict, dict[str, torch.Tensor], list[dict]]:
    """(train.json, trainer state tensors, log lines) of a run directory."""
    recover(path)
    if not is_run(path):
        raise RunError(f"{path} is not a vsae run (no {TRAIN_JSON})")
    try:
        info = json.loads((path / TRAIN_JSON).read_text())
        state = load_file(str(path / STATE_FILE))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the training state ({e}); the run cannot be resumed") from e
    log_path = path / LOG_FILE
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()] if log_path.exists() else []
    return info, state, lines
