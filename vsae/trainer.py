"""Train one or more SAEs on one pass over an activation cache.

Every SAE of a run group sees the same batches (each batch is read once), in
the same order as an uninterrupted run, so a resumed run ends with the same
weights on the CPU. Variants contribute only `loss_terms`; the loop below is
the whole algorithm.

A step reads nothing back from the device: log statistics add up in device
tensors, the finiteness of the loss and gradient is a device flag, and both are
read at log and checkpoint steps only (`check_finite`, `_log_line`), so the host
queues step after step (and SAE after SAE of a multi-SAE pass) without waiting.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from activations.cache import manifest_hash, read_manifest
from activations.distributed import rank_device
from activations.guard import plain_name
from activations.loader import ActivationLoader
from vsae.checkpoint import CheckpointError
from vsae.config import SAEConfig, TrainConfig, diff_fields, lr_at
from vsae.firing import FiringCounter, fired_counts
from vsae.run import (
    SNAPSHOTS_DIR,
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

if TYPE_CHECKING:
    from activations.stream_source import StreamConfig, StreamSource

# Fields that may change between a run and its resumption without changing what is computed.
RESUMABLE_CHANGES = ("progress", "device", "log_every", "checkpoint_every", "out", "device_data_budget",
                     "snapshot_every", "host_data_budget")
NO_FAULT = torch.iinfo(torch.int64).max  # `SAEState.fault_step` while every step has been finite


class NonFiniteLoss(RuntimeError):
    """A loss term or the gradient became NaN or inf; found at the next log or checkpoint step, the run stops
    there and keeps its last good checkpoint (never overwritten by a non-finite state)."""


@dataclass
class SAEState:
    """One SAE being trained: the module, its optimiser, counters and log.

    `firing` counts each latent's firings over the whole run (float64, as saved in `fire_count`);
    `tokens_since_fired` drives AuxK's dead mask. `generator` draws the training noise on the training device,
    reseeded every step from (seed, rank, step) so that ranks draw different noise and a resumed run, on any
    device, draws what the uninterrupted one did. `pending` is True while a step is half applied.
    Device-side, read only at log and checkpoint steps: `window` sums the log statistics since the last log line
    (one float64 vector per tuple of names), `fault_step` is the first step with a non-finite loss or gradient
    (NO_FAULT while none) and `fault_flags` which of (gradient, loss, terms...) it was. `aux_candidates`: ids of
    the latents that can be dead before step `aux_until` (`aux_candidates`).
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
    seed: int = 0
    rank: int = 0
    pending: bool = False
    window: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)
    window_steps: int = 0
    fault_step: torch.Tensor | None = None
    fault_flags: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)
    aux_candidates: torch.Tensor | None = None
    aux_until: int = 0

    def __post_init__(self) -> None:
        if self.fault_step is None:
            self.fault_step = torch.full((), NO_FAULT, dtype=torch.int64, device=self.tokens_since_fired.device)


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
          rank: int = 0, world_size: int = 1, names: list[str] | None = None,
          stream: StreamConfig | None = None) -> list[Path]:
    """Train every SAE of `sae_cfgs` from the same batches; return their run directories. The batches come from
    the cache `train_cfg.cache`, or with `stream` from the model as it runs (`activations.stream_source`)."""
    device = train_device(train_cfg.device, world_size)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # else every rank opens a context on GPU 0
    if stream is not None:
        loader = _stream_source(stream, train_cfg, device, world_size)
        manifest = loader.manifest
    else:
        manifest = read_manifest(train_cfg.cache)
        # Batches come in the cache's dtype and are cast where the step runs (`normalise`): no fp32 copy on the host.
        loader = ActivationLoader(train_cfg.cache, train_cfg.batch_size, split="train", seed=train_cfg.seed,
                                  eval_fraction=train_cfg.eval_fraction, device=device, dtype=None,
                                  device_budget=train_cfg.device_data_budget, host_budget=train_cfg.host_data_budget)
    d_in = int(manifest["d_in"])
    per_epoch = loader.n_tokens // train_cfg.batch_size
    n_steps = train_cfg.steps or (math.ceil(train_cfg.tokens / train_cfg.batch_size) if train_cfg.tokens
                                  else per_epoch)
    if n_steps <= 0:
        raise ValueError(f"the run must have at least one step, got {n_steps}")
    scale = math.sqrt(manifest["mean_squared_norm"])  # inputs are x / scale: unit mean squared norm
    if not 0 < scale < torch.finfo(torch.float32).max:
        raise ValueError(f"the cache {train_cfg.cache} records mean_squared_norm {manifest['mean_squared_norm']!r}, "
                         f"whose square root {scale!r} cannot scale float32 activations; the manifest is damaged: "
                         f"harvest the cache again")
    sparse = train_cfg.sparse if train_cfg.sparse is not None else device.type == "cpu"
    bf16 = train_cfg.bf16 if train_cfg.bf16 is not None else device.type == "cuda"
    info = {"cache": str(train_cfg.cache), "cache_hash": manifest_hash(manifest), "d_in": d_in,
            "norm_scale": scale, "n_steps": n_steps, "hook_name": manifest["settings"]["hook_name"],
            "model": manifest["settings"]["model"], "context": manifest["settings"]["context"],
            "train_tokens_available": loader.n_tokens, "versions": _versions()}
    if stream is not None:
        info.update(loader.info)  # the stream's settings and first-sample size; the cache it writes, if any

    paths = run_paths(train_cfg, sae_cfgs, names)
    info["batch_order"] = _batch_order(loader, paths, resume, world_size)
    with _claimed(paths, resume, rank, world_size):
        states = [_open_state(p, c, train_cfg, info, resume, device, sparse, loader, rank, world_size)
                  for p, c in zip(paths, sae_cfgs, strict=True)]
        start = min(s.step for s in states)
        if start >= n_steps:
            return paths
        if start > 0 and stream is not None:  # the buffer and stream position saved with the earliest state
            loader.restore(read_trainer_state(next(s.path for s in states if s.step == start)))
        _loop(states, loader.stream(start, rank=rank, world_size=world_size), start, n_steps, train_cfg, info,
              bf16, rank, world_size)
    return paths


def _stream_source(stream: StreamConfig, cfg: TrainConfig, device: torch.device, world_size: int) -> StreamSource:
    """The model as the data source: enough training rows for the run's --steps / --tokens when they are set."""
    from activations.stream_source import StreamSource

    B = cfg.batch_size
    needed = cfg.steps * B if cfg.steps else (math.ceil(cfg.tokens / B) * B if cfg.tokens else None)
    return StreamSource(stream, B, seed=cfg.seed, eval_fraction=cfg.eval_fraction, device=device,
                        rows_needed=needed, world_size=world_size)


def _batch_order(loader: ActivationLoader, paths: list[Path], resume: bool, world_size: int = 1) -> dict:
    """The loader's batch order (exact shuffle or out-of-core blocks); a resumed run keeps the one it was saved
    with (runs saved before it was recorded: exact), whatever the memory budgets would choose on this machine.
    Under DDP every rank takes rank 0's: their parts of a batch partition it only if all draw the same way."""
    if world_size > 1:
        import torch.distributed as dist

        box = [loader.batch_order()]
        dist.broadcast_object_list(box, 0)
        loader.use_batch_order(box[0])
    for path in paths if resume else []:
        if is_run(path):
            try:
                saved = (read_run(path).train or {}).get("batch_order") or {"kind": "exact"}
            except (RunError, CheckpointError, OSError, ValueError, AttributeError):
                break  # a damaged run: `_restore` says what is wrong with it
            drawn_for = int(saved.get("world_size", 1))
            if saved["kind"] == "block" and drawn_for != world_size:
                # Out-of-core blocks are dealt to ranks: another world size reorders the batches still to come.
                raise RunError(f"cannot resume {path}: its out-of-core batch order was drawn for {drawn_for} "
                               f"process(es) and this run has {world_size}; resume it with {drawn_for} (torchrun "
                               f"--nproc-per-node/--nnodes), or train into a new --out")
            loader.use_batch_order(saved)
            break
    order = loader.batch_order()
    if order["kind"] == "block":
        order["world_size"] = world_size
    return order


def _loop(states: list[SAEState], batches: Iterator[torch.Tensor], start: int, n_steps: int, cfg: TrainConfig,
          info: dict, bf16: bool, rank: int, world_size: int) -> None:
    """Steps `start`..n_steps of every SAE; the host reads the device only at log and checkpoint steps."""
    scale = info["norm_scale"]
    bar = tqdm(total=n_steps, initial=start, unit="step", desc="train", disable=not cfg.progress or rank > 0)
    t_last, tok_last = time.perf_counter(), 0
    try:
        for step in range(start, n_steps):
            x = normalise(next(batches), scale)
            for s in states:
                if s.step == step:  # a state saved later than another (killed between saves) waits
                    update_step(s, x, step, n_steps, cfg, bf16, world_size)
            tok_last += x.shape[0] * world_size
            done = step + 1
            log_now = done % cfg.log_every == 0 or done == n_steps
            save_now = done % cfg.checkpoint_every == 0 or done == n_steps
            snap_now = cfg.snapshot_every > 0 and done % cfg.snapshot_every == 0
            if log_now or save_now or snap_now:
                check_finite(states, world_size)  # before anything is logged or saved
            if log_now:
                now = time.perf_counter()
                tok_s = tok_last / (now - t_last)
                for s in states:
                    s.log.append(_log_line(s, done, cfg, tok_s))
                bar.set_postfix(_postfix(states[0].log[-1]))
                t_last, tok_last = now, 0
            if (save_now or snap_now) and rank == 0:
                for s in states:
                    _save(s, info, scale, n_steps, snapshot=snap_now, source=batches)
            bar.update(1)
    except KeyboardInterrupt:
        if rank == 0:
            for s in states:  # keep the work done; a half-applied or non-finite state is not saved
                if not s.pending and int(s.fault_step) == NO_FAULT:
                    _save(s, info, scale, n_steps, source=batches)
        raise
    finally:
        bar.close()


def normalise(batch: torch.Tensor, scale: float) -> torch.Tensor:
    """A float32 batch of x / scale from a batch in the cache's dtype, in one pass on the batch's device.

    Dividing by a one-element float32 tensor promotes the float16 batch inside the kernel, so no separate
    float32 copy is made; the result equals `batch.float() / scale` bit for bit.
    """
    return torch.div(batch, torch.full((1,), scale, dtype=torch.float32, device=batch.device))


def update_step(s: SAEState, x: torch.Tensor, step: int, n_steps: int, cfg: TrainConfig, bf16: bool,
                world_size: int) -> None:
    """One optimiser step of one SAE on a batch of normalised activations, with no host sync.

    Nothing is read back from the device: whether the loss and gradient norm are finite is recorded in
    `s.fault_step` (read by `check_finite` at log and checkpoint steps), the log statistics add up in
    `s.window`. The one host read, of AuxK's possibly-dead latents, happens once per log window, at its first
    step (`aux_candidates`).
    """
    for group in s.opt.param_groups:
        group["lr"] = lr_at(step, n_steps, group["initial_lr"], cfg.lr_warmup_steps, cfg.lr_decay_start)
    tokens = x.shape[0] * world_size
    candidates = aux_candidates(s, step, cfg.log_every, tokens)
    dead = s.tokens_since_fired >= s.dead_after if candidates is not None else None
    s.generator.manual_seed(noise_seed(s.seed, s.rank, step))
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = s.sae.loss_terms(x, step / n_steps, dead, s.generator, candidates)
    loss = sum(out.terms.values())
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
    _record(s, out.terms, loss, norm, out.code.vals, step)
    s.pending = True  # until the step counter moves, a saved state would hold half a step
    s.opt.step()
    s.sae.after_step()
    s.firing.add(fired, tokens)
    s.tokens_since_fired.add_(tokens).masked_fill_(fired > 0, 0)
    s.step = step + 1
    s.pending = False


def aux_candidates(s: SAEState, step: int, window: int, tokens_per_step: int) -> torch.Tensor | None:
    """Ids of every latent that can be dead at some step of the log window holding `step` (None: AuxK off).

    A latent's tokens-since-fired grows by at most `tokens_per_step` a step, so those within reach of
    `dead_after` by the window's last step are all that AuxK can pick until then: the host reads the counters
    once per window, at its first step, and each step masks the live ones out on the device. The set is saved
    with the trainer state, so a resumed run picks from the very columns the uninterrupted one did. A longer
    log window means a larger set (at worst every latent, as a masked topk over all of them).
    """
    if s.cfg.aux_k_coef <= 0:
        return None
    if s.aux_candidates is None or step >= s.aux_until:
        until = (step // window + 1) * window
        reach = (until - 1 - step) * tokens_per_step
        s.aux_candidates = (s.tokens_since_fired + reach >= s.dead_after).nonzero().squeeze(1)
        s.aux_until = until
    return s.aux_candidates


def _record(s: SAEState, terms: dict[str, torch.Tensor], loss: torch.Tensor, norm: torch.Tensor,
            vals: torch.Tensor, step: int) -> None:
    """Add the step's log statistics to `s.window` and note a first non-finite step, all on the device."""
    names = ("loss", *terms, "l0")
    l0 = (vals > 0).sum(1, dtype=torch.float32).mean()
    values = torch.stack([loss.detach().float(), *(t.detach().float() for t in terms.values()), l0]).double()
    if names in s.window:
        s.window[names] += values
    else:
        s.window[names] = values
    s.window_steps += 1
    checked = ("gradient", *names[:-1])
    bad = ~torch.isfinite(torch.cat([norm.detach().double().reshape(1), values[:-1]]))
    first = bad.any() & (s.fault_step == NO_FAULT)
    s.fault_flags[checked] = torch.where(first, bad, s.fault_flags.get(checked, torch.zeros_like(bad)))
    s.fault_step = torch.where(first, step, s.fault_step)


def check_finite(states: list[SAEState], world_size: int = 1) -> None:
    """NonFiniteLoss if any SAE (on any rank) took a non-finite step: the one host read of the fault flags, at
    log and checkpoint steps. Under DDP every rank calls it at the same steps and all stop together, none left
    waiting in the next all_reduce."""
    local = torch.stack([s.fault_step for s in states])
    first = local.clone()
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    for s, mine, at in zip(states, local.tolist(), first.tolist(), strict=True):
        if at != NO_FAULT:
            raise NonFiniteLoss(_non_finite_message(s, mine == at, at))


def _non_finite_message(s: SAEState, here: bool, step: int) -> str:
    bad: set[str] = set()
    if here:
        for names, flags in s.fault_flags.items():
            bad |= {n for n, f in zip(names, flags.tolist(), strict=True) if f}
    terms = [n for names in s.fault_flags for n in names[2:] if n in bad]
    if terms:
        what = f"loss term {', '.join(dict.fromkeys(terms))} is not finite"
    elif "loss" in bad:
        what = "the loss (a sum of finite terms) is not finite"
    elif "gradient" in bad:
        what = "the gradient is not finite (with a finite loss)"
    else:
        what = "another rank's loss or gradient is not finite"
    return (f"{s.path}: {what} at step {step}; the run stops and keeps its last good checkpoint "
            f"(step {_saved_step(s.path)}); lower --lr or check the cache, then resume")


def noise_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one step's training noise on one rank: a hash, so no two (rank, step) pairs share a stream."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative int64 for manual_seed


def train_device(name: str, world_size: int = 1, env: Mapping[str, str] | None = None) -> torch.device:
    """The device this process trains on: under DDP a bare "cuda" means this rank's GPU, cuda:LOCAL_RANK."""
    return rank_device(name, world_size, int((os.environ if env is None else env).get("LOCAL_RANK", 0)))


def window_means(s: SAEState) -> dict[str, float]:
    """The mean of each log statistic over the steps since the last log line (a host read; a term present in
    some steps only, like AuxK, is averaged over all of them, as absent meant 0)."""
    means: dict[str, float] = {}
    for names, sums in s.window.items():
        for name, v in zip(names, sums.tolist(), strict=True):
            means[name] = means.get(name, 0.0) + v / max(1, s.window_steps)
    return means


def _log_line(s: SAEState, step: int, cfg: TrainConfig, tok_s: float) -> dict:
    line = {"step": step, "tokens": step * cfg.batch_size, "lr": s.opt.param_groups[0]["lr"], **window_means(s)}
    dead, never = torch.stack([(s.tokens_since_fired >= s.dead_after).double().mean(),
                               (s.firing.counts == 0).double().mean()]).tolist()
    line.update(dead_fraction=dead, never_fired_fraction=never, tokens_per_s=tok_s)
    s.window.clear()
    s.window_steps = 0
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
    # The fused kernel is one pass over each parameter where the default is about ten (B 4096, d_sae 8192 on the
    # 2-core CPU: 5.6 ms against 41 per step); the same update, the same state dict.
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                           eps=train_cfg.adam_eps, fused=torch.device(device).type in ("cpu", "cuda"))
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
            # a stream is its settings (its cache's hash is known only once the cache is written)
            "cache_hash": run_info.get("stream") or run_info["cache_hash"], "n_steps": run_info["n_steps"]}


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
        # In the parameter's own memory layout (W_enc is stored latent-major): the fused Adam kernel walks
        # parameter, gradient and moments as flat memory, so moments loaded row-major would be paired with the
        # wrong elements (tests/test_trainer.py's resume test fails so).
        s.opt.state[p] = {"step": state[f"adam.step.{name}"].clone(),
                          "exp_avg": torch.empty_like(p).copy_(state[f"adam.exp_avg.{name}"]),
                          "exp_avg_sq": torch.empty_like(p).copy_(state[f"adam.exp_avg_sq.{name}"])}
    s.tokens_since_fired.copy_(state["tokens_since_fired"])
    s.firing.counts.copy_(state["fire_count"])
    if "aux_candidates" in state:  # else (runs saved before it was kept) recomputed at the next step
        s.aux_candidates = state["aux_candidates"].nonzero().squeeze(1).to(device)
        s.aux_until = int(state["aux_until"])
    # "rng" (saved for reference) is not restored: the noise is reseeded from (seed, rank, step) every step, which
    # also lets a run resume on another device, whose generator state has another format.
    s.step = int(saved["step"])
    s.firing.n_tokens = s.step * s.info["train"]["batch_size"]


def _init_b_dec(s: SAEState, loader: ActivationLoader, scale: float, device) -> None:
    """b_dec at the geometric median (or mean) of the first training batch, as in Gao et al."""
    if s.cfg.b_dec_init == "zero":
        return
    sample = normalise(next(iter(loader.stream(0))).to(device), scale)  # the full first batch, on every rank
    centre = geometric_median(sample) if s.cfg.b_dec_init == "geometric_median" else sample.mean(0)
    with torch.no_grad():
        s.sae.b_dec.copy_(centre)


def _save(s: SAEState, info: dict, scale: float, n_steps: int, snapshot: bool = False, source=None) -> None:
    """The checkpoint (RUN replaced whole), and with `snapshot` the same files kept as RUN/snapshots/step-NNNNNN,
    itself written atomically (a resumed run rewrites a snapshot it had passed with the same content). A streaming
    `source` (the batches) adds its state at the SAE's step: shuffle buffer, stream position, the cache's hash."""
    state = {f"param.{n}": p for n, p in s.sae.named_parameters()}
    for n, p in s.sae.named_parameters():
        st = s.opt.state.get(p)
        if st:
            state[f"adam.step.{n}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(())
            state[f"adam.exp_avg.{n}"] = st["exp_avg"]
            state[f"adam.exp_avg_sq.{n}"] = st["exp_avg_sq"]
    state.update(tokens_since_fired=s.tokens_since_fired, fire_count=s.firing.counts, rng=s.generator.get_state())
    if s.aux_candidates is not None:
        mask = torch.zeros(s.cfg.d_sae, dtype=torch.bool, device=s.aux_candidates.device)
        state.update(aux_candidates=mask.index_fill_(0, s.aux_candidates, True),
                     aux_until=torch.tensor(s.aux_until, dtype=torch.int64))
    tokens = s.step * s.info["train"]["batch_size"]
    density = s.firing.counts / max(1, tokens)
    run_info = {**s.info, "step": s.step, "tokens_seen": tokens, "complete": s.step >= n_steps}
    if hasattr(source, "checkpoint"):
        saved = source.checkpoint(s.step, final=s.step >= n_steps)
        if saved is None:
            return  # a state ahead of the stream (a multi-SAE run killed between saves) is unchanged since loaded
        state.update(saved[0])
        run_info.update(saved[1])
    meta = {"model_name": info["model"]["name"], "hook_name": info["hook_name"], "context_size": info["context"],
            "dataset_path": info["cache"]}
    files = dict(weights=s.sae.export(scale), metadata=meta, sparsity=density.float().clamp(0, 1), info=run_info,
                 state=state, log_lines=s.log)
    _put_back_snapshots(s.path)
    home = s.path / SNAPSHOTS_DIR
    if home.is_dir():  # the swap keeps only what the checkpoint writes: the snapshots wait beside the run
        os.replace(home, _snapshots_aside(s.path))
    try:
        write_run(s.path, **files)
    finally:
        _put_back_snapshots(s.path)
    if snapshot:
        write_run(snapshot_path(s.path, s.step), **files)


def snapshot_path(run: Path, step: int) -> Path:
    """Where the snapshot of `run` at `step` lives."""
    return Path(run) / SNAPSHOTS_DIR / f"step-{step:06d}"


def _snapshots_aside(run: Path) -> Path:
    return run.with_name(f".{run.name}.{SNAPSHOTS_DIR}")


def _put_back_snapshots(run: Path) -> None:
    """Move the snapshots set aside during a checkpoint swap back into the run (also what a kill between the two
    renames left), keeping any snapshot written since."""
    aside, home = _snapshots_aside(run), run / SNAPSHOTS_DIR
    if not aside.is_dir() or not run.is_dir():
        return
    if not home.exists():
        os.replace(aside, home)
        return
    for p in aside.iterdir():
        if not (home / p.name).exists():
            os.replace(p, home / p.name)
    shutil.rmtree(aside, ignore_errors=True)


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
