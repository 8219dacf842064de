"""`vsae eval`: read runs and a cache, run the requested metric groups, write eval.json and figures.

All I/O of the evaluation lives here and in `evals.context`; what each group computes is declared in
`evals.registry`, and the metrics themselves are tensor functions in the sibling modules. Several runs are
evaluated on the same held-out tokens, read once. A run's eval.json and figures are written aside and swapped in
together, so a killed eval leaves the previous complete result.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from activations.atomic import fsync_dir
from activations.cache import manifest_hash, read_manifest
from activations.devices import resolve_device
from activations.guard import DirLock
from activations.loader import ActivationLoader
from activations.models import load_model, source_from_manifest
from evals import registry
from evals.context import EvalContext, EvalError, StreamStats, write_json
from evals.metrics import CoreAccumulator
from vsae.checkpoint import CFG_FILENAME, SAEWeights, read_sae
from vsae.code import TopKCode
from vsae.firing import FiringCounter, special_ids, special_mask
from vsae.run import EVAL_JSON, FIGURES_DIR, read_run


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
    device: str = field(default="auto", metadata={
        "help": "torch device; auto: CUDA when this machine has it, else CPU"})
    seed: int = field(default=42, metadata={
        "help": "seed of the independence pair sample, the offline labelled sets and the probes"})
    labelled: str = field(default="offline", metadata={
        "help": "labelled data for SCR / TPP: offline (generated) or real (Bias in Bios, Amazon reviews "
                "via the hub)"})
    # SAEBench's train / test set sizes for SCR and TPP
    labelled_train: int = field(default=4000, metadata={"help": "SCR / TPP training texts"})
    labelled_test: int = field(default=1000, metadata={"help": "SCR / TPP test texts"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)


def evaluate(runs: list[str | Path], cfg: EvalConfig) -> dict[str, dict]:
    """Evaluate every run on the same held-out tokens; write RUN/eval.json and RUN/figures/*.html."""
    runs = [Path(r) for r in runs]
    manifest = read_manifest(cfg.cache)
    with ExitStack() as held:
        for run in runs:  # one writer per run: a training checkpoint would swap the directory under this eval
            held.enter_context(DirLock(run, "run"))
            recover_eval(run)
        return _evaluate(runs, cfg, manifest)


def _evaluate(runs: list[Path], cfg: EvalConfig, manifest: dict) -> dict[str, dict]:
    saes = _read_saes(runs, cfg, int(manifest["d_in"]))
    groups = [g for g in registry.GROUPS if g.name in cfg.metrics]
    t0 = time.perf_counter()
    staging = {run: Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=run)) for run in runs}
    try:
        ctx = EvalContext(cfg, manifest, saes, read_run(runs[0]).eval_fraction,
                          {run: tmp / FIGURES_DIR for run, tmp in staging.items()},
                          load_model=lambda: load_model(source_from_manifest(manifest["settings"]["model"]),
                                                        device=cfg.device))
        if any("stream" in g.needs for g in groups):
            _stream_pass(ctx, max([g.sample_rows(cfg) for g in groups if g.sample_rows] or [0]))
        results: dict[Path, dict] = {run: {} for run in runs}
        for group in groups:
            for run, result in group.compute(ctx).items():
                results[run][group.name] = result
        seconds = time.perf_counter() - t0
        out = {}
        for run in runs:
            doc = _merge_existing(run, {
                "run": str(run), "cache": str(cfg.cache), "cache_hash": manifest_hash(manifest),
                "hook_name": manifest["settings"]["hook_name"], "model": manifest["settings"]["model"],
                "settings": {**asdict(cfg), "eval_fraction": ctx.eval_fraction}, "versions": _versions(),
                "definitions": registry.definitions(), "metrics": results[run], "seconds": seconds,
            })
            write_json(staging[run] / EVAL_JSON, doc)
            _commit_eval(run, staging[run])
            out[str(run)] = doc
        return out
    finally:
        for tmp in staging.values():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_saes(runs: list[Path], cfg: EvalConfig, d_in: int) -> dict[Path, SAEWeights]:
    saes = {}
    for run in runs:
        sae, _ = read_sae(run, device=cfg.device)
        if sae.d_in != d_in:
            raise EvalError(f"run {run} has d_in {sae.d_in} but the cache {cfg.cache} has width {d_in}; "
                            f"evaluate it on the cache it was trained on")
        saes[run] = sae
    return saes


def _stream_pass(ctx: EvalContext, keep: int) -> None:
    """One pass over the held-out rows: every SAE sees each batch once; special-token rows are dropped (as SAELens
    does), and the first `keep` rows' codes are kept dense for the groups that read a sample."""
    cfg = ctx.cfg
    loader = ActivationLoader(cfg.cache, cfg.batch_size, split="eval", eval_fraction=ctx.eval_fraction,
                              shuffle=False, with_tokens=True)
    special = special_ids(loader.manifest)
    n_rows = min(cfg.tokens, loader.n_tokens)
    if n_rows <= 0:
        raise EvalError(f"the cache {cfg.cache} has no held-out rows (eval_fraction {ctx.eval_fraction})")
    core = {run: CoreAccumulator() for run in ctx.saes}
    fire = {run: FiringCounter(sae.d_sae) for run, sae in ctx.saes.items()}
    kept: dict[Path, list[torch.Tensor]] = {run: [] for run in ctx.saes}
    seen = 0
    bar = tqdm(total=n_rows, unit="tok", unit_scale=True, desc="eval", disable=not cfg.progress)
    for x, toks in loader:
        x = x[~special_mask(toks[:, 0], special)][: n_rows - seen].to(cfg.device)
        for run, sae in ctx.saes.items():
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
    for run in ctx.saes:
        ctx.stream[run] = StreamStats(core[run].result(), fire[run].result(),
                                      torch.cat(kept[run]) if kept[run] else None)


# --- eval.json and figures/ swapped in together ---------------------------------------------------------------
STAGING_PREFIX = ".eval.tmp-"
NEW = ".eval.new"


def _commit_eval(run: Path, staged: Path) -> None:
    """Swap a staged eval (eval.json + figures/) into the run. The staged directory is first renamed to `.eval.new`:
    from then on the new result is complete, and `recover_eval` finishes an interrupted swap forward."""
    shutil.rmtree(run / NEW, ignore_errors=True)
    os.replace(staged, run / NEW)
    _finish_swap(run)


def _finish_swap(run: Path) -> None:
    new = run / NEW
    if (new / FIGURES_DIR).is_dir():
        # Figures this eval did not recompute (a partial eval) stay, as eval.json keeps their groups.
        (run / FIGURES_DIR).mkdir(exist_ok=True)
        for p in (new / FIGURES_DIR).iterdir():
            os.replace(p, run / FIGURES_DIR / p.name)
    if (new / EVAL_JSON).exists():
        os.replace(new / EVAL_JSON, run / EVAL_JSON)
    fsync_dir(run)
    shutil.rmtree(new)


def recover_eval(run: Path) -> None:
    """Finish a swap a kill interrupted (`.eval.new` holds a complete result) and drop staging leftovers."""
    if (run / NEW).is_dir():
        _finish_swap(run)
    for p in run.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True)


def _merge_existing(run: Path, doc: dict) -> dict:
    """Keep metrics of an earlier `vsae eval` that this one did not recompute, if on the same cache."""
    old = read_run(run)
    if (old.eval or {}).get("cache_hash") == doc["cache_hash"]:
        doc["metrics"] = {**old.metrics, **doc["metrics"]}
    return doc


def _versions() -> dict:
    import sae_lens
    import sklearn

    return {"torch": torch.__version__, "sae_lens": sae_lens.__version__, "sklearn": sklearn.__version__}


def table(results: dict[str, dict]) -> str:
    """A plain-text table of the headline numbers, one row per run."""
    cols = [(g.name, key, label) for g in registry.GROUPS for label, key in g.columns]
    head = ["run"] + [label for _, _, label in cols]
    rows = []
    for run, doc in results.items():
        m = doc["metrics"]
        rows.append([Path(run).name] + [_fmt((m.get(g) or {}).get(key)) for g, key, _ in cols])
    return _text_table(head, rows)


RUN_COLUMNS = (("variant", "sae.variant"), ("d_sae", "d_sae"), ("k", "k"), ("steps", "step"),
               ("tokens", "tokens_seen"), ("hook", "hook_name"))


def find_runs(root: str | Path) -> list[Path]:
    """The run directories (a cfg.json: vsae or SAELens) at or below `root`, sorted; hidden directories skipped."""
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"{root} is not a directory")
    found = [p.parent for p in root.rglob(CFG_FILENAME)
             if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(found)


def runs_table(root: str | Path) -> str:
    """One line per run under `root`: its key settings and its headline metrics from eval.json ("-" if not
    evaluated)."""
    runs = find_runs(root)
    if not runs:
        return f"no runs under {root}"
    cols = [(g.name, key, label) for g in registry.GROUPS for label, key in g.columns]
    head = ["run", *[label for label, _ in RUN_COLUMNS], *[label for _, _, label in cols]]
    rows = []
    for path in runs:
        run = read_run(path)
        config, m = run.config(), run.metrics
        name = str(path.relative_to(root)) if path != Path(root) else path.name
        rows.append([name, *[_fmt(config.get(key)) for _, key in RUN_COLUMNS],
                     *[_fmt((m.get(g) or {}).get(key)) for g, key, _ in cols]])
    return _text_table(head, rows)


def _text_table(head: list[str], rows: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)) for r in [head, *rows])


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
