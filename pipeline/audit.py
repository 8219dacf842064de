"""`vsae audit`: the three lenses of evals/audit.py applied to every headline metric vsae reports, on one setting.

    AUDIT_DIR/
      trajectory/              a TopK run on the setting's cache with snapshots (RUN/snapshots/step-NNNNNN)
      synth/                   a `vsae synth --preset tiny` cache (unless --synth-cache names one)
      ladder/                  synthetic SAEs of varied quality: runs of several (d_sae, k) with their snapshots,
                               plus a random SAE and the true dictionary as an SAE
      audit.json, audit.md     per metric per lens: statistic, threshold, verdict and the numbers behind it

Reseed: every snapshot of the trajectory is evaluated `reseeds` times, the evaluation seed (probes, labelled sets,
independence sample) and the held-out sample (`EvalConfig.sample_seed`) changed together; the audited SAEs whose
spread the reseed noise is held against are the snapshots. Discriminability: the same evaluations, as a trend over
training steps (a metric the setting does not have, ground truth on a model's cache, is read along the synthetic
ladder's first run instead, one evaluation per snapshot). Validity: one evaluation of each ladder SAE on the
synthetic cache, ranked against its ground-truth F1 and MCC. Rerun the same command to resume: training continues
from its checkpoints, and the evaluations are redone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from activations.atomic import write_text_atomic
from activations.cache import manifest_hash, read_manifest
from activations.devices import resolve_device
from evals import audit as lens
from evals.driver import EvalConfig, evaluate
from evals.registry import GROUPS, METRIC_GROUPS, Headline
from vsae.checkpoint import SAEWeights, write_sae
from vsae.config import SAEConfig, TrainConfig
from vsae.outputs import claim
from vsae.run import SNAPSHOTS_DIR, TRAIN_JSON, is_run, read_run
from vsae.trainer import train

AUDIT_MD = "audit.md"
MARKER = ".vsae-audit"  # written first, so a rerun knows the directory as an audit in progress
MODEL_KEYS = {"core": ("ce_score", "kl_score")}  # core numbers that need the model; the rest of core does not
EXTRA = {"core": (Headline("MSE", "mse", "lower"), Headline("KL score", "kl_score", "higher"))}


def default_groups() -> list[str]:
    """Every registry group that has headline numbers."""
    return [g.name for g in GROUPS if g.headlines]


@dataclass
class AuditConfig:
    cache: str = field(metadata={"help": "the setting's activation cache (a model's, or a synthetic one)"})
    out: str = field(default="runs/audit", metadata={"help": "audit directory (audit.json, audit.md, runs)"})
    metrics: list[str] = field(default_factory=default_groups, metadata={"help": "metric groups to audit"})
    reseeds: int = field(default=3, metadata={
        "help": "evaluations of each snapshot, each with its own evaluation seed and held-out sample"})
    seed: int = field(default=42, metadata={"help": "the first evaluation seed (reseed r uses seed + r)"})
    d_sae: int = field(default=1024, metadata={"help": "latents of the trajectory run"})
    k: int = field(default=16, metadata={"help": "k of the trajectory run"})
    steps: int = field(default=200, metadata={"help": "training steps of the trajectory run"})
    batch_size: int = field(default=1024, metadata={"help": "activations per training step"})
    snapshots: int = field(default=4, metadata={"help": "snapshots along each run (every steps / snapshots steps)"})
    tokens: int = field(default=10_000, metadata={
        "help": "held-out rows per evaluation (fewer than the split holds, so that reseeds draw other rows)"})
    ce_contexts: int = field(default=32, metadata={"help": "held-out contexts for CE / KL per evaluation"})
    independence_tokens: int = field(default=5_000, metadata={"help": "rows of the independence sample"})
    labelled_train: int = field(default=400, metadata={"help": "SCR / TPP training texts per evaluation"})
    labelled_test: int = field(default=200, metadata={"help": "SCR / TPP test texts per evaluation"})
    n_values: list[int] = field(default_factory=lambda: [2, 20], metadata={"help": "N at which SCR / TPP are audited"})
    synth_cache: str = field(default="", metadata={
        "help": "synthetic cache with ground truth for the validity lens (unset: OUT/synth, made with the tiny "
                "preset)"})
    synth_tokens: int = field(default=64_000, metadata={"help": "rows of the synthetic cache made when unset"})
    ladder_d_sae: list[int] = field(default_factory=lambda: [256, 512], metadata={
        "help": "widths of the synthetic ladder's runs"})
    ladder_k: list[int] = field(default_factory=lambda: [4, 8, 16], metadata={"help": "k of the ladder's runs"})
    ladder_steps: int = field(default=200, metadata={"help": "training steps of the ladder's runs"})
    device: str = field(default="auto", metadata={"help": "torch device; auto: CUDA when present, else CPU"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        for name in ("reseeds", "snapshots", "steps", "ladder_steps", "tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.snapshots > min(self.steps, self.ladder_steps):
            raise ValueError(f"--snapshots {self.snapshots} is more than the training steps; lower it")


@dataclass(frozen=True)
class AuditedMetric:
    """One number of eval.json the audit judges: a registry headline (SCR/TPP once per audited N) or a core extra."""

    group: str
    headline: Headline
    needs_model: bool

    @property
    def key(self) -> str:
        return self.headline.key

    def read(self, metrics: dict) -> float | None:
        result = metrics.get(self.group)
        return self.headline.read(result, 0)[0] if isinstance(result, dict) else None


def audited_metrics(groups: list[str], n_values: list[int]) -> list[AuditedMetric]:
    out = []
    for name in groups:
        g = METRIC_GROUPS[name]
        for h in (*g.headlines, *EXTRA.get(name, ())):
            model = "model" in g.needs and (name not in MODEL_KEYS or h.key in MODEL_KEYS[name])
            for n in (n_values if "{n}" in h.key else [0]):
                fixed = Headline(h.title(n), h.name(n), h.better, h.section, h.why)
                out.append(AuditedMetric(name, fixed, model))
    return out


def _synthetic(cache: str | Path) -> bool:
    return read_manifest(cache)["settings"]["model"].get("kind") == "synthetic"


def _eval_cfg(cfg: AuditConfig, cache: str, groups: list[str], r: int) -> EvalConfig:
    return EvalConfig(cache=cache, metrics=groups, tokens=cfg.tokens, ce_contexts=cfg.ce_contexts,
                      independence_tokens=cfg.independence_tokens, labelled_train=cfg.labelled_train,
                      labelled_test=cfg.labelled_test, batch_size=4096, device=cfg.device, seed=cfg.seed + r,
                      sample_seed=r, null_seeds=0, progress=cfg.progress)


# --- training with snapshots ------------------------------------------------------------------------------------

def snapshot_runs(run: Path) -> list[tuple[int, Path]]:
    """(step, directory) of a run's snapshots, by step."""
    found = []
    for p in sorted((Path(run) / SNAPSHOTS_DIR).glob("step-*")):
        if is_run(p):
            found.append((int((read_run(p).train or {}).get("step", 0)), p))
    return sorted(found)


def train_with_snapshots(cache: str, out: Path, saes: list[SAEConfig], names: list[str] | None, steps: int,
                         cfg: AuditConfig) -> list[Path]:
    """Train `saes` in one pass with `cfg.snapshots` snapshots each (resuming what is on disk)."""
    tcfg = TrainConfig(cache=cache, out=str(out), steps=steps, batch_size=cfg.batch_size,
                       lr_warmup_steps=max(1, steps // 10), snapshot_every=max(1, steps // cfg.snapshots),
                       checkpoint_every=steps, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    return train(tcfg, saes, resume=out.exists(), names=names)


# --- the synthetic quality ladder -------------------------------------------------------------------------------

def _write_reference(path: Path, sae: SAEWeights, cache: str, eval_fraction: float, what: str) -> Path:
    """An untrained SAE as a run of `cache` (cfg.json + weights + train.json naming the cache), so that `vsae eval`
    scores it on the same held-out rows as the trained ones: it never saw any row, so none is leaked."""
    manifest = read_manifest(cache)
    if is_run(path):
        return path
    path.mkdir(parents=True, exist_ok=True)
    write_sae(path, sae, {"model_name": manifest["settings"]["model"]["name"],
                          "hook_name": manifest["settings"]["hook_name"],
                          "context_size": manifest["settings"]["context"], "dataset_path": cache})
    info = {"cache": cache, "cache_hash": manifest_hash(manifest), "model": manifest["settings"]["model"],
            "hook_name": manifest["settings"]["hook_name"], "d_in": sae.d_in, "step": 0,
            "train": {"eval_fraction": eval_fraction}, "reference": what}
    write_text_atomic(path / TRAIN_JSON, json.dumps(info, indent=1) + "\n")
    return path


def reference_saes(cache: str, out: Path, eval_fraction: float) -> list[Path]:
    """The ladder's two ends: the true dictionary as an SAE (tests/test_ground_truth.py's construction: encoder D^T,
    threshold 3, k 32) and a random SAE of the same width."""
    from activations.loader import ActivationLoader
    from activations.synthetic import ground_truth_tensors
    from evals.null import random_sae

    truth = ground_truth_tensors(cache)
    D, bias = truth["feature_vectors"].float(), truth["bias"].float()
    exact = SAEWeights(W_enc=D.T.contiguous(), b_enc=torch.full((D.shape[0],), -3.0), W_dec=D.contiguous(),
                       b_dec=bias, k=32, apply_b_dec_to_input=True)
    with ActivationLoader(cache, 4096, split="train", eval_fraction=eval_fraction, shuffle=True) as loader:
        mean = next(iter(loader)).double().mean(0).float()
    rand = random_sae(D.shape[1], D.shape[0], 32, 99, mean)
    return [_write_reference(out / "truth", exact, cache, eval_fraction, "the true dictionary as an SAE"),
            _write_reference(out / "random", rand, cache, eval_fraction, "a random SAE")]


def ensure_synth(cfg: AuditConfig, out: Path) -> str:
    if cfg.synth_cache:
        return cfg.synth_cache
    from activations.synthetic import SynthConfig, synthesize

    path = out / "synth"
    if not (path / "manifest.json").is_file():
        synthesize(SynthConfig(out=str(path), preset="tiny", tokens=cfg.synth_tokens, device="cpu",
                               progress=cfg.progress))
    return str(path)


def ladder(cfg: AuditConfig, synth: str, out: Path) -> tuple[list[Path], list[tuple[int, Path]]]:
    """(every ladder SAE, the first ladder run's snapshots as a synthetic trajectory)."""
    shapes = [(d, k) for d in cfg.ladder_d_sae for k in cfg.ladder_k if k <= d]
    saes = [SAEConfig(variant="topk", d_sae=d, k=k, dead_after=None) for d, k in shapes]
    names = [f"d{d}-k{k}" for d, k in shapes]
    runs = train_with_snapshots(synth, out / "runs", saes, names, cfg.ladder_steps, cfg)
    trajectories = [snapshot_runs(r) for r in runs]
    refs = reference_saes(synth, out / "references", TrainConfig.eval_fraction)
    return [p for t in trajectories for _, p in t] + refs, trajectories[0]


# --- evaluations ------------------------------------------------------------------------------------------------

def evaluations(cfg: AuditConfig, cache: str, runs: list[Path], groups: list[str], reseeds: int,
                what: str) -> list[list[dict]]:
    """`[run][reseed]` eval.json `metrics` blocks: every run evaluated together (the same rows) once per reseed."""
    out: list[list[dict]] = [[] for _ in runs]
    for r in tqdm(range(reseeds), desc=f"audit: {what}", unit="reseed", disable=not cfg.progress):
        docs = evaluate(runs, _eval_cfg(cfg, cache, groups, r))
        for i, run in enumerate(runs):
            out[i].append(docs[str(run)]["metrics"])
    return out


def _values(metric: AuditedMetric, blocks: list[list[dict]]) -> list[list[float | None]]:
    return [[metric.read(b) for b in per_run] for per_run in blocks]


def _measured(values: list[list[float | None]]) -> bool:
    return any(v is not None for row in values for v in row)


def judge(metric: AuditedMetric, main: dict, synth: dict) -> dict[str, lens.Verdict]:
    """The three verdicts of one metric from the main setting's reseeded trajectory (`main`: steps, blocks) and the
    synthetic ladder (`synth`: blocks of the ladder, F1 / MCC, the ladder trajectory's steps and blocks)."""
    values = _values(metric, main["blocks"])
    if _measured(values):
        reseed = lens.reseed_lens(values)
        disc = lens.discriminability_lens(main["steps"], values)
    else:
        reseed = lens.not_applicable("reseed", "not measured on this setting's cache")
        along = _values(metric, synth["trajectory_blocks"])
        disc = (lens.discriminability_lens(synth["trajectory_steps"], along) if _measured(along) else
                lens.not_applicable("discriminability", "not measured on this setting's cache"))
        if _measured(along):
            disc.inputs["setting"] = "the synthetic ladder's first run (one evaluation per snapshot)"
    if metric.needs_model:
        valid = lens.not_applicable("validity", "needs a model (not measurable on a synthetic cache)")
    elif metric.group == "ground_truth" and metric.key in ("f1", "mcc"):
        valid = lens.not_applicable("validity", "the ground-truth reference itself")
    else:
        ladder_values = [row[0] for row in _values(metric, synth["blocks"])]
        valid = lens.validity_lens(ladder_values, synth["references"], metric.headline.better)
    return {"reseed": reseed, "discriminability": disc, "validity": valid}


def _main_setting(cfg: AuditConfig, out: Path, groups: list[str]) -> dict:
    run = train_with_snapshots(cfg.cache, out / "trajectory", [SAEConfig(variant="topk", d_sae=cfg.d_sae, k=cfg.k)],
                               None, cfg.steps, cfg)[0]
    snaps = snapshot_runs(run)
    blocks = evaluations(cfg, cfg.cache, [p for _, p in snaps], groups, cfg.reseeds, "reseeded trajectory")
    return {"steps": [s for s, _ in snaps], "runs": [str(p) for _, p in snaps], "blocks": blocks,
            "sample": sample_note(cfg.cache, cfg.tokens)}


def sample_note(cache: str, tokens: int) -> dict:
    """How much of the held-out split one evaluation reads: reseeds draw other rows only when it is a part of it."""
    from activations.loader import split_sequences

    manifest = read_manifest(cache)
    held = len(split_sequences(int(manifest["n_sequences"]), TrainConfig.eval_fraction)[1])
    rows = held * int(manifest["rows_per_sequence"])
    note = (f"each evaluation reads {min(tokens, rows):,} of the {rows:,} held-out rows" +
            ("" if tokens < rows else ": all of them, so reseeds vary only the evaluation seed, not the rows"))
    return {"held_out_rows": rows, "tokens": tokens, "note": note}


def _synthetic_setting(cfg: AuditConfig, out: Path, groups: list[str]) -> dict:
    synth = ensure_synth(cfg, out)
    saes, trajectory = ladder(cfg, synth, out / "ladder")
    wanted = [g for g in groups if "model" not in METRIC_GROUPS[g].needs or g == "core"]
    blocks = evaluations(cfg, synth, saes, sorted(set(wanted) | {"ground_truth"}, key=list(METRIC_GROUPS).index),
                         1, "synthetic ladder")
    gt = {key: [b[0].get("ground_truth", {}).get(key) for b in blocks] for key in ("f1", "mcc")}
    index = {p: i for i, p in enumerate(saes)}
    return {"cache": synth, "runs": [str(p) for p in saes], "blocks": blocks, "references": gt,
            "trajectory_steps": [s for s, _ in trajectory],
            "trajectory_blocks": [blocks[index[p]] for _, p in trajectory]}


def run_audit(cfg: AuditConfig) -> dict:
    """Train, evaluate, judge; write OUT/audit.json and OUT/audit.md. Returns the audit document."""
    out = Path(cfg.out)
    groups = [g for g in cfg.metrics if METRIC_GROUPS[g].headlines]
    if _synthetic(cfg.cache):  # no model to splice into or probe
        groups = [g for g in groups if "model" not in METRIC_GROUPS[g].needs or g == "core"]
    t0 = time.perf_counter()
    with claim(out, _is_audit, "audit", f"{lens.AUDIT_JSON} or {MARKER}", ValueError):
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).touch()
        main = _main_setting(cfg, out, groups)
        synth = _synthetic_setting(cfg, out, groups)
        metrics = audited_metrics(groups, cfg.n_values)
        rows = [{"group": m.group, "key": m.key, "label": m.headline.label, "better": m.headline.better,
                 "lenses": {k: v.to_json() for k, v in judge(m, main, synth).items()}} for m in metrics]
        doc = {"settings": asdict(cfg), "lenses": LENS_DEFINITIONS, "trajectory": _public(main),
               "ladder": _public(synth), "metrics": rows, "seconds": time.perf_counter() - t0}
        write_text_atomic(out / lens.AUDIT_JSON, json.dumps(lens._clean(doc), indent=1) + "\n")
        write_text_atomic(out / AUDIT_MD, audit_markdown(doc))
    return doc


def _is_audit(path: Path) -> bool:
    return (path / lens.AUDIT_JSON).is_file() or (path / MARKER).is_file()


def _public(setting: dict) -> dict:
    """A setting as audit.json records it: what was evaluated, not every eval.json block."""
    return {k: v for k, v in setting.items() if "blocks" not in k}


LENS_DEFINITIONS = {
    "reseed": f"noise / spread <= {lens.RESEED_RATIO_MAX:.3f}: pooled sd over reseeds (evaluation seed and "
              "held-out sample varied) against the sd of the snapshots' means",
    "discriminability": f"signal / noise >= {lens.SNR_MIN:.3f} and |Spearman rho| >= {lens.TREND_RHO_MIN}: range "
                        "of a monotone fit over training steps against max(reseed sd, residual sd)",
    "validity": f"signed Spearman rho >= {lens.VALIDITY_RHO_MIN} with p < {lens.VALIDITY_P_MAX} against both "
                "ground-truth F1 and MCC across the synthetic ladder",
}


# --- audit.md -----------------------------------------------------------------------------------------------------

def _cell(v: dict) -> str:
    verdict = str(v.get("verdict"))
    if verdict.startswith("n/a"):
        return verdict
    stat, thr = v.get("statistic"), v.get("threshold")
    shown = stat if isinstance(stat, str) else f"{stat:.3g}" if isinstance(stat, int | float) else "-"
    return f"{'**fail**' if verdict == lens.FAIL else 'pass'} ({shown}; threshold {thr:.3g})"


def audit_markdown(doc: dict) -> str:
    """The metric x lens table, and the reason behind every failure as a footnote."""
    lines = ["# vsae audit", "", f"Setting: cache `{doc['settings']['cache']}`; {doc['settings']['reseeds']} "
             f"reseeds of {len(doc['trajectory']['steps'])} snapshots (steps {doc['trajectory']['steps']}); "
             f"synthetic ladder of {len(doc['ladder']['runs'])} SAEs on `{doc['ladder']['cache']}`; "
             f"{doc['trajectory']['sample']['note']}.", "",
             "| metric | group | better | " + " | ".join(lens.LENSES) + " |", "|---|---|---|---|---|---|"]
    notes = []
    for row in doc["metrics"]:
        cells = [_cell(row["lenses"][name]) for name in lens.LENSES]
        lines.append(f"| {row['label']} | {row['group']} | {row['better'] or '-'} | " + " | ".join(cells) + " |")
        notes += [f"- {row['label']}, {name}: {row['lenses'][name]['why']}" for name in lens.LENSES
                  if row["lenses"][name]["verdict"] == lens.FAIL]
    lines += ["", "Lenses:"] + [f"- {k}: {v}" for k, v in doc["lenses"].items()]
    return "\n".join(lines + (["", "Failures:"] + notes if notes else [])) + "\n"
