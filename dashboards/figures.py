"""Plotly figures shared by the dashboard index and the compare page, built from plain data (no I/O).

Every label that carries a name from disk (run names) goes through `plotly_text`.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards.html import plotly_text

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
LAYOUT = {"margin": {"l": 55, "r": 15, "t": 40, "b": 45}, "template": "plotly_white"}
# Training-curve quantities of log.jsonl, in display order, with their axis titles.
CURVES = (("loss", "loss"), ("mse", "MSE"), ("kl", "KL"), ("auxk", "AuxK"), ("l0", "L0"),
          ("dead_fraction", "dead fraction"))


def density_histogram_figure(hists: dict[str, dict], title: str) -> go.Figure:
    """log10 latent density histograms ({"edges", "counts", "n_dead"} per name), overlaid as step lines."""
    fig = go.Figure()
    for i, (name, h) in enumerate(hists.items()):
        edges, counts = np.asarray(h["edges"], dtype=float), list(h["counts"])
        dead = h.get("n_dead")
        label = plotly_text(name) + (f" ({dead} dead)" if dead is not None else "")
        fig.add_trace(go.Scatter(x=edges.tolist(), y=counts + counts[-1:], mode="lines", line_shape="hv",
                                 name=label, line={"color": COLORS[i % len(COLORS)], "width": 2},
                                 fill="tozeroy" if len(hists) == 1 else None))
    fig.update_layout(title={"text": plotly_text(title)}, xaxis_title="log10 density (alive latents)",
                      yaxis_title="latents", showlegend=len(hists) > 1 or any("n_dead" in h for h in hists.values()),
                      legend={"orientation": "h", "y": -0.2}, **LAYOUT)
    return fig


def tsne_figure(tsne: dict, title: str) -> go.Figure:
    """A t-SNE map from `vsae eval`'s coordinates JSON (coords, latent_ids, colors, runs); the latent id is each
    point's customdata, so a click can open its page."""
    coords = np.asarray(tsne.get("coords") or [], dtype=float).reshape(-1, 2)
    ids = list(tsne.get("latent_ids") or [])
    fig = go.Figure()
    if len(ids) == 0:
        fig.add_annotation(text="empty map (too few latents qualified)", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    else:
        colors = {k: v for k, v in (tsne.get("colors") or {}).items() if k not in ("cluster", "run")}
        name, values = next(iter(colors.items()), (None, None))
        marker = {"size": 4}
        # float32 and int32 arrays: plotly writes them as packed binary, a third of the page that float64 would be
        if values is not None:
            marker.update(color=np.array([v if v is not None else math.nan for v in values], dtype=np.float32),
                          colorscale="Viridis", colorbar={"title": {"text": plotly_text(name)}, "thickness": 12})
        fig.add_trace(go.Scattergl(x=coords[:, 0].astype(np.float32), y=coords[:, 1].astype(np.float32),
                                   mode="markers", marker=marker, customdata=np.asarray(ids, dtype=np.int32),
                                   hovertemplate="latent %{customdata}<extra></extra>", showlegend=False))
    fig.update_layout(title={"text": plotly_text(title)}, xaxis={"visible": False}, yaxis={"visible": False},
                      **LAYOUT)
    return fig


def training_curves_figure(logs: dict[str, list[dict]]) -> go.Figure | None:
    """One panel per quantity of log.jsonl (loss parts, L0, dead fraction) against tokens; one line per run."""
    present = [(key, label) for key, label in CURVES if any(key in line for lines in logs.values() for line in lines)]
    if not present:
        return None
    cols = 3
    rows = -(-len(present) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[label for _, label in present],
                        horizontal_spacing=0.07, vertical_spacing=0.14)
    for i, (name, lines) in enumerate(logs.items()):
        for j, (key, _) in enumerate(present):
            pts = [(line.get("tokens", line.get("step")), line[key]) for line in lines
                   if key in line and line[key] is not None]
            if not pts:
                continue
            x, y = zip(*pts, strict=True)
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=plotly_text(name), legendgroup=str(i),
                                     showlegend=j == 0, line={"color": COLORS[i % len(COLORS)]}),
                          row=j // cols + 1, col=j % cols + 1)
    fig.update_xaxes(title_text="tokens", row=rows)
    fig.update_layout(height=300 * rows, legend={"orientation": "h", "y": -0.12}, **LAYOUT)
    return fig


def best_match_figure(cosines: dict[str, list[float]], title: str) -> go.Figure:
    """Histograms of best-match decoder cosines, one per pair of runs, overlaid as step lines. Binned here (bins of
    0.02 over [-1, 1]), so a page comparing many runs carries counts, not every latent's cosine."""
    edges = np.linspace(-1.0, 1.0, 101)
    fig = go.Figure()
    for i, (name, cos) in enumerate(cosines.items()):
        counts = np.histogram(np.clip(np.asarray(cos, dtype=float), -1.0, 1.0), bins=edges)[0].tolist()
        fig.add_trace(go.Scatter(x=edges.tolist(), y=counts + counts[-1:], mode="lines", line_shape="hv",
                                 name=plotly_text(name), line={"color": COLORS[i % len(COLORS)], "width": 1.5}))
    fig.update_layout(title={"text": plotly_text(title)}, xaxis_title="best-match cosine",
                      yaxis_title="latents", legend={"orientation": "h", "y": -0.2}, **LAYOUT)
    return fig


def run_hover(name: str, switches: dict[str, str]) -> str:
    """A run's hover text: its name, then one line per switch (a config key that differs between the runs),
    escaped for plotly's label markup."""
    return "<br>".join([f"<b>{plotly_text(name)}</b>"] + [plotly_text(f"{k} = {v}") for k, v in switches.items()])


def frontier_figure(points: list[dict], x: str, y: str, axis_titles: tuple[str, str], title: str) -> go.Figure:
    """One marker per run, `x` against `y` (keys of each point, both numbers; points lacking either are left out):
    SAEBench's sparsity-fidelity plot. A point is {"name", "switches": {key: value text}, "group", x, y}; one
    colour per group, and the hover names the run and its switches."""
    shown = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    fig = go.Figure()
    groups = list(dict.fromkeys(str(p.get("group") or "") for p in shown))
    for i, group in enumerate(groups):
        members = [p for p in shown if str(p.get("group") or "") == group]
        fig.add_trace(go.Scatter(
            x=[p[x] for p in members], y=[p[y] for p in members], mode="markers", name=plotly_text(group),
            text=[run_hover(p["name"], p.get("switches") or {}) for p in members],
            hovertemplate=f"%{{text}}<br>{plotly_text(axis_titles[0])} %{{x:.4g}}, "
                          f"{plotly_text(axis_titles[1])} %{{y:.4g}}<extra></extra>",
            marker={"size": 9, "color": COLORS[i % len(COLORS)], "line": {"width": 1, "color": "#fff"}}))
    if not shown:
        fig.add_annotation(text="no run has both numbers in its eval.json", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    xs = [p[x] for p in shown]
    log_x = bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 10
    fig.update_layout(title={"text": plotly_text(title)}, xaxis={"title": {"text": plotly_text(axis_titles[0])},
                                                               "type": "log" if log_x else "linear"},
                      yaxis_title=plotly_text(axis_titles[1]), showlegend=any(groups),
                      legend={"orientation": "h", "y": -0.2}, **LAYOUT)
    return fig
