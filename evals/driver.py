"""`vsae eval`: read runs and a cache, compute the requested metrics, write eval.json and figures.

All I/O of the evaluation lives here; the metrics themselves are tensor
functions in the sibling modules. Several runs are evaluated on the same
held-out tokens, read once.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from activations.atomic import write_text_atomic
from activations.cache import manifest_hash, read_manifest, sequence_tokens
from activations.loader import ActivationLoader, split_sequences
from activations.models import load_model, source_from_manifest, special_token_ids
from evals.figures import write_figure
from vsae.checkpoint import CheckpointError, SAEWeights, read_sae
from vsae.code import TopKCode
from vsae.firing import FiringCounter, special_ids, special_mask
from vsae.run import DENSITY_FIGURE, EVAL_JSON, FIGURES_DIR, read_run, read_trainer_state

N_VALUES = (2, 5, 10, 20, 50, 100, 500)
METRICS = ("core", "density", "ablation", "tpp", "scr", "independence", "tsne")

DEFINITIONS = {
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
    "dead_fraction": "fraction of latents that never fire on the N eval tokens (N reported)",
    "dense_fraction": "fraction of latents with eval density > 0.1",
    "ablation": "per latent i: on contexts where i fires, remove z_i * W_dec[i] from the spliced reconstruction; mean "
                "increase of next-token CE and mean KL to the unablated spliced output",
    "tpp": "SAEBench targeted probe perturbation (METRICS.md section 5), probes selected on a validation split",
    "scr": "SAEBench spurious correlation removal (METRICS.md section 4), probes selected on a validation split",
    "independence": "mean |Pearson rho| over pairs of alive latents, fraction |rho| > 0.3, mean max |cos| between "
                    "decoder rows, co-firing of the most frequent latents (evals/independence.py)",
    "tsne": "activations: latents active on > 1% of tokens, z-scored profiles, Euclidean; decoder: unit decoder rows "
            "of alive latents, cosine metric, PCA init",
}


@dataclass
class EvalConfig:
    cache: str = field(metadata={"help": "activation cache the runs were trained on (its held-out split is used)"})
    metrics: list[str] = field(default_factory=lambda: ["core", "density"], metadata={
        "help": "metric groups to compute"})
    tokens: int = field(default=100_000, metadata={
        "help": "held-out activation rows (special tokens excluded) streamed for core and density; the "
                "independence and t-SNE samples are the first of them"})
    ce_contexts: int = field(default=64, metadata={
        "help": "held-out contexts run through the model for CE / KL scores and ablations"})
    ablation_latents: int = field(default=16, metadata={
        "help": "how many of the most frequent latents to ablate (when latents is unset)"})
    latents: list[int] | None = field(default=None, metadata={"help": "explicit latent ids to ablate"})
    tsne_tokens: int = field(default=20_000, metadata={
        "help": "held-out rows whose latent activations form the t-SNE profiles"})
    independence_tokens: int = field(default=20_000, metadata={
        "help": "held-out rows whose latent activations give the independence statistics (with t-SNE too, "
                "both use the larger of this and tsne_tokens)"})
    batch_size: int = field(default=4096, metadata={"help": "rows per batch"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    seed: int = field(default=42, metadata={
        "help": "seed of the independence pair sample, the offline labelled sets and the probes"})
    labelled: str = field(default="offline", metadata={
        "help": "labelled data for SCR / TPP: offline (generated) or real (Bias in Bios, Amazon reviews "
                "via the hub)"})
    # SAEBench's train / test set sizes for SCR and TPP
    labelled_train: int = field(default=4000, metadata={"help": "SCR / TPP training texts"})
    labelled_test: int = field(default=1000, metadata={"help": "SCR / TPP test texts"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})


class EvalError(RuntimeError):
    """A run or cache that cannot be evaluated as asked."""


def parse_metrics(spec: str) -> list[str]:
    names = list(METRICS) if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {', '.join(bad)}; choose from {', '.join(METRICS)} or all")
    return names


def evaluate(runs: list[str | Path], cfg: EvalConfig) -> dict[str, dict]:
    """Evaluate every run on the same held-out tokens; write RUN/eval.json and RUN/figures/*.html."""
    runs = [Path(r) for r in runs]
    manifest = read_manifest(cfg.cache)
    d_in = int(manifest["d_in"])
    saes: dict[Path, SAEWeights] = {}
    for run in runs:
        sae, _ = read_sae(run, device=cfg.device)
        if sae.d_in != d_in:
            raise EvalError(f"run {run} has d_in {sae.d_in} but the cache {cfg.cache} has width {d_in}; "
                            f"evaluate it on the cache it was trained on")
        saes[run] = sae
    eval_fraction = read_run(runs[0]).eval_fraction
    results: dict[Path, dict] = {run: {} for run in runs}
    t0 = time.perf_counter()

    needs_stream = {"core", "density", "independence", "tsne"} & set(cfg.metrics)
    samples: dict[Path, torch.Tensor] = {}
    if needs_stream:
        _stream_metrics(saes, cfg, eval_fraction, results, samples)
    model = None
    model_desc = manifest["settings"]["model"]
    if model_desc.get("kind") == "synthetic":  # a cache of synthetic rows: no model to splice into
        for run in runs:
            results[run].setdefault("core", {})["ce_score"] = None
            results[run]["core"]["note"] = "synthetic cache: no model, so no CE/KL scores, ablations or probes"
    elif {"core", "ablation", "tpp", "scr"} & set(cfg.metrics):
        model = load_model(source_from_manifest(manifest["settings"]["model"]), device=cfg.device)
    hook = manifest["settings"]["hook_name"]
    if model is not None and {"core", "ablation"} & set(cfg.metrics):
        tokens = _eval_contexts(cfg, manifest, eval_fraction)
        special = special_token_ids(model.tokenizer)
        from evals.splice import splice_losses

        for run, sae in saes.items():
            if "core" in cfg.metrics:
                losses = splice_losses(model, hook, sae, tokens, special, device=cfg.device, progress=cfg.progress)
                # n_tokens stays the reconstruction metrics' count; the spliced CE/KL report their own.
                losses["ce_n_tokens"], losses["kl_n_tokens"] = losses.pop("n_tokens"), losses.pop("n_tokens_kl")
                results[run]["core"].update(losses, ce_contexts=len(tokens))
            if "ablation" in cfg.metrics:
                from evals.ablation import latent_ablation_effects

                density = results[run].get("density", {}).get("_density")
                latents = cfg.latents or _top_latents(density, cfg.ablation_latents)
                effects = latent_ablation_effects(model, hook, sae, tokens, latents, special, device=cfg.device,
                                                  progress=cfg.progress)
                results[run]["ablation"] = {"latents": {str(i): v for i, v in effects.items()}}
    if model is not None and {"tpp", "scr"} & set(cfg.metrics):
        _probe_metrics(model, hook, saes, cfg, results)
    if "tsne" in cfg.metrics:
        _tsne(saes, samples, results, runs)

    seconds = time.perf_counter() - t0
    out = {}
    for run in runs:
        results[run].get("density", {}).pop("_density", None)
        # Groups computed only as inputs of others (density for t-SNE, say) are not written unless asked for.
        results[run] = {k: v for k, v in results[run].items() if k in cfg.metrics}
        doc = _merge_existing(run, {
            "run": str(run), "cache": str(cfg.cache), "cache_hash": manifest_hash(manifest),
            "hook_name": manifest["settings"]["hook_name"], "model": manifest["settings"]["model"],
            "settings": {**asdict(cfg), "eval_fraction": eval_fraction}, "versions": _versions(),
            "definitions": {k: v for k, v in DEFINITIONS.items()},
            "metrics": results[run], "seconds": seconds,
        })
        _write_json(run / EVAL_JSON, doc)
        out[str(run)] = doc
    return out


def _stream_metrics(saes, cfg, eval_fraction, results, samples) -> None:
    """One pass over the held-out rows: every SAE sees each batch once."""
    from evals.metrics import CoreAccumulator

    loader = ActivationLoader(cfg.cache, cfg.batch_size, split="eval", eval_fraction=eval_fraction, shuffle=False,
                              with_tokens=True)
    # Special tokens (document separators) are excluded, as SAELens does.
    special = special_ids(loader.manifest)
    n_rows = min(cfg.tokens, loader.n_tokens)
    if n_rows <= 0:
        raise EvalError(f"the cache {cfg.cache} has no held-out rows (eval_fraction {eval_fraction})")
    core = {run: CoreAccumulator() for run in saes}
    fire = {run: FiringCounter(sae.d_sae) for run, sae in saes.items()}
    keep = max(cfg.tsne_tokens if "tsne" in cfg.metrics else 0,
               cfg.independence_tokens if "independence" in cfg.metrics else 0)
    kept: dict = {run: [] for run in saes}
    seen = 0
    bar = tqdm(total=n_rows, unit="tok", unit_scale=True, desc="eval", disable=not cfg.progress)
    for x, toks in loader:
        x = x[~special_mask(toks[:, 0], special)][: n_rows - seen].to(cfg.device)
        for run, sae in saes.items():
            code = sae.encode_topk(x)
            core[run].update(x, sae.decode_topk(code), code.vals)  # L0 from the k values: no dense code needed
            fire[run].update_code(code)
            if seen < keep:
                n = keep - seen
                kept[run].append(TopKCode(code.vals[:n].cpu(), code.idx[:n].cpu()).to_dense(sae.d_sae))
        seen += x.shape[0]
        bar.update(x.shape[0])
        if seen >= n_rows:
            break
    bar.close()
    for run in saes:
        results[run]["core"] = core[run].result()
        dens = fire[run].result()
        results[run]["density"] = {k: v for k, v in dens.items() if not torch.is_tensor(v)}
        results[run]["density"]["_density"] = dens["density"]
        results[run]["density"]["per_latent"] = dens["density"].tolist()
        results[run]["density"]["training"] = _training_dead(run)
        if kept[run]:
            samples[run] = torch.cat(kept[run])
        if "density" in cfg.metrics:
            _density_figure(run, dens)
        if "independence" in cfg.metrics:
            from evals.independence import independence_stats

            results[run]["independence"] = independence_stats(samples[run], saes[run].W_dec, seed=cfg.seed)


def _top_latents(density: torch.Tensor | None, n: int) -> list[int]:
    if density is None:
        raise EvalError("ablation without an explicit --latents list needs the density metric in the same run")
    return [int(i) for i in torch.argsort(density, descending=True)[:n]]


def _eval_contexts(cfg: EvalConfig, manifest: dict, eval_fraction: float) -> torch.Tensor:
    _, held = split_sequences(int(manifest["n_sequences"]), eval_fraction)
    return torch.from_numpy(sequence_tokens(cfg.cache, held[: cfg.ce_contexts]))


def _probe_metrics(model, hook, saes, cfg, results) -> None:
    """SCR and TPP: the model runs once per labelled set and its probes are fitted once; each SAE then only
    encodes the cached token activations."""
    from evals import labelled, scr_tpp
    from evals.probes import token_activations

    sizes = {"train_size": cfg.labelled_train, "test_size": cfg.labelled_test}
    real = cfg.labelled == "real"
    tasks = []
    if "scr" in cfg.metrics:
        data = labelled.load_bias_in_bios(**sizes) if real else labelled.offline_scr_set(seed=cfg.seed, **sizes)
        tasks.append(("scr", data, scr_tpp.fit_scr_probes, scr_tpp.scr_from_activations))
    if "tpp" in cfg.metrics:
        data = labelled.load_amazon_reviews(**sizes) if real else labelled.offline_tpp_set(seed=cfg.seed, **sizes)
        tasks.append(("tpp", data, scr_tpp.fit_tpp_probes, scr_tpp.tpp_from_activations))
    for name, data, fit, score in tasks:
        tokens = token_activations(model, hook, data.texts, device=cfg.device, progress=cfg.progress)
        pooled = tokens.pooled()
        probes = fit(pooled, data, seed=cfg.seed)
        for run, sae in saes.items():
            n_values = [n for n in N_VALUES if n <= sae.d_sae]  # SAEBench asserts N <= d_sae
            results[run][name] = score(tokens, data, sae, n_values, seed=cfg.seed, probes=probes, pooled=pooled)
            results[run][name]["dataset"] = data.description


def _tsne(saes, samples, results, runs) -> None:
    from evals.tsne import activation_tsne, decoder_tsne, joint_decoder_tsne

    for run, sae in saes.items():
        density = results[run]["density"]["_density"]
        maps = {"activations": activation_tsne(samples[run]),
                "decoder": decoder_tsne(sae.W_dec, density > 0, density)}
        results[run]["tsne"] = {}
        for name, m in maps.items():
            write_figure(m.figure(f"{run.name}: t-SNE of {name}"), run / FIGURES_DIR / f"tsne_{name}.html")
            _write_json(run / FIGURES_DIR / f"tsne_{name}.json", m.to_json())
            results[run]["tsne"][name] = {"n_points": len(m.coords), "figure": f"{FIGURES_DIR}/tsne_{name}.html",
                                          "coordinates": f"{FIGURES_DIR}/tsne_{name}.json"}
    widths = {saes[r].d_sae for r in runs}
    if len(runs) > 1 and len({saes[r].d_in for r in runs}) == 1 and len(widths) == 1:
        joint = joint_decoder_tsne({r.name: (saes[r].W_dec, results[r]["density"]["_density"] > 0) for r in runs})
        for run in runs:
            write_figure(joint.figure("decoder rows of " + ", ".join(r.name for r in runs)),
                         run / FIGURES_DIR / "tsne_joint.html")
            results[run]["tsne"]["joint"] = {"runs": [str(r) for r in runs], "figure": f"{FIGURES_DIR}/tsne_joint.html",
                                             "d_sae": sorted(widths)}


def _density_figure(run: Path, dens: dict) -> None:
    import plotly.graph_objects as go

    hist = dens["log10_density_histogram"]
    fig = go.Figure(go.Bar(x=hist["edges"][:-1], y=hist["counts"], name="alive latents"))
    fig.update_layout(title=f"{run.name}: log10 feature density over {dens['n_tokens']:,} eval tokens "
                            f"(dead: {dens['dead_fraction']:.1%})", xaxis_title="log10 density",
                      yaxis_title="latents")
    write_figure(fig, run / FIGURES_DIR / DENSITY_FIGURE)


def _training_dead(run: Path) -> dict | None:
    """The trainer's own dead counters at the end of training, from train.json + trainer_state."""
    info = read_run(run).train
    if info is None:
        return None
    try:
        state = read_trainer_state(run)
    except CheckpointError:
        return None
    since = state["tokens_since_fired"]
    return {"dead_after_tokens": info["dead_after"], "tokens_seen": info.get("tokens_seen"),
            "dead_fraction": float((since >= info["dead_after"]).float().mean()),
            "never_fired_fraction": float((state["fire_count"] == 0).float().mean())}


def _merge_existing(run: Path, doc: dict) -> dict:
    """Keep metrics of an earlier `vsae eval` that this one did not recompute, if on the same cache."""
    old = read_run(run).eval or {}
    if old.get("cache_hash") == doc["cache_hash"]:
        doc["metrics"] = {**old.get("metrics", {}), **doc["metrics"]}
    return doc


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=_jsonable) + "\n")


def _jsonable(v):
    if torch.is_tensor(v):
        return v.tolist()
    if isinstance(v, np.ndarray | np.generic):
        return v.tolist()
    raise TypeError(f"cannot serialise {type(v).__name__}")


def _versions() -> dict:
    import sae_lens
    import sklearn

    return {"torch": torch.__version__, "sae_lens": sae_lens.__version__, "sklearn": sklearn.__version__}


def table(results: dict[str, dict]) -> str:
    """A plain-text table of the headline numbers, one row per run."""
    cols = [("core", "l0"), ("core", "explained_variance"), ("core", "mse"), ("core", "ce_score"),
            ("core", "kl_score"), ("density", "dead_fraction"), ("density", "dense_fraction")]
    head = ["run"] + [c for _, c in cols]
    rows = []
    for run, doc in results.items():
        m = doc["metrics"]
        rows.append([Path(run).name] + [_fmt(m.get(g, {}).get(c)) for g, c in cols])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)) for r in [head, *rows])


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
