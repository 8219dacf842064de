"""Evaluation speed: core + density over 1M cached tokens for an 8192-latent SAE, and t-SNE of 8192 decoder rows.

    python benchmarks/evals.py [--tokens 1000000] [--d-sae 8192]

Synthetic cache (d_in 512, float16) and a random TopK SAE (k 64). Targets on
the 2-core CPU: each under 2 minutes. CE/KL splicing needs a model and is
timed separately by the tests' scale, not here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# This file's own name would shadow the `evals` package when run as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from activations.cache import write_array_cache  # noqa: E402
from evals.driver import EvalConfig, evaluate  # noqa: E402
from vsae.checkpoint import SAEWeights, write_sae  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--d-sae", type=int, default=8192)
    ap.add_argument("--d-in", type=int, default=512)
    args = ap.parse_args()
    ctx = 128
    n = args.tokens // (ctx - 1) * (ctx - 1)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        acts = np.empty((n, args.d_in), dtype=np.float16)
        for i in range(0, n, 1 << 16):
            acts[i : i + (1 << 16)] = rng.standard_normal((min(1 << 16, n - i), args.d_in), dtype=np.float32)
        write_array_cache(tmp / "cache", acts, ctx, {"kind": "synthetic", "name": "random"})
        del acts
        W_dec = torch.randn(args.d_sae, args.d_in, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        sae = SAEWeights(W_enc=W_dec.T.contiguous(), b_enc=torch.zeros(args.d_sae), W_dec=W_dec,
                         b_dec=torch.zeros(args.d_in), k=64, apply_b_dec_to_input=True)
        run = tmp / "run"
        run.mkdir()
        write_sae(run, sae, {"model_name": "random", "hook_name": "synthetic", "context_size": ctx,
                             "dataset_path": str(tmp / "cache")})
        # evals read the held-out split named in train.json: hold out (almost) all of this cache
        (run / "train.json").write_text(json.dumps({"train": {"eval_fraction": 0.999}}))
        t = time.perf_counter()
        out = evaluate([run], EvalConfig(cache=str(tmp / "cache"), metrics=["core", "density"], tokens=n,
                                         progress=True))
        core_s = time.perf_counter() - t
        n_eval = out[str(run)]["metrics"]["density"]["n_tokens"]
        from evals.tsne import decoder_tsne

        t = time.perf_counter()
        decoder_tsne(W_dec, torch.ones(args.d_sae, dtype=torch.bool), torch.full((args.d_sae,), 0.01))
        tsne_s = time.perf_counter() - t
    print(json.dumps({"core_density_tokens": n_eval, "core_density_seconds": round(core_s, 1),
                      "tsne_points": args.d_sae, "tsne_seconds": round(tsne_s, 1),
                      "threads": torch.get_num_threads()}))
    print(f"core+density on {n_eval:,} tokens: {core_s:.1f} s (target < 120); "
          f"t-SNE of {args.d_sae} decoder rows: {tsne_s:.1f} s (target < 120)")


if __name__ == "__main__":
    main()
