"""Ground-truth metrics on a synthetic cache (`vsae synth`): how well an SAE recovered the features that made it.

The definitions are SynthSAEBench's, as SAELens 6.54 ships them in `sae_lens.synthetic.evals`, and they are computed
with its functions (`ClassificationMetricsCalculator`, `ShrinkageCalculator`, `DeadLatentsCalculator`,
`L0Calculator`, `feature_uniqueness`, `cosine_similarities`): on the cache's held-out rows, with each row's true
feature activations as the cache stored them. The SAE is vsae's `SAEWeights`, whose `W_dec`, `encode` and `decode`
are the SAELens SAE interface those functions use.

Each number is a mean over units, kept (under `_units`, not written to eval.json) so that `evals.baseline` can put a
bootstrap interval on it and compare it, paired, with the random-SAE nulls scored on the same units: matched
(latent, feature) pairs for MCC; latents for precision, recall, F1, uniqueness and the dead fraction; blocks of
ROW_BLOCK consecutive rows for shrinkage (synthetic rows are independent draws, so blocks only bound the size of
the bootstrap weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from activations.synthetic import TrueCodes, ground_truth_tensors, has_ground_truth, synthetic_info, true_codes
from evals.baseline import Bootstrap, attach_bootstrap
from evals.null import NULL_SEEDS, random_sae
from evals.scr_tpp import UNITS
from vsae.checkpoint import SAEWeights

ROW_BLOCK = 128  # rows per bootstrap unit of shrinkage
MIN_INPUT_NORM = 1e-6  # SAELens's ShrinkageCalculator: rows with a smaller ||x|| are skipped

DEFINITIONS = {
    "ground_truth": "recovery of the synthetic cache's true features (SynthSAEBench, sae_lens.synthetic.evals), on "
                    "the held-out rows and their stored true activations; random-SAE nulls and 95% bootstrap "
                    "intervals over each metric's units",
    "mcc": "mean |cos| between decoder rows and true feature vectors matched one-to-one by the Hungarian algorithm: "
           "mean over the min(d_sae, n_features) matched pairs (SynthSAEBench MCC)",
    "precision": "mean over latents of TP / (TP + FP), latent i read as a detector of its best-matching true feature "
                 "(largest |cos| of decoder row and feature): fires (nonzero) vs the feature is active; 0 where "
                 "undefined, dead latents included",
    "recall": "mean over latents of TP / (TP + FN), same matching and firing as precision",
    "f1": "mean over latents of the harmonic mean of the latent's precision and recall (0 where both are 0)",
    "accuracy": "mean over latents of (TP + TN) / rows, same matching and firing as precision",
    "shrinkage": "mean over rows of ||x_hat|| / ||x|| (rows with ||x|| <= 1e-6 skipped); 1 means no shrinkage",
    "uniqueness": "distinct true features among the latents' best matches / d_sae (1: every latent tracks its own)",
    "dead_latents": "latents that never fire on the rows",
    "dead_latent_fraction": "dead_latents / d_sae",
    "true_l0": "mean number of active true features per row",
    "sae_l0": "mean number of nonzero latents per row",
    "per_latent": "per latent: best-matching true feature and its |cos|, precision, recall, F1",
}


@dataclass
class GroundTruthData:
    """What the metrics read: rows x [n, d_in] float32, their true codes, the true dictionary [n_features, d_in]."""

    x: Tensor
    codes: TrueCodes
    dictionary: Tensor

    @classmethod
    def load(cls, cache_dir: str | Path, rows: np.ndarray) -> GroundTruthData:
        """The cache's global `rows` (in that order) and their ground truth."""
        from activations.loader import ActivationLoader

        rows = np.asarray(rows, dtype=np.int64)
        with ActivationLoader(cache_dir, 1, split="all", shuffle=False) as loader:
            x, _ = loader.gather(rows)
        return cls(torch.from_numpy(x).float(), true_codes(cache_dir, rows),
                   ground_truth_tensors(cache_dir)["feature_vectors"].float())


# --- one SAE's scores ---------------------------------------------------------------------------------------------

@torch.no_grad()
def score_sae(sae: SAEWeights, data: GroundTruthData, batch_size: int = 4096) -> dict[str, Any]:
    """The ground-truth metrics of one SAE on `data`, with their bootstrap units under `UNITS`."""
    from sae_lens.synthetic import (
        ClassificationMetricsCalculator,
        DeadLatentsCalculator,
        L0Calculator,
        ShrinkageCalculator,
        feature_uniqueness,
    )

    device = sae.W_dec.device
    dec, truth = sae.W_dec.float(), data.dictionary.to(device)
    if dec.shape[1] != truth.shape[1]:
        raise ValueError(f"the SAE reads d_in {dec.shape[1]} but the true features have {truth.shape[1]} dimensions")
    classify = ClassificationMetricsCalculator(dec, truth)
    dead, shrink, sae_l0, true_l0 = DeadLatentsCalculator(sae.d_sae), ShrinkageCalculator(), L0Calculator(), \
        L0Calculator()
    ratios, valid = [], []
    for lo in range(0, data.x.shape[0], batch_size):
        hi = min(data.x.shape[0], lo + batch_size)
        x, acts = data.x[lo:hi].to(device), data.codes.dense(lo, hi, device)
        z = sae.encode(x).float()
        x_hat = sae.decode(z).float()
        for calc, args in ((classify, (z, acts)), (dead, (z,)), (shrink, (x_hat, x)), (sae_l0, (z,)),
                           (true_l0, (acts,))):
            calc.add_batch(*args)
        r, v = _shrinkage_ratios(x_hat, x)
        ratios.append(r)
        valid.append(v)
    counts_ = classify.compute()
    matched, best, best_cos = _matching(dec, truth)
    latents = _per_latent(classify, best, dead.latent_ever_fired)
    return {
        "n_rows": int(data.x.shape[0]), "n_features": int(truth.shape[0]), "d_sae": sae.d_sae,
        "true_l0": true_l0.compute(), "sae_l0": sae_l0.compute(),
        "mcc": float(matched.mean()), "precision": counts_.precision, "recall": counts_.recall,
        "f1": counts_.f1_score, "accuracy": counts_.accuracy, "shrinkage": shrink.compute(),
        "uniqueness": feature_uniqueness(dec, truth), "dead_latents": dead.compute(),
        "dead_latent_fraction": dead.compute() / sae.d_sae,
        "per_latent": {"best_feature": best.tolist(), "best_abs_cos": best_cos.tolist(),
                       **{k: latents[k].tolist() for k in ("precision", "recall", "f1")}},
        UNITS: {"pairs": {"mcc": matched.tolist()}, "latents": {k: v.tolist() for k, v in latents.items()},
                "row_blocks": _row_blocks(np.concatenate(ratios), np.concatenate(valid))},
    }


def _shrinkage_ratios(x_hat: Tensor, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row: ||x_hat|| / ||x|| (0 where skipped), and whether ||x|| > MIN_INPUT_NORM (SAELens's rule)."""
    norms = x.double().norm(dim=-1)
    valid = norms > MIN_INPUT_NORM
    ratio = torch.where(valid, x_hat.double().norm(dim=-1) / norms.clamp(min=MIN_INPUT_NORM), 0.0)
    return ratio.cpu().numpy(), valid.cpu().numpy()


def _row_blocks(ratios: np.ndarray, valid: np.ndarray) -> dict[str, list[float]]:
    """The units of shrinkage: per block of ROW_BLOCK consecutive rows, the sum of its rows' ratios and how many
    rows count."""
    block = np.arange(len(ratios)) // ROW_BLOCK
    return {"sum": np.bincount(block, weights=ratios).tolist(),
            "count": np.bincount(block, weights=valid.astype(np.float64)).tolist()}


def _matching(dec: Tensor, truth: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(matched |cos| of the Hungarian pairs, ordered by the smaller side's index; each latent's best feature by
    |cos|; that |cos|). The pairs are `mean_correlation_coefficient`'s, kept rather than averaged."""
    from sae_lens.util import cosine_similarities
    from scipy.optimize import linear_sum_assignment

    cos = cosine_similarities(dec, truth).abs()
    best_cos, best = cos.max(dim=1)
    cos_np = cos.double().cpu().numpy()
    rows, cols = linear_sum_assignment(1 - cos_np)
    matched = cos_np[rows, cols]
    if dec.shape[0] > truth.shape[0]:
        matched = matched[np.argsort(cols)]
    return matched, best.cpu().numpy(), best_cos.double().cpu().numpy()


def _per_latent(classify: Any, best: np.ndarray, fired: Tensor) -> dict[str, np.ndarray]:
    """Per latent: SAELens's precision, recall, F1 (from the calculator's counts; its `compute` gives only their
    means), the uniqueness share 1 / (latents sharing its best feature), whose sum is the distinct features
    matched, and whether it is dead."""
    tp, fp, fn = (t.double().numpy() for t in (classify.tp, classify.fp, classify.fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    shared = np.bincount(best, minlength=int(best.max()) + 1 if best.size else 0)[best]
    return {"precision": precision, "recall": recall, "f1": f1, "uniqueness": 1.0 / shared,
            "dead_latent_fraction": (~fired.numpy()).astype(np.float64)}


# --- intervals and nulls (evals/baseline.py) ----------------------------------------------------------------------

def _unit_sizes(result: dict) -> dict[str, int]:
    units = result.get(UNITS) or {}
    sizes = {"pairs": len((units.get("pairs") or {}).get("mcc", [])),
             "latents": len((units.get("latents") or {}).get("f1", [])),
             "row_blocks": len((units.get("row_blocks") or {}).get("sum", []))}
    return {k: n for k, n in sizes.items() if n}


def _replicate(result: dict, weights: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """The headline values (weights None) or their bootstrap replicates under per-unit-set weights [n_boot, n]."""
    units = result[UNITS]
    out: dict[str, Any] = {}
    for unit, values in (("pairs", units["pairs"]), ("latents", units["latents"])):
        for key, v in values.items():
            v = np.asarray(v, dtype=np.float64)
            out[key] = float(v.mean()) if weights is None else (weights[unit] @ v) / weights[unit].sum(axis=1)
    sums, counts = (np.asarray(units["row_blocks"][k], dtype=np.float64) for k in ("sum", "count"))
    if weights is None:
        out["shrinkage"] = float(sums.sum() / counts.sum())
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            out["shrinkage"] = (weights["row_blocks"] @ sums) / (weights["row_blocks"] @ counts)
    return out


BOOTSTRAP = Bootstrap(units=_unit_sizes, replicate=_replicate)


# --- entry points -------------------------------------------------------------------------------------------------

def ground_truth_metrics(sae: SAEWeights, cache_dir: Path, rows: Tensor, seed: int, *,
                         null_seeds: tuple[int, ...] = NULL_SEEDS, batch_size: int = 4096) -> dict:
    """The ground-truth metrics of `sae` on the cache's global `rows` (int ids), with 95% bootstrap intervals
    (`result["intervals"]`) and the paired comparison with random SAEs of its d_sae and k (`result["null"]`; their
    b_dec is the mean of these rows). The standalone form of the `ground_truth` eval group."""
    if torch.is_tensor(rows) and rows.is_floating_point():
        raise ValueError("rows must be the cache's global row ids (integers), not activations")
    data = GroundTruthData.load(cache_dir, np.asarray(rows.cpu() if torch.is_tensor(rows) else rows))
    result = score_sae(sae, data, batch_size)
    mean = data.x.double().mean(dim=0).float()
    nulls = [score_sae(random_sae(sae.d_in, sae.d_sae, sae.k, s, mean, device=sae.W_dec.device), data, batch_size)
             for s in null_seeds]
    attach_bootstrap(BOOTSTRAP, result, nulls, seed)
    result.pop(UNITS)
    result["null_seeds"] = list(null_seeds)
    result["cache"] = synthetic_info(cache_dir)
    return result


def held_out_rows(cache: str | Path, loader_args: dict, n: int, order: np.ndarray | None = None) -> np.ndarray:
    """The first `n` rows (global ids) of an eval split (`EvalSplit.loader_args`), special-token rows dropped as the
    stream pass drops them; `order`: the split's rows in another order (a seeded sample, `EvalContext.held_rows`)."""
    from activations.loader import ActivationLoader
    from vsae.firing import special_ids, special_mask

    with ActivationLoader(cache, 1, shuffle=False, with_tokens=True, **loader_args) as loader:
        special = special_ids(loader.manifest)
        rows = loader.rows if order is None else np.asarray(order)
        if special:
            _, toks = loader.gather(rows)
            rows = rows[~special_mask(torch.from_numpy(toks[:, 0]), special).numpy()]
    return rows[:n]


def ground_truth_group(ctx: Any) -> dict[Path | str, dict]:
    """The `ground_truth` eval group: every SAE the context scores (runs, and the random-SAE nulls it asks for) on
    the first `tokens` rows of the evaluation split (of its seeded order with `sample_seed`); {} for a cache without
    ground truth."""
    cache = ctx.cfg.cache
    if not has_ground_truth(cache):
        return {}
    subjects = ctx.subjects() if hasattr(ctx, "subjects") else ctx.saes
    # With `sample_seed` the rows are the same seeded sample of the split the stream pass reads (the audit's reseeds).
    order = ctx.held_rows() if hasattr(ctx, "held_rows") else None
    rows = held_out_rows(cache, ctx.split.loader_args, ctx.cfg.tokens, order)
    if rows.size == 0:
        return {}
    data = GroundTruthData.load(cache, rows)
    info = synthetic_info(cache)
    out = {}
    for key, sae in subjects.items():
        out[key] = {**score_sae(sae, data, ctx.cfg.batch_size), "cache": info}
    return out

