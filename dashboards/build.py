"""`vsae dashboard`: read a run and a cache, gather every latent's statistics in one pass, write the pages.

All I/O of the dashboard lives here; the statistics are tensor code in `gather.py` / `weights.py`, the pages are
assembled in `feature_pages.py` / `index_page.py`.

Output directory:
  index.html, latent.html          the index and the one latent page (latent.html#ID)
  assets/plotly.min.js, vsae.js/css  plotly.js once, the page script and stylesheet
  data/index.js, data/tsne.js      the index table and figures; t-SNE coordinates when eval made them
  data/latents/ID.js               one latent's data, loaded when its page opens
  dashboard.json                   what was built from what (read by `vsae compare` to link here); the marker:
                                   vsae replaces only a directory that has it

The whole directory is built beside --out and swapped in (`vsae.outputs.replace_dir`), so a kill at any moment leaves
the old complete dashboard or the new one; one `vsae dashboard` at a time writes an --out.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from activations.cache import manifest_hash, open_shards
from activations.devices import resolve_device
from activations.loader import ActivationLoader
from dashboards.feature_pages import (
    LatentExtras,
    TokenText,
    latent_documents,
    write_latent_page,
    write_latent_shell,
)
from dashboards.figures import density_histogram_figure, tsne_figure
from dashboards.gather import GatherConfig, Gatherer, LatentStats, select_firings
from dashboards.html import data_script, figure_data, install_assets, write_text
from dashboards.index_page import index_row, summary_html, write_index
from dashboards.run_info import eval_density_histogram, eval_figure_files, eval_tsne_maps, metric_summary
from dashboards.weights import decoder_neighbours, logit_effects
from evals.audit import read_audit, read_marks
from vsae.checkpoint import SAEWeights, read_sae
from vsae.firing import log10_density_histogram, special_ids, special_mask
from vsae.outputs import claim, replace_dir
from vsae.run import RunDir, read_run

DASHBOARD_META = "dashboard.json"


class DashboardError(RuntimeError):
    """A run, cache or option the dashboard cannot be built from as asked."""


def is_dashboard(path: Path) -> bool:
    """Whether `path` is a dashboard vsae wrote (its marker, dashboard.json)."""
    return (Path(path) / DASHBOARD_META).is_file()


@dataclass
class DashboardConfig:
    cache: str = field(metadata={
        "help": "activation cache the run was trained on (every row is scanned unless tokens is set)"})
    out: str = field(metadata={"help": "output directory (index.html, latent.html#ID, data/, assets/)"})
    features: str = field(default="all", metadata={
        "help": "latents to show: all | N (ids 0..N-1) | i,j,k | top-density:N (the N most frequent)"})
    contexts: int = field(default=20, metadata={"help": "top activating contexts per latent"})
    quantile_samples: int = field(default=4, metadata={"help": "contexts shown per activation-quantile band"})
    quantile_bands: int = field(default=5, metadata={"help": "activation-quantile bands per latent"})
    tokens: int | None = field(default=None, metadata={
        "help": "cache rows to scan, rounded up to whole sequences (unset: the whole cache)"})
    neighbours: int = field(default=10, metadata={"help": "nearest latents by decoder cosine listed per latent"})
    batch_size: int = field(default=4096, metadata={"help": "rows per batch (rounded down to whole sequences)"})
    device: str = field(default="auto", metadata={
        "help": "torch device; auto: CUDA when this machine has it, else CPU"})
    seed: int = field(default=0, metadata={"help": "seed of the uniform samples of firings"})
    progress: bool = field(default=True, metadata={"help": "progress bar"})
    audit: str | None = field(default=None, metadata={
        "help": "audit.json from `vsae audit`: the summary marks each metric that failed one of its lenses"})

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        if self.audit is not None:
            read_audit(self.audit)  # a bad file is refused before the scan, not after it


def parse_features(spec: str, d_sae: int) -> tuple[torch.Tensor, int | None]:
    """(latent ids to gather, N of top-density:N or None)."""
    spec = spec.strip()
    if spec == "all":
        return torch.arange(d_sae), None
    if spec.startswith("top-density:"):
        n = spec.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--features {spec}: expected top-density:N with N a positive integer")
        return torch.arange(d_sae), min(int(n), d_sae)
    if spec.isdigit():
        if int(spec) < 1:
            raise ValueError("--features N needs N >= 1")
        return torch.arange(min(int(spec), d_sae)), None
    try:
        ids = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"--features {spec!r}: expected all, N, a comma list of ids, or top-density:N") from None
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad or not ids:
        raise ValueError(f"--features {spec!r}: latent ids must be in 0..{d_sae - 1}" + (f", got {bad}" if bad else ""))
    return torch.tensor(ids), None


def check_run_matches_cache(info: RunDir, manifest: dict, d_in: int, cache: str) -> None:
    settings = manifest["settings"]
    if d_in != int(manifest["d_in"]):
        raise DashboardError(f"run {info.path} has d_in {d_in} but the cache {cache} has width {manifest['d_in']}; "
                             f"use the cache the run was trained on")
    if info.hook_name and info.hook_name != settings["hook_name"]:
        raise DashboardError(f"run {info.path} reads hook {info.hook_name} but the cache {cache} holds "
                             f"{settings['hook_name']}; use a cache of the same hook")
    cache_model = settings["model"].get("name") if isinstance(settings["model"], dict) else None
    if info.model_name and cache_model and info.model_name != cache_model:
        raise DashboardError(f"run {info.path} was trained on model {info.model_name} but the cache {cache} comes "
                             f"from {cache_model}; use a cache of the same model")


def gather(sae, cache: str, rows_per_seq: int, latents: torch.Tensor, cfg: DashboardConfig) -> tuple:
    """One pass over the cache, in batches of whole sequences: (LatentStats, rows scanned)."""
    R = rows_per_seq
    loader = ActivationLoader(cache, R * max(1, cfg.batch_size // R), split="all", shuffle=False, with_tokens=True)
    special = special_ids(loader.manifest)  # their rows are shown in contexts but never count as firings
    n_rows = loader.n_tokens if cfg.tokens is None else min(loader.n_tokens, -(-cfg.tokens // R) * R)
    if n_rows <= 0:
        raise DashboardError(f"the cache {cache} has no rows to scan")
    position = None
    if latents.numel() != sae.d_sae or not torch.equal(latents, torch.arange(sae.d_sae)):
        position = torch.full((sae.d_sae,), -1, dtype=torch.int64, device=cfg.device)
        position[latents.to(cfg.device)] = torch.arange(latents.numel(), device=cfg.device)
    g = Gatherer(latents, R, GatherConfig(n_top=cfg.contexts, seed=cfg.seed,
                                          n_reservoir=max(60, 3 * cfg.quantile_bands * cfg.quantile_samples)))
    first = 0
    bar = tqdm(total=n_rows, unit="tok", unit_scale=True, desc="dashboard", disable=not cfg.progress)
    with torch.no_grad():
        for x, toks in loader:
            x = x[: n_rows - first].to(cfg.device)
            counted = ~special_mask(toks[: x.shape[0], 0].to(cfg.device), special)
            code = sae.encode_topk(x)
            rows, lat, v = select_firings(code.vals, code.idx, position, counted)
            g.update(rows, lat, v, x.shape[0], first, n_counted=int(counted.sum()))
            first += x.shape[0]
            bar.update(x.shape[0])
            if first >= n_rows:
                break
    bar.close()
    return g.result(), n_rows


def _model_or_none(manifest: dict, device: str):
    from activations.models import load_model, source_from_manifest

    model = manifest["settings"]["model"]
    if not isinstance(model, dict) or model.get("kind") == "synthetic":
        return None
    return load_model(source_from_manifest(model), device=device)


@dataclass
class _Scan:
    """What the gathering stage hands on: the run, its SAE, the cache's token ids, and the statistics."""

    run: Path
    info: RunDir
    sae: SAEWeights
    manifest: dict
    token_ids: np.ndarray  # [n_rows]
    latents: torch.Tensor
    stats: LatentStats
    n_rows: int


def _first_rows(columns: list[np.ndarray], n: int) -> np.ndarray:
    """The first n entries of the shards' columns, reading only the shards that hold them (memory bounded by the
    scanned rows, not by the cache)."""
    out, have = [], 0
    for col in columns:
        if have >= n:
            break
        out.append(np.asarray(col[: n - have]))
        have += len(out[-1])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _scan(run: Path, cfg: DashboardConfig) -> _Scan:
    """Read the run and the cache, check they belong together, gather the shown latents' statistics."""
    sae, _ = read_sae(run, device=cfg.device)
    info = read_run(run)
    manifest, _, toks = open_shards(cfg.cache)
    check_run_matches_cache(info, manifest, sae.d_in, cfg.cache)
    latents, top_density = parse_features(cfg.features, sae.d_sae)
    stats, n_rows = gather(sae, cfg.cache, int(manifest["rows_per_sequence"]), latents, cfg)
    if top_density is not None:
        keep = torch.argsort(stats.count, descending=True, stable=True)[:top_density].sort().values
        stats = stats.take(keep)
        latents = stats.latents
    token_ids = _first_rows([tk[:, 0] for tk in toks], n_rows)
    return _Scan(run, info, sae, manifest, token_ids, latents, stats, n_rows)


def _weight_effects(scan: _Scan, cfg: DashboardConfig) -> tuple[TokenText, tuple | None, torch.Tensor,
                                                                 torch.Tensor, list[str]]:
    """(token text, logit effects or None, decoder-neighbour cosines and ids, notices) of the shown latents."""
    notices = []
    model = _model_or_none(scan.manifest, cfg.device)
    W_dec = scan.sae.W_dec.float()
    logits = None
    if model is None:
        notices.append("The cache names no loadable model (synthetic activations): tokens are shown as ids and "
                       "there are no logit effects.")
        text = TokenText(None)
    else:
        text = TokenText(model.tokenizer)
        ln = getattr(getattr(model, "ln_final", None), "w", None)
        with torch.no_grad():
            logits = logit_effects(W_dec[scan.latents.to(W_dec.device)], model.W_U.detach(),
                                   ln.detach() if ln is not None else None)
        logits = tuple(x.cpu() for x in logits)
    with torch.no_grad():
        cos, nb_ids = decoder_neighbours(W_dec, scan.latents.to(W_dec.device), n=cfg.neighbours)
    return text, logits, cos.cpu(), nb_ids.cpu(), notices


def _write_latents(out: Path, scan: _Scan, text: TokenText, extras: LatentExtras, tsne_maps: dict) -> list:
    """Write the shared assets, the latent page and every shown latent's data file into the new directory `out`;
    returns the index rows."""
    install_assets(out)
    write_latent_shell(out, scan.run.name)
    rows = []
    for doc in latent_documents(scan.stats, scan.token_ids, text, extras, set(scan.latents.tolist())):
        write_latent_page(out, doc)
        rows.append(index_row(doc))
    if tsne_maps:
        write_text(out / "data" / "tsne.js", data_script("tsneMaps", {
            name: {"x": [c[0] for c in m["coords"]], "y": [c[1] for c in m["coords"]], "ids": m["latent_ids"]}
            for name, m in tsne_maps.items()}))
    return rows


def _index_figures(scan: _Scan, tsne_maps: dict) -> list:
    """The index page's figures: density over the scanned tokens, eval's density, the t-SNE maps."""
    info, n_rows = scan.info, scan.n_rows
    figures = [["fig-density", figure_data(density_histogram_figure(
        {"scanned tokens": log10_density_histogram(scan.stats.density, scan.stats.n_tokens)},
        f"density of {scan.latents.numel()} latents, {n_rows:,} tokens")), False]]
    eval_hist = eval_density_histogram(info)
    if eval_hist:
        n_eval = (info.metrics.get("density") or {}).get("n_tokens")
        figures.append(["fig-eval-density", figure_data(density_histogram_figure(
            {"eval": eval_hist}, f"density on held-out eval tokens ({n_eval or '?'})")),
            False])
    for name, m in tsne_maps.items():
        figures.append([f"fig-tsne-{len(figures)}", figure_data(tsne_figure(m, f"t-SNE: {name} (click a point)")),
                        True])
    return figures


def _summary(scan: _Scan, cfg: DashboardConfig, n_dead: int) -> str:
    """The index page's summary: the run, the scan, the last training log line, eval's core and density."""
    info, latents = scan.info, scan.latents
    shown = "all" if latents.numel() == scan.sae.d_sae else f"{latents.numel()} ({cfg.features})"
    marks = read_marks(read_audit(cfg.audit)) if cfg.audit else None
    core = metric_summary(info.metrics.get("core") or {}, "core", marks)
    density_eval = metric_summary(info.metrics.get("density") or {}, "density", marks)
    last_log = info.log[-1] if info.log else {}
    config = info.config()
    headline = ("architecture", "sae.variant", "d_in", "d_sae", "k", "hook_name", "model", "tokens_seen")
    return summary_html({
        "run": {"name": scan.run.name, "path": str(scan.run), **{k: config[k] for k in headline if k in config}},
        "dashboard scan": {"cache": cfg.cache, "cache hash": manifest_hash(scan.manifest),
                           "tokens scanned": scan.n_rows, "latents shown": shown, "dead among shown": n_dead,
                           "dead fraction among shown": n_dead / max(latents.numel(), 1)},
        "training (last log line)": {k: v for k, v in last_log.items() if not isinstance(v, list | dict)},
        "eval: core": core,
        "eval: density": density_eval,
    }, {"full configuration": config})


def build_dashboard(run: str | Path, cfg: DashboardConfig) -> dict:
    """Write the dashboard of `run` into `cfg.out` (absent, empty, or a dashboard vsae wrote, which is replaced
    whole); returns a summary (paths, counts, seconds per stage)."""
    run = Path(run)
    out = Path(cfg.out)
    if cfg.contexts < 1 or cfg.quantile_samples < 0 or cfg.quantile_bands < 1:
        raise ValueError("--contexts and --quantile-bands must be >= 1, --quantile-samples >= 0")
    with claim(out, is_dashboard, "dashboard", DASHBOARD_META, DashboardError):
        return _build(run, out, cfg)


def _build(run: Path, out: Path, cfg: DashboardConfig) -> dict:
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    scan = _scan(run, cfg)
    times["gather"] = time.perf_counter() - t0

    t = time.perf_counter()
    text, logits, cos, nb_ids, notices = _weight_effects(scan, cfg)
    times["weights"] = time.perf_counter() - t

    t = time.perf_counter()
    info = scan.info
    ablation = {int(k): v for k, v in ((info.metrics.get("ablation") or {}).get("latents") or {}).items()
                if str(k).lstrip("-").isdigit() and isinstance(v, dict)}
    tsne_maps = eval_tsne_maps(info)
    tsne_pos = {name: {int(i): (float(x), float(y)) for i, (x, y) in zip(m["latent_ids"], m["coords"], strict=False)}
                for name, m in tsne_maps.items()}
    extras = LatentExtras(run_name=run.name, neighbour_cos=cos, neighbour_ids=nb_ids, logits=logits,
                          ablation=ablation, tsne=tsne_pos or None, n_bands=cfg.quantile_bands,
                          per_band=cfg.quantile_samples)
    n_dead = int(scan.stats.dead.sum())
    links = [(label, os.path.relpath(path, out)) for label, path in eval_figure_files(info)]  # from the final place
    meta = {"run": str(run.resolve()), "run_name": run.name, "cache": str(Path(cfg.cache).resolve()),
            "cache_hash": manifest_hash(scan.manifest), "n_tokens": scan.n_rows, "latents": scan.latents.tolist(),
            "n_dead": n_dead, "settings": asdict(cfg)}

    def write(tmp: Path) -> None:
        rows = _write_latents(tmp, scan, text, extras, tsne_maps)
        write_index(tmp, f"{run.name}: SAE dashboard", _summary(scan, cfg, n_dead), rows,
                    _index_figures(scan, tsne_maps), notices, links)
        write_text(tmp / DASHBOARD_META, json.dumps(meta) + "\n")

    replace_dir(out, write, is_dashboard, "dashboard", DashboardError)
    times["write"] = time.perf_counter() - t
    return {"out": str(out), "latents": scan.latents.numel(), "dead": n_dead, "tokens": scan.n_rows, "seconds": times}
