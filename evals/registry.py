"""The metric groups of `vsae eval`, one registry entry each (shaped like `vsae.variants.VARIANTS`).

A group declares what it needs (`stream`: the one pass over held-out cache rows, which gives every group the
core sums, the firing counts and a sample of codes; `model`: the language model, for splicing and probes), its
definitions (written into eval.json), the function that computes it from an `EvalContext`, and its headlines (the
numbers the compare page's summary ranks runs by, each with its direction of "better"). The driver, the
CLI's choices, the compare page and the study report all read this table; adding a metric is one function
and one `MetricGroup(...)` line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evals import ground_truth as GROUND_TRUTH
from evals import sparse_probing as SPARSE_PROBING
from evals.ablation import DEFINITIONS as ABLATION_DEFINITIONS
from evals.baseline import Bootstrap
from evals.context import EvalContext
from evals.independence import DEFINITIONS as INDEPENDENCE_DEFINITIONS
from evals.scr_tpp import UNITS
from evals.stats import dead_fraction_interval, detectable_density, normal_interval

N_VALUES = (2, 5, 10, 20, 50, 100, 500)


BETTER = {"higher": "higher is better", "lower": "lower is better"}


@dataclass(frozen=True)
class Headline:
    """One number of a group's result that the compare page's summary ranks runs by.

    `key` names it in the result (`{n}` is the summary's chosen N, for metrics measured at several N), inside the
    sub-dict `section` when given (SCR/TPP keep their per-N scores under "metrics"). `better` is "higher",
    "lower", or None for a number that has no better direction (`why` then says so, e.g. L0 is set by k).

    Intervals: a result may carry `result["intervals"][key] = [lo, hi]` (same key as the value, `{n}` filled in, at
    the result's top level whatever `section` is), e.g. a 95% bootstrap interval. The summary calls a difference
    from the best run not significant where the two intervals overlap, and says that significance was not
    assessed where either interval is missing.
    """

    label: str
    key: str
    better: str | None
    section: str | None = None
    why: str = ""

    def name(self, n: int) -> str:
        return self.key.format(n=n)

    def title(self, n: int) -> str:
        return self.label.format(n=n)

    def read(self, result: dict, n: int) -> tuple[float | None, tuple[float, float] | None]:
        """(value, interval) of this headline in one run's group result; None where absent or not a finite
        number."""
        where = result.get(self.section) if self.section else result
        value = _number(where.get(self.name(n)) if isinstance(where, dict) else None)
        intervals = result.get("intervals")
        pair = intervals.get(self.name(n)) if isinstance(intervals, dict) else None
        interval = None
        if isinstance(pair, list | tuple) and len(pair) == 2:
            lo, hi = _number(pair[0]), _number(pair[1])
            interval = (lo, hi) if lo is not None and hi is not None and lo <= hi else None
        return value, interval


    def null(self, result: dict, n: int) -> dict | None:
        """The run's comparison with its random-SAE nulls for this number (evals/baseline.py), if measured."""
        nulls = result.get("null")
        entry = nulls.get(self.name(n)) if isinstance(nulls, dict) else None
        return entry if isinstance(entry, dict) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
        return None
    return float(value)


@dataclass(frozen=True)
class MetricGroup:
    """One eval.json metric group: what it needs, what it means, how it is computed and shown."""

    name: str
    compute: Callable[[EvalContext], dict[Path, dict]]
    definitions: dict[str, str]
    needs: frozenset[str] = frozenset()
    # Rows of dense codes the group reads from the stream pass's sample (the first held-out rows).
    sample_rows: Callable[[Any], int] | None = None
    # (column, key) pairs of this group's result for the one-line-per-run tables (CLI, study report).
    columns: tuple[tuple[str, str], ...] = ()
    # The rows this group contributes to the compare page's metric table; None keeps it off the table.
    compare_rows: Callable[[dict], list[tuple[str, Any]]] | None = None
    # The study report's (paper-style) columns from this group's result.
    paper: Callable[[dict], dict[str, Any]] | None = None
    # What the group's numbers were measured on ("CE score on 8,000 held-out next-token positions"), from its
    # result and the eval settings; the study report states it.
    measured: Callable[[dict, dict], list[str]] = field(default=lambda result, settings: [])
    # The group's rows of the compare page's summary ("which run is better"), in display order.
    headlines: tuple[Headline, ...] = ()
    # Null-aware groups score the random-SAE nulls too (`EvalContext.subjects`); `null_settings` names the
    # EvalConfig fields their null results depend on (the null store's key).
    nulls: bool = False
    null_settings: tuple[str, ...] = ()
    # Units and replicates for bootstrap intervals and paired null comparisons (evals/baseline.py) ...
    bootstrap: Bootstrap | None = None
    # ... or, for groups that carry their own intervals, the keys compared with the nulls unpaired.
    unpaired: tuple[str, ...] = ()


# --- group computations (thin: the metrics are tensor functions in their own modules) ---------------------------

def _core(ctx: EvalContext) -> dict[Path | str, dict]:
    subjects = ctx.subjects()
    # A null's reconstruction numbers come from its shorter pass (evals/driver.py): reported, not paired.
    out = {key: {**ctx.stream[key].core, UNITS: {"blocks": ctx.stream[key].blocks if key in ctx.saes else None}}
           for key in subjects}
    if ctx.synthetic:
        for result in out.values():
            result["ce_score"] = None
            result["note"] = "synthetic cache: no model, so no CE/KL scores, ablations or probes"
        return out
    from evals.splice import losses_from_sums, splice_context_sums

    tokens = ctx.contexts()
    sums = splice_context_sums(ctx.model(), ctx.hook, {str(key): sae for key, sae in subjects.items()}, tokens,
                               ctx.special_ids(), mean=ctx.data_mean, device=ctx.cfg.device,
                               progress=ctx.cfg.progress)
    shared = {k: v for k, v in sums.items() if ":" not in k}
    for key in subjects:
        # n_tokens stays the reconstruction metrics' count; the spliced CE/KL report their own.
        out[key].update(losses_from_sums(sums, str(key)), ce_n_tokens=int(sums["n_ce"].sum()),
                        kl_n_tokens=int(sums["n_kl"].sum()), ce_contexts=len(tokens))
        out[key][UNITS]["contexts"] = {**shared, "ce:sae": sums[f"ce:{key}"], "kl:sae": sums[f"kl:{key}"]}
    return out


def _core_units(result: dict) -> dict[str, int]:
    units = result.get(UNITS) or {}
    sizes = {"blocks": len((units.get("blocks") or {}).get("sse", []))}
    if units.get("contexts"):
        sizes["contexts"] = len(units["contexts"]["n_ce"])
    return {k: n for k, n in sizes.items() if n}


def _core_replicates(result: dict, weights: dict | None) -> dict[str, Any]:
    from evals.splice import losses_from_sums

    units = result[UNITS]
    out: dict[str, Any] = {}
    blocks = {k: np.asarray(v, dtype=np.float64) for k, v in (units.get("blocks") or {}).items()}
    if blocks and len(blocks["sse"]):
        w = None if weights is None else weights["blocks"]
        sse, sst = (v.sum() for v in blocks.values()) if w is None else (w @ blocks["sse"], w @ blocks["sst"])
        out["explained_variance"] = 1 - sse / sst
    if units.get("contexts"):
        sums = {k: np.asarray(v, dtype=np.float64) for k, v in units["contexts"].items()}
        losses = losses_from_sums(sums, "sae", None if weights is None else weights["contexts"])
        out.update({k: losses[k] for k in CE_KEYS if k in losses})
    return out


CE_KEYS = ("ce_score", "kl_score", "ce_score_vs_mean_ablation", "kl_score_vs_mean_ablation")


def _density(ctx: EvalContext) -> dict[Path, dict]:
    out = {}
    for run in ctx.saes:
        dens = ctx.stream[run].firing
        result = {k: v for k, v in dens.items() if not torch.is_tensor(v)}
        result["per_latent"] = dens["density"].tolist()
        result["training"] = ctx.training_dead(run)
        n = int(dens["n_tokens"])
        if n > 0:
            result["intervals"] = {"dead_fraction": dead_fraction_interval(dens["counts"].cpu().numpy(), n)}
            result["dead_below_density"] = detectable_density(n)
        ctx.density_figure(run, dens)
        out[run] = result
    return out


def _ablation(ctx: EvalContext) -> dict[Path | str, dict]:
    if ctx.synthetic:
        return {}
    from evals.ablation import latent_ablation_effects

    out = {}
    for key, sae in ctx.subjects().items():
        # A run's own latents when listed; its (and each null's) most frequent ones otherwise.
        latents = (ctx.cfg.latents if ctx.cfg.latents and key in ctx.saes else
                   ctx.top_latents(key, ctx.cfg.ablation_latents))
        effects = latent_ablation_effects(ctx.model(), ctx.hook, sae, ctx.contexts(), latents, ctx.special_ids(),
                                          device=ctx.cfg.device, progress=ctx.cfg.progress)
        out[key] = {"latents": {str(i): v for i, v in effects.items()}, **ablation_summary(effects)}
    return out


def ablation_summary(effects: dict[int, dict]) -> dict[str, Any]:
    """Mean over the ablated latents of their per-firing CE increase and KL, each with a normal 95% interval from
    the latents' own (independent) standard errors."""
    out: dict[str, Any] = {"intervals": {}}
    for key, name in (("ce_increase", "mean_ce_increase"), ("kl", "mean_kl")):
        values = [(e[key], e.get("intervals", {}).get(key)) for e in effects.values()
                  if isinstance(e.get(key), int | float) and np.isfinite(e[key])]
        if not values:
            continue
        out[name] = float(np.mean([v for v, _ in values]))
        if all(i is not None for _, i in values):
            se = np.sqrt(sum(((i[1] - i[0]) / (2 * 1.959964)) ** 2 for _, i in values)) / len(values)
            out["intervals"][name] = normal_interval(out[name], float(se))
    out["n_latents"] = len(effects)
    return out


PROBE_KEYS = {"scr": "scr_metric_threshold_{n}", "tpp": "tpp_threshold_{n}_total_metric"}


def _probe_sets(cfg: Any, task: str) -> list:
    from evals import labelled

    sizes = {"train_size": cfg.labelled_train, "test_size": cfg.labelled_test}
    if cfg.labelled == "real":
        return labelled.real_scr_sets(**sizes) if task == "scr" else labelled.real_tpp_sets(**sizes)
    make = labelled.offline_scr_sets if task == "scr" else labelled.offline_tpp_sets
    return make(seed=cfg.seed, **sizes)


def _probe_group(task: str) -> Callable[[EvalContext], dict[Path | str, dict]]:
    """SCR or TPP over every labelled set (SCR pairs, TPP sets): the model runs once per set over its texts (or
    its activations come from the store beside the cache) and the probes are fitted once; each SAE then only
    encodes the token activations. The headline scores are means over the sets."""

    def compute(ctx: EvalContext) -> dict[Path | str, dict]:
        if ctx.synthetic:
            return {}
        from evals import scr_tpp

        cfg = ctx.cfg
        fit, score = ((scr_tpp.fit_scr_probes, scr_tpp.scr_from_activations) if task == "scr" else
                      (scr_tpp.fit_tpp_probes, scr_tpp.tpp_from_activations))
        subjects = ctx.subjects()
        per_set: dict[Path | str, dict[str, dict]] = {key: {} for key in subjects}
        for data in _probe_sets(cfg, task):
            tokens = ctx.labelled_activations(data)
            pooled = tokens.pooled()
            probes = fit(pooled, data, seed=cfg.seed)
            for key, sae in subjects.items():
                n_values = [n for n in N_VALUES if n <= sae.d_sae]  # SAEBench asserts N <= d_sae
                result = score(tokens, data, sae, n_values, seed=cfg.seed, probes=probes, pooled=pooled)
                per_set[key][data.description["name"]] = {**result, "dataset": data.description}
        return {key: _over_sets(task, sets) for key, sets in per_set.items()}

    return compute


MIN_SCR_GAP = 0.05  # METRICS.md section 6: A_oracle - A_base must leave room for SCR to measure anything


def scr_gap(result: dict) -> float | None:
    """A_oracle - A_base in the direction the SCR score reads (None when the biased probe did not lean either way)."""
    acc = result.get("accuracy") or {}
    if acc.get("base_target") is None or acc["base_target"] == acc.get("base_spurious"):
        return None
    which = "target" if acc["base_target"] < acc["base_spurious"] else "spurious"
    return float(acc[f"oracle_{which}"] - acc[f"base_{which}"])


def _counted(task: str, result: dict) -> bool:
    """Does a set count in the headline mean? An SCR pair whose clean probes leave A_oracle - A_base below
    MIN_SCR_GAP divides noise by almost nothing; it is reported but not averaged (decided from clean probe
    accuracies, never from SAE scores)."""
    if task != "scr":
        return True
    gap = scr_gap(result)
    return gap is not None and gap >= MIN_SCR_GAP


def _over_sets(task: str, sets: dict[str, dict]) -> dict:
    """One SCR/TPP result from per-set results: each metric's mean over the sets that count (`_counted`)."""
    for r in sets.values():
        r["counted"] = _counted(task, r)
    counted = [r for r in sets.values() if r["counted"]]
    keys = {k for r in counted for k in r["metrics"]}
    metrics = {k: _mean_of([r["metrics"].get(k) for r in counted]) for k in sorted(keys)}
    n_values = sorted({n for r in sets.values() for n in r["n_values"]})
    mean_key = "scr_metric_mean" if task == "scr" else "tpp_total_metric_mean"
    return {"metrics": metrics, "n_values": n_values, "n_sets": len(counted), "set_names": list(sets),
            "sets_not_counted": [name for name, r in sets.items() if not r["counted"]] or None,
            mean_key: _mean_of([metrics.get(PROBE_KEYS[task].format(n=n)) for n in n_values]), "sets": sets}


def _mean_of(values: list) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _probe_bootstrap(task: str) -> Bootstrap:
    from evals import scr_tpp

    replicate_one = scr_tpp.scr_replicates if task == "scr" else scr_tpp.tpp_replicates

    def units(result: dict) -> dict[str, int]:
        return {name: int(r["n_texts"]["test"]) for name, r in (result.get("sets") or {}).items()
                if r.get(UNITS) is not None and r.get("counted", True)}

    def replicate(result: dict, weights: dict | None) -> dict[str, Any]:
        by_n: dict[int, list] = {}
        for name, r in result["sets"].items():
            if r.get(UNITS) is not None and r.get("counted", True):
                for n, v in replicate_one(r, None if weights is None else weights[name]).items():
                    by_n.setdefault(int(n), []).append(v)
        return {PROBE_KEYS[task].format(n=n): np.mean(vs, axis=0) for n, vs in by_n.items()}

    return Bootstrap(units, replicate)


INDEPENDENCE_BOOT = 200  # replicates: ~70 ms each at 20k rows x 8192 latents, and the nulls pay it too


def _independence(ctx: EvalContext) -> dict[Path | str, dict]:
    from evals.independence import independence_stats

    out = {}
    for key, sae in ctx.subjects().items():
        sample = ctx.stream[key].sample
        # A fixed sample size (recorded as n_tokens): fewer only where the held-out split has fewer rows.
        n = min(ctx.cfg.independence_tokens, sample.shape[0])
        out[key] = independence_stats(sample, sae.W_dec, seed=ctx.cfg.seed, n_tokens=n, n_boot=INDEPENDENCE_BOOT)
    return out


def _sparse_probing(ctx: EvalContext) -> dict[Path | str, dict]:
    """k-sparse probing on TPP's labelled sets (evals/sparse_probing.py): per set, the model's activations (from the
    store beside the cache) and the SAE-independent tasks and model probes once; then each SAE's latents."""
    if ctx.synthetic:
        return {}
    seed = ctx.cfg.seed
    subjects = ctx.subjects()
    per_set: dict[Path | str, dict[str, dict]] = {key: {} for key in subjects}
    for data in _probe_sets(ctx.cfg, "tpp"):
        tokens = ctx.labelled_activations(data)
        refs = SPARSE_PROBING.fit_references(tokens, data, seed)
        for key, sae in subjects.items():
            ks = [k for k in SPARSE_PROBING.K_VALUES if k <= sae.d_sae]
            per_set[key][data.description["name"]] = SPARSE_PROBING.sparse_probing_from_activations(
                tokens, data, sae, refs, ks, seed=seed)
    return {key: SPARSE_PROBING.over_sets(sets, seed) for key, sets in per_set.items()}


def _ground_truth(ctx: EvalContext) -> dict[Path | str, dict]:
    from evals.ground_truth import ground_truth_group

    return ground_truth_group(ctx)


def _tsne(ctx: EvalContext) -> dict[Path, dict]:
    from evals.tsne import activation_tsne, decoder_tsne, joint_decoder_tsne

    out: dict[Path, dict] = {}
    for run, sae in ctx.saes.items():
        density = ctx.stream[run].firing["density"]
        maps = {"activations": activation_tsne(ctx.stream[run].sample),
                "decoder": decoder_tsne(sae.W_dec, density > 0, density)}
        out[run] = {name: ctx.tsne_files(run, name, m) for name, m in maps.items()}
    runs = list(ctx.saes)
    widths = {ctx.saes[r].d_sae for r in runs}
    if len(runs) > 1 and len({ctx.saes[r].d_in for r in runs}) == 1 and len(widths) == 1:
        joint = joint_decoder_tsne({r.name: (ctx.saes[r].W_dec, ctx.stream[r].firing["density"] > 0) for r in runs})
        title = "decoder rows of " + ", ".join(r.name for r in runs)
        for run in runs:
            # The coordinates carry each point's run label; compare pages draw the map from them.
            out[run]["joint"] = {**ctx.tsne_files(run, "joint", joint, title), "runs": [str(r) for r in runs],
                                 "d_sae": sorted(widths)}
    return out


# --- how groups show on pages ---------------------------------------------------------------------------------

def _scalars(result: dict) -> list[tuple[str, Any]]:
    """Top-level scalars and one level of nested scalars ("a.b"), as the compare page lists them."""
    out = []
    for k, v in result.items():
        if isinstance(v, dict):
            out += [(f"{k}.{k2}", v2) for k2, v2 in v.items() if not isinstance(v2, dict | list)]
        elif not isinstance(v, list):
            out.append((k, v))
    return out


def _probe_rows(result: dict) -> list[tuple[str, Any]]:
    """SCR/TPP: the score at each N and the means, not probe accuracies or rankings."""
    top = [(k, v) for k, v in result.items() if not isinstance(v, dict | list)]
    return top + [(k, v) for k, v in (result.get("metrics") or {}).items() if not isinstance(v, dict | list)]


def _probe_columns(task: str, key: str) -> Callable[[dict], dict[str, Any]]:
    def columns(result: dict) -> dict[str, Any]:
        return {f"{task}_{n}": result.get("metrics", {}).get(key.format(n)) for n in result.get("n_values", [])}

    return columns


def _on(*parts: tuple[str, Any, str]) -> list[str]:
    return [f"{what} on {n} {unit}" for what, n, unit in parts if n is not None]


CORE_DEFINITIONS = {
    "l0": "mean over eval tokens of the number of nonzero latents",
    "mse": "mean over eval tokens of ||x - x_hat||^2 summed over dimensions, in raw activation units (SAELens)",
    "explained_variance": "global: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all eval tokens, float64",
    "explained_variance_legacy": "SAELens/SAEBench per-token form (see evals/metrics.py)",
    "cosine_similarity": "mean over tokens of cos(x, x_hat)",
    "relative_reconstruction_bias": "SAELens: mean ||x_hat||^2 / mean <x, x_hat>, averaged over batches",
    "ce_score": "(CE_zero - CE_sae) / (CE_zero - CE_clean); each CE a global mean of next-token CE over positions "
                "whose input token is not special; x_hat spliced at the hook (special positions left unreplaced); "
                "CE_zero with the hook's activation zeroed",
    "kl_score": "(KL_zero - KL_sae) / KL_zero, KL of the spliced next-token distribution to the clean one",
    "ce_mean_ablation": "CE with the hook's activation replaced by the data mean at every position (a gentler "
                        "baseline than zeros); kl_mean_ablation likewise",
    "ce_score_vs_mean_ablation": "(CE_mean - CE_sae) / (CE_mean - CE_clean): the CE score against mean ablation; "
                                 "kl_score_vs_mean_ablation likewise",
    "intervals": "95% percentile intervals over 1000 bootstrap replicates: CE/KL scores over the evaluated contexts, "
                 "explained variance over blocks of 128 consecutive held-out rows, SCR/TPP over test texts; dead "
                 "fraction: binomial over tokens (evals/stats.py dead_fraction_interval)",
    "null": "per headline number: the run against random SAEs of the same d_sae and k (evals/null.py) scored on "
            "the same rows, contexts and texts: trained, null mean / std / values, trained - null mean with a 95% "
            "paired bootstrap interval (the same resampled units for both), includes_zero: whether the metric "
            "failed to separate this run from a random SAE",
}

def _probe_metric_group(task: str, label: str, what: str, key: str) -> MetricGroup:
    """SCR or TPP: the same shape of entry, scored at each N under `key` (with `{n}`) in the result's metrics."""
    return MetricGroup(
        task, _probe_group(task), {task: f"{what}, probes selected on a validation split; the headline scores are "
                                         f"means over the labelled sets (SCR: over the pairs whose A_oracle - "
                                         f"A_base >= {MIN_SCR_GAP}; the others are reported, not averaged)"},
        frozenset({"model"}), compare_rows=_probe_rows, paper=_probe_columns(task, key.replace("{n}", "{}")),
        measured=lambda r, s: _on((label, s.get("labelled_test"), "labelled test texts per set"),
                                  ("sets averaged", r.get("n_sets"), "labelled sets")),
        headlines=(Headline(f"{label} at N={{n}}", key, "higher", section="metrics"),),
        nulls=True, null_settings=("labelled", "labelled_train", "labelled_test", "seed"),
        bootstrap=_probe_bootstrap(task))


GROUPS = (
    MetricGroup(
        "core", _core, CORE_DEFINITIONS, frozenset({"stream", "model"}),
        columns=(("l0", "l0"), ("explained_variance", "explained_variance"), ("mse", "mse"),
                 ("ce_score", "ce_score"), ("kl_score", "kl_score")),
        compare_rows=_scalars,
        paper=lambda r: {"explained_variance": r.get("explained_variance"), "ce_score": r.get("ce_score"),
                         "l0": r.get("l0")},
        measured=lambda r, s: _on(("explained variance and L0", r.get("n_tokens"), "held-out activation rows"),
                                  ("CE score", r.get("ce_n_tokens"), "held-out next-token positions")),
        nulls=True, null_settings=("tokens", "ce_contexts"), bootstrap=Bootstrap(_core_units, _core_replicates),
        headlines=(Headline("explained variance", "explained_variance", "higher"),
                   Headline("CE score", "ce_score", "higher"),
                   Headline("L0", "l0", None, why="no better direction: L0 is set by k (TopK), not a measure of "
                                                  "quality"))),
    MetricGroup(
        "density", _density,
        {"dead_fraction": "fraction of latents that never fire on the N eval tokens (N reported); a latent called "
                          "dead has, at 95% confidence, a density below dead_below_density = -ln(0.05) / N "
                          "(about 3 / N): rarer latents cannot be told from dead ones on N tokens",
         "dense_fraction": "fraction of latents with eval density > 0.1"},
        frozenset({"stream"}),
        columns=(("dead_fraction", "dead_fraction"), ("dense_fraction", "dense_fraction")),
        compare_rows=_scalars, paper=lambda r: {"alive": 1 - r["dead_fraction"]},
        measured=lambda r, s: _on(("fraction alive", r.get("n_tokens"), "held-out activation rows")),
        headlines=(Headline("dead fraction", "dead_fraction", "lower"),)),
    MetricGroup(
        "ablation", _ablation,
        {"ablation": "per latent i: on contexts where i fires, remove z_i * W_dec[i] from the spliced "
                     "reconstruction; mean increase of next-token CE and mean KL to the unablated spliced output over "
                     "the positions where i fires (evals/ablation.py)",
         "ablation.mean_ce_increase": "mean over the ablated latents of their per-firing CE increase (mean_kl "
                                      "likewise), normal 95% interval from the latents' standard errors",
         **{f"ablation.{k}": v for k, v in ABLATION_DEFINITIONS.items()}},
        frozenset({"stream", "model"}), compare_rows=lambda r: [(k, v) for k, v in r.items()
                                                                 if isinstance(v, int | float)],
        nulls=True, null_settings=("ablation_latents", "ce_contexts"), unpaired=("mean_ce_increase", "mean_kl")),
    _probe_metric_group("tpp", "TPP", "SAEBench targeted probe perturbation (METRICS.md section 5)",
                        "tpp_threshold_{n}_total_metric"),
    _probe_metric_group("scr", "SCR", "SAEBench spurious correlation removal (METRICS.md section 4)",
                        "scr_metric_threshold_{n}"),
    MetricGroup(
        "sparse_probing", _sparse_probing, SPARSE_PROBING.DEFINITIONS, frozenset({"model"}),
        columns=(("sp_top1", "saebench_top_1_accuracy"), ("sp_auc1", "sae_probes_top_1_auc")),
        compare_rows=_scalars,
        paper=lambda r: {"sparse_probing_top1": r.get("saebench_top_1_accuracy"),
                         "sae_probes_top1_auc": r.get("sae_probes_top_1_auc")},
        measured=lambda r, s: _on(("k-sparse probing", s.get("labelled_test"), "labelled test texts per set"),
                                  ("sets averaged", r.get("n_sets"), "labelled sets")),
        headlines=(Headline("sparse probing: top-1 accuracy (SAEBench)", "saebench_top_1_accuracy", "higher"),
                   Headline("sparse probing: top-5 accuracy (SAEBench)", "saebench_top_5_accuracy", "higher"),
                   Headline("sparse probing: top-1 AUC (sae-probes)", "sae_probes_top_1_auc", "higher"),
                   Headline("sparse probing: top-5 AUC (sae-probes)", "sae_probes_top_5_auc", "higher")),
        nulls=True, null_settings=("labelled", "labelled_train", "labelled_test", "seed"),
        bootstrap=SPARSE_PROBING.BOOTSTRAP),
    MetricGroup(
        "independence", _independence,
        {"independence": "dependence between latents on a fixed number of held-out tokens (independence_tokens), "
                         "above the noise floor of a column-permutation null (evals/independence.py)",
         **{f"independence.{k}": v for k, v in INDEPENDENCE_DEFINITIONS.items()}},
        frozenset({"stream"}), sample_rows=lambda cfg: cfg.independence_tokens, compare_rows=_scalars,
        nulls=True, null_settings=("independence_tokens", "seed"), unpaired=("mean_abs_rho_excess",),
        headlines=(Headline("independence: mean |rho| above the permutation null", "mean_abs_rho_excess", "lower"),
                   )),
    MetricGroup(
        "ground_truth", _ground_truth, GROUND_TRUTH.DEFINITIONS, frozenset(),
        columns=(("mcc", "mcc"), ("gt_f1", "f1")), compare_rows=_scalars,
        paper=lambda r: {"mcc": r.get("mcc"), "gt_f1": r.get("f1")},
        measured=lambda r, s: _on(("ground-truth MCC and F1", r.get("n_rows"), "held-out synthetic rows")),
        headlines=(Headline("ground truth: MCC", "mcc", "higher"), Headline("ground truth: F1", "f1", "higher"),
                   Headline("ground truth: uniqueness", "uniqueness", "higher"),
                   Headline("ground truth: shrinkage", "shrinkage", None,
                            why="1 is ideal: below 1 the SAE shrinks magnitudes, above it inflates them")),
        nulls=True, null_settings=("tokens",), bootstrap=GROUND_TRUTH.BOOTSTRAP),
    MetricGroup(
        "tsne", _tsne,
        {"tsne": "activations: latents active on > 1% of tokens, z-scored profiles, Euclidean; decoder: unit "
                 "decoder rows of alive latents, cosine metric, PCA init"},
        frozenset({"stream"}), sample_rows=lambda cfg: cfg.tsne_tokens),
)
METRIC_GROUPS: dict[str, MetricGroup] = {g.name: g for g in GROUPS}
METRICS = tuple(METRIC_GROUPS)


def definitions() -> dict[str, str]:
    """Every group's definitions, in registry order (eval.json's `definitions`)."""
    return {k: v for g in GROUPS for k, v in g.definitions.items()}


def paper_row(metrics: dict) -> dict[str, Any]:
    """The study report's columns of one eval.json `metrics` block, group by group in registry order."""
    row: dict[str, Any] = {}
    for g in GROUPS:
        if g.paper and isinstance(metrics.get(g.name), dict):
            row.update(g.paper(metrics[g.name]))
    return row


def measured_on(metrics: dict, settings: dict) -> list[str]:
    """What each group of one eval.json was measured on, in words, in registry order."""
    return [line for g in GROUPS if isinstance(metrics.get(g.name), dict)
            for line in g.measured(metrics[g.name], settings)]


def parse_metrics(spec: str) -> list[str]:
    """A comma list of group names, or `all`; unknown names are a one-line error listing the valid ones."""
    known = [g.name for g in GROUPS]
    names = known if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in known]
    if bad:
        raise ValueError(f"unknown metric(s) {', '.join(bad)}; choose from {', '.join(known)} or all")
    return names
