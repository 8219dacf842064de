"""CE and KL with the SAE spliced into the model at the hook: SAELens 6.54's `get_recons_loss` definitions.

Per batch of token contexts [B, L] (TransformerLens `run_with_hooks`, no BOS added: the contexts already
hold what they hold):
- A position is *counted* when its **input** token is not special (SAELens builds its mask from the input ids).
- clean: the unmodified forward. sae: the hook's activation replaced by sae.decode(sae.encode(x)) at counted
  positions; special-token positions keep their original activation (SAELens `torch.where(mask, x_hat, x)`).
  zero: the hook's activation replaced by zeros at **every** position, special tokens included (SAELens
  `standard_zero_ablate_hook`; DESIGN.md "zeroed at every position").
- CE: next-token cross-entropy at positions 0..L-2 (the prediction of token t+1 from position t), counted when
  the input token at t is not special (SAELens `mask[:, :-1]`): a special token as *target* still counts.
- KL: KL(p_clean || p_new) = sum over the vocabulary of p_clean (log p_clean - log p_new), from log-softmax
  (`kl_div` with the clean distribution as target), at all L positions (the last one too, which has no CE
  target), counted where the input token is not special: SAELens `_kl` then its mask.
- Every reported CE/KL is a global mean over the counted positions of all batches (float64 sums), and
  ce_score / kl_score are ratios of those means (`evals.metrics.ce_kl_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from activations.models import special_token_ids  # noqa: F401  (re-exported)
from evals.metrics import ce_kl_scores
from vsae.checkpoint import SAEWeights
from vsae.firing import special_mask


def counted_mask(tokens: Tensor, special_ids: Iterable[int]) -> Tensor:
    """Bool [B, L]: True where the input token is not special (the positions every metric counts)."""
    return ~special_mask(tokens, special_ids)


def sae_to(sae: SAEWeights, device: str | torch.device) -> SAEWeights:
    """The same SAE with its tensors on `device`."""
    return SAEWeights(
        W_enc=sae.W_enc.to(device), b_enc=sae.b_enc.to(device), W_dec=sae.W_dec.to(device),
        b_dec=sae.b_dec.to(device), k=sae.k, apply_b_dec_to_input=sae.apply_b_dec_to_input,
    )


def splice_hook(sae: SAEWeights, mask: Tensor, ablate: Tensor | None = None) -> Callable:
    """A TransformerLens hook putting the SAE reconstruction in place of the activation at masked-in positions.

    `ablate` (LongTensor [B], optional): per batch row, a latent whose activation is set to 0 before decoding,
    i.e. its decoded contribution z_i * W_dec[i] is removed wherever it fires (used by `evals.ablation`).
    Only [batch, pos, d_in] hooks (resid, mlp_out, attn_out) are handled; head-indexed hooks are not.
    """

    def hook(activations: Tensor, hook) -> Tensor:  # noqa: ARG001 (TransformerLens passes the HookPoint)
        if activations.ndim != 3:
            raise ValueError(f"splice_hook expects [batch, pos, d_in] activations, got {list(activations.shape)}")
        z = sae.encode(activations)
        if ablate is not None:
            z[torch.arange(z.shape[0], device=z.device), :, ablate.to(z.device)] = 0
        x_hat = sae.decode(z).to(activations.dtype)
        return torch.where(mask[..., None], x_hat, activations)

    return hook


def zero_hook(activations: Tensor, hook) -> Tensor:  # noqa: ARG001
    """SAELens `standard_zero_ablate_hook`: zeros at every position."""
    return torch.zeros_like(activations)


def log_probs(logits: Tensor) -> Tensor:
    """Log-softmax over the vocabulary in float32 or better (bf16 models lose nothing extra here)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1)


def next_token_ce(logprobs: Tensor, tokens: Tensor) -> Tensor:
    """[B, L-1] cross-entropy of token t+1 given positions <= t (TransformerLens `lm_cross_entropy_loss`)."""
    return -logprobs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]


def kl_to_clean(clean_logprobs: Tensor, new_logprobs: Tensor) -> Tensor:
    """[B, L] KL(p_clean || p_new) summed over the vocabulary (SAELens `_kl`, with log-space targets)."""
    return F.kl_div(new_logprobs, clean_logprobs, reduction="none", log_target=True).sum(dim=-1)


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    return tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def splice_losses(
    model,
    hook_name: str,
    sae: SAEWeights,
    tokens: Tensor,
    special_ids: set[int],
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """ce_clean, ce_sae, ce_zero, kl_sae, kl_zero (global means, as the module docstring defines them),
    ce_score, kl_score (`ce_kl_scores`), n_tokens (counted CE positions) and n_tokens_kl (counted KL positions).

    `tokens` is LongTensor [n, ctx]; `model` a HookedTransformer already on `device`.
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n, ctx] with ctx >= 2, got {list(tokens.shape)}")
    sae = sae_to(sae, device)
    sums = dict.fromkeys(("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"), 0.0)
    n_ce = n_kl = 0
    for start in _batches(tokens.shape[0], batch_size, progress, "splice CE/KL"):
        tok = tokens[start : start + batch_size].to(device=device, dtype=torch.long)
        mask = counted_mask(tok, special_ids)
        ce_mask = mask[:, :-1]
        lp_clean = log_probs(model(tok, return_type="logits"))
        sums["ce_clean"] += next_token_ce(lp_clean, tok)[ce_mask].double().sum().item()
        for name, hook in (("sae", splice_hook(sae, mask)), ("zero", zero_hook)):
            lp = log_probs(model.run_with_hooks(tok, return_type="logits", fwd_hooks=[(hook_name, hook)]))
            sums[f"ce_{name}"] += next_token_ce(lp, tok)[ce_mask].double().sum().item()
            sums[f"kl_{name}"] += kl_to_clean(lp_clean, lp)[mask].double().sum().item()
            del lp  # [B, L, vocab]: keep at most two alive
        n_ce += int(ce_mask.sum())
        n_kl += int(mask.sum())
    if n_ce == 0:
        raise ValueError("no counted positions: every input token is special")
    out = {key: value / n_ce if key.startswith("ce") else value / n_kl for key, value in sums.items()}
    out |= ce_kl_scores(out["ce_clean"], out["ce_sae"], out["ce_zero"], out["kl_sae"], out["kl_zero"])
    return out | {"n_tokens": n_ce, "n_tokens_kl": n_kl}
