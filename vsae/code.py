"""The one sparse code of a TopK SAE: (vals, idx) of the k latents each token keeps.

Training, evals, dashboards and compare all encode through `encode_topk` and decode through `decode_topk`, so
there is one definition of "the SAE's latents for x":

    pre = (x - b_dec if pre_bias else x) @ W_enc + b_enc
    vals, idx = ReLU(TopK_k(pre))
    x_hat = sum_j vals[j] * W_dec[idx[j]] + b_dec

TopK of the pre-activations then ReLU of the k values equals TopK of ReLU(pre) (ReLU is monotone) without a pass
over [B, d_sae]; where a row has fewer than k positives the extra entries hold value 0 (they do not fire).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class TopKCode(NamedTuple):
    """A batch's sparse code: vals [..., k] (after ReLU, so >= 0) and latent ids idx [..., k] (int64)."""

    vals: Tensor
    idx: Tensor

    def to_dense(self, d_sae: int) -> Tensor:
        """The dense code [..., d_sae]: zero except at idx."""
        return self.vals.new_zeros(*self.vals.shape[:-1], d_sae).scatter_(-1, self.idx, self.vals)


@torch.no_grad()
def encode_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, pre_bias: bool) -> TopKCode:
    """The TopK code of x [..., d_in] under W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_in].

    x is cast to W_enc's dtype first (as SAELens does, so a bf16 SAE computes in bf16). With k = d_sae (a ReLU SAE
    read from a `standard` checkpoint) every latent is kept, in id order, without a topk.
    """
    lead, d_sae = x.shape[:-1], W_enc.shape[1]
    x = x.reshape(-1, x.shape[-1]).to(W_enc.dtype)
    if pre_bias:
        x = x - b_dec
    if W_enc.dtype in (torch.float16, torch.bfloat16):
        # As SAELens computes it: addmm rounds once where x @ W + b rounds twice, which changes a quarter of a bf16
        # SAE's pre-activations and so its TopK choices.
        pre = x @ W_enc + b_enc
    else:
        # addmm fuses the bias into the GEMM instead of a second pass over [B, d_sae].
        pre = torch.addmm(b_enc, x, W_enc)
    if k == d_sae:
        vals, idx = pre.relu_(), torch.arange(d_sae, device=pre.device).expand(pre.shape[0], -1)
    else:
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        vals = vals.relu_()
    return TopKCode(vals.reshape(*lead, vals.shape[-1]), idx.reshape(*lead, idx.shape[-1]))


def decode_topk(code: TopKCode, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """x_hat [..., d_in] = sum_j vals[..., j] * W_dec[idx[..., j]] + b_dec.

    embedding_bag reads only the k selected decoder rows per token: no dense [B, d_sae] code, and a fraction
    of the dense decode's work.
    """
    vals, idx = code
    lead, k = idx.shape[:-1], idx.shape[-1]
    out = torch.nn.functional.embedding_bag(idx.reshape(-1, k), W_dec, per_sample_weights=vals.reshape(-1, k)
                                            .to(W_dec.dtype), mode="sum")
    return (out + b_dec).reshape(*lead, W_dec.shape[1])
