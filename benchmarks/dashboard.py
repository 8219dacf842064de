"""Dashboard speed: every latent of an 8192-latent SAE from 1M cached tokens, one pass (`vsae dashboard`).

    python benchmarks/dashboard.py                      # the target: 1M tokens, d_sae 8192 (a few minutes)
    python benchmarks/dashboard.py --tokens 100000      # a quick run

Synthetic cache (d_in 512, float16, contexts of 128 with BOS dropped) and a random TopK SAE (unit decoder rows,
W_enc = W_dec^T, k 64). The cache names no model, so there are no logit effects or token strings to decode;
everything else (gather, decoder neighbours, one data file per latent, index) is timed. Target on the 2-core CPU:
under 5 minutes end to end for 1M tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.synthetic

from dashboards.build import DashboardConfig, build_dashboard  # noqa: E402
from tests.synthetic import random_cache_and_sae  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--d-sae", type=int, default=8192)
    ap.add_argument("--d-in", type=int, default=512)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--out", default=None, help="keep the dashboard here (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache, run = random_cache_and_sae(tmp, args.tokens, args.d_in, args.d_sae, args.k)
        out = Path(args.out) if args.out else tmp / "dashboard"
        t = time.perf_counter()
        r = build_dashboard(run, DashboardConfig(cache=str(cache), out=str(out), progress=True))
        total = time.perf_counter() - t
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"tokens": r["tokens"], "d_sae": args.d_sae, "k": args.k, "latents": r["latents"],
                      "seconds": {k: round(v, 1) for k, v in r["seconds"].items()}, "total_seconds": round(total, 1),
                      "output_mb": round(size / 2**20, 1), "threads": torch.get_num_threads()}))
    print(f"dashboard of {r['latents']} latents from {r['tokens']:,} tokens: {total:.1f} s "
          f"({r['tokens'] / r['seconds']['gather']:,.0f} tok/s in the gather pass; target < 300 s for 1M tokens)")


if __name__ == "__main__":
    main()
