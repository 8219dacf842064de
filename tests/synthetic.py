"""Synthetic activations with planted features, written as a cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from activations.cache import write_array_cache


def planted_features(n_rows: int, d_in: int = 64, n_features: int = 512, active: float = 5.0,
                     noise: float = 0.01, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows [n, d_in] float32, true unit directions [n_features, d_in]).

    Each row is a sparse nonnegative combination of about `active` of the true
    directions with heavy-tailed (lognormal) magnitudes, plus Gaussian noise.
    """
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_features, d_in))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    on = rng.random((n_rows, n_features)) < active / n_features
    mags = rng.lognormal(0.0, 0.5, size=(n_rows, n_features)) * on
    x = mags @ dirs + noise * rng.standard_normal((n_rows, d_in))
    return x.astype(np.float32), dirs.astype(np.float32)


def synthetic_cache(out: Path, rows: np.ndarray, context: int = 17) -> Path:
    n = rows.shape[0] - rows.shape[0] % (context - 1)
    write_array_cache(out, rows[:n], context, {"kind": "synthetic", "name": "planted"})
    return out
