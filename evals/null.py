"""The random-SAE null: an SAE of the same shape that learned nothing, scored beside every trained one.

A score that a random SAE reaches too says nothing about what training found. The null SAE has random unit decoder
rows, the encoder their transpose (so each latent reads the direction it writes), no encoder bias, and the data mean
as decoder bias (subtracted before encoding), so it reconstructs as well as k random directions around the mean can.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor

from activations.atomic import write_text_atomic
from evals.context import jsonable
from vsae.checkpoint import SAEWeights

NULL_SEEDS = (1, 2, 3)


def random_sae(d_in: int, d_sae: int, k: int, seed: int, b_dec: Tensor, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> SAEWeights:
    """A random TopK SAE: W_dec rows uniform on the unit sphere (seeded), W_enc = W_dec^T, b_enc 0, b_dec = b_dec
    (the data mean), applied to the input before encoding."""
    if b_dec.shape != (d_in,):
        raise ValueError(f"b_dec must have shape ({d_in},), got {tuple(b_dec.shape)}")
    generator = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=generator, dtype=torch.float64)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(dtype)
    return SAEWeights(W_enc=W_dec.T.contiguous().to(device), b_enc=torch.zeros(d_sae, dtype=dtype, device=device),
                      W_dec=W_dec.to(device), b_dec=b_dec.to(device=device, dtype=dtype), k=k,
                      apply_b_dec_to_input=True)


def null_key(d_sae: int, k: int, seed: int) -> str:
    return f"null:d{d_sae}:k{k}:s{seed}"


def null_saes(saes: dict, d_in: int, n_seeds: int, b_dec: Tensor, device: str | torch.device
              ) -> tuple[dict[str, SAEWeights], dict]:
    """The nulls of every (d_sae, k) among `saes` (`n_seeds` seeds each), and run -> its nulls' keys."""
    nulls: dict[str, SAEWeights] = {}
    null_of = {}
    for run, sae in saes.items():
        keys = [null_key(sae.d_sae, sae.k, s) for s in NULL_SEEDS[:n_seeds]]
        for key, seed in zip(keys, NULL_SEEDS, strict=False):
            if key not in nulls:
                nulls[key] = random_sae(d_in, sae.d_sae, sae.k, seed, b_dec, device=device)
        null_of[run] = keys
    return nulls, null_of


# 3: the data mean (the nulls' b_dec) is drawn by `loader.sample`, not a permutation of the whole split.
NULL_VERSION = 3  # bump when the null SAE or a null-aware group's computation changes: old stored results then miss
STORE_DIR = ".vsae-null"


class NullStore:
    """The nulls' group results, kept inside the evaluated cache (`CACHE/.vsae-null/`) under a key of everything
    that determines them (cache hash, split, null shape and seed, group, its settings), so a study evaluating many
    runs of one shape pays for them once. A cache the user cannot write to is simply not used as a store."""

    def __init__(self, cache: str | Path, identity: dict) -> None:
        self.root = Path(cache) / STORE_DIR
        self.identity = {**identity, "null_version": NULL_VERSION}
        self.warned = False

    def _path(self, group: str, key: str, settings: dict) -> Path:
        blob = json.dumps({**self.identity, "group": group, "null": key, "settings": settings}, sort_keys=True,
                          default=str)
        return self.root / f"{group}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json"

    def get(self, group: str, key: str, settings: dict) -> dict | None:
        path = self._path(group, key, settings)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return doc.get("result") if isinstance(doc, dict) and doc.get("null") == key else None

    def put(self, group: str, key: str, settings: dict, result: dict) -> None:
        try:
            self.root.mkdir(exist_ok=True)
            write_text_atomic(self._path(group, key, settings),
                              json.dumps({"null": key, "group": group, "result": result}, default=jsonable))
        except OSError as e:
            if not self.warned:
                warnings.warn(f"cannot store random-SAE null results in {self.root} ({e}); they are recomputed "
                              f"each time", stacklevel=2)
                self.warned = True
