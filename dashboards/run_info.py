"""What the pages read from a run directory (`vsae.run.read_run`) beyond the weights: eval.json's density
histogram, its t-SNE maps and figures, and flat views of nested settings.

Every file is optional except cfg.json (read through `vsae.checkpoint.read_sae` elsewhere); a missing or unreadable
one reads as empty, so the pages show what is there.
"""

from __future__ import annotations

from pathlib import Path

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
