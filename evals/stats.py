"""Uncertainty for evaluation numbers: bootstrap weights, percentile and Wilson intervals, and the comparison of a
trained SAE's score with its random-SAE null.

Every bootstrap here is a resampling of the evaluation's units (test texts, contexts, tokens) expressed as
multinomial counts `weights[b, i]` (how often unit i is drawn in replicate b). An estimator that is a ratio of
per-unit sums is then a matrix product, and two estimators given the same weights are *paired*: the trained SAE and
its nulls see the same resampled units, so their difference's interval excludes the shared noise of the units.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

N_BOOT = 1000
LEVEL = 0.95


def bootstrap_weights(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n] multinomial resample counts, each row summing to n; a pure function of its arguments."""
    if n < 1:
        raise ValueError(f"cannot bootstrap over {n} units")
    rng = np.random.default_rng([seed, n])
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def weighted_sums(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i w_bi v_i: values [n] or [n, m] -> [n_boot] or [n_boot, m]."""
    return weights @ np.asarray(values, dtype=np.float64)


def weighted_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i w_bi v_i / sum_i w_bi: values [n] or [n, m] -> [n_boot] or [n_boot, m]. A replicate that drew none
    of the units (possible for a subset's weights) gives NaN, which `percentile_interval` ignores."""
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sums = weighted_sums(values, weights)
        return sums / (total if sums.ndim == 1 else total[:, None])


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> list[float]:
    """The central `level` percentile interval over axis 0 (NaN replicates ignored): [lo, hi]."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(np.asarray(samples, dtype=np.float64), [tail, 100 - tail], axis=0)
    return [float(lo), float(hi)]


def wilson_interval(k: int, n: int, level: float = LEVEL) -> list[float]:
    """Wilson score interval of a binomial proportion k / n."""
    if n <= 0:
        raise ValueError(f"a proportion needs n > 0, got {n}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def normal_interval(mean: float, se: float, level: float = LEVEL) -> list[float]:
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return [float(mean - z * se), float(mean + z * se)]


def null_comparison(trained: float, trained_boot: np.ndarray, nulls: Sequence[float], nulls_boot: np.ndarray,
                    level: float = LEVEL) -> dict:
    """A trained SAE's score against its random-SAE nulls. `nulls_boot[s]` must use the same bootstrap weights as
    `trained_boot` (paired), so the resampled units' shared noise cancels in trained - mean over null seeds.

    The interval also holds the spread of random SAEs across seeds: a random SAE of another seed could score
    anywhere in the nulls' spread, so "separated" must mean beyond it. Each side of the paired percentile interval
    is widened in quadrature by z * sd_seeds * sqrt(1 + 1/S) (S null seeds: the spread of one more random SAE
    about the nulls' estimated mean)."""
    nulls = np.asarray(nulls, dtype=np.float64)
    nulls_boot = np.asarray(nulls_boot, dtype=np.float64).reshape(len(nulls), -1)
    trained_boot = np.asarray(trained_boot, dtype=np.float64)
    if nulls_boot.shape[1] != trained_boot.shape[0]:
        raise ValueError(f"paired bootstrap needs equal replicate counts, got {trained_boot.shape[0]} and "
                         f"{nulls_boot.shape[1]}")
    difference = float(trained - nulls.mean())
    lo, hi = percentile_interval(trained_boot - nulls_boot.mean(axis=0), level)
    spread = float(nulls.std(ddof=1)) if len(nulls) > 1 else 0.0
    seeds = NormalDist().inv_cdf(0.5 + level / 2) * spread * np.sqrt(1 + 1 / len(nulls))
    interval = [difference - float(np.hypot(difference - lo, seeds)),
                difference + float(np.hypot(hi - difference, seeds))]
    return {
        "trained": float(trained),
        "null_mean": float(nulls.mean()),
        "null_std": spread,
        "null_values": [float(v) for v in nulls],
        "difference": difference,
        "interval": interval,
        "paired_interval": [lo, hi],
        "includes_zero": bool(interval[0] <= 0.0 <= interval[1]),
        "level": level,
        "n_boot": int(trained_boot.shape[0]),
    }


def dead_fraction_interval(counts: np.ndarray, n_tokens: int, level: float = LEVEL) -> list[float]:
    """Interval of the fraction of latents that never fire, binomial over tokens: in another sample of the N tokens
    a latent that fired c times would look dead with probability q = (1 - c/N)^N (a latent that never fired stays
    dead), so the dead count varies with variance sum q (1 - q) (latents treated as independent). Normal interval
    about the observed fraction, clipped to [0, 1]. (A percentile bootstrap would not contain the observed value:
    resampling can only add dead latents.)"""
    counts = np.asarray(counts, dtype=np.float64)
    if n_tokens <= 0:
        raise ValueError("a dead fraction needs at least one token")
    q = np.power(1.0 - counts / n_tokens, n_tokens)
    observed = float((counts == 0).mean())
    se = float(np.sqrt((q * (1 - q)).sum())) / counts.size
    lo, hi = normal_interval(observed, se, level)
    return [max(0.0, lo), min(1.0, hi)]


def detectable_density(n_tokens: int, level: float = LEVEL) -> float:
    """The density above which a latent fires at least once in n_tokens with probability >= level: a latent
    called dead (no firing) has a density below this, at that confidence."""
    return float(-np.log(1 - level) / n_tokens)
