"""Which data an evaluation may use, and what produced each eval.json group.

A run may be scored only on rows it never trained on. A run trained on this cache (its train.json names the cache's
hash, model and hook) is scored on held-out sequences: the held-out split of a fraction f is the first
round(n * f) of one fixed permutation of the sequences (`activations.loader.split_sequences`), so the split of the
smallest fraction among several runs lies inside every run's own split, and runs compared together are scored on
those common sequences. Any other run is refused, unless the user says the given cache is another one
(`--other-cache`): then the whole cache is unseen and eval.json says so.

Each group of eval.json records the weights hash and step it was computed from, the cache hash and the split; a
later partial eval keeps an earlier group only when all three still match.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from activations.loader import split_sequences
from vsae.checkpoint import WEIGHTS_FILENAME
from vsae.run import RunDir

WEIGHTS_FILES = (WEIGHTS_FILENAME,)


class ProvenanceError(RuntimeError):
    """A run that may not be evaluated on the given cache as asked."""


@dataclass(frozen=True)
class EvalSplit:
    """The sequences every run of one `vsae eval` is scored on."""

    kind: str  # "held_out" (the runs' common held-out sequences) or "whole_cache" (--other-cache)
    eval_fraction: float | None  # the fraction whose held-out split is used (the smallest of the runs')
    seed: int
    n_sequences: int  # sequences in the split
    run_fractions: dict[str, float]  # each run's own held-out fraction

    def sequences(self, n_total: int) -> np.ndarray:
        if self.kind == "whole_cache":
            return np.arange(n_total)
        return split_sequences(n_total, self.eval_fraction or 0.0)[1]

    @property
    def loader_args(self) -> dict[str, Any]:
        """ActivationLoader arguments that read exactly these sequences."""
        if self.kind == "whole_cache":
            return {"split": "all"}
        return {"split": "eval", "eval_fraction": self.eval_fraction}

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> dict[str, Any]:
        """What identifies the rows scored (the run fractions aside)."""
        return {"kind": self.kind, "eval_fraction": self.eval_fraction, "seed": self.seed,
                "n_sequences": self.n_sequences}


def check_runs(runs: list[RunDir], manifest: dict, cache_hash: str, other_cache: bool) -> None:
    """Refuse a run trained on another cache, model or hook (or whose training data is unknown) unless
    `other_cache`."""
    if other_cache:
        return
    settings = manifest["settings"]
    for run in runs:
        train = run.train
        if not train:
            raise ProvenanceError(
                f"run {run.path} has no train.json, so which rows it trained on is unknown; if it was trained on "
                f"other data, pass --other-cache to score it on the whole cache")
        problems = [f"{what} {mine!r} (the cache has {theirs!r})" for what, mine, theirs in (
            ("cache hash", train.get("cache_hash"), cache_hash),
            ("model", train.get("model"), settings.get("model")),
            ("hook", train.get("hook_name"), settings.get("hook_name"))) if mine != theirs]
        if problems:
            raise ProvenanceError(
                f"run {run.path} was trained with {', '.join(problems)}; evaluate it on the cache it was trained "
                f"on, or pass --other-cache to treat this cache as unseen data")


def choose_split(runs: list[RunDir], manifest: dict, other_cache: bool) -> EvalSplit:
    """The common held-out split of the runs (the smallest fraction's), or the whole cache with --other-cache."""
    n_total = int(manifest["n_sequences"])
    fractions = {str(run.path): run.eval_fraction for run in runs}
    if other_cache:
        return EvalSplit("whole_cache", None, 0, n_total, fractions)
    fraction = min(fractions.values())
    n_held = len(split_sequences(n_total, fraction)[1])
    if n_held == 0:
        low = [run for run, f in fractions.items() if f == fraction]
        raise ProvenanceError(f"run {low[0]} held out no sequences (eval_fraction {fraction}) of this cache's "
                              f"{n_total}: it has no unseen rows here; pass --other-cache with data it never saw")
    return EvalSplit("held_out", fraction, 0, n_held, fractions)


def weights_hash(run: Path) -> str | None:
    """sha256 (16 hex digits) of the run's weights file(s); None when there is none."""
    digest = hashlib.sha256()
    found = False
    for name in WEIGHTS_FILES:
        path = Path(run) / name
        if path.is_file():
            found = True
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16] if found else None


def group_provenance(run: RunDir, cache_hash: str, split: EvalSplit, settings: dict) -> dict[str, Any]:
    """What one eval.json group was computed from."""
    return {"weights_hash": weights_hash(run.path), "step": (run.train or {}).get("step"), "cache_hash": cache_hash,
            "split": split.key(), "settings": settings}


def still_valid(old: dict | None, new: dict) -> bool:
    """An earlier group may stay beside new ones only if computed from the same weights, cache and split."""
    if not isinstance(old, dict):
        return False
    return all(old.get(k) == new.get(k) for k in ("weights_hash", "cache_hash", "split")) and \
        new.get("weights_hash") is not None
