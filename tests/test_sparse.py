"""vsae.sparse against autograd on the dense computation: exact gradients in float64, tight float32 agreement."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vsae.sparse as sparse
from vsae.sparse import _check_idx, sparse_decode, sparse_encode, topk_latents


def distinct_idx(B: int, d_sae: int, k: int, gen: torch.Generator, hot: tuple[int, ...] = ()) -> torch.Tensor:
    """[B, k] latent ids, distinct within a row (as topk gives), with the `hot` latents in every row."""
    rest = torch.tensor([c for c in range(d_sae) if c not in hot])
    picks = rest[torch.rand(B, len(rest), generator=gen).argsort(dim=1)[:, : k - len(hot)]]
    idx = torch.cat([torch.tensor(hot, dtype=torch.long).expand(B, len(hot)), picks], dim=1)
    return idx.gather(1, torch.rand(B, k, generator=gen).argsort(dim=1))  # hot ones at varying positions


def sae_weights(d_in: int, d_sae: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "W_enc": (torch.randn(d_in, d_sae, generator=gen, dtype=dtype) / d_in**0.5).requires_grad_(),
        "b_enc": (0.1 * torch.randn(d_sae, generator=gen, dtype=dtype)).requires_grad_(),
        "W_dec": (torch.randn(d_sae, d_in, generator=gen, dtype=dtype) / d_sae**0.5).requires_grad_(),
        "b_dec": (0.1 * torch.randn(d_in, generator=gen, dtype=dtype)).requires_grad_(),
    }


def dense_forward(inp, idx, W_enc, b_enc, W_dec, b_dec):
    pre = (inp - b_dec) @ W_enc + b_enc
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    return z @ W_dec + b_dec


def sparse_forward(inp, idx, W_enc, b_enc, W_dec, b_dec):
    vals = sparse_encode(inp - b_dec, W_enc, b_enc, idx).relu()
    return sparse_decode(idx, vals, W_dec) + b_dec


def run_step(forward, inp, idx, weights, grad_out):
    for w in weights.values():
        w.grad = None
    out = forward(inp, idx, **weights)
    out.backward(grad_out)
    return out.detach(), {name: w.grad.clone() for name, w in weights.items()}


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    # float32 sums in another order: compare against the tensor's own scale, not element by element.
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item() + 1e-30, f"max error {err:.3g}, scale {expected.abs().max():.3g}"


# --- exact gradients (float64, tiny shapes) ---

TINY = [(6, 5, 9, 3), (5, 4, 7, 1), (4, 3, 5, 5), (1, 1, 1, 1), (3, 2, 6, 6)]  # B, d_in, d_sae, k; k == d_sae


@pytest.mark.parametrize("B,d_in,d_sae,k", TINY)
def test_encode_gradcheck(B, d_in, d_sae, k):
    gen = torch.Generator().manual_seed(B * 100 + d_sae)
    x = torch.randn(B, d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    W = sae_weights(d_in, d_sae, torch.float64, gen)
    idx = distinct_idx(B, d_sae, k, gen, hot=(0,))
    assert torch.autograd.gradcheck(lambda x, W_enc, b_enc: sparse_encode(x, W_enc, b_enc, idx),
                                    (x, W["W_enc"], W["b_enc"]))


@pytest.mark.parametrize("B,d_in,d_sae,k", TINY)
def test_decode_gradcheck(B, d_in, d_sae, k):
    gen = torch.Generator().manual_seed(B * 100 + d_sae + 1)
    vals = torch.randn(B, k, dtype=torch.float64, generator=gen, requires_grad=True)
    W = sae_weights(d_in, d_sae, torch.float64, gen)
    idx = distinct_idx(B, d_sae, k, gen, hot=(d_sae - 1,))
    assert torch.autograd.gradcheck(lambda vals, W_dec: sparse_decode(idx, vals, W_dec), (vals, W["W_dec"]))


def test_repeated_ids_in_a_row_add_up():
    # topk never repeats an id within a row; should one, it counts twice, as in embedding_bag.
    gen = torch.Generator().manual_seed(9)
    idx = torch.tensor([[1, 1, 3], [0, 2, 2], [3, 3, 3]])
    vals = torch.randn(3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    W = sae_weights(5, 4, torch.float64, gen)
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda vals, W_dec: sparse_decode(idx, vals, W_dec), (vals, W["W_dec"]))
    assert torch.autograd.gradcheck(lambda x, W_enc, b_enc: sparse_encode(x, W_enc, b_enc, idx),
                                    (x, W["W_enc"], W["b_enc"]))
    torch.testing.assert_close(sparse_decode(idx, vals, W["W_dec"]),
                               torch.nn.functional.embedding_bag(idx, W["W_dec"], per_sample_weights=vals, mode="sum"))


def test_float64_step_matches_dense_exactly():
    gen = torch.Generator().manual_seed(0)
    B, d_in, d_sae, k = 40, 8, 30, 6
    W = sae_weights(d_in, d_sae, torch.float64, gen)
    inp = torch.randn(B, d_in, dtype=torch.float64, generator=gen)
    idx = distinct_idx(B, d_sae, k, gen, hot=(3, 17))
    grad_out = torch.randn(B, d_in, dtype=torch.float64, generator=gen)
    out_s, grads_s = run_step(sparse_forward, inp, idx, W, grad_out)
    out_d, grads_d = run_step(dense_forward, inp, idx, W, grad_out)
    torch.testing.assert_close(out_s, out_d, rtol=1e-12, atol=1e-12)
    for name in W:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-12, atol=1e-12, msg=name)


# --- float32 against the dense reference (medium shapes, idx from a real topk) ---

@pytest.mark.parametrize("B,d_in,d_sae,k", [(256, 64, 1024, 32), (256, 64, 1024, 512), (64, 32, 512, 512),
                                            (37, 13, 101, 7), (16, 8, 64, 64)])
def test_float32_step_matches_dense(B, d_in, d_sae, k):
    gen = torch.Generator().manual_seed(k)
    W = sae_weights(d_in, d_sae, torch.float32, gen)
    with torch.no_grad():
        W["b_enc"][:3] += 10.0  # three hot latents selected by every row, as dense latents are in training
    inp = torch.randn(B, d_in, generator=gen)
    with torch.no_grad():
        _, idx = topk_latents((inp - W["b_dec"]) @ W["W_enc"] + W["b_enc"], k)
    assert (idx[:, :3].sort(dim=1).values == torch.arange(3)).all()
    grad_out = torch.randn(B, d_in, generator=gen)
    out_s, grads_s = run_step(sparse_forward, inp, idx, W, grad_out)
    out_d, grads_d = run_step(dense_forward, inp, idx, W, grad_out)
    assert_close_to_scale(out_s, out_d)
    for name in W:  # b_dec's gradient covers the path through x = inp - b_dec
        assert grads_s[name].is_contiguous()
        assert_close_to_scale(grads_s[name], grads_d[name])


def test_latent_major_W_enc_gets_grad_in_its_own_layout():
    gen = torch.Generator().manual_seed(1)
    B, d_in, d_sae, k = 64, 16, 128, 8
    W = sae_weights(d_in, d_sae, torch.float32, gen)
    W_enc_T = W["W_enc"].detach().t().contiguous().requires_grad_()  # stored [d_sae, d_in], passed as .t()
    inp = torch.randn(B, d_in, generator=gen)
    idx = distinct_idx(B, d_sae, k, gen, hot=(5,))
    grad_out = torch.randn(B, d_in, generator=gen)
    sparse_decode(idx, sparse_encode(inp, W_enc_T.t(), W["b_enc"], idx).relu(), W["W_dec"]).backward(grad_out)
    sparse_decode(idx, sparse_encode(inp, W["W_enc"], W["b_enc"], idx).relu(), W["W_dec"]).backward(grad_out)
    assert W_enc_T.grad.is_contiguous()
    assert_close_to_scale(W_enc_T.grad.t(), W["W_enc"].grad)


# --- the sparse contract: no work or memory on the d_sae scale beyond the weights ---

class LargestStrided(TorchDispatchMode):
    """Records the largest strided tensor any aten op returns (sparse CSR patterns are B*k, not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_larger_than_a_weight_matrix():
    gen = torch.Generator().manual_seed(2)
    B, d_in, d_sae, k = 512, 16, 1024, 64  # B*d_sae = 512k and B*k*d_in = 512k, a weight matrix is 16k
    W = sae_weights(d_in, d_sae, torch.float32, gen)
    inp = torch.randn(B, d_in, generator=gen)
    idx = distinct_idx(B, d_sae, k, gen, hot=(0,))
    with LargestStrided() as mode:
        sparse_forward(inp, idx, **W).backward(torch.randn(B, d_in, generator=gen))
    assert 0 < mode.largest <= max(d_in * d_sae, B * d_in, B * k)


def test_x_without_grad_gets_none_and_skips_its_product(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    B, d_in, d_sae, k = 64, 16, 128, 8
    W = sae_weights(d_in, d_sae, torch.float32, gen)
    idx = distinct_idx(B, d_sae, k, gen, hot=(1,))
    g = torch.randn(B, k, generator=gen)
    spmm_calls = []
    real_spmm = sparse._spmm
    monkeypatch.setattr(sparse, "_spmm", lambda s, d: spmm_calls.append(s.shape) or real_spmm(s, d))

    x = torch.randn(B, d_in, generator=gen)
    sparse_encode(x, W["W_enc"], W["b_enc"], idx).backward(g)
    assert x.grad is None and spmm_calls == [(d_sae, B)]  # only W_enc's S^T @ x, no S @ W_enc^T for x
    grad_W_no_x = W["W_enc"].grad.clone()

    W["W_enc"].grad = None
    spmm_calls.clear()
    x.requires_grad_()
    sparse_encode(x, W["W_enc"], W["b_enc"], idx).backward(g)
    assert x.grad is not None and sorted(spmm_calls) == [(B, d_sae), (d_sae, B)]
    torch.testing.assert_close(W["W_enc"].grad, grad_W_no_x, rtol=0, atol=0)


def test_only_needed_grads_are_computed():
    gen = torch.Generator().manual_seed(4)
    W = sae_weights(8, 32, torch.float32, gen)
    idx = distinct_idx(10, 32, 4, gen)
    vals = torch.rand(10, 4, generator=gen, requires_grad=True)
    W_dec = W["W_dec"].detach()
    sparse_decode(idx, vals, W_dec).sum().backward()  # frozen decoder: only vals gets a gradient
    assert vals.grad is not None and W_dec.grad is None
    torch.testing.assert_close(vals.grad, W_dec.sum(dim=1)[idx])


# --- input handling ---

def test_int32_idx_and_out_of_range_ids():
    gen = torch.Generator().manual_seed(5)
    W = sae_weights(8, 32, torch.float32, gen)
    x = torch.randn(10, 8, generator=gen)
    idx = distinct_idx(10, 32, 4, gen)
    with torch.no_grad():
        torch.testing.assert_close(sparse_encode(x, W["W_enc"], W["b_enc"], idx.int()),
                                   sparse_encode(x, W["W_enc"], W["b_enc"], idx))
    with pytest.raises(IndexError):
        sparse_encode(x, W["W_enc"], W["b_enc"], idx.masked_fill(idx == idx[0, 0], 32))
    with pytest.raises(IndexError):
        sparse_decode(idx - 1, torch.ones(10, 4), W["W_dec"])


# --- topk_latents ---

def test_topk_latents_matches_topk_of_relu():
    gen = torch.Generator().manual_seed(6)
    pre = torch.randn(50, 40, generator=gen, requires_grad=True)
    with torch.no_grad():
        pre[:10] -= 3.0  # rows with fewer than k positives: topk(relu) ties their tail at 0
    vals, idx = topk_latents(pre, 8)
    ref_vals, ref_idx = pre.detach().relu().topk(8, dim=1)
    assert not vals.requires_grad
    torch.testing.assert_close(vals, ref_vals, rtol=0, atol=0)
    assert ((pre.detach().gather(1, idx) > 0) == (vals > 0)).all()
    positive = vals > 0
    assert torch.equal(idx[positive], ref_idx[positive])  # positives are distinct, so the same ids in order
    assert (~positive[:10]).any()  # the tail case was exercised
    W_dec = torch.randn(40, 5, generator=gen)
    torch.testing.assert_close(sparse_decode(idx, vals, W_dec), sparse_decode(ref_idx, ref_vals, W_dec))
    vals2, idx2 = topk_latents(pre, 8)
    assert torch.equal(idx, idx2) and torch.equal(vals, vals2)


def test_id_check_reads_nothing_back_from_a_gpu():
    """On a GPU the range check is a device-side assert: under fake CUDA tensors any read-back would raise."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        idx = torch.randint(0, 32, (10, 4), device="cuda")
        assert _check_idx(idx, 32).shape == (10, 4)
        assert _check_idx(idx.int(), 32).dtype == torch.long
