"""`vsae compare`: N runs side by side on one self-contained page.

Config differences, a metric table (eval.json's core, density, SCR/TPP at each N, independence; latent densities
measured here on the cache's held-out tokens), overlaid density histograms, training curves from log.jsonl, the
eval t-SNE maps side by side and the joint map, and latents matched across runs by decoder cosine (best match,
its cosine, a histogram of best-match cosines, links into each run's dashboard when given).

Runs are grouped by (model, hook, d_in): decoder rows and densities are compared only within a group, and the
page says so when there is more than one group.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from activations.cache import manifest_hash, read_manifest
from activations.loader import ActivationLoader
from dashboards.assets import CSS
from dashboards.build import DASHBOARD_META, DashboardError
from dashboards.feature_pages import LATENT_PAGE
from dashboards.figures import best_match_figure, density_histogram_figure, training_curves_figure, tsne_figure
from dashboards.html import esc, figure_data, fmt, inline_assets, page, script_json, table, write_text
from dashboards.run_info import eval_density_histogram, eval_tsne_maps, flat_scalars
from dashboards.weights import DECODER_COSINE_DEFINITION, best_matches
from vsae.checkpoint import SAEWeights, read_sae
from vsae.firing import DENSE_THRESHOLD, FiringCounter, log10_density_histogram, special_ids, special_mask
from vsae.run import RunDir, read_run

METRIC_GROUPS = ("core", "density", "scr", "tpp", "independence")
MATCH_THRESHOLD = 0.9


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
    batch_size: int = field(default=4096, metadata={"help": "rows per batch"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    progress: bool = field(default=True, metadata={"help": "progress bar"})


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
    densities, seen = measure_densities([r.sae for r in runs], cache, runs[0].info.eval_fraction, cfg)
    for r, density in zip(runs, densities, strict=True):
        r.density = density
    return seen


def _latent_link(r: Run, latent: int, out_dir: Path) -> str:
    """A latent id as HTML, linked to its page in the run's dashboard when that dashboard shows it."""
    if r.dashboard is not None and r.dashboard_latents is not None and latent in r.dashboard_latents:
        href = os.path.relpath(r.dashboard / LATENT_PAGE, out_dir) + f"#{latent}"
        return f'<a href="{esc(href)}">{latent}</a>'
    return str(latent)


def _config_section(runs: list[Run]) -> str:
    configs = [r.info.config() for r in runs]
    keys = sorted({k for c in configs for k in c})
    head = ["setting"] + [esc(_label(r)) for r in runs]

    def cell(v) -> str:
        return fmt(v) if not isinstance(v, list | dict) else esc(json.dumps(v))

    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
    rows = [[esc(k)] + [cell(c.get(k)) for c in configs] for k in differ]
    same = [[esc(k)] + [cell(c.get(k)) for c in configs] for k in keys if k not in differ]
    diff_html = table(rows, head, cls="data") if rows else '<p class="muted">No configuration differences.</p>'
    return (f"<h2>Configuration differences</h2>{diff_html}"
            f"<details><summary>settings shared by all runs ({len(same)})</summary>{table(same, head, cls='data')}"
            f"</details>")


def _headline(group: str, metrics: dict) -> list[tuple[str, object]]:
    """The numbers of one eval.json metric group worth a row: top-level scalars (and one level below), for
    SCR/TPP their `metrics` (the score at each N) and means, not probe accuracies or rankings."""
    if group in ("scr", "tpp"):
        top = [(k, v) for k, v in metrics.items() if not isinstance(v, dict | list)]
        return top + flat_scalars(metrics.get("metrics") or {}, depth=0)
    return flat_scalars(metrics, depth=1)


def _metric_section(runs: list[Run], n_density: int) -> str:
    names: list[str] = []
    values: list[dict] = []
    for r in runs:
        m = r.info.metrics
        flat = {}
        for group in METRIC_GROUPS:
            g = m.get(group)
            if isinstance(g, dict):
                flat.update({f"{group}.{k}": v for k, v in _headline(group, g) if not isinstance(v, str)})
        if r.density is not None:
            flat[f"cache.dead_fraction ({n_density:,} held-out tokens)"] = float((r.density == 0).mean())
            flat[f"cache.dense_fraction (> {DENSE_THRESHOLD}, {n_density:,} tokens)"] = float(
                (r.density > DENSE_THRESHOLD).mean())
        flat["d_sae"] = r.sae.d_sae
        flat["k"] = r.sae.k
        if r.info.log:
            for k in ("mse", "l0", "dead_fraction"):
                if k in r.info.log[-1]:
                    flat[f"train (last log).{k}"] = r.info.log[-1][k]
        values.append(flat)
        names += [k for k in flat if k not in names]
    head = ["metric"] + [esc(_label(r)) for r in runs]
    rows = [[esc(k)] + [fmt(v.get(k)) for v in values] for k in names]
    hashes = {r.info.eval.get("cache_hash") for r in runs if r.info.eval}
    note = ""
    if len(hashes) > 1:
        note = ('<p class="warn">The eval.json files were computed on different caches; their metrics are not '
                "measured on the same tokens.</p>")
    return f"<h2>Metrics</h2>{note}{table(rows, head, cls='data')}"


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
            f"{summary}<div class=\"plot\" id=\"{fig_id}\"></div>"
            f"<h3>The {len(order)} {which} latents of {esc(_label(ref))} and their best matches</h3>"
            f"{table(rows, head, cls='data')}")


def _tsne_section(runs: list[Run], out_dir: Path, figures: list) -> str:
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
            cells.append(f'<div class="plot" id="{fig_id}"></div>')
        parts.append(f"<h3>t-SNE of {esc(kind)}</h3><div class=\"side\">{''.join(cells)}</div>")
    names = {str(r.info.path) for r in runs} | {str(r.info.path.resolve()) for r in runs}
    joint = None
    for r in runs:
        entry = (r.info.metrics.get("tsne") or {}).get("joint")
        if isinstance(entry, dict) and (path := r.info.figure_file(entry.get("figure"))):
            covered = sum(1 for x in entry.get("runs") or [] if x in names or str(Path(x).resolve()) in names)
            if covered >= 2:
                joint = (path, entry)
                break
    if joint:
        href = os.path.relpath(joint[0], out_dir)
        parts.append(f'<h3>Joint decoder t-SNE</h3><p class="note">From vsae eval of '
                     f'{esc(", ".join(Path(x).name for x in joint[1].get("runs") or []))} '
                     f'(<a href="{esc(href)}">open</a>).</p><iframe class="fig" src="{esc(href)}" '
                     f'title="joint t-SNE"></iframe>')
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
            dens_parts.append(f'<div class="plot" id="{fig_id}"></div>')
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
    return table(run_rows, ['run', 'path', 'activations', 'dashboard'], cls='data')


def compare_runs(paths: list[str | Path], cfg: CompareConfig) -> dict:
    """Write the comparison page of `paths` to `cfg.out`; returns a summary."""
    if len(paths) < 2:
        raise ValueError("vsae compare needs at least two runs")
    out = Path(cfg.out)
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
    sections = [_config_section(runs), _metric_section(runs, n_density), _density_section(groups, n_density, figures)]
    curves = training_curves_figure({_label(r): r.info.log for r in runs if r.info.log})
    if curves is not None:
        figures.append(["fig-curves", figure_data(curves), False])
        sections.append('<h2>Training curves (log.jsonl)</h2><div class="plot" id="fig-curves"></div>')
    sections.append(_tsne_section(runs, out_dir, figures))
    sections.append(_matches(groups, out_dir, cfg, figures))

    notice_html = "".join(f'<p class="warn">{esc(n)}</p>' for n in notices)
    body = (f"<h1>Comparison of {len(runs)} runs</h1>{notice_html}{_runs_table(runs, out_dir)}"
            f'<p class="note">Cache: {esc(cfg.cache)} (hash {esc(manifest_hash(manifest))}).</p>'
            + "".join(sections))
    plotly_js, vsae_js = inline_assets()
    html_text = page(f"vsae compare: {', '.join(_label(r) for r in runs)}", body, css=CSS,
                     inline=(plotly_js, vsae_js, f"VSAE.figures({script_json(figures)});"))
    write_text(out, html_text)
    return {"out": str(out), "runs": len(runs), "groups": len(groups), "density_tokens": n_density}
