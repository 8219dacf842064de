"""The encoder + TopK candidates of vsae/fast_topk.py against the code the trainer and the exported SAE compute."""

from __future__ import annotations

import pytest
import torch

from vsae.code import encode_topk
from vsae.fast_topk import bf16_select, compile_available, compiled_select, encode_select, same_selection


def _inputs(B: int = 64, d_in: int = 32, d_sae: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, d_in, generator=g), torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
            torch.randn(d_sae, generator=g) * 0.1, torch.randn(d_in, generator=g))


@pytest.mark.parametrize("pre_bias", [True, False])
def test_reference_is_the_exported_encoding(pre_bias):
    x, W, b_enc, b_dec = _inputs()
    vals, idx = encode_select(x, W, b_enc, b_dec, 8, pre_bias)
    ref = encode_topk(x, W, b_enc, b_dec, 8, pre_bias)
    assert bool(same_selection(idx, ref.idx).all())
    torch.testing.assert_close(vals.sort(dim=1).values, ref.vals.sort(dim=1).values)


def test_bf16_topk_differs_from_fp32_only_at_bf16_ties():
    # Rounding is monotone, so a topk of the bf16-rounded pre-activations must keep every latent whose bf16 value
    # is above the k-th and none below it: only latents equal to the k-th in bf16 may be swapped.
    k = 16
    x, W, b_enc, b_dec = _inputs(B=256, d_sae=512)
    pre = torch.addmm(b_enc, x - b_dec, W)
    idx32 = pre.topk(k, dim=1, sorted=False).indices
    pre16 = pre.bfloat16()
    vals16, idx16 = pre16.topk(k, dim=1, sorted=False)
    kth = vals16.min(dim=1, keepdim=True).values
    above, at = pre16 > kth, pre16 == kth
    chosen32 = torch.zeros_like(above).scatter_(1, idx32, True)
    chosen16 = torch.zeros_like(above).scatter_(1, idx16, True)
    assert bool((chosen32[above] & chosen16[above]).all()), "a latent above the k-th bf16 value was dropped"
    assert not bool(((chosen32 | chosen16) & ~above & ~at).any()), "a latent below the k-th bf16 value was chosen"
    differ = ~same_selection(idx32, idx16)
    assert bool((at.sum(dim=1)[differ] > 1).all()), "rows differ without a bf16 tie at the k-th value"


def test_bf16_gemm_and_topk_choose_latents_as_good_as_fp32():
    # With the GEMM in bf16 too the choice may move, but only between latents within bf16 error of the k-th.
    k = 16
    x, W, b_enc, b_dec = _inputs(B=256, d_sae=512, seed=1)
    pre = torch.addmm(b_enc, x - b_dec, W)
    vals, idx = bf16_select(x, W, b_enc, b_dec, k, True)
    assert vals.dtype == torch.float32 and idx.shape == (256, k)
    kth32 = pre.topk(k, dim=1).values[:, -1:]
    scale = pre.abs().amax(dim=1, keepdim=True)
    assert bool((pre.gather(1, idx) >= kth32 - 2**-6 * scale).all())
    assert float(same_selection(idx, pre.topk(k, dim=1).indices).float().mean()) > 0.5


@pytest.mark.slow  # inductor's first compile takes 20-30 s on two cores
def test_compiled_matches_eager():
    why = compile_available()
    if why:
        pytest.skip(why)
    x, W, b_enc, b_dec = _inputs()
    vals, idx = compiled_select()(x, W, b_enc, b_dec, 8, True)
    ref_vals, ref_idx = encode_select(x, W, b_enc, b_dec, 8, True)
    assert bool(same_selection(idx, ref_idx).all())
    torch.testing.assert_close(vals.sort(dim=1).values, ref_vals.sort(dim=1).values)
