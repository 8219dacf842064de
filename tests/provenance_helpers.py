"""Give a hand-made run the train.json of a run trained on a cache, so `vsae eval` accepts it on that cache."""

from __future__ import annotations

import json
from pathlib import Path

from activations.cache import manifest_hash, read_manifest
from vsae.run import TRAIN_JSON


def mark_trained_on(run: Path, cache: Path, eval_fraction: float = 0.05, step: int = 1) -> None:
    manifest = read_manifest(cache)
    (Path(run) / TRAIN_JSON).write_text(json.dumps({
        "cache": str(cache), "cache_hash": manifest_hash(manifest), "model": manifest["settings"]["model"],
        "hook_name": manifest["settings"]["hook_name"], "step": step, "train": {"eval_fraction": eval_fraction}}))
