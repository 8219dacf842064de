"""`vsae compare`: N runs side by side on one self-contained page.

First the answer: a summary of the registry's headline metrics (the best run marked, the direction of "better"
stated, differences within overlapping intervals marked not significant) and the sparsity-fidelity frontier (L0
against explained variance and CE score, dead fraction against k, one point per run). Then config differences,
the metric tables, one per metric group (eval.json's core, density, SCR/TPP at each N, independence; latent
densities measured here on the cache's held-out tokens), overlaid density histograms, training curves from
log.jsonl, the eval t-SNE maps side by side and the joint map, and latents matched across runs by decoder cosine
(each run against the first of its group: best match, its cosine, a histogram of best-match cosines, links into
each run's dashboard when given). Figures are drawn when they scroll into view, so a page of 90 runs opens fast.

Runs are grouped by (model, hook, d_in): decoder rows and densities are compared only within a group, and the
page says so when there is more than one group.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from activations.atomic import write_text_atomic
from activations.cache import manifest_hash, read_manifest
from activations.devices import resolve_device
from activations.loader import ActivationLoader
from dashboards.assets import CSS
from dashboards.build import DASHBOARD_META, DashboardError
from dashboards.feature_pages import LATENT_PAGE
from dashboards.figures import (
    COLORS,
    LAYOUT,
    best_match_figure,
    density_histogram_figure,
    frontier_figure,
    training_curves_figure,
    tsne_figure,
)
from dashboards.html import (
    esc,
    figure_data,
    fmt,
    generator_meta,
    inline_assets,
    page,
    plotly_text,
    script_json,
    table,
)
from dashboards.run_info import eval_density_histogram, eval_tsne_maps
from dashboards.weights import DECODER_COSINE_DEFINITION, best_matches
from evals.audit import Mark, mark_for, read_audit, read_marks
from evals.baseline import separated
from evals.registry import BETTER, GROUPS, N_VALUES, Headline
from vsae.checkpoint import SAEWeights, read_sae
from vsae.firing import DENSE_THRESHOLD, FiringCounter, log10_density_histogram, special_ids, special_mask
from vsae.outputs import claim
from vsae.run import RunDir, read_json, read_run

MATCH_THRESHOLD = 0.9
OPEN_RUNS = 6  # up to this many runs, per-run parts of the page (run list, t-SNE maps) start unfolded
GENERATOR = "vsae compare"  # the page's <meta name="generator">: vsae replaces only a file that has it


@dataclass
class CompareConfig:
    cache: str = field(metadata={
        "help": "activation cache: latent densities are measured on its held-out rows for the runs trained on it"})
    out: str = field(default="compare.html", metadata={"help": "output HTML file (self-contained: plotly.js inlined)"})
    dashboards: list[str] | None = field(default=None, metadata={
        "help": "dashboard directories of these runs (from vsae dashboard), matched to runs by path, for links "
                "into them"})
    tokens: int = field(default=100_000, metadata={
        "help": "held-out cache rows on which latent densities are measured"})
    matches: int = field(default=100, metadata={
        "help": "rows of the matched-latents table (the densest latents of each group's first run)"})
    n: int = field(default=20, metadata={
        "help": f"N (latents ablated) at which the summary ranks runs by SCR and TPP; one of "
                f"{', '.join(map(str, N_VALUES))}"})
    batch_size: int = field(default=4096, metadata={"help": "rows per batch"})
    device: str = field(default="auto", metadata={
        "help": "torch device; auto: CUDA when this machine has it, else CPU"})
    progress: bool = field(default=True, metadata={"help": "progress bar"})
    audit: str | None = field(default=None, metadata={
        "help": "audit.json from vsae audit: numbers of a metric that failed one of its lenses are marked"})

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)


def audit_mark(mark: Mark | None) -> str:
    """The short mark beside a number whose metric failed an audit lens, the reason as its tooltip."""
    if mark is None:
        return ""
    return f' <span class="mark warn audit" title="{esc(mark.title)}">{esc(mark.text)}</span>'


@dataclass
class Run:
    info: RunDir
    sae: SAEWeights
    key: tuple  # (model, hook, d_in): runs with the same key read the same activations
    density: np.ndarray | None = None  # on the cache's held-out tokens, when the run matches the cache
    dashboard: Path | None = None
    dashboard_latents: set[int] | None = None
    label: str = ""  # the run's column title: its folder name, made unique

    @property
    def name(self) -> str:
        return self.info.name


def is_compare_page(path: Path) -> bool:
    """Whether the file `path` is a compare page vsae wrote: its head has the generator mark (or, from versions
    before the mark, vsae's title)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return generator_meta(GENERATOR) in head or "<title>vsae compare: " in head


def _plot(fig_id: str) -> str:
    """A figure's place on the page; `data-lazy`: the page script draws it when it nears the viewport (or its
    <details> opens), so a page of many runs and figures opens at once."""
    return f'<div class="plot" id="{esc(fig_id)}" data-lazy></div>'


def _key_label(key: tuple) -> str:
    model, hook, d_in = key
    return f"model {model or 'unknown'}, hook {hook or 'unknown'}, d_in {d_in}"


def _unique_labels(runs: list[Run]) -> None:
    """Runs named alike (.../a/sae, .../b/sae) get their parent folder prefixed, so every column is distinct."""
    names = [r.name for r in runs]
    for r in runs:
        r.label = f"{r.info.path.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name


def _label(r: Run) -> str:
    return r.label or r.name


def _link_dashboards(runs: list[Run], dashboards: list[str]) -> list[str]:
    notices = []
    by_path = {}
    for d in dashboards:
        meta_path = Path(d) / DASHBOARD_META
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            notices.append(f"--dashboards {d}: no readable {DASHBOARD_META} (not a `vsae dashboard` output); ignored")
            continue
        by_path[meta.get("run")] = (Path(d), set(meta.get("latents") or []))
    for r in runs:
        hit = by_path.get(str(r.info.path.resolve()))
        if hit:
            r.dashboard, r.dashboard_latents = hit
    return notices


def measure_densities(saes: list[SAEWeights], cache: str, eval_fraction: float, cfg: CompareConfig
                      ) -> tuple[list[np.ndarray], int]:
    """(firing density of each SAE, tokens counted) on the same held-out rows of `cache`, in one pass.

    Rows are counted as `vsae eval` counts them (special tokens dropped), so the page and eval.json agree on
    which latents are dead. A cache with no held-out rows for this split is read whole.
    """
    loader = ActivationLoader(cache, cfg.batch_size, split="eval", eval_fraction=eval_fraction, shuffle=False,
                              with_tokens=True)
    if loader.n_tokens == 0:
        loader = ActivationLoader(cache, cfg.batch_size, split="all", shuffle=False, with_tokens=True)
    special = special_ids(loader.manifest)
    n_rows = min(cfg.tokens, loader.n_tokens)
    counters = [FiringCounter(sae.d_sae) for sae in saes]
    seen = 0
    bar = tqdm(total=n_rows, unit="tok", unit_scale=True, desc="compare", disable=not cfg.progress)
    for x, toks in loader:
        x = x[~special_mask(toks[:, 0], special)][: n_rows - seen].to(cfg.device)
        for counter, sae in zip(counters, saes, strict=True):
            counter.update_code(sae.encode_topk(x))
        seen += x.shape[0]
        bar.update(x.shape[0])
        if seen >= n_rows:
            break
    bar.close()
    return [c.density().numpy() for c in counters], seen


def _densities(runs: list[Run], cache: str, cfg: CompareConfig) -> int:
    """Set the density of every run that matches the cache; returns the tokens counted."""
    if not runs:
        return 0
    # The runs' common held-out rows, as `vsae eval` of these runs together scores them (evals/provenance.py).
    densities, seen = measure_densities([r.sae for r in runs], cache, min(r.info.eval_fraction for r in runs), cfg)
    for r, density in zip(runs, densities, strict=True):
        r.density = density
    return seen


def _latent_link(r: Run, latent: int, out_dir: Path) -> str:
    """A latent id as HTML, linked to its page in the run's dashboard when that dashboard shows it."""
    if r.dashboard is not None and r.dashboard_latents is not None and latent in r.dashboard_latents:
        href = os.path.relpath(r.dashboard / LATENT_PAGE, out_dir) + f"#{latent}"
        return f'<a href="{esc(href)}">{latent}</a>'
    return str(latent)


def _differing(configs: list[dict]) -> list[str]:
    """The config keys whose values differ between runs (the runs' switches), sorted."""
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def _config_text(v) -> str:
    return json.dumps(v, default=str) if isinstance(v, list | dict) else str(v)


def _switches(runs: list[Run]) -> list[dict[str, str]]:
    """Per run, its value of every config key that differs between the runs (as text)."""
    configs = [r.info.config() for r in runs]
    differ = _differing(configs)
    return [{k: _config_text(c.get(k)) for k in differ} for c in configs]


def _config_section(runs: list[Run]) -> str:
    configs = [r.info.config() for r in runs]
    keys = sorted({k for c in configs for k in c})
    head = ["setting"] + [esc(_label(r)) for r in runs]

    def cell(v) -> str:
        return fmt(v) if not isinstance(v, list | dict) else esc(json.dumps(v))

    differ = _differing(configs)
    rows = [[esc(k)] + [cell(c.get(k)) for c in configs] for k in differ]
    same = [[esc(k)] + [cell(c.get(k)) for c in configs] for k in keys if k not in differ]
    diff_html = (_wide(table(rows, head, cls="data wide")) if rows
                 else '<p class="muted">No configuration differences.</p>')
    return (f"<h2>Configuration differences</h2>{diff_html}"
            f"<details><summary>settings shared by all runs ({len(same)})</summary>"
            f"{_wide(table(same, head, cls='data wide'))}</details>")


def _wide(html_table: str) -> str:
    """A table that may be wider than the page (a column per run), scrolling sideways on its own."""
    return f'<div class="scroll">{html_table}</div>'


# --- the summary: which run is better ----------------------------------------------------------------------------

BEST = "best"
NOT_SIGNIFICANT = "not significant"
NO_INTERVAL = "no interval: significance not assessed"
BEST_LISTED = 3  # tied best runs named in the "best run" column; the rest counted


@dataclass
class HeadlineRow:
    """One headline metric across the runs: values, intervals, the best run(s) and each run's mark."""

    group: str
    headline: Headline
    values: list[float | None]
    intervals: list[tuple[float, float] | None]
    best: list[int]  # indices of the runs with the best value (ties all marked); [] without a direction
    marks: list[str]  # per run: BEST, NOT_SIGNIFICANT, NO_INTERVAL, or "" (none applies, or a difference whose
    # interval is disjoint from the best run's)
    note: str  # the row's significance statement (or why it has no direction)
    nulls: list[dict | None] = field(default_factory=list)  # per run: its comparison with random SAEs, if any


def headline_rows(metrics: list[dict], n: int) -> list[HeadlineRow]:
    """The summary rows of the registry's headlines (registry order) over runs' eval.json `metrics` blocks, N for
    metrics measured at several N. A headline no run has is left out."""
    rows = []
    for group in GROUPS:
        for h in group.headlines:
            read = [h.read(m[group.name], n) if isinstance(m.get(group.name), dict) else (None, None)
                    for m in metrics]
            if all(v is None for v, _ in read):
                continue
            row = _rank(group.name, h, [v for v, _ in read], [i for _, i in read])
            row.nulls = [h.null(m[group.name], n) if isinstance(m.get(group.name), dict) else None for m in metrics]
            unseparated = [i for i, c in enumerate(row.nulls) if separated(c) is False]
            if unseparated:
                row.note = (f"{NOT_SEPARATED} for {len(unseparated)} of {len(metrics)} runs; " + row.note)
            rows.append(row)
    return rows


def _rank(group: str, h: Headline, values: list[float | None], intervals: list[tuple[float, float] | None]
          ) -> HeadlineRow:
    marks = [""] * len(values)
    present = [v for v in values if v is not None]
    if h.better not in BETTER:
        return HeadlineRow(group, h, values, intervals, [], marks, h.why)
    target = max(present) if h.better == "higher" else min(present)
    best = [i for i, v in enumerate(values) if v == target]
    ref = intervals[best[0]]
    for i, v in enumerate(values):
        if i in best:
            marks[i] = BEST
        elif v is None:
            continue
        elif ref is None or intervals[i] is None:
            marks[i] = NO_INTERVAL
        elif intervals[i][0] <= ref[1] and ref[0] <= intervals[i][1]:
            marks[i] = NOT_SIGNIFICANT
    others = [i for i, v in enumerate(values) if v is not None and i not in best]
    if not others:
        note = "only one run has this number" if len(best) == 1 else "equal in every run that has it"
    elif all(marks[i] == NO_INTERVAL for i in others):
        note = NO_INTERVAL
    elif any(marks[i] == NO_INTERVAL for i in others):
        note = (f"intervals overlapping the best run's: {NOT_SIGNIFICANT}; runs without an interval: significance "
                "not assessed")
    else:
        note = f"differences whose intervals overlap the best run's are marked {NOT_SIGNIFICANT}"
    return HeadlineRow(group, h, values, intervals, best, marks, note)


def _cache_note(runs: list[Run]) -> tuple[list[str], str]:
    """(a tag per run naming its eval cache, empty when all agree; the summary's warning, empty when all agree)."""
    hashes = [(r.info.eval or {}).get("cache_hash") for r in runs]
    distinct = list(dict.fromkeys(h for h in hashes if h))
    missing = [_label(r) for r, h in zip(runs, hashes, strict=True) if not h]
    parts = []
    tags = [""] * len(runs)
    if len(distinct) > 1:
        for j, h in enumerate(distinct, 1):
            names = [_label(r) for r, x in zip(runs, hashes, strict=True) if x == h]
            parts.append(f"cache {j} (hash {str(h)[:12]}): {', '.join(names)}")
        tags = [f"cache {distinct.index(h) + 1}" if h else "" for h in hashes]
        warn = ("These runs were evaluated on different caches, so their numbers are not measured on the same "
                "tokens and the best marks compare unlike things: " + "; ".join(parts) + ".")
    else:
        warn = ""
    if missing:
        warn += (" " if warn else "") + f"No eval.json (or no cache hash in it): {', '.join(missing)}."
    return tags, warn


def _summary_cell(row: HeadlineRow, i: int, audit: Mark | None = None) -> str:
    v, interval, mark = row.values[i], row.intervals[i], row.marks[i]
    if v is None:
        return '<td class="num muted">n/a</td>'
    text = fmt(v) + audit_mark(audit)
    if interval is not None:
        text += f' <span class="ival">[{fmt(interval[0], 3)}, {fmt(interval[1], 3)}]</span>'
    cls = {BEST: "best", NOT_SIGNIFICANT: "ns"}.get(mark, "")
    # where no run has an interval the row's note says so once, not in every cell
    tag = {BEST: "\u2605 best", NOT_SIGNIFICANT: NOT_SIGNIFICANT,
           NO_INTERVAL: "" if row.note == NO_INTERVAL else "no interval"}.get(mark, "")
    if tag:
        text += f' <span class="mark">{esc(tag)}</span>'
    text += _null_text(row.nulls[i] if i < len(row.nulls) else None)
    title = {NO_INTERVAL: NO_INTERVAL, NOT_SIGNIFICANT: "its interval overlaps the best run's",
             "": "its interval is disjoint from the best run's" if row.best and interval else ""}.get(mark, "")
    title_attr = f' title="{esc(title)}"' if title else ""
    return f'<td class="num {cls}"{title_attr}>{text}</td>'


NOT_SEPARATED = "not separated from a random SAE"


def _null_text(cmp: dict | None) -> str:
    """A cell's line on the random-SAE null: trained - null mean, its interval, and the verdict."""
    if not isinstance(cmp, dict) or _finite(cmp.get("difference")) is None:
        return ""
    diff = float(cmp["difference"])
    text = f'<br><span class="null">vs random SAE: {"+" if diff >= 0 else ""}{fmt(diff, 3)}'
    interval = cmp.get("interval")
    if isinstance(interval, list) and len(interval) == 2:
        text += f" [{fmt(interval[0], 3)}, {fmt(interval[1], 3)}]"
    verdict = separated(cmp)
    if verdict is False:
        text += f' <span class="mark warn">{esc(NOT_SEPARATED)}</span>'
    return text + "</span>"


def _split_note(runs: list[Run]) -> str:
    """Which sequences the runs were scored on, and a warning where they differ."""
    splits = [(r.info.eval or {}).get("split") for r in runs]
    known = [s for s in splits if isinstance(s, dict)]
    if not known:
        return ""
    keys = {json.dumps({k: s.get(k) for k in ("kind", "eval_fraction", "n_sequences")}, sort_keys=True)
            for s in known}
    if len(keys) == 1 and len(known) == len(runs):
        s = known[0]
        what = ("the whole cache (--other-cache: trained on other data)" if s.get("kind") == "whole_cache" else
                f"held-out sequences common to the runs (eval fraction {s.get('eval_fraction')})")
        return f'<p class="note">Scored on {s.get("n_sequences")} sequences: {esc(what)}.</p>'
    parts = [f"{esc(_label(r))}: {s.get('n_sequences')} sequences ({esc(str(s.get('kind')))}, fraction "
             f"{s.get('eval_fraction')})" if isinstance(s, dict) else f"{esc(_label(r))}: unknown"
             for r, s in zip(runs, splits, strict=True)]
    return ('<p class="warn">These runs were scored on different sequences, so their numbers are not measured on '
            "the same tokens: " + "; ".join(parts) + ". Evaluate them together (<code>vsae eval RUN1 RUN2 ...</code>)"
            " to score each on the held-out sequences common to all.</p>")


def _summary_section(runs: list[Run], n: int, marks: dict | None = None) -> str:
    rows = headline_rows([r.info.metrics for r in runs], n)
    tags, warn = _cache_note(runs)
    head = ["metric", "better", "best run", "significance"] + [
        esc(_label(r)) + (f' <span class="muted">({esc(t)})</span>' if t else "") for r, t in zip(runs, tags,
                                                                                               strict=True)]
    body = []
    for row in rows:
        group = next(g for g in GROUPS if g.name == row.group)
        definition = group.definitions.get(row.headline.key) or group.definitions.get(row.group) or ""
        title = f' title="{esc(definition)}"' if definition else ""
        best = ", ".join(f"{esc(_label(runs[i]))} ({fmt(row.values[i])})" for i in row.best[:BEST_LISTED])
        if len(row.best) > BEST_LISTED:
            best += f" and {len(row.best) - BEST_LISTED} more (tied)"
        best = best or "\u2014"
        better = BETTER.get(row.headline.better or "", "no better direction")
        flag = mark_for(marks or {}, row.group, row.headline.name(n))
        cells = "".join(_summary_cell(row, i, flag) for i in range(len(runs)))
        body.append(f"<tr><td{title}>{esc(row.headline.title(n))}</td><td>{esc(better)}</td>"
                    f'<td class="bestrun">{best}</td><td class="note">{esc(row.note)}</td>{cells}</tr>')
    present = {row.group for row in rows}
    absent = [g.name for g in GROUPS if g.headlines and g.name not in present]
    missing = (f'<p class="muted">Not in these runs\' eval.json: {esc(", ".join(absent))} (<code>vsae eval RUN '
               f'--metrics {esc(",".join(absent))}</code> adds them).</p>') if absent else ""
    thead = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    table_html = (_wide(f'<table class="data wide summary">{thead}{"".join(body)}</table>') if body
                  else '<p class="muted">No headline metric in these runs\' eval.json.</p>')
    return (f'<h2 id="summary">Summary: which run is better</h2>'
            f'<p class="note">One row per headline metric (SCR and TPP at N = {n}); \u2605 marks the best run in the '
            f"stated direction. Where eval.json gives intervals, a run whose interval overlaps the best run's is "
            f"marked {NOT_SIGNIFICANT}; where it gives none, significance is not assessed. Under each number, where "
            f"measured: the run minus random SAEs of the same shape with a paired 95% interval, marked "
            f"{NOT_SEPARATED} where that interval includes 0. Hover a metric for its definition.</p>"
            + _split_note(runs) + (f'<p class="warn">{esc(warn)}</p>' if warn else "") + table_html + missing)


# --- the sparsity-fidelity frontier -------------------------------------------------------------------------------

FRONTIER = (("l0", "explained_variance", ("L0", "explained variance"), "L0 against explained variance"),
            ("l0", "ce_score", ("L0", "CE score"), "L0 against CE score"),
            ("k", "dead_fraction", ("k", "dead fraction"), "dead fraction against k"))


def _finite(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value) \
        else None


def frontier_points(runs: list[Run]) -> list[dict]:
    """One point per run for the frontier plots: its name, switches, variant (the colour) and numbers."""
    points = []
    for r, switches in zip(runs, _switches(runs), strict=True):
        core, density = r.info.metrics.get("core"), r.info.metrics.get("density")
        core = core if isinstance(core, dict) else {}
        density = density if isinstance(density, dict) else {}
        points.append({"name": _label(r), "switches": switches,
                       "group": str(r.info.config().get("sae.variant") or r.info.cfg.get("architecture") or ""),
                       "l0": _finite(core.get("l0")), "explained_variance": _finite(core.get("explained_variance")),
                       "ce_score": _finite(core.get("ce_score")),
                       "dead_fraction": _finite(density.get("dead_fraction")), "k": r.sae.k})
    return points


def _frontier_section(runs: list[Run], figures: list) -> str:
    points = frontier_points(runs)
    cells, left_out = [], []
    for x, y, titles, title in FRONTIER:
        fig_id = f"fig-frontier-{len(figures)}"
        figures.append([fig_id, figure_data(frontier_figure(points, x, y, titles, title)), False])
        cells.append(_plot(fig_id))
        missing = [p["name"] for p in points if p[x] is None or p[y] is None]
        if missing:
            left_out.append(f"{title}: {', '.join(missing)}")
    note = (f'<p class="note">Not plotted (no value in eval.json): {esc("; ".join(left_out))}.</p>'
            if left_out else "")
    return ("<h2>Sparsity-fidelity frontier</h2>"
            '<p class="note">One point per run (eval.json\'s core and density groups); hover a point for the run and '
            "its switches (the settings that differ between runs). Up and to the left is better on the first two; "
            "L0 is set by k for TopK encoders.</p>"
            f'<div class="side">{"".join(cells)}</div>{note}')


# --- the metric tables, one per metric group -------------------------------------------------------------------

PAGE_DEFINITIONS = {
    "cache.dead_fraction": "fraction of latents that never fire on the held-out cache rows this page reads "
                           "(special tokens dropped, as vsae eval counts them)",
    "cache.dense_fraction": f"fraction of latents with density > {DENSE_THRESHOLD} on those rows",
    "d_sae": "number of latents",
    "k": "latents kept per token by the TopK encoder",
    "train (last log)": "the trainer's last log.jsonl line (training batches, not held-out rows)",
}


def _group_table(title: str, rows: list[tuple[str, str, list]], runs: list[Run], open_: bool = True,
                 marks: dict[str, Mark] | None = None) -> str:
    """A collapsible metric table: rows of (label, definition, value per run); `marks` by label (audit)."""
    head = ["metric"] + [esc(_label(r)) for r in runs]
    body = []
    for label, definition, values in rows:
        title_attr = f' title="{esc(definition)}"' if definition else ""
        tag = audit_mark((marks or {}).get(label))
        body.append(f"<tr><td{title_attr}>{esc(label)}</td>" + "".join(
            f'<td class="num">{fmt(v)}{tag if v is not None else ""}</td>' for v in values) + "</tr>")
    thead = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    table_html = _wide('<table class="data wide">' + thead + "".join(body) + "</table>")
    return (f'<details class="group"{" open" if open_ else ""}><summary>{esc(title)} '
            f'<span class="muted">({len(rows)} rows)</span></summary>{table_html}</details>')


def _metric_section(runs: list[Run], n_density: int, marks: dict | None = None) -> str:
    parts = []
    for group in GROUPS:
        if group.compare_rows is None:
            continue
        per_run = []
        for r in runs:
            result = r.info.metrics.get(group.name)
            per_run.append({k: v for k, v in group.compare_rows(result) if not isinstance(v, str)}
                           if isinstance(result, dict) else {})
        keys = list(dict.fromkeys(k for values in per_run for k in values))
        if not keys:
            continue
        rows = [(f"{group.name}.{k}",
                 group.definitions.get(k) or group.definitions.get(k.split(".")[0]) or group.definitions.get(
                     group.name) or "", [values.get(k) for values in per_run]) for k in keys]
        flagged = {label: m for label, _, _ in rows
                   if (m := mark_for(marks or {}, group.name, label.removeprefix(f"{group.name}.")))}
        parts.append(_group_table(group.name, rows, runs, marks=flagged))
    measured = [r for r in runs if r.density is not None]
    if measured:
        dead = [float((r.density == 0).mean()) if r.density is not None else None for r in runs]
        dense = [float((r.density > DENSE_THRESHOLD).mean()) if r.density is not None else None for r in runs]
        parts.append(_group_table(f"measured here on {n_density:,} held-out cache tokens", [
            ("cache.dead_fraction", PAGE_DEFINITIONS["cache.dead_fraction"], dead),
            ("cache.dense_fraction", PAGE_DEFINITIONS["cache.dense_fraction"], dense)], runs))
    parts.append(_group_table("size", [("d_sae", PAGE_DEFINITIONS["d_sae"], [r.sae.d_sae for r in runs]),
                                       ("k", PAGE_DEFINITIONS["k"], [r.sae.k for r in runs])], runs))
    last = [r.info.log[-1] if r.info.log else {} for r in runs]
    logged = [(f"train (last log).{k}", PAGE_DEFINITIONS["train (last log)"], [line.get(k) for line in last])
              for k in ("mse", "l0", "dead_fraction") if any(k in line for line in last)]
    if logged:
        parts.append(_group_table("training (last log.jsonl line)", logged, runs))
    hashes = {r.info.eval.get("cache_hash") for r in runs if r.info.eval}
    note = ""
    if len(hashes) > 1:
        note = ('<p class="warn">The eval.json files were computed on different caches; their metrics are not '
                "measured on the same tokens.</p>")
    return ("<h2>Metrics</h2>" + note + '<p class="note">One table per metric group of eval.json, in the registry\'s '
            "order; hover a metric for its definition.</p>" + "".join(parts))


def _match_section(group: list[Run], out_dir: Path, cfg: CompareConfig, figures: list) -> str:
    ref, others = group[0], group[1:]
    W_ref = ref.sae.W_dec.float().cpu()
    alive = ref.density > 0 if ref.density is not None else np.ones(ref.sae.d_sae, dtype=bool)
    cosines, results, stats_rows = {}, {}, []
    a = torch.from_numpy(alive)
    ref_alive = a.nonzero(as_tuple=True)[0]
    for other in others:
        # candidates: the other run's alive latents (all of them when densities are unknown)
        W_o = other.sae.W_dec.float().cpu()
        cand = (torch.from_numpy(other.density > 0).nonzero(as_tuple=True)[0] if other.density is not None
                else torch.arange(W_o.shape[0]))
        if cand.numel() == 0 or ref_alive.numel() == 0:
            stats_rows.append([esc(_label(other)), "no alive latents to match", "", ""])
            continue
        cos, j = best_matches(W_ref, W_o[cand])
        ids = cand[j]
        _, back = best_matches(W_o, W_ref[ref_alive])
        mutual = ref_alive[back][ids] == torch.arange(ids.numel())
        results[_label(other)] = (cos, ids)
        cosines[f"{_label(ref)} \u2192 {_label(other)}"] = cos[a].tolist()
        stats_rows.append([esc(_label(other)), fmt(float(cos[a].mean())) if a.any() else "n/a",
                           fmt(float((cos[a] > MATCH_THRESHOLD).double().mean())) if a.any() else "n/a",
                           fmt(float((mutual & a).double().sum() / max(int(a.sum()), 1)))])
    fig_id = f"fig-match-{len(figures)}"
    figures.append([fig_id, figure_data(best_match_figure(
        cosines, f"best-match decoder cosine of {_label(ref)}'s alive latents")), False])
    order = (np.argsort(-ref.density, kind="stable") if ref.density is not None else np.arange(ref.sae.d_sae))
    order = order[: cfg.matches]
    head = [f"{esc(_label(ref))} latent", "density"] + [f"best alive match in {esc(_label(o))} (cosine)"
                                                        for o in others]
    rows = []
    for i in order.tolist():
        row = [_latent_link(ref, i, out_dir), fmt(float(ref.density[i])) if ref.density is not None else "n/a"]
        for o in others:
            if _label(o) not in results:
                row.append("n/a")
                continue
            cos, ids = results[_label(o)]
            row.append(f"{_latent_link(o, int(ids[i]), out_dir)} ({float(cos[i]):.3f})")
        rows.append(row)
    summary = table(stats_rows, ["run", f"mean best cosine (alive latents of {esc(_label(ref))})",
                                 f"fraction &gt; {MATCH_THRESHOLD}", "mutual best matches"], cls="data")
    which = "densest" if ref.density is not None else "first"
    return (f'<p class="note">{esc(DECODER_COSINE_DEFINITION)}: for each latent of {esc(_label(ref))}, the latent '
            f"of each other run whose decoder row is most similar. Mutual: the match's own best match is the "
            f"latent itself. Where densities were measured, only alive latents are matched.</p>"
            f"{summary}{_plot(fig_id)}"
            f"<h3>The {len(order)} {which} latents of {esc(_label(ref))} and their best matches</h3>"
            f"{table(rows, head, cls='data')}")


def _joint_tsne(runs: list[Run]) -> tuple[dict, list[str]] | None:
    """(coordinates, names of the runs it covers) of a joint decoder map that eval.json lists for two or more of
    `runs`. Only its coordinates are read (inside the run directory), never an HTML file it names: the page draws
    every figure itself, so nothing an input names runs in it."""
    names = {str(r.info.path) for r in runs} | {str(r.info.path.resolve()) for r in runs}
    for r in runs:
        entry = (r.info.metrics.get("tsne") or {}).get("joint")
        if not isinstance(entry, dict) or not isinstance(entry.get("runs"), list):
            continue
        listed = [x for x in entry["runs"] if isinstance(x, str)]
        if sum(1 for x in listed if x in names or str(Path(x).resolve()) in names) < 2:
            continue
        path = r.info.figure_file(entry.get("coordinates"))
        doc = read_json(path) if path else {}
        ids, labels = doc.get("latent_ids"), doc.get("runs")
        if not (isinstance(ids, list) and isinstance(labels, list) and len(ids) == len(labels)):
            continue
        try:
            coords = np.asarray(doc.get("coords"), dtype=float).reshape(len(ids), 2)
        except (TypeError, ValueError):
            continue  # not the coordinates eval writes
        return {**doc, "coords": coords}, [Path(x).name for x in listed]
    return None


def _joint_tsne_figure(doc: dict, title: str) -> go.Figure:
    """The joint decoder map (coords [n, 2], a run label per point), one colour per run; the latent id is each point's
    customdata."""
    coords, labels = doc["coords"], [str(x) for x in doc["runs"]]
    fig = go.Figure()
    for i, name in enumerate(dict.fromkeys(labels)):
        keep = [j for j, label in enumerate(labels) if label == name]
        fig.add_trace(go.Scattergl(x=coords[keep, 0].astype(np.float32), y=coords[keep, 1].astype(np.float32),
                                   mode="markers", name=plotly_text(name),
                                   marker={"size": 4, "color": COLORS[i % len(COLORS)]},
                                   customdata=[doc["latent_ids"][j] for j in keep],
                                   hovertemplate="latent %{customdata}"))
    fig.update_layout(title={"text": plotly_text(title)}, xaxis={"visible": False}, yaxis={"visible": False},
                      **LAYOUT)
    return fig


def _tsne_section(runs: list[Run], figures: list) -> str:
    maps = {r.name: eval_tsne_maps(r.info) for r in runs}
    kinds = [k for k in ("activations", "decoder") if any(k in m for m in maps.values())]
    parts = []
    for kind in kinds:
        cells = []
        for r in runs:
            m = maps[r.name].get(kind)
            if m is None:
                cells.append(f'<div><p class="muted">{esc(_label(r))}: no {esc(kind)} t-SNE in eval.json</p></div>')
                continue
            fig_id = f"fig-tsne-{len(figures)}"
            figures.append([fig_id, figure_data(tsne_figure(m, f"{_label(r)}: {kind}")), False])
            cells.append(_plot(fig_id))
        # Many runs make many maps: folded away (and drawn only when opened) past a handful.
        parts.append(f'<details{" open" if len(runs) <= OPEN_RUNS else ""}><summary>t-SNE of {esc(kind)} '
                     f'<span class="muted">({len(cells)} runs)</span></summary><div class="side">{"".join(cells)}'
                     "</div></details>")
    joint = _joint_tsne(runs)
    if joint:
        doc, named = joint
        fig_id = f"fig-tsne-{len(figures)}"
        figures.append([fig_id, figure_data(_joint_tsne_figure(doc, "decoder rows of " + ", ".join(named))), False])
        parts.append(f'<h3>Joint decoder t-SNE</h3><p class="note">From vsae eval of {esc(", ".join(named))}.</p>'
                     + _plot(fig_id))
    else:
        parts.append('<p class="muted">No joint t-SNE map: evaluate the runs together '
                     "(<code>vsae eval RUN_A RUN_B --metrics density,tsne</code>) to make one.</p>")
    if not kinds:
        parts.insert(0, '<p class="muted">No t-SNE maps in these runs\' eval.json.</p>')
    return "<h2>t-SNE maps</h2>" + "".join(parts)


def _read_runs(paths: list[str | Path], cfg: CompareConfig, cache_model: str | None) -> list[Run]:
    runs = []
    for p in paths:
        info = read_run(p)
        sae, _ = read_sae(Path(p), device=cfg.device)
        runs.append(Run(info=info, sae=sae, key=(info.model_name or cache_model, info.hook_name, sae.d_in)))
    if len({str(r.info.path.resolve()) for r in runs}) < len(runs):
        raise DashboardError("the same run is given twice")
    _unique_labels(runs)
    return runs


def _group(runs: list[Run], cache_key: tuple, cache: str, notices: list[str]) -> tuple[dict[tuple, list[Run]],
                                                                                        list[Run]]:
    """(runs grouped by the activations they read, the runs trained on the cache's); notices say what differs."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.key, []).append(r)
    if len(groups) > 1:
        desc = "; ".join(f"{', '.join(_label(r) for r in g)}: {_key_label(k)}" for k, g in groups.items())
        notices.append(f"These runs read different activations ({desc}). Decoder matching, overlaid density "
                       f"histograms and latent densities are compared only within a group; the metric table shows "
                       f"every run, but numbers from different groups measure different activations.")
    on_cache = [r for r in runs if r.key[1:] == cache_key[1:] and r.key[0] in (cache_key[0], None)]
    off_cache = [r for r in runs if r not in on_cache]
    if off_cache:
        notices.append(f"Not measured on the cache {cache} ({_key_label(cache_key)}): "
                       f"{', '.join(_label(r) for r in off_cache)} (trained on other activations).")
    return groups, [r for r in on_cache if r.sae.d_in == cache_key[2]]


def _density_section(groups: dict[tuple, list[Run]], n_density: int, figures: list) -> str:
    dens_parts = []
    for key, group in groups.items():
        hists = {}
        for r in group:
            if r.density is not None:
                hists[_label(r)] = log10_density_histogram(r.density, n_density)
            elif (h := eval_density_histogram(r.info)) is not None:
                hists[f"{_label(r)} (eval.json)"] = h
        if hists:
            fig_id = f"fig-density-{len(figures)}"
            title = "log10 latent density" + (f" on {n_density:,} held-out cache tokens" if n_density else "")
            if len(groups) > 1:
                title += f" ({_key_label(key)})"
            figures.append([fig_id, figure_data(density_histogram_figure(hists, title)), False])
            dens_parts.append(_plot(fig_id))
    return "<h2>Latent density</h2>" + ("".join(dens_parts) or '<p class="muted">No densities.</p>')


def _matches(groups: dict[tuple, list[Run]], out_dir: Path, cfg: CompareConfig, figures: list) -> str:
    match_parts = []
    for key, group in groups.items():
        if len(group) < 2:
            continue
        if len(groups) > 1:
            match_parts.append(f"<h3>{esc(_key_label(key))}</h3>")
        match_parts.append(_match_section(group, out_dir, cfg, figures))
    return "<h2>Latents matched across runs</h2>" + (
        "".join(match_parts) or '<p class="muted">No two runs read the same activations: nothing to match.</p>')


def _runs_table(runs: list[Run], out_dir: Path) -> str:
    run_rows = [[esc(_label(r)), esc(str(r.info.path)), esc(_key_label(r.key)),
                 (f'<a href="{esc(os.path.relpath(r.dashboard / "index.html", out_dir))}">dashboard</a>'
                  if r.dashboard else '<span class="muted">none given</span>')] for r in runs]
    listing = table(run_rows, ["run", "path", "activations", "dashboard"], cls="data")
    return (f'<details{" open" if len(runs) <= OPEN_RUNS else ""}><summary>the {len(runs)} runs: paths, '
            f"activations, dashboards</summary>{listing}</details>")


def compare_runs(paths: list[str | Path], cfg: CompareConfig) -> dict:
    """Write the comparison page of `paths` to `cfg.out` (a new file, or a compare page vsae wrote, replaced
    atomically); returns a summary."""
    if len(paths) < 2:
        raise ValueError("vsae compare needs at least two runs")
    if cfg.n not in N_VALUES:
        raise ValueError(f"--n {cfg.n}: SCR and TPP are measured at N in {', '.join(map(str, N_VALUES))}")
    out = Path(cfg.out)
    if out.is_dir():
        raise DashboardError(f"--out {out} is a directory; give the page's file name, e.g. {out / 'compare.html'}")
    with claim(out, is_compare_page, "compare page", f"<meta name=\"generator\" content=\"{GENERATOR}\">",
               DashboardError):
        return _compare(paths, out, cfg)


def _compare(paths: list[str | Path], out: Path, cfg: CompareConfig) -> dict:
    out_dir = out.parent
    manifest = read_manifest(cfg.cache)
    settings = manifest["settings"]
    cache_model = settings["model"].get("name") if isinstance(settings["model"], dict) else None
    cache_key = (cache_model, settings["hook_name"], int(manifest["d_in"]))
    runs = _read_runs(paths, cfg, cache_model)
    notices = _link_dashboards(runs, cfg.dashboards or [])
    groups, measured = _group(runs, cache_key, cfg.cache, notices)
    n_density = _densities(measured, cfg.cache, cfg)

    figures: list = []
    marks = read_marks(read_audit(cfg.audit)) if cfg.audit else {}
    audit_note = (f'<p class="note">Marked "fails ...": the metric failed that lens of the audit {esc(cfg.audit)} '
                  "(vsae audit; hover the mark for why).</p>") if marks else ""
    answer = audit_note + _summary_section(runs, cfg.n, marks) + _frontier_section(runs, figures)
    sections = [_config_section(runs), _metric_section(runs, n_density, marks),
                _density_section(groups, n_density, figures)]
    curves = training_curves_figure({_label(r): r.info.log for r in runs if r.info.log})
    if curves is not None:
        figures.append(["fig-curves", figure_data(curves), False])
        sections.append("<h2>Training curves (log.jsonl)</h2>" + _plot("fig-curves"))
    sections.append(_tsne_section(runs, figures))
    sections.append(_matches(groups, out_dir, cfg, figures))

    notice_html = "".join(f'<p class="warn">{esc(n)}</p>' for n in notices)
    body = (f"<h1>Comparison of {len(runs)} runs</h1>{notice_html}{answer}<h2>Runs</h2>{_runs_table(runs, out_dir)}"
            f'<p class="note">Cache: {esc(cfg.cache)} (hash {esc(manifest_hash(manifest))}).</p>'
            + "".join(sections))
    plotly_js, vsae_js = inline_assets()
    html_text = page(f"vsae compare: {', '.join(_label(r) for r in runs)}", body, css=CSS, generator=GENERATOR,
                     inline=(plotly_js, vsae_js, f"VSAE.figures({script_json(figures)});"))
    try:
        write_text_atomic(out, html_text)
    except OSError as e:
        raise DashboardError(f"cannot write the compare page {out}: {e}") from e
    return {"out": str(out), "runs": len(runs), "groups": len(groups), "density_tokens": n_density}
