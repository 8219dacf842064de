"""AuxK's two paths against the number of candidate latents: dense products over the candidate columns vs the
sparse kernels (B x k_aux dot products), forward + backward, same process. Sets `vsae.variants.AUX_DENSE_MAX`.

    python benchmarks/auxk_paths.py [--batch-size 4096] [--shape 512,8192,256]   # d_in,d_sae,k_aux
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vsae.variants as variants
from vsae.config import SAEConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--shape", default="512,8192,256")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    d_in, d_sae, k_aux = (int(v) for v in args.shape.split(","))
    sae = variants.build_sae(SAEConfig(d_sae=d_sae, k=64, aux_k_coef=1 / 32, k_aux=k_aux), d_in,
                             torch.Generator().manual_seed(0))
    x = torch.randn(args.batch_size, d_in, generator=torch.Generator().manual_seed(1))
    pre = sae.selection_pre(x).clone()
    residual = 0.1 * x
    print(f"B {args.batch_size}, d_in {d_in}, d_sae {d_sae}, k_aux {k_aux}; ms per forward + backward (median)")
    for ratio in (2, 4, 8, 16, 32):
        n = min(d_sae, ratio * k_aux)
        candidates = torch.randperm(d_sae, generator=torch.Generator().manual_seed(ratio))[:n].sort().values
        dead = torch.zeros(d_sae, dtype=torch.bool)
        dead[candidates] = True
        ms = {}
        for name, limit in (("candidates dense", 10**9), ("sparse kernels", 0)):
            variants.AUX_DENSE_MAX = limit
            times = []
            for _ in range(args.repeats + 1):
                sae.zero_grad(set_to_none=True)
                t = time.perf_counter()
                sae.aux_loss(x, pre, residual, dead, candidates).backward()
                times.append(time.perf_counter() - t)
            ms[name] = round(1e3 * statistics.median(times[1:]))
        print(f"candidates {n} ({n / k_aux:.0f} x k_aux): {ms}")


if __name__ == "__main__":
    main()
