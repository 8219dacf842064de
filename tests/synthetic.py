"""Synthetic activations with planted features, written as a cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from activations.cache import write_array_cache


def planted_features(n_rows: int, d_in: int = 64, n_features: int = 512, active: float = 5.0,
                     noise: float = 0.01, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows [n, d_in] float32, true unit directions [n_features, d_in]), drawn with SAELens's SynthSAEBench
    generator (`sae_lens.synthetic`): random unit features (not orthogonalised: fixtures stay fast), each firing
    independently with probability `active / n_features` at a magnitude ReLU(N(1, 0.5)), plus Gaussian noise.
    The structured presets (correlation, hierarchy) are `activations.synthetic`'s; this is the plain case the unit
    tests need, from the same library rather than a second generator. A pure function of its arguments."""
    import torch
    from sae_lens.synthetic import ActivationGenerator, FeatureDictionary

    with torch.random.fork_rng(devices=[]):  # the library samples from torch's global RNG: keep callers' stream
        torch.manual_seed(seed)
        features = FeatureDictionary(n_features, d_in, initializer=None, seed=seed)
        codes = ActivationGenerator(n_features, firing_probabilities=active / n_features,
                                    mean_firing_magnitudes=1.0, std_firing_magnitudes=0.5).sample(n_rows)
        with torch.no_grad():
            x = features(codes) + noise * torch.randn(n_rows, d_in)
        dirs = features.feature_vectors.detach()
    return x.numpy().astype(np.float32), dirs.numpy().astype(np.float32)


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
