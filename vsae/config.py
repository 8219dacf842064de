"""Dataclass configs of an SAE and of a training run, and the paper's presets."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields, replace

from activations.devices import resolve_device

DECODERS = ("unit", "free")
VARIANCES = ("fixed", "learned")
B_DEC_INITS = ("geometric_median", "mean", "zero")


@dataclass
class SAEConfig:
    """One SAE. Every switch is independent of the variant (DESIGN.md, "SAE variants")."""

    variant: str = field(default="topk", metadata={"help": "SAE variant (a class in vsae.variants.VARIANTS)"})
    d_sae: int = field(default=8192, metadata={"help": "number of latents"})
    k: int = field(default=64, metadata={"help": "active latents per token"})
    pre_bias: bool = field(default=True, metadata={
        "help": "subtract b_dec from the input (else b_dec is only an output bias)"})
    decoder: str = field(default="unit", metadata={
        "help": "unit: unit-norm rows, renormalised every step with the decoder-parallel gradient removed; "
                "free: rows initialised at norm 0.1, never renormalised"})
    b_dec_init: str = field(default="geometric_median", metadata={
        "help": "initial b_dec: geometric median or mean of the first batch, or zero"})
    aux_k_coef: float = field(default=1 / 32, metadata={"help": "AuxK loss coefficient (0 turns AuxK off)"})
    k_aux: int | None = field(default=None, metadata={"help": "latents in the AuxK loss (unset: d_in // 2)"})
    dead_after: int | None = field(default=None, metadata={
        "help": "tokens without firing before a latent counts as dead, for AuxK "
                "(unset: min(10M, run tokens // 5))"})
    sample: bool = field(default=False, metadata={"help": "vsae: sample z = mu + sigma * eps in training"})
    variance: str = field(default="fixed", metadata={
        "help": "vsae: fixed (sigma = 1) or a learned log-variance head"})
    kl_coef: float = field(default=1.0, metadata={"help": "vsae: weight of the KL term"})
    kl_warmup: float = field(default=0.1, metadata={"help": "vsae: fraction of steps of linear KL warm-up"})

    def validate(self, d_in: int | None = None) -> None:
        from vsae.variants import VARIANTS

        check_types(self)
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.d_sae <= 0:
            raise ValueError(f"d_sae must be positive, got {self.d_sae}")
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in 1..d_sae ({self.d_sae}), got {self.k}")
        for name, value, allowed in (("decoder", self.decoder, DECODERS), ("variance", self.variance, VARIANCES),
                                     ("b_dec_init", self.b_dec_init, B_DEC_INITS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.aux_k_coef < 0 or self.kl_coef < 0 or not 0 <= self.kl_warmup <= 1:
            raise ValueError("aux_k_coef and kl_coef must be >= 0 and kl_warmup in [0, 1]")
        if self.k_aux is not None and self.k_aux <= 0:
            raise ValueError(f"k_aux must be positive, got {self.k_aux}")

    def label(self, group: list[SAEConfig]) -> str:
        """A short name from the fields that vary across `group` (for sweep run directories)."""
        varying = [f.name for f in fields(self) if len({repr(getattr(c, f.name)) for c in group}) > 1]
        return "-".join(label_part(n, getattr(self, n)) for n in varying) or self.variant


def label_part(name: str, value: object) -> str:
    """One switch as a run-name part: `k64`, `sample`/`nosample` for a bool, the bare value for `variant`."""
    short = name.replace("_", "")
    if name == "variant":
        return str(value)
    if isinstance(value, bool):
        return short if value else f"no{short}"
    return f"{short}{value}"


@dataclass
class TrainConfig:
    """The run: data, optimiser, schedule, checkpointing. Shared by every SAE trained in one pass."""

    cache: str = field(default="", metadata={"help": "activation cache directory (from vsae harvest)"})
    out: str = field(default="runs/sae", metadata={"help": "run directory (several SAEs: one subdirectory each)"})
    steps: int | None = field(default=None, metadata={
        "help": "optimiser steps (unset: tokens / batch size, else one epoch of the training split)"})
    tokens: int | None = field(default=None, metadata={
        "help": "training tokens, used when steps is unset (unset: one epoch of the training split)"})
    batch_size: int = field(default=4096, metadata={"help": "activations per optimiser step"})
    lr: float | None = field(default=None, metadata={
        "help": "learning rate (unset: 2e-4 / sqrt(d_sae / 2^14), Gao et al.'s scaling)"})
    lr_warmup_steps: int = field(default=1000, metadata={
        "help": "linear lr warm-up steps (capped at a tenth of the run)"})
    lr_decay_start: float = field(default=0.8, metadata={
        "help": "fraction of the run after which the lr decays linearly to 0"})
    grad_clip: float = field(default=1.0, metadata={"help": "maximum gradient norm"})
    adam_eps: float = field(default=6.25e-10, metadata={"help": "Adam epsilon (Gao et al.'s value)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1 (first-moment decay)"})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2 (second-moment decay)"})
    seed: int = field(default=42, metadata={"help": "seed of the batch order and of the SAE init"})
    device: str = field(default="auto", metadata={
        "help": "torch device (cpu, cuda, cuda:1, ...); auto: CUDA when this machine has it, else CPU"})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (unset: on CUDA, off elsewhere)"})
    sparse: bool | None = field(default=None, metadata={
        "help": "sparse encode/decode kernels (unset: sparse on CPU, dense on CUDA: faster on each)"})
    eval_fraction: float = field(default=0.05, metadata={
        "help": "fraction of the cache's sequences held out for vsae eval"})
    device_data_budget: float = field(default=0.5, metadata={
        "help": "load the training split onto the training device once, in the cache's dtype, when it takes at "
                "most this fraction of the device's free memory (CUDA: free GPU memory; CPU: available RAM); "
                "else batches stream from the cache files. 0: always stream. Either way the batches are the same"})
    host_data_budget: float = field(default=0.5, metadata={
        "help": "when streamed, the training split is read by exact random row gathers if it takes at most this "
                "fraction of available RAM (so the page cache keeps it), else out of core: contiguous 64k-row "
                "blocks in a seeded random order through a shuffle buffer of 8 blocks. 0: always out of core. A "
                "resumed run keeps the order it started with"})
    log_every: int = field(default=50, metadata={"help": "steps between log.jsonl lines"})
    checkpoint_every: int = field(default=1000, metadata={"help": "steps between checkpoints"})
    snapshot_every: int = field(default=0, metadata={
        "help": "steps between snapshots: a complete, evaluable copy of the run at that step kept in "
                "RUN/snapshots/step-NNNNNN (for `vsae audit`'s training trajectory); 0: none"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        budget = self.device_data_budget
        if isinstance(self.snapshot_every, int) and self.snapshot_every < 0:
            raise ValueError(f"snapshot_every must be a number of steps >= 0 (0: no snapshots), got "
                             f"{self.snapshot_every}")
        if isinstance(budget, int | float) and not isinstance(budget, bool) and not 0 <= budget <= 1:
            raise ValueError(f"device_data_budget must be a fraction of free memory in [0, 1] (0: always stream "
                             f"from the cache), got {budget}")
        host = self.host_data_budget
        if isinstance(host, int | float) and not isinstance(host, bool) and not 0 <= host <= 1:
            raise ValueError(f"host_data_budget must be a fraction of available RAM in [0, 1] (0: always read out "
                             f"of core), got {host}")

    def learning_rate(self, d_sae: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)


def lr_at(step: int, n_steps: int, lr: float, warmup_steps: int, decay_start: float) -> float:
    """Linear warm-up, constant, then linear decay to 0 from `decay_start` of the run."""
    warmup = max(1, min(warmup_steps, n_steps // 10))  # 0 warm-up steps (or a short run) means none
    scale = min(1.0, (step + 1) / warmup)
    start = int(decay_start * n_steps)
    if step >= start and n_steps > start:
        scale = min(scale, (n_steps - step) / (n_steps - start))
    return lr * scale


# The paper's code as it ran (shared/PAPER.md section 2): 10,001 steps of 192 tokens, d_sae 8192.
PAPER_TRAIN = dict(steps=10_001, batch_size=192, lr_decay_start=0.8)
PRESETS: dict[str, tuple[dict, dict]] = {
    # TopK arm: Gao et al. lr scaling, AuxK 1/32 with k_aux 256 and a 10M-token dead threshold (which
    # 1.92M training tokens never reach), unit decoder, pre-bias at the geometric median.
    "paper-topk": (
        dict(variant="topk", d_sae=8192, pre_bias=True, decoder="unit", b_dec_init="geometric_median",
             aux_k_coef=1 / 32, k_aux=256, dead_after=10_000_000),
        dict(PAPER_TRAIN, lr=2e-4 / math.sqrt(8192 / 2**14), lr_warmup_steps=1000),
    ),
    # vSAE arm: deterministic TopK + 0.5 * ||mu||^2 (fixed variance, no sampling), free 0.1-norm decoder,
    # output-only bias, no AuxK, KL weight 1 warmed up over 10% of steps; lr 8e-4, warm-up max(200, 2%).
    "paper-vsae": (
        dict(variant="vsae", d_sae=8192, pre_bias=False, decoder="free", b_dec_init="zero", aux_k_coef=0.0,
             sample=False, variance="fixed", kl_coef=1.0, kl_warmup=0.1),
        dict(PAPER_TRAIN, lr=8e-4, lr_warmup_steps=200),
    ),
}


def apply_preset(name: str, sae: SAEConfig, train: TrainConfig) -> tuple[SAEConfig, TrainConfig]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    sae_over, train_over = PRESETS[name]
    return replace(sae, **sae_over), replace(train, **train_over)


def check_types(cfg: object) -> None:
    """A ValueError naming the first field whose value does not have the field's type (a sweep or plan file can
    say `k = "abc"`); ints are accepted where floats are expected, bools nowhere else."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value, tp = getattr(cfg, f.name), hints[f.name]
        allowed = typing.get_args(tp) if typing.get_origin(tp) in (types.UnionType, typing.Union) else (tp,)
        ok = any(_is_a(value, a) for a in allowed)
        if not ok:
            names = " or ".join("None" if a is type(None) else getattr(a, "__name__", str(a)) for a in allowed)
            raise ValueError(f"{f.name} must be {names}, got {value!r}")


def _is_a(value: object, tp: object) -> bool:
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(tp)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, tp) if isinstance(tp, type) else True


def diff_fields(a: dict, b: dict) -> list[str]:
    """Names of the keys whose values differ between two config dicts."""
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


