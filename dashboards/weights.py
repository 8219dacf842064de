"""Per-latent quantities read off the weights alone: logit effects and decoder-cosine neighbours.

Pure tensor functions, computed in chunks so that no [L, d_vocab] or [d_sae, d_sae] matrix is held whole.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOGIT_EFFECT_DEFINITION = (
    "logit effect of latent i on token t: ((W_dec[i] * ln_final.w) @ W_U)[t], the direct effect on the logits of "
    "adding latent i's decoder row to the residual stream, through the final LayerNorm's scale (its centring and "
    "normalisation by the residual norm left out) and the unembedding; later blocks are bypassed"
)
DECODER_COSINE_DEFINITION = "cosine similarity between decoder rows W_dec[i] and W_dec[j]"


def logit_effects(W_dec: Tensor, W_U: Tensor, ln_scale: Tensor | None = None, n: int = 10,
                  chunk: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top values, top token ids, bottom values, bottom token ids), each [L, n], of (W_dec * ln_scale) @ W_U.

    W_dec: [L, d_model] decoder rows of the latents; W_U: [d_model, d_vocab]; ln_scale: [d_model] or None.
    Top is descending, bottom ascending (most negative first).
    """
    n = min(n, W_U.shape[1])
    W_U = W_U.float()
    tops, top_ids, bots, bot_ids = [], [], [], []
    for i in range(0, W_dec.shape[0], chunk):
        rows = W_dec[i : i + chunk].float()
        if ln_scale is not None:
            rows = rows * ln_scale.float()
        effect = rows @ W_U
        v, j = effect.topk(n, dim=1)
        tops.append(v)
        top_ids.append(j)
        v, j = effect.topk(n, dim=1, largest=False)
        bots.append(v)
        bot_ids.append(j)
    if not tops:
        empty = torch.zeros(0, n)
        return empty, empty.long(), empty, empty.long()
    return torch.cat(tops), torch.cat(top_ids), torch.cat(bots), torch.cat(bot_ids)


def unit_rows(W: Tensor) -> Tensor:
    W = W.float()
    return W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)


def decoder_neighbours(W_dec: Tensor, latents: Tensor, n: int = 10, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(cosines, ids), each [L, n]: the latents whose decoder rows are closest in cosine to each latent's, self
    excluded, most similar first."""
    unit = unit_rows(W_dec)
    n = min(n, unit.shape[0] - 1)
    latents = torch.as_tensor(latents, dtype=torch.int64)
    cos_out, id_out = [], []
    for i in range(0, latents.numel(), chunk):
        ids = latents[i : i + chunk]
        cos = unit[ids] @ unit.T
        cos[torch.arange(ids.numel()), ids] = -float("inf")
        v, j = cos.topk(n, dim=1)
        cos_out.append(v)
        id_out.append(j)
    if not cos_out:
        return torch.zeros(0, n), torch.zeros(0, n, dtype=torch.int64)
    return torch.cat(cos_out), torch.cat(id_out)


def best_matches(W_dec_a: Tensor, W_dec_b: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(cosine, id) [d_sae_a]: for each decoder row of A, the most similar decoder row of B (cosine)."""
    a, b = unit_rows(W_dec_a), unit_rows(W_dec_b)
    cos_out, id_out = [], []
    for i in range(0, a.shape[0], chunk):
        v, j = (a[i : i + chunk] @ b.T).max(dim=1)
        cos_out.append(v)
        id_out.append(j)
    return torch.cat(cos_out), torch.cat(id_out)
