"""`vsae study`: a plan's grid of SAEs, trained in one pass of the cache per training setting, evaluated on the
same held-out tokens, then the size-matched TopK arm, and a report of each switch's effect with the others fixed.

    studies/NAME/
      study.json       the plan, the expanded runs, what is done (rewritten atomically after every stage)
      runs/RUN/        one vsae run per SAE (train.json, eval.json, ...)
      figures/*.html   one figure per metric against k
      compare.html     the compare page of all runs (dashboards.compare)
      report.md, report.html

Every stage is resumable: training continues from the runs' checkpoints, evaluation skips runs whose
eval.json already holds the requested metrics, and a rerun with the same plan continues where it stopped.
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from activations.atomic import write_text_atomic
from activations.cache import manifest_hash, read_manifest
from activations.devices import resolve_device
from activations.guard import DirLock, plain_name
from dashboards.assets import CSS
from dashboards.compare import CompareConfig, compare_runs
from dashboards.html import esc, page, table
from evals.driver import EvalConfig, evaluate
from evals.figures import write_figure
from evals.registry import METRICS, measured_on, paper_row
from vsae.config import PRESETS, SAEConfig, TrainConfig, label_part
from vsae.run import EVAL_JSON, RunError
from vsae.trainer import train as train_saes
from vsae.variants import VARIANTS

STUDY_JSON = "study.json"
SAE_FIELDS = tuple(f.name for f in fields(SAEConfig))
TRAIN_SWITCHES = ("steps", "tokens", "lr", "batch_size", "lr_warmup_steps", "seed")  # allowed per run
# The size-matched arm's variant: the plain TopK SAE, sized to each other variant's alive latents.
BASELINE = "topk"
PLAN_KEYS = ("name", "description", "train", "eval", "sae", "arm", "size_matched")
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
    return plan


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
    """The plan's runs, deduplicated, and the skipped combinations with the reason of each."""
    specs, skipped, seen = [], [], {}
    for arm in plan["arm"]:
        base_sae, _ = _resolve(plan, arm.get("preset"), {})
        for values in _grid(arm):
            sae, train = _resolve(plan, arm.get("preset"), values)
            if steps is not None:
                train.update(steps=steps, tokens=None)
            reason = _skip_reason(sae, train, base_sae, d_in, seen)
            if reason is not None:
                what = f"{arm['name']}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                skipped.append(f"{what} ({reason})")
                continue
            seen[_key(sae, train)] = len(specs)
            specs.append(RunSpec(name="", arm=arm["name"], sae=sae, train=train))
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
    """TopK runs with d_sae = each selected run's alive-latent count (and its k); by default every run of a variant
    other than TopK is selected."""
    sm = plan.get("size_matched")  # an empty [size_matched] table: the plain TopK defaults of the plan
    if sm is None:
        return [], []
    where = sm.get("where", {})
    out, skipped, seen = [], [], {}
    primary = {_key(s.sae, s.train): s.name for s in specs}
    for src in specs:
        if not _selected(src, where):
            continue
        values = {k: v for k, v in sm.items() if k not in ("preset", "where")}
        sae, train = _resolve(plan, sm.get("preset"), {**values, "variant": BASELINE, "k": src.sae["k"],
                                                       "d_sae": alive[src.name]})
        if "steps" not in values and "tokens" not in values:
            train.update(steps=src.train["steps"], tokens=src.train["tokens"])
        if steps is not None:
            train.update(steps=steps, tokens=None)
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


def _evaluated(run: Path, ecfg: EvalConfig, cache_hash: str) -> bool:
    try:
        doc = json.loads((run / EVAL_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    same = {k: v for k, v in asdict(ecfg).items() if k not in ("metrics", "device", "progress", "cache")}
    settings = doc.get("settings", {})
    return (doc.get("cache_hash") == cache_hash and set(ecfg.metrics) <= set(doc.get("metrics", {}))
            and all(settings.get(k) == v for k, v in same.items()))


def _evaluate_runs(paths: list[Path], ecfg: EvalConfig, cache_hash: str) -> None:
    todo = [p for p in paths if not _evaluated(p, ecfg, cache_hash)]
    if todo:
        evaluate(todo, ecfg)


def _compare(cfg: StudyConfig, runs: list[Path], out_html: Path) -> None:
    compare_runs([str(r) for r in runs], CompareConfig(cache=cfg.cache, out=str(out_html), device=cfg.device,
                                                       progress=cfg.progress))


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
    stages = [("train", lambda: _train_runs(specs, cfg, runs_dir)),
              ("eval", lambda: _evaluate_runs([runs_dir / s.name for s in specs], ecfg, cache_hash))]
    for stage, fn in stages:
        _stage(out, state, stage, fn)
    alive = {s.name: _alive(runs_dir / s.name) for s in specs if s.sae["variant"] != BASELINE}
    matched, sm_skipped = size_matched(plan, specs, alive, d_in, cfg.steps)
    state.update(size_matched=[asdict(s) for s in matched], size_matched_skipped=sm_skipped, alive=alive)
    _save(out, state)
    if matched:
        _stage(out, state, "train_size_matched", lambda: _train_runs(matched, cfg, runs_dir))
        _stage(out, state, "eval_size_matched",
               lambda: _evaluate_runs([runs_dir / s.name for s in matched], ecfg, cache_hash))
    every = specs + matched
    if len(every) > 1:
        _stage(out, state, "compare",
               lambda: _compare(cfg, [runs_dir / s.name for s in every], out / "compare.html"))
    docs = {s.name: json.loads((runs_dir / s.name / EVAL_JSON).read_text()) for s in every}
    _stage(out, state, "report", lambda: write_report(out, plan, every, docs, state), always=True)
    return state


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
    """For each switch and each pair of runs that differ only in it: metric deltas, averaged per value change."""
    keys = varying(specs)
    out = []
    for sw in keys:
        others = [k for k in keys if k != sw]
        groups: dict[str, list[RunSpec]] = {}
        for s in specs:
            groups.setdefault(json.dumps([s.switches()[k] for k in others]), []).append(s)
        order = []
        for s in specs:
            if s.switches()[sw] not in order:
                order.append(s.switches()[sw])
        changes: dict[tuple, list[tuple[str, str]]] = {}
        for group in groups.values():
            for a in group:
                for b in group:
                    va, vb = a.switches()[sw], b.switches()[sw]
                    if order.index(va) < order.index(vb):
                        changes.setdefault((json.dumps(va), json.dumps(vb)), []).append((a.name, b.name))
        for (va, vb), pairs in changes.items():
            deltas = {}
            for metric in rows[pairs[0][0]]:
                ds = [rows[b][metric] - rows[a][metric] for a, b in pairs
                      if rows[a].get(metric) is not None and rows[b].get(metric) is not None]
                deltas[metric] = sum(ds) / len(ds) if ds else None
            out.append({"switch": sw, "from": json.loads(va), "to": json.loads(vb), "pairs": len(pairs),
                        "deltas": deltas})
    return out


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


def write_report(out: Path, plan: dict, specs: list[RunSpec], docs: dict[str, dict], state: dict) -> None:
    """report.md and report.html (plus figures/METRIC.html against k); no timings, so reruns give the same bytes."""
    rows = {s.name: metric_row(docs[s.name]) for s in specs}
    cols = _columns(rows)
    switches = varying(specs) or ["variant"]
    # Size-matched runs differ from the grid in d_sae alone; their own table compares them, pairs here would be noise.
    effects = switch_effects([s for s in specs if s.matched_to is None], rows)
    figures = _figures(out, specs, rows, cols)
    title = f"Study {plan.get('name', Path(out).name)}"
    head = ["run", *switches, *cols]
    table = [[s.name, *[_fmt(s.switches()[k]) for k in switches], *[_fmt(rows[s.name].get(c)) for c in cols]]
             for s in specs]
    eff_head = ["switch", "from", "to", "pairs", *[f"Δ {c}" for c in cols]]
    eff_rows = [[e["switch"], _fmt(e["from"]), _fmt(e["to"]), str(e["pairs"]), *[_fmt(e["deltas"].get(c))
                                                                                  for c in cols]] for e in effects]
    matched = [(s.matched_to, s.name) for s in specs if s.matched_to]
    sm_head = ["vSAE", "alive latents", "size-matched TopK", *[f"Δ {c} (TopK - vSAE)" for c in cols]]
    sm_rows = [[a, str(state.get("alive", {}).get(a, "-")), b,
                *[_fmt(None if rows[a].get(c) is None or rows[b].get(c) is None else rows[b][c] - rows[a][c])
                  for c in cols]] for a, b in matched]
    first = next(iter(docs.values()))
    tokens_line = "Measured: " + "; ".join(measured_on(first["metrics"], first["settings"])) + \
        " (the same for every run)."
    skipped = state.get("skipped", []) + state.get("size_matched_skipped", [])
    sections = [
        ("p", plan.get("description", "")),
        ("p", tokens_line),
        ("h2", "Runs (paper-style table)"), ("table", (head, table)),
        ("h2", "Effect of each switch, the others held fixed"),
        ("p", "Mean over every pair of runs that differ only in this switch of (metric at 'to' - metric at 'from')."),
        ("table", (eff_head, eff_rows)),
    ]
    if matched:
        sections += [("h2", "Size-matched TopK (d_sae = the vSAE's alive latents, same k)"),
                     ("table", (sm_head, sm_rows))]
    sections += [("h2", "Figures against k"), ("links", [(f"figures/{c}.html", c) for c in figures])]
    if (out / "compare.html").exists():
        sections += [("h2", "Compare page"), ("links", [("compare.html", "all runs side by side")])]
    sections += [("h2", f"Skipped combinations ({len(skipped)})"), ("list", skipped or ["none"])]
    write_text_atomic(out / "report.md", _markdown(title, sections))
    write_text_atomic(out / "report.html", _html(title, sections))


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
