"""The metric audit's three lenses: can a number vsae reports be believed? (`vsae audit`, pipeline/audit.py)

After Chanin (2026), "Are Sparse Autoencoder Benchmarks Reliable?" (arXiv 2605.18229), which audits SAEBench's
metrics through reseed noise, discriminability along training trajectories and validity against synthetic ground
truth. Only the paper's abstract and outline were at hand here, so the statistics and thresholds below are vsae's own
definitions in the paper's spirit, each derived from a two-sided 95% comparison (z = 1.96):

- **reseed** (`reseed_lens`): one number per (SAE, reseed), where a reseed varies the evaluation seed (probes,
  labelled sets, independence sample) and the held-out sample (`EvalConfig.sample_seed`). Noise = the pooled
  within-SAE standard deviation; spread = the standard deviation of the SAEs' means. A single evaluation of each of
  two SAEs tells them apart at 95% when their difference exceeds 1.96 * sqrt(2) * noise, so a metric passes when the
  typical difference between the audited SAEs (the spread) clears that: noise / spread <= 1 / (1.96 * sqrt(2))
  (~0.36).
- **discriminability** (`discriminability_lens`): the metric at checkpoints along one run's training. Trend = an
  isotonic (monotone) fit of the per-step means in the direction of their Spearman correlation with the step; signal
  = the fitted trend's range; noise = the larger of the reseed standard deviation (one evaluation's noise) and the
  residual standard deviation around the fit. Passes when signal / noise >= 1.96 * sqrt(2) (~2.77: the start and end
  of training differ at 95% in single evaluations) and |Spearman rho| >= 0.6 (the change is a trend, not one jump).
- **validity** (`validity_lens`): across synthetic SAEs of varied quality, Spearman's rho of the metric with
  ground-truth F1 and with MCC, signed so that positive means "better by the metric is better by ground truth"
  (the registry headline's direction). Passes when, for both references, the signed rho >= 0.6 and its one-sided
  p-value < 0.05. A metric with no better direction, or one that needs a language model (not measurable on a
  synthetic cache), gets "n/a" with the reason.

The functions here are pure (arrays in, a `Verdict` out); `read_marks` turns an audit.json into the short marks the
pages put beside a failing number.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Z95 = 1.96
RESEED_RATIO_MAX = 1 / (Z95 * math.sqrt(2))
SNR_MIN = Z95 * math.sqrt(2)
TREND_RHO_MIN = 0.6
VALIDITY_RHO_MIN = 0.6
VALIDITY_P_MAX = 0.05
MIN_SAES = 4  # validity: fewer synthetic SAEs cannot give a one-sided p < 0.05 for Spearman's rho
LENSES = ("reseed", "discriminability", "validity")
PASS, FAIL = "pass", "fail"
AUDIT_JSON = "audit.json"


@dataclass(frozen=True)
class Verdict:
    """One lens applied to one metric: its statistic, the threshold it is held to, pass / fail / "n/a: why", and the
    numbers behind it (`inputs`)."""

    lens: str
    verdict: str
    statistic: float | None = None
    threshold: float | None = None
    why: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.verdict == FAIL

    def to_json(self) -> dict[str, Any]:
        return {k: _clean(v) for k, v in asdict(self).items()}


def not_applicable(lens: str, why: str, **inputs: Any) -> Verdict:
    return Verdict(lens, f"n/a: {why}", why=why, inputs=inputs)


def _clean(v: Any) -> Any:
    """JSON-safe: numpy to Python, non-finite floats to None (inf kept readable as a string)."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple | np.ndarray):
        return [_clean(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _rows(values: Any) -> np.ndarray:
    """A float [n, r] array; None becomes NaN."""
    arr = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=np.float64)
    return arr.reshape(len(values), -1)


def pooled_sd(values: np.ndarray) -> float:
    """The pooled within-row standard deviation of [n, r] values (r >= 2): sqrt of the mean per-row variance."""
    var = np.where(np.ptp(values, axis=1) == 0, 0.0, np.var(values, axis=1, ddof=1))  # equal values: exactly 0
    return float(np.sqrt(np.mean(var)))


# --- lens 1: reseed noise -----------------------------------------------------------------------------------------

def reseed_lens(values: Any) -> Verdict:
    """`values[i][r]`: the metric of audited SAE i under reseed r. Rows with a missing value are dropped."""
    arr = _rows(values)
    arr = arr[np.isfinite(arr).all(axis=1)]
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        return not_applicable("reseed", "needs at least 2 SAEs with at least 2 reseeds each",
                              n_saes=int(arr.shape[0]), n_reseeds=int(arr.shape[1]))
    noise, spread = pooled_sd(arr), float(np.std(arr.mean(axis=1), ddof=1))
    inputs = {"reseed_sd": noise, "between_sae_sd": spread, "means": arr.mean(axis=1), "values": arr,
              "n_saes": int(arr.shape[0]), "n_reseeds": int(arr.shape[1])}
    if noise == 0 and spread == 0:
        return not_applicable("reseed", "the metric is the same for every audited SAE and reseed", **inputs)
    ratio = noise / spread if spread > 0 else math.inf
    ok = ratio <= RESEED_RATIO_MAX
    why = (f"reseed sd {noise:.3g} is {ratio:.2f} x the spread between SAEs ({spread:.3g}); at most "
           f"{RESEED_RATIO_MAX:.2f} lets one evaluation tell two typical SAEs apart at 95%")
    return Verdict("reseed", PASS if ok else FAIL, ratio, RESEED_RATIO_MAX, why, inputs)


# --- lens 2: discriminability along training ------------------------------------------------------------------------

def monotone_fit(steps: np.ndarray, means: np.ndarray, increasing: bool) -> np.ndarray:
    """The isotonic least-squares fit of `means` over `steps` (non-decreasing, or non-increasing)."""
    from sklearn.isotonic import IsotonicRegression

    return IsotonicRegression(increasing=increasing).fit_transform(steps, means)


def spearman(a: np.ndarray, b: np.ndarray, alternative: str = "two-sided") -> tuple[float, float]:
    """(rho, p); (0, 1) where either side is constant (no ranking to correlate)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0, 1.0
    res = spearmanr(a, b, alternative=alternative)
    return float(res.statistic), float(res.pvalue)


def discriminability_lens(steps: Any, values: Any) -> Verdict:
    """`values[s][r]`: the metric of the snapshot at `steps[s]` under reseed r (r may be 1: then the noise is the
    residual around the trend alone)."""
    steps_arr, arr = np.asarray(steps, dtype=np.float64), _rows(values)
    keep = np.isfinite(arr).all(axis=1)
    steps_arr, arr = steps_arr[keep], arr[keep]
    if arr.shape[0] < 3:
        return not_applicable("discriminability", "needs the metric at 3 or more training steps",
                              n_steps=int(arr.shape[0]))
    order = np.argsort(steps_arr)
    steps_arr, arr = steps_arr[order], arr[order]
    means = arr.mean(axis=1)
    rho, _ = spearman(steps_arr, means)
    fit = monotone_fit(steps_arr, means, increasing=rho >= 0)
    signal = float(fit.max() - fit.min())
    residual = float(np.sqrt(np.mean((means - fit) ** 2)))
    reseed = pooled_sd(arr) if arr.shape[1] >= 2 else 0.0
    noise = max(reseed, residual)
    snr = signal / noise if noise > 0 else (math.inf if signal > 0 else 0.0)
    ok = snr >= SNR_MIN and abs(rho) >= TREND_RHO_MIN
    inputs = {"steps": steps_arr, "means": means, "trend": fit, "signal": signal, "reseed_sd": reseed,
              "residual_sd": residual, "spearman_rho": rho, "n_reseeds": int(arr.shape[1])}
    why = (f"the trend over training moves {signal:.3g}, {snr:.2f} x the noise {noise:.3g} (need >= {SNR_MIN:.2f}); "
           f"Spearman rho with the step {rho:+.2f} (need |rho| >= {TREND_RHO_MIN})")
    return Verdict("discriminability", PASS if ok else FAIL, snr, SNR_MIN, why, inputs)


# --- lens 3: validity against ground truth --------------------------------------------------------------------------

def validity_lens(metric: Any, references: dict[str, Any], better: str | None) -> Verdict:
    """`metric[i]` and `references[name][i]` (ground-truth F1, MCC) of synthetic SAE i; `better` is the registry
    headline's direction ("higher", "lower" or None)."""
    if better not in ("higher", "lower"):
        return not_applicable("validity", "the metric has no better direction to check against ground truth")
    m = np.array([np.nan if v is None else float(v) for v in metric], dtype=np.float64)
    refs = {k: np.array([np.nan if v is None else float(v) for v in r], dtype=np.float64)
            for k, r in references.items()}
    keep = np.isfinite(m) & np.all([np.isfinite(r) for r in refs.values()], axis=0)
    if keep.sum() < MIN_SAES:
        return not_applicable("validity", f"needs the metric on {MIN_SAES} or more synthetic SAEs",
                              n_saes=int(keep.sum()))
    sign = 1.0 if better == "higher" else -1.0
    per: dict[str, dict[str, float]] = {}
    for name, ref in refs.items():
        rho, p = spearman(m[keep], ref[keep], alternative="greater" if sign > 0 else "less")
        per[name] = {"rho": rho, "signed_rho": sign * rho, "p_one_sided": p}
    worst = min(v["signed_rho"] for v in per.values())
    ok = all(v["signed_rho"] >= VALIDITY_RHO_MIN and v["p_one_sided"] < VALIDITY_P_MAX for v in per.values())
    parts = ", ".join(f"{k} {v['signed_rho']:+.2f} (p {v['p_one_sided']:.2g})" for k, v in per.items())
    why = (f"rank correlation with ground truth, signed so + means {better} is better: {parts}; need >= "
           f"{VALIDITY_RHO_MIN} with p < {VALIDITY_P_MAX} for each")
    inputs = {"per_reference": per, "metric": m[keep], **{name: r[keep] for name, r in refs.items()},
              "n_saes": int(keep.sum())}
    return Verdict("validity", PASS if ok else FAIL, worst, VALIDITY_RHO_MIN, why, inputs)


# --- marks for the pages ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mark:
    """What a page puts beside a number that failed a lens: "fails reseed" and the reason as its tooltip."""

    text: str
    title: str


def read_audit(path: str | Path) -> dict:
    """An audit.json (or the directory holding one); a clear error when it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / AUDIT_JSON
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--audit {path}: cannot read an audit.json ({e}); give the file `vsae audit` wrote") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("metrics"), list):
        raise ValueError(f"--audit {path}: not an audit.json (no metrics list); give the file `vsae audit` wrote")
    return doc


def read_marks(doc: dict | None) -> dict[tuple[str, str], Mark]:
    """(group, metric key) -> its mark, for the metrics that failed at least one lens of an audit.json."""
    marks: dict[tuple[str, str], Mark] = {}
    for entry in (doc or {}).get("metrics", []):
        lenses = entry.get("lenses") or {}
        failed = [name for name in LENSES if (lenses.get(name) or {}).get("verdict") == FAIL]
        if failed:
            text = "fails " + ", ".join(failed)
            title = "; ".join(f"{name}: {lenses[name].get('why', '')}" for name in failed)
            marks[(str(entry.get("group")), str(entry.get("key")))] = Mark(text, f"vsae audit: {title}")
    return marks


def mark_for(marks: dict[tuple[str, str], Mark], group: str, key: str) -> Mark | None:
    """The mark of a number shown as `key` of `group` (also "metrics.KEY" as the compare page's table names the
    per-N scores)."""
    return marks.get((group, key)) or marks.get((group, key.removeprefix("metrics.")))
