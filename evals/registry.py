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

import torch

from evals.context import EvalContext

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


# --- group computations (thin: the metrics are tensor functions in their own modules) ---------------------------

def _core(ctx: EvalContext) -> dict[Path, dict]:
    out = {run: dict(ctx.stream[run].core) for run in ctx.saes}
    if ctx.synthetic:
        for result in out.values():
            result["ce_score"] = None
            result["note"] = "synthetic cache: no model, so no CE/KL scores, ablations or probes"
        return out
    from evals.splice import splice_losses

    tokens = ctx.contexts()
    for run, sae in ctx.saes.items():
        losses = splice_losses(ctx.model(), ctx.hook, sae, tokens, ctx.special_ids(), device=ctx.cfg.device,
                               progress=ctx.cfg.progress)
        # n_tokens stays the reconstruction metrics' count; the spliced CE/KL report their own.
        losses["ce_n_tokens"], losses["kl_n_tokens"] = losses.pop("n_tokens"), losses.pop("n_tokens_kl")
        out[run].update(losses, ce_contexts=len(tokens))
    return out


def _density(ctx: EvalContext) -> dict[Path, dict]:
    out = {}
    for run in ctx.saes:
        dens = ctx.stream[run].firing
        result = {k: v for k, v in dens.items() if not torch.is_tensor(v)}
        result["per_latent"] = dens["density"].tolist()
        result["training"] = ctx.training_dead(run)
        ctx.density_figure(run, dens)
        out[run] = result
    return out


def _ablation(ctx: EvalContext) -> dict[Path, dict]:
    if ctx.synthetic:
        return {}
    from evals.ablation import latent_ablation_effects

    out = {}
    for run, sae in ctx.saes.items():
        latents = ctx.cfg.latents or ctx.top_latents(run, ctx.cfg.ablation_latents)
        effects = latent_ablation_effects(ctx.model(), ctx.hook, sae, ctx.contexts(), latents, ctx.special_ids(),
                                          device=ctx.cfg.device, progress=ctx.cfg.progress)
        out[run] = {"latents": {str(i): v for i, v in effects.items()}}
    return out


def _probe_group(task: str) -> Callable[[EvalContext], dict[Path, dict]]:
    """SCR or TPP: the model runs once over the labelled texts and the probes are fitted once; each SAE then only
    encodes the cached token activations."""

    def compute(ctx: EvalContext) -> dict[Path, dict]:
        if ctx.synthetic:
            return {}
        from evals import labelled, scr_tpp
        from evals.probes import token_activations

        cfg = ctx.cfg
        sizes = {"train_size": cfg.labelled_train, "test_size": cfg.labelled_test}
        real = cfg.labelled == "real"
        if task == "scr":
            data = labelled.load_bias_in_bios(**sizes) if real else labelled.offline_scr_set(seed=cfg.seed, **sizes)
            fit, score = scr_tpp.fit_scr_probes, scr_tpp.scr_from_activations
        else:
            data = labelled.load_amazon_reviews(**sizes) if real else labelled.offline_tpp_set(seed=cfg.seed, **sizes)
            fit, score = scr_tpp.fit_tpp_probes, scr_tpp.tpp_from_activations
        tokens = token_activations(ctx.model(), ctx.hook, data.texts, device=cfg.device, progress=cfg.progress)
        pooled = tokens.pooled()
        probes = fit(pooled, data, seed=cfg.seed)
        out = {}
        for run, sae in ctx.saes.items():
            n_values = [n for n in N_VALUES if n <= sae.d_sae]  # SAEBench asserts N <= d_sae
            out[run] = score(tokens, data, sae, n_values, seed=cfg.seed, probes=probes, pooled=pooled)
            out[run]["dataset"] = data.description
        return out

    return compute


def _independence(ctx: EvalContext) -> dict[Path, dict]:
    from evals.independence import independence_stats

    return {run: independence_stats(ctx.stream[run].sample, sae.W_dec, seed=ctx.cfg.seed)
            for run, sae in ctx.saes.items()}


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
}

def _probe_metric_group(task: str, label: str, what: str, key: str) -> MetricGroup:
    """SCR or TPP: the same shape of entry, scored at each N under `key` (with `{n}`) in the result's metrics."""
    return MetricGroup(
        task, _probe_group(task), {task: f"{what}, probes selected on a validation split"},
        frozenset({"model"}), compare_rows=_probe_rows, paper=_probe_columns(task, key.replace("{n}", "{}")),
        measured=lambda r, s: _on((label, s.get("labelled_test"), "labelled test texts")),
        headlines=(Headline(f"{label} at N={{n}}", key, "higher", section="metrics"),))


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
        headlines=(Headline("explained variance", "explained_variance", "higher"),
                   Headline("CE score", "ce_score", "higher"),
                   Headline("L0", "l0", None, why="no better direction: L0 is set by k (TopK), not a measure of "
                                                  "quality"))),
    MetricGroup(
        "density", _density,
        {"dead_fraction": "fraction of latents that never fire on the N eval tokens (N reported)",
         "dense_fraction": "fraction of latents with eval density > 0.1"},
        frozenset({"stream"}),
        columns=(("dead_fraction", "dead_fraction"), ("dense_fraction", "dense_fraction")),
        compare_rows=_scalars, paper=lambda r: {"alive": 1 - r["dead_fraction"]},
        measured=lambda r, s: _on(("fraction alive", r.get("n_tokens"), "held-out activation rows")),
        headlines=(Headline("dead fraction", "dead_fraction", "lower"),)),
    MetricGroup(
        "ablation", _ablation,
        {"ablation": "per latent i: on contexts where i fires, remove z_i * W_dec[i] from the spliced "
                     "reconstruction; mean increase of next-token CE and mean KL to the unablated spliced output"},
        frozenset({"stream", "model"})),
    _probe_metric_group("tpp", "TPP", "SAEBench targeted probe perturbation (METRICS.md section 5)",
                        "tpp_threshold_{n}_total_metric"),
    _probe_metric_group("scr", "SCR", "SAEBench spurious correlation removal (METRICS.md section 4)",
                        "scr_metric_threshold_{n}"),
    MetricGroup(
        "independence", _independence,
        {"independence": "mean |Pearson rho| over pairs of alive latents, fraction |rho| > 0.3, mean max |cos| "
                         "between decoder rows, co-firing of the most frequent latents (evals/independence.py)"},
        frozenset({"stream"}), sample_rows=lambda cfg: cfg.independence_tokens, compare_rows=_scalars,
        headlines=(Headline("independence: mean |rho| of alive latents", "mean_abs_rho", "lower"),)),
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
