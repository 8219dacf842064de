"""The `vsae` command: one subcommand per stage of the pipeline."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

HARVEST_HELP = {
    "out": "output directory",
    "model": "TransformerLens model name (e.g. pythia-70m-deduped), or vsae-tiny for the embedded model",
    "model_path": "local Hugging Face checkpoint directory (overrides --model; needs no network)",
    "hook": "hook point to cache; None means blocks.{n_layers//2}.hook_resid_post",
    "corpus": "shakespeare | stdlib | hf:NAME[:split[:column]] | .txt/.jsonl files or folders",
    "tokens": "number of activation rows to cache (rounded up to whole contexts)",
    "context": "tokens per context window, BOS included",
    "dtype": "storage dtype of the activations",
    "batch_size": "contexts per forward pass",
    "device": "torch device (cpu, cuda, cuda:1, ...)",
    "shard_tokens": "rows per shard file (rounded down to whole contexts)",
    "keep_bos": "keep the BOS position of each context (dropped by default: its norm is an outlier)",
    "overwrite": "replace an existing cache made with other settings",
    "progress": "progress bars",
}
EVAL_HELP = {
    "cache": "activation cache the runs were trained on (its held-out split is used)",
    "tokens": "held-out activation rows for core, density, independence",
    "ce_contexts": "held-out contexts run through the model for CE / KL scores and ablations",
    "ablation_latents": "how many of the most frequent latents to ablate (without --latents)",
    "latents": "explicit latent ids to ablate",
    "tsne_tokens": "held-out rows whose activations form the t-SNE profiles",
    "batch_size": "rows per batch",
    "device": "torch device",
    "seed": "seed of sampling and t-SNE",
    "labelled": "labelled data for SCR/TPP: offline (generated) or real (hub datasets)",
    "labelled_train": "SCR/TPP training texts",
    "labelled_test": "SCR/TPP test texts",
    "progress": "progress bars",
}
DASHBOARD_HELP = {
    "cache": "activation cache the run was trained on (every row is scanned unless --tokens)",
    "out": "output directory (index.html, latent.html#ID, data/, assets/)",
    "features": "latents to show: all | N (ids 0..N-1) | i,j,k | top-density:N (the N most frequent)",
    "contexts": "top activating contexts per latent",
    "quantile_samples": "contexts shown per activation-quantile band",
    "quantile_bands": "activation-quantile bands per latent",
    "tokens": "cache rows to scan, whole sequences (unset: the whole cache)",
    "neighbours": "nearest latents by decoder cosine listed per latent",
    "batch_size": "rows per batch (rounded down to whole sequences)",
    "device": "torch device",
    "seed": "seed of the uniform samples of firings",
    "progress": "progress bar",
}
COMPARE_HELP = {
    "cache": "activation cache: latent densities are measured on its held-out rows for the runs trained on it",
    "out": "output HTML file (self-contained: plotly.js inlined)",
    "dashboards": "dashboard directories of these runs (from vsae dashboard), for links into them",
    "tokens": "held-out cache rows on which latent densities are measured",
    "matches": "rows of the matched-latents table",
    "batch_size": "rows per batch",
    "device": "torch device",
    "progress": "progress bar",
}
TRAIN_HELP = {
    "out": "run directory (several SAEs: one subdirectory each)",
    "tokens": "training tokens (unset: --steps, else one epoch of the training split)",
    "batch_size": "activations per optimiser step",
    "device": "torch device (cpu, cuda, cuda:1, ...)",
    "bf16": "bf16 autocast (default on CUDA)",
    "sparse": "sparse encode/decode kernels (default on CPU; dense matmuls are faster on GPUs)",
    "log_every": "steps between log.jsonl lines",
    "checkpoint_every": "steps between checkpoints",
    "progress": "progress bars",
    "lr_warmup_steps": "linear lr warm-up steps (capped at a tenth of the run)",
    "lr_decay_start": "fraction of the run after which the lr decays linearly to 0",
    "grad_clip": "gradient norm clip",
    "seed": "seed of the batch order and of the SAE init",
    "variant": "SAE variant",
    "d_sae": "number of latents",
    "steps": "optimiser steps (unset: from --tokens, else one epoch of the training split)",
    "lr": "learning rate (unset: 2e-4 / sqrt(d_sae / 2^14))",
    "pre_bias": "subtract b_dec from the input",
    "decoder": "unit: rows renormalised each step; free: 0.1-norm init, never renormalised",
    "aux_k_coef": "AuxK coefficient (0 turns it off)",
    "k_aux": "AuxK latents (unset: d_in // 2)",
    "dead_after": "tokens without firing before a latent counts as dead (unset: min(10M, run tokens / 5))",
    "sample": "vsae: sample z = mu + sigma * eps in training",
    "variance": "vsae: fixed (sigma = 1) or learned log-variance head",
    "kl_coef": "vsae: KL weight",
    "kl_warmup": "vsae: fraction of steps of linear KL warm-up",
    "eval_fraction": "fraction of sequences held out for evaluation",
    "b_dec_init": "initial b_dec: geometric median or mean of the first batch, or zero",
}


def _field_type(tp) -> tuple[type, bool]:
    """(scalar type, is_list) of a dataclass field annotation such as `int`, `str | None`, `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls, helps: dict[str, str], skip: tuple[str, ...] = (),
                       choices: dict[str, tuple] | None = None, required: tuple[str, ...] = (),
                       explicit_only: bool = False) -> None:
    """One flag per dataclass field (`--field-name`), default and help taken from the dataclass.

    With `explicit_only`, flags the user did not give stay out of the namespace (so
    a preset can fill them); the dataclass default is still shown in the help.
    """
    choices = choices or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default, required = None, (*required, f.name)
        tp, is_list = _field_type(hints[f.name])
        helptext = helps.get(f.name, f.name.replace("_", " "))
        if explicit_only:
            helptext, default = f"{helptext} (default: {default})", argparse.SUPPRESS
        if tp is bool and f.default is None:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{helptext}; unset: chosen per device")
        elif tp is bool:
            on = f.default
            parser.add_argument(("--no-" + flag[2:]) if on else flag, dest=f.name,
                                action="store_false" if on else "store_true", default=default,
                                help=f"turn off: {helptext}" if on else helptext)
        else:
            parser.add_argument(
                flag, dest=f.name, type=tp, nargs="+" if is_list else None,
                default=None if f.name in required else default, required=f.name in required,
                choices=choices.get(f.name), help=helptext,
            )


def _config(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def cmd_build_tiny_model(args: argparse.Namespace) -> int:
    from activations.tiny_model import TinyModelConfig, build_tiny_model, model_dir

    cfg = _config(TinyModelConfig, args)
    out = Path(args.out) if args.out else model_dir(cfg)
    report = build_tiny_model(cfg, out)
    print(f"model written to {out}: validation CE {report['val_ce']:.3f} nats/token "
          f"(unigram baseline {report['unigram_ce']:.3f})")
    return 0


def cmd_harvest(args: argparse.Namespace) -> int:
    from activations.harvest import HarvestConfig, harvest

    print(harvest(_config(HarvestConfig, args)).line())
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
    import os
    import tomllib

    from vsae.config import SAEConfig, TrainConfig, apply_preset
    from vsae.trainer import train

    given = vars(args)
    sae_cfg, train_cfg = SAEConfig(), TrainConfig()
    if args.preset:
        sae_cfg, train_cfg = apply_preset(args.preset, sae_cfg, train_cfg)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    sae_fields = {f.name for f in dataclasses.fields(SAEConfig)}
    train_cfg = dataclasses.replace(train_cfg, **{k: v for k, v in given.items() if k in train_fields})
    sae_cfg = dataclasses.replace(sae_cfg, **{k: v for k, v in given.items() if k in sae_fields})
    ks = [int(k) for k in str(args.k).split(",")] if args.k is not None else [sae_cfg.k]
    names = None
    sae_cfgs = [dataclasses.replace(sae_cfg, k=k) for k in ks]
    if args.sweep:
        with open(args.sweep, "rb") as f:
            sweep = tomllib.load(f).get("sae", [])
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
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist

        cuda = train_cfg.device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            train_cfg = dataclasses.replace(train_cfg, device=f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    try:
        paths = train(train_cfg, sae_cfgs, resume=args.resume, rank=rank, world_size=world, names=names)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        for p in paths:
            print(f"run written to {p}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from evals.driver import EvalConfig, evaluate, parse_metrics, table

    cfg = _config(EvalConfig, args)
    cfg.metrics = parse_metrics(args.metrics)
    results = evaluate(args.runs, cfg)
    print(table(results))
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


def cmd_demo(args: argparse.Namespace) -> int:
    from activations.harvest import HarvestConfig, harvest
    from activations.tiny_model import ensure_tiny_model
    from dashboards.build import DashboardConfig, build_dashboard
    from dashboards.compare import CompareConfig, compare_runs
    from evals.driver import METRICS, EvalConfig, evaluate, table
    from vsae.config import SAEConfig, TrainConfig, apply_preset
    from vsae.trainer import train

    out = Path(args.out)
    cache = str(out / "cache")
    model_dir = ensure_tiny_model()
    report = json.loads((model_dir / "vsae_model.json").read_text())
    print(f"[1/5] embedded model {model_dir}: validation CE {report['val_ce']:.3f} "
          f"(unigram {report['unigram_ce']:.3f})")
    summary = harvest(HarvestConfig(out=cache, corpus=[args.corpus], tokens=args.tokens))
    print(f"[2/5] {summary.line()}")
    # The paper's two arms as its code ran them, scaled to the tiny model (16 x d_in latents), in one pass.
    arms = [apply_preset(name, SAEConfig(), TrainConfig())[0] for name in ("paper-topk", "paper-vsae")]
    arms = [dataclasses.replace(a, d_sae=args.d_sae, k=args.k, dead_after=None) for a in arms]
    tcfg = TrainConfig(cache=cache, out=str(out / "sae"), steps=args.train_steps,
                       batch_size=args.batch_size, lr_warmup_steps=args.train_steps // 10)
    runs = train(tcfg, arms, resume=(out / "sae").exists(), names=["topk", "vsae"])
    print("[3/5] SAEs trained: " + ", ".join(str(r) for r in runs))
    results = evaluate(runs, EvalConfig(cache=cache, metrics=list(METRICS)))
    print("[4/5] evaluation (eval.json, figures/ in each run):")
    print(table(results))
    pages = []
    for run in runs:
        d = build_dashboard(run, DashboardConfig(cache=cache, out=str(out / "dashboards" / run.name)))
        pages.append(str(out / "dashboards" / run.name))
        print(f"      dashboard {Path(d['out']) / 'index.html'}")
    cmp = compare_runs([str(r) for r in runs],
                       CompareConfig(cache=cache, out=str(out / "compare.html"), dashboards=pages))
    print(f"[5/5] comparison page {cmp['out']}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from dashboards.compare import CompareConfig, compare_runs
    from evals.driver import parse_metrics
    from evals.study import StudyConfig, run_study

    cfg = StudyConfig(cache=args.cache, plan=args.plan, out=args.out, device=args.device, steps=args.steps,
                      metrics=parse_metrics(args.metrics) if args.metrics else None, progress=args.progress)

    def compare(runs, out):
        compare_runs([str(r) for r in runs], CompareConfig(cache=args.cache, out=str(out), device=args.device,
                                                           progress=args.progress))

    state = run_study(cfg, compare=compare)
    n = len(state["runs"]) + len(state.get("size_matched", []))
    print(f"study of {n} runs ({len(state['skipped'])} combinations skipped) written to {args.out}: "
          f"{Path(args.out) / 'report.md'}, {Path(args.out) / 'report.html'}")
    return 0


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    from activations.harvest import DTYPES, HarvestConfig
    from activations.tiny_model import TinyModelConfig
    from dashboards.build import DashboardConfig
    from dashboards.compare import CompareConfig
    from evals.driver import EvalConfig
    from vsae.config import B_DEC_INITS, DECODERS, PRESETS, VARIANCES, SAEConfig, TrainConfig
    from vsae.variants import VARIANTS

    parser = argparse.ArgumentParser(
        prog="vsae", formatter_class=_Formatter,
        description="Harvest LM activations, train and analyse sparse autoencoders, offline.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build-tiny-model", formatter_class=_Formatter,
                       help="train the embedded default model (GPT-NeoX) on an embedded corpus",
                       description="Train vsae's embedded GPT-NeoX model and its BPE tokenizer.")
    add_dataclass_args(p, TinyModelConfig, {})
    p.add_argument("--out", default=None, help="output directory (default: vsae's cache dir)")
    p.set_defaults(func=cmd_build_tiny_model)

    p = sub.add_parser("harvest", formatter_class=_Formatter, help="cache one hook's activations to disk",
                       description="Run a model over a corpus and cache one hook's activations, resumably.")
    add_dataclass_args(p, HarvestConfig, HARVEST_HELP, choices={"dtype": DTYPES}, required=("out",))
    p.set_defaults(func=cmd_harvest)

    p = sub.add_parser("train", formatter_class=_Formatter, help="train SAEs on a cache (several in one pass)",
                       description="Train TopK / vSAE SAEs on an activation cache; several configs share each batch. "
                                   "Distributed: torchrun --nproc_per_node N $(which vsae) train ...")
    add_dataclass_args(p, TrainConfig, TRAIN_HELP, explicit_only=True, skip=("cache",))
    add_dataclass_args(p, SAEConfig, TRAIN_HELP, explicit_only=True, skip=("k",),
                       choices={"variant": tuple(VARIANTS), "decoder": DECODERS, "variance": VARIANCES,
                                "b_dec_init": B_DEC_INITS})
    p.add_argument("--cache", required=True, help="activation cache directory (from vsae harvest)")
    p.add_argument("--k", default=None, help="active latents per token; a comma list trains one SAE each (default: 64)")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="the paper's arms as its code ran them; explicit flags override it")
    p.add_argument("--sweep", default=None, help="TOML file of [[sae]] tables (SAE fields, optional name), "
                   "each trained in the same pass")
    p.add_argument("--resume", action="store_true", help="continue the run(s) in --out")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", formatter_class=_Formatter, help="evaluate runs on a cache's held-out tokens",
                       description="Compute metrics of one or more runs on the same held-out tokens; writes "
                                   "RUN/eval.json and RUN/figures/*.html and prints a table.")
    p.add_argument("runs", nargs="+", help="run directories (vsae or SAELens topk checkpoints)")
    p.add_argument("--metrics", default="core,density",
                   help="comma list of core,density,ablation,tpp,scr,independence,tsne, or all")
    add_dataclass_args(p, EvalConfig, EVAL_HELP, skip=("metrics",), choices={"labelled": ("offline", "real")})
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("dashboard", formatter_class=_Formatter, help="HTML feature dashboard of a run",
                       description="Gather every requested latent's statistics in one pass over the cache and "
                                   "write an offline HTML dashboard: an index table and one page per latent.")
    p.add_argument("run", help="run directory (vsae or SAELens topk checkpoint)")
    add_dataclass_args(p, DashboardConfig, DASHBOARD_HELP)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("compare", formatter_class=_Formatter, help="compare runs side by side on one HTML page",
                       description="Config differences, metrics, density histograms, training curves, t-SNE maps "
                                   "and latents matched by decoder cosine, for N runs on one offline page.")
    p.add_argument("runs", nargs="+", help="run directories (at least two)")
    add_dataclass_args(p, CompareConfig, COMPARE_HELP)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("cache-info", formatter_class=_Formatter, help="print a cache's manifest, verify checksums",
                       description="Print an activation cache's manifest and verify its shard checksums.")
    p.add_argument("cache", help="cache directory")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum verification")
    p.set_defaults(func=cmd_cache_info)

    p = sub.add_parser("study", formatter_class=_Formatter, help="a plan's grid of SAEs, trained, evaluated, reported",
                       description="Train a plan's grid of SAEs in one pass of the cache per training setting, "
                                   "evaluate them on the same held-out tokens, add TopK runs size-matched to each "
                                   "vSAE's alive latents, and write report.md / report.html. Rerun to resume.")
    p.add_argument("--cache", required=True, help="activation cache directory (from vsae harvest)")
    p.add_argument("--plan", required=True, help="plan TOML file, or a shipped plan: paper | controlled")
    p.add_argument("--out", required=True, help="study directory (e.g. studies/NAME)")
    p.add_argument("--device", default="cpu", help="torch device for training and evaluation")
    p.add_argument("--steps", type=int, default=None, help="override every run's training steps")
    p.add_argument("--metrics", default=None, help="override the plan's metrics: comma list or all")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="turn off: progress bars")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("demo", formatter_class=_Formatter, help="the whole pipeline on the embedded default",
                       description="The whole pipeline on the embedded default: build the model (first use), "
                                   "harvest its middle residual stream, train the paper's TopK and vSAE arms in one "
                                   "pass, evaluate them (all metrics), write their dashboards and a comparison page.")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--corpus", default="shakespeare", help="corpus to harvest")
    p.add_argument("--tokens", type=int, default=500_000, help="tokens to harvest")
    p.add_argument("--d-sae", type=int, default=2048, help="latents of each SAE")
    p.add_argument("--k", type=int, default=32, help="active latents per token")
    p.add_argument("--train-steps", type=int, default=300, help="training steps")
    p.add_argument("--batch-size", type=int, default=4096, help="activations per step")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from activations.cache import CacheError
    from activations.corpus import CorpusError
    from activations.models import HookNameError, ModelLoadError
    from dashboards.build import DashboardError
    from evals.driver import EvalError
    from vsae.checkpoint import CheckpointError
    from vsae.run import RunError
    from vsae.trainer import NonFiniteLoss

    try:
        return args.func(args)
    except (CacheError, CorpusError, HookNameError, ModelLoadError, ValueError, RunError, CheckpointError,
            NonFiniteLoss, EvalError, DashboardError) as e:
        print(f"vsae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vsae {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
