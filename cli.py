"""The `vsae` command: one subcommand per stage of the pipeline, its flags generated from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _field_type(tp) -> tuple[type, bool]:
    """(scalar type, is_list) of a dataclass field annotation such as `int`, `str | None`, `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def field_help(cls, f: dataclasses.Field) -> str:
    """The help a config field carries (`field(metadata={"help": ...})`)."""
    text = f.metadata.get("help")
    if not text:
        raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it as field(..., metadata={{'help': ...}})")
    return text


def field_default(f: dataclasses.Field):
    """The field's default value (a fresh one from its factory), or `dataclasses.MISSING`."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_config_flags(parser: argparse.ArgumentParser, cls, choices: dict[str, tuple] | None = None,
                     required: tuple[str, ...] = (), comma: dict[str, str] | None = None,
                     explicit_only: bool = False) -> None:
    """One flag per field of the dataclass `cls` (`--field-name`), with the field's default and help.

    `comma` names fields given as one comma-separated string, which the command parses; its value is
    the help's note on what the list holds. With `explicit_only`, flags the user did not give stay out
    of the namespace (so a preset can fill them); the default is still shown in the help. The parser
    records `cls` in its `configs` default, so tests can check that every field has its flag.
    """
    choices, comma = choices or {}, comma or {}
    parser.set_defaults(configs=(*(parser.get_default("configs") or ()), cls))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = field_default(f)
        is_required = default is dataclasses.MISSING or f.name in required
        tp, is_list = _field_type(hints[f.name])
        helptext = field_help(cls, f)
        if f.name in comma:
            helptext, tp, is_list = f"{helptext}; {comma[f.name]}", str, False
            default = ",".join(map(str, default)) if isinstance(default, list) else default
        if is_required:
            default = argparse.SUPPRESS  # always given, so a default would only clutter the help
        elif explicit_only:
            helptext, default = f"{helptext} (default: {default})", argparse.SUPPRESS
        _add_flag(parser, f, tp, is_list, default, is_required, helptext, choices.get(f.name))


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, tp: type, is_list: bool, default,
              required: bool, helptext: str, choices: tuple | None) -> None:
    flag = "--" + f.name.replace("_", "-")
    if tp is bool and f.default is None:
        parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                            help=helptext)
    elif tp is bool:
        on = f.default
        parser.add_argument(("--no-" + flag[2:]) if on else flag, dest=f.name,
                            action="store_false" if on else "store_true", default=default,
                            help=f"turn off: {helptext}" if on else helptext)
    else:
        parser.add_argument(flag, dest=f.name, type=tp, nargs="+" if is_list else None, default=default,
                            required=required, choices=choices, help=helptext)


def _config(cls, args: argparse.Namespace, **parsed):
    """`cls` from the namespace's values of its fields; `parsed` gives fields the command parsed itself."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **parsed})


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected an integer or a comma list of integers, e.g. 32,64") from None


def check_writable(path: str | Path, flag: str = "--out") -> None:
    """Refuse an output that cannot be written before any work starts: its nearest existing ancestor must be a
    writable directory (a file in the way, or a read-only place, would otherwise fail only at the first save)."""
    import os

    target = Path(path).absolute()
    for parent in (target, *target.parents):
        if parent.exists():
            break
    if parent != target and not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a directory; choose another {flag}")
    probe = parent if parent.is_dir() else parent.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {probe} is not writable; choose another {flag}")


DEVICE_COMMANDS = ("harvest", "synth", "train", "eval", "dashboard", "compare", "study", "serve", "audit")


def _preflight(args: argparse.Namespace) -> None:
    """Checks of the flags every command shares, before any work starts."""
    from activations.devices import AUTO, resolve_device

    if args.command in DEVICE_COMMANDS:
        requested = getattr(args, "device", AUTO)  # train leaves unset flags out (a preset may fill them)
        chosen = resolve_device(requested)
        if hasattr(args, "device"):
            args.device = chosen
        if requested == AUTO:
            print(f"device: {chosen} (auto)")
    if getattr(args, "out", None) and args.command != "build-tiny-model":
        check_writable(args.out)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vsae")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _metrics_note() -> str:
    from evals.registry import METRICS

    return f"comma list of {','.join(METRICS)}, or all"


def cmd_build_tiny_model(args: argparse.Namespace) -> int:
    from activations.tiny_model import TinyModelConfig, build_tiny_model, model_dir

    cfg = _config(TinyModelConfig, args)
    out = Path(args.out) if args.out else model_dir(cfg)
    report = build_tiny_model(cfg, out)
    print(f"model written to {out}: validation CE {report['val_ce']:.3f} nats/token "
          f"(unigram baseline {report['unigram_ce']:.3f})")
    return 0


def cmd_harvest(args: argparse.Namespace) -> int:
    from activations.distributed import HARVEST_TIMEOUT, process_group
    from activations.harvest import HarvestConfig, harvest

    cfg = _config(HarvestConfig, args)
    with process_group(cfg.device, timeout=HARVEST_TIMEOUT) as ranks:  # one process unless under torchrun
        summary = harvest(cfg, ranks)
    if ranks.rank == 0:
        print(summary.line())
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from activations.synthetic import SynthConfig, synthesize

    print(synthesize(_config(SynthConfig, args)).line())
    return 0


def cmd_cache_info(args: argparse.Namespace) -> int:
    from activations.cache import read_manifest, verify_shard

    cache = Path(args.cache)
    m = read_manifest(cache)
    s = m["settings"]
    if args.json:
        print(json.dumps(m, indent=1, sort_keys=True))
    else:
        print(f"cache      {cache}")
        print(f"model      {json.dumps(s['model'])}")
        print(f"hook       {s['hook_name']} (d_in {m['d_in']}, {s['dtype']})")
        corpus = {k: (f"{len(v)} files" if k == "files" else v) for k, v in s["corpus"].items()}
        print(f"corpus     {json.dumps(corpus)}")
        print(f"tokens     {m['total_tokens']:,} of {s['tokens']:,} "
              f"({m['n_sequences']:,} contexts of {s['context']}, BOS dropped: {s['bos_dropped']})")
        print(f"shards     {len(m['shards'])} of {m['n_shards']}; complete: {m['complete']}")
        msn = m["mean_squared_norm"]
        print(f"mean |x|^2 {msn:.6g}" if msn is not None else "mean |x|^2 n/a")
        if m.get("corpus_stats"):
            print(f"corpus     {json.dumps(m['corpus_stats'])}")
    bad = 0
    if not args.no_verify:
        for entry in m["shards"]:
            problem = verify_shard(cache, entry, m["d_in"], s["dtype"])
            if problem:
                bad += 1
                print(f"BAD shard {entry['index']}: {problem}", file=sys.stderr)
        print(f"checksums  {len(m['shards']) - bad} ok, {bad} bad", file=sys.stderr if args.json else sys.stdout)
    return 1 if bad else 0


def cmd_train(args: argparse.Namespace) -> int:
    import tomllib

    from activations.distributed import process_group, rank_device
    from vsae.config import SAEConfig, TrainConfig, apply_preset
    from vsae.trainer import train

    given = vars(args)
    sae_cfg, train_cfg = SAEConfig(), TrainConfig()
    if args.preset:
        sae_cfg, train_cfg = apply_preset(args.preset, sae_cfg, train_cfg)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    sae_fields = {f.name for f in dataclasses.fields(SAEConfig)}
    train_cfg = dataclasses.replace(train_cfg, **{k: v for k, v in given.items() if k in train_fields})
    # --k is a comma list, one SAE per entry; the other SAE flags map to one field each.
    sae_cfg = dataclasses.replace(sae_cfg, **{k: v for k, v in given.items() if k in sae_fields - {"k"}})
    ks = _int_list("--k", given["k"]) if "k" in given else [sae_cfg.k]
    names = None
    sae_cfgs = [dataclasses.replace(sae_cfg, k=k) for k in ks]
    if args.sweep:
        try:
            with open(args.sweep, "rb") as f:
                sweep = tomllib.load(f).get("sae", [])
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"--sweep {args.sweep}: cannot read it as TOML ({e})") from None
        if not isinstance(sweep, list) or not all(isinstance(o, dict) for o in sweep):
            raise ValueError(f"--sweep {args.sweep}: `sae` must be an array of [[sae]] tables")
        if not sweep:
            raise ValueError(f"--sweep {args.sweep}: no [[sae]] tables; each one lists the fields it changes")
        names = [str(o.pop("name")) for o in sweep if "name" in o]
        if names and len(names) != len(sweep):
            raise ValueError(f"--sweep {args.sweep}: give every [[sae]] a name, or none")
        names = names if names and len(sae_cfgs) == 1 else None  # with a --k list, labels keep k apart
        for overrides in sweep:
            unknown = sorted(set(overrides) - sae_fields)
            if unknown:
                raise ValueError(f"--sweep {args.sweep}: unknown SAE field(s) {', '.join(unknown)}; "
                                 f"valid: {', '.join(sorted(sae_fields))}")
        sae_cfgs = [dataclasses.replace(c, **overrides) for c in sae_cfgs for overrides in sweep]
    with process_group(train_cfg.device) as ranks:  # one process unless under torchrun
        train_cfg = dataclasses.replace(train_cfg, device=str(rank_device(train_cfg.device, ranks.world_size,
                                                                           ranks.local_rank)))
        paths = train(train_cfg, sae_cfgs, resume=args.resume, rank=ranks.rank, world_size=ranks.world_size,
                      names=names, stream=_stream_config(given))
    if ranks.rank == 0:
        for p in paths:
            print(f"run written to {p}")
    return 0


def _stream_config(given: dict):
    """The StreamConfig of `vsae train --model ...` (None: train on --cache); refuses mixed or missing sources."""
    from activations.stream_source import StreamConfig

    stream = {f.name: given[f.name] for f in dataclasses.fields(StreamConfig) if f.name in given}
    source = [f"--{k.replace('_', '-')}" for k in ("model", "model_path") if k in stream]
    if "cache" in given and stream:
        raise ValueError(f"--cache trains on a harvested cache, {' '.join(source or ['--model'])} from the model "
                         f"as it runs: give one (the flags {', '.join(sorted(stream))} belong to streaming)")
    if stream and not source:
        raise ValueError(f"--{sorted(stream)[0].replace('_', '-')} sets up streaming training: also give --model "
                         f"NAME or --model-path DIR (or drop it and train on --cache DIR)")
    if not stream and "cache" not in given:
        raise ValueError("give --cache DIR (a cache from vsae harvest), or --model NAME / --model-path DIR to "
                         "train from the model's activations as it produces them")
    if stream.get("cache_out"):
        check_writable(stream["cache_out"], "--cache-out")
    return StreamConfig(**stream) if stream else None


def cmd_eval(args: argparse.Namespace) -> int:
    from evals.audit import read_audit, read_marks
    from evals.driver import EvalConfig, evaluate, table
    from evals.registry import parse_metrics

    marks = read_marks(read_audit(args.audit)) if args.audit else None  # a bad file fails before the work
    results = evaluate(args.runs, _config(EvalConfig, args, metrics=parse_metrics(args.metrics)))
    print(table(results, marks))
    for run in results:
        print(f"wrote {Path(run) / 'eval.json'}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from dashboards.build import DashboardConfig, build_dashboard

    r = build_dashboard(args.run, _config(DashboardConfig, args))
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in r["seconds"].items())
    print(f"dashboard of {r['latents']} latents ({r['dead']} dead) over {r['tokens']:,} tokens written to "
          f"{Path(r['out']) / 'index.html'} ({secs})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from dashboards.compare import CompareConfig, compare_runs

    r = compare_runs(args.runs, _config(CompareConfig, args))
    print(f"comparison of {r['runs']} runs written to {r['out']}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from evals.driver import runs_table

    print(runs_table(args.root, snapshots=args.snapshots))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from evals.registry import parse_metrics
    from pipeline.study import StudyConfig, run_study

    cfg = _config(StudyConfig, args, metrics=parse_metrics(args.metrics) if args.metrics else None)
    state = run_study(cfg)
    n = len(state["runs"]) + len(state.get("size_matched", []))
    print(f"study of {n} runs ({len(state['skipped'])} combinations skipped) written to {cfg.out}: "
          f"{Path(cfg.out) / 'report.md'}, {Path(cfg.out) / 'report.html'}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from evals.registry import parse_metrics
    from pipeline.audit import AuditConfig, run_audit

    cfg = _config(AuditConfig, args, metrics=parse_metrics(args.metrics))
    doc = run_audit(cfg)
    failed = [f"{m['label']} ({', '.join(k for k, v in m['lenses'].items() if v['verdict'] == 'fail')})"
              for m in doc["metrics"] if any(v["verdict"] == "fail" for v in m["lenses"].values())]
    print(f"audit of {len(doc['metrics'])} metrics written to {Path(cfg.out) / 'audit.md'}; failing a lens: "
          f"{'; '.join(failed) or 'none'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import DemoConfig, run_demo

    run_demo(_config(DemoConfig, args))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dashboards.serve import ServeConfig, serve

    serve(args.runs, _config(ServeConfig, args))
    return 0


# ---------------------------------------------------------------- parser: one function per command


def _command(sub, name: str, func: Callable[[argparse.Namespace], int], summary: str,
             description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, formatter_class=FORMATTER, help=summary, description=description)
    p.set_defaults(func=func)
    return p


def _add_build_tiny_model(sub) -> None:
    from activations.tiny_model import TinyModelConfig

    p = _command(sub, "build-tiny-model", cmd_build_tiny_model,
                 "train the embedded default model (GPT-NeoX) on an embedded corpus",
                 "Train vsae's embedded GPT-NeoX model and its BPE tokenizer.")
    add_config_flags(p, TinyModelConfig)
    # Not a TinyModelConfig field: the model's directory name hashes every field.
    p.add_argument("--out", default=None, help="output directory (unset: vsae's cache dir)")


def _add_harvest(sub) -> None:
    from activations.harvest import DTYPES, HarvestConfig

    p = _command(sub, "harvest", cmd_harvest, "cache one hook's activations to disk",
                 "Run a model over a corpus and cache one hook's activations, resumably.")
    add_config_flags(p, HarvestConfig, choices={"dtype": DTYPES})


def _add_synth(sub) -> None:
    from activations.synthetic import DTYPES, PRESETS, SynthConfig

    p = _command(sub, "synth", cmd_synth, "write a synthetic cache with known features (SynthSAEBench)",
                 "Draw activations from SAELens's SynthSAEBench generator (sae_lens.synthetic: superposed, "
                 "correlated, hierarchical features) and write them as an ordinary cache, with the true "
                 "dictionary and each row's true feature activations beside it for `vsae eval --metrics "
                 "ground_truth`.")
    add_config_flags(p, SynthConfig, choices={"preset": tuple(PRESETS), "dtype": DTYPES})


def _add_train(sub) -> None:
    from activations.harvest import DTYPES, MODEL_DTYPES
    from activations.stream_source import StreamConfig
    from vsae.config import B_DEC_INITS, DECODERS, PRESETS, VARIANCES, SAEConfig, TrainConfig
    from vsae.variants import VARIANTS

    p = _command(sub, "train", cmd_train, "train SAEs on a cache or from a model (several in one pass)",
                 "Train TopK / vSAE SAEs on an activation cache (--cache), or from a model's activations as it "
                 "produces them (--model / --model-path, with harvest's source flags; --cache-out keeps them); "
                 "several configs share each batch. Distributed (--cache): torchrun --nproc_per_node N "
                 "$(which vsae) train ...")
    add_config_flags(p, TrainConfig, explicit_only=True)
    add_config_flags(p, StreamConfig, explicit_only=True, choices={"dtype": DTYPES, "model_dtype": MODEL_DTYPES})
    add_config_flags(p, SAEConfig, explicit_only=True, comma={"k": "a comma list trains one SAE each"},
                     choices={"variant": tuple(VARIANTS), "decoder": DECODERS, "variance": VARIANCES,
                              "b_dec_init": B_DEC_INITS})
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="the paper's arms as its code ran them; explicit flags override it")
    p.add_argument("--sweep", default=None, help="TOML file of [[sae]] tables (SAE fields, optional name), "
                   "each trained in the same pass")
    p.add_argument("--resume", action="store_true", help="continue the run(s) in --out")


def _add_eval(sub) -> None:
    from evals.driver import EvalConfig

    p = _command(sub, "eval", cmd_eval, "evaluate runs on a cache's held-out tokens",
                 "Compute metrics of one or more runs on the same held-out tokens; writes "
                 "RUN/eval.json and RUN/figures/*.html and prints a table.")
    p.add_argument("runs", nargs="+", help="run directories (vsae or SAELens topk checkpoints)")
    add_config_flags(p, EvalConfig, choices={"labelled": ("offline", "real")}, comma={"metrics": _metrics_note()})
    p.add_argument("--audit", default=None, help="audit.json from vsae audit: the table marks numbers of a metric "
                   "that failed one of its lenses")


def _add_dashboard(sub) -> None:
    from dashboards.build import DashboardConfig

    p = _command(sub, "dashboard", cmd_dashboard, "HTML feature dashboard of a run",
                 "Gather every requested latent's statistics in one pass over the cache and "
                 "write an offline HTML dashboard: an index table and one page per latent.")
    p.add_argument("run", help="run directory (vsae or SAELens topk checkpoint)")
    add_config_flags(p, DashboardConfig)


def _add_compare(sub) -> None:
    from dashboards.compare import CompareConfig

    p = _command(sub, "compare", cmd_compare, "compare runs side by side on one HTML page",
                 "Config differences, metrics, density histograms, training curves, t-SNE maps "
                 "and latents matched by decoder cosine, for N runs on one offline page.")
    p.add_argument("runs", nargs="+", help="run directories (at least two)")
    add_config_flags(p, CompareConfig)


def _add_cache_info(sub) -> None:
    p = _command(sub, "cache-info", cmd_cache_info, "print a cache's manifest, verify checksums",
                 "Print an activation cache's manifest and verify its shard checksums.")
    p.add_argument("cache", help="cache directory")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum verification")


def _add_runs(sub) -> None:
    p = _command(sub, "runs", cmd_runs, "list the runs under a directory, with settings and metrics",
                 "List every run directory (vsae or SAELens checkpoint) at or below ROOT as a table: variant, width, "
                 "k, steps, tokens, hook, and the headline metrics of its eval.json. The snapshots a run keeps of "
                 "itself (--snapshot-every) are counted, and listed with --snapshots.")
    p.add_argument("root", help="directory to search for runs")
    p.add_argument("--snapshots", action="store_true", help="also list the runs' snapshots (RUN/snapshots/step-N)")


def _add_study(sub) -> None:
    from pipeline.study import StudyConfig

    p = _command(sub, "study", cmd_study, "a plan's grid of SAEs, trained, evaluated, reported",
                 "Train a plan's grid of SAEs in one pass of the cache per training setting, "
                 "evaluate them on the same held-out tokens, add TopK runs size-matched to each "
                 "vSAE's alive latents, and write report.md / report.html. Rerun to resume.")
    add_config_flags(p, StudyConfig, comma={"metrics": _metrics_note()})


def _add_audit(sub) -> None:
    from pipeline.audit import AuditConfig

    p = _command(sub, "audit", cmd_audit, "how far each metric can be believed: reseed, trend, ground truth",
                 "Apply three lenses to every headline metric on one setting: reseed noise (snapshots of a run "
                 "evaluated with varied evaluation seeds and held-out samples), discriminability (the trend along "
                 "training against that noise) and validity (rank correlation with ground-truth F1 / MCC across "
                 "synthetic SAEs of varied quality). Writes OUT/audit.json and OUT/audit.md; `vsae eval`, "
                 "`vsae compare` and `vsae study` mark failing numbers given --audit OUT/audit.json.")
    add_config_flags(p, AuditConfig, comma={"metrics": _metrics_note()})


def _add_demo(sub) -> None:
    from pipeline.demo import DemoConfig

    p = _command(sub, "demo", cmd_demo, "the whole pipeline on the embedded default",
                 "The whole pipeline on the embedded default: build the model (first use), "
                 "harvest its middle residual stream, train the paper's TopK and vSAE arms in one "
                 "pass, evaluate them (all metrics), write their dashboards and a comparison page.")
    add_config_flags(p, DemoConfig)


def _add_serve(sub) -> None:
    from dashboards.serve import ServeConfig

    p = _command(sub, "serve", cmd_serve, "live app: test text, search, steering, ablation over runs",
                 "Load the cache's model and the runs' SAEs once and serve a local web app: the top latents "
                 "per token of a typed text, search by token or id, generation steered by clamped or added "
                 "latents beside the plain one, per-token loss change of removing a latent, and the runs' "
                 "dashboards. Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("runs", nargs="+", help="run directories (vsae or SAELens topk checkpoints) of the cache's model")
    add_config_flags(p, ServeConfig)


COMMANDS = (_add_build_tiny_model, _add_harvest, _add_synth, _add_train, _add_eval, _add_dashboard, _add_compare,
            _add_cache_info, _add_runs, _add_study, _add_audit, _add_demo, _add_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsae", formatter_class=FORMATTER,
        description="Harvest LM activations, train and analyse sparse autoencoders, offline.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--version", action="version", version=f"vsae {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures of the input or the environment, reported as one line naming the input and the fix."""
    from activations.cache import CacheError
    from activations.corpus import CorpusError
    from activations.distributed import DistributedError
    from activations.guard import LockedError
    from activations.models import HookNameError, ModelLoadError
    from dashboards.build import DashboardError
    from evals.context import EvalError
    from evals.labelled import LabelledSetError
    from vsae.checkpoint import CheckpointError
    from vsae.run import RunError
    from vsae.trainer import NonFiniteLoss

    return (CacheError, CorpusError, HookNameError, ModelLoadError, ValueError, RunError, CheckpointError,
            NonFiniteLoss, EvalError, DashboardError, LockedError, LabelledSetError, OSError, DistributedError)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f" {e.filename}" if e.filename else ""
        return f"{e.strerror}:{where}; check the path and its permissions"
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _preflight(args)
        return args.func(args)
    except expected_errors() as e:
        if args.debug:
            raise
        print(f"vsae {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vsae {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
