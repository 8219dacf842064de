"""Encoder + TopK selection, every candidate of vsae/fast_topk.py side by side (issue 14, item 4).

    python benchmarks/topk_candidates.py --device cuda            # B 16384, d_in 512, d_sae 8192, k 64
    python benchmarks/topk_candidates.py --device cpu --shape 2048,128,1024,32

Prints ms per call, the ratio to eager fp32 (>1: faster) and the fraction of rows whose selected set equals eager's;
`--json` writes the same, after each candidate (a step killed by its time cap keeps what it measured). Triton runs
only on CUDA (its CPU interpreter is a correctness tool, not a contender).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vsae.fast_topk import bf16_select, compile_available, compiled_select, encode_select, same_selection, triton_select


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, args: tuple, device: str, iters: int) -> float:
    """Mean ms per call after two warm-up calls (compiles happen there)."""
    for _ in range(2):
        fn(*args)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    sync(device)
    return (time.perf_counter() - t0) * 1000 / iters


def contenders(device: str) -> dict:
    """name -> (function, input dtype); triton variants only on CUDA, compiled only where inductor runs."""
    runs = {"eager": (encode_select, torch.float32), "bf16": (encode_select, torch.bfloat16),
            "bf16_cast_in": (bf16_select, torch.float32)}
    if device == "cuda":
        from vsae.triton_topk import fused_encode_topk

        def split4(*a):
            return fused_encode_topk(*a, n_splits=4)

        runs |= {"triton_bf16": (triton_select, torch.bfloat16), "triton_fp32": (triton_select, torch.float32),
                 "triton_bf16_split4": (split4, torch.bfloat16)}
    why = compile_available()
    if why is None:
        runs |= {"compiled_bf16": (compiled_select(), torch.bfloat16), "compiled": (compiled_select(), torch.float32)}
    else:
        print(f"compiled: skipped ({why})")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default=None, help="B,d_in,d_sae,k (default 16384,512,8192,64 on cuda, "
                                                  "2048,128,1024,32 on cpu)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per candidate (default 50 cuda, 5 cpu)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting candidates after this many seconds")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    shape = args.shape or ("16384,512,8192,64" if args.device == "cuda" else "2048,128,1024,32")
    B, d_in, d_sae, k = (int(v) for v in shape.split(","))
    iters = args.iters or (50 if args.device == "cuda" else 5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d_in, generator=g).to(args.device)
    W = (torch.randn(d_in, d_sae, generator=g) / d_in**0.5).to(args.device)
    b_enc, b_dec = torch.zeros(d_sae, device=args.device), torch.randn(d_in, generator=g).to(args.device) * 0.1
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    out = {"device": name, "shape": {"B": B, "d_in": d_in, "d_sae": d_sae, "k": k}, "iters": iters, "candidates": {}}
    _, ref_idx = encode_select(x, W, b_enc, b_dec, k, True)
    start, eager_ms = time.perf_counter(), None
    for cand, (fn, dtype) in contenders(args.device).items():
        if time.perf_counter() - start > args.budget_s:
            out["candidates"][cand] = {"skipped": "over --budget-s"}
            continue
        inputs = (x.to(dtype), W.to(dtype), b_enc.to(dtype), b_dec.to(dtype), k, True)
        try:
            ms = time_ms(fn, inputs, args.device, iters)
            _, idx = fn(*inputs)
            eager_ms = eager_ms or ms
            row = {"ms": round(ms, 4), "speedup_vs_eager": round(eager_ms / ms, 3),
                   "rows_same_as_eager": round(float(same_selection(idx, ref_idx).float().mean()), 4)}
        except Exception as err:  # noqa: BLE001 -- a candidate that fails is a result, not the end of the run
            row = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        out["candidates"][cand] = row
        print(f"{cand:22s} {row}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
