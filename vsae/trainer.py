"""Train one or more SAEs on one pass over an activation cache.

Every SAE of a run group sees the same batches (each batch is read once), in
the same order as an uninterrupted run, so a resumed run ends with the same
weights on the CPU. Variants contribute only `loss_terms`; the loop below is
the whole algorithm.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from activations.cache import manifest_hash, read_manifest
from activations.guard import plain_name
from activations.loader import ActivationLoader
from vsae.checkpoint import CheckpointError
from vsae.config import SAEConfig, TrainConfig, diff_fields, lr_at
from vsae.firing import FiringCounter, fired_counts
from vsae.run import (
    STATE_FILE,
    TRAIN_JSON,
    RunError,
    claim_run,
    is_run,
    read_resume_files,
    read_run,
    read_trainer_state,
    write_run,
)
from vsae.variants import TopKSAE, build_sae, geometric_median

# Fields that may change between a run and its resumption without changing what is computed.
RESUMABLE_CHANGES = ("progress", "device", "log_every", "checkpoint_every", "out")


class NonFiniteLoss(RuntimeError):
    """A loss term or the gradient became NaN or inf; the step is not taken and the last good checkpoint is kept."""


@dataclass
class SAEState:
    """One SAE being trained: the module, its optimiser, counters and log.

    `firing` counts each latent's firings over the whole run (float64, as saved in `fire_count`);
    `tokens_since_fired` drives AuxK's dead mask. `generator` draws the training noise on the training device,
    reseeded every step from (seed, rank, step) so that ranks draw different noise and a resumed run, on any
    device, draws what the uninterrupted one did. `pending` is True while a step is half applied.
    """

    path: Path
    cfg: SAEConfig
    sae: TopKSAE
    opt: torch.optim.Adam
    generator: torch.Generator
    dead_after: int
    tokens_since_fired: torch.Tensor
    firing: FiringCounter
    step: int = 0
    info: dict = field(default_factory=dict)  # train.json content, less step and tokens
    log: list[dict] = field(default_factory=list)
    window: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    rank: int = 0
    pending: bool = False


def run_paths(train: TrainConfig, saes: list[SAEConfig], names: list[str] | None = None) -> list[Path]:
    """One SAE: `out` is its run. Several: `out/<name>` each, by default labelled by what differs; a name (from a
    sweep file) must be a plain folder name, so no run lands outside `out`."""
    out = Path(train.out)
    if len(saes) == 1:
        return [out]
    labels = names or [s.label(saes) for s in saes]
    for label in labels:
        plain_name(label, "run name")
    if len(set(labels)) != len(labels):
        labels = [f"{i:02d}-{label}" for i, label in enumerate(labels)]
    return [out / label for label in labels]


@contextmanager
def _claimed(paths: list[Path], resume: bool, rank: int, world_size: int) -> Iterator[None]:
    """Rank 0 holds every run directory for the whole training (`claim_run`); the other ranks only read them,
    once rank 0 has finished what a killed run left."""
    with ExitStack() as claims:
        if rank == 0:
            for p in paths:
                claims.enter_context(claim_run(p, resume))
        if world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        yield


def train(train_cfg: TrainConfig, sae_cfgs: list[SAEConfig], resume: bool = False,
          rank: int = 0, world_size: int = 1, names: list[str] | None = None) -> list[Path]:
    """Train every SAE of `sae_cfgs` from the same batches; return their run directories."""
    manifest = read_manifest(train_cfg.cache)
    d_in = int(manifest["d_in"])
    device = train_device(train_cfg.device, world_size)
    loader = ActivationLoader(train_cfg.cache, train_cfg.batch_size, split="train", seed=train_cfg.seed,
                              eval_fraction=train_cfg.eval_fraction, device=device)
    per_epoch = loader.n_tokens // train_cfg.batch_size
    n_steps = train_cfg.steps or (math.ceil(train_cfg.tokens / train_cfg.batch_size) if train_cfg.tokens
                                  else per_epoch)
    if n_steps <= 0:
        raise ValueError(f"the run must have at least one step, got {n_steps}")
    scale = math.sqrt(manifest["mean_squared_norm"])  # inputs are x / scale: unit mean squared norm
    device = train_device(train_cfg.device, world_size)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # else every rank opens a context on GPU 0
    sparse = train_cfg.sparse if train_cfg.sparse is not None else device.type == "cpu"
    bf16 = train_cfg.bf16 if train_cfg.bf16 is not None else device.type == "cuda"
    info = {"cache": str(train_cfg.cache), "cache_hash": manifest_hash(manifest), "d_in": d_in,
            "norm_scale": scale, "n_steps": n_steps, "hook_name": manifest["settings"]["hook_name"],
            "model": manifest["settings"]["model"], "context": manifest["settings"]["context"],
            "train_tokens_available": loader.n_tokens, "versions": _versions()}

    paths = run_paths(train_cfg, sae_cfgs, names)
    with _claimed(paths, resume, rank, world_size):
        states = [_open_state(p, c, train_cfg, info, resume, device, sparse, loader, rank, world_size)
                  for p, c in zip(paths, sae_cfgs, strict=True)]
        start = min(s.step for s in states)
        if start >= n_steps:
            return paths
        bar = tqdm(total=n_steps, initial=start, unit="step", desc="train", disable=not train_cfg.progress or rank > 0)
        batches = loader.stream(start, rank=rank, world_size=world_size)
        t_last, tok_last = time.perf_counter(), 0
        try:
            for step in range(start, n_steps):
                x = next(batches) / scale
                for s in states:
                    if s.step == step:  # a state saved later than another (killed between saves) waits
                        update_step(s, x, step, n_steps, train_cfg, bf16, world_size)
                tok_last += x.shape[0] * world_size
                done = step + 1
                if done % train_cfg.log_every == 0 or done == n_steps:
                    now = time.perf_counter()
                    tok_s = tok_last / (now - t_last)
                    for s in states:
                        s.log.append(_log_line(s, done, train_cfg, tok_s))
                    bar.set_postfix(_postfix(states[0].log[-1]))
                    t_last, tok_last = now, 0
                if (done % train_cfg.checkpoint_every == 0 or done == n_steps) and rank == 0:
                    for s in states:
                        _save(s, info, scale, n_steps)
                bar.update(1)
        except KeyboardInterrupt:
            if rank == 0:
                for s in states:  # keep the work done; a half-applied step is not saved (its last checkpoint stays)
                    if not s.pending:
                        _save(s, info, scale, n_steps)
            raise
        finally:
            bar.close()
    return paths


def update_step(s: SAEState, x: torch.Tensor, step: int, n_steps: int, cfg: TrainConfig, bf16: bool,
            world_size: int) -> None:
    """One optimiser step of one SAE on a batch of normalised activations.

    The step is taken only when the loss and the gradient norm are finite on every rank (else NonFiniteLoss,
    with the weights, optimiser and counters untouched).
    """
    for group in s.opt.param_groups:
        group["lr"] = lr_at(step, n_steps, group["initial_lr"], cfg.lr_warmup_steps, cfg.lr_decay_start)
    dead = s.tokens_since_fired >= s.dead_after if s.cfg.aux_k_coef > 0 else None
    s.generator.manual_seed(noise_seed(s.seed, s.rank, step))
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = s.sae.loss_terms(x, step / n_steps, dead, s.generator)
    terms = out.terms
    loss = sum(terms.values())
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    fired = fired_counts(out.code, s.cfg.d_sae, s.firing.counts.dtype)
    if world_size > 1:
        import torch.distributed as dist

        for p in s.sae.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world_size
        dist.all_reduce(fired)
    s.sae.before_step()
    norm = torch.nn.utils.clip_grad_norm_(s.sae.parameters(), cfg.grad_clip)
    finite = torch.isfinite(loss.detach()) & torch.isfinite(norm)
    if world_size > 1:
        # Every rank learns whether any rank's step is non-finite before anyone steps: all stop together
        # instead of the healthy ones waiting forever in the next step's all_reduce.
        flag = finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag.bool()
    if not bool(finite):
        raise NonFiniteLoss(_non_finite_message(s, terms, norm, step))
    s.pending = True  # until the step counter moves, a saved state would hold half a step
    s.opt.step()
    s.sae.after_step()
    s.firing.add(fired, x.shape[0] * world_size)
    s.tokens_since_fired += x.shape[0] * world_size
    s.tokens_since_fired[fired > 0] = 0
    s.step = step + 1
    s.pending = False
    stats = {name: float(t.detach()) for name, t in terms.items()}
    stats["loss"] = float(loss.detach())
    stats["l0"] = float((out.code.vals > 0).sum(1).float().mean())
    for name, v in stats.items():
        s.window[name] = s.window.get(name, 0.0) + v
    s.window["_n"] = s.window.get("_n", 0.0) + 1


def _non_finite_message(s: SAEState, terms: dict[str, torch.Tensor], norm: torch.Tensor, step: int) -> str:
    bad = [name for name, t in terms.items() if not torch.isfinite(t)]
    if bad:
        what = f"loss term {', '.join(bad)} is not finite"
    elif not torch.isfinite(norm):
        what = "the gradient is not finite (with a finite loss)"
    else:
        what = "another rank's loss or gradient is not finite"
    return (f"{s.path}: {what} at step {step}; the step was not taken and the last checkpoint "
            f"(step {_saved_step(s.path)}) is kept; lower --lr or check the cache")


def noise_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one step's training noise on one rank: a hash, so no two (rank, step) pairs share a stream."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative int64 for manual_seed


def train_device(name: str, world_size: int = 1, env: Mapping[str, str] | None = None) -> torch.device:
    """The device this process trains on: under DDP a bare "cuda" means this rank's GPU, cuda:LOCAL_RANK."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and world_size > 1:
        device = torch.device("cuda", int((os.environ if env is None else env).get("LOCAL_RANK", 0)))
    return device


def _log_line(s: SAEState, step: int, cfg: TrainConfig, tok_s: float) -> dict:
    n = s.window.pop("_n", 1.0)
    line = {"step": step, "tokens": step * cfg.batch_size, "lr": s.opt.param_groups[0]["lr"]}
    line.update({k: v / n for k, v in s.window.items()})
    line["dead_fraction"] = float((s.tokens_since_fired >= s.dead_after).float().mean())
    line["never_fired_fraction"] = float((s.firing.counts == 0).float().mean())
    line["tokens_per_s"] = tok_s
    s.window.clear()
    return line


def _postfix(line: dict) -> dict:
    keys = ("loss", "mse", "kl", "auxk", "l0", "dead_fraction", "tokens_per_s")
    return {k.replace("_fraction", "").replace("tokens_per_s", "tok/s"): f"{line[k]:.4g}" for k in keys if k in line}


def fresh_state(path: Path, cfg: SAEConfig, train_cfg: TrainConfig, d_in: int, n_steps: int, device,
                sparse: bool, rank: int = 0) -> SAEState:
    """A newly initialised SAE with its optimiser and counters (b_dec not yet initialised)."""
    # One init seed for every SAE of a group: arms of a sweep start from the same weights where shapes match.
    # The init draws on the CPU, so every device starts from the same weights.
    init = torch.Generator(device="cpu").manual_seed(train_cfg.seed)
    sae = build_sae(cfg, d_in, init).to(device)
    generator = torch.Generator(device=device)  # the noise is drawn where the latents are
    sae.sparse = sparse
    lr = train_cfg.learning_rate(cfg.d_sae)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                           eps=train_cfg.adam_eps)
    for group in opt.param_groups:
        group["initial_lr"] = lr
    dead_after = cfg.dead_after or min(10_000_000, max(1, n_steps * train_cfg.batch_size // 5))
    return SAEState(path, cfg, sae, opt, generator, dead_after,
                    torch.zeros(cfg.d_sae, dtype=torch.long, device=device),
                    FiringCounter(cfg.d_sae, device=device, dtype=torch.float64), seed=train_cfg.seed, rank=rank)


def _open_state(path: Path, cfg: SAEConfig, train_cfg: TrainConfig, info: dict, resume: bool, device,
                sparse: bool, loader: ActivationLoader, rank: int, world_size: int) -> SAEState:
    """A fresh SAE state, or the saved one when resuming (after checking it is the same run)."""
    cfg.validate(info["d_in"])
    s = fresh_state(path, cfg, train_cfg, info["d_in"], info["n_steps"], device, sparse, rank)
    s.info = _run_info(info, cfg, train_cfg, s.dead_after)
    if resume and is_run(path):
        _restore(s, path, info)
    else:
        _init_b_dec(s, loader, info["norm_scale"], device)
    if world_size > 1:
        import torch.distributed as dist

        for p in s.sae.parameters():
            dist.broadcast(p.data, 0)
    return s


def _run_info(info: dict, cfg: SAEConfig, train_cfg: TrainConfig, dead_after: int) -> dict:
    return {**info, "sae": asdict(cfg), "train": asdict(train_cfg), "dead_after": dead_after}


def _comparable(run_info: dict) -> dict:
    train = {k: v for k, v in run_info["train"].items() if k not in RESUMABLE_CHANGES}
    return {**{f"sae.{k}": v for k, v in run_info["sae"].items()}, **{f"train.{k}": v for k, v in train.items()},
            "cache_hash": run_info["cache_hash"], "n_steps": run_info["n_steps"]}


def _restore(s: SAEState, path: Path, info: dict) -> None:
    saved, log = read_resume_files(path)
    state = read_trainer_state(path)
    try:
        _restore_from(s, path, info, saved, state)
    except (RunError, CheckpointError):
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        # a train.json or trainer state vsae did not write as it is: missing keys, wrong types or shapes
        raise CheckpointError(f"{path}: its {TRAIN_JSON} and {STATE_FILE} do not describe this run "
                              f"({type(e).__name__}: {e}); the run cannot be resumed: restore them from a copy, or "
                              f"train into a new --out") from e
    s.log = log


def _restore_from(s: SAEState, path: Path, info: dict, saved: dict, state: dict[str, torch.Tensor]) -> None:
    if saved["d_in"] != info["d_in"]:
        raise RunError(f"the cache's activations have width {info['d_in']} but the run {path} was trained on "
                       f"width {saved['d_in']}; resume it on its own cache ({saved['cache']})")
    differ = diff_fields(_comparable(saved), _comparable(s.info))
    if differ:
        raise RunError(f"cannot resume {path}: the config differs from the saved one in {', '.join(differ)}; "
                       f"rerun with the saved settings (see {path / TRAIN_JSON}) or choose a new --out")
    device = s.tokens_since_fired.device
    with torch.no_grad():
        for name, p in s.sae.named_parameters():
            p.copy_(state[f"param.{name}"])
    for name, p in s.sae.named_parameters():
        s.opt.state[p] = {"step": state[f"adam.step.{name}"].clone(),
                          "exp_avg": state[f"adam.exp_avg.{name}"].to(device),
                          "exp_avg_sq": state[f"adam.exp_avg_sq.{name}"].to(device)}
    s.tokens_since_fired.copy_(state["tokens_since_fired"])
    s.firing.counts.copy_(state["fire_count"])
    # "rng" (saved for reference) is not restored: the noise is reseeded from (seed, rank, step) every step, which
    # also lets a run resume on another device, whose generator state has another format.
    s.step = int(saved["step"])
    s.firing.n_tokens = s.step * s.info["train"]["batch_size"]


def _init_b_dec(s: SAEState, loader: ActivationLoader, scale: float, device) -> None:
    """b_dec at the geometric median (or mean) of the first training batch, as in Gao et al."""
    if s.cfg.b_dec_init == "zero":
        return
    sample = next(iter(loader.stream(0))).to(device) / scale  # the full first batch, on every rank
    centre = geometric_median(sample) if s.cfg.b_dec_init == "geometric_median" else sample.mean(0)
    with torch.no_grad():
        s.sae.b_dec.copy_(centre)


def _save(s: SAEState, info: dict, scale: float, n_steps: int) -> None:
    state = {f"param.{n}": p for n, p in s.sae.named_parameters()}
    for n, p in s.sae.named_parameters():
        st = s.opt.state.get(p)
        if st:
            state[f"adam.step.{n}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(())
            state[f"adam.exp_avg.{n}"] = st["exp_avg"]
            state[f"adam.exp_avg_sq.{n}"] = st["exp_avg_sq"]
    state.update(tokens_since_fired=s.tokens_since_fired, fire_count=s.firing.counts, rng=s.generator.get_state())
    tokens = s.step * s.info["train"]["batch_size"]
    density = s.firing.counts / max(1, tokens)
    run_info = {**s.info, "step": s.step, "tokens_seen": tokens, "complete": s.step >= n_steps}
    meta = {"model_name": info["model"]["name"], "hook_name": info["hook_name"], "context_size": info["context"],
            "dataset_path": info["cache"]}
    write_run(s.path, weights=s.sae.export(scale), metadata=meta, sparsity=density.float().clamp(0, 1),
              info=run_info, state=state, log_lines=s.log)


def _saved_step(path: Path) -> int:
    try:
        return int((read_run(path).train or {})["step"])
    except (ValueError, KeyError, TypeError):
        return 0


def _versions() -> dict:
    import sae_lens
    import transformer_lens

    return {"torch": torch.__version__, "sae_lens": sae_lens.__version__,
            "transformer_lens": getattr(transformer_lens, "__version__", "unknown")}
