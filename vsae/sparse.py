"""Sparse hot path of a TopK SAE step: encode and decode touching only the k active latents per row.

Measured on the 2-core dev CPU (torch 2.13.0+cpu with MKL, 2 threads), B 4096, d_in 512, d_sae 8192, k 64, each
building block alone, best of 5 (ms):

    product                          chosen                        other ways measured
    selected pre-activations         sampled_addmm on latent-major  sampled_addmm on W_enc as stored 20,
                                     W_enc rows 13                  gathered rows + bmm in 512-row chunks 208
    S @ W  (S: [B, d_sae] CSR,       addmm_ into an empty           torch.sparse.mm 8.0, embedding_bag 9.9
            B*k nonzeros)            buffer (MKL) 7.5
    S^T @ x  (W_enc, W_dec grads)    stable sort + addmm_ 9.4       torch.sparse.mm 12-19, index_add_ in
                                                                    128-row chunks 40, embedding_bag's backward 28
    W_enc transposed copy            6-8, in the forward and for its grad (none if W_enc is stored latent-major)

So every product is one of three kernels on the same B*k pattern: an SDDMM (`sampled_addmm`: the dot products at
the selected (row, latent) pairs; also <grad_out[b], W_dec[idx[b, j]]> for vals), CSR @ dense for S @ W, and
CSR @ dense on the transposed pattern for S^T @ x, whose CSR comes from one stable sort of the latent ids
(int16 keys: 1.6 ms against 4.9 for int64). Nothing of size [B, d_sae] or [B, k, d_in] is built; the W_enc/W_dec
grads are dense (Adam wants dense) but computed from the nonzeros only. In one process (benchmarks/sparse_ops.py),
sparse_encode + sparse_decode forward+backward took 101 ms against 929 ms for the dense reference (9.2x), 72 ms
with W_enc stored latent-major; a whole TopK forward+backward (encoder matmul and topk included) ran 10.7k tok/s
against 3.9k.

`topk_latents` is here because topk on the pre-activations then ReLU on the k values is as correct as topk on
ReLU(pre) and measured 80 ms against 116 ms (no [B, d_sae] ReLU pass), with no ties among zeros to break.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    # The patterns are built here from a topk's indices, so the invariant check is skipped; the beta
    # warning is noise for a hot path that only uses sampled_addmm and CSR @ dense.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _row_pattern(idx: Tensor, values: Tensor, d_sae: int) -> Tensor:
    """[B, d_sae] CSR with values[b, j] at column idx[b, j]; every row holds k entries, so crow is an arange."""
    B, k = idx.shape
    crow = torch.arange(0, B * k + 1, k, device=idx.device)
    return _csr(crow, idx.reshape(-1), values.reshape(-1), (B, d_sae))


def _col_pattern(idx: Tensor, values: Tensor, d_sae: int) -> Tensor:
    """[d_sae, B] CSR, the transpose of `_row_pattern`: latent c's row lists the batch rows that selected it."""
    B, k = idx.shape
    # Sorting the B*k latent ids is the only non-GEMM work. Narrow keys sort faster (262k ids: int16 1.6 ms,
    # int32 2.9 ms, int64 4.9 ms); key_dtype holds every boundary 0..d_sae that searchsorted looks up.
    key_dtype = torch.int16 if d_sae < 2**15 else torch.int32 if d_sae < 2**31 else torch.int64
    # stable: within a latent the batch rows stay ascending, so the sums run in a fixed order.
    latents, order = torch.sort(idx.reshape(-1).to(key_dtype), stable=True)
    crow = torch.searchsorted(latents, torch.arange(d_sae + 1, dtype=key_dtype, device=idx.device))
    return _csr(crow, order // k, values.reshape(-1)[order], (d_sae, B))


def _spmm(sparse: Tensor, dense: Tensor) -> Tensor:
    """sparse (CSR) @ dense -> dense, row-major."""
    # In place into an empty buffer with beta=0, which addmm documents as ignoring the buffer (NaN included):
    # torch.sparse.mm zero-fills a result and copies it once more (12-22 ms against 9.4 for [d_sae, B] @ [B, d_in]).
    return dense.new_empty(sparse.shape[0], dense.shape[1]).addmm_(sparse, dense, beta=0)


def _selected_dots(a: Tensor, rows: Tensor, idx: Tensor, init: Tensor) -> Tensor:
    """out[b, j] = init[b, j] + a[b] . rows[idx[b, j]]  -> [B, k], for latent-major `rows` [d_sae, d]."""
    # sampled_addmm reads mat2 column by column; rows.t() makes each selected column contiguous in memory.
    pattern = _row_pattern(idx, init, rows.shape[0])
    return torch.sparse.sampled_addmm(pattern, a, rows.t()).values().view(idx.shape)


def _check_idx(idx: Tensor, d_sae: int) -> Tensor:
    # The CSR patterns skip invariant checks, so an out-of-range id would read out of bounds instead of raising.
    if idx.dim() != 2:
        raise ValueError(f"idx must be [B, k], got shape {tuple(idx.shape)}")
    if idx.numel() and idx.device.type != "cpu":
        # Reading the bounds back would wait for the device every step: a device-side assert raises at the next
        # sync instead (a CUDA assert names no values, so the message says which bounds).
        lo, hi = torch.aminmax(idx)
        torch._assert_async((lo >= 0) & (hi < d_sae), f"latent ids must lie in [0, {d_sae})")
    elif idx.numel():
        lo, hi = (int(v) for v in torch.aminmax(idx))
        if lo < 0 or hi >= d_sae:
            raise IndexError(f"latent ids must lie in [0, {d_sae}), got [{lo}, {hi}]")
    return idx.long().contiguous()


class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor) -> Tensor:
        # Latent-major rows make the SDDMM faster (13 vs 20 ms) and serve grad x's S @ W_enc^T. No copy when
        # W_enc is stored latent-major already (a [d_sae, d_in] parameter passed as .t()).
        W_enc_T = W_enc.t().contiguous()
        pre = _selected_dots(x.contiguous(), W_enc_T, idx, b_enc[idx])
        ctx.save_for_backward(x, W_enc_T if ctx.needs_input_grad[0] else None, idx)
        ctx.d_sae = W_enc.shape[1]
        ctx.latent_major = W_enc.t().is_contiguous()
        return pre

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pre: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, W_enc_T, idx = ctx.saved_tensors
        grad_pre = grad_pre.contiguous()
        d_sae = ctx.d_sae
        grad_x = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[0]:
            grad_x = _spmm(_row_pattern(idx, grad_pre, d_sae), W_enc_T)
        if ctx.needs_input_grad[1]:
            # The product comes out latent-major [d_sae, d_in]; it is handed back in W_enc's own layout, which
            # costs a transpose copy (6-8 ms) only for a row-major W_enc.
            grad_W_enc = _spmm(_col_pattern(idx, grad_pre, d_sae), x.contiguous()).t()
            if not ctx.latent_major:
                grad_W_enc = grad_W_enc.contiguous()
        if ctx.needs_input_grad[2]:
            grad_b_enc = grad_pre.new_zeros(d_sae).index_add_(0, idx.reshape(-1), grad_pre.reshape(-1))
        return grad_x, grad_W_enc, grad_b_enc, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: Tensor, vals: Tensor, W_dec: Tensor) -> Tensor:
        W_dec = W_dec.contiguous()
        ctx.save_for_backward(idx, vals, W_dec)
        return _spmm(_row_pattern(idx, vals.contiguous(), W_dec.shape[0]), W_dec)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[None, Tensor | None, Tensor | None]:
        idx, vals, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_vals = grad_W_dec = None
        if ctx.needs_input_grad[1]:
            grad_vals = _selected_dots(grad_out, W_dec, idx, grad_out.new_zeros(idx.shape))
        if ctx.needs_input_grad[2]:
            grad_W_dec = _spmm(_col_pattern(idx, vals.contiguous(), W_dec.shape[0]), grad_out)
        return None, grad_vals, grad_W_dec


def sparse_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor) -> Tensor:
    """Pre-activations of the selected latents only: pre[b, j] = x[b] @ W_enc[:, idx[b, j]] + b_enc[idx[b, j]].

    x [B, d_in], W_enc [d_in, d_sae], b_enc [d_sae], idx [B, k] int64 (from a topk, so distinct within a row;
    repeats would add up, as in embedding_bag) -> [B, k]. Gradients reach x (only when it requires grad, e.g.
    x = input - b_dec), W_enc and b_enc, computed from the B*k selected pairs. W_enc's gradient is dense and has
    W_enc's own layout: store W_enc latent-major (a [d_sae, d_in] parameter passed as `.t()`) to spare a
    transpose copy in the forward and another in the backward (about 10% of this function pair's time).
    """
    # One dtype for every operand (W_enc's): under autocast x may arrive in bf16 while the weights are float32.
    return _SparseEncode.apply(x.to(W_enc.dtype), W_enc, b_enc.to(W_enc.dtype), _check_idx(idx, W_enc.shape[1]))


def sparse_decode(idx: Tensor, vals: Tensor, W_dec: Tensor) -> Tensor:
    """out[b] = sum_j vals[b, j] * W_dec[idx[b, j]]  -> [B, d_in], no bias.

    idx [B, k] as for `sparse_encode`, vals [B, k], W_dec [d_sae, d_in]. Gradients for vals and W_dec (dense in
    W_dec's shape, nonzero on the selected rows only) are computed from the B*k selected pairs.
    """
    # vals are computed in W_dec's dtype (their gradient comes back in their own): under autocast a vSAE's vals
    # are bf16 while W_dec is float32, and the CSR product takes one dtype.
    return _SparseDecode.apply(_check_idx(idx, W_dec.shape[0]), vals.to(W_dec.dtype), W_dec)


@torch.no_grad()
def topk_latents(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(vals, idx) of TopK(ReLU(pre)) along the last dim, without building ReLU(pre).

    ReLU is monotone, so the k largest pre-activations, ReLU'd, are the k largest of ReLU(pre). Where a row has
    fewer than k positives the extra ids differ from topk(relu(pre)) (which ties them all at 0), but their values
    are 0 either way and so is their gradient through ReLU; here they are the next-largest pre-activations, so
    the choice is deterministic, not an arbitrary pick among zeros.
    """
    vals, idx = pre.topk(k, dim=-1)
    return vals.relu_(), idx
