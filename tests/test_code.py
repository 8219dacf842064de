"""vsae.code: the one sparse code against the dense TopK SAE it stands for."""

import pytest
import torch

from vsae.checkpoint import SAEWeights
from vsae.code import TopKCode, decode_topk, encode_topk


def random_weights(d_in: int = 8, d_sae: int = 32, k: int = 5, pre_bias: bool = True, seed: int = 0) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    return SAEWeights(W_enc=torch.randn(d_in, d_sae, generator=g), b_enc=torch.randn(d_sae, generator=g),
                      W_dec=torch.randn(d_sae, d_in, generator=g), b_dec=torch.randn(d_in, generator=g), k=k,
                      apply_b_dec_to_input=pre_bias)


def reference(w: SAEWeights, x: torch.Tensor) -> torch.Tensor:
    """TopK_k(ReLU(pre)) as dense [B, d_sae], spelled out."""
    x_in = x - w.b_dec if w.apply_b_dec_to_input else x
    acts = (x_in @ w.W_enc + w.b_enc).relu()
    vals, idx = acts.topk(w.k, dim=-1)
    return torch.zeros_like(acts).scatter_(-1, idx, vals)


@pytest.mark.parametrize("k,pre_bias", [(5, True), (5, False), (32, True)])  # k = d_sae: a ReLU SAE
def test_code_is_the_dense_topk_code(k, pre_bias):
    w = random_weights(k=k, pre_bias=pre_bias)
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    code = w.encode_topk(x)
    assert isinstance(code, TopKCode) and code.vals.shape == code.idx.shape == (20, k)
    assert code.idx.dtype == torch.int64 and bool((code.vals >= 0).all())
    torch.testing.assert_close(code.to_dense(32), reference(w, x))
    torch.testing.assert_close(w.encode(x), reference(w, x))
    x_hat = w.decode_topk(code)
    torch.testing.assert_close(x_hat, w.decode(w.encode(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, decode_topk(code, w.W_dec, w.b_dec))
    if k < 32:  # the rows do select differently
        assert len({tuple(row) for row in code.idx.sort(1).values.tolist()}) > 1


def test_leading_dimensions_and_empty_batches():
    w = random_weights()
    x = torch.randn(3, 4, 8)
    code = w.encode_topk(x)
    assert code.vals.shape == (3, 4, 5) and w.decode_topk(code).shape == (3, 4, 8)
    torch.testing.assert_close(code.to_dense(32), w.encode_topk(x.reshape(12, 8)).to_dense(32).reshape(3, 4, 32))
    empty = w.encode_topk(torch.zeros(0, 8))
    assert empty.vals.shape == (0, 5) and w.decode_topk(empty).shape == (0, 8)


def test_input_is_cast_to_the_sae_dtype():
    w = random_weights()
    half = SAEWeights(**{n: getattr(w, n).bfloat16() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}, k=w.k,
                      apply_b_dec_to_input=True)
    code = half.encode_topk(torch.randn(6, 8))  # a float32 batch into a bf16 SAE
    assert code.vals.dtype == torch.bfloat16 and half.decode_topk(code).dtype == torch.bfloat16


def test_pure_function_is_what_the_weights_call():
    w = random_weights()
    x = torch.randn(7, 8)
    a = encode_topk(x, w.W_enc, w.b_enc, w.b_dec, w.k, w.apply_b_dec_to_input)
    b = w.encode_topk(x)
    assert torch.equal(a.vals, b.vals) and torch.equal(a.idx, b.idx)
