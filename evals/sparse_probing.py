"""k-sparse probing: can a handful of SAE latents, picked on training texts, classify a labelled concept?

Two variants, on the labelled sets TPP uses (`evals.labelled`: the offline sets, or `--labelled real`), one binary
task per class of a set (class c against others), the tasks' rows those of TPP's probes (`scr_tpp.one_vs_rest_rows`:
the class's texts and as many others, ceil(n_pos / (C - 1)) from each other class, drawn once with the seed).

SAEBench sparse probing (sae_bench/evals/sparse_probing/main.py, probe_training.py)
-------------------------------------------------------------------------------------
- Features: the SAE latents of every real token (BOS / EOS / PAD excluded), mean-pooled per text
  (`scr_tpp.pooled_latents`; SAEBench `get_sae_meaned_activations`).
- Selection: on the task's training texts, the k latents of largest |mean_pos f_i - mean_neg f_i|
  (`get_top_k_mean_diff_mask`).
- Probe: scikit-learn `LogisticRegression` on those k columns, L2, C = 1.0, max_iter 1000, raw (unscaled)
  features (`train_sklearn_probe`); score: accuracy on the task's test texts. k in K_VALUES = (1, 2, 5), SAEBench's
  default. `saebench_top_{k}_accuracy` is the mean over a set's classes, then over the sets.
- References: `saebench_sae_accuracy`, the same probe on all d_sae pooled latents, and `saebench_llm_accuracy`,
  a probe on the mean-pooled model activations. SAEBench trains both on a GPU (AdamW, 100 epochs) and keeps the
  epoch with the best *test* accuracy. Here the all-latents probe is the L2 C = 1 probe of the top-k ones (no
  test-set selection), and the model probe is TPP's clean probe (`scr_tpp.fit_tpp_probes`: L1, C chosen on the
  validation split; evals/probes.py `train_probe`), so its accuracies are TPP's `clean_accuracy`.
- Also deliberate: the tasks' negatives are drawn once and kept (SAEBench redraws them with `torch.randperm`).

sae-probes (Kantamneni et al. 2025, arXiv 2502.16681; package `sae-probes` 0.4.2, repo chanind/SAE-Probes:
sae_probes/run_sae_evals.py, utils_training.py, utils_data.py, generate_model_activations.py; as SAEBench's
evals/sparse_probing_sae_probes/main.py calls it: reg_type "l1", ks [1, 2, 5], binarize False, setting "normal",
mean_diff_normalization "mean", seed = the random seed, 42)
-------------------------------------------------------------------------------------------------------------
- Features: the SAE encoding of the model activation at each text's *last* token (no pooling).
- Data (`get_train_test_indices`): a balanced training set of min(1024, the task's training texts) texts,
  ceil(n / 2) positives, drawn and ordered with RandomState(seed); the test set is the task's test texts (balanced).
- Selection (`mean_act_normalization`, `get_sorted_indices`): every latent column is divided by (its mean |value|
  over the training texts where it is nonzero + 1e-6), that mean being sum |x| / (nonzero count + 1e-6); then the k
  columns of largest |mean_pos - mean_neg| of the divided columns. The probe reads the undivided columns.
- Probe (`find_best_reg`, penalty "l1"): `LogisticRegression(l1, solver saga, max_iter 1000, random_state=seed)`,
  C chosen among logspace(5, -5, 10) by mean validation ROC AUC (the first best): with n training texts,
  leave-2-out when n <= 12, a stratified 6-fold split shuffled with the seed when n < 128 (folds whose validation
  part lacks a class dropped), else one split holding out the last min(0.2 n, 100) texts; then a refit on all
  training texts in a RandomState(seed) order. Scores on the test texts: ROC AUC of predict_proba
  (`sae_probes_top_{k}_auc`, the paper's metric) and accuracy (`sae_probes_top_{k}_accuracy`).
- Reference: `sae_probes_llm_auc` / `_accuracy`, sae-probes' "logreg" baseline: the same search with penalty "l2"
  on the model's last-token activations.
Where this deviates from sae-probes: the texts are vsae's labelled sets, not its 113 binary datasets; texts are
cut to `context` tokens keeping their start (as every vsae probe), where sae-probes keeps the end (1024 tokens), so
a longer text's "last token" is its context-th; BOS is prepended (the embedded model's convention); a text without
a real token reads zeros; ConvergenceWarnings are silenced, as sae-probes does.

Intervals: every number is a mean over test texts (accuracy) or a function of them (AUC), so the units of
`evals.baseline` are a set's test texts: a replicate reweights them (`bootstrap weights` [B, n_test]), each task
reads its own rows, accuracies become weighted means and AUCs weighted Mann-Whitney statistics (`weighted_auc`);
the random-SAE nulls are scored on the same texts, so the comparison is paired. The model-probe references do not
depend on the SAE: they get intervals here (`reference_intervals`) but no null comparison.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import LeavePOut, StratifiedKFold
from torch import Tensor

from evals.baseline import Bootstrap, unit_weights
from evals.labelled import LabelledSet
from evals.probes import TokenActivations
from evals.scr_tpp import UNITS, TppProbes, fit_tpp_probes, pooled_latents
from evals.stats import percentile_interval, weighted_means
from vsae.checkpoint import SAEWeights

K_VALUES = (1, 2, 5)  # SAEBench's default k_values, and sparse_probing_sae_probes' default ks
MAX_ITER = 1000
SAEBENCH_C = 1.0
SAE_PROBES_CS = tuple(float(c) for c in np.logspace(5, -5, 10))
SAE_PROBES_MAX_TRAIN = 1024  # min(dataset size - 100, 1024) in the normal setting
SAE_PROBES_EPS = 1e-6

DEFINITIONS = {
    "sparse_probing": "k-sparse probing (evals/sparse_probing.py): per labelled set (TPP's) and class, a binary "
                      "class-vs-others probe on k SAE latents chosen on the training texts; means over classes, "
                      "then sets; 95% bootstrap intervals over test texts; random-SAE nulls scored on the same texts",
    "sparse_probing.saebench_top_k_accuracy": "SAEBench: latents mean-pooled over real tokens, top k by |mean_pos - "
                                              "mean_neg| on training texts, LogisticRegression (L2, C=1) on them, "
                                              "test accuracy; k in 1, 2, 5",
    "sparse_probing.saebench_sae_accuracy": "the same probe on all pooled latents",
    "sparse_probing.saebench_llm_accuracy": "reference: TPP's clean probe on mean-pooled model activations (L1, C "
                                            "chosen on validation)",
    "sparse_probing.sae_probes_top_k_auc": "sae-probes (Kantamneni et al. 2025): latents of the last real token, "
                                           "top k by |mean_pos - mean_neg| of columns divided by their mean where "
                                           "nonzero, L1 LogisticRegression (saga) with C chosen by validation AUC "
                                           "inside <= 1024 balanced training texts, test ROC AUC (_accuracy: test "
                                           "accuracy)",
    "sparse_probing.sae_probes_llm_auc": "reference: sae-probes' L2 logistic-regression baseline on the model's "
                                         "last-token activations",
}


# ---------------------------------------------------------------------------------------------------------------
# Latent selection and features


def top_k_by_mean_difference(X: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k columns of X [n, d] with the largest |mean over y == 1 - mean over y == 0|, largest first (ties: lower
    index first). SAEBench `get_top_k_mean_diff_mask`, sae-probes `get_sorted_indices`."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    if not 1 <= k <= X.shape[1]:
        raise ValueError(f"k={k} must be in 1..{X.shape[1]} (the number of latents)")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError(f"labels must hold both 0 and 1, got {np.unique(y).tolist()}")
    difference = np.abs(X[y == 1].mean(0) - X[y == 0].mean(0))
    return np.argsort(-difference, kind="stable")[:k]


def nonzero_mean_normalised(X: np.ndarray) -> np.ndarray:
    """Each column divided by its mean |value| over the rows where it is nonzero (sae-probes
    `mean_act_normalization`: sum |x| / (nonzero count + 1e-6), then X / (that + 1e-6)); a dead column stays 0."""
    X = np.asarray(X, dtype=np.float64)
    means = np.abs(X).sum(0) / ((X != 0).sum(0) + SAE_PROBES_EPS)
    return X / (means + SAE_PROBES_EPS)


def last_tokens(tokens: TokenActivations) -> Tensor:
    """The activation at each text's last real token [n, d]; zeros for a text without one."""
    out = torch.zeros(len(tokens), tokens.acts.shape[-1], dtype=tokens.acts.dtype)
    has = tokens.counts > 0
    out[has] = tokens.acts[tokens.offsets[1:][has] - 1]
    return out


def last_token_latents(tokens: TokenActivations, sae: SAEWeights, batch: int = 4096) -> Tensor:
    """SAE latents of each text's last real token [n, d_sae] (float32, CPU)."""
    x = last_tokens(tokens)
    with torch.no_grad():
        return torch.cat([sae.encode(x[i:i + batch].to(sae.W_enc.device)).float().cpu()
                          for i in range(0, len(x), batch)]) if len(x) else torch.zeros(0, sae.d_sae)


# ---------------------------------------------------------------------------------------------------------------
# Probes


def _logistic(C: float, l1: bool, seed: int | None) -> LogisticRegression:
    if not l1:
        return LogisticRegression(C=C, max_iter=MAX_ITER, random_state=seed)
    # scikit-learn 1.8 deprecates penalty="l1" for l1_ratio=1; older versions need penalty.
    if tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 8):
        return LogisticRegression(C=C, l1_ratio=1.0, solver="saga", max_iter=MAX_ITER, random_state=seed)
    return LogisticRegression(C=C, penalty="l1", solver="saga", max_iter=MAX_ITER, random_state=seed)


@dataclass
class ProbeScore:
    """One probe's test predictions: per test row right or not, its P(class 1), and what was chosen."""

    correct: np.ndarray
    scores: np.ndarray
    latents: list[int] | None = None
    C: float | None = None
    val_auc: float | None = None

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def auc(self, y: np.ndarray) -> float:
        return float(weighted_auc(self.scores, y))


def saebench_probe(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray) -> ProbeScore:
    """SAEBench's `train_sklearn_probe`: L2 logistic regression, C = 1, on the raw features."""
    probe = _logistic(SAEBENCH_C, l1=False, seed=None).fit(np.asarray(X_train, np.float64), y_train)
    X_test = np.asarray(X_test, np.float64)
    return ProbeScore(probe.predict(X_test) == np.asarray(y_test), probe.predict_proba(X_test)[:, 1], C=SAEBENCH_C)


def cv_splits(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """sae-probes `get_cv` + `get_splits`: leave-2-out for n <= 12 and a stratified 6-fold split shuffled with `seed`
    for n < 128 (keeping only validation folds with both classes), else all but the last min(0.2 n, 100) rows."""
    n = len(y)
    if n >= 128:
        held = min(int(0.2 * n), 100)
        return [(np.arange(n - held), np.arange(n - held, n))]
    cv = LeavePOut(2) if n <= 12 else StratifiedKFold(n_splits=6, shuffle=True, random_state=seed)
    return [(tr, va) for tr, va in cv.split(np.zeros((n, 1)), y) if len(np.unique(y[va])) == 2]


def find_best_reg(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, l1: bool,
                  seed: int) -> ProbeScore:
    """sae-probes `find_best_reg`: C of largest mean validation ROC AUC over `cv_splits` (first on ties), then a refit
    on all training rows in a RandomState(seed) order; default C when there are <= 3 training rows."""
    X_train, X_test = np.asarray(X_train, np.float64), np.asarray(X_test, np.float64)
    y_train = np.asarray(y_train)
    best_C, val_auc = None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if len(y_train) > 3:
            splits = cv_splits(y_train, seed)
            means = [np.mean([_fold_auc(X_train, y_train, tr, va, C, l1, seed) for tr, va in splits])
                     for C in SAE_PROBES_CS]
            best_C, val_auc = SAE_PROBES_CS[int(np.argmax(means))], float(np.max(means))
        order = np.random.RandomState(seed).permutation(len(y_train))
        probe = _logistic(1.0 if best_C is None else best_C, l1, seed).fit(X_train[order], y_train[order])
    return ProbeScore(probe.predict(X_test) == np.asarray(y_test), probe.predict_proba(X_test)[:, 1],
                      C=probe.C, val_auc=val_auc)


def _fold_auc(X: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, C: float, l1: bool,
              seed: int) -> float:
    if len(np.unique(y[train])) < 2:
        return 0.5  # sae-probes: a neutral score for a single-class training fold
    probe = _logistic(C, l1, seed).fit(X[train], y[train])
    return float(weighted_auc(probe.predict_proba(X[val])[:, 1], y[val]))


# ---------------------------------------------------------------------------------------------------------------
# Weighted AUC (bootstrap replicates of a ROC AUC)


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float | np.ndarray:
    """ROC AUC of `scores` for binary `labels`, each row counted `weights[b, i]` times in replicate b ([B, n];
    None: once, giving sklearn's `roc_auc_score`): the weighted Mann-Whitney statistic, ties counting one half.
    A replicate without a positive or a negative gives NaN."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    single = weights is None
    w = np.ones((1, len(scores))) if single else np.asarray(weights, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # first sorted position of each distinct score
    group = np.empty(len(scores), dtype=np.int64)
    group[order] = np.cumsum(np.r_[True, ranked[1:] != ranked[:-1]]) - 1
    ends = np.r_[starts[1:], len(scores)]
    negative = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(w[:, order] * ~labels[order], axis=1)], axis=1)
    below, through = negative[:, starts], negative[:, ends]
    wins = below + 0.5 * (through - below)  # negatives below each score, ties halved
    pos = np.flatnonzero(labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (w[:, pos] * wins[:, group[pos]]).sum(1) / (w[:, pos].sum(1) * negative[:, -1])
    return float(auc[0]) if single else auc


# ---------------------------------------------------------------------------------------------------------------
# Tasks: one binary task per class of a labelled set


@dataclass
class ClassTask:
    """Class `name` against the others: text indices and labels (1 = the class) of its training and test rows, and
    the test rows' positions in the set's test split (the bootstrap units)."""

    name: str
    train: np.ndarray
    y_train: np.ndarray
    test: np.ndarray
    y_test: np.ndarray
    test_positions: np.ndarray


@dataclass
class SetReferences:
    """What a set's sparse probing shares between SAEs: its tasks (SAEBench's; sae-probes' smaller training sets)
    and the model-probe references."""

    tasks: list[ClassTask]
    small_tasks: list[ClassTask]
    llm: dict[str, list[ProbeScore]]  # reference key -> per class


def class_tasks(data: LabelledSet, probes: TppProbes) -> list[ClassTask]:
    """One task per class from TPP's probe rows (positives, then the drawn negatives)."""
    position = np.full(len(data.texts), -1)
    test_split = data.splits["test"]
    position[test_split] = np.arange(len(test_split))
    tasks = []
    for name, rows in zip(probes.class_names, probes.rows, strict=True):
        (tr_pos, tr_neg), (te_pos, te_neg) = rows["train"], rows["test"]
        test = np.concatenate([te_pos, te_neg])
        tasks.append(ClassTask(name, np.concatenate([tr_pos, tr_neg]), _labels(len(tr_pos), len(tr_neg)), test,
                               _labels(len(te_pos), len(te_neg)), position[test]))
    return tasks


def _labels(n_pos: int, n_neg: int) -> np.ndarray:
    return np.concatenate([np.ones(n_pos, dtype=np.int64), np.zeros(n_neg, dtype=np.int64)])


def small_task(task: ClassTask, seed: int, max_train: int = SAE_PROBES_MAX_TRAIN) -> ClassTask:
    """sae-probes' training set: at most `max_train` of the task's training rows, ceil(half) positives, drawn and
    ordered with RandomState(seed) in the manner of its `get_train_test_indices`; the test rows unchanged."""
    rng = np.random.RandomState(seed)
    pos, neg = task.train[task.y_train == 1], task.train[task.y_train == 0]
    n = min(max_train, len(task.train))
    n_pos = min(math.ceil(n / 2), len(pos))
    n_neg = min(n - n_pos, len(neg))
    rows = np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])
    y = _labels(n_pos, n_neg)
    order = rng.permutation(len(rows))
    return ClassTask(task.name, rows[order], y[order], task.test, task.y_test, task.test_positions)


def fit_references(tokens: TokenActivations, data: LabelledSet, seed: int, pooled: Tensor | None = None,
                   probes: TppProbes | None = None) -> SetReferences:
    """The SAE-independent part of a set: its tasks and model-probe references (fit once, reused for every SAE)."""
    _check(tokens, data)
    pooled = tokens.pooled() if pooled is None else pooled
    probes = fit_tpp_probes(pooled, data, seed) if probes is None else probes
    tasks = class_tasks(data, probes)
    small = [small_task(t, seed) for t in tasks]
    last = last_tokens(tokens).double().numpy()
    llm_saebench = []
    for probe, task, correct in zip(probes.probes, tasks, probes.correct or [None] * len(tasks), strict=True):
        X = pooled[task.test].double().numpy()
        right = probe.predict(X) == task.y_test if correct is None else np.asarray(correct)
        llm_saebench.append(ProbeScore(right, probe.predict_proba(X)[:, 1], C=probe.C_))
    llm_probes = [find_best_reg(last[t.train], t.y_train, last[t.test], t.y_test, l1=False, seed=seed) for t in small]
    return SetReferences(tasks, small, {"saebench_llm": llm_saebench, "sae_probes_llm": llm_probes})


def _check(tokens: TokenActivations, data: LabelledSet) -> None:
    if len(tokens) != len(data.texts):
        raise ValueError(f"tokens hold {len(tokens)} texts, the set {len(data.texts)}: compute them from data.texts")
    if "classes" not in data.roles or any(s not in data.splits for s in ("train", "validation", "test")):
        raise ValueError(f"sparse probing needs a class-labelled set (role 'classes', splits train / validation / "
                         f"test); got roles {data.roles}, splits {sorted(data.splits)}")


# ---------------------------------------------------------------------------------------------------------------
# One SAE on one set


def sparse_probing_from_activations(tokens: TokenActivations, data: LabelledSet, sae: SAEWeights,
                                    refs: SetReferences, k_values: Sequence[int] = K_VALUES, seed: int = 42,
                                    all_latents: bool = True) -> dict[str, Any]:
    """Both variants for `sae` on one set (tokens row i = data.texts[i]); `refs` from `fit_references`."""
    ks = [int(k) for k in k_values]
    if not ks or not all(1 <= k <= sae.d_sae for k in ks):
        raise ValueError(f"k_values {ks} must be in 1..d_sae={sae.d_sae}")
    rows = np.unique(np.concatenate([np.concatenate([t.train, t.test]) for t in refs.tasks]))
    place = np.full(len(data.texts), -1)
    place[rows] = np.arange(len(rows))
    chosen = tokens.select(rows)
    pooled = pooled_latents(chosen, sae).double().numpy()
    last = last_token_latents(chosen, sae).double().numpy()
    scores: dict[str, list[ProbeScore]] = {}
    for task, small in zip(refs.tasks, refs.small_tasks, strict=True):
        for key, score in _task_scores(pooled, last, place, task, small, ks, all_latents, seed).items():
            scores.setdefault(key, []).append(score)
    scores.update(refs.llm)
    return _set_result(scores, refs, ks, data, seed)


def _task_scores(pooled: np.ndarray, last: np.ndarray, place: np.ndarray, task: ClassTask, small: ClassTask,
                 ks: Sequence[int], all_latents: bool, seed: int) -> dict[str, ProbeScore]:
    out = {}
    X_train, X_test = pooled[place[task.train]], pooled[place[task.test]]
    for k in ks:
        latents = top_k_by_mean_difference(X_train, task.y_train, k)
        out[f"saebench_top_{k}"] = saebench_probe(X_train[:, latents], task.y_train, X_test[:, latents], task.y_test)
        out[f"saebench_top_{k}"].latents = latents.tolist()
    if all_latents:
        out["saebench_sae"] = saebench_probe(X_train, task.y_train, X_test, task.y_test)
    L_train, L_test = last[place[small.train]], last[place[small.test]]
    ranked = top_k_by_mean_difference(nonzero_mean_normalised(L_train), small.y_train, max(ks))
    for k in ks:
        latents = ranked[:k]
        out[f"sae_probes_top_{k}"] = find_best_reg(L_train[:, latents], small.y_train, L_test[:, latents],
                                                   small.y_test, l1=True, seed=seed)
        out[f"sae_probes_top_{k}"].latents = latents.tolist()
    return out


def _set_result(scores: dict[str, list[ProbeScore]], refs: SetReferences, ks: list[int], data: LabelledSet,
                seed: int) -> dict[str, Any]:
    labels = [t.y_test for t in refs.tasks]
    metrics: dict[str, float] = {}
    units: dict[str, Any] = {"rows": [t.test_positions for t in refs.tasks], "labels": labels, "correct": {},
                             "scores": {}, "reference": {}}
    for key, per_class in scores.items():
        acc, where = f"{key}_accuracy", ("reference" if key.endswith("_llm") else "correct")
        metrics[acc] = float(np.mean([s.accuracy for s in per_class]))
        units[where][acc] = [s.correct for s in per_class]
        if key.startswith("sae_probes"):
            auc = f"{key}_auc"
            metrics[auc] = float(np.mean([s.auc(y) for s, y in zip(per_class, labels, strict=True)]))
            units["reference" if key.endswith("_llm") else "scores"][auc] = [s.scores for s in per_class]
    per_class = {t.name: {key: _detail(s[i], t.y_test) for key, s in scores.items()}
                 for i, t in enumerate(refs.tasks)}
    return {"metrics": metrics, "k_values": ks, "classes": [t.name for t in refs.tasks], "per_class": per_class,
            "n_texts": {name: len(rows) for name, rows in data.splits.items()},
            "n_train": {"saebench": len(refs.tasks[0].train), "sae_probes": len(refs.small_tasks[0].train)},
            "dataset": data.description, "seed": seed, UNITS: units}


def _detail(score: ProbeScore, y: np.ndarray) -> dict[str, Any]:
    out = {"accuracy": score.accuracy, "auc": score.auc(y), "C": score.C}
    if score.latents is not None:
        out["latents"] = score.latents
    if score.val_auc is not None:
        out["val_auc"] = score.val_auc
    return out


# ---------------------------------------------------------------------------------------------------------------
# Over sets, intervals and the bootstrap of evals/baseline.py


def over_sets(sets: dict[str, dict], seed: int) -> dict[str, Any]:
    """One group result from per-set results: each metric's mean over the sets, with the references' intervals."""
    keys = sorted({k for r in sets.values() for k in r["metrics"]})
    result: dict[str, Any] = {k: float(np.mean([r["metrics"][k] for r in sets.values() if k in r["metrics"]]))
                              for k in keys}
    result.update(k_values=sorted({k for r in sets.values() for k in r["k_values"]}), n_sets=len(sets),
                  set_names=list(sets), sets=sets)
    reference_intervals(result, seed)
    return result


def _unit_sizes(result: dict) -> dict[str, int]:
    return {name: int(r["n_texts"]["test"]) for name, r in (result.get("sets") or {}).items()
            if r.get(UNITS) is not None}


def set_replicates(units: dict, weights: np.ndarray | None, part: tuple[str, str] = ("correct", "scores")
                   ) -> dict[str, Any]:
    """One set's values (weights None) or replicates [B] under weights [B, n_test]: per key, the mean over classes of
    each task's weighted accuracy (from "correct") or weighted AUC (from "scores") over its own test rows."""
    rows = [np.asarray(r, dtype=np.int64) for r in units["rows"]]
    labels = [np.asarray(y) for y in units["labels"]]
    out: dict[str, Any] = {}
    accuracy, auc = part
    for key, per_class in (units.get(accuracy) or {}).items():
        if key.endswith("_accuracy"):
            out[key] = np.mean([np.mean(np.asarray(c, np.float64)) if weights is None else
                                weighted_means(np.asarray(c, np.float64), weights[:, r])
                                for c, r in zip(per_class, rows, strict=True)], axis=0)
    for key, per_class in (units.get(auc) or {}).items():
        if key.endswith("_auc"):
            out[key] = np.mean([weighted_auc(s, y, None if weights is None else weights[:, r])
                                for s, y, r in zip(per_class, labels, rows, strict=True)], axis=0)
    return out


def _replicate(result: dict, weights: dict[str, np.ndarray] | None, part: tuple[str, str] = ("correct", "scores")
               ) -> dict[str, Any]:
    by_key: dict[str, list] = {}
    for name, r in (result.get("sets") or {}).items():
        if r.get(UNITS) is not None:
            for key, v in set_replicates(r[UNITS], None if weights is None else weights[name], part).items():
                by_key.setdefault(key, []).append(v)
    return {key: np.mean(vs, axis=0) for key, vs in by_key.items()}


def reference_intervals(result: dict, seed: int) -> None:
    """95% bootstrap intervals of the model-probe references (the same weights `evals.baseline` gives the SAE
    numbers); they take no null comparison, since they do not depend on the SAE."""
    sizes = _unit_sizes(result)
    if not sizes:
        return
    reps = _replicate(result, unit_weights(sizes, seed), part=("reference", "reference"))
    result.setdefault("intervals", {}).update({k: percentile_interval(v) for k, v in reps.items()})


BOOTSTRAP = Bootstrap(units=_unit_sizes, replicate=_replicate)
