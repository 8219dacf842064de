"""`vsae study`: a plan's grid of SAEs, trained in one pass of the cache per training setting, evaluated on the
same held-out tokens, then the size-matched TopK arm, and a report of each switch's effect with the others fixed.

    studies/NAME/
      study.json       the plan, the expanded runs, what is done (rewritten atomically after every stage)
      runs/RUN/        one vsae run per SAE (train.json, eval.json, ...)
      figures/*.html   one figure per metric against k
      compare.html     the compare page of all runs (dashboards.compare)
      report.md, report.html

Every stage is resumable: training continues from the runs' checkpoints, evaluation skips runs whose
eval.json records, for every requested group, the run's current weights, this cache, the study's split and the
same settings (`stale_reason`; checked again on every rerun), and a rerun with the same plan continues where it
stopped.

The plan's top-level `seeds` (a count from the [train] seed, or a list; default 1) trains every run spec with each
seed (names end in -seedN). A switch's effect is paired within a seed and reported with a 95% t interval over the
pairs (`paired_effect`); the report says which differences are significant, gives SCR/TPP's N as a fraction of
each run's alive latents, and says for the CE score, SCR and TPP whether each run separates from its random-SAE
null. The size-matched TopK copies its source run's recipe but for the variant and d_sae (`matched_recipe`).
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from activations.atomic import write_text_atomic
from activations.cache import manifest_hash, read_manifest
from activations.devices import resolve_device
from activations.guard import DirLock, plain_name
from dashboards.assets import CSS
from dashboards.compare import CompareConfig, compare_runs
from dashboards.html import esc, page, table
from evals.audit import mark_for, read_audit, read_marks
from evals.baseline import separated
from evals.driver import EvalConfig, evaluate
from evals.figures import write_figure
from evals.provenance import weights_hash
from evals.registry import METRIC_GROUPS, METRICS, Headline, measured_on, paper_row
from evals.stats import LEVEL
from vsae.config import PRESETS, SAEConfig, TrainConfig, label_part
from vsae.run import EVAL_JSON, RunError, read_run
from vsae.trainer import train as train_saes
from vsae.variants import VARIANTS

STUDY_JSON = "study.json"
SAE_FIELDS = tuple(f.name for f in fields(SAEConfig))
TRAIN_SWITCHES = ("steps", "tokens", "lr", "batch_size", "lr_warmup_steps", "seed")  # allowed per run
# The size-matched arm's variant: the plain TopK SAE, sized to each other variant's alive latents.
BASELINE = "topk"
PLAN_KEYS = ("name", "description", "seeds", "train", "eval", "sae", "arm", "size_matched", "audit")
# Settings that change where or how fast, not what is computed: they may differ on a rerun.
NOT_PLAN = ("device", "progress", "out", "cache")


class StudyError(RunError):
    """A study directory or plan that cannot be used as asked; the message says why and what to do."""


@dataclass
class RunSpec:
    """One SAE of the study: its resolved configs and the switches that name it."""

    name: str
    arm: str
    sae: dict  # SAEConfig fields
    train: dict  # TrainConfig fields, less those in NOT_PLAN
    matched_to: str | None = None  # size-matched TopK: the vSAE whose alive count set d_sae

    def switches(self) -> dict:
        return {**self.sae, **self.train}


@dataclass
class StudyConfig:
    cache: str = field(metadata={"help": "activation cache directory (from vsae harvest)"})
    plan: str = field(metadata={"help": "plan TOML file, or a shipped plan: paper | controlled"})
    out: str = field(metadata={"help": "study directory (e.g. studies/NAME)"})
    device: str = field(default="auto", metadata={
        "help": "torch device for training and evaluation; auto: CUDA when this machine has it, else CPU"})
    steps: int | None = field(default=None, metadata={
        "help": "override every run's training steps (and drop its tokens)"})
    metrics: list[str] | None = field(default=None, metadata={
        "help": "override the plan's eval metrics (unset: the plan's)"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    audit: str | None = field(default=None, metadata={
        "help": "audit.json from vsae audit: the report and compare page mark numbers of a metric that failed one "
                "of its lenses (unset: the plan's `audit`, if any)"})

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)


# ---------------------------------------------------------------- plan

def plan_path(plan: str | Path) -> Path:
    """A plan file, or the name of a plan shipped in pipeline/plans (paper, controlled)."""
    shipped = Path(__file__).parent / "plans" / f"{plan}.toml"
    return shipped if not Path(plan).exists() and shipped.is_file() else Path(plan)


def load_plan(path: str | Path) -> dict:
    path = plan_path(path)
    try:
        with open(path, "rb") as f:
            plan = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise StudyError(f"cannot read the plan {path}: {e}") from e
    unknown = sorted(set(plan) - set(PLAN_KEYS))
    if unknown:
        raise StudyError(f"plan {path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(PLAN_KEYS)}")
    if not plan.get("arm"):
        raise StudyError(f"plan {path}: no [[arm]] tables; each one is a grid (lists) over SAE and train switches")
    _check_fields(plan.get("sae", {}), SAE_FIELDS, f"plan {path} [sae]")
    _check_fields(plan.get("train", {}), tuple(f.name for f in fields(TrainConfig)), f"plan {path} [train]")
    _check_fields(plan.get("eval", {}), tuple(f.name for f in fields(EvalConfig)), f"plan {path} [eval]")
    for arm in plan["arm"]:
        if "name" not in arm:
            raise StudyError(f"plan {path}: every [[arm]] needs a name")
        if arm.get("preset") is not None and arm["preset"] not in PRESETS:
            raise StudyError(f"plan {path}: arm {arm['name']}: unknown preset {arm['preset']!r}; "
                             f"choose one of {', '.join(PRESETS)}")
        _check_fields({k: v for k, v in arm.items() if k not in ("name", "preset")}, SAE_FIELDS + TRAIN_SWITCHES,
                      f"plan {path} arm {arm['name']}")
    sm = plan.get("size_matched")
    if sm is not None:
        _check_fields({k: v for k, v in sm.items() if k not in ("preset", "where")}, SAE_FIELDS + TRAIN_SWITCHES,
                      f"plan {path} [size_matched]")
    bad = [m for m in plan.get("eval", {}).get("metrics", []) if m not in METRICS]
    if bad:
        raise StudyError(f"plan {path}: unknown metric(s) {', '.join(bad)}; choose from {', '.join(METRICS)}")
    _check_seeds(plan, path)
    return plan


def _check_seeds(plan: dict, path: Path) -> None:
    seeds = plan.get("seeds", 1)
    ok = (isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1) or (
        isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        and len(set(seeds)) == len(seeds))
    if not ok:
        raise StudyError(f"plan {path}: seeds must be a count >= 1 (seeds = 2: the [train] seed and the next one) "
                         f"or a list of distinct integer seeds, got {seeds!r}")
    if "seeds" in plan:
        setters = [f"arm {a['name']}" for a in plan["arm"] if "seed" in a]
        setters += ["[size_matched]"] if "seed" in (plan.get("size_matched") or {}) else []
        setters += ["[train]"] if isinstance(seeds, list) and "seed" in plan.get("train", {}) else []
        if setters:
            raise StudyError(f"plan {path}: {', '.join(setters)} set seed, but the plan's seeds = {seeds!r} sets "
                             f"every run's seed; remove one of them")


def plan_seeds(plan: dict, base: int) -> list[int]:
    """The training seeds every run spec is trained with: the plan's `seeds` list, or a count of seeds starting at
    the run's [train] seed (`base`); one seed (`base`) when the plan names none."""
    seeds = plan.get("seeds", 1)
    return list(seeds) if isinstance(seeds, list) else [base + i for i in range(seeds)]


def _check_fields(table: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise StudyError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(allowed)}")


def _resolve(plan: dict, preset: str | None, values: dict) -> tuple[dict, dict]:
    """(SAE fields, per-run train fields): defaults <- preset <- plan [sae]/[train] <- the arm's values."""
    sae, train = asdict(SAEConfig()), asdict(TrainConfig())
    if preset:
        sae.update(PRESETS[preset][0])
        train.update(PRESETS[preset][1])
    sae.update(plan.get("sae", {}))
    train.update(plan.get("train", {}))
    for k, v in values.items():
        (sae if k in SAE_FIELDS else train)[k] = v
    return sae, {k: v for k, v in train.items() if k not in NOT_PLAN}


def _grid(arm: dict) -> list[dict]:
    axes = {k: (v if isinstance(v, list) else [v]) for k, v in arm.items() if k not in ("name", "preset")}
    combos = [{}]
    for k, vs in axes.items():
        combos = [{**c, k: v} for c in combos for v in vs]
    return combos


def own_fields(variant: str) -> tuple[str, ...]:
    """The SAEConfig fields that act only on `variant`, as its class declares them (none for an unknown one)."""
    cls = VARIANTS.get(variant)
    return cls.own_fields if cls is not None else ()


def foreign_fields(variant: str) -> dict[str, list[str]]:
    """Fields that act only on other variants (field -> those variants): on `variant` they change nothing."""
    own = own_fields(variant)
    out: dict[str, list[str]] = {}
    for name, cls in VARIANTS.items():
        for f in cls.own_fields:
            if f not in own:
                out.setdefault(f, []).append(name)
    return out


def _meaningless(sae: dict) -> str | None:
    """Why a combination of a variant's own switches cannot change what is trained (None when it can)."""
    return VARIANTS[sae["variant"]].inert(SAEConfig(**sae)) if sae["variant"] in VARIANTS else None


def _skip_reason(sae: dict, train: dict, base_sae: dict, d_in: int, seen: dict[str, int]) -> str | None:
    """Why this run is not trained (None: it is). Switches foreign to the run's variant are reset to the arm's
    base values in `sae` first, so that a run differing only in them is found to be a duplicate."""
    foreign = foreign_fields(sae["variant"])
    moved = [k for k in foreign if sae[k] != base_sae[k]]
    if moved:
        sae.update({k: base_sae[k] for k in foreign})
        key = _key(sae, train)
        if key in seen:
            owners = ", ".join(dict.fromkeys(v for k in moved for v in foreign[k]))
            return f"duplicate: {', '.join(moved)} act only on {owners}; same run as {seen[key]}"
    elif (why := _meaningless(sae)) is not None:
        return f"meaningless: {why}"
    try:
        SAEConfig(**sae).validate(d_in)
    except ValueError as e:
        return f"impossible: {e}"
    key = _key(sae, train)
    if key in seen:
        return f"duplicate of {seen[key]}"
    return None


def expand(plan: dict, d_in: int, steps: int | None = None) -> tuple[list[RunSpec], list[str]]:
    """The plan's runs, deduplicated, each trained with every seed of the plan (`plan_seeds`), and the skipped
    combinations with the reason of each (one line for all seeds: a reason never depends on the seed)."""
    specs, skipped, seen = [], [], {}
    for arm in plan["arm"]:
        base_sae, _ = _resolve(plan, arm.get("preset"), {})
        for values in _grid(arm):
            sae, train = _resolve(plan, arm.get("preset"), values)
            if steps is not None:
                train.update(steps=steps, tokens=None)
            seeds = plan_seeds(plan, train["seed"])
            reason = _skip_reason(sae, {**train, "seed": seeds[0]}, base_sae, d_in, seen)
            if reason is not None:
                what = f"{arm['name']}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                skipped.append(f"{what} ({reason})")
                continue
            for seed in seeds:
                seen[_key(sae, {**train, "seed": seed})] = len(specs)
                specs.append(RunSpec(name="", arm=arm["name"], sae=dict(sae), train={**train, "seed": seed}))
    _name(specs)
    skipped = [_renumber(s, specs) for s in skipped]
    return specs, skipped


def _renumber(line: str, specs: list[RunSpec]) -> str:
    """Skipped lines name the run they duplicate: index -> name, once names exist."""
    for i, s in reversed(list(enumerate(specs))):
        line = line.replace(f"same run as {i})", f"same run as {s.name})").replace(f"duplicate of {i})",
                                                                                  f"duplicate of {s.name})")
    return line


def _key(sae: dict, train: dict) -> str:
    return json.dumps({**sae, **train}, sort_keys=True)


def varying(specs: list[RunSpec]) -> list[str]:
    """Switches whose value differs between runs, in config order."""
    names = list(SAE_FIELDS) + list(TRAIN_SWITCHES)
    return [n for n in names if len({json.dumps(s.switches()[n]) for s in specs}) > 1]


def _name(specs: list[RunSpec]) -> None:
    """Run names from the switches that vary within each arm, prefixed by the arm when there are several."""
    arms = list(dict.fromkeys(s.arm for s in specs))
    for arm in arms:
        group = [s for s in specs if s.arm == arm]
        keys = varying(group)
        for s in group:
            foreign = foreign_fields(s.sae["variant"])
            parts = [label_part(k, s.switches()[k]) for k in keys if k not in foreign]
            s.name = "-".join(([arm] if len(arms) > 1 else []) + parts) or s.sae["variant"]
        names = [s.name for s in group]
        if len(set(names)) != len(names):
            for i, s in enumerate(group):
                s.name = f"{s.name}-{i:02d}"
        for s in group:  # a run's folder under runs/: an arm or value must not lead it elsewhere
            plain_name(s.name, f"run name (from arm {arm!r})")


def size_matched(plan: dict, specs: list[RunSpec], alive: dict[str, int], d_in: int,
                 steps: int | None) -> tuple[list[RunSpec], list[str]]:
    """TopK runs with d_sae = each selected run's alive-latent count, each a copy of its source run's recipe (every
    SAE and training field, seed included) but for the variant and d_sae (`matched_recipe`); by default every run
    of a variant other than TopK is selected."""
    sm = plan.get("size_matched")  # an empty [size_matched] table: copies of the selected runs' recipes
    if sm is None:
        return [], []
    where = sm.get("where", {})
    out, skipped, seen = [], [], {}
    primary = {_key(s.sae, s.train): s.name for s in specs}
    for src in specs:
        if not _selected(src, where):
            continue
        sae, train = matched_recipe(plan, src, alive[src.name], steps)
        try:
            SAEConfig(**sae).validate(d_in)
        except ValueError as e:
            skipped.append(f"size-matched to {src.name} (impossible: {e})")
            continue
        key = _key(sae, train)
        if key in primary:
            skipped.append(f"size-matched to {src.name} (same run as {primary[key]}: all its latents are alive)")
            continue
        if key in seen:
            seen[key].append(src.name)
            continue
        spec = RunSpec(name=f"matched-{src.name}", arm="size-matched", sae=sae, train=train, matched_to=src.name)
        seen[key] = [src.name]
        out.append(spec)
    return out, skipped


def matched_recipe(plan: dict, src: RunSpec, d_sae: int, steps: int | None) -> tuple[dict, dict]:
    """(SAE fields, train fields) of the TopK size-matched to `src`: src's recipe (decoder, pre-bias, AuxK, b_dec
    init, lr, seed, ...) <- the [size_matched] preset <- its fields, then variant TopK, src's k and `d_sae`.
    Fields that act only on src's variant go back to the arm's base values (as on the grid's TopK runs). With no
    preset or fields in [size_matched], only the variant and the size differ from src."""
    sm = plan.get("size_matched") or {}
    arm = next((a for a in plan["arm"] if a["name"] == src.arm), {})
    base, _ = _resolve(plan, arm.get("preset"), {})
    sae = {**src.sae, **{f: base[f] for f in foreign_fields(BASELINE)}}
    train = dict(src.train)
    if sm.get("preset"):
        sae.update(PRESETS[sm["preset"]][0])
        train.update({k: v for k, v in PRESETS[sm["preset"]][1].items() if k not in NOT_PLAN})
    values = {k: v for k, v in sm.items() if k not in ("preset", "where")}
    for k, v in values.items():
        (sae if k in SAE_FIELDS else train)[k] = v
    sae.update(variant=BASELINE, k=src.sae["k"], d_sae=d_sae)
    if "steps" not in values and "tokens" not in values:
        train.update(steps=src.train["steps"], tokens=src.train["tokens"])
    if steps is not None:
        train.update(steps=steps, tokens=None)
    return sae, train


def recipe_differences(matched: RunSpec, src: RunSpec) -> list[str]:
    """Fields in which a size-matched TopK differs from its source run beyond the variant and d_sae (fields that
    act only on the source's variant aside): none unless the plan's [size_matched] asked for them."""
    ignore = {"variant", "d_sae", *foreign_fields(BASELINE)}
    a, b = matched.switches(), src.switches()
    return [k for k in a if k not in ignore and a[k] != b.get(k)]


def _selected(spec: RunSpec, where: dict) -> bool:
    """Whether the size-matched arm matches `spec`: its switches (and arm) equal `where`'s values, and, unless
    `where` names a variant, it is not a TopK run already."""
    values = {**spec.switches(), "arm": spec.arm}
    if "variant" not in where and spec.sae["variant"] == BASELINE:
        return False
    return all(values.get(k) == v for k, v in where.items())


# ---------------------------------------------------------------- study state

def _identity(plan: dict, cfg: StudyConfig, cache_hash: str) -> dict:
    return {"plan": plan, "cache_hash": cache_hash, "steps": cfg.steps, "metrics": cfg.metrics}


def _flatten(d, prefix=""):
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and any(isinstance(x, dict) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: d}


def _open_study(out: Path, identity: dict) -> dict:
    path = out / STUDY_JSON
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise StudyError(f"{path} is unreadable ({e}); remove it to restart the study") from e
        old, new = _flatten(state["identity"]), _flatten(identity)
        differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if differ:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:12])
            more = f" (and {len(differ) - 12} more)" if len(differ) > 12 else ""
            raise StudyError(f"{out} holds a study of another plan; it differs in {shown}{more}. "
                             f"Rerun with the recorded plan (see {path}) or choose another --out")
        return state
    if out.exists() and any(p.name != STUDY_JSON for p in out.iterdir()):
        raise StudyError(f"--out {out} is not empty and holds no study; choose another --out")
    return {"identity": identity, "done": {}, "seconds": {}}


def _save(out: Path, state: dict) -> None:
    write_text_atomic(out / STUDY_JSON, json.dumps(state, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------- stages

def _train_runs(specs: list[RunSpec], cfg: StudyConfig, runs_dir: Path) -> None:
    """One pass of the cache per distinct training setting; every pass resumes from the runs' checkpoints."""
    groups: dict[str, list[RunSpec]] = {}
    for s in specs:
        groups.setdefault(json.dumps(s.train, sort_keys=True), []).append(s)
    for key, group in groups.items():
        tcfg = TrainConfig(**{**json.loads(key), "cache": cfg.cache, "device": cfg.device, "progress": cfg.progress})
        if len(group) == 1:
            train_saes(replace(tcfg, out=str(runs_dir / group[0].name)), [SAEConfig(**group[0].sae)], resume=True)
        else:
            train_saes(replace(tcfg, out=str(runs_dir)), [SAEConfig(**s.sae) for s in group], resume=True,
                       names=[s.name for s in group])


def _eval_config(plan: dict, cfg: StudyConfig) -> EvalConfig:
    e = {k: v for k, v in plan.get("eval", {}).items() if k not in NOT_PLAN}
    if cfg.metrics is not None:
        e["metrics"] = list(cfg.metrics)
    return EvalConfig(**{**e, "cache": cfg.cache, "device": cfg.device, "progress": cfg.progress})


# EvalConfig fields that do not change what a group computes (the cache is checked by its hash instead).
SETTINGS_IGNORED = ("metrics", "device", "progress", "cache")


def stale_reason(run: Path, ecfg: EvalConfig, cache_hash: str) -> str | None:
    """Why the run's eval.json cannot be reused for `ecfg` (None: it can). Every requested group must record, in
    eval.json's provenance, the run's current weights, this cache, the held-out split the study scores (the run's
    own eval fraction, or the whole cache under other_cache) and the same settings as `ecfg`."""
    try:
        doc = json.loads((run / EVAL_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return "no eval.json"
    origins = doc.get("provenance") if isinstance(doc.get("provenance"), dict) else {}
    metrics = doc.get("metrics") if isinstance(doc.get("metrics"), dict) else {}
    wanted = {k: v for k, v in asdict(ecfg).items() if k not in SETTINGS_IGNORED}
    weights = weights_hash(run)
    split = {"kind": "whole_cache"} if ecfg.other_cache else {"kind": "held_out",
                                                              "eval_fraction": read_run(run).eval_fraction}
    for group in ecfg.metrics:
        origin = origins.get(group)
        if group not in metrics or not isinstance(origin, dict):
            return f"{group}: not evaluated, or with no provenance"
        if weights is None or origin.get("weights_hash") != weights:
            return f"{group}: computed from other weights than the run's current ones"
        if origin.get("cache_hash") != cache_hash:
            return f"{group}: computed on another cache"
        recorded = origin.get("split") if isinstance(origin.get("split"), dict) else {}
        if any(recorded.get(k) != v for k, v in split.items()):
            return f"{group}: scored on another split ({recorded}, the study scores {split})"
        settings = origin.get("settings") if isinstance(origin.get("settings"), dict) else {}
        differ = [k for k, v in wanted.items() if settings.get(k) != v]
        if differ:
            return f"{group}: computed with other settings ({', '.join(differ)})"
    return None


def _evaluated(run: Path, ecfg: EvalConfig, cache_hash: str) -> bool:
    return stale_reason(run, ecfg, cache_hash) is None


def _evaluate_runs(paths: list[Path], ecfg: EvalConfig, cache_hash: str) -> dict[str, str]:
    """Evaluate the runs whose eval.json cannot be reused; returns {run: why} for those that had one."""
    reasons = {p: stale_reason(p, ecfg, cache_hash) for p in paths}
    todo = [p for p, why in reasons.items() if why is not None]
    if todo:
        evaluate(todo, ecfg)
    return {p.name: why for p, why in reasons.items() if why not in (None, "no eval.json")}


def _compare(cfg: StudyConfig, runs: list[Path], out_html: Path, audit: str | None = None) -> None:
    compare_runs([str(r) for r in runs], CompareConfig(cache=cfg.cache, out=str(out_html), device=cfg.device,
                                                       progress=cfg.progress, audit=audit))


def run_study(cfg: StudyConfig) -> dict:
    """Run (or continue) the study; returns its state (study.json)."""
    plan = load_plan(cfg.plan)
    out = Path(cfg.out)
    manifest = read_manifest(cfg.cache)
    d_in, cache_hash = int(manifest["d_in"]), manifest_hash(manifest)
    specs, skipped = expand(plan, d_in, cfg.steps)  # before anything is made: a bad run name is refused here
    try:
        with DirLock(out, "study"):
            return _run_study(cfg, plan, out, d_in, cache_hash, specs, skipped)
    except OSError as e:
        raise StudyError(f"cannot write the study {out}: {e}; finished runs and stages are kept, rerun the same "
                         f"command once there is room") from e


def _run_study(cfg: StudyConfig, plan: dict, out: Path, d_in: int, cache_hash: str, specs: list[RunSpec],
               skipped: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    state = _open_study(out, _identity(plan, cfg, cache_hash))
    runs_dir = out / "runs"
    state.update(runs=[asdict(s) for s in specs], skipped=skipped)
    _save(out, state)
    ecfg = _eval_config(plan, cfg)
    _stage(out, state, "train", lambda: _train_runs(specs, cfg, runs_dir))
    # Evaluation is checked on every rerun: a run whose eval.json no longer matches its weights, the cache or the
    # settings (see stale_reason) is evaluated again, and the pages built from it are redone.
    _eval_stage(out, state, "eval", [runs_dir / s.name for s in specs], ecfg, cache_hash)
    alive = {s.name: _alive(runs_dir / s.name) for s in specs if s.sae["variant"] != BASELINE}
    matched, sm_skipped = size_matched(plan, specs, alive, d_in, cfg.steps)
    if state.get("size_matched") not in (None, [asdict(s) for s in matched]):  # alive counts moved
        for stage in ("train_size_matched", "eval_size_matched", "compare"):
            state["done"].pop(stage, None)
    state.update(size_matched=[asdict(s) for s in matched], size_matched_skipped=sm_skipped, alive=alive)
    _save(out, state)
    if matched:
        _stage(out, state, "train_size_matched", lambda: _train_runs(matched, cfg, runs_dir))
        _eval_stage(out, state, "eval_size_matched", [runs_dir / s.name for s in matched], ecfg, cache_hash)
    every = specs + matched
    audit = cfg.audit or plan.get("audit")
    if len(every) > 1:
        _stage(out, state, "compare",
               lambda: _compare(cfg, [runs_dir / s.name for s in every], out / "compare.html", audit))
    docs = {s.name: json.loads((runs_dir / s.name / EVAL_JSON).read_text()) for s in every}
    _stage(out, state, "report", lambda: write_report(out, plan, every, docs, state, audit), always=True)
    return state


def _eval_stage(out: Path, state: dict, name: str, runs: list[Path], ecfg: EvalConfig, cache_hash: str) -> None:
    stale: dict[str, str] = {}
    _stage(out, state, name, lambda: stale.update(_evaluate_runs(runs, ecfg, cache_hash)), always=True)
    if stale:  # recorded (not reported: the report stays the same bytes on a rerun)
        state.setdefault("reevaluated", {}).update(stale)
        state["done"].pop("compare", None)
        _save(out, state)


def _stage(out: Path, state: dict, name: str, fn, always: bool = False) -> None:
    if state["done"].get(name) and not always:
        return
    t0 = time.perf_counter()
    fn()
    state["done"][name] = True
    state["seconds"][name] = state["seconds"].get(name, 0) + time.perf_counter() - t0
    _save(out, state)


def _alive(run: Path) -> int:
    doc = json.loads((run / EVAL_JSON).read_text())
    dens = doc["metrics"].get("density")
    if dens is None:
        raise StudyError("the size-matched arm needs the density metric (fraction alive); add it to the metrics")
    return round((1 - dens["dead_fraction"]) * len(dens["per_latent"]))


# ---------------------------------------------------------------- report

def metric_row(doc: dict) -> dict[str, float | None]:
    """The paper's table columns of one eval.json (each metric group declares its own, evals/registry.py)."""
    return paper_row(doc["metrics"])


def switch_effects(specs: list[RunSpec], rows: dict[str, dict]) -> list[dict]:
    """For each switch and each change of its value: the pairs of runs that differ only in it (same seed), and per
    metric the mean of (metric at 'to' - metric at 'from') over the pairs with its t interval (`paired_effect`).
    The seed is not a switch: runs of several seeds are replicates, paired within a seed."""
    keys = varying(specs)
    out = []
    for sw in [k for k in keys if k != "seed"]:
        for (va, vb), pairs in _changes(specs, sw, [k for k in keys if k != sw]).items():
            out.append({"switch": sw, "from": json.loads(va), "to": json.loads(vb), "pairs": len(pairs),
                        **_pair_stats(pairs, rows)})
    return out


def _changes(specs: list[RunSpec], sw: str, others: list[str]) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(from, to) value change of `sw` -> the (run at from, run at to) pairs equal in every other varying switch."""
    groups: dict[str, list[RunSpec]] = {}
    for s in specs:
        groups.setdefault(json.dumps([s.switches()[k] for k in others]), []).append(s)
    order = list(dict.fromkeys(json.dumps(s.switches()[sw]) for s in specs))
    changes: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for group in groups.values():
        for a in group:
            for b in group:
                va, vb = json.dumps(a.switches()[sw]), json.dumps(b.switches()[sw])
                if order.index(va) < order.index(vb):
                    changes.setdefault((va, vb), []).append((a.name, b.name))
    return changes


def _pair_stats(pairs: list[tuple[str, str]], rows: dict[str, dict]) -> dict:
    cols = _columns({name: rows[name] for pair in pairs for name in pair})
    effects = {c: paired_effect([rows[b][c] - rows[a][c] for a, b in pairs
                                 if rows[a].get(c) is not None and rows[b].get(c) is not None]) for c in cols}
    return {"deltas": {c: e["mean"] for c, e in effects.items()}, "effects": effects}


def paired_effect(diffs: list[float], level: float = LEVEL) -> dict:
    """Mean of per-pair differences with a t interval over the pairs (mean +- t_{n-1} * sd / sqrt(n)): each pair
    (another seed, or another setting of the other switches) is one draw of the effect, so the interval covers the
    effect averaged over the grid, seed noise and its variation with the other switches included. One pair has no
    spread to estimate: no interval. `significant`: the interval excludes 0 (None without an interval)."""
    n = len(diffs)
    if n == 0:
        return {"mean": None, "interval": None, "n": 0, "significant": None}
    mean = float(np.mean(diffs))
    if n == 1:
        return {"mean": mean, "interval": None, "n": 1, "significant": None}
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, n - 1) * np.std(diffs, ddof=1) / math.sqrt(n))
    lo, hi = mean - half, mean + half
    return {"mean": mean, "interval": [lo, hi], "n": n, "significant": not lo <= 0.0 <= hi}


def matched_effect(specs: list[RunSpec], rows: dict[str, dict]) -> dict | None:
    """Size-matched TopK minus its source run, over every (source, size-matched TopK) pair, as `switch_effects`."""
    pairs = [(s.matched_to, s.name) for s in specs if s.matched_to]
    if not pairs:
        return None
    return {"switch": "at the source's alive size", "from": "source run", "to": "size-matched TopK",
            "pairs": len(pairs), **_pair_stats(pairs, rows)}


def _fmt_effect(e: dict | None) -> str:
    if e is None or e["mean"] is None:
        return "-"
    if e["interval"] is None:
        return f"{e['mean']:+.4g} (one pair)"
    lo, hi = e["interval"]
    return f"{e['mean']:+.4g} [{lo:+.3g}, {hi:+.3g}]" + (" *" if e["significant"] else "")


def significance_line(effect: dict, cols: list[str]) -> str:
    """One effect in words: which metrics' differences are significant (95% interval excludes 0) and which not."""
    label = f"{effect['switch']} {_fmt(effect['from'])} -> {_fmt(effect['to'])} ({effect['pairs']} pairs)"
    if effect["pairs"] == 1:
        return f"{effect['switch']} {_fmt(effect['from'])} -> {_fmt(effect['to'])}: no interval (one pair)."
    effs = {c: effect["effects"][c] for c in cols if c in effect["effects"] and effect["effects"][c]["n"]}
    sig = [f"{c} {_fmt_effect(e).removesuffix(' *')}" for c, e in effs.items() if e["significant"]]
    insig = [c for c, e in effs.items() if e["significant"] is False]
    single = [c for c, e in effs.items() if e["interval"] is None]
    parts = [f"significant (interval excludes 0): {'; '.join(sig)}" if sig else "no significant difference"]
    parts += [f"not significant (interval includes 0): {', '.join(insig)}"] if insig else []
    parts += [f"no interval (one pair): {', '.join(single)}"] if single else []
    return f"{label}: " + "; ".join(parts) + "."


def alive_latents(spec: RunSpec, doc: dict) -> int | None:
    """Latents that fired on the held-out rows: (1 - the density group's dead_fraction) * d_sae."""
    dens = doc.get("metrics", {}).get("density")
    dead = dens.get("dead_fraction") if isinstance(dens, dict) else None
    return None if dead is None else round((1 - dead) * spec.sae["d_sae"])


def n_fractions(spec: RunSpec, doc: dict) -> dict[int, float | None]:
    """SCR/TPP's N as a fraction of the run's alive latents, at every N it measured (None: no alive count)."""
    ns = sorted({n for g in ("scr", "tpp") for n in (doc.get("metrics", {}).get(g) or {}).get("n_values", [])})
    alive = alive_latents(spec, doc)
    return {n: n / alive if alive else None for n in ns}


def _n_table(specs: list[RunSpec], docs: dict[str, dict]) -> list:
    fractions = {s.name: n_fractions(s, docs[s.name]) for s in specs}
    ns = sorted({n for f in fractions.values() for n in f})
    if not ns:
        return []
    rows = [[s.name, str(s.sae["d_sae"]), _fmt(alive_latents(s, docs[s.name])),
             *["-" if fractions[s.name].get(n) is None else f"{fractions[s.name][n]:.2%}" for n in ns]]
            for s in specs]
    return [("h2", "SCR / TPP: N as a fraction of each run's alive latents"),
            ("p", "SCR and TPP ablate the top N latents; N / alive latents (alive = (1 - dead fraction) x d_sae on "
                  "the held-out rows) says how large a share of the dictionary that is, e.g. for a vSAE with few "
                  "alive latents or its size-matched TopK."),
            ("table", (["run", "d_sae", "alive latents", *[f"N={n}" for n in ns]], rows))]


# The numbers the report compares with the random-SAE nulls, per group (None: every headline of the group).
NULL_COLUMNS = {"core": ("ce_score",), "scr": None, "tpp": None, "sparse_probing": None,
                "ground_truth": ("mcc", "f1")}


def null_columns(docs: dict[str, dict]) -> list[tuple[str, str, Headline, int]]:
    """(column, group, headline, N) of the numbers the report compares with the random-SAE nulls (NULL_COLUMNS; SCR /
    TPP at every N some run measured), keeping only those some run has a null comparison for (a synthetic cache
    has no CE score)."""
    out = []
    for group, keys in NULL_COLUMNS.items():
        results = [d["metrics"][group] for d in docs.values() if isinstance(d["metrics"].get(group), dict)]
        if not results or group not in METRIC_GROUPS:
            continue
        ns = sorted({n for r in results for n in r.get("n_values", [])}) if group in ("scr", "tpp") else [0]
        for h in METRIC_GROUPS[group].headlines:
            if keys is None or h.key in keys:
                out += [(h.title(n), group, h, n) for n in ns if any(h.null(r, n) for r in results)]
    return out


def null_separation(doc: dict, columns: list[tuple[str, str, Headline, int]]) -> dict[str, dict | None]:
    """Column -> the run's comparison with its random-SAE nulls (eval.json `null`), None where not measured."""
    return {col: h.null(doc["metrics"][g], n) if isinstance(doc["metrics"].get(g), dict) else None
            for col, g, h, n in columns}


def separation_line(column: str, entries: list[dict | None]) -> str | None:
    """Whether `column` separates trained from random SAEs across the runs, in words (None: never assessed)."""
    verdicts = [v for v in (separated(e) for e in entries) if v is not None]
    if not verdicts:
        return None
    apart, n = sum(verdicts), len(verdicts)
    if n - apart > n / 2:
        return (f"{column} does not separate trained from random SAEs for {n - apart} of {n} runs (trained minus "
                f"null: the 95% interval includes 0); its differences between those runs are not evidence of what "
                f"training learned.")
    return f"{column} separates trained from random SAEs for {apart} of {n} runs."


def _null_sections(specs: list[RunSpec], docs: dict[str, dict]) -> list:
    columns = null_columns(docs)
    if not columns:
        return []
    table = {s.name: null_separation(docs[s.name], columns) for s in specs}
    lines = [line for col, *_ in columns if (line := separation_line(col, [t[col] for t in table.values()]))]
    rows = [[name, *[_fmt_separation(t[col]) for col, *_ in columns]] for name, t in table.items()]
    return [("h2", "Trained against random SAEs of the same shape"),
            ("p", "yes: the run's score differs from its random-SAE nulls' (same d_sae and k, several seeds; the "
                  "eval's paired bootstrap gives a 95% interval of trained - null mean that excludes 0); no: it "
                  "does not; -: not measured. The number is trained - null mean."),
            ("table", (["run", *[col for col, *_ in columns]], rows)),
            ("list", lines)]


def _fmt_separation(entry: dict | None) -> str:
    verdict = separated(entry)
    if verdict is None:
        return "-"
    return f"{'yes' if verdict else 'no'} ({entry['difference']:+.3g})"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _columns(rows: dict[str, dict]) -> list[str]:
    cols = []
    for r in rows.values():
        cols += [c for c in r if c not in cols]
    return cols


def write_report(out: Path, plan: dict, specs: list[RunSpec], docs: dict[str, dict], state: dict,
                 audit: str | None = None) -> None:
    """report.md and report.html (plus figures/METRIC.html against k); no timings, so reruns give the same bytes.
    With an `audit` (audit.json), numbers of a metric that failed a lens carry its mark, explained below the table."""
    rows = {s.name: metric_row(docs[s.name]) for s in specs}
    cols = _columns(rows)
    switches = varying(specs) or ["variant"]
    figures = _figures(out, specs, rows, cols)
    title = f"Study {plan.get('name', Path(out).name)}"
    head = ["run", *switches, *cols]
    flags = column_marks(cols, read_marks(read_audit(audit)) if audit else {})
    table = [[s.name, *[_fmt(s.switches()[k]) for k in switches],
              *[_fmt(v := rows[s.name].get(c)) + (f" [{flags[c].text}]" if c in flags and v is not None else "")
                for c in cols]] for s in specs]
    first = next(iter(docs.values()))
    tokens_line = "Measured: " + "; ".join(measured_on(first["metrics"], first["settings"])) + \
        " (the same for every run)."
    seeds = sorted({s.train["seed"] for s in specs})
    seeds_line = (f"Every run spec is trained with each of the seeds {', '.join(map(str, seeds))} (plan field "
                  f"`seeds`); run names carry the seed." if len(seeds) > 1 else
                  f"One training seed ({seeds[0]}): effects have an interval only where several pairs of runs "
                  f"differ in the same switch (plan field `seeds` adds replicates).")
    skipped = state.get("skipped", []) + state.get("size_matched_skipped", [])
    sections = [("p", plan.get("description", "")), ("p", tokens_line), ("p", seeds_line),
                ("h2", "Runs (paper-style table)"), ("table", (head, table))]
    if flags:
        sections += [("p", f"Marked [fails ...]: the metric failed that lens of the audit {audit} (vsae audit):"),
                     ("list", [f"{c}: {m.text}: {m.title}" for c, m in flags.items()])]
    sections += _n_table(specs, docs) + _null_sections(specs, docs)
    # Size-matched runs differ from the grid in d_sae alone; their own section compares them.
    sections += _effect_sections(switch_effects([s for s in specs if s.matched_to is None], rows), cols)
    sections += _matched_sections(specs, rows, cols, state)
    sections += [("h2", "Figures against k"), ("links", [(f"figures/{c}.html", c) for c in figures])]
    if (out / "compare.html").exists():
        sections += [("h2", "Compare page"), ("links", [("compare.html", "all runs side by side")])]
    sections += [("h2", f"Skipped combinations ({len(skipped)})"), ("list", skipped or ["none"])]
    write_text_atomic(out / "report.md", _markdown(title, sections))
    write_text_atomic(out / "report.html", _html(title, sections))


# The report's paper-style columns (evals/registry.py `paper`) that are not `group.key` of the number they show.
COLUMN_METRICS = {"alive": ("density", "dead_fraction"), "gt_f1": ("ground_truth", "f1"),
                  "mcc": ("ground_truth", "mcc")}


def column_marks(cols: list[str], marks: dict) -> dict:
    """Report column -> the audit mark of the metric it shows, for the columns whose metric failed a lens."""
    out = {}
    for c in cols:
        task, _, n = c.partition("_")
        if c in COLUMN_METRICS:
            keys = [COLUMN_METRICS[c]]
        elif task in ("scr", "tpp") and n.isdigit():
            keys = [(task, METRIC_GROUPS[task].headlines[0].name(int(n)))]
        else:
            keys = [(g, c) for g in METRIC_GROUPS]
        found = next((m for g, k in keys if (m := mark_for(marks, g, k)) is not None), None)
        if found is not None:
            out[c] = found
    return out


EFFECT_METHOD = ("Δ: the mean over the pairs of runs that differ only in this switch (same seed) of (metric at 'to' "
                 "- metric at 'from'), with a 95% t interval over the pairs (mean +- t(n-1) x sd / sqrt(n), n "
                 "pairs): each pair is one draw of the effect, so the interval covers its mean over the grid, seed "
                 "noise and its variation with the other switches included. * marks an interval that excludes 0 "
                 "(significant); one pair gives no interval.")


def _effect_sections(effects: list[dict], cols: list[str]) -> list:
    head = ["switch", "from", "to", "pairs", *[f"Δ {c}" for c in cols]]
    rows = [[e["switch"], _fmt(e["from"]), _fmt(e["to"]), str(e["pairs"]),
             *[_fmt_effect(e["effects"].get(c)) for c in cols]] for e in effects]
    return [("h2", "Effect of each switch, the others held fixed"), ("p", EFFECT_METHOD), ("table", (head, rows)),
            ("p", "In words:"), ("list", [significance_line(e, cols) for e in effects] or ["no switch varies"])]


def _matched_sections(specs: list[RunSpec], rows: dict[str, dict], cols: list[str], state: dict) -> list:
    by_name = {s.name: s for s in specs}
    matched = [s for s in specs if s.matched_to]
    if not matched:
        return []
    head = ["source run", "alive latents", "size-matched TopK", "also differs in",
            *[f"Δ {c} (TopK - source)" for c in cols]]
    table = [[s.matched_to, str(state.get("alive", {}).get(s.matched_to, "-")), s.name,
              ", ".join(recipe_differences(s, by_name[s.matched_to])) or "nothing (variant and size only)",
              *[_fmt(None if rows[s.matched_to].get(c) is None or rows[s.name].get(c) is None
                     else rows[s.name][c] - rows[s.matched_to][c]) for c in cols]] for s in matched]
    effect = matched_effect(specs, rows)
    summary = [["all pairs", str(effect["pairs"]), *[_fmt_effect(effect["effects"].get(c)) for c in cols]]]
    return [("h2", "Size-matched TopK (d_sae = the source run's alive latents, same k, otherwise its recipe)"),
            ("table", (head, table)),
            ("p", "Mean over the pairs, with a 95% t interval over the pairs (as above):"),
            ("table", (["size-matched TopK - source", "pairs", *[f"Δ {c}" for c in cols]], summary)),
            ("list", [significance_line(effect, cols)])]


def _figures(out: Path, specs: list[RunSpec], rows: dict[str, dict], cols: list[str]) -> list[str]:
    import plotly.graph_objects as go

    series: dict[str, list[RunSpec]] = {}
    for s in specs:
        rest = {k: v for k, v in s.switches().items() if k != "k"}
        series.setdefault(json.dumps(rest, sort_keys=True), []).append(s)
    keys = [k for k in varying(specs) if k != "k"]
    written = []
    for c in cols:
        fig = go.Figure()
        for group in series.values():
            group = sorted(group, key=lambda s: s.sae["k"])
            label = " ".join(label_part(k, group[0].switches()[k]) for k in keys) or group[0].sae["variant"]
            fig.add_trace(go.Scatter(x=[s.sae["k"] for s in group], y=[rows[s.name].get(c) for s in group],
                                     mode="lines+markers", name=label))
        fig.update_layout(title=f"{c} against k", xaxis_title="k", yaxis_title=c, xaxis_type="log")
        write_figure(fig, out / "figures" / f"{c}.html")
        written.append(c)
    return written


def _markdown(title: str, sections: list) -> str:
    lines = [f"# {title}", ""]
    for kind, body in sections:
        if kind == "h2":
            lines += [f"## {body}", ""]
        elif kind == "p" and body:
            lines += [body, ""]
        elif kind == "table":
            head, rows = body
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
        elif kind == "links":
            lines += [f"- [{text}]({href})" for href, text in body] + [""]
        elif kind == "list":
            lines += [f"- {x}" for x in body] + [""]
    return "\n".join(lines)


def _html(title: str, sections: list) -> str:
    """The report as one self-contained page in the dashboards' style (stylesheet inlined, no script)."""
    parts = [f"<h1>{esc(title)}</h1>"]
    for kind, body in sections:
        if kind == "h2":
            parts.append(f"<h2>{esc(body)}</h2>")
        elif kind == "p" and body:
            parts.append(f"<p>{esc(body)}</p>")
        elif kind == "table":
            head, rows = body
            parts.append(table([[esc(c) for c in r] for r in rows], [esc(h) for h in head], cls="data"))
        elif kind == "links":
            parts.append("<ul>" + "".join(f'<li><a href="{esc(h)}">{esc(t)}</a></li>' for h, t in body) + "</ul>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in body) + "</ul>")
    return page(title, "\n".join(parts), css=CSS)
