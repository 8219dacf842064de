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

import numpy as np
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


def mean_hook(mean: Tensor) -> Callable:
    """Mean ablation: the hook's activation replaced by the data mean at every position (a gentler baseline than
    zeros: the model still sees a typical residual stream, only the token's information is gone)."""

    def hook(activations: Tensor, hook) -> Tensor:  # noqa: ARG001
        return mean.to(device=activations.device, dtype=activations.dtype).expand_as(activations).clone()

    return hook


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    return tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def splice_context_sums(
    model,
    hook_name: str,
    saes: dict[str, SAEWeights],
    tokens: Tensor,
    special_ids: Iterable[int],
    mean: Tensor | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Per context (row of `tokens` [n, ctx]): float64 sums of next-token CE and of KL to the clean output over the
    counted positions, and their counts. Keys: "ce_clean", "ce_zero", "kl_zero", with `mean` also "ce_mean",
    "kl_mean" (mean ablation), "ce:NAME" and "kl:NAME" per SAE, "n_ce", "n_kl". The clean and ablated forwards run
    once for all SAEs; the sums are the units a bootstrap over contexts resamples."""
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n, ctx] with ctx >= 2, got {list(tokens.shape)}")
    saes = {name: sae_to(sae, device) for name, sae in saes.items()}
    special_ids = list(special_ids)
    parts: dict[str, list[Tensor]] = {}
    for start in _batches(tokens.shape[0], batch_size, progress, "splice CE/KL"):
        tok = tokens[start : start + batch_size].to(device=device, dtype=torch.long)
        mask = counted_mask(tok, special_ids)
        for key, value in _batch_sums(model, hook_name, saes, tok, mask, mean).items():
            parts.setdefault(key, []).append(value.cpu())
    sums = {key: torch.cat(v).numpy() for key, v in parts.items()}
    if sums["n_ce"].sum() == 0:
        raise ValueError("no counted positions: every input token is special")
    return sums


def _batch_sums(model, hook_name: str, saes: dict[str, SAEWeights], tok: Tensor, mask: Tensor,
                mean: Tensor | None) -> dict[str, Tensor]:
    ce_mask = mask[:, :-1]
    lp_clean = log_probs(model(tok, return_type="logits"))
    out = {"ce_clean": torch.where(ce_mask, next_token_ce(lp_clean, tok), 0).double().sum(1),
           "n_ce": ce_mask.sum(1).double(), "n_kl": mask.sum(1).double()}
    hooks = {"zero": zero_hook, **({"mean": mean_hook(mean)} if mean is not None else {}),
             **{f":{name}": splice_hook(sae, mask) for name, sae in saes.items()}}
    for name, hook in hooks.items():
        lp = log_probs(model.run_with_hooks(tok, return_type="logits", fwd_hooks=[(hook_name, hook)]))
        key = name if name.startswith(":") else f"_{name}"
        out[f"ce{key}"] = torch.where(ce_mask, next_token_ce(lp, tok), 0).double().sum(1)
        out[f"kl{key}"] = torch.where(mask, kl_to_clean(lp_clean, lp), 0).double().sum(1)
        del lp  # [B, L, vocab]: keep at most two alive
    return out


def losses_from_sums(sums: dict[str, np.ndarray], name: str, weights: np.ndarray | None = None) -> dict:
    """Global-mean CE/KL (clean, the SAE `name`, zero- and, if measured, mean-ablated) and ce_score / kl_score
    from per-context sums; with bootstrap `weights` [B, n] every value is an array over replicates."""
    def total(key: str):
        v = sums[key]
        return v.sum() if weights is None else weights @ v

    n_ce, n_kl = total("n_ce"), total("n_kl")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"ce_clean": total("ce_clean") / n_ce, "ce_sae": total(f"ce:{name}") / n_ce,
               "ce_zero": total("ce_zero") / n_ce, "kl_sae": total(f"kl:{name}") / n_kl,
               "kl_zero": total("kl_zero") / n_kl}
        out |= ce_kl_scores(out["ce_clean"], out["ce_sae"], out["ce_zero"], out["kl_sae"], out["kl_zero"])
        if "ce_mean" in sums:
            out["ce_mean_ablation"], out["kl_mean_ablation"] = total("ce_mean") / n_ce, total("kl_mean") / n_kl
            mean_scores = ce_kl_scores(out["ce_clean"], out["ce_sae"], out["ce_mean_ablation"], out["kl_sae"],
                                       out["kl_mean_ablation"])
            out["ce_score_vs_mean_ablation"] = mean_scores["ce_score"]
            out["kl_score_vs_mean_ablation"] = mean_scores["kl_score"]
    if weights is None:
        out = {k: float(v) for k, v in out.items()}
    return out


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
    sums = splice_context_sums(model, hook_name, {"sae": sae}, tokens, special_ids, batch_size=batch_size,
                               device=device, progress=progress)
    return losses_from_sums(sums, "sae") | {"n_tokens": int(sums["n_ce"].sum()),
                                            "n_tokens_kl": int(sums["n_kl"].sum())}
