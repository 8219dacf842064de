"""SCR (spurious correlation removal) and TPP (targeted probe perturbation), after SAEBench 0.4 (METRICS.md 3-5).

Both train linear probes on mean-pooled *model* activations (evals/probes.py), rank SAE latents by how much they
move a probe, ablate the top N latents with the SAE error term added back, and read probe accuracies again. The
SAE enters only through ranking and ablation, so the scores measure how well its latents separate concepts, not
how well it reconstructs.

Latent ranking (SAEBench `get_effects_per_class_precomputed_acts`), on the probe's own training set:
    effect_i = (mean_pos f_i - mean_neg f_i) * (w . W_dec[i])
where f is the SAE latent vector averaged over a text's real tokens (each token encoded, then pooled) and w the
probe weight. SCR ranks by |effect|; TPP clamps the mean difference at >= 0 first and takes no abs. The top
k = min(N, #nonzero effects) latents are ablated (`select_top_latents`).

Ablation (SAEBench `ablated_precomputed_activations`): z = encode(x); x' = decode(z with the chosen latents zeroed)
+ (x - decode(z)) at every real token, then mean-pooled. With no latents chosen x' = x exactly, so ablated accuracy
equals clean accuracy. Since the decoder is affine, x' = x - z_S @ W_dec[S], and pooling is a mean, the pooled x'
is pooled x minus (pooled z)_S @ W_dec[S] (`ablated_pooled`): the test texts are encoded once per SAE and every
(N, class) ablation is a small matmul. `sae_ablation` is the same ablation per token, for `pooled_activations`.

Deliberate differences from SAEBench (the first two as DESIGN.md asks):
- Probes are selected on a validation split (evals/probes.py `train_probe`); SAEBench keeps the probe epoch with
  the best *test* accuracy.
- Padded positions are never ablated or pooled; SAEBench ablates them too, which shifts pooled activations by
  -sum_{i in S} f_i(0) d_i times the padding fraction (METRICS.md section 3, step 7).
- Mean latent differences are means over the whole training set; SAEBench averages the differences of
  per-batch (125 texts) means, weighing batches equally: close, not identical.
- TPP: each probe's negatives (ceil(n_pos / (C - 1)) per other class, cut to n_pos) are drawn once per split
  with the seed and kept; SAEBench redraws them at every accuracy evaluation, which adds sampling noise to each
  difference (METRICS.md section 5 pitfall).
- Probes are scikit-learn L1 logistic regressions rather than AdamW-trained linear layers, so the biased probe's
  reliance on the spurious attribute (hence A_base) differs from SAEBench's for the same data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from evals.labelled import LabelledSet
from evals.probes import (
    Ablation,
    TokenActivations,
    segment_mean,
    token_activations,
    train_probe,
)
from evals.stats import weighted_means
from vsae.checkpoint import SAEWeights

N_VALUES = (2, 5, 10, 20, 50, 100, 500)  # SAEBench's defaults
SEED = 42  # SAEBench's random_seed
# SCR scores are set to 0 when A_oracle - A_base is below this (SAEBench: no epsilon, no clamp otherwise).
MIN_SCR_DENOMINATOR = 0.001
DIRECTIONS = ("dir1", "dir2")  # SCR: ablate the spurious probe's latents (dir1), the target probe's (dir2)
UNITS = "_units"  # a result's per-test-text correctness, for bootstrap intervals (not written to eval.json)


# ---------------------------------------------------------------------------------------------------------------
# SAE pieces: ablation, pooled latents, attribution, selection; `rank_latents` and `ablated_accuracies`
# run those stages for SCR and TPP alike


def sae_ablation(sae: SAEWeights, latents: Sequence[int] | Tensor) -> Ablation:
    """x -> decode(z with `latents` zeroed) + (x - decode(z)), z = encode(x): ablation with the error added back.

    The decoder is affine (z @ W_dec + b_dec), so this equals x - z[:, S] @ W_dec[S], which is what is computed:
    one encode and a small matmul instead of two full decodes. An empty S returns x itself.
    """
    idx = torch.as_tensor(latents, dtype=torch.long, device=sae.W_dec.device).flatten()

    def ablate(x: Tensor) -> Tensor:
        if idx.numel() == 0:
            return x
        z = sae.encode(x.to(sae.W_dec.device))
        return x - (z[:, idx] @ sae.W_dec[idx]).to(x.device, x.dtype)

    return ablate


def pooled_latents(tokens: TokenActivations, sae: SAEWeights, batch_tokens: int = 1 << 13) -> Tensor:
    """SAE latents averaged over each text's real tokens [n, d_sae] (each token encoded, then pooled)."""
    device = sae.W_enc.device
    out = torch.zeros(len(tokens), sae.d_sae)
    with torch.no_grad():
        for rows, acts, counts in tokens.batches(batch_tokens):
            out[rows] = segment_mean(sae.encode(acts.to(device)), counts)
    return out


def ablated_pooled(pooled: Tensor, latents: Tensor, W_dec: Tensor, chosen: Tensor) -> Tensor:
    """Pooled activations after ablating `chosen` at every real token: pooled - latents[:, S] @ W_dec[S].

    Per token the ablation changes x by -z_S(x) @ W_dec[S] (`sae_ablation`), and pooling is a mean over real
    tokens, so the pooled change is minus the pooled z_S times W_dec[S]: one encode pass per SAE serves every N.
    `latents` are `pooled_latents` of the same texts as `pooled`.
    """
    if chosen.numel() == 0:
        return pooled
    return pooled - latents[:, chosen] @ W_dec[chosen].float().cpu()


def latent_mean_differences(
    tokens: TokenActivations, sae: SAEWeights, contrasts: Tensor, batch_tokens: int = 1 << 13
) -> Tensor:
    """contrasts.T @ pooled latents, [m, d_sae], in one pass over the tokens without keeping [n, d_sae].

    Column j of `contrasts` [n, m] is +1/n_pos on task j's positives, -1/n_neg on its negatives and 0 elsewhere,
    so row j of the result is mean_pos f - mean_neg f for task j.
    """
    device = sae.W_enc.device
    out = torch.zeros(contrasts.shape[1], sae.d_sae, dtype=torch.float64)
    with torch.no_grad():
        for rows, acts, counts in tokens.batches(batch_tokens):
            pooled = segment_mean(sae.encode(acts.to(device)), counts).double()
            out += contrasts[rows].double().T @ pooled
    return out.float()


def contrast(n: int, positives: np.ndarray, negatives: np.ndarray) -> Tensor:
    """A column for `latent_mean_differences`: +1/|positives| at positives, -1/|negatives| at negatives."""
    c = torch.zeros(n, dtype=torch.float64)
    c[torch.as_tensor(positives)] = 1.0 / len(positives)
    c[torch.as_tensor(negatives)] = -1.0 / len(negatives)
    return c


def attribution_effects(mean_difference: Tensor, probe_weight: Tensor, W_dec: Tensor, scr: bool) -> Tensor:
    """SAEBench's effect_i = (mean_pos f_i - mean_neg f_i) * (w . W_dec[i]); |.| for SCR, difference >= 0 for TPP."""
    dot = W_dec.float().cpu() @ probe_weight.float().cpu()
    diff = mean_difference.float().cpu()
    if scr:
        return (diff * dot).abs()
    return diff.clamp(min=0) * dot


def select_top_latents(effects: Tensor, n: int) -> Tensor:
    """The k = min(n, #nonzero effects) latents of largest effect, largest first (SAEBench `select_top_n_features`)."""
    if n > effects.numel():
        raise ValueError(f"N={n} exceeds d_sae={effects.numel()}; use smaller n_values")
    k = min(n, int((effects != 0).sum()))
    return effects.topk(k).indices if k else torch.zeros(0, dtype=torch.long)


def rank_latents(
    tokens: TokenActivations, sae: SAEWeights, contrasts: Tensor, probe_weights: Sequence[Tensor], n: int, scr: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """Attribution effects of every latent and the top-`n` latents, largest first, for each probe j.

    Column j of `contrasts` (see `contrast`) picks probe j's positives and negatives among `tokens`' texts, so
    all probes are ranked in one pass over the tokens. SCR takes |effect|, TPP clamps the difference first
    (`attribution_effects`).
    """
    diffs = latent_mean_differences(tokens, sae, contrasts)
    effects = [attribution_effects(diffs[j], w, sae.W_dec, scr) for j, w in enumerate(probe_weights)]
    return effects, [select_top_latents(e, n) for e in effects]


ProbeTest = tuple[LogisticRegression, np.ndarray | slice, np.ndarray]  # (probe, rows of the pooled set, labels)


def ablated_correct(
    pooled: Tensor, latents: Tensor, W_dec: Tensor, ranking: Tensor, ns: Sequence[int], tests: Sequence[ProbeTest]
) -> tuple[dict[int, list[np.ndarray]], dict[int, int]]:
    """For each N: ablate the first N latents of `ranking` (error term added back, `ablated_pooled`) and read,
    for every (probe, rows, labels) in `tests`, which of its rows the probe gets right (bool per row); also the
    number of latents ablated (N, or fewer when the ranking is shorter). Ablating nothing gives the clean
    predictions exactly."""
    correct: dict[int, list[np.ndarray]] = {}
    n_selected: dict[int, int] = {}
    with torch.no_grad():
        for n in ns:
            chosen = ranking[:n]
            X = ablated_pooled(pooled, latents, W_dec, chosen)
            correct[n] = [probe_correct(probe, X[rows], y) for probe, rows, y in tests]
            n_selected[n] = len(chosen)
    return correct, n_selected


def ablated_accuracies(
    pooled: Tensor, latents: Tensor, W_dec: Tensor, ranking: Tensor, ns: Sequence[int], tests: Sequence[ProbeTest]
) -> tuple[dict[int, list[float]], dict[int, int]]:
    """`ablated_correct` as accuracies (the fraction right per probe)."""
    correct, n_selected = ablated_correct(pooled, latents, W_dec, ranking, ns, tests)
    return {n: [float(c.mean()) for c in cs] for n, cs in correct.items()}, n_selected


def probe_correct(probe: LogisticRegression, X: Tensor | np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bool per row: does the probe get it right (its mean is `probes.probe_accuracy`)."""
    X = X.detach().cpu().double().numpy() if isinstance(X, Tensor) else np.asarray(X, dtype=np.float64)
    return probe.predict(X) == np.asarray(y)


def _check_n_values(n_values: Sequence[int], d_sae: int) -> list[int]:
    ns = [int(n) for n in n_values]
    bad = [n for n in ns if not 0 <= n <= d_sae]
    if bad:
        raise ValueError(f"n_values {bad} are outside 0..d_sae={d_sae} (SAEBench asserts N <= d_sae)")
    return ns


def _check_inputs(tokens: TokenActivations, data: LabelledSet, splits: Sequence[str], roles: Sequence[str]) -> None:
    if len(tokens) != len(data.texts):
        raise ValueError(f"tokens hold {len(tokens)} texts, the set {len(data.texts)}: compute them from data.texts")
    missing = [s for s in splits if s not in data.splits] + [r for r in roles if r not in data.roles]
    if missing:
        raise ValueError(f"the labelled set lacks {missing} (has splits {sorted(data.splits)}, roles {data.roles})")


def _weight(probe: LogisticRegression) -> Tensor:
    return torch.as_tensor(probe.coef_[0], dtype=torch.float32)


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _positions(n: int, rows: np.ndarray) -> np.ndarray:
    """Map from text index to its place in `rows` (-1 for texts outside `rows`)."""
    position = np.full(n, -1)
    position[rows] = np.arange(len(rows))
    return position


def _binary_labels(n_pos: int, n_neg: int) -> np.ndarray:
    return np.concatenate([np.ones(n_pos, dtype=np.int64), np.zeros(n_neg, dtype=np.int64)])


def _ranking_record(keys: Sequence[str], effects: Sequence[Tensor], ranking: Sequence[Tensor]) -> dict[str, Any]:
    # Top-N is a prefix of the ranking: ranked_latents[key][:n_selected[..][key]] were ablated at N.
    return {
        "ranked_latents": {k: r.tolist() for k, r in zip(keys, ranking, strict=True)},
        "ranked_effects": {k: e[r].tolist() for k, e, r in zip(keys, effects, ranking, strict=True)},
    }


def _provenance(data: LabelledSet, seed: int) -> dict[str, Any]:
    return {"n_texts": {name: len(rows) for name, rows in data.splits.items()}, "dataset": data.description,
            "seed": seed}


# ---------------------------------------------------------------------------------------------------------------
# SCR


@dataclass
class ScrProbes:
    """The three SCR probes (biased, target = oracle, spurious) and their clean test accuracies."""

    biased: LogisticRegression
    target: LogisticRegression
    spurious: LogisticRegression
    accuracy: dict[str, float]
    correct: dict[str, np.ndarray] | None = None  # per test text, right or not, keyed like `accuracy`


def fit_scr_probes(pooled: Tensor, data: LabelledSet, seed: int = SEED) -> ScrProbes:
    """Train the SCR probes on pooled activations of all of `data`'s texts [n, d]; SAE-independent, fit once.

    - biased: target labels on split "train" (rho = 1), selected on the validation texts with target == spurious
      (SAEBench's biased test set is likewise its diagonal quadrants);
    - target (oracle) and spurious: their labels on "train_balanced", selected on "validation".
    Clean accuracies on "test": oracle_target, oracle_spurious, base_target (A_base,1: biased probe on the target
    labels) and base_spurious (A_base,2: biased probe on the spurious labels).
    """
    target, spurious = data.roles["target"], data.roles["spurious"]
    X = pooled
    val = data.splits["validation"]
    val_diagonal = val[data.labels[target][val] == data.labels[spurious][val]]

    def fit(split: str, attr: str, val_rows: np.ndarray) -> LogisticRegression:
        rows = data.splits[split]
        return train_probe(X[rows], data.labels[attr][rows], X[val_rows], data.labels[attr][val_rows], seed=seed)

    probes = ScrProbes(
        biased=fit("train", target, val_diagonal),
        target=fit("train_balanced", target, val),
        spurious=fit("train_balanced", spurious, val),
        accuracy={},
    )
    test = data.splits["test"]
    y_t, y_s = data.labels[target][test], data.labels[spurious][test]
    probes.correct = {
        "oracle_target": probe_correct(probes.target, X[test], y_t),
        "oracle_spurious": probe_correct(probes.spurious, X[test], y_s),
        "base_target": probe_correct(probes.biased, X[test], y_t),
        "base_spurious": probe_correct(probes.biased, X[test], y_s),
    }
    probes.accuracy = {key: float(c.mean()) for key, c in probes.correct.items()}
    return probes


def scr_score(a_ablated: float, a_base: float, a_oracle: float) -> float:
    """(A_abl - A_base) / (A_oracle - A_base); 0 when the denominator is < 0.001 (SAEBench), never clamped."""
    denominator = a_oracle - a_base
    return 0.0 if denominator < MIN_SCR_DENOMINATOR else (a_ablated - a_base) / denominator


def scr_from_activations(
    tokens: TokenActivations,
    data: LabelledSet,
    sae: SAEWeights,
    n_values: Sequence[int] = N_VALUES,
    seed: int = SEED,
    probes: ScrProbes | None = None,
    pooled: Tensor | None = None,
) -> dict[str, Any]:
    """SCR of `sae` from token activations of all of `data`'s texts (tokens row i = data.texts[i]).

    dir1: ablate the top-N latents by the spurious probe's attribution (on "train_balanced", spurious labels);
    S1 = (A_abl - A_base,1) / (A_oracle(target) - A_base,1), A_abl = biased probe on the target labels of the
    ablated test set. dir2: the same with the target probe's latents, the spurious labels and A_oracle(spurious).
    `scr_metric_threshold_N` is S1 when A_base,1 < A_base,2 (the biased probe leaned on the spurious attribute),
    S2 when A_base,1 > A_base,2, and None when they are equal (SAEBench then writes no key).
    Pass `probes` / `pooled` (from a previous call) to reuse them across SAEs.
    """
    ns = _check_n_values(n_values, sae.d_sae)
    _check_inputs(tokens, data, ("train", "train_balanced", "validation", "test"), ("target", "spurious"))
    target, spurious = data.roles["target"], data.roles["spurious"]
    pooled = tokens.pooled() if pooled is None else pooled
    probes = fit_scr_probes(pooled, data, seed) if probes is None else probes
    acc = probes.accuracy

    # dir1 ranks by the spurious probe, dir2 by the target probe, both on the balanced training texts.
    train = data.splits["train_balanced"]
    y_train = [data.labels[a][train] for a in (spurious, target)]
    contrasts = torch.stack([contrast(len(train), np.flatnonzero(y == 1), np.flatnonzero(y == 0)) for y in y_train],
                            dim=1)
    effects, ranking = rank_latents(tokens.select(train), sae, contrasts,
                                    [_weight(probes.spurious), _weight(probes.target)], max(ns, default=0), scr=True)

    # The biased probe is read on the target labels after dir1's ablation, on the spurious labels after dir2's.
    test = data.splits["test"]
    test_pooled, test_latents = pooled[test], pooled_latents(tokens.select(test), sae)
    labels = (data.labels[target][test], data.labels[spurious][test])
    ablated: dict[str, dict[int, float]] = {}
    correct: dict[str, dict[int, np.ndarray]] = {}
    n_selected: dict[str, dict[int, int]] = {}
    for d, r, y in zip(DIRECTIONS, ranking, labels, strict=True):
        right, n_selected[d] = ablated_correct(test_pooled, test_latents, sae.W_dec, r, ns,
                                               [(probes.biased, slice(None), y)])
        correct[d] = {n: c for n, (c,) in right.items()}
        ablated[d] = {n: float(c.mean()) for n, c in correct[d].items()}
    metrics = _scr_metrics(ablated, acc, ns)
    return {
        "metrics": metrics,
        "scr_metric_mean": _mean([metrics[f"scr_metric_threshold_{n}"] for n in ns]),
        "n_values": ns,
        "target": target,
        "spurious": spurious,
        "accuracy": dict(acc),
        "ablated_accuracy": ablated,
        **_ranking_record(DIRECTIONS, effects, ranking),
        "n_selected": n_selected,
        "probe_C": {"biased": probes.biased.C_, "target": probes.target.C_, "spurious": probes.spurious.C_},
        **_provenance(data, seed),
        # Per test text: the bootstrap's units (evals/baseline.py); the driver drops them from eval.json.
        UNITS: {"clean": probes.correct, "ablated": correct} if probes.correct is not None else None,
    }


def scr_replicates(result: dict[str, Any], weights: np.ndarray | None) -> dict[int, np.ndarray | float]:
    """`scr_metric_threshold_N` per N recomputed from the per-text units with bootstrap `weights` [B, n_test]
    (None: the plain means, equal to the reported scores). The direction (S1 or S2) stays the full sample's."""
    units = result[UNITS]
    acc = {k: _wmean(c, weights) for k, c in units["clean"].items()}
    chosen = result["accuracy"]
    direction = "dir1" if chosen["base_target"] < chosen["base_spurious"] else \
        "dir2" if chosen["base_target"] > chosen["base_spurious"] else None
    out: dict[int, np.ndarray | float] = {}
    if direction is None:
        return out
    base, oracle = (("base_target", "oracle_target") if direction == "dir1" else ("base_spurious", "oracle_spurious"))
    for n, c in units["ablated"][direction].items():
        den = acc[oracle] - acc[base]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[int(n)] = np.where(den < MIN_SCR_DENOMINATOR, 0.0, (_wmean(c, weights) - acc[base]) / den)
    return out


def _wmean(correct: np.ndarray, weights: np.ndarray | None, rows: np.ndarray | None = None) -> np.ndarray:
    correct = np.asarray(correct, dtype=np.float64)
    if weights is None:
        return np.asarray(correct.mean())
    return weighted_means(correct, weights if rows is None else weights[:, rows])


def _scr_metrics(ablated: dict[str, dict[int, float]], acc: dict[str, float], ns: Sequence[int]
                 ) -> dict[str, float | None]:
    """S1 and S2 (`scr_score`) per N, and `scr_metric_threshold_N`: S1 or S2 as `scr_from_activations` says."""
    base = {"dir1": acc["base_target"], "dir2": acc["base_spurious"]}
    oracle = {"dir1": acc["oracle_target"], "dir2": acc["oracle_spurious"]}
    metrics: dict[str, float | None] = {}
    for n in ns:
        for d in DIRECTIONS:
            metrics[f"scr_{d}_threshold_{n}"] = scr_score(ablated[d][n], base[d], oracle[d])
        if acc["base_target"] < acc["base_spurious"]:
            metrics[f"scr_metric_threshold_{n}"] = metrics[f"scr_dir1_threshold_{n}"]
        elif acc["base_target"] > acc["base_spurious"]:
            metrics[f"scr_metric_threshold_{n}"] = metrics[f"scr_dir2_threshold_{n}"]
        else:
            metrics[f"scr_metric_threshold_{n}"] = None
    return metrics


def scr_scores(
    model,
    hook_name: str,
    sae: SAEWeights,
    data: LabelledSet,
    n_values: Sequence[int] = N_VALUES,
    context: int = 128,
    batch_size: int = 64,
    device: str = "cpu",
    prepend_bos: bool = True,
    seed: int = SEED,
    progress: bool = True,
) -> dict[str, Any]:
    """SCR of `sae` at `hook_name` of `model` on `data` (METRICS.md section 4; see `scr_from_activations`).

    For several SAEs on one model and set, call `token_activations` once and `scr_from_activations` per SAE.
    """
    tokens = token_activations(model, hook_name, data.texts, context, batch_size, device, prepend_bos, progress)
    return scr_from_activations(tokens, data, sae, n_values, seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# TPP


@dataclass
class TppProbes:
    """One one-vs-rest probe per class, the rows each probe uses per split, and clean test accuracies."""

    probes: list[LogisticRegression]
    rows: list[dict[str, tuple[np.ndarray, np.ndarray]]]  # per class: split -> (positive rows, negative rows)
    accuracy: list[float]
    class_names: tuple[str, ...]
    correct: list[np.ndarray] | None = None  # per probe: its test rows, right or not


def one_vs_rest_rows(labels: np.ndarray, rows: np.ndarray, c: int, n_classes: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class c's rows of `rows` as positives, and as many negatives: ceil(n_pos / (C - 1)) drawn from each other
    class, then cut to n_pos. As SAEBench's TPP negatives (METRICS.md section 5), but drawn once and kept."""
    pos = rows[labels[rows] == c]
    per_class = math.ceil(len(pos) / (n_classes - 1))
    negs = []
    for other in range(n_classes):
        if other != c:
            candidates = rows[labels[rows] == other]
            negs.append(rng.permutation(candidates)[:per_class])
    neg = rng.permutation(np.concatenate(negs))[: len(pos)]
    return pos, neg


def fit_tpp_probes(pooled: Tensor, data: LabelledSet, seed: int = SEED) -> TppProbes:
    """One probe per class on "train" (class vs sampled others), selected on "validation", scored on "test"."""
    attr = data.roles["classes"]
    labels = data.labels[attr]
    names = data.class_names[attr]
    n_classes = len(names)
    if n_classes < 2:
        raise ValueError(f"TPP needs >= 2 classes, {attr!r} has {n_classes}")
    rng = np.random.default_rng(seed)
    probes, rows, accuracy, correct = [], [], [], []
    for c in range(n_classes):
        split_rows = {s: one_vs_rest_rows(labels, data.splits[s], c, n_classes, rng)
                      for s in ("train", "validation", "test")}
        X, y = {}, {}
        for s, (pos, neg) in split_rows.items():
            X[s] = pooled[np.concatenate([pos, neg])]
            y[s] = _binary_labels(len(pos), len(neg))
        probe = train_probe(X["train"], y["train"], X["validation"], y["validation"], seed=seed)
        probes.append(probe)
        rows.append(split_rows)
        correct.append(probe_correct(probe, X["test"], y["test"]))
        accuracy.append(float(correct[-1].mean()))
    return TppProbes(probes, rows, accuracy, tuple(names), correct)


def tpp_from_activations(
    tokens: TokenActivations,
    data: LabelledSet,
    sae: SAEWeights,
    n_values: Sequence[int] = N_VALUES,
    seed: int = SEED,
    probes: TppProbes | None = None,
    pooled: Tensor | None = None,
) -> dict[str, Any]:
    """TPP of `sae` from token activations of all of `data`'s texts (tokens row i = data.texts[i]).

    For each class i and N: ablate the top-N latents of probe i's attribution on the whole test split, and with
    Delta_j = A_j(clean) - A_j(ablated) for every probe j on its own test rows,
    TPP_i(N) = Delta_i - mean_{j != i} Delta_j. `tpp_threshold_N_total_metric` is the mean of TPP_i over classes;
    `..._intended_diff_only` the mean Delta_i, `..._unintended_diff_only` the mean of mean_{j != i} Delta_j
    (SAEBench's names). Higher is better; 0 means the ablation did nothing selective.
    """
    ns = _check_n_values(n_values, sae.d_sae)
    _check_inputs(tokens, data, ("train", "validation", "test"), ("classes",))
    pooled = tokens.pooled() if pooled is None else pooled
    probes = fit_tpp_probes(pooled, data, seed) if probes is None else probes
    names = probes.class_names

    # Attribution of every class in one pass over the training texts.
    train = data.splits["train"]
    position = _positions(len(data.texts), train)
    contrasts = torch.stack([contrast(len(train), position[rows["train"][0]], position[rows["train"][1]])
                             for rows in probes.rows], dim=1)
    effects, ranking = rank_latents(tokens.select(train), sae, contrasts, [_weight(p) for p in probes.probes],
                                    max(ns, default=0), scr=False)

    test = data.splits["test"]
    test_pooled, test_latents = pooled[test], pooled_latents(tokens.select(test), sae)
    position = _positions(len(data.texts), test)
    tests = []
    for probe, rows in zip(probes.probes, probes.rows, strict=True):
        pos, neg = rows["test"]
        tests.append((probe, position[np.concatenate([pos, neg])], _binary_labels(len(pos), len(neg))))
    # Per ablated class: every probe's accuracy per N, and the number of latents ablated per N.
    right = [ablated_correct(test_pooled, test_latents, sae.W_dec, r, ns, tests) for r in ranking]
    sweeps = [({n: [float(c.mean()) for c in cs] for n, cs in r.items()}, sel) for r, sel in right]
    metrics, per_class = _tpp_metrics([accs for accs, _ in sweeps], probes.accuracy, names, ns)
    return {
        "metrics": metrics,
        "tpp_total_metric_mean": _mean([metrics[f"tpp_threshold_{n}_total_metric"] for n in ns]),
        "n_values": ns,
        "classes": list(names),
        "clean_accuracy": dict(zip(names, probes.accuracy, strict=True)),
        # ablated_accuracy[N][ablated class] lists every probe's accuracy, in `classes` order.
        "ablated_accuracy": {n: {name: accs[n] for name, (accs, _) in zip(names, sweeps, strict=True)} for n in ns},
        "per_class": per_class,
        **_ranking_record(names, effects, ranking),
        "n_selected": {n: {name: sel[n] for name, (_, sel) in zip(names, sweeps, strict=True)} for n in ns},
        "probe_C": {name: probe.C_ for name, probe in zip(names, probes.probes, strict=True)},
        **_provenance(data, seed),
        # Per test text (rows: each probe's test rows as positions in the test split): bootstrap units.
        UNITS: {"rows": [rows for _, rows, _ in tests], "clean": probes.correct,
                "ablated": {n: [r[n] for r, _ in right] for n in ns}} if probes.correct is not None else None,
    }


def tpp_replicates(result: dict[str, Any], weights: np.ndarray | None) -> dict[int, np.ndarray | float]:
    """`tpp_threshold_N_total_metric` per N from the per-text units with bootstrap `weights` [B, n_test] (None:
    the reported values): each probe's accuracy is its weighted mean over its own test rows."""
    units = result[UNITS]
    rows = [np.asarray(r) for r in units["rows"]]
    clean = [_wmean(c, weights, r) for c, r in zip(units["clean"], rows, strict=True)]
    out: dict[int, np.ndarray | float] = {}
    for n, per_class in units["ablated"].items():
        totals = []
        for i, probes_right in enumerate(per_class):
            delta = [a - _wmean(c, weights, r) for a, c, r in zip(clean, probes_right, rows, strict=True)]
            totals.append(delta[i] - np.mean([d for j, d in enumerate(delta) if j != i], axis=0))
        out[int(n)] = np.mean(totals, axis=0)
    return out


def _tpp_metrics(ablated: Sequence[dict[int, list[float]]], clean: Sequence[float], names: Sequence[str],
                 ns: Sequence[int]) -> tuple[dict[str, float], dict[int, dict[str, dict[str, float]]]]:
    """The class means (`metrics`) and per-class TPP parts from `ablated[i][N]`, every probe's accuracy after
    ablating class i's top N latents, and the `clean` accuracies."""
    keys = ("total_metric", "intended_diff_only", "unintended_diff_only")
    metrics: dict[str, float] = {}
    per_class: dict[int, dict[str, dict[str, float]]] = {}
    for n in ns:
        per_class[n] = {}
        for i, name in enumerate(names):
            delta = [a_clean - a for a_clean, a in zip(clean, ablated[i][n], strict=True)]
            intended = delta[i]
            unintended = float(np.mean([d for j, d in enumerate(delta) if j != i]))
            per_class[n][name] = dict(zip(keys, (intended - unintended, intended, unintended), strict=True))
        for key in keys:
            metrics[f"tpp_threshold_{n}_{key}"] = float(np.mean([v[key] for v in per_class[n].values()]))
    return metrics, per_class


def tpp_scores(
    model,
    hook_name: str,
    sae: SAEWeights,
    data: LabelledSet,
    n_values: Sequence[int] = N_VALUES,
    context: int = 128,
    batch_size: int = 64,
    device: str = "cpu",
    prepend_bos: bool = True,
    seed: int = SEED,
    progress: bool = True,
) -> dict[str, Any]:
    """TPP of `sae` at `hook_name` of `model` on `data` (METRICS.md section 5; see `tpp_from_activations`)."""
    tokens = token_activations(model, hook_name, data.texts, context, batch_size, device, prepend_bos, progress)
    return tpp_from_activations(tokens, data, sae, n_values, seed=seed)
