"""A fused encoder + TopK Triton kernel: the [B, d_sae] pre-activations never reach memory.

Each program takes BLOCK_M rows and a slice of the latents, computes the encoder GEMM tile by tile over its slice
and keeps a running top-k per row. With one slice (`n_splits=1`) the kernel's answer is the final one; with more,
each slice writes its k candidates and a torch.topk over the n_splits * k candidates per row merges them (more
programs in flight for a small batch).

A value and its latent id travel together as one int64 key: the fp32 bits mapped to an order-preserving int32 in
the high word, the id in the low word, so one `tl.topk` of keys selects values and ids at once, and ties break by
id. Correctness is tested on the CPU through Triton's interpreter (`TRITON_INTERPRET=1`, tests/test_triton_topk.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _to_key(pre, ids):
    """fp32 values and int32 ids -> int64 keys ordered as the values (then by id)."""
    bits = pre.to(tl.int32, bitcast=True)
    # A negative float's magnitude bits grow as it falls: flipping them makes signed int32 order match float order.
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | ids.to(tl.int64)


@triton.jit
def _encode_topk_kernel(x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, out_ptr, B, D_IN, D_SAE, SLICE,
                        stride_x, stride_w, stride_out,
                        K: tl.constexpr, PRE_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    lo = pid_s * SLICE
    hi = tl.minimum(lo + SLICE, D_SAE)
    # The running top-k starts below every real key (the most negative value id 0 could give).
    best = tl.full((BLOCK_M, K), -(2**63) + 1, tl.int64)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D_IN
            a = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if PRE_BIAS:
                # Subtracted in fp32 and rounded once, as torch's bf16 x - b_dec is (and the interpreter can't do
                # bf16 arithmetic).
                b_dec = tl.load(b_dec_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                a = (a.to(tl.float32) - b_dec[None, :]).to(a.dtype)
            w = tl.load(w_ptr + ks[:, None] * stride_w + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                        other=0.0)
            if UPCAST:  # the same products: a bf16 x bf16 product is exact in fp32
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        acc += tl.load(b_enc_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        keys = _to_key(acc, cols + tl.zeros((BLOCK_M, BLOCK_N), tl.int32))
        keys = tl.where(col_ok[None, :], keys, -(2**63) + 1)  # padding columns are never chosen
        if BLOCK_N > K:
            keys = tl.topk(keys, K, dim=1)
        both = tl.reshape(tl.join(best, keys), (BLOCK_M, 2 * K))
        best = tl.topk(both, K, dim=1)
    outs = out_ptr + rows[:, None] * stride_out + pid_s * K + tl.arange(0, K)[None, :]
    tl.store(outs, best, mask=row_ok[:, None])


def _from_key(keys: Tensor) -> tuple[Tensor, Tensor]:
    """int64 keys -> (fp32 values, int64 ids): the inverse of `_to_key`."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def _interpreted() -> bool:
    # Triton 3.9's interpreter multiplies bf16 operands of tl.dot as raw 16-bit integers (garbage): there the kernel
    # upcasts them first. Compiled kernels keep bf16 operands for the tensor cores.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> None:
    d_in, d_sae = W_enc.shape
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ValueError(f"x has shape {tuple(x.shape)}; the kernel needs [B, d_in] with d_in = {d_in} (W_enc's rows)")
    if b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
        raise ValueError(f"b_enc {tuple(b_enc.shape)} / b_dec {tuple(b_dec.shape)} must be ({d_sae},) / ({d_in},)")
    if not 0 < k <= d_sae:
        raise ValueError(f"k = {k} must be in 1..d_sae = {d_sae}")
    if d_sae >= 2**31:
        raise ValueError(f"d_sae = {d_sae}: latent ids must fit the key's 31-bit low word")


def fused_encode_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, pre_bias: bool,
                      n_splits: int = 1, block_m: int = 64, block_n: int = 128, block_k: int = 64,
                      precision: str = "ieee") -> tuple[Tensor, Tensor]:
    """(vals, idx) [B, k] of TopK(ReLU(W_enc (x - b_dec) + b_enc)), as `vsae.fast_topk.encode_select` gives them.

    Computed in x's dtype with fp32 accumulation (W_enc is cast to it); vals come back in x's dtype, ids
    int64, sorted by value. `precision` "ieee" keeps fp32 exact; "tf32" trades that for speed on a GPU.
    """
    _check(x, W_enc, b_enc, b_dec, k)
    d_in, d_sae = W_enc.shape
    x, W_enc = x.contiguous(), W_enc.to(x.dtype).contiguous()
    # The precision switch acts on fp32 operands only; bf16/fp16 ones take the tensor cores whatever it says.
    precision = precision if x.dtype == torch.float32 else "tf32"
    k_pow2 = triton.next_power_of_2(k)  # tl.topk takes powers of two: the extra candidates are dropped below
    n_splits = max(1, min(n_splits, d_sae // max(k_pow2, 1)))
    block_n = max(block_n, k_pow2)
    # Slices a whole number of tiles wide, so every program but the last scans full tiles.
    slice_w = triton.cdiv(triton.cdiv(d_sae, n_splits), block_n) * block_n
    n_splits = triton.cdiv(d_sae, slice_w)
    keys = torch.empty(x.shape[0], n_splits * k_pow2, dtype=torch.int64, device=x.device)
    grid = (triton.cdiv(x.shape[0], block_m), n_splits)
    _encode_topk_kernel[grid](x, W_enc, b_enc, b_dec, keys, x.shape[0], d_in, d_sae, slice_w,
                              x.stride(0), W_enc.stride(0), keys.stride(0),
                              K=k_pow2, PRE_BIAS=pre_bias, PRECISION=precision, UPCAST=_interpreted(),
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    if keys.shape[1] != k:
        keys = keys.topk(k, dim=1).values
    vals, idx = _from_key(keys)
    return vals.relu().to(x.dtype), idx
