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


def random_cache_and_sae(root: Path, tokens: int, d_in: int = 512, d_sae: int = 8192, k: int = 64,
                         context: int = 128) -> tuple[Path, Path]:
    """(cache, run) for speed benchmarks: Gaussian float16 rows and a random unit-decoder TopK SAE."""
    import torch

    from vsae.checkpoint import SAEWeights, write_sae

    n = max(1, tokens // (context - 1)) * (context - 1)
    rng = np.random.default_rng(0)
    acts = np.empty((n, d_in), dtype=np.float16)
    for i in range(0, n, 1 << 16):
        acts[i : i + (1 << 16)] = rng.standard_normal((min(1 << 16, n - i), d_in), dtype=np.float32)
    write_array_cache(root / "cache", acts, context, {"kind": "synthetic", "name": "random"})
    del acts
    W_dec = torch.randn(d_sae, d_in, generator=torch.Generator().manual_seed(0))
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    sae = SAEWeights(W_enc=W_dec.T.contiguous(), b_enc=torch.zeros(d_sae), W_dec=W_dec, b_dec=torch.zeros(d_in),
                     k=k, apply_b_dec_to_input=True)
    run = root / "run"
    run.mkdir()
    write_sae(run, sae, {"model_name": "random", "hook_name": "synthetic", "context_size": context,
                         "dataset_path": str(root / "cache")})
    return root / "cache", run
