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

from activations.cache import manifest_hash, read_manifest, sequence_tokens, write_text_atomic
from activations.loader import ActivationLoader, split_sequences
from activations.models import load_model, source_from_manifest, special_token_ids
from evals.figures import write_figure
from vsae.checkpoint import SAEWeights, read_sae

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
    cache: str
    metrics: list[str] = field(default_factory=lambda: ["core", "density"])
    tokens: int = 100_000  # held-out activation rows for core / density / independence / t-SNE
    ce_contexts: int = 64  # held-out contexts run through the model for CE / KL
    ablation_latents: int = 16  # the most frequent latents, when no explicit list is given
    latents: list[int] | None = None
    tsne_tokens: int = 20_000
    batch_size: int = 4096
    device: str = "cpu"
    seed: int = 42
    labelled: str = "offline"  # offline (generated) | real (Bias in Bios, Amazon reviews via the hub)
    labelled_train: int = 4000  # SAEBench's train / test set sizes for SCR and TPP
    labelled_test: int = 1000
    progress: bool = True


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
    eval_fraction = _eval_fraction(runs[0])
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
        _write_json(run / "eval.json", doc)
        out[str(run)] = doc
    return out


def _stream_metrics(saes, cfg, eval_fraction, results, samples) -> None:
    """One pass over the held-out rows: every SAE sees each batch once."""
    from evals.metrics import CoreAccumulator, FiringCounter

    loader = ActivationLoader(cfg.cache, cfg.batch_size, split="eval", eval_fraction=eval_fraction, shuffle=False,
                              with_tokens=True)
    manifest = loader.manifest
    # Special tokens (document separators) are excluded, as SAELens does; older caches name only BOS.
    special = torch.tensor(manifest.get("special_token_ids", [manifest.get("bos_token_id") or 0]))
    n_rows = min(cfg.tokens, loader.n_tokens)
    if n_rows <= 0:
        raise EvalError(f"the cache {cfg.cache} has no held-out rows (eval_fraction {eval_fraction})")
    core = {run: CoreAccumulator() for run in saes}
    fire = {run: FiringCounter() for run in saes}
    keep = max(cfg.tsne_tokens if "tsne" in cfg.metrics else 0,
               20_000 if "independence" in cfg.metrics else 0)
    kept: dict = {run: [] for run in saes}
    seen = 0
    bar = tqdm(total=n_rows, unit="tok", unit_scale=True, desc="eval", disable=not cfg.progress)
    for x, toks in loader:
        x = x[~torch.isin(toks[:, 0], special)][: n_rows - seen].to(cfg.device)
        for run, sae in saes.items():
            vals, idx, x_hat = encode_decode(sae, x)
            core[run].update(x, x_hat, vals)  # L0 from the k values: no dense code needed
            fire[run].update_topk(vals, idx, sae.d_sae)
            if seen < keep:
                n = keep - seen
                kept[run].append(torch.zeros(len(vals[:n]), sae.d_sae).scatter_(1, idx[:n].cpu(), vals[:n].cpu()))
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


def encode_decode(sae: SAEWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vals [B, k], latent ids [B, k], x_hat) equal to `sae.encode` / `sae.decode`.

    The dense decode z @ W_dec costs as much as the encoder GEMM, and a dense [B, d_sae]
    code per batch is mostly memory traffic; embedding_bag over the k selected rows avoids both.
    """
    x = x.to(sae.W_enc.dtype)
    x_in = x - sae.b_dec if sae.apply_b_dec_to_input else x
    pre = torch.addmm(sae.b_enc, x_in, sae.W_enc)
    vals, idx = pre.topk(sae.k, dim=1, sorted=False)
    vals = vals.relu()
    x_hat = torch.nn.functional.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec
    return vals, idx, x_hat


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
            write_figure(m.figure(f"{run.name}: t-SNE of {name}"), run / "figures" / f"tsne_{name}.html")
            _write_json(run / "figures" / f"tsne_{name}.json", m.to_json())
            results[run]["tsne"][name] = {"n_points": len(m.coords), "figure": f"figures/tsne_{name}.html",
                                          "coordinates": f"figures/tsne_{name}.json"}
    widths = {saes[r].d_sae for r in runs}
    if len(runs) > 1 and len({saes[r].d_in for r in runs}) == 1 and len(widths) == 1:
        joint = joint_decoder_tsne({r.name: (saes[r].W_dec, results[r]["density"]["_density"] > 0) for r in runs})
        for run in runs:
            write_figure(joint.figure("decoder rows of " + ", ".join(r.name for r in runs)),
                         run / "figures" / "tsne_joint.html")
            results[run]["tsne"]["joint"] = {"runs": [str(r) for r in runs], "figure": "figures/tsne_joint.html",
                                             "d_sae": sorted(widths)}


def _density_figure(run: Path, dens: dict) -> None:
    import plotly.graph_objects as go

    hist = dens["log10_density_histogram"]
    fig = go.Figure(go.Bar(x=hist["edges"][:-1], y=hist["counts"], name="alive latents"))
    fig.update_layout(title=f"{run.name}: log10 feature density over {dens['n_tokens']:,} eval tokens "
                            f"(dead: {dens['dead_fraction']:.1%})", xaxis_title="log10 density",
                      yaxis_title="latents")
    write_figure(fig, run / "figures" / "density.html")


def _training_dead(run: Path) -> dict | None:
    """The trainer's own dead counters at the end of training, from train.json + trainer_state."""
    info_path, state_path = run / "train.json", run / "trainer_state.safetensors"
    if not (info_path.is_file() and state_path.is_file()):
        return None
    from safetensors.torch import load_file

    info = json.loads(info_path.read_text())
    state = load_file(str(state_path))
    since = state["tokens_since_fired"]
    return {"dead_after_tokens": info["dead_after"], "tokens_seen": info.get("tokens_seen"),
            "dead_fraction": float((since >= info["dead_after"]).float().mean()),
            "never_fired_fraction": float((state["fire_count"] == 0).float().mean())}


def _eval_fraction(run: Path) -> float:
    try:
        return float(json.loads((run / "train.json").read_text())["train"]["eval_fraction"])
    except (OSError, KeyError, ValueError):
        return 0.05  # SAEs trained elsewhere (SAELens): the trainer's default split


def _merge_existing(run: Path, doc: dict) -> dict:
    """Keep metrics of an earlier `vsae eval` that this one did not recompute, if on the same cache."""
    path = run / "eval.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
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
