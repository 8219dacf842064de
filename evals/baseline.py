"""Intervals and random-SAE nulls attached to the metric groups' results.

A group that can bootstrap declares a `Bootstrap`: which units its result holds (test texts, contexts, row blocks:
`units(result) -> {unit set: count}`) and how to recompute its headline values from them under resampling weights
(`replicate(result, weights) -> {key: values}`, weights None giving the reported values). Then for every trained run:

- `result["intervals"][key] = [lo, hi]`, the 95% percentile interval over `N_BOOT` replicates;
- `result["null"][key]`, for every key the run's random-SAE nulls also have: the trained value, the nulls' mean,
  spread and values, trained - null mean with a *paired* bootstrap interval (the nulls are resampled with the very
  weights the trained run was, so the shared noise of the texts cancels), and whether that interval includes 0.

Groups without units (the per-latent ablation, independence) carry their own intervals; their null comparison is
unpaired: the difference's interval combines the trained interval with the nulls' in quadrature.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from evals.stats import LEVEL, bootstrap_weights, null_comparison, percentile_interval


@dataclass(frozen=True)
class Bootstrap:
    units: Callable[[dict], dict[str, int]]
    replicate: Callable[[dict, dict[str, np.ndarray] | None], dict[str, Any]]


def unit_weights(sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Bootstrap weights per unit set, a pure function of (set name, size, seed): a run and its nulls get the same."""
    return {name: bootstrap_weights(n, seed=seed ^ zlib.crc32(name.encode())) for name, n in sizes.items()}


def attach_bootstrap(boot: Bootstrap, result: dict, nulls: list[dict], seed: int) -> None:
    """Intervals of `result`'s values, and their paired comparison with the `nulls` (same units) where they have
    them."""
    sizes = boot.units(result)
    if not sizes:
        return
    weights = unit_weights(sizes, seed)
    point, reps = boot.replicate(result, None), boot.replicate(result, weights)
    intervals = result.setdefault("intervals", {})
    for key, values in reps.items():
        intervals[key] = percentile_interval(values)
    # A null is paired on the unit sets it shares with the run (same count); its replicates cover those keys only.
    paired = [n for n in nulls if boot.units(n) and all(sizes.get(k) == v for k, v in boot.units(n).items())]
    if not paired:
        if nulls:
            result["null_note"] = "the nulls were scored on other units (texts, contexts) than this run: not compared"
        return
    null_points = [boot.replicate(n, None) for n in paired]
    null_reps = [boot.replicate(n, weights) for n in paired]
    result["null"] = {
        key: null_comparison(float(point[key]), reps[key], [float(p[key]) for p in null_points],
                             np.stack([r[key] for r in null_reps]))
        for key in reps if all(key in p and _finite(p[key]) for p in null_points) and _finite(point[key])
    }


def attach_unpaired(result: dict, nulls: list[dict], keys: list[str], read: Callable[[dict, str], Any]) -> None:
    """Null comparison of values that carry their own intervals (`result["intervals"][key]`): trained - null mean,
    with an interval whose half-width is the trained one's and the null mean's combined in quadrature (normal
    approximation; the null mean's half-width is the root mean square of the nulls' over sqrt(number of nulls))."""
    out = {}
    for key in keys:
        value, nulls_v = read(result, key), [read(n, key) for n in nulls]
        if not _finite(value) or not nulls_v or not all(_finite(v) for v in nulls_v):
            continue
        half = _half_width(result, key)
        null_halves = [_half_width(n, key) for n in nulls]
        null_mean = float(np.mean(nulls_v))
        entry = {"trained": float(value), "null_mean": null_mean,
                 "null_std": float(np.std(nulls_v, ddof=1)) if len(nulls_v) > 1 else 0.0,
                 "null_values": [float(v) for v in nulls_v], "difference": float(value) - null_mean,
                 "level": LEVEL, "paired": False}
        if half is not None and all(h is not None for h in null_halves):
            combined = math.sqrt(half ** 2 + float(np.mean(np.square(null_halves))) / len(null_halves))
            entry["interval"] = [entry["difference"] - combined, entry["difference"] + combined]
            entry["includes_zero"] = bool(entry["interval"][0] <= 0 <= entry["interval"][1])
        out[key] = entry
    if out:
        result["null"] = out


def _half_width(result: dict, key: str) -> float | None:
    pair = (result.get("intervals") or {}).get(key)
    if isinstance(pair, list | tuple) and len(pair) == 2 and all(_finite(v) for v in pair):
        return (float(pair[1]) - float(pair[0])) / 2
    return None


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def separated(entry: dict | None) -> bool | None:
    """Does a null comparison say the trained SAE differs from the random one? None when not assessed."""
    if not isinstance(entry, dict) or "includes_zero" not in entry:
        return None
    return not entry["includes_zero"]
