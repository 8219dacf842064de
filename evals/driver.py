"""`vsae eval`: read runs and a cache, run the requested metric groups, write eval.json and figures.

All I/O of the evaluation lives here and in `evals.context`; what each group computes is declared in
`evals.registry`, and the metrics themselves are tensor functions in the sibling modules. Several runs are
evaluated on the same held-out tokens, read once. A run's eval.json and figures are written aside and swapped in
together, so a killed eval leaves the previous complete result.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from activations.atomic import fsync_dir
from activations.cache import manifest_hash, read_manifest
from activations.devices import resolve_device
from activations.guard import DirLock
from activations.loader import ActivationLoader
from activations.models import load_model, source_from_manifest
from evals import provenance, registry
from evals.audit import mark_for
from evals.baseline import attach_bootstrap, attach_unpaired
from evals.context import EvalContext, EvalError, StreamStats, jsonable, write_json
from evals.metrics import CoreAccumulator
from evals.null import NULL_SEEDS, NullStore, null_saes
from evals.scr_tpp import UNITS
from vsae.checkpoint import CFG_FILENAME, SAEWeights, read_sae
from vsae.code import TopKCode
from vsae.firing import FiringCounter, special_ids, special_mask
from vsae.run import EVAL_JSON, FIGURES_DIR, SNAPSHOTS_DIR, read_run


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
    null_seeds: int = field(default=3, metadata={
        "help": "random SAEs of each run's d_sae and k scored beside it (0: none); their results are stored in "
                "CACHE/.vsae-null and reused"})
    other_cache: bool = field(default=False, metadata={
        "help": "the runs were trained on other data: score them on this whole cache (else a run whose train.json "
                "names another cache, model or hook is refused)"})
    sample_seed: int | None = field(default=None, metadata={
        "help": "draw the streamed rows and the CE contexts from the evaluation split's sequences in an order seeded "
                "by this, so --tokens and --ce-contexts take a seeded subset of them (`vsae audit` varies it); unset: "
                "the split's first sequences in id order"})

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
        saes = _read_saes(runs, cfg, int(manifest["d_in"]))
        infos = [read_run(run) for run in runs]
        try:
            provenance.check_runs(infos, manifest, manifest_hash(manifest), cfg.other_cache)
            split = provenance.choose_split(infos, manifest, cfg.other_cache)
        except provenance.ProvenanceError as e:
            raise EvalError(str(e)) from e
        return _evaluate(saes, cfg, manifest, split)


def _evaluate(saes: dict[Path, SAEWeights], cfg: EvalConfig, manifest: dict, split: provenance.EvalSplit
              ) -> dict[str, dict]:
    runs = list(saes)
    groups = [g for g in registry.GROUPS if g.name in cfg.metrics]
    t0 = time.perf_counter()
    staging = {run: Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=run)) for run in runs}
    try:
        ctx = EvalContext(cfg, manifest, saes, split, {run: tmp / FIGURES_DIR for run, tmp in staging.items()},
                          load_model=lambda: load_model(source_from_manifest(manifest["settings"]["model"]),
                                                        device=cfg.device))
        nulls = _NullPlan(ctx, groups, manifest, split)
        if any("stream" in g.needs for g in groups):
            ctx.active_nulls = nulls.missing_for_stream()
            _stream_pass(ctx, max([g.sample_rows(cfg) for g in groups if g.sample_rows] or [0]))
        results: dict[Path, dict] = {run: {} for run in runs}
        for group in groups:
            ctx.active_nulls = nulls.missing(group)
            computed = group.compute(ctx)
            null_results = nulls.results(group, computed)
            for run in runs:
                if run in computed:
                    results[run][group.name] = _with_nulls(group, computed[run], [
                        null_results[k] for k in ctx.null_of.get(run, []) if k in null_results], cfg.seed)
        seconds = time.perf_counter() - t0
        out = {}
        for run in runs:
            doc = _merge_existing(run, _document(run, cfg, manifest, split, results[run], seconds))
            write_json(staging[run] / EVAL_JSON, doc)
            _commit_eval(run, staging[run])
            out[str(run)] = doc
        return out
    finally:
        for tmp in staging.values():
            shutil.rmtree(tmp, ignore_errors=True)


class _NullPlan:
    """The random-SAE nulls of this eval: built for every (d_sae, k) of the runs, scored by the null-aware groups
    unless the null store already holds their result for the same cache, split and settings."""

    def __init__(self, ctx: EvalContext, groups: list, manifest: dict, split: provenance.EvalSplit) -> None:
        cfg = ctx.cfg
        self.groups = [g for g in groups if g.nulls] if cfg.null_seeds > 0 else []
        if any(g.name == "core" for g in groups) or self.groups:
            ctx.data_mean = _data_mean(cfg, ctx.split)
        if self.groups:
            ctx.nulls, ctx.null_of = null_saes(ctx.saes, int(manifest["d_in"]), cfg.null_seeds, ctx.data_mean,
                                               cfg.device)
        # Nulls scored on a seeded subset of the split are stored apart (unset: the key as before the field).
        sampled = {} if cfg.sample_seed is None else {"sample_seed": cfg.sample_seed}
        self.store = NullStore(cfg.cache, {"cache_hash": manifest_hash(manifest), "split": split.key(), **sampled})
        self.ctx = ctx
        self.stored = {g.name: {k: self.store.get(g.name, k, self._settings(g)) for k in ctx.nulls}
                       for g in self.groups}

    def _settings(self, group) -> dict:
        return {name: getattr(self.ctx.cfg, name) for name in group.null_settings}

    def missing(self, group) -> dict:
        stored = self.stored.get(group.name)
        return {} if stored is None else {k: self.ctx.nulls[k] for k, v in stored.items() if v is None}

    def missing_for_stream(self) -> dict:
        out = {}
        for g in self.groups:
            if "stream" in g.needs:
                out.update(self.missing(g))
        return out

    def results(self, group, computed: dict) -> dict[str, dict]:
        """The nulls' results of `group`: stored ones, and the ones just computed (stored now)."""
        stored = self.stored.get(group.name) or {}
        out = {k: v for k, v in stored.items() if v is not None}
        for key in self.missing(group):
            if key in computed:
                self.store.put(group.name, key, self._settings(group), computed[key])
                out[key] = json.loads(json.dumps(computed[key], default=jsonable))  # as a stored one reads
        return out


def _with_nulls(group, result: dict, nulls: list[dict], seed: int) -> dict:
    """The run's result with its intervals and null comparisons, units dropped."""
    if group.bootstrap is not None:
        attach_bootstrap(group.bootstrap, result, nulls, seed)
    elif group.unpaired and nulls:
        attach_unpaired(result, nulls, list(group.unpaired), lambda r, key: r.get(key))
    if nulls:
        result["null_definition"] = NULL_DEFINITION
    return strip_units(result)


NULL_DEFINITION = ("random TopK SAEs of the same d_sae and k (seeds " + ", ".join(map(str, NULL_SEEDS)) + "): "
                   "W_dec rows uniform on the unit sphere, W_enc = W_dec^T, b_enc 0, b_dec = data mean subtracted "
                   "before encoding; scored on the same rows, contexts and texts")


def strip_units(result: Any) -> Any:
    """The result without its bootstrap units (`UNITS` entries, at any depth)."""
    if isinstance(result, dict):
        return {k: strip_units(v) for k, v in result.items() if k != UNITS}
    return result


def _data_mean(cfg: EvalConfig, split: provenance.EvalSplit, rows: int = 1 << 16) -> torch.Tensor:
    """The mean activation over a seeded random sample of the cache's training rows (the whole cache under
    --other-cache): the nulls' b_dec and the mean-ablation baseline."""
    args = {"split": "all"} if split.kind == "whole_cache" else {"split": "train", "eval_fraction": split.eval_fraction}
    loader = ActivationLoader(cfg.cache, rows, shuffle=True, seed=cfg.seed, **args)
    if loader.n_tokens == 0:
        loader = ActivationLoader(cfg.cache, rows, shuffle=True, seed=cfg.seed, split="all")
    with loader:
        x = torch.from_numpy(loader.sample(rows))  # no permutation of the whole cache: memory bounded by `rows`
    return x.to(torch.float64).mean(dim=0).to(torch.float32)


def _document(run: Path, cfg: EvalConfig, manifest: dict, split: provenance.EvalSplit, metrics: dict,
              seconds: float) -> dict:
    cache_hash = manifest_hash(manifest)
    settings = asdict(cfg)
    origin = provenance.group_provenance(read_run(run), cache_hash, split, settings)
    return {
        "run": str(run), "cache": str(cfg.cache), "cache_hash": cache_hash,
        "hook_name": manifest["settings"]["hook_name"], "model": manifest["settings"]["model"],
        "split": split.record(),
        "other_cache": ("the runs were trained on other data; the whole given cache is treated as unseen"
                        if cfg.other_cache else None),
        "settings": settings, "versions": _versions(), "definitions": registry.definitions(), "metrics": metrics,
        "provenance": {group: origin for group in metrics}, "seconds": seconds,
    }


def _read_saes(runs: list[Path], cfg: EvalConfig, d_in: int) -> dict[Path, SAEWeights]:
    saes = {}
    for run in runs:
        sae, _ = read_sae(run, device=cfg.device)
        if sae.d_in != d_in:
            raise EvalError(f"run {run} has d_in {sae.d_in} but the cache {cfg.cache} has width {d_in}; "
                            f"evaluate it on the cache it was trained on")
        saes[run] = sae
    return saes


NULL_STREAM_ROWS = 16_384


def _stream_pass(ctx: EvalContext, keep: int) -> None:
    """One pass over the held-out rows: every SAE sees each batch once; special-token rows are dropped (as SAELens
    does), and the first `keep` rows' codes are kept dense for the groups that read a sample. The random-SAE nulls
    see only the first max(keep, NULL_STREAM_ROWS) rows: their sample and density are all the null-aware groups
    read, so the nulls do not multiply the cost of the pass."""
    cfg = ctx.cfg
    loader = ActivationLoader(cfg.cache, cfg.batch_size, shuffle=False, with_tokens=True, **ctx.split.loader_args)
    special = special_ids(loader.manifest)
    n_rows = min(cfg.tokens, loader.n_tokens)
    if n_rows <= 0:
        raise EvalError(f"the cache {cfg.cache} has no rows in the evaluation split ({ctx.split.record()})")
    subjects = ctx.subjects()
    core = {key: CoreAccumulator() for key in subjects}
    fire = {key: FiringCounter(sae.d_sae) for key, sae in subjects.items()}
    kept: dict = {key: [] for key in subjects}
    seen = 0
    bar = tqdm(total=n_rows, unit="tok", unit_scale=True, desc="eval", disable=not cfg.progress)
    rows = ctx.held_rows()
    for x, toks in (loader if rows is None else sampled_batches(loader, rows, cfg.batch_size)):
        x = x[~special_mask(toks[:, 0], special)][: n_rows - seen].to(cfg.device)
        for key, sae in subjects.items():
            if key not in ctx.saes and seen >= max(keep, NULL_STREAM_ROWS):
                continue
            code = sae.encode_topk(x)
            core[key].update(x, sae.decode_topk(code), code.vals)  # L0 from the k values: no dense code needed
            fire[key].update_code(code)
            if seen < keep:
                n = keep - seen
                kept[key].append(TopKCode(code.vals[:n].cpu(), code.idx[:n].cpu()).to_dense(sae.d_sae))
        seen += x.shape[0]
        bar.update(x.shape[0])
        if seen >= n_rows:
            break
    bar.close()
    for key in subjects:
        ctx.stream[key] = StreamStats(core[key].result(), fire[key].result(),
                                      torch.cat(kept[key]) if kept[key] else None, core[key].blocks())


def sampled_batches(loader: ActivationLoader, rows: np.ndarray, batch_size: int
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 activations, token rows) of the global `rows`, in their order, `batch_size` at a time."""
    for i in range(0, len(rows), batch_size):
        acts, toks = loader.gather(rows[i : i + batch_size])
        yield torch.from_numpy(acts).float(), torch.from_numpy(toks)


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
    """Keep the groups of an earlier `vsae eval` that this one did not recompute, each with its own provenance, if
    computed from the same weights, cache and split (`provenance.still_valid`); drop the others."""
    old = read_run(run)
    old_origin = (old.eval or {}).get("provenance")
    old_origin = old_origin if isinstance(old_origin, dict) else {}
    current = next(iter(doc["provenance"].values()), None)
    kept = {g: m for g, m in old.metrics.items()
            if g not in doc["metrics"] and current and provenance.still_valid(old_origin.get(g), current)}
    doc["metrics"] = {**kept, **doc["metrics"]}
    doc["provenance"] = {**{g: old_origin[g] for g in kept}, **doc["provenance"]}
    doc["dropped"] = sorted(g for g in old.metrics if g not in doc["metrics"]) or None
    return doc


def _versions() -> dict:
    import sae_lens
    import sklearn

    return {"torch": torch.__version__, "sae_lens": sae_lens.__version__, "sklearn": sklearn.__version__}


def table(results: dict[str, dict], marks: dict | None = None) -> str:
    """A plain-text table of the headline numbers, one row per run. With an audit's `marks`
    (`evals.audit.read_marks`), a number whose metric failed a lens carries its mark, explained under the table."""
    cols = [(g.name, key, label) for g in registry.GROUPS for label, key in g.columns]
    flags = {(g, key): m for g, key, _ in cols if (m := mark_for(marks or {}, g, key)) is not None}
    head = ["run"] + [label for _, _, label in cols]
    rows = []
    for run, doc in results.items():
        m = doc["metrics"]
        rows.append([Path(run).name] + [_fmt(v := (m.get(g) or {}).get(key)) + (
            f" [{flags[(g, key)].text}]" if (g, key) in flags and v is not None else "") for g, key, _ in cols])
    notes = "".join(f"\n[{mark.text}] {label}: {mark.title}" for g, key, label in cols
                    if (mark := flags.get((g, key))) is not None)
    return _text_table(head, rows) + _null_lines(results) + notes


def _null_lines(results: dict[str, dict]) -> str:
    """Under the table: per run, the numbers whose difference from random SAEs of its shape has an interval
    including 0 (they do not tell this run from a random SAE)."""
    lines = []
    for run, doc in results.items():
        weak = [f"{group}.{key}" for group, result in doc["metrics"].items() if isinstance(result, dict)
                for key, cmp in (result.get("null") or {}).items()
                if isinstance(cmp, dict) and cmp.get("includes_zero") is True]
        if weak:
            lines.append(f"{Path(run).name}: not separated from a random SAE on {', '.join(weak)}")
    return ("\n" + "\n".join(lines)) if lines else ""


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


def is_snapshot(path: Path) -> bool:
    """Whether `path` is a snapshot a run kept of itself (`TrainConfig.snapshot_every`)."""
    return path.parent.name == SNAPSHOTS_DIR and (path.parent.parent / CFG_FILENAME).is_file()


def runs_table(root: str | Path, snapshots: bool = False) -> str:
    """One line per run under `root`: its key settings and its headline metrics from eval.json ("-" if not
    evaluated). Runs' snapshots are counted, and listed only with `snapshots`."""
    every = find_runs(root)
    runs = every if snapshots else [p for p in every if not is_snapshot(p)]
    hidden = len(every) - len(runs)
    footer = f"\n({hidden} snapshots of these runs not listed: --snapshots lists them)" if hidden else ""
    if not runs:
        return f"no runs under {root}{footer}"
    cols = [(g.name, key, label) for g in registry.GROUPS for label, key in g.columns]
    head = ["run", *[label for label, _ in RUN_COLUMNS], *[label for _, _, label in cols]]
    rows = []
    for path in runs:
        run = read_run(path)
        config, m = run.config(), run.metrics
        name = str(path.relative_to(root)) if path != Path(root) else path.name
        rows.append([name, *[_fmt(config.get(key)) for _, key in RUN_COLUMNS],
                     *[_fmt((m.get(g) or {}).get(key)) for g, key, _ in cols]])
    return _text_table(head, rows) + footer


def _text_table(head: list[str], rows: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)) for r in [head, *rows])


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
