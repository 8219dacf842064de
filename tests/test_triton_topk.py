"""The fused encoder + TopK Triton kernel against torch's encode + topk.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, numpy on the CPU: about 0.2 s per tile,
so the shapes are tiny); with CUDA it runs compiled. Skipped where triton is not installed (the optional extra
`gpu`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vsae.fast_topk import encode_select, same_selection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton reads the switch when it decorates functions, its own library's included: set before triton's import,
# and only while these modules load (the tests set it again, see _interpret).
_before = os.environ.get("TRITON_INTERPRET")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton", reason="triton is not installed: it is the optional extra `gpu` "
                                                   "(pip install '.[gpu]')")

    # Another test module may have imported triton (torch._dynamo does) before the switch was set: its library is
    # then compiled-only, and these tests run in a fresh process instead (test_in_a_fresh_interpreter).
    IN_PROCESS = DEVICE == "cuda" or type(triton.language.standard.zeros).__name__ != "JITFunction"
    in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported without its interpreter: "
                                                           "test_in_a_fresh_interpreter runs these")
    if IN_PROCESS:
        import vsae.triton_topk as tt
finally:
    if _before is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _before


@pytest.mark.skipif(IN_PROCESS, reason="the tests below run in this process")
def test_in_a_fresh_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) >= 6, done.stdout[-2000:]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    # The interpreter also reads the switch at each launch.
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


SMALL = dict(block_m=16, block_n=32, block_k=16)  # tiny tiles: several of each kind at a small shape


def _inputs(B: int, d_in: int, d_sae: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tensors = (torch.randn(B, d_in, generator=g), torch.randn(d_in, d_sae, generator=g),
               torch.randn(d_sae, generator=g), torch.randn(d_in, generator=g))
    return tuple(t.to(DEVICE) for t in tensors)


def _assert_same(vals, idx, ref_vals, ref_idx, atol: float) -> None:
    assert idx.shape == ref_idx.shape
    assert bool(same_selection(idx, ref_idx).all()), "selected latent ids differ from torch.topk's"
    order, ref_order = idx.argsort(dim=1), ref_idx.argsort(dim=1)
    torch.testing.assert_close(vals.gather(1, order).float(), ref_vals.gather(1, ref_order).float(),
                               atol=atol, rtol=atol)


@in_process
@pytest.mark.parametrize("pre_bias", [True, False])
def test_fp32_matches_torch_on_ragged_shapes(pre_bias):
    # 20 rows (a partial row block), d_in 24 (a partial K tile), d_sae 80 (a partial latent tile), k 5 (not a power
    # of two: the kernel keeps 8 and drops 3).
    x, W, b_enc, b_dec = _inputs(20, 24, 80)
    vals, idx = tt.fused_encode_topk(x, W, b_enc, b_dec, 5, pre_bias, **SMALL)
    _assert_same(vals, idx, *encode_select(x, W, b_enc, b_dec, 5, pre_bias), atol=1e-5)


@in_process
def test_split_latents_merge_to_the_same_answer():
    x, W, b_enc, b_dec = _inputs(16, 16, 128, seed=1)
    vals, idx = tt.fused_encode_topk(x, W, b_enc, b_dec, 8, True, n_splits=3, **SMALL)
    _assert_same(vals, idx, *encode_select(x, W, b_enc, b_dec, 8, True), atol=1e-5)


@in_process
def test_keys_order_negative_values_and_keep_every_latent_when_k_is_d_sae():
    # Biases far below zero make most pre-activations negative: the key mapping must order negatives right.
    x, W, b_enc, b_dec = _inputs(16, 16, 8, seed=2)
    b_enc = b_enc - 30
    vals, idx = tt.fused_encode_topk(x, W, b_enc, b_dec, 3, False, **SMALL)
    pre = torch.addmm(b_enc, x, W)
    assert bool(same_selection(idx, pre.topk(3, dim=1).indices).all())
    assert bool((vals == 0).all())  # ReLU of negatives
    _, idx_all = tt.fused_encode_topk(x, W, b_enc, b_dec, 8, False, **SMALL)
    assert bool((idx_all.sort(dim=1).values == torch.arange(8, device=DEVICE)).all())


@in_process
def test_bf16_inputs_select_as_fp32_math_on_the_rounded_inputs():
    # The kernel multiplies bf16 operands into an fp32 accumulator: torch in fp32 on the same rounded inputs is its
    # reference up to summation order.
    x, W, b_enc, b_dec = (t.bfloat16() for t in _inputs(16, 32, 64, seed=3))
    vals, idx = tt.fused_encode_topk(x, W, b_enc, b_dec, 4, True, **SMALL)
    assert vals.dtype == torch.bfloat16
    ref = encode_select((x - b_dec).float(), W.float(), b_enc.float(), torch.zeros(32, device=DEVICE), 4, False)
    _assert_same(vals, idx, *ref, atol=1e-2)


@in_process
def test_bad_shapes_name_the_input():
    x, W, b_enc, b_dec = _inputs(4, 8, 16)
    with pytest.raises(ValueError, match="x has shape"):
        tt.fused_encode_topk(x[:, :4], W, b_enc, b_dec, 2, True)
    with pytest.raises(ValueError, match="k = 17"):
        tt.fused_encode_topk(x, W, b_enc, b_dec, 17, True)
    with pytest.raises(ValueError, match="b_enc"):
        tt.fused_encode_topk(x, W, b_enc[:3], b_dec, 2, True)
