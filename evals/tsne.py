"""t-SNE maps of SAE latents: pure functions from tensors to a `TsneMap` (coordinates + colourings + figure).

Three maps (DESIGN.md "t-SNE maps", PAPER.md section 4):
- `activation_tsne`: the paper's `feature_tsne`: one point per latent firing on > 1% of the tokens, its z-scored
  activation profile over those tokens, Euclidean metric, coloured by k-means cluster, usage rate, mean activation.
- `decoder_tsne`: unit-norm decoder rows of alive latents, cosine metric, PCA init, coloured by log10 density.
- `joint_decoder_tsne`: one decoder map over several runs of the same width, coloured by run.

Settings shared by all maps: scikit-learn Barnes-Hut t-SNE, 2-D, perplexity min(30, (n - 1) // 3) (the paper's rule;
t-SNE needs n > 3 * perplexity), learning_rate "auto", 1000 iterations, random_state = seed (42).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

MIN_POINTS = 5  # below this a 2-D embedding says nothing; the map is returned empty (n = 0) instead
MAX_PERPLEXITY = 30
MAX_ITER = 1000  # sklearn's default and the paper's; Barnes-Hut keeps 8192 points well under 2 minutes on 2 cores
DENSITY_FLOOR = 1e-10  # log10 of a zero density would be -inf (not JSON); floored to -10
CATEGORICAL = ("cluster", "run")  # colour fields drawn as one legend entry per value, not a colour scale
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
COLORSCALES = {"usage_rate": "Viridis", "mean_activation": "Plasma", "log10_density": "Viridis"}


@dataclass
class TsneMap:
    """A 2-D t-SNE map of latents.

    coords: [n, 2] float32 map coordinates (n = 0 when too few latents qualified).
    latent_ids: [n] int64 latent index in its run's dictionary.
    colors: colour field name -> [n] array (e.g. "cluster", "usage_rate", "log10_density", "run").
    runs: [n] run label per point for joint maps, else None.
    settings: what produced the map (kind, perplexity, metric, pca_dims, seed, n, ...), saved with the coordinates.
    """

    coords: np.ndarray
    latent_ids: np.ndarray
    colors: dict[str, np.ndarray] = field(default_factory=dict)
    runs: np.ndarray | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.coords.shape[0])

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: settings, coordinates, latent ids, colour fields and run labels."""
        return {
            "settings": {k: _plain(v) for k, v in self.settings.items()},
            "coords": np.round(self.coords.astype(np.float64), 5).tolist(),
            "latent_ids": self.latent_ids.tolist(),
            "colors": {k: _plain(v) for k, v in self.colors.items()},
            "runs": None if self.runs is None else [str(r) for r in self.runs],
        }

    def figure(self, title: str = ""):
        """A plotly scatter with a dropdown choosing the colouring; hover shows the latent id and every colour value."""
        import plotly.graph_objects as go

        title = title or f"t-SNE: {self.settings.get('kind', 'latents')}"
        fig = go.Figure()
        if self.n == 0:
            reason = self.settings.get("reason", f"fewer than {MIN_POINTS} latents qualified")
            fig.add_annotation(text=f"too few latents to map ({reason})", showarrow=False, x=0.5, y=0.5,
                               xref="paper", yref="paper", font={"size": 16})
            fig.update_layout(title=title, xaxis={"visible": False}, yaxis={"visible": False})
            return fig

        fields = list(self.colors)
        groups = self._add_traces(fig, fields)
        buttons = [{"label": name, "method": "update", "args": [{"visible": [x == g for x in groups]}]}
                   for g, name in enumerate(fields)]
        s = self.settings
        subtitle = (f"n={self.n}, perplexity={s.get('perplexity')}, metric={s.get('metric')}, "
                    f"pca_dims={s.get('pca_dims')}, seed={s.get('seed')}")
        fig.update_layout(
            title={"text": f"{title}<br><sup>{subtitle}</sup>"},
            updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.12,
                          "yanchor": "top", "showactive": True}] if len(fields) > 1 else [],
            xaxis={"showticklabels": False, "title": ""}, yaxis={"showticklabels": False, "title": ""},
            template="plotly_white", legend={"itemsizing": "constant"})
        return fig

    def _hover(self, fields: list[str]) -> tuple[np.ndarray, str]:
        """(customdata, hovertemplate), the same for every trace: the latent id, its run, then each colour value."""
        lines = ["latent %{customdata[0]}"]
        custom = [self.latent_ids.astype(object)]
        if self.runs is not None:
            lines.append("run %{customdata[1]}")
            custom.append(self.runs.astype(object))
        for name in fields:
            if name == "run":
                continue
            j = len(custom)
            values = self.colors[name]
            if values.dtype.kind == "f":
                lines.append(f"{name} %{{customdata[{j}]:.4g}}")
            else:
                lines.append(f"{name} %{{customdata[{j}]}}")
            custom.append(values.astype(object))
        return np.stack(custom, axis=1), "<br>".join(lines) + "<extra></extra>"

    def _add_traces(self, fig, fields: list[str]) -> list[int]:
        """One group of traces per colouring (the dropdown shows one group at a time); the group of each trace."""
        import plotly.graph_objects as go

        customdata, hover = self._hover(fields)
        groups: list[int] = []
        for g, name in enumerate(fields):
            values = self.colors[name]
            if name in CATEGORICAL:
                for i, cat in enumerate(np.unique(values)):
                    m = values == cat
                    fig.add_trace(go.Scattergl(
                        x=self.coords[m, 0], y=self.coords[m, 1], mode="markers", name=f"{name} {cat}",
                        marker={"size": 5, "color": PALETTE[i % len(PALETTE)]}, customdata=customdata[m],
                        hovertemplate=hover, visible=g == 0, legendgroup=name))
                    groups.append(g)
            else:
                fig.add_trace(go.Scattergl(
                    x=self.coords[:, 0], y=self.coords[:, 1], mode="markers", name=name, showlegend=False,
                    marker={"size": 5, "color": values, "colorscale": COLORSCALES.get(name, "Viridis"),
                            "colorbar": {"title": {"text": name}}},
                    customdata=customdata, hovertemplate=hover, visible=g == 0))
                groups.append(g)
        return groups


def perplexity_for(n: int) -> int:
    """The paper's perplexity min(30, (n - 1) // 3): t-SNE needs n > 3 * perplexity neighbours."""
    return min(MAX_PERPLEXITY, (n - 1) // 3)


def activation_tsne(z: Tensor, min_density: float = 0.01, seed: int = 42, pca_dims: int | None = 50,
                    max_iter: int = MAX_ITER) -> TsneMap:
    """The paper's latent map from sparse codes `z` [N tokens, d_sae].

    One point per latent firing (z > 0) on more than `min_density` of the N tokens; its activation profile over
    the N tokens is z-scored per latent, so Euclidean distance between points is sqrt(2N(1 - Pearson rho)).
    Profiles are reduced to `pca_dims` principal components first when both N and the latent count exceed it (the
    profile has N = 100k dimensions by default; None disables). Colours: "cluster" (k-means in map space with the
    paper's min(10, max(2, n // 10)) clusters, so the colouring matches its figure: about ten points per cluster
    for small maps, at most ten colours to tell apart), "usage_rate" (density over the N tokens) and
    "mean_activation" (mean over the tokens where the latent fires).
    """
    n_tokens = int(z.shape[0])
    count = (z > 0).sum(0)
    density = count.double() / max(1, n_tokens)
    ids = torch.nonzero(density > min_density).flatten()
    settings: dict[str, Any] = {"kind": "activations", "metric": "euclidean", "seed": seed, "min_density": min_density,
                                "n_tokens": n_tokens, "d_sae": int(z.shape[1])}
    n = int(ids.numel())
    if n < MIN_POINTS:
        return _empty(settings, f"{n} latents fire on > {min_density:g} of {n_tokens} tokens")

    # Profiles as columns of one copy [N, n] (a row gather: a column gather of z.T is cache-hostile at 100k x 8192),
    # z-scored in place; the t-SNE points are its columns, so PCA works on the transposed view without copying.
    x = z.index_select(1, ids).float()
    fired_sum = sum(c.clamp_min(0).sum(0) for c in x.split(8192))  # chunks: no second full-size temporary
    mean_act = (fired_sum.double() / count[ids]).cpu().numpy()
    mu = x.mean(0, keepdim=True)
    sd = x.std(0, keepdim=True, correction=0).clamp_min(1e-12)  # a latent constant over all tokens maps to 0
    x.sub_(mu).div_(sd)

    use_pca = pca_dims is not None and pca_dims > 0 and min(x.shape) > pca_dims
    points = _pca(x.T, pca_dims, seed) if use_pca else x.T.contiguous()
    coords, tsne_settings = _tsne(points.cpu().numpy(), metric="euclidean", seed=seed, max_iter=max_iter, init="pca")

    from sklearn.cluster import KMeans

    n_clusters = min(10, max(2, n // 10))
    clusters = KMeans(n_clusters=n_clusters, random_state=seed, n_init=10).fit_predict(coords)
    settings.update(tsne_settings, pca_dims=pca_dims if use_pca else None, n_clusters=n_clusters)
    colors = {"cluster": clusters.astype(np.int64), "usage_rate": density[ids].cpu().numpy(),
              "mean_activation": mean_act}
    return TsneMap(coords=coords, latent_ids=ids.cpu().numpy().astype(np.int64), colors=colors, settings=settings)


def decoder_tsne(W_dec: Tensor, alive: Tensor, density: Tensor, seed: int = 42, max_iter: int = MAX_ITER) -> TsneMap:
    """Map of the unit-norm decoder rows of alive latents (cosine metric, PCA init), coloured by log10 density.

    W_dec [d_sae, d_in]; alive [d_sae] bool; density [d_sae] firing rate per latent (floored at 1e-10 before log10).
    No PCA reduction: Barnes-Hut cost is in the gradient steps, not the dimension, and PCA would distort cosines.
    """
    settings: dict[str, Any] = {"kind": "decoder", "metric": "cosine", "seed": seed, "d_sae": int(W_dec.shape[0]),
                                "d_in": int(W_dec.shape[1]), "pca_dims": None}
    ids = torch.nonzero(alive.detach().cpu().bool()).flatten()
    if ids.numel() < MIN_POINTS:
        return _empty(settings, f"{ids.numel()} alive latents")
    coords, tsne_settings = _tsne(_unit_rows(W_dec, ids), metric="cosine", seed=seed, max_iter=max_iter, init="pca")
    settings.update(tsne_settings)
    log_density = np.log10(np.clip(density.detach().cpu()[ids].double().numpy(), DENSITY_FLOOR, None))
    return TsneMap(coords=coords, latent_ids=ids.numpy().astype(np.int64), colors={"log10_density": log_density},
                   settings=settings)


def joint_decoder_tsne(decoders: dict[str, tuple[Tensor, Tensor]], seed: int = 42,
                       max_iter: int = MAX_ITER) -> TsneMap:
    """One decoder map over several runs ({run name: (W_dec, alive)}), coloured by run, for comparisons.

    Only runs of one width (d_sae) are mapped together: a wider dictionary splits features finer and would crowd the
    map, so density of points would compare widths rather than runs. Raises ValueError naming the widths otherwise.
    """
    if not decoders:
        raise ValueError("joint_decoder_tsne needs at least one run")
    widths = {name: int(w.shape[0]) for name, (w, _) in decoders.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(f"joint decoder map needs runs of one width (d_sae); got {widths}")
    d_ins = {name: int(w.shape[1]) for name, (w, _) in decoders.items()}
    if len(set(d_ins.values())) > 1:
        raise ValueError(f"joint decoder map needs one input size (d_in); got {d_ins}")

    rows, ids, runs = [], [], []
    for name, (w, alive) in decoders.items():
        idx = torch.nonzero(alive.detach().cpu().bool()).flatten()
        rows.append(_unit_rows(w, idx))
        ids.append(idx.numpy().astype(np.int64))
        runs += [name] * int(idx.numel())
    settings: dict[str, Any] = {"kind": "joint_decoder", "metric": "cosine", "seed": seed, "pca_dims": None,
                                "d_sae": next(iter(widths.values())), "runs": list(decoders)}
    if len(runs) < MIN_POINTS:
        return _empty(settings, f"{len(runs)} alive latents over {len(decoders)} runs")
    coords, tsne_settings = _tsne(np.concatenate(rows), metric="cosine", seed=seed, max_iter=max_iter, init="pca")
    settings.update(tsne_settings)
    run_labels = np.array(runs, dtype=object)
    return TsneMap(coords=coords, latent_ids=np.concatenate(ids), colors={"run": run_labels}, runs=run_labels,
                   settings=settings)


def _tsne(x: np.ndarray, metric: str, seed: int, max_iter: int, init: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Barnes-Hut t-SNE of rows `x` with the paper's settings; returns (coords [n, 2] float32, settings)."""
    from sklearn.manifold import TSNE

    n = x.shape[0]
    perplexity = perplexity_for(n)
    tsne = TSNE(n_components=2, perplexity=perplexity, learning_rate="auto", max_iter=max_iter, metric=metric,
                init=init, random_state=seed, method="barnes_hut")
    coords = tsne.fit_transform(x).astype(np.float32)
    return coords, {"n": n, "perplexity": perplexity, "max_iter": max_iter, "init": init, "method": "barnes_hut",
                    "kl_divergence": float(tsne.kl_divergence_)}


def _pca(x: Tensor, dims: int, seed: int, n_iter: int = 4) -> Tensor:
    """Scores [n, dims] of rows `x` [n, D] on their top `dims` principal components, by seeded randomized SVD
    (Halko et al. 2009, alg. 4.4 + 5.1). The row mean is applied as a rank-one correction: x may be several GB and
    torch.svd_lowrank's `M` (a broadcast view) may be materialised at every product."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    mean = x.mean(0, keepdim=True)  # [1, D]

    def centred_mul(r: Tensor) -> Tensor:  # (x - mean) @ r
        return x @ r - mean @ r

    def centred_t_mul(q: Tensor) -> Tensor:  # (x - mean).T @ q
        return x.T @ q - mean.T @ q.sum(0, keepdim=True)

    k = min(dims + 10, *x.shape)  # oversampling sharpens the top `dims` directions
    basis = torch.linalg.qr(centred_mul(torch.randn(x.shape[1], k, generator=g, device=x.device))).Q
    for _ in range(n_iter):  # power iterations: the spectrum of latent profiles decays slowly
        basis = torch.linalg.qr(centred_mul(torch.linalg.qr(centred_t_mul(basis)).Q)).Q
    u, s, _ = torch.linalg.svd(centred_t_mul(basis).T, full_matrices=False)  # SVD of basis.T @ (x - mean), [k, D]
    return (basis @ u[:, :dims]) * s[:dims]


def _unit_rows(W_dec: Tensor, ids: Tensor) -> np.ndarray:
    """Decoder rows `ids` scaled to unit norm, float32 numpy (zero rows stay zero)."""
    w = W_dec.detach().index_select(0, ids.to(W_dec.device)).float()
    return (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)).cpu().numpy()


def _empty(settings: dict[str, Any], reason: str) -> TsneMap:
    settings.update(n=0, reason=f"{reason}; need at least {MIN_POINTS}")
    return TsneMap(coords=np.zeros((0, 2), np.float32), latent_ids=np.zeros(0, np.int64), settings=settings)


def _plain(v: Any) -> Any:
    """numpy values and arrays as plain Python (JSON has no numpy types, NaN or inf)."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v
