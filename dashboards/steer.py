"""Interventions on an SAE's latents at its hook, as pure tensor functions: steering, ablation, generation.

An intervention edits the sparse code z of the hook's activation x and puts the edit back with the SAE's error
term kept:

    x' = x_hat(z') + (x - x_hat(z)) = x + (z' - z) @ W_dec

so only the latents touched matter, and an empty intervention leaves x exactly as it was (the model's own output,
not the SAE's reconstruction). `clamp` sets z_i to a value (0 ablates the latent); `add` adds value to z_i, i.e.
value x W_dec[i] to the residual stream. Positions whose input token is special (BOS, EOS, PAD) are left alone, as
the splice of `evals.splice` leaves them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vsae.checkpoint import SAEWeights
from vsae.code import TopKCode

MODES = ("clamp", "add")


@dataclass(frozen=True)
class Intervention:
    """One edit of one latent: `clamp` sets its activation to `value`, `add` adds `value` to it."""

    latent: int
    mode: str
    value: float

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"intervention mode {self.mode!r}: expected one of {', '.join(MODES)}")


def latent_values(code: TopKCode, latents: Tensor) -> Tensor:
    """[..., L]: each of `latents`' activation in the sparse code (0 where the code does not keep it)."""
    match = code.idx[..., None, :] == latents.to(code.idx.device)[:, None]  # [..., L, k]
    return (code.vals[..., None, :] * match).sum(dim=-1)


def top_latents(code: TopKCode, n: int) -> TopKCode:
    """The `n` largest entries of each token's code, largest first (entries of value 0 did not fire)."""
    n = min(n, code.vals.shape[-1])
    vals, order = code.vals.topk(n, dim=-1)
    return TopKCode(vals, code.idx.gather(-1, order))


def intervention_delta(x: Tensor, sae: SAEWeights, interventions: list[Intervention]) -> Tensor:
    """(z' - z) @ W_dec [..., d_in]: what the interventions add to x [..., d_in], applied in order (a clamp then an
    add on the same latent sets it, then adds)."""
    if not interventions:
        return torch.zeros_like(x)
    ids = sorted({iv.latent for iv in interventions})
    column = {latent: j for j, latent in enumerate(ids)}
    latents = torch.tensor(ids, device=sae.W_dec.device)
    z = latent_values(sae.encode_topk(x), latents).to(sae.W_dec.dtype)  # [..., L]
    edited = z.clone()
    for iv in interventions:
        j = column[iv.latent]
        edited[..., j] = iv.value if iv.mode == "clamp" else edited[..., j] + iv.value
    return ((edited - z) @ sae.W_dec[latents]).to(x.dtype)


def intervention_hook(sae: SAEWeights, interventions: list[Intervention], mask: Tensor) -> Callable:
    """A TransformerLens hook applying `interventions` at the positions where `mask` [B, L] is True (the others keep
    their activation): x + mask * (z' - z) @ W_dec."""

    def hook(activations: Tensor, hook) -> Tensor:  # noqa: ARG001 (TransformerLens passes the HookPoint)
        if activations.ndim != 3:
            raise ValueError(f"intervention_hook expects [batch, pos, d_in] activations, got {list(activations.shape)}")
        if not interventions:
            return activations
        delta = intervention_delta(activations, sae, interventions)
        return activations + delta * mask[..., None].to(delta.dtype)

    return hook


@torch.no_grad()
def generate(model, tokens: Tensor, n_new: int, hooks: Callable[[Tensor], list], temperature: float = 0.0,
             seed: int = 0) -> Tensor:
    """[B, T + n_new]: `tokens` [B, T] continued `n_new` tokens, row by row independently.

    `hooks(tokens)` gives the forward hooks of the step for the sequence so far ([] for the plain model).
    temperature 0 is greedy; otherwise each row samples from softmax(logits / temperature) with its own generator
    seeded with `seed`, so rows whose distributions agree draw the same tokens (a steered row beside its unsteered
    one departs from it only where the steering changes the distribution).
    """
    generators = [torch.Generator(device=tokens.device).manual_seed(seed) for _ in range(tokens.shape[0])]
    for _ in range(n_new):
        logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=hooks(tokens))[:, -1].float()
        if temperature <= 0:
            nxt = logits.argmax(dim=-1)
        else:
            probs = (logits / temperature).softmax(dim=-1)
            nxt = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)])
        tokens = torch.cat([tokens, nxt[:, None].to(tokens.dtype)], dim=1)
    return tokens
