"""What the pages read from a run directory (`vsae.run.read_run`) beyond the weights: eval.json's density
histogram, its t-SNE maps and figures, and flat views of nested settings.

Every file is optional except cfg.json (read through `vsae.checkpoint.read_sae` elsewhere); a missing or unreadable
one reads as empty, so the pages show what is there.
"""

from __future__ import annotations

from pathlib import Path

from evals.audit import Mark, mark_for
from vsae.run import DENSITY_FIGURE, FIGURES_DIR, RunDir, read_json


def flat_scalars(d: dict, prefix: str = "", depth: int = 2) -> list[tuple[str, object]]:
    """(dotted key, value) of the numbers, strings and nulls in a nested dict, `depth` levels deep."""
    out = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 0:
            out += flat_scalars(v, name + ".", depth - 1)
        elif isinstance(v, bool | int | float | str) or v is None:
            out.append((name, v))
    return out


def metric_summary(result: dict, group: str = "", marks: dict[tuple[str, str], Mark] | None = None
                   ) -> dict[str, object]:
    """One eval.json group as a page's summary shows it: its top-level scalars, each with its 95% interval where
    measured, and for each number compared with random SAEs a line saying by how much it beats them and whether
    the difference is significant (a number that does not separate a trained SAE from a random one says so).
    With an audit's `marks` (`evals.audit.read_marks`) and the group's name, a number whose metric failed a lens
    is followed by a "KEY audit" line: the mark and why."""
    out: dict[str, object] = {}
    intervals = result.get("intervals") if isinstance(result.get("intervals"), dict) else {}
    for k, v in result.items():
        if isinstance(v, bool | int | float | str) or v is None:
            out[k] = v
            if marks and (mark := mark_for(marks, group, k)) is not None:
                out[f"{k} audit"] = f"{mark.text} ({mark.title})"
            pair = intervals.get(k)
            if isinstance(pair, list) and len(pair) == 2:
                out[f"{k} 95% interval"] = f"[{pair[0]:.4g}, {pair[1]:.4g}]"
    for k, c in (result.get("null") or {}).items():
        if isinstance(c, dict) and isinstance(c.get("difference"), int | float):
            text = f"{c['difference']:+.4g}"
            if isinstance(c.get("interval"), list):
                text += f" [{c['interval'][0]:.4g}, {c['interval'][1]:.4g}]"
            if c.get("includes_zero") is True:
                text += " (not separated from a random SAE)"
            out[f"{k} minus random SAE"] = text
    return out


def eval_density_histogram(run: RunDir) -> dict | None:
    """eval.json's log10 density histogram as {"edges", "counts", "n_dead"?}, or None when it has none."""
    h = (run.metrics.get("density") or {}).get("log10_density_histogram")
    if not (isinstance(h, dict) and h.get("edges") is not None and h.get("counts") is not None):
        return None
    out = {"edges": h["edges"], "counts": h["counts"]}
    if "n_dead" in h:
        out["n_dead"] = h["n_dead"]
    return out


def eval_tsne_maps(run: RunDir) -> dict[str, dict]:
    """The t-SNE coordinate files eval.json lists, read: name -> {coords, latent_ids, colors, ...}."""
    maps = {}
    for name, entry in (run.metrics.get("tsne") or {}).items():
        if isinstance(entry, dict):
            path = run.figure_file(entry.get("coordinates"))
            doc = read_json(path) if path else {}
            if doc.get("coords") is not None and doc.get("latent_ids") is not None:
                maps[name] = doc
    return maps


def eval_figure_files(run: RunDir) -> list[tuple[str, Path]]:
    """(label, path) of the HTML figures `vsae eval` wrote for this run."""
    out = []
    tsne = run.metrics.get("tsne") or {}
    for name, entry in tsne.items():
        if isinstance(entry, dict) and (path := run.figure_file(entry.get("figure"))):
            out.append((f"t-SNE: {name}", path))
    density = run.figure_file(f"{FIGURES_DIR}/{DENSITY_FIGURE}")
    if density:
        out.append(("density histogram", density))
    return out
