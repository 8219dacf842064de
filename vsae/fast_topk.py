"""Candidates for the encoder + TopK selection of a TopK training step, for benchmarks to compare (issue 14).

TopK over the dense [B, d_sae] pre-activations is the slowest part of a TopK step on a GPU. Each candidate here
computes the same thing, `encode_select`, another way: in bf16, through `torch.compile`, or with the fused Triton
kernel of `vsae/triton_topk.py`. None is wired into the trainer: `benchmarks/topk_candidates.py` measures them
side by side, and only a measurement on a GPU may promote one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

Select = Callable[[Tensor, Tensor, Tensor, Tensor, int, bool], tuple[Tensor, Tensor]]


def encode_select(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, pre_bias: bool
                  ) -> tuple[Tensor, Tensor]:
    """(vals, idx) [B, k] of TopK(ReLU(W_enc (x - b_dec) + b_enc)) for x [B, d_in], W_enc [d_in, d_sae].

    The reference every candidate must match: computed in x's dtype (pass bf16 x for what a bf16 autocast step
    computes), ids unsorted as `topk(sorted=False)` gives them.
    """
    W_enc, b_enc, b_dec = W_enc.to(x.dtype), b_enc.to(x.dtype), b_dec.to(x.dtype)
    if pre_bias:
        x = x - b_dec
    pre = torch.addmm(b_enc, x, W_enc)
    vals, idx = pre.topk(k, dim=1, sorted=False)
    return vals.relu(), idx


def bf16_select(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, pre_bias: bool
                ) -> tuple[Tensor, Tensor]:
    """`encode_select` with the GEMM and the topk in bf16 (what a bf16 autocast step runs); vals in x's dtype."""
    vals, idx = encode_select(x.to(torch.bfloat16), W_enc, b_enc, b_dec, k, pre_bias)
    return vals.to(x.dtype), idx


def compile_available() -> str | None:
    """Why `torch.compile` cannot run here (None when it can): inductor needs a C++ compiler on the CPU."""
    try:
        fn = torch.compile(lambda t: t.relu() + 1, dynamic=False)
        fn(torch.randn(4))
    except Exception as err:  # noqa: BLE001 -- any failure means "not here"; the message says which
        return f"torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


@cache
def compiled_select(mode: str = "default") -> Select:
    """`encode_select` through `torch.compile` (one compiled function per mode; shapes static, k a constant)."""
    return torch.compile(encode_select, mode=mode, dynamic=False)


def triton_select(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, pre_bias: bool
                  ) -> tuple[Tensor, Tensor]:
    """The fused encoder + TopK Triton kernel (imported late: triton is an optional extra, `pip install .[gpu]`)."""
    from vsae.triton_topk import fused_encode_topk

    return fused_encode_topk(x, W_enc, b_enc, b_dec, k, pre_bias)


def candidates() -> dict[str, Select]:
    """Every candidate by name, for the benchmark; "eager" is the fp32 reference."""
    return {"eager": encode_select, "bf16": bf16_select, "compiled": compiled_select(),
            "compiled_bf16": _compiled_bf16(), "triton": triton_select}


@cache
def _compiled_bf16() -> Select:
    return torch.compile(bf16_select, dynamic=False)


def same_selection(idx_a: Tensor, idx_b: Tensor) -> Tensor:
    """Per row, whether two [B, k] id sets are equal (order ignored)."""
    return (idx_a.sort(dim=1).values == idx_b.sort(dim=1).values).all(dim=1)
